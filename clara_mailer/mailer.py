"""The front door: one ``Mailer`` holds the settings, the database and the token signer,
and every shell (the CLI, the web app), the benchmarks and the tests reach the library
through it. It opens the database and derives the signer lazily, once.

::

    with Mailer(load_settings()) as mailer:
        mailer.import_files([Path("recipients/local-police.csv")])
        plan = mailer.plan("newsletter-2022-01", SendOptions(segments=("local-police",)))
        summary = mailer.send(plan)
        report = mailer.report("newsletter-2022-01")

Each method is one call into the pipeline (registry -> plan -> compose -> transport ->
delivery log -> report) and returns data; presenting it is the shell's business.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.store.database import Database, open_database

if TYPE_CHECKING:  # the heavier packages are imported by the methods that use them
    from clara_mailer.audience.subscribe import Confirmation, SubscribeRequest, SubscribeTokens
    from clara_mailer.bounces.apply import BounceReport
    from clara_mailer.bounces.mailboxes import BounceSource
    from clara_mailer.plan.plan import DryRun, Plan, SendOptions
    from clara_mailer.privacy.gdpr import Erasure
    from clara_mailer.registry.importer import ImportOptions, ImportProgress, ImportReport
    from clara_mailer.registry.manage import Removal
    from clara_mailer.reporting.report import CampaignReport
    from clara_mailer.sending.processes import HelperProcesses
    from clara_mailer.sending.worker import ProgressCallback, SendSummary
    from clara_mailer.store.models import Suppression
    from clara_mailer.transport import SendResult, Transport


class Mailer:
    """clara-mail for one set of settings."""

    def __init__(
        self, settings: Settings, *, database: Database | None = None, check_schema: bool = True
    ) -> None:
        self.settings = settings
        self._check_schema = check_schema
        if database is not None:  # one already open (a test's, or a worker process's)
            self.db = database

    # -- what everything needs --------------------------------------------------------------

    @cached_property
    def db(self) -> Database:
        """The database, opened on first use (created when new, refused when outdated)."""
        return open_database(self.settings, check=self._check_schema)

    @cached_property
    def signer(self) -> TokenSigner:
        """Signs and checks every token (unsubscribe, RSVP, VERP) and keys address hashes."""
        return TokenSigner(self.db.secret_key(self.settings))

    def close(self) -> None:
        if "db" in self.__dict__:
            self.db.dispose()

    def __enter__(self) -> Mailer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- registry ---------------------------------------------------------------------------

    def import_files(
        self,
        paths: Sequence[Path],
        options: ImportOptions | None = None,
        progress: ImportProgress | None = None,
    ) -> list[ImportReport]:
        from clara_mailer.registry.importer import ImportOptions, import_files

        return import_files(
            self.db, self.settings, self.signer, paths, options or ImportOptions(), progress
        )

    def segments(self) -> list[dict[str, Any]]:
        from clara_mailer.registry.recipients import list_segments

        return list_segments(self.db)

    def recipients(self, segment: str | None = None) -> list[dict[str, Any]]:
        from clara_mailer.registry.recipients import list_recipients

        return list_recipients(self.db, segment)

    def recipient(self, address: str) -> dict[str, Any]:
        from clara_mailer.audience.subscribe import consent_summary
        from clara_mailer.registry.recipients import show_recipient

        data = show_recipient(self.db, address)
        records = self.consent_records(address)
        if records:  # confirmed subscriptions (the web form's double opt-in)
            data["consent_record"] = consent_summary(records)
        return data

    def add_recipient(self, address: str, **fields: Any) -> dict[str, Any]:
        """One address into the registry (``registry.manage.add_recipient``'s fields)."""
        from clara_mailer.registry.manage import add_recipient

        return add_recipient(self.db, self.signer, address, **fields)

    def edit_recipient(self, address: str, **changes: Any) -> dict[str, Any]:
        from clara_mailer.registry.manage import edit_recipient

        return edit_recipient(self.db, address, **changes)

    def remove_recipient(self, address: str) -> Removal:
        """Out of the registry; not an erasure (suppressions and deliveries untouched)."""
        from clara_mailer.registry.manage import remove_recipient

        return remove_recipient(self.db, address)

    def create_segment(self, slug: str, name: str = "") -> dict[str, Any]:
        from clara_mailer.registry.manage import create_segment

        return create_segment(self.db, slug, name)

    def rename_segment(
        self, slug: str, new_slug: str | None = None, name: str | None = None
    ) -> dict[str, Any]:
        from clara_mailer.registry.manage import rename_segment

        return rename_segment(self.db, slug, new_slug, name)

    def delete_segment(self, slug: str, *, force: bool = False) -> int:
        """Memberships dropped; a segment with members needs ``force``."""
        from clara_mailer.registry.manage import delete_segment

        return delete_segment(self.db, slug, force=force)

    # -- campaigns --------------------------------------------------------------------------

    def campaigns(self) -> list[dict[str, Any]]:
        """Every campaign defined, with its delivery-log figures when it has any."""
        from clara_mailer.compose.campaigns import campaign_rows
        from clara_mailer.reporting.report import campaign_overview, merge_overview

        return merge_overview(
            campaign_rows(self.settings), campaign_overview(self.db, self.settings)
        )

    def check(self, slug: str) -> list[str]:
        """Every problem of the campaign's variants, as ``file:line: problem`` lines."""
        from clara_mailer.compose.render import check_campaign

        return check_campaign(self.settings, slug)

    def warnings(self, slug: str, now: dt.datetime | None = None) -> list[str]:
        """What the campaign would go out with but should not (an invitation's venue not
        set or its event past, each empty legal-footer setting), one line each; ``now``
        defaults to the current time."""
        from clara_mailer.compose.campaigns import load_campaign
        from clara_mailer.compose.render import campaign_warnings

        defn = load_campaign(self.settings, slug)
        return campaign_warnings(self.settings, defn, now or dt.datetime.now(dt.UTC))

    def preview(
        self,
        slug: str,
        *,
        address: str | None = None,
        language: str | None = None,
        segment: str | None = None,
        fmt: str = "html",
    ) -> bytes:
        from clara_mailer.plan.preview import preview

        return preview(
            self.db,
            self.settings,
            self.signer,
            slug,
            address=address,
            language=language,
            segment=segment,
            fmt=fmt,
        )

    def author_preview(
        self, slug: str, *, language: str = "es", segment: str = ""
    ) -> dict[str, Any]:
        """What an author sees while writing, without the database: ``check``'s problems
        (``{"problems": [...]}``), else a sample recipient's message as ``subject``,
        ``headers`` (text), ``text`` and ``html`` (with ``problems`` empty)."""
        import dataclasses

        from clara_mailer.compose.campaigns import load_campaign
        from clara_mailer.compose.render import (
            SAMPLE,
            Renderer,
            check_campaign,
            message_parts,
            parse_message,
        )
        from clara_mailer.core.errors import MailerError

        problems = check_campaign(self.settings, slug)
        if problems:
            return {"problems": problems}
        signer = TokenSigner(self.settings.secret_key or "preview only: these are never sent")
        try:
            renderer = Renderer(load_campaign(self.settings, slug), self.settings, signer, 0)
            sample = dataclasses.replace(SAMPLE, language=language, segment=segment)
            message = renderer.render(sample)
        except MailerError as exc:
            return {"problems": [str(exc)]}
        text, html = message_parts(message)
        head = message.split(b"\r\n\r\n", 1)[0].decode("utf-8").replace("\r\n", "\n")
        return {
            "problems": [],
            "subject": str(parse_message(message)["Subject"]),
            "headers": head,
            "text": text,
            "html": html,
        }

    # -- plan and send ------------------------------------------------------------------------

    def plan(self, slug: str, options: SendOptions) -> Plan:
        from clara_mailer.plan.plan import prepare_send

        return prepare_send(self.db, self.settings, self.signer, slug, options)

    def dry_run(self, slug: str, options: SendOptions) -> DryRun:
        from clara_mailer.plan.plan import dry_run

        return dry_run(self.db, self.settings, self.signer, slug, options)

    def send(
        self,
        plan: Plan,
        options: SendOptions | None = None,
        *,
        transport: Transport | None = None,
        progress: ProgressCallback | None = None,
        processes: int = 1,
        helpers: HelperProcesses | None = None,
        handle_signals: bool = True,
    ) -> SendSummary:
        """Send ``plan``; with ``processes`` > 1, that many sender processes in all, or
        those ``start_helpers`` started beside this one (``helpers``)."""
        from clara_mailer.plan.plan import SendOptions
        from clara_mailer.sending.worker import run_send

        return run_send(
            self.db,
            self.settings,
            self.signer,
            plan,
            options or SendOptions(),
            transport=transport,
            progress=progress,
            processes=processes,
            helpers=helpers,
            handle_signals=handle_signals,
        )

    def start_helpers(self, slug: str, options: SendOptions, count: int) -> HelperProcesses:
        """Start ``count`` more sender processes for a send of ``slug`` before its plan is
        written (they load meanwhile); pass them to ``send``. Use as a context manager:
        leaving it without a send ends them."""
        from clara_mailer.sending.worker import start_helpers

        return start_helpers(self.settings, self.signer, slug, options, count)

    def send_test(
        self,
        slug: str,
        address: str,
        segments: tuple[str, ...] = (),
        *,
        transport: Transport | None = None,
    ) -> list[tuple[str, str, SendResult]]:
        from clara_mailer.sending.samples import send_test

        return send_test(
            self.db, self.settings, self.signer, slug, address, segments, transport=transport
        )

    # -- opt-outs and privacy --------------------------------------------------------------

    def optout_add(
        self, address: str, *, reason: str, scope: str, note: str = ""
    ) -> tuple[Suppression, bool]:
        from clara_mailer.optouts import suppressions

        with self.db.session() as session:
            row, new = suppressions.add(
                session, self.signer, address, reason=reason, scope=scope, note=note
            )
        return row, new  # still readable: sessions keep values after commit

    def optouts(self) -> list[dict[str, Any]]:
        from clara_mailer.optouts import suppressions

        with self.db.session() as session:
            return suppressions.list_suppressions(session)

    def optout_remove(self, address: str, *, note: str) -> list[Suppression]:
        from clara_mailer.optouts import suppressions

        with self.db.session() as session:
            return suppressions.lift(session, self.signer, address, note=note)

    def erase(self, address: str) -> Erasure:
        from clara_mailer.privacy.gdpr import erase

        return erase(self.db, self.signer, address)

    def export_data(self, address: str) -> dict[str, Any]:
        from clara_mailer.privacy.gdpr import export_data

        data = export_data(self.db, self.signer, address)
        data["consent_records"] = self.consent_records(address, with_text=True)
        return data

    # -- bounces ------------------------------------------------------------------------------

    def import_bounces(
        self, source: BounceSource, *, dry_run: bool = False, campaign: str | None = None
    ) -> BounceReport:
        from clara_mailer.bounces.apply import import_bounces

        return import_bounces(
            self.db, self.settings, self.signer, source, dry_run=dry_run, campaign=campaign
        )

    # -- reports ------------------------------------------------------------------------------

    def report(self, slug: str, *, segment: str | None = None) -> CampaignReport:
        """Every figure of one campaign's delivery log (``report``'s figures)."""
        from clara_mailer.reporting.report import build_report

        return build_report(self.db, slug, segment=segment)

    def report_rows(
        self, slug: str, *, segment: str | None = None, status: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """One dict per delivery (``report --status``'s listing), streamed."""
        from clara_mailer.reporting.report import delivery_rows

        return delivery_rows(self.db, slug, segment=segment, status=status)

    def write_report(
        self,
        stream: IO[str],
        slug: str,
        fmt: str,
        *,
        segment: str | None = None,
        status: str | None = None,
    ) -> None:
        """``report --format csv|json|html`` (with ``--segment``, ``--status``) written to
        ``stream``: the same functions, so the same text as the command's."""
        from clara_mailer.core.errors import InputError
        from clara_mailer.reporting.exports import write_deliveries_csv, write_json
        from clara_mailer.reporting.html import render_html
        from clara_mailer.reporting.report import (
            build_report,
            check_scope,
            delivery_rows,
            parse_status,
        )

        if fmt not in ("csv", "json", "html"):
            raise InputError(f"unknown format {fmt!r} (one of: csv, json, html)")
        wanted = parse_status(status) if status is not None else None
        rows = delivery_rows(self.db, slug, segment=segment, status=wanted)
        if fmt == "csv":
            check_scope(self.db, slug, segment)
            write_deliveries_csv(stream, rows)
            return
        report = build_report(self.db, slug, segment=segment)
        listed = rows if wanted is not None else None
        if fmt == "json":
            write_json(stream, report, listed)
        else:
            stream.write(render_html(report, listed))

    def campaign_states(self) -> list[dict[str, Any]]:
        """``campaigns`` with each one's ``state``: planned (no delivery log), sending
        (messages queued or in flight), scheduled (only retries left, due later or now),
        finished (nothing left to do)."""
        rows = self.campaigns()
        for row in rows:
            row["state"] = campaign_state(row)
        return rows

    # -- the dashboard: recipients -------------------------------------------------------------

    def find_recipients(self, text: str, *, limit: int = 200) -> list[dict[str, Any]]:
        """Recipients whose address is ``text`` (any spelling) or whose organisation
        contains it (case-insensitive), by address; at most ``limit``."""
        import contextlib

        from sqlalchemy import func, or_, select

        from clara_mailer.core.errors import InputError
        from clara_mailer.registry.addresses import address_forms
        from clara_mailer.store.models import Recipient

        text = text.strip()
        if not text:
            return []
        conditions = []
        if "@" in text:
            # Not an address (InputError): an organisation's name may still hold an @.
            with contextlib.suppress(InputError):
                conditions.append(Recipient.email_key.in_(address_forms(text)))
        escaped = text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        conditions.append(func.lower(Recipient.organisation).like(f"%{escaped}%", escape="\\"))
        query = select(Recipient).where(or_(*conditions)).order_by(Recipient.email_key).limit(limit)
        with self.db.session() as session:
            return [
                {
                    "email": r.email,
                    "name": r.name,
                    "organisation": r.organisation,
                    "segments": [s.slug for s in r.segments],
                }
                for r in session.scalars(query)
            ]

    def recipient_record(self, address: str) -> dict[str, Any]:
        """Everything held about ``address``: profile, consent, segments, every delivery
        with its outcome, opt-outs, RSVPs, bounces (``export_data``); NotFound when
        nothing is."""
        return self.export_data(address)

    def dashboard_optout(self, address: str, *, scope: str, note: str, who: str) -> bool:
        """Record a manual opt-out from the dashboard, and who did it in the audit table,
        in one transaction; whether it is new (False: one was active already)."""
        from clara_mailer.accounts.audit import add_entry
        from clara_mailer.core.vocabulary import OptOutReason
        from clara_mailer.optouts import suppressions

        with self.db.session() as session:
            _row, new = suppressions.add(
                session,
                self.signer,
                address,
                reason=OptOutReason.MANUAL,
                scope=scope,
                source=f"dashboard:{who}"[:200],
                note=note,
            )
            detail = f"{address.strip()} scope={scope}" + ("" if new else " (already)")
            add_entry(session, who, "optout", detail)
        return new

    # -- accounts and the audit table ------------------------------------------------------------

    def add_user(self, name: str, password: str, *, who: str) -> dict[str, Any]:
        from clara_mailer.accounts import audit, users

        row = users.add_user(self.db, name, password)
        audit.record(self.db, who, "user-added", name)
        return row

    def users(self) -> list[dict[str, Any]]:
        from clara_mailer.accounts.users import list_users

        return list_users(self.db)

    def remove_user(self, name: str, *, who: str) -> None:
        from clara_mailer.accounts import audit, users

        users.remove_user(self.db, name)
        audit.record(self.db, who, "user-removed", name)

    def authenticate(self, name: str, password: str) -> bool:
        """Whether ``password`` is user ``name``'s (argon2; as slow for unknown names)."""
        from clara_mailer.accounts.users import authenticate

        return authenticate(self.db, name, password)

    def user_sessions(self, name: str) -> tuple[bool, dt.datetime | None]:
        """(whether user ``name`` exists, the time before which its sessions are void)."""
        from clara_mailer.accounts.users import session_valid_after

        return session_valid_after(self.db, name)

    def end_sessions(self, name: str) -> None:
        from clara_mailer.accounts.users import end_sessions

        end_sessions(self.db, name)

    def audit(self, who: str, what: str, detail: str = "") -> None:
        """One row in the audit table."""
        from clara_mailer.accounts.audit import record

        record(self.db, who, what, detail)

    def audit_log(
        self, *, limit: int | None = None, who: str | None = None
    ) -> list[dict[str, Any]]:
        """The audit table, newest first."""
        from clara_mailer.accounts.audit import entries

        return entries(self.db, limit=limit, who=who)

    # -- public archive -------------------------------------------------------------------

    def archive(self) -> list[dict[str, Any]]:
        """The campaigns that have been sent (their row has a start), newest first, whose
        definition is still in the templates folder: slug, kind, date (of the first send,
        UTC), languages and the subject per language."""
        from sqlalchemy import select

        from clara_mailer.compose.campaigns import load_campaign
        from clara_mailer.core.errors import MailerError
        from clara_mailer.store.models import Campaign

        with self.db.session() as session:
            rows = session.execute(
                select(Campaign.slug, Campaign.kind, Campaign.started_at)
                .where(Campaign.started_at.is_not(None))
                .order_by(Campaign.started_at.desc(), Campaign.slug)
            ).all()
        entries = []
        for slug, kind, started_at in rows:
            if started_at is None:  # not sent (the query leaves these out)
                continue
            try:
                defn = load_campaign(self.settings, slug)
            except MailerError:  # its folder is gone or broken: nothing to show
                continue
            entries.append(
                {
                    "slug": slug,
                    "kind": str(kind),
                    "date": started_at.date().isoformat(),
                    "languages": list(defn.languages),
                    "subjects": {lang: defn.subjects.get(lang, "") for lang in defn.languages},
                }
            )
        return entries

    def archive_page(self, slug: str, language: str) -> str:
        """A sent campaign's message in ``language`` as a web page with no personal data:
        the variant rendered with every personal field empty and no token, the layout's
        ``archive`` flag on (a note on how to receive the next messages instead of the
        unsubscribe block), and the links that need a recipient's token (RSVP) inert.
        NotFound for a campaign not sent or a language it is not written in."""
        import re

        from clara_mailer.compose.campaigns import load_campaign
        from clara_mailer.compose.render import FIELDS, Renderer
        from clara_mailer.core.errors import NotFound

        entry = next((e for e in self.archive() if e["slug"] == slug), None)
        if entry is None or language not in entry["languages"]:
            raise NotFound(f"no archived message {slug!r} in {language!r}")
        # A signer no link is ever made with: every token in the page is empty.
        signer = TokenSigner("archive pages carry no token")
        renderer = Renderer(load_campaign(self.settings, slug), self.settings, signer, 0)
        renderer.env.globals["archive"] = True
        page = renderer.render_html(language, "", ("",) * len(FIELDS))
        per_recipient = re.escape(renderer.base_url) + r"/[ur]/"
        return re.sub(rf'\shref="{per_recipient}[^"]*"', "", page)

    def archive_index(self, *, static: bool = False) -> str:
        """The archive's index page: ``archive/SLUG/LANG`` links (the web app's
        ``/archive``), or ``SLUG/LANG.html`` ones (``static``: ``archive build``)."""
        import jinja2

        from clara_mailer.core.resources import WEB_TEMPLATES

        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(WEB_TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        return env.get_template("archive_index.html").render(
            entries=self.archive(),
            prefix="" if static else "archive/",
            suffix=".html" if static else "",
        )

    # -- subscribing (double opt-in) --------------------------------------------------------

    @cached_property
    def subscribe_tokens(self) -> SubscribeTokens:
        """Seals and opens the confirmation links of the subscribe form."""
        from clara_mailer.audience.subscribe import SubscribeTokens

        return SubscribeTokens(self.db.secret_key(self.settings))

    def subscribe_offer(self, language: str) -> dict[str, Any]:
        """What the subscribe form shows in ``language``: the segments offered (slug,
        name), the consent text and its SHA-256, the privacy notice's URL."""
        from clara_mailer.audience.subscribe import consent_text, offered_segments, text_hash

        text = consent_text(self.settings, language)
        return {
            "segments": offered_segments(self.db, self.settings),
            "consent_text": text,
            "consent_sha256": text_hash(text),
            "privacy_url": self.settings.privacy_url,
        }

    def subscribe_request(
        self,
        fields: dict[str, str],
        segments: list[str],
        *,
        transport: Transport | None = None,
    ) -> SendResult:
        """Check a sent form (FormError with the reason), then send its confirmation
        message with a sealed link; nothing about the visitor is stored."""
        from clara_mailer.audience.subscribe import (
            confirm_link,
            confirmation_message,
            keep_consent_text,
            offered_segments,
            read_form,
            send_confirmation,
        )

        offered = offered_segments(self.db, self.settings)
        request = read_form(self.settings, offered, fields, segments)
        keep_consent_text(self.db, self.settings, request.consent_sha256)
        token, request = self.subscribe_tokens.seal(request)
        link = confirm_link(self.settings, token)
        message = confirmation_message(self.settings, request, link, dict(offered))
        return send_confirmation(self.settings, request, message, transport)

    def subscribe_open(self, token: str) -> SubscribeRequest:
        """What a confirmation link asks for; TokenError when forged or expired."""
        return self.subscribe_tokens.open(token)

    def subscribe_confirm(self, token: str) -> Confirmation:
        """Confirm the subscription a link holds: the recipient and the consent record."""
        from clara_mailer.audience.subscribe import confirm

        return confirm(self.db, self.signer, self.subscribe_tokens.open(token))

    def consent_records(self, address: str, *, with_text: bool = False) -> list[dict[str, Any]]:
        """The consent records of the recipient at ``address`` (none: not known)."""
        from clara_mailer.audience.subscribe import consent_records, find_recipient_id

        with self.db.session() as session:
            rid = find_recipient_id(session, address)
            return [] if rid is None else consent_records(session, rid, with_text=with_text)

    # -- scheduled sends ----------------------------------------------------------------------

    def schedule_send(self, slug: str, options: SendOptions, due_at: dt.datetime) -> dict[str, Any]:
        """Record a send of ``slug`` with ``options`` at ``due_at`` (aware); refused in the
        past, for an unknown campaign, or while one is scheduled already."""
        from clara_mailer.audience.schedule import create_schedule

        return create_schedule(self.db, self.settings, slug, options, due_at)

    def cancel_schedule(self, slug: str) -> int:
        """Cancel the scheduled sends of ``slug`` not started yet; NotFound when none."""
        from clara_mailer.audience.schedule import cancel_schedule

        return cancel_schedule(self.db, slug)

    def schedules(self, *, active_only: bool = False) -> list[dict[str, Any]]:
        """Every scheduled send (``active_only``: due or running), by due time."""
        from clara_mailer.audience.schedule import list_schedules

        return list_schedules(self.db, active_only=active_only)

    def run_schedules(
        self, runner: str | None = None, *, transport: Transport | None = None
    ) -> list[dict[str, Any]]:
        """Start every due scheduled send that this runner claims (each once, whatever
        other runners do); what each came to."""
        from clara_mailer.audience.schedule import run_due

        return run_due(self.db, self.settings, self.signer, runner, transport=transport)


def campaign_state(row: dict[str, Any]) -> str:
    """planned, sending, scheduled or finished, from a ``campaigns`` row's figures."""
    if row.get("sent") is None:  # no delivery log (merge_overview leaves the figures blank)
        return "planned"
    if row.get("queued") or row.get("sending"):
        return "sending"
    if row.get("deferred"):
        return "scheduled"
    return "finished"
