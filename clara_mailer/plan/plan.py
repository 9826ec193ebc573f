"""The plan: what a send will do, decided before anything is composed or sent.

``checked_campaign`` loads the campaign, resolves its segments and renders every variant
once (the check: nothing goes out if it fails); ``prepare_send`` then has the delivery
log create the rows for the chosen segments (idempotent: a rerun adds only newcomers)
and returns the ``Plan``. It is ``preview_plan`` (read-only: what the rows would be, the
figures a shell shows before asking to go ahead) followed by ``commit_plan`` (the
writes), so a send declined at its prompt leaves no trace. ``dry_run`` renders every
message the send would make and writes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import ColumnElement, select

from clara_mailer.compose.campaigns import CampaignDef, load_campaign, template_hash
from clara_mailer.compose.checking import CheckRun
from clara_mailer.compose.render import (
    FOOTER_SETTINGS,
    RecipientView,
    Renderer,
    check_campaign,
)
from clara_mailer.core.errors import CheckFailed, MailerError, NotFound, SendError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import Status
from clara_mailer.deliverylog.log import (
    DeliveryLog,
    campaign_id_of,
    check_templates,
    open_campaign,
    segment_ids,
)
from clara_mailer.optouts.suppressions import active_suppressions
from clara_mailer.plan.filters import member_conditions, parse_filters
from clara_mailer.store import tables
from clara_mailer.store.database import Database
from clara_mailer.store.tables import recipient_segments

#: The tables' columns: the plan reads with SQLAlchemy Core, so a send loads no ORM.
Recipient = tables.recipients.c
Segment = tables.segments.c


@dataclass(frozen=True)
class SendOptions:
    segments: tuple[str, ...] = ()
    limit: int | None = None
    concurrency: int = 4
    rate: float | None = None  # messages per second, for the whole campaign
    resend_unknown: bool = False
    allow_changed_templates: bool = False
    worker_id: str | None = None
    #: ``send --where`` filters (``plan.filters``) and ``--exclude-segment``: who of the
    #: segments' members gets a row (rows planned before stay as they are).
    where: tuple[str, ...] = ()
    exclude_segments: tuple[str, ...] = ()


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
    #: True for ``preview_plan``'s figures: nothing written yet, ``commit_plan`` next.
    preview: bool = False
    #: segment -> (rows to add as queued, rows to add as skipped); preview only.
    new_rows: dict[str, tuple[int, int]] = field(default_factory=dict)

    def total(self, *statuses: str) -> int:
        return sum(c.get(s, 0) for c in self.counts.values() for s in statuses)

    @property
    def to_send(self) -> int:
        return self.total(Status.QUEUED, Status.DEFERRED)


@dataclass(frozen=True)
class CheckedCampaign:
    defn: CampaignDef
    segments: list[tuple[int, str]]  # (segment id, slug), in the order asked for
    campaign_id: int  # 0 while the campaign has no delivery log
    renderer: Renderer  # variants already prepared by the check


def checked_campaign(
    db: Database,
    settings: Settings,
    signer: TokenSigner,
    slug: str,
    segments: tuple[str, ...],
    *,
    real_send: bool = False,
    check: CheckRun | None = None,
) -> CheckedCampaign:
    """Load and check the campaign and resolve its segments: what every send path needs
    before it renders anything.

    ``check``: the check of this campaign and these segments, already running in a
    process of its own (``compose.checking``); its prepared variants are adopted.
    Without it, the check runs here.

    ``real_send``: the caller delivers to the campaign's recipients (not a dry run, not
    a test sample). Over SMTP (``settings.smtp_url`` set) that is refused, before anything
    is written or sent, while a setting of the legal footer is empty; to the outbox it is
    not (the shells show ``campaign_warnings`` instead)."""
    defn = load_campaign(settings, slug)
    missing = [name for name in FOOTER_SETTINGS if not getattr(settings, name)]
    if real_send and settings.smtp_url and missing:
        raise SendError(
            f"refusing to send {slug!r} over SMTP: the legal footer setting(s) "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} empty; "
            "set them in clara-mail.toml or as "
            f"{', '.join(f'CLARA_{name.upper()}' for name in missing)} "
            "(without smtp_url, send writes to the outbox; --test-to and --dry-run only warn)"
        )
    chosen = segments or defn.default_segments
    if not chosen:
        raise SendError(f"campaign {slug!r} names no default segments: pass --segment")
    with db.writing() as s:
        ids = segment_ids(s, chosen)
        missing = [name for name in chosen if name not in {n for _, n in ids}]
        if missing:
            known = ", ".join(s.scalars(select(Segment.slug).order_by(Segment.slug)))
            raise NotFound(f"unknown segment {missing[0]!r} (known: {known})")
    campaign_id = campaign_id_of(db, defn.slug)
    # The check prepares the variants of the chosen segments; the send then reuses them
    # from this renderer (a variant it meets that is not there is prepared on first use).
    renderer = Renderer(defn, settings, signer, campaign_id)
    if check is not None and (check.slug, check.segments) == (slug, segments):
        problems, variants = check.result()
        renderer.adopt(variants)
    else:
        problems = check_campaign(settings, slug, renderer, chosen)
    if problems:
        raise CheckFailed(slug, problems)
    return CheckedCampaign(defn, ids, campaign_id, renderer)


def prepare_send(
    db: Database, settings: Settings, signer: TokenSigner, slug: str, options: SendOptions
) -> Plan:
    """Check the campaign, then create the delivery rows for the chosen segments."""
    checked = checked_campaign(db, settings, signer, slug, options.segments, real_send=True)
    return _commit(db, signer, checked, options)


def preview_plan(
    db: Database,
    settings: Settings,
    signer: TokenSigner,
    slug: str,
    options: SendOptions,
    check: CheckRun | None = None,
) -> Plan:
    """What ``prepare_send`` would do, written nowhere: the rows it would add per segment
    (queued, skipped as suppressed), the rows already there, and the resulting counts.
    Raises what the commit would raise (changed templates) before anyone is asked."""
    checked = checked_campaign(
        db, settings, signer, slug, options.segments, real_send=True, check=check
    )
    defn = checked.defn
    check_templates(
        db, defn.slug, template_hash(defn), allow_changed_templates=options.allow_changed_templates
    )
    names = [name for _, name in checked.segments]
    log = DeliveryLog(db, checked.campaign_id, options.worker_id)
    planned = log.preview_plan(checked.segments, signer, defn.kind, _where(db, options))
    counts = log.status_counts(names) if checked.campaign_id else {}
    requeued = 0
    if options.resend_unknown:
        for per_status in counts.values():
            unknown = per_status.pop(Status.UNKNOWN, 0)
            if unknown:
                per_status[Status.QUEUED] = per_status.get(Status.QUEUED, 0) + unknown
                requeued += unknown
    for name, (added, skipped) in planned.per_segment.items():
        per_status = counts.setdefault(name, {})
        for status, extra in ((Status.QUEUED, added), (Status.SKIPPED, skipped)):
            if extra:
                per_status[status] = per_status.get(status, 0) + extra
    return Plan(
        campaign=defn,
        campaign_id=checked.campaign_id,
        segments=tuple(names),
        added=planned.added,
        skipped=planned.skipped,
        requeued_unknown=requeued,
        counts=counts,
        renderer=checked.renderer,
        preview=True,
        new_rows=planned.per_segment,
    )


#: ``commit_plan``'s ``planned``: called with the campaign's id and segments once its
#: first rows are committed.
Planned = Callable[[int, tuple[str, ...]], None]


def commit_plan(
    db: Database,
    settings: Settings,
    signer: TokenSigner,
    plan: Plan,
    options: SendOptions,
    *,
    planned: Planned | None = None,
) -> Plan:
    """Write what ``preview_plan`` showed (the campaign row and the delivery rows) and
    return the plan as committed; the figures are the database's (a recipient imported
    meanwhile is included).

    ``planned`` is called once, as soon as the first chunk of rows is committed (not at
    all when the plan adds none): other workers can send those while the rest is
    written (``sending.worker.hand_over_when_planned``)."""
    if not plan.preview:
        return plan
    with db.writing() as s:
        ids = segment_ids(s, plan.segments)
    if len(ids) != len(plan.segments) or plan.renderer is None:  # a segment went meanwhile
        checked = checked_campaign(
            db, settings, signer, plan.campaign.slug, options.segments, real_send=True
        )
    else:  # the campaign was checked by the preview: its renderer is reused
        checked = CheckedCampaign(plan.campaign, ids, plan.campaign_id, plan.renderer)
    return _commit(db, signer, checked, options, planned)


def _commit(
    db: Database,
    signer: TokenSigner,
    checked: CheckedCampaign,
    options: SendOptions,
    planned: Planned | None = None,
) -> Plan:
    defn = checked.defn
    campaign_id = open_campaign(
        db,
        defn.slug,
        defn.kind,
        template_hash(defn),
        rate=options.rate,
        allow_changed_templates=options.allow_changed_templates,
    )
    log = DeliveryLog(db, campaign_id, options.worker_id)
    segments = tuple(name for _, name in checked.segments)
    told = False

    def committed() -> None:  # after each chunk: tell ``planned`` after the first
        nonlocal told
        if planned is not None and not told:
            told = True
            planned(campaign_id, segments)

    counts = log.plan(checked.segments, signer, defn.kind, _where(db, options), committed)
    requeued = log.requeue_unknown() if options.resend_unknown else 0
    return Plan(
        campaign=defn,
        campaign_id=campaign_id,
        segments=segments,
        added=counts.added,
        skipped=counts.skipped,
        requeued_unknown=requeued,
        counts=log.status_counts([name for _, name in checked.segments]),
        renderer=checked.renderer.for_campaign(campaign_id),
    )


def _where(db: Database, options: SendOptions) -> list[ColumnElement[bool]]:
    """The member conditions of ``options.where`` and ``options.exclude_segments``."""
    if not options.where and not options.exclude_segments:
        return []
    filters = parse_filters(options.where)
    with db.writing() as s:
        return member_conditions(s, filters, options.exclude_segments)


# -- dry runs ----------------------------------------------------------------------


@dataclass
class DryRun:
    campaign: str
    rendered: Counter[str] = field(default_factory=Counter)  # segment -> messages
    #: The segments taken, in order (those with no message rendered too).
    segments: tuple[str, ...] = ()
    suppressed: int = 0
    problems: list[str] = field(default_factory=list)
    largest: int = 0


def dry_run(
    db: Database, settings: Settings, signer: TokenSigner, slug: str, options: SendOptions
) -> DryRun:
    """Render every message the send would make, write nothing, send nothing."""
    checked = checked_campaign(db, settings, signer, slug, options.segments)
    defn = checked.defn
    result = DryRun(slug, segments=tuple(name for _, name in checked.segments))
    where = _where(db, options)
    renderer = checked.renderer
    seen: set[int] = set()
    for segment_id, segment in checked.segments:
        after = 0
        while True:
            with db.writing() as s:
                members = s.execute(
                    select(tables.recipients)
                    .join(recipient_segments, recipient_segments.c.recipient_id == Recipient.id)
                    .where(
                        recipient_segments.c.segment_id == segment_id,
                        Recipient.id > after,
                        *where,
                    )
                    .order_by(Recipient.id)
                    .limit(1000)
                ).all()
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
                view = RecipientView(
                    m.id, m.email, m.name, m.organisation, m.language, segment, m.consent_source
                )
                try:
                    data = renderer.render(view, smtputf8=not m.email.rpartition("@")[0].isascii())
                except MailerError as exc:
                    result.problems.append(f"{m.email}: {exc}")
                    continue
                result.rendered[segment] += 1
                result.largest = max(result.largest, len(data))
    return result
