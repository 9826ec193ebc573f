"""Helper processes die with their parent (hardening issue, item 2).

`send --processes 2` killed with SIGKILL used to leave its helper running: it kept sending
on its own and ran beside the next `send`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from clara_mailer.core.settings import Settings
from clara_mailer.store.database import Database
from tests.send_helpers import add_recipients, check_received_once, start_sender
from tests.smtp_server import RecordingSMTPServer

CAMPAIGN = "newsletter-2022-01"
RECIPIENTS = 1500  # killed after 300: the rest still queued (asserted)

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")


def _alive(pid: int) -> bool:
    """Running (a zombie, killed but not yet reaped by init, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rpartition(b")")[2].split()[0] != b"Z"


def _helpers_of(pid: int) -> list[int]:
    """The multiprocessing helper processes (not the resource tracker) started by pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(b")")[2].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _wait_until(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_sigkill_of_send_processes_kills_its_helper_and_the_rerun_finishes_alone(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    add_recipients(db, RECIPIENTS)
    args = (CAMPAIGN, "--segment", "local-police", "--yes", "--concurrency", "2")
    helpers: list[int] = []
    with RecordingSMTPServer() as server:
        sender = start_sender(settings, server.url(), tmp_path, *args, "--processes", "2")
        try:
            assert _wait_until(lambda: len(_helpers_of(sender.pid)) == 1, 60), "no helper"
            helpers = _helpers_of(sender.pid)
            assert _wait_until(lambda: len(server.messages) >= 300, 120), "no progress"
            assert sender.poll() is None, "finished before the kill"
            sender.send_signal(signal.SIGKILL)
            sender.wait()
            # The helper is gone within a few seconds...
            assert _wait_until(lambda: not _alive(helpers[0]), 5), "the helper outlived send"
            # ...and nothing arrives any more.
            time.sleep(0.3)
            settled = len(server.messages)
            time.sleep(1.0)
            assert len(server.messages) == settled, "mail still arrives after the kill"
            assert settled < RECIPIENTS
        finally:
            for pid in helpers:  # never leave one behind, even when the test fails
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if sender.poll() is None:
                sender.kill()
            sender.communicate()
        # The rerun settles the dead helper's rows at once and sends the rest, alone.
        rerun = start_sender(settings, server.url(), tmp_path, *args, "--processes", "2")
        _, err = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, err.decode()
        received = Counter(r for m in server.messages for r in m.recipients)
    statuses = check_received_once(db, received, RECIPIENTS)
    # At most one message per connection of the two killed workers.
    assert statuses["unknown"] <= 2 * 2 + 1, statuses


_CHILD = """
import os, signal, sys, time
from clara_mailer.sending.processes import die_with_parent
die_with_parent(int(sys.argv[1]), pdeathsig=sys.argv[2] == "1")
print("ready", flush=True)
time.sleep(60)
"""

_PARENT = """
import subprocess, sys, time
import os
child = subprocess.Popen(
    [sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]], stdout=subprocess.PIPE
)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["prctl", "watchdog"])
def test_a_helper_dies_with_its_parent(pdeathsig: bool) -> None:
    """Both ways: PR_SET_PDEATHSIG (Linux) and the watchdog thread (elsewhere)."""
    if pdeathsig and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _CHILD, "1" if pdeathsig else "0"],
        stdout=subprocess.PIPE,
    )
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait_until(lambda: not _alive(child), 5), "the child outlived its parent"
    finally:
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        parent.communicate()


def test_a_helper_whose_parent_is_already_gone_stops_at_once() -> None:
    """The race: the parent dies before the helper asked to die with it."""
    code = (
        "from clara_mailer.sending.processes import die_with_parent\n"
        "die_with_parent(1)\n"  # 1 is not our parent: as if ours had died already
        "print('still here')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    assert b"still here" not in done.stdout
    assert done.returncode != 0
