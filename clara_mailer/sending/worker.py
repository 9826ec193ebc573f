"""Sending a campaign: plan, claim, render, send, record.

``prepare_send`` plans the delivery rows (idempotent) and checks the campaign;
``run_send`` drives one worker: a producer claims leased batches from the delivery log,
re-checks opt-outs, renders each message (per-variant preparation lives in render.py),
commits ``sending`` and hands the bytes to a pool of transport connections; a recorder
writes outcomes back in small batches. All SQL is in deliverylog.py; all SMTP in
transport.py. Several workers (processes, machines) can run the same campaign at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from clara_mailer.compose.campaigns import CampaignDef, load_campaign, template_hash
from clara_mailer.compose.render import RecipientView, Renderer, check_campaign
from clara_mailer.core.errors import CheckFailed, MailerError, NotFound, SendError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner, verp_address
from clara_mailer.deliverylog.log import (
    ClaimedRow,
    DeliveryLog,
    Outcome,
    add_campaign_row,
    segment_ids,
)
from clara_mailer.optouts.suppressions import active_suppressions
from clara_mailer.store.database import Database, open_database
from clara_mailer.store.models import (
    Campaign,
    Delivery,
    Recipient,
    Segment,
    Status,
    recipient_segments,
    utcnow,
)
from clara_mailer.transport.smtp import Connection, SendResult, Transport, transport_from_settings
from clara_mailer.transport.smtp import Outcome as SmtpOutcome

T = TypeVar("T")

#: How often outcomes are written back. A crash leaves as ``unknown`` the rows in flight
#: plus the replies of the last FLUSH_SECONDS; a commit this often costs next to nothing.
FLUSH_SECONDS = 0.05

#: Statuses that still have work to do.
OPEN_STATUSES = (Status.QUEUED, Status.DEFERRED, Status.SENDING)


@dataclass(frozen=True)
class SendOptions:
    segments: tuple[str, ...] = ()
    limit: int | None = None
    concurrency: int = 4
    rate: float | None = None  # messages per second, for the whole campaign
    resend_unknown: bool = False
    allow_changed_templates: bool = False
    worker_id: str | None = None


@dataclass
class Plan:
    """What a send will do, shown before asking to go ahead."""

    campaign: CampaignDef
    campaign_id: int
    segments: tuple[str, ...]
    added: int
    skipped: int
    requeued_unknown: int
    counts: dict[str, dict[str, int]]  # segment -> status -> count
    renderer: Renderer | None = field(default=None, repr=False, compare=False)

    def total(self, *statuses: str) -> int:
        return sum(c.get(s, 0) for c in self.counts.values() for s in statuses)

    @property
    def to_send(self) -> int:
        return self.total(Status.QUEUED, Status.DEFERRED)


@dataclass
class Progress:
    """A snapshot handed to the progress callback a few times a second."""

    done: int
    total: int
    counts: Counter[str]
    elapsed: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class SendSummary:
    campaign: str
    transport: str
    network: bool
    counts: Counter[str] = field(default_factory=Counter)  # outcomes in this run
    totals: dict[str, int] = field(default_factory=dict)  # whole campaign, after the run
    next_due: dt.datetime | None = None
    interrupted: bool = False
    elapsed: float = 0.0

    @property
    def attempted(self) -> int:
        return sum(v for k, v in self.counts.items() if k != Status.SKIPPED)

    def next_steps(self) -> list[str]:
        steps = []
        deferred = self.totals.get(Status.DEFERRED, 0)
        if deferred:
            when = f" after {self.next_due:%Y-%m-%d %H:%M} UTC" if self.next_due else ""
            steps.append(f"{deferred} deferred: run `clara-mail send {self.campaign}` again{when}")
        unknown = self.totals.get(Status.UNKNOWN, 0)
        if unknown:
            steps.append(
                f"{unknown} unknown (in flight when a sender stopped): check with the relay, "
                f"then `clara-mail send {self.campaign} --resend-unknown` (same Message-ID)"
            )
        queued = self.totals.get(Status.QUEUED, 0) + self.totals.get(Status.SENDING, 0)
        if queued:
            steps.append(f"{queued} not sent yet: run `clara-mail send {self.campaign}` to go on")
        failed = self.totals.get(Status.FAILED, 0)
        if failed:
            steps.append(f"{failed} failed: `clara-mail report {self.campaign} --status failed`")
        return steps


ProgressCallback = Callable[[Progress], None]


# -- planning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Checked:
    defn: CampaignDef
    segments: list[tuple[int, str]]  # (segment id, slug), in the order asked for
    signer: TokenSigner
    campaign_id: int  # 0 while the campaign has no delivery log
    renderer: Renderer  # variants already prepared by the check


def _checked_campaign(
    db: Database, settings: Settings, slug: str, segments: tuple[str, ...]
) -> _Checked:
    """Load and check the campaign and resolve its segments: what every send path needs
    before it renders anything."""
    defn = load_campaign(settings, slug)
    chosen = segments or defn.default_segments
    if not chosen:
        raise SendError(f"campaign {slug!r} names no default segments: pass --segment")
    with db.session() as s:
        ids = segment_ids(s, chosen)
        missing = [name for name in chosen if name not in {n for _, n in ids}]
        if missing:
            known = ", ".join(s.scalars(select(Segment.slug).order_by(Segment.slug)))
            raise NotFound(f"unknown segment {missing[0]!r} (known: {known})")
        campaign_id = s.scalar(select(Campaign.id).where(Campaign.slug == defn.slug)) or 0
    signer = TokenSigner(db.secret_key(settings))
    # The check prepares every variant; the send then reuses them from this renderer.
    renderer = Renderer(defn, settings, signer, campaign_id)
    problems = check_campaign(settings, slug, renderer)
    if problems:
        raise CheckFailed(slug, problems)
    return _Checked(defn, ids, signer, campaign_id, renderer)


def prepare_send(db: Database, settings: Settings, slug: str, options: SendOptions) -> Plan:
    """Check the campaign, then create the delivery rows for the chosen segments."""
    checked = _checked_campaign(db, settings, slug, options.segments)
    defn, signer = checked.defn, checked.signer
    digest = template_hash(defn)
    with db.session() as s:
        campaign = add_campaign_row(s, defn.slug, defn.kind)
        changed = campaign.template_hash is not None and campaign.template_hash != digest
        if changed and not options.allow_changed_templates and _anything_went_out(s, campaign.id):
            raise SendError(
                f"the templates of {slug!r} changed since its first message went out; "
                "resume anyway with --allow-changed-templates"
            )
        campaign.template_hash = digest
        if options.rate is not None:
            campaign.rate_limit = options.rate
        campaign_id = campaign.id
    log = DeliveryLog(db, campaign_id, options.worker_id)
    planned = log.plan(checked.segments, signer, defn.kind)
    requeued = log.requeue_unknown() if options.resend_unknown else 0
    return Plan(
        campaign=defn,
        campaign_id=campaign_id,
        segments=tuple(name for _, name in checked.segments),
        added=planned.added,
        skipped=planned.skipped,
        requeued_unknown=requeued,
        counts=log.status_counts([name for _, name in checked.segments]),
        renderer=checked.renderer.for_campaign(campaign_id),
    )


def _anything_went_out(s: Session, campaign_id: int) -> bool:
    untouched = (Status.QUEUED, Status.SKIPPED)
    first = s.scalar(
        select(Delivery.id)
        .where(Delivery.campaign_id == campaign_id, Delivery.status.not_in(untouched))
        .limit(1)
    )
    return first is not None


# -- the worker ---------------------------------------------------------------------------


@dataclass
class _Job:
    row: ClaimedRow
    envelope_from: str
    recipient: str
    data: bytes
    address_hash: str
    message_id: str


@dataclass
class _Group:
    jobs: list[_Job]
    commit: asyncio.Future[dict[str, str]]  # address hash -> reason, for the opted out


class _Worker:
    """One sender process's share of a campaign: producer, connections, recorder."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        plan: Plan,
        options: SendOptions,
        transport: Transport,
        progress: ProgressCallback | None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.plan = plan
        self.options = options
        self.transport = transport
        self.progress = progress
        self.log = DeliveryLog(db, plan.campaign_id, options.worker_id)
        self.signer = TokenSigner(db.secret_key(settings))
        self.renderer = plan.renderer or Renderer(
            plan.campaign, settings, self.signer, plan.campaign_id
        )
        self.dkim = _dkim_signer(settings)
        self.concurrency = max(1, options.concurrency)
        self.queue: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=self.concurrency * 4)
        self.pending: list[Outcome] = []
        self.inflight = 0
        self.handed = 0
        self.counts: Counter[str] = Counter()
        self.stopping = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clara-db")
        self.started = time.monotonic()
        self.delays = settings.retry_in_run_delays
        self.first_connection: Connection | None = None

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """Database work runs on one thread, so the event loop keeps sending meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # producer ------------------------------------------------------------------------

    async def produce(self) -> None:
        claimed: deque[ClaimedRow] = deque()
        group_size = self.concurrency * 4
        batch = max(group_size, self.settings.claim_batch)
        limit = self.options.limit
        rate = self.options.rate
        last_expire = 0.0
        # Double buffering: while one group's `sending` commits on the database thread,
        # the next group is rendered here; a group is handed to the connections only
        # once its commit is done.
        committing: _Group | None = None
        try:
            while not self.stopping.is_set():
                if limit is not None and self.handed >= limit:
                    break
                if not claimed:
                    if committing is not None:
                        await self._hand_over(committing, rate)
                        committing = None
                    if time.monotonic() - last_expire > 5:
                        await self._db(self.log.expire_leases)
                        last_expire = time.monotonic()
                    want = batch if limit is None else min(batch, limit - self.handed)
                    if rate:
                        want = max(1, min(want, int(rate * 2)))
                    rows = await self._db(self.log.claim, want, self.settings.lease_seconds)
                    if not rows:
                        if not await self._wait_for_more():
                            break
                        continue
                    if rate:
                        start = await self._db(self.log.reserve_rate_window, len(rows), rate)
                        await self._sleep_until(start)
                    claimed.extend(rows)
                take = min(group_size, len(claimed))
                if limit is not None:
                    pending_here = len(committing.jobs) if committing else 0
                    take = min(take, limit - self.handed - pending_here)
                    if take <= 0:
                        break
                group = self._render_group([claimed.popleft() for _ in range(take)])
                if committing is not None:
                    await self._hand_over(committing, rate)
                committing = group
        finally:
            if committing is not None:
                await self._hand_over(committing, rate)
            if claimed:
                await self._db(self.log.release, [r.id for r in claimed])
            for _ in range(self.concurrency):
                await self.queue.put(None)

    async def _hand_over(self, group: _Group, rate: float | None) -> None:
        """Wait for the group's commit, drop what was opted out meanwhile, queue the rest."""
        suppressed = await group.commit
        now = utcnow()
        for job in group.jobs:
            reason = suppressed.get(job.address_hash)
            if reason:
                self._outcome(
                    job.row, Status.SKIPPED, None, f"suppressed: {reason}", now, attempt=False
                )
                continue
            if rate:
                await self._pace(rate)
            self.inflight += 1
            self.handed += 1
            await self.queue.put(job)

    async def _wait_for_more(self) -> bool:
        """Nothing claimable now: wait for our own in-flight outcomes and for short
        in-run retries that fall due soon. False when this run is done."""
        while self.inflight or self.pending:
            if self.stopping.is_set():
                return False
            await self._flush()
            await asyncio.sleep(0.02)
        next_due = await self._db(self.log.next_due)
        window = max(self.delays, default=0.0) + 1.0
        now = utcnow()
        if next_due is not None and next_due <= now + dt.timedelta(seconds=window):
            await self._sleep_until(next_due)
            return True
        # A dead local worker's claims come back at once; a live one's when it is done.
        return await self._db(self.log.expire_leases) > 0

    async def _sleep_until(self, when: dt.datetime) -> None:
        delay = (when - utcnow()).total_seconds()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)

    _next_slot = 0.0

    async def _pace(self, rate: float) -> None:
        now = time.monotonic()
        self._next_slot = max(self._next_slot, now)
        wait = self._next_slot - now
        self._next_slot += 1.0 / rate
        if wait > 0:
            await asyncio.sleep(wait)

    def _render_group(self, group: list[ClaimedRow]) -> _Group:
        """Render a group and start committing it as ``sending`` (re-checking opt-outs in
        the same transaction, just before the messages go out)."""
        now = utcnow()
        jobs: list[_Job] = []
        expire = dt.timedelta(seconds=self.settings.retry_expire)
        for row in group:
            if row.email is None or row.recipient_id is None:
                self._outcome(row, Status.SKIPPED, None, "recipient erased", now, attempt=False)
                continue
            if row.first_attempt_at is not None and now - row.first_attempt_at > expire:
                reason = "gave up: still deferred after the retry period"
                self._outcome(row, Status.FAILED, None, reason, now, attempt=False)
                continue
            view = _view(row)
            message_id = self.renderer.message_id(view)
            try:
                data = self.renderer.render(
                    view, smtputf8=not _local_part(row.email).isascii(), message_id=message_id
                )
            except MailerError as exc:
                self._outcome(row, Status.FAILED, None, f"cannot render: {exc}", now)
                continue
            if self.dkim is not None:
                data = self.dkim.sign(data)
            envelope_from = self.plan.campaign.sender
            if self.settings.bounce_address:
                token = self.signer.sign("b", self.plan.campaign_id, row.recipient_id)
                envelope_from = verp_address(self.settings.bounce_address, token)
            address_hash = self.signer.address_hash(row.email)
            jobs.append(_Job(row, envelope_from, row.email, data, address_hash, message_id))
        commit = asyncio.ensure_future(
            self._db(
                self.log.mark_sending,
                [(j.row.id, j.message_id, j.address_hash) for j in jobs],
                self.plan.campaign.kind,
            )
        )
        return _Group(jobs, commit)

    # connections ---------------------------------------------------------------------

    async def connection_loop(self, first: Connection | None) -> None:
        conn = first
        backoff = 0.0
        while True:
            job = await self.queue.get()
            if job is None:
                break
            if self.stopping.is_set():
                # Stopping: what is not on the wire yet goes back to the queue, untouched.
                self.inflight -= 1
                self.pending.append(
                    Outcome(job.row.id, Status.QUEUED, None, "", utcnow(), None, False)
                )
                continue
            if conn is None:
                try:
                    conn = await self.transport.connect()
                except MailerError as exc:
                    result = SendResult(SmtpOutcome.DEFERRED, 0, f"cannot connect: {exc}", True)
                    self._result(job, result)
                    backoff = min(max(1.0, backoff * 2), 60.0)
                    await self._sleep(backoff)
                    continue
            result = await conn.send(job.envelope_from, job.recipient, job.data)
            self._result(job, result)
            if result.connection_broken:
                with contextlib.suppress(Exception):
                    await conn.close()
                conn = None
                # 421 and dropped connections back off the whole connection.
                backoff = min(max(1.0, backoff * 2), 60.0)
                await self._sleep(backoff)
            else:
                backoff = 0.0
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    def _result(self, job: _Job, result: SendResult) -> None:
        now = utcnow()
        self.inflight -= 1
        reply = f"{result.code} {result.reply}".strip() if result.code else result.reply
        code = result.code or None
        if result.outcome == SmtpOutcome.SENT:
            self._outcome(job.row, Status.SENT, code, reply, now)
        elif result.outcome == SmtpOutcome.FAILED:
            self._outcome(job.row, Status.FAILED, code, reply, now)
        elif result.outcome == SmtpOutcome.UNKNOWN:
            self._outcome(job.row, Status.UNKNOWN, code, reply, now)
        else:
            attempts = job.row.attempts + 1
            first = job.row.first_attempt_at or now
            retry_at = now + dt.timedelta(seconds=self._delay(attempts))
            # Give up when the next try would fall after the retry period (Postfix's
            # maximal_queue_lifetime): a newsletter goes stale.
            if retry_at > first + dt.timedelta(seconds=self.settings.retry_expire):
                self._outcome(job.row, Status.FAILED, code, f"gave up after retries: {reply}", now)
            else:
                self._outcome(job.row, Status.DEFERRED, code, reply, now, next_attempt_at=retry_at)

    def _delay(self, attempts: int) -> float:
        if attempts <= len(self.delays):
            return self.delays[attempts - 1]
        extra = attempts - len(self.delays) - 1
        return float(min(self.settings.retry_initial * 2**extra, self.settings.retry_max))

    def _outcome(
        self,
        row: ClaimedRow,
        status: str,
        code: int | None,
        reply: str,
        at: dt.datetime,
        *,
        next_attempt_at: dt.datetime | None = None,
        attempt: bool = True,
    ) -> None:
        self.pending.append(Outcome(row.id, status, code, reply, at, next_attempt_at, attempt))
        self.counts[status] += 1

    # recorder and housekeeping -------------------------------------------------------

    async def _flush(self) -> None:
        if self.pending:
            batch, self.pending = self.pending, []
            await self._db(self.log.record, batch)

    async def recorder(self, done: asyncio.Event) -> None:
        last_renew = time.monotonic()
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=FLUSH_SECONDS)
            await self._flush()
            if time.monotonic() - last_renew > self.settings.lease_seconds / 3:
                await self._db(self.log.renew, self.settings.lease_seconds)
                last_renew = time.monotonic()
            if self.progress is not None:
                self.progress(self.snapshot())
        await self._flush()

    def snapshot(self) -> Progress:
        total = self.plan.to_send
        if self.options.limit is not None:
            total = min(total, self.options.limit)
        done = sum(self.counts.values())
        return Progress(
            done, max(total, done), Counter(self.counts), time.monotonic() - self.started
        )

    async def run(self) -> None:
        # Connect once before claiming anything, so a wrong SMTP URL or a server that is
        # down fails the whole run at once with a clear error and touches no row.
        self.first_connection = await self.transport.connect()
        done = asyncio.Event()
        recorder = asyncio.create_task(self.recorder(done))
        try:
            connections = [
                asyncio.create_task(self.connection_loop(self.first_connection if i == 0 else None))
                for i in range(self.concurrency)
            ]
            await self.produce()
            await asyncio.gather(*connections)
        finally:
            done.set()
            await recorder
            self.executor.shutdown(wait=True)


def _local_part(address: str) -> str:
    return address.rpartition("@")[0]


def _view(row: ClaimedRow) -> RecipientView:
    return RecipientView(
        id=row.recipient_id or 0,
        email=row.email or "",
        name=row.name,
        organisation=row.organisation,
        language=row.language,
        segment=row.segment,
    )


def _dkim_signer(settings: Settings) -> Any:
    if not (settings.dkim_domain and settings.dkim_selector and settings.dkim_key_file):
        return None
    from clara_mailer.compose.dkim import DkimSigner

    return DkimSigner.from_settings(settings)


def run_send(
    db: Database,
    settings: Settings,
    plan: Plan,
    options: SendOptions,
    *,
    transport: Transport | None = None,
    progress: ProgressCallback | None = None,
    handle_signals: bool = True,
    processes: int = 1,
) -> SendSummary:
    """Send what is due for ``plan`` and return what happened.

    ``processes`` > 1 starts that many worker processes in all on this machine (this one
    included), sharing the campaign through the delivery log exactly as workers on other
    machines do; each has ``options.concurrency`` connections. Ctrl-C (SIGINT) or SIGTERM
    stops claiming, lets in-flight messages finish, records them, and returns with
    ``interrupted`` set.
    """
    if processes > 1 and transport is not None:
        raise ValueError("extra processes build their transport from the settings")
    transport = transport or transport_from_settings(settings, plan.campaign.slug)
    summary = SendSummary(plan.campaign.slug, transport.description, transport.network)
    started = time.monotonic()
    _mark_started(db, plan.campaign_id)
    helpers = _HelperProcesses(settings, plan, options, processes - 1)

    def combined(snapshot: Progress) -> None:
        if progress is not None:
            snapshot.counts.update(helpers.counts())
            snapshot.done = sum(snapshot.counts.values())
            snapshot.total = max(snapshot.total, snapshot.done)
            progress(snapshot)

    async def main() -> None:
        worker = _Worker(db, settings, plan, options, transport, combined)
        loop = asyncio.get_running_loop()
        installed = []

        def stop() -> None:
            worker.stopping.set()
            helpers.stop()

        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, stop)
                    installed.append(sig)
        try:
            helpers.start()
            await worker.run()
            # This process is done; the others finish what they claimed.
            while helpers.running():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(worker.stopping.wait(), timeout=0.2)
                combined(worker.snapshot())
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            helpers.join()
            summary.counts = worker.counts + helpers.counts()
            summary.interrupted = worker.stopping.is_set() or helpers.interrupted
            combined(worker.snapshot())

    try:
        _run_async(main())
    finally:
        helpers.join()
    summary.elapsed = time.monotonic() - started
    log = DeliveryLog(db, plan.campaign_id)
    totals: Counter[str] = Counter()
    for per_status in log.status_counts().values():
        totals.update(per_status)
    summary.totals = dict(totals)
    summary.next_due = log.next_due()
    if not any(totals.get(s, 0) for s in OPEN_STATUSES):
        _mark_finished(db, plan.campaign_id)
    return summary


class _HelperProcesses:
    """Extra worker processes for ``run_send(processes=N)``; they report their counts
    through a queue so the progress bar and summary cover all of them."""

    def __init__(self, settings: Settings, plan: Plan, options: SendOptions, count: int) -> None:
        self.count = count
        self.args = (settings, plan.campaign.slug, plan.campaign_id, plan.segments, options)
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.latest: dict[int, Counter[str]] = {}
        self.interrupted = False
        self._context = multiprocessing.get_context("spawn")
        self._queue: Any = None

    def start(self) -> None:
        if not self.count:
            return
        self._queue = self._context.Queue()
        for i in range(self.count):
            process = self._context.Process(
                target=_helper_main, args=(i, *self.args, self._queue), daemon=False
            )
            process.start()
            self.processes.append(process)

    def _drain(self) -> None:
        if self._queue is None:
            return
        while True:
            try:
                index, counts, interrupted = self._queue.get_nowait()
            except queue.Empty:
                return
            self.latest[index] = Counter(counts)
            self.interrupted = self.interrupted or interrupted

    def counts(self) -> Counter[str]:
        self._drain()
        total: Counter[str] = Counter()
        for counts in self.latest.values():
            total.update(counts)
        return total

    def running(self) -> bool:
        return any(p.is_alive() for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def join(self) -> None:
        for process in self.processes:
            process.join()
        self._drain()


def _helper_main(
    index: int,
    settings: Settings,
    slug: str,
    campaign_id: int,
    segments: tuple[str, ...],
    options: SendOptions,
    updates: Any,
) -> None:
    """A helper process: one more worker on the same campaign."""
    # A terminal's Ctrl-C reaches the whole process group: each process stops cleanly.
    db = open_database(settings)
    try:
        plan = Plan(load_campaign(settings, slug), campaign_id, segments, 0, 0, 0, {})
        last = [0.0]

        def report(snapshot: Progress) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.2:
                last[0] = now
                updates.put((index, dict(snapshot.counts), False))

        summary = run_send(db, settings, plan, options, progress=report)
        updates.put((index, dict(summary.counts), summary.interrupted))
    except MailerError as exc:
        print(f"Error: worker process {index + 2}: {exc}", file=sys.stderr)
        updates.put((index, {}, True))
    finally:
        db.dispose()


def _run_async(coro: Awaitable[None]) -> None:
    try:
        import uvloop  # optional: a faster event loop where installed

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


def _mark_started(db: Database, campaign_id: int) -> None:
    with db.session() as s:
        campaign = s.get(Campaign, campaign_id)
        if campaign is not None and campaign.started_at is None:
            campaign.started_at = utcnow()


def _mark_finished(db: Database, campaign_id: int) -> None:
    with db.session() as s:
        campaign = s.get(Campaign, campaign_id)
        if campaign is not None:
            campaign.finished_at = utcnow()


# -- dry runs and test sends ----------------------------------------------------------------


@dataclass
class DryRun:
    campaign: str
    rendered: Counter[str] = field(default_factory=Counter)  # segment -> messages
    suppressed: int = 0
    problems: list[str] = field(default_factory=list)
    largest: int = 0


def dry_run(db: Database, settings: Settings, slug: str, options: SendOptions) -> DryRun:
    """Render every message the send would make, write nothing, send nothing."""
    checked = _checked_campaign(db, settings, slug, options.segments)
    defn, signer = checked.defn, checked.signer
    result = DryRun(slug)
    renderer = checked.renderer
    seen: set[int] = set()
    for segment_id, segment in checked.segments:
        after = 0
        while True:
            with db.session() as s:
                members = (
                    s.execute(
                        select(Recipient)
                        .join(recipient_segments, recipient_segments.c.recipient_id == Recipient.id)
                        .where(recipient_segments.c.segment_id == segment_id, Recipient.id > after)
                        .order_by(Recipient.id)
                        .limit(1000)
                    )
                    .scalars()
                    .all()
                )
                hashes = {m.id: signer.address_hash(m.email) for m in members}
                suppressed = active_suppressions(s, hashes.values(), defn.kind)
            if not members:
                break
            after = members[-1].id
            for m in members:
                if m.id in seen:
                    continue
                seen.add(m.id)
                if hashes[m.id] in suppressed:
                    result.suppressed += 1
                    continue
                view = RecipientView(m.id, m.email, m.name, m.organisation, m.language, segment)
                try:
                    data = renderer.render(view, smtputf8=not _local_part(m.email).isascii())
                except MailerError as exc:
                    result.problems.append(f"{m.email}: {exc}")
                    continue
                result.rendered[segment] += 1
                result.largest = max(result.largest, len(data))
    return result


def send_test(
    db: Database,
    settings: Settings,
    slug: str,
    address: str,
    segments: tuple[str, ...] = (),
    *,
    transport: Transport | None = None,
) -> list[tuple[str, str, SendResult]]:
    """Send one sample per variant (language x segment) to ``address``; log untouched."""
    checked = _checked_campaign(db, settings, slug, segments)
    defn = checked.defn
    chosen = [name for _, name in checked.segments]
    renderer = checked.renderer
    transport = transport or transport_from_settings(settings, f"{slug}-test")
    results: list[tuple[str, str, SendResult]] = []

    async def main() -> None:
        conn = await transport.connect()
        try:
            for language in defn.languages:
                for segment in chosen:
                    view = RecipientView(0, address, "", "", language, segment)
                    data = renderer.render(view, smtputf8=not _local_part(address).isascii())
                    result = await conn.send(defn.sender, address, data)
                    results.append((language, segment, result))
        finally:
            await conn.close()

    _run_async(main())
    return results


__all__ = [
    "DryRun",
    "Plan",
    "Progress",
    "SendOptions",
    "SendSummary",
    "dry_run",
    "prepare_send",
    "run_send",
    "send_test",
]
