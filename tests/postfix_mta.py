"""A private, loopback-only Postfix instance that makes genuine bounces for the tests.

Mail goes in through Postfix's own ``sendmail`` (or, with ``smtpd_port``, through its
SMTP server on that loopback port) and out through its SMTP client to one relay on
127.0.0.1 (an aiosmtpd server in the test). When
that relay refuses a recipient, Postfix's bounce daemon writes a real DSN to the envelope
sender and hands it to the same relay. Everything lives in a temporary directory and
``stop()`` leaves no daemon behind. Needs Debian's ``postfix`` and root (the master
process starts as root and drops to the ``postfix`` user).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
SENDMAIL = shutil.which("sendmail") or "/usr/sbin/sendmail"

# Only the internal services a local submission and an outbound relay need; no
# `smtp inet` line, so nothing listens on the network. chroot off: the queue is in /tmp.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_available() -> str | None:
    """Why Postfix cannot run here, or None when it can."""
    if not Path(POSTFIX).exists():
        return "Postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    return None


class PostfixInstance:
    """``with PostfixInstance(relay_port) as mta: mta.sendmail(sender, rcpt, message)``."""

    def __init__(
        self, relay_port: int, hostname: str = "mail.clara.example", smtpd_port: int | None = None
    ) -> None:
        self.relay_port = relay_port
        self.hostname = hostname
        self.smtpd_port = smtpd_port
        self.dir = Path(tempfile.mkdtemp(prefix="clara-postfix-", dir="/tmp"))
        self.dir.chmod(0o755)  # the postfix user must reach its queue

    @property
    def config_dir(self) -> Path:
        return self.dir / "etc"

    def _write_config(self) -> None:
        self.config_dir.mkdir()
        (self.dir / "queue").mkdir(mode=0o755)
        (self.dir / "data").mkdir()
        shutil.chown(self.dir / "data", "postfix", "postfix")
        master = MASTER_CF
        if self.smtpd_port is not None:
            master += f"127.0.0.1:{self.smtpd_port} inet n - n - - smtpd\n"
        (self.config_dir / "master.cf").write_text(master)
        (self.config_dir / "main.cf").write_text(
            f"""\
compatibility_level = 3.6
queue_directory = {self.dir}/queue
data_directory = {self.dir}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
mail_owner = postfix
setgid_group = postdrop
myhostname = {self.hostname}
mydomain = clara.example
myorigin = clara.example
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = [127.0.0.1]:{self.relay_port}
smtp_tls_security_level = none
smtp_host_lookup = native
maillog_file = {self.dir}/maillog
maillog_file_prefixes = /tmp
biff = no
"""
            # Our SMTP server: loopback clients may relay; a client that pipelines where
            # RFC 2920 does not allow it is refused (and logged).
            + (
                "mynetworks = 127.0.0.0/8\n"
                "smtpd_data_restrictions = reject_unauth_pipelining\n"
                "smtpd_client_restrictions = reject_unauth_pipelining\n"
                if self.smtpd_port is not None
                else ""
            )
        )

    def start(self) -> PostfixInstance:
        self._write_config()
        self._postfix("start")
        return self

    def _postfix(self, *args: str) -> None:
        result = subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            # Postfix prints its reasons only to a terminal or to its log.
            reason = (
                result.stderr.strip()
                or self.log()[-2000:]
                or (f"run `postfix -c {self.config_dir} check` in a terminal to see why")
            )
            raise RuntimeError(f"postfix {' '.join(args)} failed: {reason}")

    def sendmail(self, sender: str, recipient: str, message: bytes) -> None:
        subprocess.run(
            [SENDMAIL, "-C", str(self.config_dir), "-i", "-f", sender, "--", recipient],
            input=message,
            check=True,
            capture_output=True,
            timeout=60,
        )

    def log(self) -> str:
        path = self.dir / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        try:
            if (self.dir / "queue" / "pid" / "master.pid").exists():
                self._postfix("stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.stop()
