"""The sender: one worker's share of a campaign.

``run_send`` drives one worker: a producer claims leased batches from the delivery log,
re-checks opt-outs, composes each message (per-variant preparation lives in
``compose.render``), commits ``sending`` and hands the bytes to a pool of transport
connections; a recorder writes outcomes back in small batches. Every write goes through
the delivery log; every byte through a transport. Several workers (processes, machines)
can run the same campaign at once; ``--processes N`` starts N-1 helper processes
(``sending.processes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import signal
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.compose.render import PreparedVariants, RecipientView, Renderer
from clara_mailer.core.errors import MailerError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner, verp_address
from clara_mailer.core.vocabulary import Outcome, Status
from clara_mailer.deliverylog.log import ClaimedRow, DeliveryLog, Record
from clara_mailer.plan.plan import Plan, SendOptions
from clara_mailer.sending.journal import LOCAL_JOURNALS, WorkerJournal
from clara_mailer.sending.processes import HelperProcesses, wait_for_go
from clara_mailer.store.database import Database, open_database
from clara_mailer.store.tables import utcnow
from clara_mailer.transport import Connection, SendResult, Transport, transport_from_settings
from clara_mailer.transport.base import Message, MessageChecker

if TYPE_CHECKING:
    from clara_mailer.compose.dkim import Unsigned
    from clara_mailer.sending.signing import SigningProcess

T = TypeVar("T")

#: How often outcomes are written back. Replies not written yet when the process dies
#: are in the worker journal (``sending.journal``), so this only bounds how stale the
#: progress in the database is; a commit this often costs next to nothing.
FLUSH_SECONDS = 0.05
#: Most rows marked `sending` in one transaction, and how many seconds of sending a
#: group may hold at most (see ``_group_size``).
GROUP_ROWS = 64
GROUP_SECONDS = 0.05
#: Messages rendered between two turns of the event loop: a group is rendered in
#: slices, so the connections read their replies and send meanwhile.
RENDER_SLICE = 8


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
    counts: Counter[str] = field(default_factory=Counter)  # recipients by outcome, this run
    totals: dict[str, int] = field(default_factory=dict)  # whole campaign, after the run
    next_due: dt.datetime | None = None
    interrupted: bool = False
    elapsed: float = 0.0
    #: One line per helper process that stopped on an error.
    errors: list[str] = field(default_factory=list)

    @property
    def attempted(self) -> int:
        return sum(v for k, v in self.counts.items() if k != Status.SKIPPED)


ProgressCallback = Callable[[Progress], None]


# -- the worker ---------------------------------------------------------------------------


@dataclass
class _Job:
    row: ClaimedRow
    envelope_from: str
    recipient: str
    data: Message
    address_hash: str
    message_id: str
    #: With DKIM, until signed: the signature(s) but the private-key step (the signing
    #: process does that), and the message's parts (``data`` is empty until then).
    unsigned: Unsigned | None = None
    parts: list[bytes] | None = None


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
        signer: TokenSigner,
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
        self.signer = signer
        self.renderer = plan.renderer or Renderer(
            plan.campaign, settings, self.signer, plan.campaign_id
        )
        self.dkim = _signing_process(settings)
        self.checker = MessageChecker()  # the wire's checks, once per shared part
        #: Groups rendered and committing while an earlier one is handed over: a signed
        #: group waits for the signing process before its commit, so one more goes ahead.
        self.depth = 1 if self.dkim is None else 2
        self.concurrency = max(1, options.concurrency)
        #: Rendered messages waiting for a connection: four a connection, and at least a
        #: group's worth, so that a few connections still have work while the next group
        #: is rendered (in slices: ``_render_group``).
        self.queue: asyncio.Queue[_Job | None] = asyncio.Queue(
            maxsize=max(self.concurrency * 4, GROUP_ROWS)
        )
        self.pending: list[Record] = []
        self.inflight = 0
        self.handed = 0
        self.counts: Counter[str] = Counter()  # recipients by their latest outcome
        #: Rows whose latest outcome in this run is `deferred`: the only ones that can
        #: have another (a retry in the run). Every other outcome is final, so memory
        #: does not grow with the campaign.
        self.deferred: set[int] = set()
        self.stopping = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clara-db")
        self.started = time.monotonic()
        self.delays = settings.retry_in_run_delays
        self.first_connection: Connection | None = None
        self.journal: WorkerJournal | None = None

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        """Database work runs on one thread, so the event loop keeps sending meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # producer ------------------------------------------------------------------------

    async def produce(self) -> None:
        claimed: deque[ClaimedRow] = deque()
        group_size = max(self.concurrency * 4, GROUP_ROWS)
        batch = max(group_size, self.settings.claim_batch)
        limit = self.options.limit
        rate = self.options.rate
        # Double buffering: while one group's `sending` commits on the database thread
        # (``depth`` groups when signing), the next group is rendered here; a group is
        # handed to the connections only once its commit is done.
        committing: deque[_Group] = deque()
        # At full speed (no --limit, no --rate) the next batch is claimed while the last
        # group of this one is rendered: a claim takes the database thread ~10 ms, and
        # the connections drained their queue waiting for it (~160 times in a
        # 20,000-message send, ~1 s a connection).
        ahead: asyncio.Future[list[ClaimedRow]] | None = None
        try:
            while not self.stopping.is_set():
                if limit is not None and self.handed >= limit:
                    break
                if not claimed and ahead is not None:
                    rows, ahead = await ahead, None
                    claimed.extend(rows)
                if not claimed:
                    while committing:
                        await self._hand_over(committing.popleft(), rate)
                    want = batch if limit is None else min(batch, limit - self.handed)
                    if rate:
                        want = max(1, min(want, int(rate * 2)))
                    rows = await self._next_batch(want)
                    if not rows:
                        if not await self._wait_for_more():
                            break
                        continue
                    if rate:
                        start = await self._db(self.log.reserve_rate_window, len(rows), rate)
                        await self._sleep_until(start)
                    claimed.extend(rows)
                take = min(self._group_size(), len(claimed))
                if limit is not None:
                    pending_here = sum(len(g.jobs) for g in committing)
                    take = min(take, limit - self.handed - pending_here)
                    if take <= 0:
                        break
                committing.append(
                    await self._render_group([claimed.popleft() for _ in range(take)])
                )
                if len(claimed) <= take and ahead is None and limit is None and not rate:
                    # After this group's commit on the database thread, not before it.
                    ahead = asyncio.ensure_future(self._next_batch(batch))
                while len(committing) > self.depth:
                    await self._hand_over(committing.popleft(), rate)
        finally:
            while committing:
                await self._hand_over(committing.popleft(), rate)
            if ahead is not None:
                claimed.extend(await ahead)  # claimed ahead, never rendered: released below
            if claimed:
                await self._db(self.log.release, [r.id for r in claimed])
            for _ in range(self.concurrency):
                await self.queue.put(None)

    _last_expire = 0.0

    async def _next_batch(self, want: int) -> list[ClaimedRow]:
        """Claim up to ``want`` rows; every 5 s, first give back what dead workers on this
        host leased (``expire_leases``), so that this run sends it too."""
        if time.monotonic() - self._last_expire > 5:
            await self._db(self.log.expire_leases, LOCAL_JOURNALS)
            self._last_expire = time.monotonic()
        return await self._db(self.log.claim, want, self.settings.lease_seconds)

    def _group_size(self) -> int:
        """Rows in the next group: one transaction marks them `sending`, re-checking
        opt-outs just before they go out. At full speed a group of up to ``GROUP_ROWS``
        (not 16) takes the database thread's share of the CPU down; the group never holds
        more than ``GROUP_SECONDS`` of sending at the rate so far, so an opt-out made
        during a slow or paced run still stops its message (four per connection at the
        least, as before). The size does not widen the `unknown` window: only messages
        journalled at the end of DATA without a reply can become unknown."""
        least = self.concurrency * 4
        elapsed = time.monotonic() - self.started
        if elapsed <= 0 or self.handed < least:
            return least
        return max(least, min(GROUP_ROWS, int(self.handed / elapsed * GROUP_SECONDS)))

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
        return await self._db(self.log.expire_leases, LOCAL_JOURNALS) > 0

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

    async def _render_group(self, group: list[ClaimedRow]) -> _Group:
        """Render a group and start committing it as ``sending`` (re-checking opt-outs in
        the same transaction, just before the messages go out). Every ``RENDER_SLICE``
        messages the event loop takes a turn: rendered at once, a group of up to 64 held
        the loop for its whole length, and a few connections sat with their replies
        unread."""
        now = utcnow()
        stamp = time.time()  # DKIM's t=
        jobs: list[_Job] = []
        expire = dt.timedelta(seconds=self.settings.retry_expire)
        for n, row in enumerate(group, 1):
            if not n % RENDER_SLICE:
                await asyncio.sleep(0)
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
                head, body = self.renderer.render_parts(
                    view, smtputf8=not _local_part(row.email).isascii(), message_id=message_id
                )
            except MailerError as exc:
                self._outcome(row, Status.FAILED, None, f"cannot render: {exc}", now)
                continue
            unsigned = parts = None
            if self.dkim is None:
                data = self.checker.join([head, *body])
            else:
                try:
                    unsigned = self.dkim.signer.unsigned_parts(head, body, now=stamp)
                except ValueError as exc:  # never marked `sending`: it fails alone
                    self._outcome(row, Status.FAILED, None, f"cannot sign: {exc}", now)
                    continue
                data, parts = b"", [head, *body]
            envelope_from = self.plan.campaign.sender
            if self.settings.bounce_address:
                token = self.signer.sign("b", self.plan.campaign_id, row.recipient_id)
                envelope_from = verp_address(self.settings.bounce_address, token)
            address_hash = self.signer.address_hash(row.email)
            job = _Job(
                row, envelope_from, row.email, data, address_hash, message_id, unsigned, parts
            )
            jobs.append(job)
        if self.dkim is not None:  # signed in the signing process first, then committed
            return _Group(jobs, asyncio.ensure_future(self._sign_and_commit(self.dkim, jobs)))
        commit = asyncio.ensure_future(
            self._db(
                self.log.mark_sending,
                [(j.row.id, j.message_id, j.address_hash) for j in jobs],
                self.plan.campaign.kind,
            )
        )
        return _Group(jobs, commit)

    async def _sign_and_commit(self, signing: SigningProcess, jobs: list[_Job]) -> dict[str, str]:
        """Sign a rendered group in the signing process, then commit it as ``sending``
        (what ``_render_group`` does unsigned); the event loop keeps sending meanwhile."""
        digests = [d for job in jobs if job.unsigned for d in job.unsigned.digests]
        signatures = iter(await signing.sign(digests))
        for job in jobs:
            assert job.unsigned is not None and job.parts is not None
            keys = len(job.unsigned.digests)
            headers = job.unsigned.complete([next(signatures) for _ in range(keys)])
            job.data = self.checker.join([headers, *job.parts])
            job.unsigned = job.parts = None
        return await self._db(
            self.log.mark_sending,
            [(j.row.id, j.message_id, j.address_hash) for j in jobs],
            self.plan.campaign.kind,
        )

    # connections ---------------------------------------------------------------------

    async def connection_loop(self, first: Connection | None) -> None:
        """One connection: takes jobs from the queue and sends them. Over SMTP with
        PIPELINING a job's end of DATA is answered while the next job's envelope is on
        its way (``Connection.send_chained``); when the queue is empty, the reply still
        owed is read at once, so no outcome waits for more work."""
        conn = first
        backoff = 0.0
        broken = False  # an outcome said the session is unusable

        def settled(job: _Job, result: SendResult) -> None:
            nonlocal broken
            self._result(job, result)
            broken = broken or result.connection_broken

        async def back_off_if_broken() -> None:
            # 421 and dropped connections back off the whole connection.
            nonlocal conn, broken, backoff
            if not broken:
                return
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            conn, broken = None, False
            backoff = min(max(1.0, backoff * 2), 60.0)
            await self._sleep(backoff)

        while True:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                if conn is not None:
                    await conn.settle()
                    await back_off_if_broken()
                job = await self.queue.get()
            if job is None:
                break
            if self.stopping.is_set():
                # Stopping: what is not on the wire yet goes back to the queue, untouched.
                self.inflight -= 1
                self.pending.append(
                    Record(job.row.id, Status.QUEUED, None, "", utcnow(), None, False)
                )
                continue
            if conn is None:
                try:
                    conn = await self.transport.connect()
                except MailerError as exc:
                    result = SendResult(Outcome.DEFERRED, 0, f"cannot connect: {exc}", True)
                    self._result(job, result)
                    backoff = min(max(1.0, backoff * 2), 60.0)
                    await self._sleep(backoff)
                    continue
            hook = None
            if self.journal is not None and self.journal.active:
                hook = functools.partial(self.journal.end_of_data, job.row.id)
            await conn.send_chained(
                job.envelope_from, job.recipient, job.data, functools.partial(settled, job), hook
            )
            if broken:
                await back_off_if_broken()
            else:
                backoff = 0.0
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()  # settles the last outcome first

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    def _result(self, job: _Job, result: SendResult) -> None:
        now = utcnow()
        self.inflight -= 1
        reply = f"{result.code} {result.reply}".strip() if result.code else result.reply
        code = result.code or None
        retry_at = None
        if result.outcome == Outcome.SENT:
            status = Status.SENT
        elif result.outcome == Outcome.FAILED:
            status = Status.FAILED
        elif result.outcome == Outcome.UNKNOWN:
            self._outcome(job.row, Status.UNKNOWN, code, reply, now)
            return  # no reply: the journal's end of DATA says as much
        else:
            attempts = job.row.attempts + 1
            first = job.row.first_attempt_at or now
            retry_at = now + dt.timedelta(seconds=self._delay(attempts))
            # Give up when the next try would fall after the retry period (Postfix's
            # maximal_queue_lifetime): a newsletter goes stale.
            if retry_at > first + dt.timedelta(seconds=self.settings.retry_expire):
                status, reply, retry_at = Status.FAILED, f"gave up after retries: {reply}", None
            else:
                status = Status.DEFERRED
        self._outcome(job.row, status, code, reply, now, next_attempt_at=retry_at)
        if self.journal is not None:
            # The reply to an end of DATA, kept until the batch below is committed.
            self.journal.reply(job.row.id, status, result.code)

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
        self.pending.append(Record(row.id, status, code, reply, at, next_attempt_at, attempt))
        # Counts are per recipient: a row deferred and then sent in this run is one "sent".
        if row.id in self.deferred:
            self.deferred.discard(row.id)
            self.counts[Status.DEFERRED] -= 1
            if self.counts[Status.DEFERRED] <= 0:
                del self.counts[Status.DEFERRED]
        if status == Status.DEFERRED:
            self.deferred.add(row.id)
        self.counts[status] += 1

    # recorder and housekeeping -------------------------------------------------------

    async def _flush(self) -> None:
        if self.journal is not None:
            self.journal.flush()  # the replies no end of DATA has carried yet
        if self.pending:
            batch, self.pending = self.pending, []
            await self._db(self.log.record, batch)
            if self.journal is not None:
                self.journal.committed([r.delivery_id for r in batch])

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
        # Before the first row is `sending`: what this worker puts on the wire, kept
        # where a kill -9 cannot lose it (None: cannot be kept; a crash then leaves its
        # rows in flight `unknown`, as without one).
        self.journal = WorkerJournal.create(self.log.worker_id, db=self.log.db)
        done = asyncio.Event()
        recorder = asyncio.create_task(self.recorder(done))
        clean = False
        try:
            connections = [
                asyncio.create_task(self.connection_loop(self.first_connection if i == 0 else None))
                for i in range(self.concurrency)
            ]
            await self.produce()
            await asyncio.gather(*connections)
            clean = True
        finally:
            done.set()
            try:
                await recorder
            except BaseException:
                clean = False
                raise
            finally:
                self.executor.shutdown(wait=True)
                if self.dkim is not None:
                    self.dkim.close()
                if self.journal is not None:
                    # Every outcome committed: the journal is obsolete. Otherwise keep
                    # it for whoever settles this worker's rows once its process is gone.
                    self.journal.close(remove=clean and not self.pending)


def _local_part(address: str) -> str:
    return address.rpartition("@")[0]


def _view(row: ClaimedRow) -> RecipientView:
    return RecipientView(
        id=row.recipient_id or 0,
        email=row.email or "",
        name=row.name,
        organisation=row.organisation,
        consent_source=row.consent_source,
        language=row.language,
        segment=row.segment,
    )


def _signing_process(settings: Settings) -> SigningProcess | None:
    if not (settings.dkim_domain and settings.dkim_selector and settings.dkim_key_file):
        return None
    from clara_mailer.compose.dkim import DkimSigner
    from clara_mailer.sending.signing import SigningProcess

    signer = DkimSigner.from_settings(settings)
    return None if signer is None else SigningProcess(signer)


def start_helpers(
    settings: Settings, signer: TokenSigner, slug: str, options: SendOptions, count: int
) -> HelperProcesses:
    """Start ``count`` helper processes for a send of ``slug``: they load their modules
    and open the database now, and wait to be handed the campaign (by
    ``hand_over_when_planned`` once the plan's first rows are committed, or by
    ``run_send``). Leaving the ``with`` block before that ends them untouched."""
    helpers = HelperProcesses(_helper_main, (settings, signer, slug, options), count)
    helpers.start()
    return helpers


def hand_over_when_planned(
    helpers: HelperProcesses, renderer: Renderer | None
) -> Callable[[int, tuple[str, ...]], None]:
    """For ``commit_plan(planned=...)``: hand the helpers the campaign (and the variants
    ``renderer`` holds, this process's check) as soon as its first rows are committed,
    so that they send while the rest of the plan is written. A helper that finds
    nothing left to claim before the plan is complete ends early; this process sends
    the rest (``run_send``)."""

    def planned(campaign_id: int, segments: tuple[str, ...]) -> None:
        # The helpers send the variants this process checked (and skip inlining their
        # CSS). Only the first hand-over reaches them (``HelperProcesses.go``).
        if helpers.waiting():
            helpers.go(campaign_id, segments, renderer.prepared() if renderer else {})

    return planned


def run_send(
    db: Database,
    settings: Settings,
    signer: TokenSigner,
    plan: Plan,
    options: SendOptions,
    *,
    transport: Transport | None = None,
    progress: ProgressCallback | None = None,
    handle_signals: bool = True,
    processes: int = 1,
    helpers: HelperProcesses | None = None,
) -> SendSummary:
    """Send what is due for ``plan`` and return what happened.

    ``processes`` > 1 starts that many worker processes in all on this machine (this one
    included), sharing the campaign through the delivery log exactly as workers on other
    machines do; each has ``options.concurrency`` connections. ``helpers``: those extra
    processes, already started by ``start_helpers`` (then ``processes`` is ignored).
    Ctrl-C (SIGINT) or SIGTERM stops claiming, lets in-flight messages finish, records
    them, and returns with ``interrupted`` set.
    """
    if helpers is None:
        helpers = HelperProcesses(
            _helper_main, (settings, signer, plan.campaign.slug, options), processes - 1
        )
    if helpers.count and transport is not None:
        raise ValueError("extra processes build their transport from the settings")
    transport = transport or transport_from_settings(settings, plan.campaign.slug)
    summary = SendSummary(plan.campaign.slug, transport.description, transport.network)
    started = time.monotonic()
    log = DeliveryLog(db, plan.campaign_id)
    log.mark_started()

    def combined(snapshot: Progress) -> None:
        if progress is not None:
            snapshot.counts.update(helpers.counts())
            snapshot.done = sum(snapshot.counts.values())
            snapshot.total = max(snapshot.total, snapshot.done)
            progress(snapshot)

    async def main() -> None:
        worker = _Worker(db, settings, signer, plan, options, transport, combined)
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
            helpers.start()  # no-op when already started, or for none
            hand_over_when_planned(helpers, plan.renderer)(plan.campaign_id, plan.segments)
            await worker.run()
            # This process is done; the others finish what they claimed.
            await _wait_for_helpers(helpers, lambda: combined(worker.snapshot()))
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
            helpers.join()
            summary.counts = worker.counts + helpers.counts()
            summary.interrupted = worker.stopping.is_set() or helpers.interrupted
            summary.errors = helpers.errors
            combined(worker.snapshot())

    try:
        run_async(main())
    finally:
        helpers.join()
    summary.elapsed = time.monotonic() - started
    totals: Counter[str] = Counter()
    for per_status in log.status_counts().values():
        totals.update(per_status)
    summary.totals = dict(totals)
    summary.next_due = log.next_due()
    log.finish_if_done()
    return summary


async def _wait_for_helpers(helpers: HelperProcesses, tick: Callable[[], None]) -> None:
    """Until every helper has ended: woken the moment one does (its sentinel), and every
    0.2 s for the progress (``tick``)."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()
    sentinels = helpers.sentinels()
    for fd in sentinels:
        loop.add_reader(fd, ended.set)
    try:
        while helpers.running():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), timeout=0.2)
            ended.clear()
            tick()
    finally:
        for fd in sentinels:
            loop.remove_reader(fd)


def _helper_main(
    index: int,
    settings: Settings,
    signer: TokenSigner,
    slug: str,
    options: SendOptions,
    go: Any,
    updates: Any,
) -> None:
    """A helper process: one more worker on the same campaign. It opens the database and
    loads the campaign, then waits for the parent's ``go`` (``sending.processes``): the
    campaign's id, its segments and the variants the parent prepared."""
    db = open_database(settings)
    try:
        defn = load_campaign(settings, slug)
        updates.put((index, {}, False, None))  # loaded (``HelperProcesses.ready``)
        handed: tuple[int, tuple[str, ...], PreparedVariants] | None = wait_for_go(go)
        if handed is None:  # the parent cancelled before its send began
            return
        campaign_id, segments, variants = handed
        renderer = Renderer(defn, settings, signer, campaign_id)
        renderer.adopt(variants)
        # What is loaded by now (modules, the database layer, the variants) lives as
        # long as this process, which ends with the send: out of the collector's passes.
        gc.freeze()
        plan = Plan(defn, campaign_id, segments, 0, 0, 0, {}, renderer=renderer)
        last = [0.0]

        def report(snapshot: Progress) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.2:
                last[0] = now
                updates.put((index, dict(snapshot.counts), False, None))

        summary = run_send(db, settings, signer, plan, options, progress=report)
        updates.put((index, dict(summary.counts), summary.interrupted, None))
    except MailerError as exc:
        updates.put((index, {}, True, f"worker process {index + 2}: {exc}"))
    finally:
        db.dispose()


def run_async(coro: Awaitable[None]) -> None:
    try:
        import uvloop  # optional: a faster event loop where installed

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
