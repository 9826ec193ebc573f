"""``send --processes N`` starts its helper processes before it writes the plan, so that
they load their modules meanwhile, and hands them the committed plan (``go``). A helper
never touches the campaign before ``go``; a send that ends before it (an error, Ctrl-C
while the plan is written) ends them without a trace."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select

from clara_mailer.core.settings import Settings
from clara_mailer.mailer import Mailer
from clara_mailer.plan.plan import SendOptions
from clara_mailer.sending.processes import HelperProcesses
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery
from tests.send_helpers import add_recipients

CAMPAIGN = "newsletter-2022-01"
OPTIONS = SendOptions(segments=("local-police",))


def deliveries(db: Database) -> list[tuple[Any, ...]]:
    with db.session() as s:
        return [
            tuple(row)
            for row in s.execute(
                select(
                    Delivery.id,
                    Delivery.status,
                    Delivery.worker_id,
                    Delivery.lease_expires_at,
                    Delivery.attempts,
                ).order_by(Delivery.id)
            )
        ]


def outbox(settings: Settings) -> list[Path]:
    return sorted(settings.outbox_dir.rglob("*.eml"))


def wait_until_ready(helpers: HelperProcesses) -> None:
    deadline = time.monotonic() + 120
    while helpers.ready() < helpers.count:
        assert helpers.running(), "a helper ended before it was ready"
        assert time.monotonic() < deadline, "the helpers never said they were ready"
        time.sleep(0.02)


def test_waiting_helpers_ignore_ctrl_c_and_end_untouched_without_the_plan(
    db: Database, settings: Settings
) -> None:
    add_recipients(db, 20)
    mailer = Mailer(settings, database=db)
    mailer.plan(CAMPAIGN, OPTIONS)  # 20 queued rows a helper could claim
    before = deliveries(db)
    assert len(before) == 20
    with mailer.start_helpers(CAMPAIGN, OPTIONS, 2) as helpers:
        wait_until_ready(helpers)
        # A terminal's Ctrl-C reaches the whole process group while the plan is
        # written: the helpers leave it to the parent.
        for process in helpers.processes:
            assert process.pid is not None
            os.kill(process.pid, signal.SIGINT)
        time.sleep(0.5)
        assert [p.is_alive() for p in helpers.processes] == [True, True]
        assert deliveries(db) == before  # nothing claimed without ``go``
    # Leaving the block without a send cancels them: they end, cleanly.
    assert [p.exitcode for p in helpers.processes] == [0, 0]
    assert deliveries(db) == before
    assert outbox(settings) == []
    assert (helpers.errors, helpers.counts()) == ([], Counter())


def test_helpers_cancelled_while_they_load_end_cleanly(db: Database, settings: Settings) -> None:
    add_recipients(db, 5)
    mailer = Mailer(settings, database=db)
    mailer.plan(CAMPAIGN, OPTIONS)
    before = deliveries(db)
    with mailer.start_helpers(CAMPAIGN, OPTIONS, 1) as helpers:
        pass  # cancelled at once: the helper is still loading its modules
    assert [p.exitcode for p in helpers.processes] == [0]
    assert deliveries(db) == before
    assert outbox(settings) == []
    assert helpers.errors == []


def test_a_helper_loaded_before_the_plan_existed_sends_it_once_handed_it(
    db: Database, settings: Settings
) -> None:
    """The CLI's order: the helper first, then the plan, then ``go`` (here without the
    parent sending, so the whole campaign is the helper's)."""
    add_recipients(db, 300)
    mailer = Mailer(settings, database=db)
    with mailer.start_helpers(CAMPAIGN, OPTIONS, 1) as helpers:
        wait_until_ready(helpers)  # loaded before a single row existed
        assert deliveries(db) == []
        plan = mailer.plan(CAMPAIGN, OPTIONS)
        assert plan.renderer is not None
        helpers.go(plan.campaign_id, plan.segments, plan.renderer.prepared())
    assert [p.exitcode for p in helpers.processes] == [0]
    assert (helpers.errors, helpers.counts()) == ([], Counter({"sent": 300}))
    assert {row[1] for row in deliveries(db)} == {"sent"}
    recipients = [
        line
        for path in outbox(settings)
        for line in path.read_bytes().splitlines()
        if line.startswith(b"To: ")
    ]
    assert len(recipients) == len(set(recipients)) == 300
