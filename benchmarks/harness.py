"""The clara-mail benchmark: every figure and goal of issues 9 and 18, side by side, in one run.

Started by ``benchmarks/run.sh`` (which installs Postfix's smtp-sink/smtp-source and
GNU time first); see benchmarks/README.md. It starts one ``smtp-sink`` on 127.0.0.1,
runs each row once per repetition (rows interleaved, so load from elsewhere on the
machine spreads over all of them), checks that the sink received every message, and
prints medians and ranges with the ratios against the goals (met / MISSED). A send
judged against smtp-source is judged against an smtp-source run timed just before it
(``PAIRED``); the ratio to row 1's median is printed beside it. The last
row kills ``clara-mail send`` with SIGKILL at full speed into a sink that keeps every
message (``smtp-sink -d``) and compares the delivery log with what the sink received.

Example:
    python benchmarks/harness.py --quick
    python benchmarks/harness.py --quick --only kill --port 26222
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a script: make ``benchmarks.*`` importable
    sys.path.insert(0, str(REPO))

from benchmarks.inputs import (  # noqa: E402
    write_lf_copy,
    write_recipients_csv,
    write_sample_newsletter,
)

CAMPAIGN = "newsletter-2022-01"
SENDER = "newsletter@clara.example"
GNU_TIME = "/usr/bin/time"
# The goals of issue 18 (speed, second round).
SEND_GOAL_RATIO = 0.5  # clara-mail send >= 0.5x smtp-source (same run)
DKIM_GOAL_RATIO = 0.25  # DKIM-signed send >= 0.25x smtp-source
MEMORY_GOAL_MB = 64.0  # peak RSS of a send, at every size, and flat
IMPORT_GOAL_ROWS = {"sqlite": 100_000.0, "postgresql": 50_000.0}  # rows/s
REPORT_GOAL_SECONDS = 0.5  # report over 1,000,000 deliveries, below
#: A send row's sample carries the rate of an smtp-source run (4 connections, the same
#: message and count, into the same sink) timed just before it: the machine's speed drifts
#: by a quarter within minutes, and row 1 is timed minutes before the last send rows.
PAIRED = "smtp_source_before"
REPORT_RUNS = 3  # timed runs of the report per repetition (after one untimed), median kept
# The kill row: `clara-mail send --concurrency 4` killed at these fractions of the
# campaign; the goal is at most one `unknown` row per connection and kill.
KILL_CONCURRENCY = 4
KILL_FRACTIONS = (0.3, 0.4, 0.5)
# What --only selects (rows 1 and 1b come along with any row that shows a ratio).
GROUPS = {
    "startup": "row 0",
    "source": "rows 1, 1b: smtp-source",
    "clients": "rows 2-4: peer clients",
    "send": "row 5: clara-mail send",
    "memory": "row 6: peak RSS",
    "import": "row 7",
    "report": "row 8",
    "dkim": "row 9: signing alone",
    "dkim-send": "rows 9b, 9c: signed sends",
    "kill": "row 10: unknown after kill -9",
    "others": "the other engineers' bench_*.py",
}
NEEDS_SOURCE = {"clients", "send", "dkim-send"}


class BenchError(Exception):
    """A row that could not be measured: the reason goes into the table."""


class SetupError(Exception):
    """The benchmark cannot run at all (port taken, sink does not start): exit status 2."""


# --- measuring a command -----------------------------------------------------------------


@dataclass
class Timed:
    returncode: int
    seconds: float
    rss_mb: float
    stdout: str
    stderr: str
    #: The highest sum of the RSS of the command and its child processes at one moment
    #: (sampled every 5 ms), when asked for: GNU time gives the largest single process.
    tree_mb: float | None = None

    def first_error_line(self) -> str:
        """The ``Error: ...`` line the CLI prints, else the last line of stderr or stdout."""
        err = [
            ln.strip()
            for ln in self.stderr.splitlines()
            # SQLAlchemy's last line is a link, not the error
            if ln.strip() and not ln.strip().startswith("(Background on this error")
        ]
        errors = [ln for ln in err if ln.startswith("Error:")]
        out = [ln.strip() for ln in self.stdout.splitlines() if ln.strip()]
        line = (errors or err or out or [f"exit status {self.returncode}"])[-1]
        return line[:200]


def timed(
    cmd: list[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 7200,
    tree: bool = False,
) -> Timed:
    """Run ``cmd`` under GNU time: wall seconds and peak RSS of the process; with
    ``tree``, also the peak of its processes' RSS summed (``Timed.tree_mb``)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time", dir=cwd) as tfile:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [GNU_TIME, "-f", "%M", "-o", tfile.name, *cmd],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        sampler = _TreeSampler(proc.pid) if tree else None
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        finally:
            if sampler is not None:
                sampler.stop()
        seconds = time.perf_counter() - started
        lines = tfile.read().split()
    # GNU time prints "Command exited with non-zero status N" before the figure.
    rss_kb = float(lines[-1]) if lines and lines[-1].isdigit() else float("nan")
    tree_mb = sampler.peak / 2**20 if sampler is not None else None
    return Timed(proc.returncode, seconds, rss_kb / 1024, stdout, stderr, tree_mb)


class _TreeSampler:
    """Every 5 ms, the RSS of the processes under GNU time's (the command and its
    children, not GNU time itself) summed; ``peak`` is the highest sum seen."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._done.wait(0.005):
            total, todo = 0, _children(self.pid)
            while todo:
                pid = todo.pop()
                todo.extend(_children(pid))
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        total += int(f.read().split()[1]) * page
                except (OSError, IndexError, ValueError):
                    continue  # gone meanwhile
            self.peak = max(self.peak, total)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def clara_command() -> list[str]:
    script = Path(sys.executable).with_name("clara-mail")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clara_mailer"]


# --- the sink ----------------------------------------------------------------------------


def port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Sink:
    """One Postfix smtp-sink on 127.0.0.1:port that counts what it receives.

    smtp-sink binds with SO_REUSEPORT: a second sink on the same port would silently
    take half the connections, so we refuse to start when anything answers there.

    With ``dump_dir`` it also keeps every message it received, one file each
    (``smtp-sink -d``): a file appears at the end of DATA, a transaction cut short
    leaves none, and its first lines name the envelope (``X-Rcpt-Args: <address>``).
    """

    def __init__(
        self, port: int, workdir: Path, pidfile: Path, dump_dir: Path | None = None
    ) -> None:
        self.port, self.pidfile, self.dump_dir = port, pidfile, dump_dir
        self.log = workdir / ("smtp-sink-dump.out" if dump_dir else "smtp-sink.out")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if port_answers(self.port):
            raise SetupError(
                f"127.0.0.1:{self.port} already answers; smtp-sink uses SO_REUSEPORT "
                "and a second one would split the traffic: stop the other server or use --port"
            )
        cmd = ["smtp-sink", "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        if self.dump_dir is not None:
            cmd += ["-d", f"{self.dump_dir}/%H%M%S."]  # + a random hex suffix per message
        cmd += [f"127.0.0.1:{self.port}", "1024"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        with self.pidfile.open("a") as fh:
            fh.write(f"{self.proc.pid}\n")
        for _ in range(100):
            if self.proc.poll() is not None:
                raise SetupError(f"smtp-sink exited: {self.log.read_text()[-300:]}")
            if port_answers(self.port):
                return
            time.sleep(0.05)
        raise SetupError(f"smtp-sink did not answer on 127.0.0.1:{self.port}")

    def received(self) -> int:
        """Messages received since the sink started (its -c counter, unbuffered)."""
        tail = self.log.read_bytes()[-400:].decode("ascii", "replace")
        found = re.findall(r"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def wait_settled(self) -> int:
        """The count once it stops moving: the last '.' may be counted a moment later."""
        last = self.received()
        for _ in range(20):
            time.sleep(0.05)
            now = self.received()
            if now == last:
                return now
            last = now
        return last

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def dumped_recipients(self) -> Counter[str]:
        """How many messages the sink kept per envelope recipient (``-d`` files)."""
        assert self.dump_dir is not None
        found: Counter[str] = Counter()
        for path in self.dump_dir.iterdir():
            with path.open("rb") as fh:
                head = fh.read(4096).split(b"\n\n", 1)[0]
            for rcpt in re.findall(rb"^X-Rcpt-Args: <?([^>\s]*)", head, re.MULTILINE):
                found[rcpt.decode("utf-8", "replace").casefold()] += 1
        return found

    def clear_dump(self) -> None:
        assert self.dump_dir is not None
        for path in self.dump_dir.iterdir():
            path.unlink()


def dump_directory(workdir: Path, needed_bytes: int) -> Path:
    """Where the recording sink writes: tmpfs (/dev/shm) when it has room, so the disk
    does not slow the sink down, else the work directory. As root the sink runs as
    ``nobody``, who must be able to write there."""
    base = workdir
    shm = Path("/dev/shm")
    with suppress(OSError):
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > needed_bytes:
            base = shm
    path = Path(tempfile.mkdtemp(prefix="clara-bench-dump.", dir=base))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
        if base == workdir:  # mktemp -d made it 0700: let nobody through (not list)
            workdir.chmod(workdir.stat().st_mode | 0o011)
    return path


# --- databases ----------------------------------------------------------------------------


class Databases:
    """Fresh SQLite files and PostgreSQL databases, each removed when done."""

    def __init__(self, workdir: Path, postgres_admin_url: str | None) -> None:
        self.workdir, self.pg_admin = workdir, postgres_admin_url
        self.created_pg: list[str] = []

    @property
    def backends(self) -> list[str]:
        return ["sqlite", "postgresql"] if self.pg_admin else ["sqlite"]

    @contextmanager
    def fresh(self, backend: str, label: str) -> Iterator[str]:
        if backend == "sqlite":
            path = self.workdir / f"{label}-{uuid.uuid4().hex[:6]}.db"
            try:
                yield f"sqlite:///{path}"
            finally:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            return
        assert self.pg_admin
        name = f"clara_bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(self.pg_admin, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.created_pg.append(name)
        admin.dispose()
        try:
            yield make_url(self.pg_admin).set(database=name).render_as_string(hide_password=False)
        finally:
            self.drop(name)

    def drop(self, name: str) -> None:
        assert self.pg_admin
        admin = create_engine(self.pg_admin, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        self.created_pg.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created_pg):
            with suppress(Exception):
                self.drop(name)


def status_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT status, COUNT(*) FROM deliveries GROUP BY status"))
            return {str(status): int(count) for status, count in rows}
    finally:
        engine.dispose()


def delivery_statuses(url: str) -> dict[str, str]:
    """Each delivery's state by its (case-folded) address."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT email, status FROM deliveries"))
            return {str(email).casefold(): str(status) for email, status in rows}
    finally:
        engine.dispose()


# --- rows ---------------------------------------------------------------------------------


@dataclass
class Sample:
    value: float
    rss_mb: float | None = None
    seconds: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


# How a row's goal is judged (Row.goal_kind), against Row.goal_value:
#   "ratio"       the median of the row's paired ratios (each sample over the smtp-source
#                 run timed just before it, ``Row.paired``) >= value; a row measured
#                 without them: its median / smtp-source's median (row 1) >= value
#   "at-least"    median >= value
#   "below"       median < value
#   "rss-at-most" the highest peak RSS of the row <= value (MB)
#   "each-at-most" every sample <= value (the kill row: every kill)


@dataclass
class Row:
    key: str
    label: str
    unit: str  # msg/s, rows/s, s, ms/msg, MB, rows
    goal: str = ""
    ratio: bool = False  # show the ratio to smtp-source
    goal_kind: str = ""
    goal_value: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    note: str = ""

    def median(self) -> float | None:
        return statistics.median(s.value for s in self.samples) if self.samples else None

    def rss(self) -> float | None:
        values = [s.rss_mb for s in self.samples if s.rss_mb is not None]
        return max(values) if values else None

    def paired(self) -> list[float]:
        """Each sample over the smtp-source run timed just before it (``PAIRED``)."""
        return [s.value / s.detail[PAIRED] for s in self.samples if s.detail.get(PAIRED)]


@dataclass
class Plan:
    recipients: int
    reps: int
    import_rows: int
    report_rows: int
    memory_sizes: tuple[int, ...]
    dkim_messages: int
    client_messages: int  # rows 2 and 3 (~300 msg/s: a full send would take minutes)
    kill_recipients: int
    kills: int = len(KILL_FRACTIONS)
    concurrencies: tuple[int, ...] = (4, 16)


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan, workdir: Path) -> None:
        self.args, self.plan, self.workdir = args, plan, workdir
        self.sink = Sink(args.port, workdir, workdir / "pids")
        self.dbs = Databases(workdir, args.postgres)
        self.rows: dict[str, Row] = {}
        self.message = workdir / "newsletter.eml"
        self.message_source = "generated stand-in"
        self.csv: dict[int, Path] = {}
        self.others: list[tuple[str, str]] = []
        self.groups: set[str] = set(args.only or GROUPS)
        # The report's large logs are made once and read by every repetition.
        self.report_urls: dict[str, str] = {}
        self.report_logs = ExitStack()
        self.seconds: dict[str, float] = {}  # wall time spent per group of rows
        self.signatures_seen: set[str] = set()  # signed rows checked once per run

    @contextmanager
    def timing(self, group: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[group] = self.seconds.get(group, 0.0) + time.perf_counter() - started

    # ---- helpers

    def row(self, key: str, label: str, unit: str, **kw: Any) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, label, unit, **kw)
        return self.rows[key]

    def attempt(self, row: Row, measure: Callable[[], Sample]) -> None:
        try:
            sample = measure()
        except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
            row.errors.append(str(exc).splitlines()[0][:160] if str(exc) else repr(exc))
            print(f"  {row.label}: FAILED: {row.errors[-1]}", flush=True)
            return
        row.samples.append(sample)
        rss = f", {sample.rss_mb:.0f} MB" if sample.rss_mb is not None else ""
        if "tree_mb" in sample.detail:
            rss += f" ({sample.detail['tree_mb']:.0f} MB with its child processes at once)"
        if sample.detail.get(PAIRED):
            source = sample.detail[PAIRED]
            rss += f"; smtp-source just before: {source:,.1f} msg/s, {sample.value / source:.2f}x"
        print(f"  {row.label}: {sample.value:,.1f} {row.unit}{rss}", flush=True)

    def recipients_csv(self, count: int) -> Path:
        if count not in self.csv:
            self.csv[count] = write_recipients_csv(self.workdir / f"recipients-{count}.csv", count)
        return self.csv[count]

    def clara_env(self, database_url: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLARA_")}
        env.update(
            CLARA_DATABASE_URL=database_url,
            CLARA_SMTP_URL=f"smtp://127.0.0.1:{self.args.port}?tls=none",
            CLARA_SECRET_KEY="benchmark-secret-0123456789abcdef",
            CLARA_BASE_URL="https://clara.example",
            CLARA_OUTBOX_DIR=str(self.workdir / "outbox"),
            CLARA_BOUNCE_ADDRESS="bounces@clara.example",
            # An SMTP send needs the legal footer (sample values, as in the tests).
            CLARA_SENDER_LEGAL_NAME="CLARA benchmark sender (sample)",
            CLARA_SENDER_POSTAL_ADDRESS="sample postal address",
            CLARA_CONTROLLER_CONTACT="privacy@clara.example",
            CLARA_PRIVACY_URL="https://clara.example/privacy",
        )
        env.update(extra)
        return env

    def clara(
        self, *args: str, env: dict[str, str], timeout: float = 7200, tree: bool = False
    ) -> Timed:
        return timed(
            [*clara_command(), *args], cwd=self.workdir, env=env, timeout=timeout, tree=tree
        )

    def import_recipients(self, database_url: str, count: int) -> None:
        result = self.clara(
            "import", str(self.recipients_csv(count)), env=self.clara_env(database_url)
        )
        if result.returncode != 0:
            raise BenchError(f"clara-mail import: {result.first_error_line()}")

    def expect_received(self, before: int, expected: int) -> None:
        got = self.sink.wait_settled() - before
        if got != expected:
            raise BenchError(f"the sink received {got} messages, not {expected}")

    # ---- inputs

    def prepare_message(self) -> None:
        """The real rendered newsletter if ``clara-mail preview`` can give it, else a stand-in."""
        with self.dbs.fresh("sqlite", "preview") as url:
            try:
                self.import_recipients(url, 10)
                result = self.clara(
                    "preview", CAMPAIGN, "--format", "eml", env=self.clara_env(url), timeout=120
                )
            except BenchError:
                result = None
        if result is not None and result.returncode == 0 and "Content-Type:" in result.stdout:
            raw = result.stdout.encode("utf-8", "surrogateescape")
            self.message.write_bytes(raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
            self.message_source = "clara-mail preview newsletter-2022-01 --format eml"
        else:
            write_sample_newsletter(self.message)
        write_lf_copy(self.message, self.workdir / "newsletter.lf")
        size = self.message.stat().st_size
        print(f"message: {size:,} bytes, from {self.message_source}", flush=True)

    def startup(self) -> Sample:
        """What every command pays before it does anything: context for rows 5-8."""
        result = self.clara("--version", env=self.clara_env("sqlite://"))
        if result.returncode != 0:
            raise BenchError(f"clara-mail --version: {result.first_error_line()}")
        return Sample(result.seconds, result.rss_mb, result.seconds)

    # ---- rows 1-4: the limit and the peer baselines

    def smtp_source(self, reuse: bool, count: int | None = None) -> Sample:
        n = count or self.plan.recipients
        cmd = ["smtp-source", "-N", "-s", "4", "-m", str(n)]
        cmd += ["-d"] if reuse else []
        cmd += ["-F", str(self.workdir / "newsletter.lf"), "-f", SENDER]
        cmd += ["-t", "person@recipients.example", f"127.0.0.1:{self.args.port}"]
        before = self.sink.wait_settled()
        result = timed(cmd, cwd=self.workdir)
        if result.returncode != 0:
            raise BenchError(f"smtp-source: {result.first_error_line()}")
        self.expect_received(before, n)
        return Sample(n / result.seconds, result.rss_mb, result.seconds)

    def client(self, mode: str, connections: int, n: int) -> Sample:
        cmd = [sys.executable, str(HERE / "bench_clients.py"), "--mode", mode]
        cmd += ["--port", str(self.args.port), "--message", str(self.message)]
        cmd += ["--recipients", str(n), "--connections", str(connections)]
        before = self.sink.wait_settled()
        result = timed(cmd, cwd=self.workdir)
        if result.returncode != 0:
            raise BenchError(f"{mode}: {result.first_error_line()}")
        self.expect_received(before, n)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        return Sample(figures["rate"], result.rss_mb, figures["seconds"])

    # ---- rows 5, 6 and 9b: clara-mail send, the whole pipeline

    def clara_send(
        self,
        backend: str,
        concurrency: int,
        count: int,
        extra_env: dict[str, str] | None = None,
        processes: int = 1,
        tree: bool = False,
        paired: bool = False,
    ) -> Sample:
        """``paired``: time smtp-source with the same count just before the send (its rate
        goes in the sample's ``PAIRED`` detail)."""
        with self.dbs.fresh(backend, f"send-c{concurrency}-p{processes}") as url:
            self.import_recipients(url, count)
            env = self.clara_env(url, **(extra_env or {}))
            source = self.smtp_source(reuse=True, count=count).value if paired else None
            before = self.sink.wait_settled()
            result = self.clara(
                "send",
                CAMPAIGN,
                "--yes",
                "--concurrency",
                str(concurrency),
                "--processes",
                str(processes),
                env=env,
                tree=tree,
            )
            if result.returncode != 0:
                raise BenchError(f"clara-mail send: {result.first_error_line()}")
            self.expect_received(before, count)
            counts = status_counts(url)
            if counts.get("sent") != count:
                raise BenchError(f"delivery log after the send: {counts}, not {count} sent")
        detail: dict[str, Any] = {} if result.tree_mb is None else {"tree_mb": result.tree_mb}
        if source is not None:
            detail[PAIRED] = source
        return Sample(count / result.seconds, result.rss_mb, result.seconds, detail)

    def dkim_key(self) -> Path:
        key = self.workdir / "dkim.pem"
        if not key.exists():
            from benchmarks.bench_dkim import new_key

            key.write_bytes(new_key()[0])
        return key

    def dual_signature_env(self) -> dict[str, str] | None:
        """The settings of a second, Ed25519 signature (RFC 8463) when this clara-mail
        has them (``dkim_ed25519_*``), else None: row 9c is left out."""
        from dataclasses import fields as settings_fields

        from clara_mailer.core.settings import Settings

        names = [f.name for f in settings_fields(Settings) if f.name.startswith("dkim_ed25519")]
        if not names:
            return None
        env: dict[str, str] = {}
        for name in names:
            if name.endswith("key_file"):
                env[f"CLARA_{name.upper()}"] = str(self.ed25519_key())
            elif name.endswith("selector"):
                env[f"CLARA_{name.upper()}"] = "bench-ed25519"
            elif name.endswith("domain"):
                env[f"CLARA_{name.upper()}"] = "clara.example"
        return env

    def ed25519_key(self) -> Path:
        """An Ed25519 private key, PEM (PKCS#8), made once."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = self.workdir / "dkim-ed25519.pem"
        if not key.exists():
            key.write_bytes(
                Ed25519PrivateKey.generate().private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return key

    # ---- row 7: import

    def import_rate(self, backend: str) -> Sample:
        n = self.plan.import_rows
        csv_path = self.recipients_csv(n)
        with self.dbs.fresh(backend, "import") as url:
            result = self.clara("import", str(csv_path), env=self.clara_env(url))
            if result.returncode != 0:
                raise BenchError(f"import: {result.first_error_line()}")
            engine = create_engine(url)
            with engine.connect() as conn:
                stored = conn.execute(text("SELECT COUNT(*) FROM recipients")).scalar_one()
            engine.dispose()
        if stored != n:
            raise BenchError(f"{stored} recipients stored, not {n}")
        return Sample(n / result.seconds, result.rss_mb, result.seconds)

    # ---- row 8: report over a large delivery log

    @contextmanager
    def report_log(self, backend: str) -> Iterator[str]:
        with self.dbs.fresh(backend, "report") as url:
            from benchmarks.bench_report_data import fill

            seconds = fill(url, self.plan.report_rows, self.workdir)
            print(f"  ({backend}: {self.plan.report_rows:,} deliveries made in {seconds:.1f} s)")
            yield url

    def report(self, url: str) -> Sample:
        # One untimed run first (hyperfine's --warmup): the rows before this one (a
        # million-row import, sends) push the log's pages out of the page cache, and a
        # report on a database in use finds its indexes in memory. The first run's
        # time is printed and kept beside the timed ones. Then REPORT_RUNS timed runs,
        # of which the sample is the median: one run of ~0.4 s on a shared 2-core
        # machine is one draw of its noise (0.47-0.66 s in one run of this row).
        first = self.clara("report", CAMPAIGN, env=self.clara_env(url), timeout=600)
        sent = 880 * self.plan.report_rows // 1000  # what bench_report_data writes
        runs = []
        for _ in range(REPORT_RUNS):
            result = self.clara("report", CAMPAIGN, env=self.clara_env(url), timeout=600)
            if result.returncode != 0:
                raise BenchError(f"clara-mail report: {result.first_error_line()}")
            digits = re.sub(r"[,.\s\u00a0\u202f]", "", result.stdout)
            if str(sent) not in digits:
                raise BenchError(f"the report does not show the {sent} sent deliveries")
            runs.append(result)
        seconds = [r.seconds for r in runs]
        print(
            f"    (the untimed first run before them: {first.seconds:.3f} s; "
            f"timed: {', '.join(f'{t:.3f}' for t in seconds)} s)",
            flush=True,
        )
        detail = {"first_run_seconds": first.seconds, "runs_seconds": seconds}
        median = statistics.median(seconds)
        return Sample(median, max(r.rss_mb for r in runs), median, detail)

    # ---- row 9: DKIM

    def dkim(self) -> list[dict[str, Any]]:
        cmd = [sys.executable, str(HERE / "bench_dkim.py"), "--message", str(self.message)]
        cmd += ["--messages", str(self.plan.dkim_messages)]
        result = timed(cmd, cwd=self.workdir)
        if result.returncode != 0:
            raise BenchError(f"bench_dkim: {result.first_error_line()}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    # ---- the run

    def run(self) -> None:
        self.sink.start()
        try:
            self.prepare_message()
            repeated = self.groups - {"memory", "kill", "others"}
            for rep in range(1, self.plan.reps + 1 if repeated else 1):
                print(f"repetition {rep} of {self.plan.reps}", flush=True)
                self.one_repetition()
            self.report_logs.close()
            if "memory" in self.groups:
                with self.timing("memory"):
                    self.memory_rows()
            if "kill" in self.groups:
                with self.timing("kill"):
                    self.kill_rows()
            self.sink.stop()  # the others start their own servers
            if "others" in self.groups:
                with self.timing("others"):
                    self.other_benchmarks()
        finally:
            self.report_logs.close()
            self.sink.stop()
            self.dbs.drop_all()

    def one_repetition(self) -> None:
        n = self.plan.recipients
        if "startup" in self.groups:
            with self.timing("startup"):
                self.attempt(
                    self.row("startup", "0. clara-mail --version (interpreter + imports)", "s"),
                    self.startup,
                )
        if "source" in self.groups:
            with self.timing("source"):
                self.attempt(
                    self.row("source", "1. smtp-source, 4 conns, connection reuse (-d)", "msg/s"),
                    lambda: self.smtp_source(reuse=True),
                )
                self.attempt(
                    self.row(
                        "source-new",
                        "1b. smtp-source, 4 conns, new conn per msg",
                        "msg/s",
                        ratio=True,
                    ),
                    lambda: self.smtp_source(reuse=False),
                )
        if "clients" in self.groups:
            with self.timing("clients"):
                few = self.plan.client_messages
                for key, label, mode, conns, count in (
                    (
                        "smtplib",
                        f"2. smtplib, 1 conn, EmailMessage per rcpt ({few:,} msgs)",
                        "smtplib-emailmessage",
                        1,
                        few,
                    ),
                    (
                        "aio-msg",
                        f"3. aiosmtplib, 4 conns, EmailMessage per rcpt ({few:,} msgs)",
                        "aiosmtplib-emailmessage",
                        4,
                        few,
                    ),
                    (
                        "aio-bytes",
                        "4. aiosmtplib, 4 conns, bytes prepared",
                        "aiosmtplib-bytes",
                        4,
                        n,
                    ),
                ):
                    self.attempt(
                        self.row(key, label, "msg/s", ratio=True),
                        partial(self.client, mode, conns, count),
                    )
        if "send" in self.groups:
            with self.timing("send"):
                self.send_rows(n)
        if "dkim-send" in self.groups:
            with self.timing("dkim-send"):
                self.dkim_send_rows(n)
        # The report before the import: a million-row import leaves the machine busy for
        # a while after it (the database server writing it out), which once doubled the
        # SQLite report's time in the next row (0.37 s in one repetition, 0.96 s in the
        # other).
        if "report" in self.groups:
            with self.timing("report"):
                self.report_rows()
        if "import" in self.groups:
            with self.timing("import"):
                for backend in self.dbs.backends:
                    goal = IMPORT_GOAL_ROWS[backend]
                    row = self.row(
                        f"import-{backend}",
                        f"7. import {self.plan.import_rows:,}-row CSV, {backend}",
                        "rows/s",
                        goal=f">= {goal:,.0f} rows/s",
                        goal_kind="at-least",
                        goal_value=goal,
                    )
                    self.attempt(row, partial(self.import_rate, backend))
        if "dkim" in self.groups:
            with self.timing("dkim"):
                self.dkim_rows()

    def send_rows(self, n: int) -> None:
        # Issue 18's goal: every SQLite send; on PostgreSQL, the send with --processes 2
        # (its one-process rows are printed with their ratio, for reference).
        goal: dict[str, Any] = {
            "ratio": True,
            "goal": f">= {SEND_GOAL_RATIO}x smtp-source just before",
            "goal_kind": "ratio",
            "goal_value": SEND_GOAL_RATIO,
        }
        reference: dict[str, Any] = {
            "ratio": True,
            "goal": "(reference: the goal is --processes 2)",
        }
        for backend in self.dbs.backends:
            one_process = goal if backend == "sqlite" else reference
            for conc in self.plan.concurrencies:
                row = self.row(
                    f"send-{backend}-c{conc}",
                    f"5. clara-mail send, {backend}, --concurrency {conc}",
                    "msg/s",
                    **one_process,
                )
                self.attempt(row, partial(self.clara_send, backend, conc, n, paired=True))
            row = self.row(
                f"send-{backend}-c4-p2",
                f"5. clara-mail send, {backend}, --concurrency 4 --processes 2",
                "msg/s",
                **goal,
            )
            self.attempt(row, partial(self.clara_send, backend, 4, n, None, 2, paired=True))

    def dkim_send_rows(self, n: int) -> None:
        goal = {
            "ratio": True,
            "goal": f">= {DKIM_GOAL_RATIO}x smtp-source just before",
            "goal_kind": "ratio",
            "goal_value": DKIM_GOAL_RATIO,
        }
        row = self.row(
            "send-dkim", "9b. clara-mail send, sqlite, c4, DKIM signed (RSA)", "msg/s", **goal
        )
        rsa = {
            "CLARA_DKIM_DOMAIN": "clara.example",
            "CLARA_DKIM_SELECTOR": "bench",
            "CLARA_DKIM_KEY_FILE": str(self.dkim_key()),
        }
        # Signing (OpenSSL's RSA) costs well under 1 ms a message now: the full count.
        self.attempt(row, partial(self.signed_send, n, rsa, ("rsa-sha256",)))
        both = self.dual_signature_env()
        if both is not None:
            row = self.row(
                "send-dkim-ed25519",
                "9c. clara-mail send, sqlite, c4, DKIM RSA+Ed25519 signed",
                "msg/s",
                **goal,
            )
            algorithms = ("rsa-sha256", "ed25519-sha256")
            self.attempt(row, partial(self.signed_send, n, {**rsa, **both}, algorithms))

    def signed_send(self, n: int, dkim_env: dict[str, str], algorithms: tuple[str, ...]) -> Sample:
        """A signed send, once its signatures are seen: the first time, one message goes
        to the outbox with the same settings and its DKIM-Signature headers are read."""
        key = ",".join(algorithms)
        if key not in self.signatures_seen:
            with self.dbs.fresh("sqlite", "signed") as url:
                self.import_recipients(url, 10)
                env = self.clara_env(url, **dkim_env)
                del env["CLARA_SMTP_URL"]  # to the outbox
                env["CLARA_OUTBOX_DIR"] = str(self.workdir / f"outbox-{len(self.signatures_seen)}")
                result = self.clara("send", CAMPAIGN, "--yes", "--limit", "1", env=env)
                if result.returncode != 0:
                    raise BenchError(f"signed sample: {result.first_error_line()}")
                found = []
                for eml in Path(env["CLARA_OUTBOX_DIR"]).rglob("*.eml"):
                    head = eml.read_bytes().split(b"\r\n\r\n", 1)[0]
                    found += re.findall(rb"(?im)^DKIM-Signature:.*?\ba=([a-z0-9-]+)", head)
                    break
                shutil.rmtree(env["CLARA_OUTBOX_DIR"], ignore_errors=True)
            seen = sorted(a.decode() for a in found)
            if seen != sorted(algorithms):
                raise BenchError(f"signatures {seen or 'none'}, not {', '.join(algorithms)}")
            self.signatures_seen.add(key)
        return self.clara_send("sqlite", 4, n, dkim_env, paired=True)

    def report_rows(self) -> None:
        # The log is made once per backend (the first repetition) and kept until the
        # repetitions are over: the report only reads it.
        for backend in self.dbs.backends:
            row = self.row(
                f"report-{backend}",
                f"8. report over {self.plan.report_rows:,} deliveries, {backend}",
                "s",
                goal=f"< {REPORT_GOAL_SECONDS:g} s",
                goal_kind="below",
                goal_value=REPORT_GOAL_SECONDS,
            )
            if backend not in self.report_urls:
                try:
                    url = self.report_logs.enter_context(self.report_log(backend))
                except Exception as exc:  # the log itself failed: say so in the table
                    row.errors.append(f"making the log: {str(exc).splitlines()[0][:120]}")
                    continue
                self.report_urls[backend] = url
            self.attempt(row, partial(self.report, self.report_urls[backend]))

    def dkim_rows(self) -> None:
        try:
            results = self.dkim()
        except BenchError as exc:
            self.row("dkim", "9. DKIM signing", "ms/msg").errors.append(str(exc))
            return
        for item in results:
            row = self.row(f"dkim-{item['signer']}", f"9. DKIM sign, {item['signer']}", "ms/msg")
            if item["verified"]:
                row.samples.append(Sample(item["ms_per_message"]))
            else:
                row.errors.append("signature did not verify")

    def memory_rows(self) -> None:
        sizes = ", ".join(f"{count:,}" for count in self.plan.memory_sizes)
        print(f"peak memory of clara-mail send, {sizes} recipients", flush=True)
        for count in self.plan.memory_sizes:
            row = self.row(
                f"mem-{count}",
                f"6. clara-mail send peak RSS, {count:,} rcpts, sqlite, c4",
                "msg/s",
                goal=f"<= {MEMORY_GOAL_MB:g} MB, flat",
                goal_kind="rss-at-most",
                goal_value=MEMORY_GOAL_MB,
            )
            self.attempt(row, partial(self.clara_send, "sqlite", 4, count, tree=True))

    # ---- row 10: the `unknown` window after kill -9

    def kill_rows(self) -> None:
        """Kill `clara-mail send` (SIGKILL, its whole process group) at full speed, a few
        times, each on a fresh campaign, into a sink that keeps every message; then let a
        second `send` settle the dead worker's rows (its journal) and finish the campaign,
        and compare the delivery log with what the sink received."""
        n, conns = self.plan.kill_recipients, KILL_CONCURRENCY
        row = self.row(
            "kill",
            f"10. unknown rows after kill -9 at full speed, sqlite, c{conns}, {n:,} rcpts",
            "rows",
            goal=f"<= {conns} (connections) each kill",
            goal_kind="each-at-most",
            goal_value=conns,
        )
        size = self.message.stat().st_size if self.message.exists() else 40_000
        dump = dump_directory(self.workdir, 2 * n * (size + 2_000))
        with (self.workdir / "dumps").open("a") as fh:  # run.sh removes them if we die
            fh.write(f"{dump}\n")
        sink = Sink(self.args.port, self.workdir, self.workdir / "pids", dump_dir=dump)
        print(
            f"kill -9 of clara-mail send, {self.plan.kills} kills, {n:,} recipients each "
            f"(the sink keeps every message in {dump})",
            flush=True,
        )
        self.sink.stop()  # one sink on the port at a time (SO_REUSEPORT)
        try:
            sink.start()
            for number, fraction in enumerate(KILL_FRACTIONS[: self.plan.kills], 1):
                self.attempt(row, partial(self.kill_once, sink, number, fraction))
                if row.samples and row.samples[-1].detail.get("kill") == number:
                    problems = row.samples[-1].detail.get("problems")
                    if problems:
                        row.errors.append(f"kill {number}: {problems}")
        finally:
            sink.stop()
            shutil.rmtree(dump, ignore_errors=True)

    def kill_once(self, sink: Sink, number: int, fraction: float) -> Sample:
        n, conns = self.plan.kill_recipients, KILL_CONCURRENCY
        sink.clear_dump()
        options = ("--yes", "--concurrency", str(conns))
        with self.dbs.fresh("sqlite", f"kill{number}") as url:
            self.import_recipients(url, n)
            env = self.clara_env(url)
            before = sink.wait_settled()
            errors = self.workdir / f"kill{number}.stderr"
            with errors.open("wb") as err:
                sender = subprocess.Popen(
                    [*clara_command(), "send", CAMPAIGN, *options],
                    cwd=self.workdir,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,  # its own process group: kill it all
                )
            try:
                target, deadline = before + max(1, int(n * fraction)), time.monotonic() + 600
                while sink.received() < target:
                    if sender.poll() is not None:
                        said = errors.read_text("utf-8", "replace").strip().splitlines()
                        raise BenchError(
                            f"kill {number}: the send ended (status {sender.returncode}) "
                            f"before {fraction:.0%} of the messages had arrived: "
                            + (said[-1][:160] if said else "nothing on stderr")
                        )
                    if time.monotonic() > deadline:
                        raise BenchError(f"kill {number}: the send made no progress")
                    time.sleep(0.002)
            finally:
                with suppress(ProcessLookupError):
                    os.killpg(sender.pid, signal.SIGKILL)
                sender.wait()
            received_at_kill = sink.wait_settled() - before
            at_kill = status_counts(url)
            # The next send settles the dead worker's `sending` rows from its journal,
            # then sends the rest; `unknown` rows are never resent without --resend-unknown.
            rerun = self.clara("send", CAMPAIGN, *options, env=env)
            if rerun.returncode != 0:
                raise BenchError(f"kill {number}: the second send: {rerun.first_error_line()}")
            received_total = sink.wait_settled() - before
            statuses = delivery_statuses(url)
        received = sink.dumped_recipients()
        unknown = sorted(e for e, st in statuses.items() if st == "unknown")
        unknown_received = sum(1 for e in unknown if received[e])
        problems = []
        twice = sorted(e for e, times in received.items() if times > 1)
        if twice:
            problems.append(f"{len(twice)} received twice (e.g. {twice[0]})")
        strangers = sorted(set(received) - set(statuses))
        if strangers:
            problems.append(f"{len(strangers)} received but not in the log (e.g. {strangers[0]})")
        not_done = Counter(st for st in statuses.values() if st not in ("sent", "unknown"))
        if not_done:
            problems.append(f"left after the second send: {dict(not_done)}")
        lost = sorted(e for e, st in statuses.items() if st == "sent" and received[e] != 1)
        if lost:
            problems.append(f"{len(lost)} `sent` but not received once (e.g. {lost[0]})")
        if sum(received.values()) != received_total:
            problems.append(
                f"the sink counted {received_total} messages but kept {sum(received.values())}"
            )
        problem_text = "; ".join(problems)
        detail: dict[str, Any] = {
            "kill": number,
            "received_at_kill": received_at_kill,
            "sending_at_kill": at_kill.get("sending", 0),
            "sent_at_kill": at_kill.get("sent", 0),
            "unknown": len(unknown),
            "unknown_received": unknown_received,
            "connections": conns,
            "problems": problem_text,
        }
        verdict_text = "met" if len(unknown) <= conns else "MISSED"
        print(
            f"    kill {number} after {received_at_kill:,} of {n:,} received: "
            f"{detail['sending_at_kill']} rows `sending`, {len(unknown)} unknown "
            f"({unknown_received} of them received by the sink), {conns} connections: "
            f"{verdict_text}; after the second send: "
            + (problem_text or "every other recipient received exactly once"),
            flush=True,
        )
        return Sample(float(len(unknown)), None, None, detail)

    def other_benchmarks(self) -> None:
        """The benchmarks other engineers own (render, import, transport, report, web),
        run as they are and their figures printed as they print them."""
        mine = {"bench_clients.py", "bench_dkim.py", "bench_report_data.py"}
        for script in sorted(HERE.glob("bench_*.py")):
            if script.name in mine:
                continue
            cmd = [sys.executable, "-m", f"benchmarks.{script.stem}"]
            help_text = subprocess.run(
                [*cmd, "--help"], capture_output=True, text=True, cwd=REPO
            ).stdout
            if self.args.quick:  # a smoke run shrinks their inputs to ours
                sizes = {
                    "--recipients": self.plan.recipients,
                    "--messages": self.plan.recipients,
                    "--rows": self.plan.import_rows,
                    "--deliveries": self.plan.report_rows,
                    "--requests": 500,
                    "--repeat": 1,
                }
                for option, value in sizes.items():
                    if re.search(rf"{option}\b", help_text):
                        cmd += [option, str(value)]
            for option in ("--postgres-url", "--postgres"):
                if self.args.postgres and re.search(rf"{option}\b(?!-)", help_text):
                    cmd += [option, self.args.postgres]
                    break
            print(f"running {' '.join(cmd[1:])}", flush=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith("CLARA_")}
            started = time.perf_counter()
            try:
                result = timed(cmd, cwd=REPO, env=env, timeout=1800)
                output = result.stdout.strip() or result.first_error_line()
                if result.returncode != 0:
                    output += f"\n(exit status {result.returncode}: {result.first_error_line()})"
            except subprocess.TimeoutExpired:
                output = "(timed out after 30 minutes)"
            took = time.perf_counter() - started
            self.others.append((f"{script.name} ({took:.0f} s)", output))


# --- the table ------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("s", "ms/msg"):
        return f"{value:.3g}" if value < 10 else f"{value:,.1f}"
    return f"{value:,.0f}"


def verdict(row: Row, source: float | None) -> str:
    """met / MISSED against the row's goal; "" when it has none or nothing was measured."""
    median = row.median()
    if median is None or not row.goal_kind:
        return ""
    goal, met = row.goal_value, False
    if row.goal_kind == "ratio":
        paired = row.paired()
        if paired:
            met = statistics.median(paired) >= goal
        elif not source:
            return "no smtp-source figure"
        else:
            met = median / source >= goal
    elif row.goal_kind == "at-least":
        met = median >= goal
    elif row.goal_kind == "below":
        met = median < goal
    elif row.goal_kind == "rss-at-most":
        rss = row.rss()
        if rss is None:
            return ""
        met = rss <= goal
    elif row.goal_kind == "each-at-most":
        met = all(s.value <= goal for s in row.samples) and not row.errors
    return "met" if met else "MISSED"


def _row_number(label: str) -> tuple[int, str]:
    number, _, _ = label.partition(".")
    digits = "".join(c for c in number if c.isdigit())
    return (int(digits) if digits else 99, number)


def memory_summary(bench: Bench) -> str | None:
    """Peak RSS at every size: the goal is <= MEMORY_GOAL_MB at each, and flat."""
    measured = []
    for count in bench.plan.memory_sizes:
        row = bench.rows.get(f"mem-{count}")
        rss = row.rss() if row else None
        if rss is not None:
            measured.append((count, rss))
    if len(measured) < 2:
        return None
    smallest = measured[0][1]
    flat = all(rss <= smallest * 1.15 + 2 for _, rss in measured[1:])
    under = all(rss <= MEMORY_GOAL_MB for _, rss in measured)
    sizes = ", ".join(f"{rss:.0f} MB at {count:,}" for count, rss in measured)
    trees = [
        s.detail["tree_mb"]
        for count, _ in measured
        for s in bench.rows[f"mem-{count}"].samples
        if "tree_mb" in s.detail
    ]
    together = (
        f" With its child processes (the check's), summed at each moment: at most "
        f"{max(trees):.0f} MB."
        if trees
        else ""
    )
    return (
        f"Peak RSS of clara-mail send: {sizes} recipients: {'flat' if flat else 'GROWS'} "
        f"(within 15% + 2 MB of the smallest); goal <= {MEMORY_GOAL_MB:g} MB and flat: "
        f"{'met' if flat and under else 'MISSED'}.{together}"
    )


def kill_summary(bench: Bench) -> list[str]:
    row = bench.rows.get("kill")
    if row is None:
        return []
    lines = []
    for sample in row.samples:
        d = sample.detail
        conns = d["connections"]
        lines.append(
            f"- kill {d['kill']} after {d['received_at_kill']:,} messages received: "
            f"{d['sending_at_kill']} rows `sending` at the kill, **{d['unknown']} unknown** "
            f"({d['unknown_received']} of them received by the sink), {conns} connections: "
            f"{'met' if d['unknown'] <= conns else 'MISSED'}; after the second send: "
            + (d["problems"] or "every other recipient received exactly once, none twice")
        )
    if lines:
        lines.insert(0, "\nkill -9 at full speed, per kill (goal: unknown <= connections):")
    return lines


def render_table(bench: Bench) -> str:
    rows = sorted(bench.rows.values(), key=lambda r: _row_number(r.label))
    source_row = bench.rows.get("source")
    source = source_row.median() if source_row else None
    header = [
        "row",
        "figure: median [min-max]",
        "peak RSS MB",
        "x smtp-source",
        "x smtp-source just before: median [min-max]",
        "goal",
        "",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row.samples:
            values = [s.value for s in row.samples]
            figure = f"{fmt(row.median(), row.unit)} {row.unit}"
            if len(values) > 1:
                figure += f" [{fmt(min(values), row.unit)}-{fmt(max(values), row.unit)}]"
        else:
            figure = "not measured"
        if row.errors:
            figure += f" ({len(row.errors)} failed: {row.errors[-1]})"
        rss = row.rss()
        median = row.median()
        ratio = ""
        if (row.ratio or row.key == "source") and source and median is not None:
            ratio = f"{median / source:.2f}x"
        paired = row.paired()
        just_before = ""
        if paired:
            just_before = f"{statistics.median(paired):.2f}x"
            if len(paired) > 1:
                just_before += f" [{min(paired):.2f}-{max(paired):.2f}]"
        peak = "-" if rss is None else f"{rss:.0f}"
        cells = [row.label, figure, peak, ratio, just_before, row.goal, verdict(row, source)]
        lines.append("| " + " | ".join(cells) + " |")
    memory = memory_summary(bench)
    if memory:
        lines.append("\n" + memory)
    plain, signed = bench.rows.get("send-sqlite-c4"), bench.rows.get("send-dkim")
    if plain and signed and plain.median() and signed.median():
        p, d = plain.median(), signed.median()
        assert p is not None and d is not None
        cost = (1 / d - 1 / p) * 1000
        lines.append(
            "DKIM in the pipeline: "
            + (f"{cost:.2f} ms a message" if cost > 0 else "lost in the noise of this run")
            + f" ({p:,.0f} msg/s unsigned, {d:,.0f} signed, sqlite, c4)."
        )
    firsts = []
    for row in rows:
        runs = [
            s.detail["first_run_seconds"] for s in row.samples if "first_run_seconds" in s.detail
        ]
        if runs:
            backend = row.key.removeprefix("report-")
            firsts.append(f"{backend} {', '.join(f'{r:.3f}' for r in runs)} s")
    if firsts:
        lines.append(
            f"Report: in each repetition, {REPORT_RUNS} timed runs (their median is the "
            "sample) follow an untimed one (a warm-up); those first runs, after the rows "
            f"before them emptied the page cache: {'; '.join(firsts)}."
        )
    lines += kill_summary(bench)
    return "\n".join(lines)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(
            recipients=2000,
            reps=1,
            import_rows=50_000,
            report_rows=100_000,
            memory_sizes=(1000, 10_000),
            dkim_messages=50,
            client_messages=500,
            kill_recipients=3000,
        )
    else:
        plan = Plan(
            recipients=20_000,
            reps=3,
            import_rows=1_000_000,
            report_rows=1_000_000,
            memory_sizes=(10_000, 100_000, 1_000_000) if args.million else (10_000, 100_000),
            dkim_messages=300,
            client_messages=5000,
            kill_recipients=10_000,
        )
    if args.recipients:
        plan.recipients = args.recipients
    if args.reps:
        plan.reps = args.reps
    if args.kill_recipients:
        plan.kill_recipients = args.kill_recipients
    return plan


def parse_only(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown row group {', '.join(unknown) or '(none)'}: choose from {', '.join(GROUPS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small inputs, 1 rep")
    parser.add_argument(
        "--million", action="store_true", help="peak memory at 1,000,000 too (~11 min more)"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    parser.add_argument("--recipients", type=int, help="recipients per send (default 20,000)")
    parser.add_argument(
        "--kill-recipients",
        type=int,
        help="recipients of each kill -9 campaign (row 10; default 10,000, quick 3,000)",
    )
    parser.add_argument(
        "--only",
        type=parse_only,
        metavar="GROUPS",
        help="run only these rows, comma-separated: "
        + ", ".join(f"{name} ({what})" for name, what in GROUPS.items()),
    )
    parser.add_argument("--port", type=int, default=25999, help="smtp-sink port on 127.0.0.1")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("CLARA_BENCH_POSTGRES_URL")
        or os.environ.get("CLARA_TEST_POSTGRES_URL"),
        help="admin URL of a PostgreSQL server (default: $CLARA_BENCH_POSTGRES_URL, "
        "$CLARA_TEST_POSTGRES_URL); scratch databases are made and dropped there",
    )
    parser.add_argument("--workdir", type=Path, help="where inputs and results go")
    parser.add_argument(
        "--keep", action="store_true", help="keep the generated inputs beside the results"
    )
    args = parser.parse_args(argv)
    if args.only and NEEDS_SOURCE & set(args.only) and "source" not in args.only:
        args.only.append("source")  # the ratios and their goals need smtp-source's figure

    for tool in ("smtp-sink", "smtp-source", GNU_TIME):
        if shutil.which(tool) is None:
            print(
                f"error: {tool} not found: run benchmarks/run.sh, which installs it",
                file=sys.stderr,
            )
            return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="clara-bench."))
    workdir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (run.sh's trap, a CI timeout) unwinds like Ctrl-C: the sink is stopped
    # and the scratch databases dropped by the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    plan = make_plan(args)
    print(f"work directory: {workdir}")
    print(f"plan: {json.dumps(asdict(plan))}, postgres: {'yes' if args.postgres else 'no'}")
    if args.only:
        print(f"only: {', '.join(args.only)}")
    bench = Bench(args, plan, workdir)
    started = time.perf_counter()
    try:
        bench.run()
    except KeyboardInterrupt:
        print("interrupted")
        return 130
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = render_table(bench)
    elapsed = time.perf_counter() - started
    print()
    print(f"## clara-mail benchmark ({plan.reps} rep(s), {plan.recipients:,} recipients a send)")
    print(f"message: {bench.message.stat().st_size:,} bytes from {bench.message_source}")
    print(table)
    for name, output in bench.others:
        print(f"\n### {name}\n{output}")
    spent = ", ".join(f"{group} {seconds / 60:.1f}" for group, seconds in bench.seconds.items())
    print(
        f"\nwall time {elapsed / 60:.1f} min ({spent}); load average now {os.getloadavg()[0]:.2f}"
    )
    results = {
        "plan": asdict(plan),
        "message_source": bench.message_source,
        "only": args.only,
        "minutes": {group: round(seconds / 60, 2) for group, seconds in bench.seconds.items()},
        "rows": [asdict(r) for r in bench.rows.values()],
        "others": bench.others,
    }
    (workdir / "results.json").write_text(json.dumps(results, indent=2))
    (workdir / "table.md").write_text(table + "\n")
    print(f"results: {workdir / 'results.json'}, {workdir / 'table.md'}")
    if not args.keep:  # the inputs are large and cheap to make again; keep the results
        for pattern in ("*.db*", "*.csv", "smtp-sink*.out", "*.pem", "*.time"):
            for path in workdir.glob(pattern):
                path.unlink()
    failed = any(r.errors for r in bench.rows.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
