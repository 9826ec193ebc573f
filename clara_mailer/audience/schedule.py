"""Scheduled sends: ``send CAMPAIGN --at TIME`` records the plan and the time; a runner
(``clara-mail scheduled run`` from cron or a systemd timer, or ``clara-mail serve`` every
half minute) starts each due send once.

Once, even with several runners on one database: a runner claims a schedule with
``UPDATE schedules SET state='running' ... WHERE id=:id AND state='due'`` and goes ahead
only when that changed one row. Two runners racing for the same row both issue the
update; the database lets one through (PostgreSQL locks the row and re-checks the
condition after the first commits; SQLite serialises writers), and the other changes
nothing. The send itself is the ordinary one (plan, then the delivery log), so a send
interrupted half-way is resumed by ``clara-mail send CAMPAIGN`` as usual.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.plan.filters import parse_filters
from clara_mailer.plan.plan import SendOptions, prepare_send
from clara_mailer.sending.worker import run_send
from clara_mailer.store.database import Database
from clara_mailer.store.models import Schedule, utcnow
from clara_mailer.transport import Transport

DUE, RUNNING, DONE, FAILED, CANCELLED = "due", "running", "done", "failed", "cancelled"
#: The options a schedule keeps (those of SendOptions that say what to send and how).
_KEPT = (
    "segments",
    "limit",
    "concurrency",
    "rate",
    "resend_unknown",
    "allow_changed_templates",
    "where",
    "exclude_segments",
)


def options_json(options: SendOptions) -> str:
    return json.dumps({name: getattr(options, name) for name in _KEPT}, sort_keys=True)


def options_from_json(text: str) -> SendOptions:
    values = json.loads(text or "{}")
    for name in ("segments", "where", "exclude_segments"):
        values[name] = tuple(values.get(name) or ())
    return SendOptions(**{k: v for k, v in values.items() if k in _KEPT})


def _naive_utc(when: dt.datetime) -> dt.datetime:
    if when.tzinfo is None:
        raise InputError(f"{when.isoformat()} names no UTC offset: add one, e.g. +01:00 or Z")
    return when.astimezone(dt.UTC).replace(tzinfo=None)


def create_schedule(
    db: Database,
    settings: Settings,
    slug: str,
    options: SendOptions,
    due_at: dt.datetime,
    *,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """Record a send of ``slug`` at ``due_at`` (aware). Refused: a time not in the future,
    an unknown campaign or filter, a second schedule of one campaign."""
    due = _naive_utc(due_at)
    current = now.astimezone(dt.UTC).replace(tzinfo=None) if now else utcnow()
    if due <= current:
        raise InputError(
            f"--at {due_at.isoformat()} is in the past (now {current:%Y-%m-%d %H:%M} UTC): "
            "give a later time, or send now without --at"
        )
    load_campaign(settings, slug)  # a campaign that does not exist is refused now
    parse_filters(options.where)
    with db.session() as session:
        pending = session.scalars(
            select(Schedule).where(Schedule.campaign == slug, Schedule.state == DUE)
        ).first()
        if pending is not None:
            raise InputError(
                f"{slug} is scheduled already for {pending.due_at:%Y-%m-%d %H:%M} UTC: "
                f"cancel it first with `clara-mail send {slug} --cancel-schedule`"
            )
        row = Schedule(campaign=slug, options=options_json(options), due_at=due, state=DUE)
        session.add(row)
        session.flush()
        return _row(row)


def cancel_schedule(db: Database, slug: str) -> int:
    """Cancel the due (not started) schedules of ``slug``; NotFound when there is none."""
    with db.session() as session:
        result = cast(
            CursorResult[Any],
            session.execute(
                update(Schedule)
                .where(Schedule.campaign == slug, Schedule.state == DUE)
                .values(state=CANCELLED, finished_at=utcnow(), result="cancelled")
            ),
        )
        count = result.rowcount
    if not count:
        raise NotFound(f"{slug} has no scheduled send waiting to start")
    return count


def _when(value: dt.datetime | None) -> str | None:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else None


def _row(row: Schedule) -> dict[str, Any]:
    return {
        "id": row.id,
        "campaign": row.campaign,
        "due_at": _when(row.due_at),
        "state": row.state,
        "options": row.options,
        "claimed_by": row.claimed_by,
        "started_at": _when(row.started_at),
        "finished_at": _when(row.finished_at),
        "result": row.result,
    }


def list_schedules(db: Database, *, active_only: bool = False) -> list[dict[str, Any]]:
    query = select(Schedule).order_by(Schedule.due_at, Schedule.id)
    if active_only:
        query = query.where(Schedule.state.in_([DUE, RUNNING]))
    with db.session() as session:
        return [_row(row) for row in session.scalars(query)]


def runner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:200]


def claim(db: Database, schedule_id: int, runner: str) -> bool:
    """Whether this runner took the due schedule ``schedule_id`` (False: someone else did,
    or it was cancelled)."""
    now = utcnow()
    with db.session() as session:
        result = cast(
            CursorResult[Any],
            session.execute(
                update(Schedule)
                .where(Schedule.id == schedule_id, Schedule.state == DUE)
                .values(state=RUNNING, claimed_by=runner, claimed_at=now, started_at=now)
            ),
        )
        return result.rowcount == 1


def _finish(db: Database, schedule_id: int, state: str, result: str) -> None:
    with db.session() as session:
        session.execute(
            update(Schedule)
            .where(Schedule.id == schedule_id)
            .values(state=state, finished_at=utcnow(), result=result[:2000])
        )


def run_due(
    db: Database,
    settings: Settings,
    signer: TokenSigner,
    runner: str | None = None,
    *,
    transport: Transport | None = None,
    now: dt.datetime | None = None,
) -> list[dict[str, Any]]:
    """Start every due schedule this runner claims, one after the other; what each came
    to (``campaign``, ``state`` done or failed, ``result``)."""
    runner = runner or runner_id()
    moment = now.astimezone(dt.UTC).replace(tzinfo=None) if now else utcnow()
    with db.session() as session:
        due = [
            (row.id, row.campaign, row.options)
            for row in session.execute(
                select(Schedule.id, Schedule.campaign, Schedule.options)
                .where(Schedule.state == DUE, Schedule.due_at <= moment)
                .order_by(Schedule.due_at, Schedule.id)
            )
        ]
    ran: list[dict[str, Any]] = []
    for schedule_id, slug, options_text in due:
        if not claim(db, schedule_id, runner):
            continue
        try:
            options = dataclasses.replace(options_from_json(options_text), worker_id=None)
            plan = prepare_send(db, settings, signer, slug, options)
            summary = run_send(
                db, settings, signer, plan, options, transport=transport, handle_signals=False
            )
        except Exception as exc:  # recorded on the schedule: a runner goes on with the next
            text = f"{type(exc).__name__}: {exc}"
            _finish(db, schedule_id, FAILED, text)
            ran.append({"id": schedule_id, "campaign": slug, "state": FAILED, "result": text})
            continue
        outcomes = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items())) or "nothing"
        text = f"this run: {outcomes}; planned {plan.added} new, {plan.skipped} skipped"
        _finish(db, schedule_id, DONE, text)
        ran.append({"id": schedule_id, "campaign": slug, "state": DONE, "result": text})
    return ran
