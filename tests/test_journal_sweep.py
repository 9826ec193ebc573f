"""Worker journals of dead workers that no sender will read are swept when the next worker
starts (``LocalJournals.sweep``, run by ``WorkerJournal.create``): never a live worker's,
never one whose rows are still ``sending``, never one of another database."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from clara_mailer.core.settings import Settings
from clara_mailer.deliverylog.log import DeliveryLog, new_worker_id
from clara_mailer.sending import journal as journal_module
from clara_mailer.sending.journal import LocalJournals, WorkerJournal, journal_path
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery
from tests.send_helpers import add_recipients, start_sender
from tests.smtp_server import Faults, RecordingSMTPServer

CAMPAIGN = "newsletter-2022-01"
pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")

#: A worker process of its own: keeps a journal (for the database at argv[1], if any) in
#: the folder argv[2], then waits.
_WORKER = """
import os, socket, sys, time
from pathlib import Path
from clara_mailer.sending.journal import WorkerJournal
from clara_mailer.store.database import Database
url, folder = sys.argv[1], Path(sys.argv[2])
worker = f"{socket.gethostname()[:30]}:{os.getpid()}:c0ffee00"
journal = WorkerJournal.create(worker, folder, db=Database(url) if url else None)
assert journal is not None
print(worker, flush=True)
time.sleep(120)
"""


class Workers:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, url: str = "") -> tuple[str, subprocess.Popen[str]]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, str(self.folder)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        worker = proc.stdout.readline().strip()
        assert worker, "the worker process did not start"
        return worker, proc

    def kill(self, proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def path(self, worker: str) -> Path:
        return journal_path(self.folder, worker)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    folder = tmp_path / "journal"
    folder.mkdir(mode=0o700)
    found = Workers(folder)
    yield found
    for proc in found.procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _plan(db: Database, settings: Settings, count: int) -> int:
    from clara_mailer.mailer import Mailer
    from clara_mailer.plan.plan import SendOptions

    add_recipients(db, count)
    plan = Mailer(settings, database=db).plan(CAMPAIGN, SendOptions(segments=("local-police",)))
    return plan.campaign_id


def _next_worker_starts(folder: Path, db: Database) -> None:
    """What a sender does as it starts: its own journal (the sweep runs first)."""
    journal = WorkerJournal.create(new_worker_id(), folder, db=db)
    assert journal is not None
    journal.close(remove=True)


def test_dead_workers_journals_go_once_nothing_needs_them(
    db: Database, settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    campaign_id = _plan(db, settings, 3)
    # Each worker sweeps as it starts: all start first, then some die.
    a, a_proc = workers.start(db.url)
    b, b_proc = workers.start(db.url)
    c, _ = workers.start(db.url)
    d, d_proc = workers.start(f"sqlite:///{tmp_path / 'other.db'}")
    e, e_proc = workers.start("")
    # A: killed with a row `sending` whose end of DATA it wrote: its journal is needed.
    log = DeliveryLog(db, campaign_id, a)
    rows = [r.id for r in log.claim(1, 600)]
    log.mark_sending([(rows[0], "<a@x>", "ha")], "newsletter")
    workers.kill(a_proc)
    # B: killed, no row left (it never got to send, or all its outcomes were committed).
    workers.kill(b_proc)
    # C: alive and idle, no row: it may start sending any moment.
    # D: dead, of another database (its rows cannot be seen from here).
    workers.kill(d_proc)
    # E: dead, its journal names no database (written by an older clara-mail).
    workers.kill(e_proc)
    for worker in (a, b, c, d, e):
        assert workers.path(worker).exists(), worker

    _next_worker_starts(workers.folder, db)
    left = {w for w in (a, b, c, d, e) if workers.path(w).exists()}
    assert left == {a, c, d, e}  # only B's went

    # A's row is settled by the plain rule (as a sender without the journal does): the
    # journal has nothing left to tell, and goes at the next start.
    DeliveryLog(db, campaign_id).expire_leases()
    with db.session() as s:
        assert s.scalar(select(Delivery.status).where(Delivery.id == rows[0])) == "unknown"
    assert workers.path(a).exists()
    _next_worker_starts(workers.folder, db)
    assert {w for w in (a, c, d, e) if workers.path(w).exists()} == {c, d, e}


def test_a_journal_still_needed_is_read_before_it_goes(
    db: Database, settings: Settings, workers: Workers
) -> None:
    """The sweep at start never takes the journal the recovery that follows reads."""
    campaign_id = _plan(db, settings, 2)
    worker, proc = workers.start(db.url)
    log = DeliveryLog(db, campaign_id, worker)
    rows = [r.id for r in log.claim(2, 600)]
    log.mark_sending([(i, f"<{i}@x>", f"h{i}") for i in rows], "newsletter")
    workers.kill(proc)  # no end of DATA written: neither row reached the server
    _next_worker_starts(workers.folder, db)
    assert workers.path(worker).exists()
    DeliveryLog(db, campaign_id).expire_leases(LocalJournals(workers.folder))
    with db.session() as s:
        statuses = s.scalars(select(Delivery.status).where(Delivery.id.in_(rows))).all()
    assert statuses == ["queued", "queued"]  # from the journal: not `unknown`
    assert not workers.path(worker).exists()  # settled, then discarded


def test_untrustworthy_journals_of_dead_workers_go_even_without_a_database(
    workers: Workers,
) -> None:
    host = socket.gethostname()[:30]
    live, _ = workers.start()  # (it sweeps as it starts: before the others are written)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # Torn: the worker died between creating the file and writing its header.
    torn_dead = workers.folder / f"{host}_{gone.pid}_0badf00d.journal"
    torn_dead.write_bytes(b"CLARA")
    torn_live = workers.folder / f"{host}_{os.getpid()}_0badf00d.journal"  # this process
    torn_live.write_bytes(b"")
    # Written before a reboot: never trusted, whatever its pid is now.
    earlier = journal_path(workers.folder, f"{host}:{os.getpid()}:e0e0e0e0")
    text = f"{host}:{os.getpid()}:e0e0e0e0\nan-earlier-boot".encode()
    earlier.write_bytes(journal_module.MAGIC + struct.pack("<H", len(text)) + text)
    removed = set(LocalJournals(workers.folder).sweep())
    assert removed == {torn_dead, earlier}
    assert torn_live.exists() and workers.path(live).exists()


def _journals(temp: Path) -> list[Path]:
    return sorted(p for d in temp.glob("clara-mail*/journal") for p in d.iterdir())


def test_a_killed_send_that_left_no_rows_leaves_no_journal_after_the_next_send(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """End to end: `clara-mail send` killed while it waits for its in-run retries (every
    outcome committed, no row left to it); the next `send` sweeps its journal."""
    add_recipients(db, 3)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"TMPDIR": str(temp), "CLARA_RETRY_IN_RUN": "4"}
    args = (CAMPAIGN, "--segment", "local-police", "--yes")
    with RecordingSMTPServer(faults=Faults(greylist=True)) as server:
        first = start_sender(settings, server.url(), tmp_path, *args, env=env, output=False)
        try:
            deadline = time.monotonic() + 60
            while True:  # all three greylisted and recorded `deferred`: it now waits
                with db.session() as s:
                    rows = s.execute(select(Delivery.status, Delivery.worker_id)).all()
                if len(rows) == 3 and all(st == "deferred" and not w for st, w in rows):
                    break
                assert first.poll() is None and time.monotonic() < deadline, rows
                time.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            first.wait()
        finally:
            if first.poll() is None:
                first.kill()
        (left,) = _journals(temp)
        rerun = start_sender(settings, server.url(), tmp_path, *args, env=env)
        _, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err.decode()
        assert len(server.messages) == 3
    assert not left.exists()
    assert _journals(temp) == []
