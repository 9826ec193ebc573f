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

A runner that dies mid-send (kill -9, a crash, a reboot) cannot mark its schedule, so
the next runner and ``scheduled list`` do: a ``running`` schedule whose runner is gone
becomes ``failed``, its result saying why and how to resume. Gone means: on this host,
its process is not running or the machine has restarted since (the runner id is
``host:pid:boot``); on any host, no heartbeat for ``STALE_SECONDS`` (a runner renews
``claimed_at`` every ``HEARTBEAT_SECONDS`` while it sends). It is never put back to
``due``: a runner presumed dead that is in fact alive goes on alone (its own result is
recorded when it ends), so no schedule is ever run twice at once.

Like the send it starts, this is SQLAlchemy Core alone: neither ``send --at`` nor a
runner loads the ORM.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Row, insert, select, update

from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.plan.filters import parse_filters
from clara_mailer.plan.plan import SendOptions, prepare_send
from clara_mailer.sending.journal import boot_marker, pid_alive, same_boot
from clara_mailer.sending.worker import run_send
from clara_mailer.store import tables
from clara_mailer.store.database import Database
from clara_mailer.store.tables import utcnow
from clara_mailer.transport import Transport

#: The table's columns (Core: no ORM).
Schedule = tables.schedules.c

DUE, RUNNING, DONE, FAILED, CANCELLED = "due", "running", "done", "failed", "cancelled"
#: How often a runner renews ``claimed_at`` while its send runs, in seconds.
HEARTBEAT_SECONDS = 30.0
#: A running schedule not renewed for this long has lost its runner (any host).
STALE_SECONDS = 600.0
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


@dataclasses.dataclass(frozen=True)
class ScheduledOptions(SendOptions):
    """What a schedule keeps: the send's options and ``send --processes``."""

    processes: int = 1

    @classmethod
    def of(cls, options: SendOptions, processes: int = 1) -> ScheduledOptions:
        values = {f.name: getattr(options, f.name) for f in dataclasses.fields(SendOptions)}
        return cls(**values, processes=processes)

    def send_options(self) -> SendOptions:
        """The plain SendOptions (what the sender and its helper processes are given)."""
        return SendOptions(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(SendOptions)}
        )


def options_json(options: SendOptions) -> str:
    values = {name: getattr(options, name) for name in _KEPT}
    values["processes"] = getattr(options, "processes", 1)
    return json.dumps(values, sort_keys=True)


def options_from_json(text: str) -> ScheduledOptions:
    values = json.loads(text or "{}")
    for name in ("segments", "where", "exclude_segments"):
        values[name] = tuple(values.get(name) or ())
    return ScheduledOptions(**{k: v for k, v in values.items() if k in (*_KEPT, "processes")})


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
    with db.writing() as conn:
        pending = conn.execute(
            select(tables.schedules).where(Schedule.campaign == slug, Schedule.state == DUE)
        ).first()
        if pending is not None:
            raise InputError(
                f"{slug} is scheduled already for {pending.due_at:%Y-%m-%d %H:%M} UTC: "
                f"cancel it first with `clara-mail send {slug} --cancel-schedule`"
            )
        row = conn.execute(
            insert(tables.schedules)
            .values(campaign=slug, options=options_json(options), due_at=due, state=DUE)
            .returning(tables.schedules)
        ).one()
        return _row(row)


def cancel_schedule(db: Database, slug: str) -> int:
    """Cancel the due (not started) schedules of ``slug``; NotFound when there is none."""
    with db.writing() as conn:
        result = conn.execute(
            update(tables.schedules)
            .where(Schedule.campaign == slug, Schedule.state == DUE)
            .values(state=CANCELLED, finished_at=utcnow(), result="cancelled")
        )
        count = result.rowcount
    if not count:
        raise NotFound(f"{slug} has no scheduled send waiting to start")
    return count


def _when(value: dt.datetime | None) -> str | None:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else None


def _row(row: Row[Any]) -> dict[str, Any]:
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
    """Every schedule by due time; a ``running`` one whose runner is gone is marked
    ``failed`` first (``reap_dead_runners``)."""
    reap_dead_runners(db)
    query = select(tables.schedules).order_by(Schedule.due_at, Schedule.id)
    if active_only:
        query = query.where(Schedule.state.in_([DUE, RUNNING]))
    with db.writing() as conn:
        return [_row(row) for row in conn.execute(query)]


def _host() -> str:
    return socket.gethostname()[:100]


def runner_id() -> str:
    """``host:pid:boot``: the pid and the boot tell, on this host, a runner that is gone."""
    return f"{_host()}:{os.getpid()}:{boot_marker()[:40]}"[:200]


def runner_gone(runner: str | None, heard: dt.datetime | None, now: dt.datetime) -> str | None:
    """Why the runner of a ``running`` schedule is certainly or presumably gone (None: it
    may be running). ``heard``: its last heartbeat (``claimed_at``)."""
    if heard is not None and (now - heard).total_seconds() > STALE_SECONDS:
        return f"no sign of life from its runner {runner} since {heard:%Y-%m-%d %H:%M:%S} UTC"
    host, _, rest = (runner or "").partition(":")
    pid_text, _, boot = rest.partition(":")
    if host != _host() or not pid_text.isdigit():
        return None  # another host's runner: its heartbeat says
    if boot and not same_boot(boot, boot_marker()[:40]):
        return f"the machine restarted while its runner {runner} was sending"
    if not pid_alive(int(pid_text)):
        return f"its runner {runner} stopped before the send finished (killed or crashed)"
    return None


def reap_dead_runners(db: Database, now: dt.datetime | None = None) -> int:
    """Mark ``failed`` each ``running`` schedule whose runner is gone, saying why; how many.

    Never back to ``due``: that could start a second run beside a runner presumed dead
    but alive. ``clara-mail send CAMPAIGN`` resumes the send (or ``send --at`` again)."""
    moment = now or utcnow()
    with db.writing() as conn:
        running = conn.execute(
            select(Schedule.id, Schedule.campaign, Schedule.claimed_by, Schedule.claimed_at).where(
                Schedule.state == RUNNING
            )
        ).all()
    count = 0
    for schedule_id, slug, runner, heard in running:
        why = runner_gone(runner, heard, moment)
        if why is None:
            continue
        text = (
            f"interrupted: {why}; what was sent is recorded: `clara-mail send {slug}` "
            "resumes it (or schedule it again with --at)"
        )
        with db.writing() as conn:
            result = conn.execute(
                update(tables.schedules)
                .where(
                    Schedule.id == schedule_id,
                    Schedule.state == RUNNING,
                    Schedule.claimed_by == runner,
                )
                .values(state=FAILED, finished_at=moment, result=text[:2000])
            )
            count += result.rowcount
    return count


def claim(db: Database, schedule_id: int, runner: str) -> bool:
    """Whether this runner took the due schedule ``schedule_id`` (False: someone else did,
    or it was cancelled)."""
    now = utcnow()
    with db.writing() as conn:
        result = conn.execute(
            update(tables.schedules)
            .where(Schedule.id == schedule_id, Schedule.state == DUE)
            .values(state=RUNNING, claimed_by=runner, claimed_at=now, started_at=now)
        )
        return result.rowcount == 1


def heartbeat(db: Database, schedule_id: int, runner: str) -> None:
    """This runner is alive and still sending ``schedule_id``."""
    with db.writing() as conn:
        conn.execute(
            update(tables.schedules)
            .where(Schedule.id == schedule_id, Schedule.claimed_by == runner)
            .values(claimed_at=utcnow())
        )


@contextmanager
def _heartbeats(db: Database, schedule_id: int, runner: str, interval: float) -> Iterator[None]:
    """Renew the claim every ``interval`` seconds on a thread while the send runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                heartbeat(db, schedule_id, runner)
            except Exception:  # a missed beat is retried; only a long silence counts
                continue

    thread = threading.Thread(target=beat, name="clara-schedule-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _finish(db: Database, schedule_id: int, runner: str, state: str, result: str) -> None:
    # Only its own claim: what this runner did is recorded even if it was taken for dead
    # meanwhile (its result then said "interrupted").
    with db.writing() as conn:
        conn.execute(
            update(tables.schedules)
            .where(Schedule.id == schedule_id, Schedule.claimed_by == runner)
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
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
) -> list[dict[str, Any]]:
    """Start every due schedule this runner claims, one after the other; what each came
    to (``campaign``, ``state`` done or failed, ``result``). First, schedules left
    ``running`` by a runner that is gone are marked ``failed``."""
    runner = runner or runner_id()
    reap_dead_runners(db)
    moment = now.astimezone(dt.UTC).replace(tzinfo=None) if now else utcnow()
    with db.writing() as conn:
        due = [
            (row.id, row.campaign, row.options)
            for row in conn.execute(
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
            kept = options_from_json(options_text)
            options = dataclasses.replace(kept.send_options(), worker_id=None)
            with _heartbeats(db, schedule_id, runner, heartbeat_seconds):
                plan = prepare_send(db, settings, signer, slug, options)
                summary = run_send(
                    db,
                    settings,
                    signer,
                    plan,
                    options,
                    transport=transport,
                    handle_signals=False,
                    processes=kept.processes,
                )
        except Exception as exc:  # recorded on the schedule: a runner goes on with the next
            text = f"{type(exc).__name__}: {exc}"
            _finish(db, schedule_id, runner, FAILED, text)
            ran.append({"id": schedule_id, "campaign": slug, "state": FAILED, "result": text})
            continue
        outcomes = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items())) or "nothing"
        text = f"this run: {outcomes}; planned {plan.added} new, {plan.skipped} skipped"
        _finish(db, schedule_id, runner, DONE, text)
        ran.append({"id": schedule_id, "campaign": slug, "state": DONE, "result": text})
    return ran
