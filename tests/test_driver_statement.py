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

from clara_mailer.core.vocabulary import Status
from clara_mailer.deliverylog import log
from clara_mailer.deliverylog.log import DeliveryLog, open_campaign, segment_ids
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
        {"b_id": i, "b_mid": f"<m{n % 4}@clara.example>", "b_now": (WHOLE, ODD)[n % 2]}
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
