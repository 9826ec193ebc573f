"""The worker journal: what a sender put on the wire, kept where a kill -9 cannot lose it.

A row is committed ``sending`` before its message is handed to a connection, so after a
crash the database alone cannot tell a message that was on the wire from one that was
still waiting in the queue, nor a message the server accepted from one whose reply was
still in memory. Each worker therefore keeps a small append-only file of its own
(fixed-size binary records, one ``os.write`` on an ``O_APPEND`` descriptor each):

- ``END_OF_DATA`` is appended immediately *before* the final ``.<CRLF>`` of DATA is
  written to the socket (the transport calls the worker back at that moment);
- a reply record (2xx, 4xx, 5xx and its code) once the reply to that end of DATA is
  read, before the outcome reaches the database in the next batch: it is written with
  the next end of DATA (one write for both), or by ``flush`` (the worker's recorder,
  every 50 ms, and ``close``). A connection reads its message's reply before it ends
  the next one, so a reply not yet written belongs to a connection's last ended message:
  still at most one message per connection without a reply on file.

When the worker's process is gone, the next sender on this host (``expire_leases``)
reads it: a ``sending`` row with no end-of-DATA record never reached the server and goes
back to the queue; one with a reply gets that outcome; only an end of DATA without a
reply becomes ``unknown`` — at most one message per connection.

Durability: no fsync. A killed process's writes are already in the kernel's page cache,
which outlives the process, so kill -9, OOM kills and crashes are covered. A power cut
or a kernel crash may lose the last records; that is why the file carries the boot id
and a journal from an earlier boot is not trusted (its worker's rows are all
``unknown``, as without a journal). Workers on other hosts (their journal is not
readable here) and any worker without a readable journal keep the plain rule: ``sending``
-> ``unknown`` after the lease.

The file lives in a per-user directory (mode 0700) under the system temp dir, named after
the worker id; it is rotated (rewritten with the records still needed) every
``ROTATE_RECORDS`` records, so it stays small, and removed when the worker finishes
cleanly. A record is obsolete as soon as the row's outcome is committed.

A worker that dies leaves its file; the sender that settles the dead worker's rows
removes it. One that left no row to settle (killed between batches, or whose rows were
settled by the lease rule) is swept by ``LocalJournals.sweep`` when the next worker of
this host starts: a dead worker's journal that can never be trusted (an earlier boot, a
torn header) at once; one naming the same database (the header carries a key of it)
once no row of that database is still ``sending`` for its worker. A live worker's is
never touched, nor one of another database, whose rows this sender cannot see.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import re
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.engine import make_url

from clara_mailer.core.vocabulary import Status
from clara_mailer.deliverylog.log import _pid_alive
from clara_mailer.store.database import Database
from clara_mailer.store.tables import deliveries

MAGIC = b"CLARAJ1\n"
#: delivery id, unix seconds, kind, SMTP code
_RECORD = struct.Struct("<qIBxH")
END_OF_DATA, SENT, FAILED, DEFERRED = 0, 1, 2, 3
ROTATE_RECORDS = 65536
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_KINDS: dict[str, int] = {Status.SENT: SENT, Status.FAILED: FAILED, Status.DEFERRED: DEFERRED}


def journal_dir() -> Path | None:
    """This user's journal directory, created if need be; None when it is not safe to use
    (not ours, a symlink, writable by others) or cannot be created."""
    uid = getattr(os, "getuid", None)
    base = Path(tempfile.gettempdir()) / (f"clara-mail-{uid()}" if uid else "clara-mail")
    path = base / "journal"
    try:
        for directory in (base, path):
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700)
            info = os.lstat(directory)
            if not stat.S_ISDIR(info.st_mode):
                return None
            if uid is not None and (info.st_uid != uid() or info.st_mode & 0o077):
                return None
    except OSError:
        return None
    return path


def journal_path(directory: Path, worker_id: str) -> Path:
    return directory / (_SAFE.sub("_", worker_id) + ".journal")


def boot_marker() -> str:
    """Changes at every boot: Linux's boot id, elsewhere the time of the boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"t{int(time.time() - time.monotonic())}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not): the delivery log's
    test of a worker's liveness, shared by the journal sweep and scheduled sends."""
    return _pid_alive(pid)


def same_boot(written: str, now: str) -> bool:
    """Whether two ``boot_marker()`` values name the same boot of this machine."""
    return _same_boot(written, now)


def database_key(db: Database) -> str:
    """A short key of the database a worker writes to (an SQLite file by its real path),
    kept in its journal's header so that a sweep only judges its own database's."""
    url = make_url(db.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        text = "sqlite:" + os.path.realpath(str(url.database))
    else:
        text = url.set(password=None).render_as_string(hide_password=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _same_boot(written: str, now: str) -> bool:
    if written.startswith("t") and now.startswith("t"):
        # Computed from two clocks: allow for the jitter; a reboot moves it by far more.
        with contextlib.suppress(ValueError):
            return abs(int(written[1:]) - int(now[1:])) <= 2
        return False
    return written == now


def _header(worker_id: str, database: str = "") -> bytes:
    text = f"{worker_id}\n{boot_marker()}" + (f"\n{database}" if database else "")
    data = text.encode()
    return MAGIC + struct.pack("<H", len(data)) + data


def _read_header(f: BinaryIO) -> tuple[str, str, str] | None:
    """(worker id, boot marker, database key or "") of an open journal; None when torn."""
    head = f.read(len(MAGIC) + 2)
    if len(head) != len(MAGIC) + 2 or not head.startswith(MAGIC):
        return None
    (length,) = struct.unpack("<H", head[len(MAGIC) :])
    text = f.read(length)
    if len(text) != length:
        return None
    worker_id, _, rest = text.decode("utf-8", "replace").partition("\n")
    boot, _, database = rest.partition("\n")
    return worker_id, boot, database


class WorkerJournal:
    """The writing side, owned by one worker; every call comes from its event loop."""

    def __init__(self, path: Path, fd: int, header: bytes) -> None:
        self.path = path
        self._fd: int | None = fd
        self._header = header
        #: delivery id -> its latest record, until its outcome is committed
        self._open: dict[int, bytes] = {}
        self._written = 0
        #: Reply records not written yet (``reply``): the next write carries them.
        self._replies = bytearray()

    @classmethod
    def create(
        cls, worker_id: str, directory: Path | None = None, *, db: Database | None = None
    ) -> WorkerJournal | None:
        """A new journal for ``worker_id``, or None when none can be kept (the worker then
        sends as before: its rows in flight at a crash all become ``unknown``). With
        ``db`` (the database the worker writes to), the header names it, and the dead
        workers' journals no longer needed are swept first (``LocalJournals.sweep``)."""
        directory = directory or journal_dir()
        if directory is None:
            return None
        with contextlib.suppress(Exception):  # housekeeping: never in the way of a send
            LocalJournals(directory).sweep(db)
        path = journal_path(directory, worker_id)
        header = _header(worker_id, database_key(db) if db is not None else "")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError:
            return None
        try:
            if os.write(fd, header) != len(header):
                raise OSError("short write")
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return cls(path, fd, header)

    @property
    def active(self) -> bool:
        return self._fd is not None

    def end_of_data(self, delivery_id: int) -> None:
        """The final ``.<CRLF>`` of this delivery is about to be written. Raises OSError
        only when the record cannot be kept *and* the journal cannot be dropped: the
        message must then not go out."""
        if self._fd is None:
            return
        record = _RECORD.pack(delivery_id, int(time.time()), END_OF_DATA, 0)
        data = bytes(self._replies) + record if self._replies else record
        try:
            if os.write(self._fd, data) != len(data):
                raise OSError("short write")
        except OSError:
            # Without this record a crash would put a message that may be delivered back
            # in the queue: drop the whole journal, so a crash falls back to `unknown`.
            self._drop()
            return
        self._replies.clear()
        self._open[delivery_id] = record
        self._written += 1

    def reply(self, delivery_id: int, outcome: str, code: int) -> None:
        """The reply to this delivery's end of DATA, written with the next end of DATA
        or by ``flush`` (best effort: without it, a crash leaves the row ``unknown``,
        which is safe)."""
        if self._fd is None or delivery_id not in self._open:
            return
        kind = _KINDS.get(outcome)
        if kind is None:
            return
        record = _RECORD.pack(delivery_id, int(time.time()), kind, max(0, min(code, 65535)))
        self._replies += record
        self._open[delivery_id] = record
        self._written += 1

    def flush(self) -> None:
        """Write the reply records ``reply`` holds (best effort, as ``reply``)."""
        if self._fd is None or not self._replies:
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, self._replies)
        self._replies.clear()

    def committed(self, delivery_ids: Collection[int]) -> None:
        """These rows' outcomes are in the database: their records are obsolete."""
        for delivery_id in delivery_ids:
            self._open.pop(delivery_id, None)
        if self._fd is not None and self._written >= ROTATE_RECORDS:
            self._rotate()

    def _rotate(self) -> None:
        """Rewrite the file with the records still needed, then swap it in (rename is
        atomic: a crash finds either the old file or the new one, each complete)."""
        assert self._fd is not None
        temporary = self.path.with_name(self.path.name + ".new")
        with contextlib.suppress(OSError):
            temporary.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(temporary, flags, 0o600)
        except OSError:
            return
        try:
            data = self._header + b"".join(self._open.values())
            if os.write(fd, data) != len(data):
                raise OSError("short write")
            os.replace(temporary, self.path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                temporary.unlink()
            return
        os.close(self._fd)
        self._fd = fd
        self._written = len(self._open)
        self._replies.clear()  # in ``_open``, so in the new file

    def _drop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        # Any other error propagates: the caller must not write the end of DATA.
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self._open.clear()
        self._replies.clear()

    def close(self, *, remove: bool) -> None:
        """Close; ``remove`` once every outcome is committed (a clean finish)."""
        if self._fd is not None:
            if not remove:
                self.flush()
            os.close(self._fd)
            self._fd = None
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()


class LocalJournals:
    """The reading side, for ``DeliveryLog.expire_leases``: the journals of dead workers
    of this host, for this user."""

    def __init__(self, directory: Path | None = None) -> None:
        self._directory = directory

    def _path(self, worker_id: str) -> Path | None:
        directory = self._directory or journal_dir()
        return journal_path(directory, worker_id) if directory is not None else None

    def read(
        self, worker_id: str, ids: Collection[int]
    ) -> dict[int, tuple[str, int, dt.datetime]] | None:
        """For those of ``ids`` whose end of DATA was written: (status, code, when), where
        status is ``sent`` or ``failed`` (the server's reply was read), or ``unknown`` (no
        reply read). Ids left out never completed DATA, or got a 4xx: nothing was
        delivered. None when there is no trustworthy journal of that worker."""
        path = self._path(worker_id)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                header = _read_header(f)
                if header is None:
                    return None
                written_id, boot, _ = header
                if written_id != worker_id or not _same_boot(boot, boot_marker()):
                    return None
                wanted = set(ids)
                latest: dict[int, tuple[int, int, int]] = {}
                size = _RECORD.size
                while chunk := f.read(size * 4096):
                    whole = len(chunk) - len(chunk) % size  # a torn tail: a power cut
                    for delivery_id, at, kind, code in _RECORD.iter_unpack(chunk[:whole]):
                        if delivery_id in wanted:
                            latest[delivery_id] = (kind, code, at)
        except OSError:
            return None
        out: dict[int, tuple[str, int, dt.datetime]] = {}
        for delivery_id, (kind, code, at) in latest.items():
            when = dt.datetime.fromtimestamp(at, dt.UTC).replace(tzinfo=None)
            if kind == END_OF_DATA:
                out[delivery_id] = (Status.UNKNOWN, 0, when)
            elif kind == SENT:
                out[delivery_id] = (Status.SENT, code, when)
            elif kind == FAILED:
                out[delivery_id] = (Status.FAILED, code, when)
            # DEFERRED: refused with 4xx, not delivered: back to the queue.
        return out

    def discard(self, worker_id: str) -> None:
        """The dead worker's rows are settled: its journal is of no further use."""
        path = self._path(worker_id)
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    def sweep(self, db: Database | None = None) -> list[Path]:
        """Remove the journals of this host's dead workers that no sender will need; the
        paths removed. Never a live worker's (its process runs: ``pid_alive``, the test
        the delivery log uses). A dead worker's goes when it can never be trusted (an
        earlier boot, a torn header: ``read`` refuses it) or is a rotation's leftover;
        with ``db``, also one written for that database once none of its rows there is
        still ``sending`` for that worker (all settled, or it never sent). Journals of
        other databases, or that name none, stay: their rows cannot be seen from here."""
        directory = self._directory or journal_dir()
        if directory is None:
            return []
        host = socket.gethostname()[:30]
        key = database_key(db) if db is not None else None
        now = boot_marker()
        removed: list[Path] = []
        candidates: dict[str, list[Path]] = {}
        for path in directory.iterdir():
            if not path.name.endswith((".journal", ".journal.new")):
                continue
            try:
                with open(path, "rb") as f:
                    header = _read_header(f)
            except OSError:
                continue
            # The name is the worker id made safe: host_pid_random.
            name = path.name.partition(".journal")[0]
            named_host, _, pid = name.rpartition("_")[0].rpartition("_")
            if named_host != _SAFE.sub("_", host) or not pid.isdigit():
                continue  # not a worker of this host (or not a name we gave)
            if header is not None and not _same_boot(header[1], now):
                removed += _unlink(path)  # written before a reboot: never trusted
                continue
            if pid_alive(int(pid)):
                continue  # running: it may still append
            if header is None or _SAFE.sub("_", header[0]) != name or path.name.endswith(".new"):
                removed += _unlink(path)  # never to be read, or superseded by the journal
            elif key is not None and header[2] == key:
                candidates.setdefault(header[0], []).append(path)
        if candidates and db is not None:
            with db.writing() as conn:
                needed = set(
                    conn.scalars(
                        select(deliveries.c.worker_id)
                        .where(
                            deliveries.c.status == Status.SENDING,
                            deliveries.c.worker_id.in_(list(candidates)),
                        )
                        .distinct()
                    )
                )
            for worker, paths in candidates.items():
                if worker not in needed:
                    for path in paths:
                        removed += _unlink(path)
        return removed


def _unlink(path: Path) -> list[Path]:
    try:
        path.unlink()
    except OSError:
        return []
    return [path]


#: The journals of this host's workers in the default place.
LOCAL_JOURNALS = LocalJournals()

__all__ = [
    "LOCAL_JOURNALS",
    "LocalJournals",
    "WorkerJournal",
    "boot_marker",
    "database_key",
    "journal_dir",
    "pid_alive",
    "same_boot",
]
