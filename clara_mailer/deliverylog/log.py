"""The delivery log: the only writer of ``deliveries`` and of a campaign's progress
(its row in ``campaigns``: created, template hash, rate, started, finished).

::

    queued ──claim──> (queued, leased) ──mark_sending──> sending ──2xx──> sent
       ^                                                   │ 4xx / lost ─> deferred ─(due)─> claimable
       │                                                   │ 5xx ───────> failed
       │                                                   └ lease expired, outcome unknown ─> unknown
     plan: suppressed ──> skipped

A claim only leases rows (worker id + lease); a row becomes ``sending`` in a committed
transaction *before* its message is handed to the transport, so after a crash a
``sending`` row with an expired lease is "maybe sent" (-> ``unknown``), and a leased row
still ``queued`` or ``deferred`` was never touched: it is simply claimable again once the
lease expires. A dead worker of this host is narrowed down further by its journal
(``sending.journal``, passed in as ``WorkerJournals``): rows whose end of DATA never
reached the socket go back to the queue, rows whose reply was read get it, and only the
rest become ``unknown``. The sender (``sending``) calls this through ``DeliveryLog``;
bounces (``mark_bounced``) and erasure (``forget_addresses``) through the functions below.

Every statement is SQLAlchemy Core on the tables of ``store.tables``, run on a Core
connection (``Database.writing``): a send never loads the ORM (about 6 MB and 0.1 s of
imports). Bounces and erasure pass their ORM session instead, which runs the same
statements.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    DateTime,
    Integer,
    Row,
    Select,
    String,
    and_,
    any_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)

from clara_mailer.core.errors import SendError
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import OPEN_STATUSES, UNTOUCHED_STATUSES, Status
from clara_mailer.deliverylog.figures import add_to_segment, segment_status_counts
from clara_mailer.optouts.suppressions import (
    active_suppressions,
    any_active_suppression,
    stops,
    stops_sql,
)
from clara_mailer.store import tables
from clara_mailer.store.database import Database
from clara_mailer.store.driver import DriverStatement
from clara_mailer.store.tables import recipient_segments, utcnow

if TYPE_CHECKING:  # bounces and erasure pass their ORM session; nothing here loads the ORM
    from sqlalchemy.orm import Session

#: The tables' columns (Core: a send loads no ORM).
Delivery = tables.deliveries.c
Recipient = tables.recipients.c
Campaign = tables.campaigns.c
Segment = tables.segments.c

PLAN_CHUNK = 2000
#: First key of the PostgreSQL advisory lock that planners of one campaign share.
_PLAN_LOCK = 0x636C61
# States an outcome may overwrite (a row turned unknown by an expired lease included).
_WRITABLE = (Status.SENDING, Status.UNKNOWN, Status.QUEUED, Status.DEFERRED)


def new_worker_id() -> str:
    """host:pid:random — the pid lets a restarted sender on the same host tell a dead
    worker's leases from a live one's."""
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped: a container whose init does not reap) runs no
    # code any more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class WorkerJournals(Protocol):
    """What the sender's local journals tell about a dead worker of this host
    (``sending.journal.LocalJournals``)."""

    def read(
        self, worker_id: str, ids: Collection[int]
    ) -> dict[int, tuple[str, int, dt.datetime]] | None:
        """For those of ``ids`` whose end of DATA was written: (``sent``, ``failed`` or
        ``unknown``, SMTP code, when). Ids left out did not reach the server (or were
        refused with 4xx). None: no trustworthy journal."""
        ...

    def discard(self, worker_id: str) -> None: ...


class ClaimedRow(NamedTuple):
    """What the sender needs to render and send one message (a named tuple: a claim
    makes hundreds at once, on the database thread)."""

    id: int
    recipient_id: int | None
    email: str | None
    name: str
    organisation: str
    consent_source: str
    language: str
    segment: str
    status: str
    attempts: int
    first_attempt_at: dt.datetime | None


@dataclass(frozen=True)
class Record:
    """One result to write back: a final or deferred state for a row in ``sending``."""

    delivery_id: int
    status: str
    code: int | None
    reply: str
    at: dt.datetime
    next_attempt_at: dt.datetime | None = None
    counts_attempt: bool = True


@dataclass
class PlanCounts:
    added: int = 0
    skipped: int = 0
    #: segment -> (new rows queued, new rows skipped); filled by ``preview_plan``.
    per_segment: dict[str, tuple[int, int]] = field(default_factory=dict)


#: Marks one row ``sending`` unless a suppression stops its address (for executemany).
_MARK_SENDING = (
    update(tables.deliveries)
    .where(
        Delivery.id == bindparam("b_id"),
        ~stops(bindparam("b_hash", type_=String), bindparam("b_kind", type_=String)),
    )
    .values(
        status=Status.SENDING.value,
        message_id=bindparam("b_mid"),
        last_attempt_at=bindparam("b_now"),
    )
)

_RECORD = (
    update(tables.deliveries)
    .where(
        Delivery.id == bindparam("b_id"),
        # Plain comparisons: executemany cannot expand IN lists.
        or_(*(Delivery.status == st.value for st in _WRITABLE)),
    )
    .values(
        status=bindparam("b_status"),
        smtp_code=bindparam("b_code"),
        smtp_reply=bindparam("b_reply"),
        attempts=Delivery.attempts + bindparam("b_inc"),
        next_attempt_at=bindparam("b_next"),
        last_attempt_at=bindparam("b_at"),
        first_attempt_at=case(
            (bindparam("b_inc") == 1, func.coalesce(Delivery.first_attempt_at, bindparam("b_at"))),
            else_=Delivery.first_attempt_at,
        ),
        sent_at=func.coalesce(bindparam("b_sent", type_=DateTime), Delivery.sent_at),
        worker_id=None,
        lease_expires_at=None,
    )
)

#: ``_MARK_SENDING`` and ``_RECORD`` as one set-based UPDATE per batch: one statement
#: instead of one a row. PostgreSQL joins each row's values as parallel arrays
#: (``unnest``: about a third less server CPU per row); SQLite reads them from one JSON
#: array (``json_each``; SQLite 3.38 or later, else the per-row statements run): one
#: step of the statement where there were 64, so the database thread hands the GIL back
#: and forth with the event loop once a batch instead of once a row. The same SET and
#: WHERE, term for term; a test compares the stored values with the per-row statements'.
#: The marking statement also leaves out the rows whose address an active suppression
#: stops (the per-row path leaves those rows out of its batch: ``mark_sending``). ``id``
#: must not repeat in a batch (an UPDATE ... FROM changes a row once): a batch with a
#: repeated id runs the per-row statement instead.


def _mark_sending_set(rows: str, now: str, kind: str) -> str:
    """``rows``: the batch as ``v(id, mid, hash)``; ``now``, ``kind``: placeholders."""
    return (
        f"UPDATE deliveries AS d SET status = '{Status.SENDING.value}', message_id = v.mid, "
        f"last_attempt_at = {now} FROM {rows} "
        f"WHERE d.id = v.id AND NOT {stops_sql('v.hash', kind)}"
    )


def _record_set(rows: str) -> str:
    """``rows``: the batch as ``v(id, status, code, reply, inc, next, at, sent)``."""
    return (
        "UPDATE deliveries AS d SET status = v.status, smtp_code = v.code, "
        "smtp_reply = v.reply, attempts = d.attempts + v.inc, next_attempt_at = v.next, "
        "last_attempt_at = v.at, "
        "first_attempt_at = CASE WHEN v.inc = 1 THEN coalesce(d.first_attempt_at, v.at) "
        "ELSE d.first_attempt_at END, "
        "sent_at = coalesce(v.sent, d.sent_at), worker_id = NULL, lease_expires_at = NULL "
        f"FROM {rows} "
        "WHERE d.id = v.id AND d.status IN ({})".format(
            ", ".join(f"'{st.value}'" for st in _WRITABLE)
        )
    )


def _json_rows(*names: str) -> str:
    """SQLite: the JSON array bound as ``:b_rows`` (one array of values a row) as ``v``
    with these columns."""
    columns = ", ".join(f"value ->> {n} AS {name}" for n, name in enumerate(names))
    return f"(SELECT {columns} FROM json_each(:b_rows)) AS v"


#: PostgreSQL: ``_MARK_SENDING_SET`` returns the rows it marked.
_MARK_SENDING_SET = (
    _mark_sending_set(
        "unnest(%(b_id)s::integer[], %(b_mid)s::varchar[], %(b_hash)s::varchar[]) "
        "AS v(id, mid, hash)",
        "%(b_now)s",
        "%(b_kind)s",
    )
    + " RETURNING d.id"
)

_RECORD_SET = _record_set(
    "unnest(%(b_id)s::integer[], %(b_status)s::varchar[], %(b_code)s::integer[], "
    "%(b_reply)s::text[], %(b_inc)s::integer[], %(b_next)s::timestamp[], "
    "%(b_at)s::timestamp[], %(b_sent)s::timestamp[]) "
    "AS v(id, status, code, reply, inc, next, at, sent)"
)

_MARK_SENDING_JSON = _mark_sending_set(_json_rows("id", "mid", "hash"), ":b_now", ":b_kind")

_RECORD_JSON = _record_set(_json_rows("id", "status", "code", "reply", "inc", "next", "at", "sent"))

#: The oldest SQLite library with ``->>`` (3.38) and UPDATE ... FROM (3.33).
_SQLITE_SET_BASED = (3, 38, 0)


def _as_arrays(sets: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Parameter sets (name -> value) as one list per name, for ``unnest``; enum members
    as their plain values, as the per-row statements' bind processors write them."""
    return {
        name: [str(row[name]) if isinstance(row[name], Enum) else row[name] for row in sets]
        for name in sets[0]
    }


def _storable(reply: str) -> str:
    """A reply as the database can store it: at most 2,000 characters, and each byte
    that was not UTF-8 (which the transport keeps as a lone surrogate,
    ``surrogateescape``, and no driver can encode) as "?"."""
    reply = reply[:2000]
    return reply if reply.isascii() else reply.encode("utf-8", "replace").decode("utf-8")


def _json_outcomes(
    outcomes: Sequence[Record], stamp: Callable[[dt.datetime | None], str | None]
) -> str:
    """``_RECORD_JSON``'s rows: one array of values an outcome, its times as ``stamp``
    stores them (each converted once)."""
    rows = []
    for o in outcomes:
        at = stamp(o.at)
        sent = at if o.status == Status.SENT else None
        inc = 1 if o.counts_attempt else 0
        reply = _storable(o.reply)
        rows.append(
            (o.delivery_id, str(o.status), o.code, reply, inc, stamp(o.next_attempt_at), at, sent)
        )
    return json.dumps(rows)


def _unique(ids: Sequence[int]) -> bool:
    return len(set(ids)) == len(ids)


#: What a row settled from a dead worker's journal says.
_JOURNAL_REPLIES: dict[str, str] = {
    Status.SENT: "{code} (the sender stopped before recording the reply; from its journal)",
    Status.FAILED: "{code} (the sender stopped before recording the reply; from its journal)",
    Status.UNKNOWN: "outcome unknown: the sender stopped after the end of the message was "
    "sent and before a reply was read",
}

_SETTLE = (
    update(tables.deliveries)
    .where(
        Delivery.id == bindparam("b_id"),
        Delivery.worker_id == bindparam("b_worker"),
        Delivery.status == Status.SENDING.value,
    )
    .values(
        status=bindparam("b_status"),
        smtp_code=bindparam("b_code"),
        smtp_reply=bindparam("b_reply"),
        attempts=Delivery.attempts + 1,
        last_attempt_at=bindparam("b_at"),
        first_attempt_at=func.coalesce(Delivery.first_attempt_at, bindparam("b_at")),
        sent_at=func.coalesce(bindparam("b_sent", type_=DateTime), Delivery.sent_at),
        worker_id=None,
        lease_expires_at=None,
    )
)


class DeliveryLog:
    """The delivery rows of one campaign, seen by one worker."""

    def __init__(self, db: Database, campaign_id: int, worker_id: str | None = None) -> None:
        self.db = db
        self.campaign_id = campaign_id
        self.worker_id = worker_id or new_worker_id()
        self._pg = db.dialect == "postgresql"
        self._statements: dict[str, DriverStatement] = {}
        #: SQLite with set-based updates: how a datetime is stored (SQLAlchemy's own
        #: conversion, as the per-row statements write it); None: per row.
        self._stamp: Callable[[dt.datetime | None], str | None] | None = None
        dialect = db.engine.dialect
        version = getattr(dialect.dbapi, "sqlite_version_info", (0,))
        if db.dialect == "sqlite" and tuple(version) >= _SQLITE_SET_BASED:
            column_type = tables.deliveries.c.last_attempt_at.type
            self._stamp = column_type.dialect_impl(dialect).bind_processor(dialect)

    def _statement(self, name: str, statement: Any) -> DriverStatement:
        """One of the sender's per-row statements, compiled once (``store.driver``)."""
        found = self._statements.get(name)
        if found is None:
            found = self._statements[name] = DriverStatement(statement, self.db.engine.dialect)
        return found

    # -- plan ---------------------------------------------------------------------------

    def plan(
        self,
        segment_ids: Sequence[tuple[int, str]],
        signer: TokenSigner,
        kind: str,
        where: Sequence[ColumnElement[bool]] = (),
        committed: Callable[[], None] | None = None,
    ) -> PlanCounts:
        """Create a delivery row for every member of the segments that has none yet.

        Segments are taken in the order given, so a recipient in several segments is
        planned once, under the first. Suppressed addresses become ``skipped``. Runs in
        chunks, each its own transaction: planning is idempotent (ON CONFLICT DO NOTHING),
        so an interrupted plan is simply resumed, and several workers may plan at once.
        ``where``: conditions on ``Recipient`` every member must meet as well (the
        ``send --where`` filters, from ``plan.filters``). ``committed`` is called after
        each chunk that added rows is committed (other workers can claim them from then
        on).
        """
        counts = PlanCounts()
        insert: _PlannedInsert | None = None
        for segment_id, slug in segment_ids:
            after = 0
            while True:
                with self.db.writing() as conn:
                    if self._pg:  # planners of one campaign take turns (SQLite: the file lock)
                        conn.execute(
                            select(func.pg_advisory_xact_lock(_PLAN_LOCK, self.campaign_id))
                        )
                    members = self._unplanned(conn, segment_id, after, where)
                    if not members:
                        break
                    after = members[-1].id
                    # Checked in the transaction that inserts the rows: what was read here
                    # is exactly what is written, each member against the suppressions.
                    reasons = _suppressed(conn, members, signer, kind)
                    if insert is None:
                        insert = _PlannedInsert(conn)
                    insert.write(conn, self.campaign_id, slug, members, reasons, utcnow())
                    counts.skipped += len(reasons)
                    counts.added += len(members) - len(reasons)
                    # Every row is new: the members were read with the planners' lock
                    # held, so the segment's count grows by exactly this chunk.
                    add_to_segment(conn, self.campaign_id, slug, len(members))
                if committed is not None:
                    committed()
        return counts

    def _unplanned_members(
        self,
        columns: Sequence[Any],
        segment_id: int,
        where: Sequence[ColumnElement[bool]],
    ) -> Select[Any]:
        """``columns`` of the segment's members that have no delivery row in this
        campaign yet (and meet ``where``).

        Read from the segment's memberships (``ix_recipient_segments_segment``, in
        recipient order), each checked against this campaign's row of its recipient
        (``uq_deliveries_campaign_recipient``): a chunk reads its own members, not the
        whole registry and log. Driven from ``recipients`` with an outer join instead,
        PostgreSQL read every recipient and every delivery row of the campaign for each
        chunk (~35 ms a chunk of 2,000 at 20,000 recipients).

        The segment (and in ``_unplanned`` where a chunk starts) are written into the
        statement, not bound: psycopg prepares a statement run five times, and
        PostgreSQL's generic plan for it, made without the values, read the whole
        segment for every chunk (~1 s a chunk at 20,000 recipients, in the server's
        log)."""
        members = recipient_segments.c
        return (
            select(*columns)
            .select_from(recipient_segments)
            .join(tables.recipients, Recipient.id == members.recipient_id)
            .where(
                members.segment_id == literal(segment_id, Integer, literal_execute=True),
                ~exists().where(
                    Delivery.campaign_id == self.campaign_id,
                    Delivery.recipient_id == members.recipient_id,
                ),
                *where,
            )
        )

    def _unplanned(
        self,
        conn: Connection,
        segment_id: int,
        after: int,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> Sequence[Any]:
        """The next chunk of the segment's unplanned members (by id, after ``after``):
        plain rows of id, email and language, read through Core (the ORM's row handling
        cost more than the query)."""
        columns = (Recipient.id, Recipient.email, Recipient.language)
        member = recipient_segments.c.recipient_id
        return conn.execute(
            self._unplanned_members(columns, segment_id, where)
            .where(member > literal(after, Integer, literal_execute=True))
            .order_by(member)
            .limit(PLAN_CHUNK)
        ).all()

    def _unplanned_count(
        self,
        conn: Connection,
        segment_id: int,
        earlier: Sequence[int],
        where: Sequence[ColumnElement[bool]] = (),
    ) -> int:
        """How many of the segment's members are unplanned, leaving out those of the
        ``earlier`` segments: ``plan`` plans them under those."""
        query = self._unplanned_members((func.count(),), segment_id, where)
        if earlier:
            other = recipient_segments.alias("earlier")
            query = query.where(
                ~exists().where(
                    other.c.recipient_id == Recipient.id, other.c.segment_id.in_(earlier)
                )
            )
        return int(conn.scalar(query) or 0)

    def preview_plan(
        self,
        segment_ids: Sequence[tuple[int, str]],
        signer: TokenSigner,
        kind: str,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> PlanCounts:
        """What ``plan`` would add, per segment, without writing anything: the rows it
        would create as ``queued`` and as ``skipped`` (suppressed). Read-only, so a send
        that is declined at its prompt leaves no trace."""
        counts = PlanCounts()
        with self.db.reading() as conn:
            if not any_active_suppression(conn, kind):
                # Nobody can be skipped: each segment's count is one query.
                for i, (segment_id, slug) in enumerate(segment_ids):
                    earlier = [sid for sid, _ in segment_ids[:i]]
                    added = self._unplanned_count(conn, segment_id, earlier, where)
                    counts.per_segment[slug] = (added, 0)
                    counts.added += added
                return counts
        seen: set[int] = set()  # planned under an earlier segment
        for segment_id, slug in segment_ids:
            after = 0
            added = skipped = 0
            while True:
                with self.db.reading() as conn:
                    members = self._unplanned(conn, segment_id, after, where)
                    if not members:
                        break
                    after = members[-1].id
                    fresh = [m for m in members if m.id not in seen]
                    seen.update(m.id for m in fresh)
                    suppressed = len(_suppressed(conn, fresh, signer, kind))
                skipped += suppressed
                added += len(fresh) - suppressed
            counts.per_segment[slug] = (added, skipped)
            counts.added += added
            counts.skipped += skipped
        return counts

    def requeue_unknown(self) -> int:
        """``--resend-unknown``: put rows whose outcome is unknown back in the queue."""
        with self.db.writing() as conn:
            result = conn.execute(
                update(tables.deliveries)
                .where(Delivery.campaign_id == self.campaign_id, Delivery.status == Status.UNKNOWN)
                .values(status=Status.QUEUED, worker_id=None, lease_expires_at=None)
            )
            return result.rowcount or 0

    # -- leases -------------------------------------------------------------------------

    def expire_leases(self, journals: WorkerJournals | None = None) -> int:
        """Rows left ``sending`` by a worker whose lease expired (or whose process on this
        host is gone) become ``unknown``; its untouched claims become claimable again.

        With ``journals``, a dead local worker's ``sending`` rows are settled from its
        journal instead: a row whose end of DATA never reached the socket goes back to the
        queue, one whose reply was read gets that outcome, and only a row whose end of
        DATA was written without a reply read becomes ``unknown``. A worker without a
        trustworthy journal (another host, another user, an earlier boot) keeps the plain
        rule. Returns how many rows changed."""
        now = utcnow()
        settled: list[str] = []
        with self.db.writing() as conn:
            dead = [w for w in self._local_workers(conn) if not _pid_alive(int(w.split(":")[1]))]
            changed = 0
            if journals is not None:
                for worker in dead:
                    count = self._settle_from_journal(conn, worker, journals)
                    if count is not None:
                        settled.append(worker)
                        changed += count
            conditions = [Delivery.lease_expires_at < now]
            unjournaled = [w for w in dead if w not in settled]
            if unjournaled:
                conditions.append(Delivery.worker_id.in_(unjournaled))
            result = conn.execute(
                update(tables.deliveries)
                .where(
                    Delivery.campaign_id == self.campaign_id,
                    Delivery.status == Status.SENDING,
                    or_(*conditions),
                )
                .values(
                    status=Status.UNKNOWN,
                    worker_id=None,
                    lease_expires_at=None,
                    smtp_reply="outcome unknown: the sender stopped while this message was in flight",
                )
            )
            released = 0
            if dead:
                released = conn.execute(
                    update(tables.deliveries)
                    .where(
                        Delivery.campaign_id == self.campaign_id,
                        Delivery.worker_id.in_(dead),
                        Delivery.status.in_((Status.QUEUED, Status.DEFERRED)),
                    )
                    .values(worker_id=None, lease_expires_at=None)
                ).rowcount
            changed += (result.rowcount or 0) + (released or 0)
        if journals is not None:
            for worker in settled:
                journals.discard(worker)
        return changed

    def _settle_from_journal(
        self, conn: Connection, worker: str, journals: WorkerJournals
    ) -> int | None:
        """Settle a dead worker's ``sending`` rows from its journal; None without one."""
        ids = conn.scalars(
            select(Delivery.id).where(
                Delivery.campaign_id == self.campaign_id,
                Delivery.worker_id == worker,
                Delivery.status == Status.SENDING,
            )
        ).all()
        wire = journals.read(worker, ids)
        if wire is None:
            return None
        mine = and_(
            Delivery.campaign_id == self.campaign_id,
            Delivery.worker_id == worker,
            Delivery.status == Status.SENDING,
        )
        changed = 0
        outcomes = [
            {
                "b_id": i,
                "b_worker": worker,
                "b_status": st,
                "b_code": code or None,
                "b_reply": _JOURNAL_REPLIES[st].format(code=code),
                "b_at": at,
                "b_sent": at if st == Status.SENT else None,
            }
            for i, (st, code, at) in wire.items()
        ]
        if outcomes:
            changed += conn.execute(_SETTLE, outcomes).rowcount or 0
        back = [i for i in ids if i not in wire]
        for chunk in _chunks(back, 500):
            # Never on the wire: back where it was, a retry keeping its place as deferred.
            changed += (
                conn.execute(
                    update(tables.deliveries)
                    .where(mine, Delivery.id.in_(chunk))
                    .values(
                        status=case(
                            (Delivery.attempts > 0, Status.DEFERRED.value),
                            else_=Status.QUEUED.value,
                        ),
                        worker_id=None,
                        lease_expires_at=None,
                    )
                ).rowcount
                or 0
            )
        return changed

    def _local_workers(self, conn: Connection) -> list[str]:
        prefix = socket.gethostname()[:30] + ":"
        workers = conn.scalars(
            select(Delivery.worker_id)
            .where(
                Delivery.campaign_id == self.campaign_id,
                Delivery.worker_id.is_not(None),
                Delivery.worker_id != self.worker_id,
                Delivery.status.in_((Status.SENDING, Status.QUEUED, Status.DEFERRED)),
            )
            .distinct()
        ).all()
        return [w for w in workers if w and w.startswith(prefix) and w.count(":") == 2]

    def renew(self, lease_seconds: int) -> None:
        with self.db.writing() as conn:
            conn.execute(
                update(tables.deliveries)
                .where(
                    Delivery.campaign_id == self.campaign_id,
                    Delivery.worker_id == self.worker_id,
                    Delivery.status.in_((Status.QUEUED, Status.DEFERRED, Status.SENDING)),
                )
                .values(lease_expires_at=utcnow() + dt.timedelta(seconds=lease_seconds))
            )

    def release(self, ids: Iterable[int]) -> None:
        """Give back claimed rows this worker did not touch (Ctrl-C, --limit)."""
        id_list = list(ids)
        with self.db.writing() as conn:
            for chunk in _chunks(id_list, 500):
                conn.execute(
                    update(tables.deliveries)
                    .where(
                        Delivery.id.in_(chunk),
                        Delivery.worker_id == self.worker_id,
                        Delivery.status.in_((Status.QUEUED, Status.DEFERRED)),
                    )
                    .values(worker_id=None, lease_expires_at=None)
                )

    # -- claim --------------------------------------------------------------------------

    def claim_queries(self, now: dt.datetime, limit: int) -> list[Select[int]]:
        """The two index range scans a claim makes: deferred rows that are due first (a
        retry is older business than a newcomer, and ``--limit`` must not starve it), then
        queued rows."""
        free = or_(Delivery.lease_expires_at.is_(None), Delivery.lease_expires_at < now)
        queries = []
        for condition in (
            and_(Delivery.status == Status.DEFERRED, Delivery.next_attempt_at <= now),
            Delivery.status == Status.QUEUED,
        ):
            query = (
                select(Delivery.id)
                .where(Delivery.campaign_id == self.campaign_id, condition, free)
                .limit(limit)
            )
            if self._pg:
                query = query.with_for_update(skip_locked=True)
            queries.append(query)
        return queries

    def claim(self, limit: int, lease_seconds: int) -> list[ClaimedRow]:
        """Lease up to ``limit`` due rows to this worker (SKIP LOCKED on PostgreSQL)."""
        now = utcnow()
        lease = now + dt.timedelta(seconds=lease_seconds)
        with self.db.writing() as conn:
            ids: list[int] = []
            for query in self.claim_queries(now, limit):
                if len(ids) >= limit:
                    break
                ids.extend(conn.scalars(query.limit(limit - len(ids))).all())
            if not ids:
                return []
            # PostgreSQL: one array parameter, not an IN list of up to ``limit`` (a new
            # statement to parse and plan for every length).
            claimed = (
                Delivery.id == any_(cast(bindparam("b_ids", ids), ARRAY(Integer)))
                if self._pg
                else Delivery.id.in_(ids)
            )
            conn.execute(
                update(tables.deliveries)
                .where(claimed)
                .values(worker_id=self.worker_id, lease_expires_at=lease)
            )
            rows = conn.execute(
                select(
                    Delivery.id,
                    Delivery.recipient_id,
                    Recipient.email,
                    Recipient.name,
                    Recipient.organisation,
                    Recipient.consent_source,
                    Delivery.language,
                    Delivery.segment,
                    Delivery.status,
                    Delivery.attempts,
                    Delivery.first_attempt_at,
                )
                .outerjoin(tables.recipients, Recipient.id == Delivery.recipient_id)
                .where(claimed)
                .order_by(Delivery.id)
            ).all()
        order = {delivery_id: i for i, delivery_id in enumerate(ids)}
        rows = sorted(rows, key=lambda r: order[r[0]])  # due retries stay first
        # Positional, in the select's order: ~500 rows a claim, on the database thread.
        return [
            ClaimedRow(i, rid, email, name or "", org or "", source or "", lang, seg, st, n, first)
            for i, rid, email, name, org, source, lang, seg, st, n, first in rows
        ]

    def reserve_rate_window(self, count: int, rate: float) -> dt.datetime:
        """Campaign-wide rate limit shared by all workers: reserve a window for ``count``
        messages in the campaign row (locked) and return when this worker may start."""
        now = utcnow()
        with self.db.writing() as conn:
            query = select(Campaign.rate_cursor).where(Campaign.id == self.campaign_id)
            if self._pg:
                query = query.with_for_update()
            cursor: dt.datetime | None = conn.execute(query).scalar_one()
            start = max(now, cursor or now)
            conn.execute(
                update(tables.campaigns)
                .where(Campaign.id == self.campaign_id)
                .values(rate_cursor=start + dt.timedelta(seconds=count / rate))
            )
            return start

    # -- outcomes -----------------------------------------------------------------------

    def mark_sending(self, entries: Sequence[tuple[int, str, str]], kind: str) -> dict[str, str]:
        """Commit ``sending`` for rows about to be handed to the transport.

        ``entries`` are (delivery id, Message-ID, address hash). Opt-outs are checked again
        in the same transaction, just before the messages go out: rows whose address is
        suppressed by now are left alone and returned (hash -> reason).
        """
        if not entries:
            return {}
        now = utcnow()
        # Core, not an ORM session: this runs for every group of messages, and the
        # session's bookkeeping cost more than the statement.
        with self.db.engine.begin() as conn:
            ids = [i for i, _, _ in entries]
            # The statement marks the rows no suppression stops; only when it left some
            # out are their reasons looked up (an opt-out during the send).
            if self._pg and _unique(ids):  # one statement for the group
                values = {
                    "b_id": ids,
                    "b_mid": [m for _, m, _ in entries],
                    "b_hash": [h for _, _, h in entries],
                    "b_now": now,
                    "b_kind": kind,
                }
                marked = set(conn.exec_driver_sql(_MARK_SENDING_SET, values).scalars())
            else:
                if self._stamp is not None and _unique(ids):  # one statement for the group
                    rows = json.dumps(entries)
                    batch = {"b_rows": rows, "b_now": self._stamp(now), "b_kind": kind}
                    changed = conn.exec_driver_sql(_MARK_SENDING_JSON, batch).rowcount
                else:  # one per row, through the driver's executemany
                    params = [{"b_id": i, "b_mid": m, "b_hash": h} for i, m, h in entries]
                    shared = {"b_now": now, "b_kind": kind}
                    statement = self._statement("mark_sending", _MARK_SENDING)
                    changed = statement.execute(conn, params, shared)
                if changed == len(entries):
                    return {}
                marked = set(
                    conn.scalars(
                        select(Delivery.id).where(
                            Delivery.id.in_(ids), Delivery.status == Status.SENDING.value
                        )
                    )
                )
            left = [h for i, _, h in entries if i not in marked]
            return active_suppressions(conn, left, kind) if left else {}

    def record(self, outcomes: Sequence[Record]) -> None:
        """Write back a batch of results in one transaction."""
        if not outcomes:
            return
        unique = _unique([o.delivery_id for o in outcomes])
        if self._stamp is not None and unique:
            batch = {"b_rows": _json_outcomes(outcomes, self._stamp)}
            with self.db.engine.begin() as conn:
                conn.exec_driver_sql(_RECORD_JSON, batch)
            return
        params = [
            {
                "b_id": o.delivery_id,
                "b_status": o.status,
                "b_code": o.code,
                "b_reply": _storable(o.reply),
                "b_at": o.at,
                "b_next": o.next_attempt_at,
                "b_inc": 1 if o.counts_attempt else 0,
                "b_sent": o.at if o.status == Status.SENT else None,
            }
            for o in outcomes
        ]
        with self.db.engine.begin() as conn:
            if self._pg and unique:
                conn.exec_driver_sql(_RECORD_SET, _as_arrays(params))
            else:
                self._statement("record", _RECORD).execute(conn, params)

    # -- the campaign's progress ----------------------------------------------------------

    def mark_started(self) -> None:
        """The first send of the campaign began (kept from the first run on)."""
        with self.db.writing() as conn:
            conn.execute(
                update(tables.campaigns)
                .where(Campaign.id == self.campaign_id, Campaign.started_at.is_(None))
                .values(started_at=utcnow())
            )

    def finish_if_done(self) -> bool:
        """Mark the campaign finished when no row has work left; True if so."""
        with self.db.writing() as conn:
            left = conn.scalar(
                select(Delivery.id)
                .where(Delivery.campaign_id == self.campaign_id, Delivery.status.in_(OPEN_STATUSES))
                .limit(1)
            )
            if left is not None:
                return False
            conn.execute(
                update(tables.campaigns)
                .where(Campaign.id == self.campaign_id)
                .values(finished_at=utcnow())
            )
            return True

    # -- figures ------------------------------------------------------------------------

    def status_counts(self, segments: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
        """segment -> status -> count for this campaign."""
        with self.db.reading() as conn:
            counts = segment_status_counts(conn, self.campaign_id, segments)
        return {seg: {st.value: n for st, n in by.items()} for seg, by in counts.items()}

    def next_due(self) -> dt.datetime | None:
        with self.db.writing() as conn:
            due: dt.datetime | None = conn.scalar(
                select(func.min(Delivery.next_attempt_at)).where(
                    Delivery.campaign_id == self.campaign_id, Delivery.status == Status.DEFERRED
                )
            )
            return due


def _suppressed(
    conn: Connection, members: Sequence[Any], signer: TokenSigner, kind: str
) -> dict[int, str]:
    """recipient id -> reason, for those of ``members`` (rows with ``id`` and ``email``)
    whose address a suppression of ``kind`` stops. While no such suppression exists at
    all, one query says so and no address is hashed: nothing could match."""
    if not members or not any_active_suppression(conn, kind):
        return {}
    hashes = {m.id: signer.address_hash(m.email) for m in members}
    found = active_suppressions(conn, hashes.values(), kind)
    return {member: found[h] for member, h in hashes.items() if h in found}


#: The columns of a planned delivery row, as ``_PlannedInsert`` fills them.
_PLANNED_COLUMNS = (
    "campaign_id",
    "recipient_id",
    "email",
    "segment",
    "language",
    "status",
    "smtp_reply",
    "attempts",
    "created_at",
)


class _PlannedInsert:
    """The plan's INSERT ... ON CONFLICT DO NOTHING of a chunk of delivery rows, compiled
    once and run as the driver's executemany (``store.driver``): through
    ``Connection.execute`` SQLAlchemy's conversion of every row cost more than SQLite's
    own insert. What the whole chunk shares (campaign, segment, the time) is converted
    once; each row adds its own id, address, language and status."""

    def __init__(self, conn: Connection) -> None:
        statement = _dialect_insert(conn.dialect.name == "postgresql")(
            tables.deliveries
        ).on_conflict_do_nothing(index_elements=["campaign_id", "recipient_id"])
        self.statement = DriverStatement(statement, conn.dialect, _PLANNED_COLUMNS)
        #: PostgreSQL: the chunk as one INSERT ... SELECT FROM unnest (``_PLANNED_SET``).
        self.set_based = conn.dialect.name == "postgresql"

    def write(
        self,
        conn: Connection,
        campaign_id: int,
        segment: str,
        members: Sequence[Any],
        reasons: dict[int, str],
        now: dt.datetime,
    ) -> None:
        """Insert a row for each of ``members`` (rows of id, email, language), created
        ``now``: ``skipped`` with "suppressed: <reason>" for those in ``reasons``, else
        ``queued``."""
        rows = []
        for m in members:
            reason = reasons.get(m.id)
            rows.append(
                {
                    "recipient_id": m.id,
                    "email": m.email,
                    "language": m.language,
                    "status": Status.SKIPPED if reason else Status.QUEUED,
                    "smtp_reply": f"suppressed: {reason}" if reason else None,
                }
            )
        shared = {"campaign_id": campaign_id, "segment": segment, "attempts": 0, "created_at": now}
        if self.set_based and rows:
            conn.exec_driver_sql(_PLANNED_SET, {**_as_arrays(rows), **shared})
        else:
            self.statement.execute(conn, rows, shared)


#: PostgreSQL: ``_PlannedInsert``'s statement for a whole chunk at once, the rows' own
#: values as arrays in the members' order (the ids ascend with it, as row by row); a
#: member already planned is left alone, as by ON CONFLICT DO NOTHING row by row.
_PLANNED_SET = (
    "INSERT INTO deliveries (campaign_id, recipient_id, email, segment, language, status, "
    "smtp_reply, attempts, created_at) "
    "SELECT %(campaign_id)s, v.recipient_id, v.email, %(segment)s, v.language, v.status, "
    "v.smtp_reply, %(attempts)s, %(created_at)s "
    "FROM unnest(%(recipient_id)s::integer[], %(email)s::varchar[], %(language)s::varchar[], "
    "%(status)s::varchar[], %(smtp_reply)s::text[]) WITH ORDINALITY "
    "AS v(recipient_id, email, language, status, smtp_reply, n) "
    "ORDER BY v.n "
    "ON CONFLICT (campaign_id, recipient_id) DO NOTHING"
)


def segment_ids(conn: Connection | Session, slugs: Sequence[str]) -> list[tuple[int, str]]:
    found = dict(
        conn.execute(select(Segment.slug, Segment.id).where(Segment.slug.in_(slugs))).all()
    )
    return [(found[slug], slug) for slug in slugs if slug in found]


def campaign_id_of(db: Database, slug: str) -> int:
    """The id of the campaign's row, or 0 while nothing was planned for it."""
    with db.writing() as conn:
        return conn.scalar(select(Campaign.id).where(Campaign.slug == slug)) or 0


def open_campaign(
    db: Database,
    slug: str,
    kind: str,
    template_hash: str,
    *,
    rate: float | None = None,
    allow_changed_templates: bool = False,
) -> int:
    """Create (or find) the campaign's row and record the template hash and rate.

    A resume whose templates changed after a message went out is refused (SendError)
    unless ``allow_changed_templates``: recipients would get different mails."""
    with db.writing() as conn:
        campaign = _add_campaign_row(conn, slug, kind)
        changed = campaign.template_hash is not None and campaign.template_hash != template_hash
        if changed and not allow_changed_templates and _anything_went_out(conn, campaign.id):
            raise _templates_changed(slug)
        # Only what differs is written: an unchanged row is neither updated nor (on
        # PostgreSQL) locked until the commit.
        values: dict[str, Any] = {}
        if campaign.template_hash != template_hash:
            values["template_hash"] = template_hash
        if rate is not None and campaign.rate_limit != rate:
            values["rate_limit"] = rate
        if values:
            conn.execute(
                update(tables.campaigns).where(Campaign.id == campaign.id).values(**values)
            )
        campaign_id: int = campaign.id
        return campaign_id


def check_templates(
    db: Database, slug: str, template_hash: str, *, allow_changed_templates: bool = False
) -> None:
    """``open_campaign``'s refusal, read-only: raise SendError when a resume would send
    changed templates after a message went out. Writes nothing."""
    with db.writing() as conn:
        campaign = conn.execute(select(tables.campaigns).where(Campaign.slug == slug)).first()
        if campaign is None or allow_changed_templates:
            return
        changed = campaign.template_hash is not None and campaign.template_hash != template_hash
        if changed and _anything_went_out(conn, campaign.id):
            raise _templates_changed(slug)


def _templates_changed(slug: str) -> SendError:
    return SendError(
        f"the templates of {slug!r} changed since its first message went out; "
        "resume anyway with --allow-changed-templates"
    )


def _anything_went_out(conn: Connection, campaign_id: int) -> bool:
    first = conn.scalar(
        select(Delivery.id)
        .where(Delivery.campaign_id == campaign_id, Delivery.status.not_in(UNTOUCHED_STATUSES))
        .limit(1)
    )
    return first is not None


def mark_bounced(
    session: Connection | Session, delivery_id: int, *, smtp_code: int | None, smtp_reply: str
) -> None:
    """A bounce report says this delivery did not arrive after all: record why."""
    session.execute(
        update(tables.deliveries)
        .where(Delivery.id == delivery_id)
        .values(status=Status.BOUNCED, smtp_code=smtp_code, smtp_reply=smtp_reply)
    )


def forget_addresses(
    session: Connection | Session,
    addresses: Sequence[str],
    recipient_id: int | None,
    scrub: Callable[[str], str],
) -> tuple[list[int], int]:
    """Erasure (GDPR): blank the address and recipient of every delivery to it (the rows
    stay for the campaign figures) and pass stored SMTP replies through ``scrub``.
    Returns the ids of the rows touched and how many replies changed."""
    lowered = [a.lower() for a in addresses]
    where: ColumnElement[bool] = func.lower(Delivery.email).in_(lowered)
    if recipient_id is not None:
        where = or_(where, Delivery.recipient_id == recipient_id)
    ids, scrubbed = [], 0
    for row in session.execute(select(Delivery.id, Delivery.smtp_reply).where(where)).all():
        values: dict[str, Any] = {"email": None, "recipient_id": None}
        if row.smtp_reply:
            cleaned = scrub(row.smtp_reply)
            if cleaned != row.smtp_reply:
                values["smtp_reply"] = cleaned
                scrubbed += 1
        session.execute(update(tables.deliveries).where(Delivery.id == row.id).values(**values))
        ids.append(row.id)
    return ids, scrubbed


def _add_campaign_row(conn: Connection, slug: str, kind: str) -> Row[Any]:
    """The campaign's row (every column), inserted first when there is none."""
    query = select(tables.campaigns).where(Campaign.slug == slug)
    campaign = conn.execute(query).first()
    if campaign is None:
        insert_fn = _dialect_insert(conn.dialect.name == "postgresql")
        conn.execute(
            insert_fn(tables.campaigns)
            .values(slug=slug, kind=kind, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["slug"])
        )
        campaign = conn.execute(query).one()
    return campaign


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


__all__ = [
    "ClaimedRow",
    "DeliveryLog",
    "PlanCounts",
    "Record",
    "WorkerJournals",
    "campaign_id_of",
    "check_templates",
    "forget_addresses",
    "mark_bounced",
    "new_worker_id",
    "open_campaign",
]


def _dialect_insert(postgresql: bool) -> Any:
    """The dialect's INSERT (with ON CONFLICT): imported on use, so a send on SQLite does
    not load the PostgreSQL dialect (~20 ms and a few MB at start-up)."""
    if postgresql:
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert
