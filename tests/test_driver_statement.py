"""``store.driver.DriverStatement``: the sender's per-row statements, compiled once and
run through the driver's executemany, must write exactly what SQLAlchemy's own
``Connection.execute`` writes, value for value, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from typing import Any

import pytest
from sqlalchemy import bindparam, select, update

from clara_mailer.core.vocabulary import OptOutReason, OptOutScope, Status
from clara_mailer.deliverylog import log
from clara_mailer.deliverylog.log import DeliveryLog, open_campaign, segment_ids
from clara_mailer.optouts.suppressions import lift_hash, suppress_hash
from clara_mailer.store import tables
from clara_mailer.store.database import Database
from clara_mailer.store.driver import DriverStatement
from clara_mailer.store.models import Delivery
from tests.send_helpers import add_recipients

#: Whole seconds (SQLite's ISO text would drop the microseconds) and odd microseconds.
WHOLE = dt.datetime(2022, 1, 20, 9, 0, 0)
ODD = dt.datetime(2022, 1, 20, 9, 0, 1, 7)


def _planned(db: Database, signer: Any, count: int) -> list[int]:
    add_recipients(db, count, language="es")
    campaign_id = open_campaign(db, "newsletter-2022-01", "newsletter", "0" * 64)
    with db.session() as s:
        ids = segment_ids(s, ["local-police"])
    DeliveryLog(db, campaign_id).plan(ids, signer, "newsletter")
    with db.engine.connect() as conn:
        return list(conn.scalars(select(Delivery.id).order_by(Delivery.id)))


def _stored(db: Database, ids: list[int]) -> list[tuple[Any, ...]]:
    """The rows' columns as the database holds them (raw, not read back through types)."""
    columns = [c.name for c in tables.deliveries.c if c.name not in ("id", "recipient_id", "email")]
    marks = ", ".join(str(i) for i in ids)
    query = f"SELECT {', '.join(columns)} FROM deliveries WHERE id IN ({marks}) ORDER BY id"
    if db.dialect == "sqlite":  # a plain connection: the text as stored, not parsed back
        with contextlib.closing(sqlite3.connect(str(db.engine.url.database))) as plain:
            return [tuple(row) for row in plain.execute(query)]
    with db.engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(query)]


def _both_ways(db: Database, statement: Any, sets: list[dict[str, Any]]) -> None:
    """The first half of ``sets`` through ``DriverStatement``, the second through
    SQLAlchemy's execute (each set names its row as ``b_id``)."""
    half = len(sets) // 2
    with db.engine.begin() as conn:
        DriverStatement(statement, conn.dialect).execute(conn, sets[:half])
        conn.execute(statement, sets[half:])


def test_the_sender_s_statements_write_what_sqlalchemy_writes(db: Database, signer: Any) -> None:
    ids = _planned(db, signer, 8)
    marks = [
        {
            "b_id": i,
            "b_mid": f"<m{n % 4}@clara.example>",
            "b_now": (WHOLE, ODD)[n % 2],
            "b_hash": f"h{n}",
            "b_kind": "newsletter",
        }
        for n, i in enumerate(ids)
    ]
    _both_ways(db, log._MARK_SENDING, marks)
    outcomes = [
        (Status.SENT, 250, "2.0.0 Ok", WHOLE, None, 1, WHOLE),
        (Status.DEFERRED, 451, "4.3.0 later", ODD, ODD, 1, None),
        (Status.FAILED, None, "cannot render: x", ODD, None, 1, None),
        (Status.SKIPPED, None, "suppressed: manual", WHOLE, None, 0, None),
    ]
    records = [
        {
            "b_id": i,
            "b_status": status,
            "b_code": code,
            "b_reply": reply,
            "b_at": at,
            "b_next": next_at,
            "b_inc": inc,
            "b_sent": sent,
        }
        for i, (status, code, reply, at, next_at, inc, sent) in zip(
            ids, outcomes + outcomes, strict=True
        )
    ]
    _both_ways(db, log._RECORD, records)
    ours, sqlalchemys = _stored(db, ids[:4]), _stored(db, ids[4:])
    assert ours == sqlalchemys
    assert len({row for row in ours}) == 4  # four different outcomes, really written


def test_constants_in_the_statement_are_filled_in(db: Database, signer: Any) -> None:
    # The WHERE's own values (here a status) are bound by the statement, not the caller.
    ids = _planned(db, signer, 4)
    statement = (
        update(Delivery)
        .where(Delivery.id == bindparam("b_id"), Delivery.status == Status.QUEUED.value)
        .values(smtp_reply=bindparam("b_reply"))
    )
    sets = [{"b_id": i, "b_reply": f"note {i}"} for i in ids]
    with db.engine.begin() as conn:
        conn.execute(update(Delivery).where(Delivery.id == ids[0]).values(status="failed"))
        DriverStatement(statement, conn.dialect).execute(conn, sets)
    with db.engine.connect() as conn:
        replies = dict(conn.execute(select(Delivery.id, Delivery.smtp_reply)).all())
    assert replies[ids[0]] is None  # not queued any more: the constant held
    assert [replies[i] for i in ids[1:]] == [f"note {i}" for i in ids[1:]]


def test_a_missing_parameter_is_refused_before_anything_is_written(
    db: Database, signer: Any
) -> None:
    ids = _planned(db, signer, 2)
    before = _stored(db, ids)
    with db.engine.begin() as conn:
        statement = DriverStatement(log._MARK_SENDING, conn.dialect)
        with pytest.raises(ValueError, match="b_now"):
            statement.execute(conn, [{"b_id": ids[0], "b_mid": "<m@clara.example>"}])
    assert _stored(db, ids) == before


# -- set-based updates -----------------------------------------------------------------
# ``DeliveryLog.mark_sending`` and ``record`` write a batch with one UPDATE ... FROM: on
# PostgreSQL over unnest(arrays) (``log._MARK_SENDING_SET``, ``log._RECORD_SET``), on
# SQLite over json_each (``log._MARK_SENDING_JSON``, ``log._RECORD_JSON``); an SQLite
# library older than 3.38 runs the per-row statements (``old_sqlite``). Every way, the
# stored values must be what SQLAlchemy's own execute of the per-row statement writes,
# rows that must be left alone included.


@pytest.fixture(params=["set-based", "old-sqlite"])
def old_sqlite(
    request: pytest.FixtureRequest, db: Database, monkeypatch: pytest.MonkeyPatch
) -> bool:
    """True: the SQLite library is taken to be too old for the set-based updates."""
    if request.param == "set-based":
        return False
    if db.dialect != "sqlite":
        pytest.skip("the SQLite library's version")
    monkeypatch.setattr(log, "_SQLITE_SET_BASED", (99, 0, 0))
    return True


#: Replies an array literal could mangle: quotes, braces, commas, backslashes, the word
#: NULL, an empty string, non-ASCII.
AWKWARD = ['5.1.1 "no" {such}, user', "NULL", "", "back\\slash", "4.2.2 Ñandú"]


def _twin_rows(db: Database, signer: Any, count: int) -> tuple[list[int], list[int]]:
    """``count`` planned rows and as many twins, each pair in the same state: some queued
    and leased, a retry (attempts, first attempt, a Message-ID already), and rows that a
    result must not touch (sent, failed, skipped, bounced)."""
    ids = _planned(db, signer, 2 * count)
    ours, twins = ids[:count], ids[count:]
    states: list[dict[str, Any]] = [
        {"worker_id": "h:1:w", "lease_expires_at": ODD},
        {
            "status": Status.DEFERRED.value,
            "attempts": 2,
            "first_attempt_at": WHOLE,
            "message_id": "<old@clara.example>",
            "next_attempt_at": ODD,
        },
        {"status": Status.SENT.value, "attempts": 1, "sent_at": WHOLE, "smtp_code": 250},
        {"status": Status.FAILED.value, "attempts": 1, "smtp_reply": "5.0.0 no"},
        {"status": Status.SKIPPED.value, "smtp_reply": "suppressed: manual"},
        {"status": Status.BOUNCED.value, "attempts": 1, "sent_at": ODD},
        {"status": Status.UNKNOWN.value, "attempts": 1, "first_attempt_at": ODD},
        {"status": Status.SENDING.value, "worker_id": "h:1:w", "lease_expires_at": WHOLE},
    ]
    with db.engine.begin() as conn:
        for n, (a, b) in enumerate(zip(ours, twins, strict=True)):
            values = states[n % len(states)]
            conn.execute(update(Delivery).where(Delivery.id.in_([a, b])).values(**values))
    return ours, twins


def _outcome_sets(ids: list[int]) -> list[dict[str, Any]]:
    """``_RECORD``'s parameter sets for ``ids``: every kind of outcome, None and awkward
    values, attempts counted and not."""
    sets = []
    for n, i in enumerate(ids):
        status = [Status.SENT, Status.DEFERRED, Status.FAILED, Status.SKIPPED, Status.UNKNOWN][
            n % 5
        ]
        at = (WHOLE, ODD)[n % 2]
        sets.append(
            {
                "b_id": i,
                "b_status": status,
                "b_code": None if n % 3 == 0 else 250 + n,
                "b_reply": AWKWARD[n % len(AWKWARD)],
                "b_at": at,
                "b_next": ODD if status == Status.DEFERRED else None,
                "b_inc": 0 if status == Status.SKIPPED else 1,
                "b_sent": at if status == Status.SENT else None,
            }
        )
    return sets


def _as_records(sets: list[dict[str, Any]]) -> list[log.Record]:
    return [
        log.Record(
            delivery_id=p["b_id"],
            status=p["b_status"],
            code=p["b_code"],
            reply=p["b_reply"],
            at=p["b_at"],
            next_attempt_at=p["b_next"],
            counts_attempt=bool(p["b_inc"]),
        )
        for p in sets
    ]


def _per_row_statements_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the per-row statements ``DeliveryLog`` runs from now on."""
    used: list[str] = []
    original = DeliveryLog._statement

    def spy(self: DeliveryLog, name: str, statement: Any) -> DriverStatement:
        used.append(name)
        return original(self, name, statement)

    monkeypatch.setattr(DeliveryLog, "_statement", spy)
    return used


def test_record_writes_what_the_per_row_statement_writes(
    db: Database, signer: Any, monkeypatch: pytest.MonkeyPatch, old_sqlite: bool
) -> None:
    ours, twins = _twin_rows(db, signer, 24)
    used = _per_row_statements_used(monkeypatch)
    sets = _outcome_sets(ours)
    DeliveryLog(db, 1).record(_as_records(sets))
    with db.engine.begin() as conn:
        conn.execute(
            log._RECORD, [{**p, "b_id": twin} for p, twin in zip(sets, twins, strict=True)]
        )
    assert _stored(db, ours) == _stored(db, twins)
    assert used == (["record"] if old_sqlite else [])
    with db.engine.connect() as conn:
        statuses = dict(conn.execute(select(Delivery.id, Delivery.status)).all())
    # Rows no longer writable kept their state; the others took their outcome.
    assert statuses[ours[2]] == Status.SENT and statuses[ours[4]] == Status.SKIPPED
    assert statuses[ours[0]] == Status.SENT and statuses[ours[1]] == Status.DEFERRED


def test_record_with_a_repeated_row_writes_what_the_per_row_statement_writes(
    db: Database, signer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An UPDATE ... FROM changes a row once: a batch naming a row twice runs per row, the
    # second result over the first (attempts counted twice), as SQLAlchemy's does.
    ours, twins = _twin_rows(db, signer, 2)
    used = _per_row_statements_used(monkeypatch)
    first, second = _outcome_sets([ours[0], ours[0]])[1], _outcome_sets([ours[0]])[0]
    sets = [first, second, _outcome_sets([ours[1]])[0]]
    DeliveryLog(db, 1).record(_as_records(sets))
    twin_of = dict(zip(ours, twins, strict=True))
    with db.engine.begin() as conn:
        conn.execute(log._RECORD, [{**p, "b_id": twin_of[p["b_id"]]} for p in sets])
    assert _stored(db, ours) == _stored(db, twins)
    assert used == ["record"]
    with db.engine.connect() as conn:
        assert conn.scalar(select(Delivery.attempts).where(Delivery.id == ours[0])) == 2


def test_mark_sending_writes_what_the_per_row_statement_writes(
    db: Database, signer: Any, monkeypatch: pytest.MonkeyPatch, old_sqlite: bool
) -> None:
    ours, twins = _twin_rows(db, signer, 16)
    monkeypatch.setattr(log, "utcnow", lambda: ODD)
    used = _per_row_statements_used(monkeypatch)
    entries = [(i, f"<{n}.{AWKWARD[n % 5]}@clara.example>", f"h{n}") for n, i in enumerate(ours)]
    assert DeliveryLog(db, 1).mark_sending(entries, "newsletter") == {}
    with db.engine.begin() as conn:
        sets = [
            {"b_id": twin, "b_mid": mid, "b_now": ODD, "b_hash": h, "b_kind": "newsletter"}
            for (_, mid, h), twin in zip(entries, twins, strict=True)
        ]
        conn.execute(log._MARK_SENDING, sets)
    assert _stored(db, ours) == _stored(db, twins)
    assert used == (["mark_sending"] if old_sqlite else [])
    with db.engine.connect() as conn:
        statuses = set(conn.scalars(select(Delivery.status).where(Delivery.id.in_(ours))))
    assert statuses == {Status.SENDING}


def test_mark_sending_leaves_out_exactly_the_addresses_a_suppression_stops(
    db: Database, signer: Any, monkeypatch: pytest.MonkeyPatch, old_sqlite: bool
) -> None:
    # An opt-out recorded while the send runs: the statement that marks the rows leaves
    # those out itself (one for the group; with an older SQLite, one per row), and only
    # then are the reasons looked up.
    ids = _planned(db, signer, 6)
    hashes = [f"hash-{n}" for n in range(len(ids))]
    with db.session() as s:
        suppress_hash(s, hashes[0], reason=OptOutReason.ONE_CLICK)  # every kind
        suppress_hash(s, hashes[1], reason=OptOutReason.UNSUBSCRIBE, scope=OptOutScope.NEWSLETTER)
        suppress_hash(s, hashes[2], reason=OptOutReason.MANUAL, scope=OptOutScope.INVITATION)
        suppress_hash(s, hashes[3], reason=OptOutReason.COMPLAINT)
        lift_hash(s, hashes[3], note="asked back in")
    used = _per_row_statements_used(monkeypatch)
    entries = [
        (i, f"<{n}@clara.example>", h) for n, (i, h) in enumerate(zip(ids, hashes, strict=True))
    ]
    skipped = DeliveryLog(db, 1).mark_sending(entries, "newsletter")
    assert skipped == {hashes[0]: "one-click", hashes[1]: "unsubscribe"}
    with db.engine.connect() as conn:
        rows = conn.execute(select(Delivery.id, Delivery.status, Delivery.message_id))
        stored = {i: (status, mid) for i, status, mid in rows}
    assert [stored[i] for i in ids] == [
        (Status.QUEUED, None),
        (Status.QUEUED, None),
        *[(Status.SENDING, f"<{n}@clara.example>") for n in range(2, len(ids))],
    ]
    assert used == (["mark_sending"] if old_sqlite else [])
    # Nothing stopped: no lookup of reasons either.
    assert DeliveryLog(db, 1).mark_sending(entries[2:], "newsletter") == {}


def test_a_reply_with_bytes_that_are_not_utf8_is_stored_readable(
    db: Database, signer: Any, old_sqlite: bool
) -> None:
    # The transport keeps a reply's bytes that are not UTF-8 as lone surrogates
    # (surrogateescape): no driver can encode those, and SQLite's JSON would store them
    # as bytes that cannot be read back. They are stored as "?", the rest as it came.
    ids = _planned(db, signer, 2)
    at = dt.datetime(2022, 1, 20, 9, 0, 0, 123456)
    replies = ["250 2.0.0 \u00e9t\u00e9 \udcff ok", "550 5.1.1 caf\udce9 " + "x" * 2100]
    DeliveryLog(db, 1).record(
        [log.Record(i, Status.SENT, 250, reply, at) for i, reply in zip(ids, replies, strict=True)]
    )
    with db.engine.connect() as conn:
        stored = dict(conn.execute(select(Delivery.id, Delivery.smtp_reply)).all())
    assert stored[ids[0]] == "250 2.0.0 \u00e9t\u00e9 ? ok"
    assert stored[ids[1]] == ("550 5.1.1 caf? " + "x" * 2100)[:2000]
