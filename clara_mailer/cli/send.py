"""The send command: plan, confirm, send with progress, summary and next steps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from clara_mailer.cli.app import App, main, pass_app
from clara_mailer.core.vocabulary import Status

if TYPE_CHECKING:  # the sending packages are imported only when a send runs
    from clara_mailer.compose.checking import CheckRun
    from clara_mailer.plan.plan import Plan, SendOptions
    from clara_mailer.sending.processes import HelperProcesses
    from clara_mailer.sending.worker import Progress as SendProgress
    from clara_mailer.sending.worker import SendSummary


@main.command("send")
@click.argument("campaign")
@click.option(
    "--segment",
    "segments",
    multiple=True,
    help="Segment to send to (repeatable; default: the campaign's).",
)
@click.option(
    "--where",
    "where",
    multiple=True,
    metavar="KEY=VALUE[:CAMPAIGN]",
    help="Only members who match (repeatable, all must hold): rsvp=yes|no|none:CAMPAIGN, "
    "status=sent|failed|bounced|deferred|unknown|skipped:CAMPAIGN, language=es|en, "
    "country=XX; VALUE may list alternatives: status=failed,bounced:CAMPAIGN.",
)
@click.option(
    "--exclude-segment",
    "exclude_segments",
    multiple=True,
    metavar="SLUG",
    help="Leave out the members of this segment (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Render every message, send nothing, write nothing.")
@click.option(
    "--test-to",
    metavar="ADDRESS",
    help="Send one sample per variant to ADDRESS; the log is untouched.",
)
@click.option("--limit", type=click.IntRange(min=1), help="Send at most N messages in this run.")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="SMTP connections.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.01),
    help="At most N messages per second, across all workers.",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Sender processes on this machine, each with --concurrency connections.",
)
@click.option(
    "--resend-unknown",
    is_flag=True,
    help="Resend messages whose outcome is unknown (same Message-ID).",
)
@click.option(
    "--allow-changed-templates", is_flag=True, help="Resume even though the templates changed."
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask before sending.")
@click.option(
    "--at",
    "at",
    metavar="TIME",
    help="Do not send now: record the send for TIME (ISO 8601 with its UTC offset, e.g. "
    "2022-01-20T09:00+01:00); `clara-mail serve` or `clara-mail scheduled run` starts it.",
)
@click.option("--cancel-schedule", is_flag=True, help="Cancel CAMPAIGN's scheduled send.")
@pass_app
def send_cmd(
    app: App,
    campaign: str,
    segments: tuple[str, ...],
    where: tuple[str, ...],
    exclude_segments: tuple[str, ...],
    dry_run: bool,
    test_to: str | None,
    limit: int | None,
    concurrency: int,
    rate: float | None,
    resend_unknown: bool,
    allow_changed_templates: bool,
    yes: bool,
    processes: int,
    at: str | None,
    cancel_schedule: bool,
) -> None:
    """Send CAMPAIGN to its segments, recording every recipient's outcome.

    \b
    Safe to rerun at any time: it resumes where it stopped, retries what is due and
    never sends anyone the same campaign twice. Without CLARA_SMTP_URL, messages are
    written as .eml files under the outbox directory instead.

    \b
    Examples:
      clara-mail send newsletter-2022-01 --segment local-police
      clara-mail send conference-2022-02-04 --test-to me@clara.example
      clara-mail send newsletter-2022-01 --yes --concurrency 8 --rate 20
      clara-mail send newsletter-2022-01 --yes --processes 2   # use both cores
      clara-mail send reminder --where rsvp=none:conference-2022-02-04
      clara-mail send newsletter-2022-01 --at 2022-01-20T09:00+01:00
    """
    from clara_mailer.compose.checking import CheckRun

    # A send checks the campaign in a process of its own (compose.checking): this one
    # never loads the CSS inliner. It is waited for before this one loads its database
    # layer (the filters below are the first of it), so that the two together stay as
    # small as this one is later alone (60 MB with a 20,000-recipient SQLite send).
    # With --processes N (N > 1) the send takes N times that: this one goes on while the
    # check runs, and the other sender processes start loading (below). For that second
    # the check's process comes on top (2 processes: 147-164 MB summed at the peak,
    # 131-144 MB while sending).
    check = None
    if not (cancel_schedule or at is not None or test_to or dry_run):
        check = CheckRun.start(app.settings, campaign, segments)
        if processes == 1:
            check.wait()

    from clara_mailer.plan.filters import parse_filters
    from clara_mailer.plan.plan import SendOptions

    parse_filters(where)  # a mistyped filter is refused before anything else (exit 2)
    options = SendOptions(
        segments=segments,
        limit=limit,
        concurrency=concurrency,
        rate=rate,
        resend_unknown=resend_unknown,
        allow_changed_templates=allow_changed_templates,
        where=where,
        exclude_segments=exclude_segments,
    )
    if cancel_schedule or at is not None:
        from clara_mailer.cli.schedule import cancel, record_schedule

        if (cancel_schedule and at is not None) or dry_run or test_to:
            raise click.UsageError(
                "--at and --cancel-schedule go alone (not with each other, --dry-run or --test-to)"
            )
        if cancel_schedule:
            cancel(app, campaign)
        else:
            record_schedule(app, campaign, str(at), options, processes)
        return
    if test_to:
        for language, segment, result in app.mailer.send_test(campaign, test_to, segments):
            click.echo(
                f"{language}/{segment}: {result.outcome} {result.code or ''} {result.reply}".rstrip()
            )
        _print_warnings(app, campaign)
        return
    if dry_run:
        report = app.mailer.dry_run(campaign, options)
        _print_warnings(app, campaign)
        for segment in report.segments or tuple(report.rendered):
            click.echo(f"{segment}: {report.rendered.get(segment, 0)} message(s) rendered")
        if where or exclude_segments:
            chosen = [f"--where {w}" for w in where]
            chosen += [f"--exclude-segment {s}" for s in exclude_segments]
            click.echo(f"(members matching {' '.join(chosen)})")
        click.echo(f"suppressed: {report.suppressed}; largest message: {report.largest} bytes")
        for problem in report.problems:
            click.echo(f"problem: {problem}", err=True)
        click.echo("Dry run: nothing was sent and nothing was written.")
        return
    # The other sender processes (--processes N) load meanwhile: while the check runs,
    # and while the plan is written, from whose first committed rows on they send.
    with app.mailer.start_helpers(campaign, options, processes - 1) as helpers:
        summary = _preview_and_send(app, campaign, options, check, helpers, yes)
    if summary is None:
        return
    _print_summary(app, summary)
    if summary.interrupted:
        app.err.print("Interrupted: in-flight messages were recorded; run send again to go on.")
        raise SystemExit(130)
    if summary.counts.get(Status.FAILED):
        raise SystemExit(1)  # refused (5xx) in this run: see the report


def _preview_and_send(
    app: App,
    campaign: str,
    options: SendOptions,
    check: CheckRun | None,
    helpers: HelperProcesses,
    yes: bool,
) -> SendSummary | None:
    """Show the plan, ask, write it and send; None when there is nothing to send."""
    from clara_mailer.plan.plan import commit_plan, preview_plan
    from clara_mailer.sending.worker import hand_over_when_planned

    mailer = app.mailer
    # Read-only first: a send declined at the prompt (or without a terminal to ask on)
    # leaves no campaign row and no delivery row behind. The database layer loads, and
    # the checked variants are read, with the collector paused: what the send then
    # keeps to its end is frozen, out of the collector's passes while it sends.
    with app.loading():
        preview = preview_plan(
            mailer.db, mailer.settings, mailer.signer, campaign, options, check=check
        )
    _print_warnings(app, campaign)  # an SMTP send with an incomplete footer was refused
    _print_plan(app, preview)
    if preview.to_send == 0:
        click.echo("Nothing to send.")
        unknown = preview.total(Status.UNKNOWN)
        if unknown and not options.resend_unknown:
            command = " ".join(
                ["clara-mail", "send", campaign]
                + [f"--segment {segment}" for segment in options.segments]
                + [f"--where {w}" for w in options.where]
                + [f"--exclude-segment {s}" for s in options.exclude_segments]
                + ["--resend-unknown"]
            )
            click.echo(
                f"{unknown} unknown (in flight when a sender stopped): check with the relay, "
                f"then `{command}` (same Message-ID)"
            )
        return None
    if not yes:
        click.confirm(f"Send {preview.to_send} message(s)?", abort=True)
    planned = hand_over_when_planned(helpers, preview.renderer)
    plan = commit_plan(mailer.db, mailer.settings, mailer.signer, preview, options, planned=planned)
    return _run_with_progress(app, plan, options, helpers)


def _print_warnings(app: App, campaign: str) -> None:
    """``Warning:`` lines on stderr (invitation venue or date, empty footer settings), once
    the send goes ahead: an error stays one line, and an SMTP send with an incomplete
    footer has been refused by then (the outbox, dry runs and test samples only warn)."""
    for warning in app.mailer.warnings(campaign):
        click.echo(f"Warning: {warning}", err=True)


def _print_plan(app: App, plan: Plan) -> None:
    from rich.table import Table

    statuses = [s for s in Status if s != Status.SENDING]
    table = Table(title=f"{plan.campaign.slug} ({plan.campaign.kind})")
    table.add_column("segment")
    for status in statuses:
        table.add_column(status, justify="right")
    for segment in plan.segments:
        counts = plan.counts.get(segment, {})
        table.add_row(segment, *(str(counts.get(s, 0)) for s in statuses))
    app.out.print(table)
    # A preview's figures are what the send will write once confirmed (nothing yet).
    verb = "will add" if plan.preview else "planned"
    note = f"{verb} {plan.added} new, {plan.skipped} skipped (opted out)"
    if plan.requeued_unknown:
        again = "to queue again" if plan.preview else "queued again"
        note += f", {plan.requeued_unknown} unknown {again}"
    app.out.print(note)


def _run_with_progress(
    app: App, plan: Plan, options: SendOptions, helpers: HelperProcesses
) -> SendSummary:
    import time as _time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    if app.err.is_terminal:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.0f}/s {task.fields[outcomes]}"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=app.err) as bar:
            task = bar.add_task(plan.campaign.slug, total=plan.to_send, rate=0.0, outcomes="")

            def update(p: SendProgress) -> None:
                outcomes = " ".join(f"{k}={v}" for k, v in sorted(p.counts.items()))
                bar.update(task, completed=p.done, total=p.total, rate=p.rate, outcomes=outcomes)

            return app.mailer.send(plan, options, progress=update, helpers=helpers)

    last: list[Any] = [0.0, None]

    def plain(p: SendProgress) -> None:
        # Not a terminal: a line every 5 s and one at the end, never the same line twice.
        now = _time.monotonic()
        if (now - last[0] >= 5 or p.done == p.total) and last[1] != (p.done, p.total):
            last[0], last[1] = now, (p.done, p.total)
            outcomes = " ".join(f"{k}={v}" for k, v in sorted(p.counts.items()))
            click.echo(f"{p.done}/{p.total} {p.rate:.0f}/s {outcomes}", err=True)

    return app.mailer.send(plan, options, progress=plain, helpers=helpers)


def _print_summary(app: App, summary: SendSummary) -> None:
    rate = summary.attempted / summary.elapsed if summary.elapsed else 0.0
    outcomes = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items())) or "nothing"
    app.out.print(
        f"This run: {outcomes} in {summary.elapsed:.1f}s ({rate:.0f} msg/s) via {summary.transport}"
    )
    if not summary.network:
        app.out.print("Nothing went over the network: messages were written to the outbox.")
    totals = ", ".join(f"{v} {k}" for k, v in sorted(summary.totals.items()))
    app.out.print(f"Campaign {summary.campaign}: {totals}")
    for error in summary.errors:
        app.err.print(f"Error: {error}")
    for step in next_steps(summary):
        app.out.print(f"Next: {step}")


def next_steps(summary: SendSummary) -> list[str]:
    """What the user can do next, from the campaign's totals after the run."""
    steps = []
    slug = summary.campaign
    deferred = summary.totals.get(Status.DEFERRED, 0)
    if deferred:
        when = f" after {summary.next_due:%Y-%m-%d %H:%M} UTC" if summary.next_due else ""
        steps.append(f"{deferred} deferred: run `clara-mail send {slug}` again{when}")
    unknown = summary.totals.get(Status.UNKNOWN, 0)
    if unknown:
        steps.append(
            f"{unknown} unknown (in flight when a sender stopped): check with the relay, "
            f"then `clara-mail send {slug} --resend-unknown` (same Message-ID)"
        )
    queued = summary.totals.get(Status.QUEUED, 0) + summary.totals.get(Status.SENDING, 0)
    if queued:
        steps.append(f"{queued} not sent yet: run `clara-mail send {slug}` to go on")
    failed = summary.totals.get(Status.FAILED, 0)
    if failed:
        steps.append(f"{failed} failed: `clara-mail report {slug} --status failed`")
    return steps
