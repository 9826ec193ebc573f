"""Hardening of `send` and the delivery log (issue 14, items 1, 4, 5, 6, 7)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
from collections.abc import Callable

from click.testing import CliRunner, Result
from sqlalchemy import func, select, update

from clara_mailer.core.settings import Settings
from clara_mailer.core.vocabulary import Status
from clara_mailer.mailer import Mailer
from clara_mailer.plan.plan import SendOptions
from clara_mailer.store.database import Database
from clara_mailer.store.models import Campaign, Delivery, utcnow
from clara_mailer.transport import MemoryTransport
from tests.conftest import settings_env
from tests.send_helpers import add_recipients
from tests.smtp_server import Faults, RecordingSMTPServer

Cli = Callable[..., Result]
CAMPAIGN = "newsletter-2022-01"


def _count(db: Database, model: type) -> int:
    with db.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


# -- 1: test sends ------------------------------------------------------------------------


def test_item1_test_samples_have_their_own_message_id_and_outbox_file(
    cli: Cli, db: Database, settings: Settings
) -> None:
    memory = MemoryTransport()
    Mailer(settings, database=db).send_test(
        "conference-2022-02-04", "me@clara.example", transport=memory
    )
    ids = [
        email.message_from_bytes(data, policy=email.policy.default)["Message-ID"]
        for _, _, data in memory.sent
    ]
    assert len(ids) > 1 and len(set(ids)) == len(ids)

    result = cli("send", CAMPAIGN, "--segment", "local-police", "--test-to", "me@clara.example")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and all("written" in line for line in lines)
    files = list((settings.outbox_dir / f"{CAMPAIGN}-test").glob("*.eml"))
    assert len(files) == 2  # one per variant, none overwritten
    again = cli("send", CAMPAIGN, "--segment", "local-police", "--test-to", "me@clara.example")
    assert again.exit_code == 0
    assert len(list((settings.outbox_dir / f"{CAMPAIGN}-test").glob("*.eml"))) == 4


# -- 4: declining leaves no trace ---------------------------------------------------------


def test_item4_declined_or_unasked_send_leaves_no_trace(
    cli: Cli, db: Database, settings: Settings
) -> None:
    add_recipients(db, 5)
    declined = cli("send", CAMPAIGN, "--segment", "local-police", input="n\n")
    assert declined.exit_code == 1 and "Send 5 message(s)?" in declined.output
    assert "local-police" in declined.output and "5" in declined.output
    no_terminal = cli("send", CAMPAIGN, "--segment", "local-police")  # no input: aborts
    assert no_terminal.exit_code == 1
    assert _count(db, Campaign) == 0 and _count(db, Delivery) == 0

    # Accepted, the same plan is written and sent.
    accepted = cli("send", CAMPAIGN, "--segment", "local-police", input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert _count(db, Campaign) == 1 and _count(db, Delivery) == 5

    # A later decline leaves the newcomers unplanned too.
    add_recipients(db, 2, start=100)
    again = cli("send", CAMPAIGN, "--segment", "local-police", input="n\n")
    assert again.exit_code == 1 and "Send 2 message(s)?" in again.output
    assert _count(db, Delivery) == 5


def test_item4_mailer_plan_still_commits(db: Database, settings: Settings) -> None:
    add_recipients(db, 3)
    opts = SendOptions(segments=("local-police",))
    plan = Mailer(settings, database=db).plan(CAMPAIGN, opts)
    assert plan.to_send == 3 and _count(db, Delivery) == 3
    summary = Mailer(settings, database=db).send(plan, opts, handle_signals=False)
    assert summary.counts == {"sent": 3}


# -- 5: the --resend-unknown hint -------------------------------------------------------


def test_item5_nothing_to_send_names_the_unknown_and_the_command(
    cli: Cli, db: Database, settings: Settings
) -> None:
    add_recipients(db, 4)
    assert cli("send", CAMPAIGN, "--segment", "local-police", "--yes").exit_code == 0
    with db.session() as s:
        ids = s.scalars(select(Delivery.id).order_by(Delivery.id).limit(2)).all()
        s.execute(update(Delivery).where(Delivery.id.in_(ids)).values(status=Status.UNKNOWN))
    rerun = cli("send", CAMPAIGN, "--segment", "local-police", "--yes")
    assert rerun.exit_code == 0
    assert "Nothing to send." in rerun.output
    assert "2 unknown" in rerun.output
    assert f"clara-mail send {CAMPAIGN} --segment local-police --resend-unknown" in rerun.output

    resend = cli("send", CAMPAIGN, "--segment", "local-police", "--resend-unknown", "--yes")
    assert resend.exit_code == 0, resend.output
    assert "2 unknown to queue again" in resend.output and "2 sent" in resend.output


# -- 6: exit status and counts ----------------------------------------------------------


def _smtp_cli(settings: Settings, server: RecordingSMTPServer) -> Cli:
    values = {**vars(settings), "smtp_url": server.url(), "retry_in_run": "0.2,0.4"}
    env = settings_env(Settings(**values))  # type: ignore[arg-type]
    from clara_mailer.cli import main

    def run(*args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(main, list(args), env=env, input=input)

    return run


def test_item6_refused_recipients_exit_1_and_counts_are_per_recipient(
    db: Database, settings: Settings
) -> None:
    addresses = add_recipients(db, 4)
    faults = Faults(greylist=True, replies={addresses[0]: (550, "5.1.1 no such user")})
    with RecordingSMTPServer(faults=faults) as server:
        run = _smtp_cli(settings, server)
        result = run("send", CAMPAIGN, "--segment", "local-police", "--yes")
    assert result.exit_code == 1, result.output
    # Three recipients greylisted once and then sent are three "sent", not 3 deferred too.
    assert "This run: 1 failed, 3 sent in" in result.output


def test_item6_test_to_an_unusable_address_exits_2_with_one_line(
    cli: Cli, db: Database, settings: Settings
) -> None:
    result = cli("send", CAMPAIGN, "--segment", "local-police", "--test-to", "not-an-address")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("Error:")
    assert "not-an-address" in result.output
    assert not (settings.outbox_dir / f"{CAMPAIGN}-test").exists()


# -- 7: due retries before newcomers ----------------------------------------------------


def test_item7_limit_sends_due_retries_before_new_recipients(
    db: Database, settings: Settings
) -> None:
    addresses = add_recipients(db, 6)
    opts = SendOptions(segments=("local-police",), limit=2)
    plan = Mailer(settings, database=db).plan(CAMPAIGN, opts)
    retries = addresses[-2:]  # the newest rows: a plain scan of queued rows reaches them last
    now = utcnow()
    with db.session() as s:
        s.execute(
            update(Delivery)
            .where(Delivery.email.in_(retries))
            .values(
                status=Status.DEFERRED,
                attempts=1,
                first_attempt_at=now - dt.timedelta(minutes=10),
                last_attempt_at=now - dt.timedelta(minutes=5),
                next_attempt_at=now - dt.timedelta(minutes=1),
            )
        )
    memory = MemoryTransport()
    summary = Mailer(settings, database=db).send(plan, opts, transport=memory, handle_signals=False)
    assert summary.counts == {"sent": 2}
    assert sorted(rcpt for _, rcpt, _ in memory.sent) == sorted(retries)
