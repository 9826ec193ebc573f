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

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.store.database import Database, open_database

if TYPE_CHECKING:  # the heavier packages are imported by the methods that use them
    from clara_mailer.bounces.apply import BounceReport
    from clara_mailer.bounces.mailboxes import BounceSource
    from clara_mailer.plan.plan import DryRun, Plan, SendOptions
    from clara_mailer.privacy.gdpr import Erasure
    from clara_mailer.registry.importer import ImportOptions, ImportProgress, ImportReport
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
        from clara_mailer.registry.recipients import show_recipient

        return show_recipient(self.db, address)

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
        handle_signals: bool = True,
    ) -> SendSummary:
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
            handle_signals=handle_signals,
        )

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

        return export_data(self.db, self.signer, address)

    # -- bounces ------------------------------------------------------------------------------

    def import_bounces(
        self, source: BounceSource, *, dry_run: bool = False, campaign: str | None = None
    ) -> BounceReport:
        from clara_mailer.bounces.apply import import_bounces

        return import_bounces(
            self.db, self.settings, self.signer, source, dry_run=dry_run, campaign=campaign
        )
