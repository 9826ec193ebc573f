"""Crash safety: a real `clara-mail send` process killed with SIGKILL, then resumed."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

from clara_mailer.core.settings import Settings
from clara_mailer.store.database import Database
from tests.send_helpers import add_recipients, check_received_once
from tests.send_helpers import start_sender as send_process
from tests.smtp_server import RecordingSMTPServer

CAMPAIGN = "newsletter-2022-01"
RECIPIENTS = 1000


def start_sender(
    settings: Settings, server: RecordingSMTPServer, cwd: Path, *, output: bool = False
) -> subprocess.Popen[bytes]:
    args = (CAMPAIGN, "--segment", "local-police", "--yes", "--concurrency", "4")
    return send_process(settings, server.url(), cwd, *args, output=output)


def test_sigkill_at_several_points_loses_nobody_and_sends_nobody_twice(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    add_recipients(db, RECIPIENTS)
    with RecordingSMTPServer() as server:
        for kill_after in (150, 400, 700):  # each mid-send, hundreds still queued
            sender = start_sender(settings, server, tmp_path)
            deadline = time.monotonic() + 120
            while len(server.messages) < kill_after and sender.poll() is None:
                assert time.monotonic() < deadline, "the sender made no progress"
                time.sleep(0.005)
            assert sender.poll() is None, f"finished before the kill at {kill_after}"
            sender.send_signal(signal.SIGKILL)
            sender.wait()
        final = start_sender(settings, server, tmp_path, output=True)
        out, err = final.communicate(timeout=300)
        assert final.returncode == 0, err.decode()
        received = Counter(r for m in server.messages for r in m.recipients)

    statuses = check_received_once(db, received, RECIPIENTS)
    # The worker journal leaves `unknown` only what had its end of DATA written and no
    # reply read: at most one message per connection (4) per kill. (Without it: every
    # row committed `sending`, about 40-50 per kill.)
    assert statuses["unknown"] <= 3 * (4 + 1)
    assert b"unknown" in out  # the summary names them and what to do
