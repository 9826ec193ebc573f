"""``send --processes N`` starts its helper processes before it writes the plan, so that
they load their modules meanwhile, and hands them the campaign (``go``) once the plan's
first rows are committed: they send while the rest is written. A helper never touches
the campaign before ``go``; a send that ends before it ends them without a trace, and
one that fails after it stops them with everything they sent recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from clara_mailer.core.settings import Settings
from clara_mailer.deliverylog import log
from clara_mailer.mailer import Mailer
from clara_mailer.plan.plan import SendOptions, commit_plan, preview_plan
from clara_mailer.sending.processes import HelperProcesses
from clara_mailer.sending.worker import hand_over_when_planned
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery
from tests.conftest import settings_env
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


def outbox_recipients(settings: Settings) -> list[bytes]:
    """The To: line of every message in the outbox."""
    return [
        line
        for path in outbox(settings)
        for line in path.read_bytes().splitlines()
        if line.startswith(b"To: ")
    ]


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
        assert not helpers.waiting()
        helpers.go(plan.campaign_id, plan.segments, {})  # after the hand-over: nothing
    assert [p.exitcode for p in helpers.processes] == [0]
    assert (helpers.errors, helpers.counts()) == ([], Counter({"sent": 300}))
    assert {row[1] for row in deliveries(db)} == {"sent"}
    recipients = outbox_recipients(settings)
    assert len(recipients) == len(set(recipients)) == 300


def test_the_plan_hands_the_campaign_over_after_its_first_chunk_once(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``commit_plan(planned=...)``: called once, as soon as the first chunk of rows is
    committed (other workers can claim them), never when the plan adds no row."""
    monkeypatch.setattr(log, "PLAN_CHUNK", 4)
    add_recipients(db, 10)
    mailer = Mailer(settings, database=db)
    calls: list[tuple[int, tuple[str, ...], int]] = []

    def planned(campaign_id: int, segments: tuple[str, ...]) -> None:
        calls.append((campaign_id, segments, len(deliveries(db))))  # what others see

    preview = preview_plan(db, settings, mailer.signer, CAMPAIGN, OPTIONS)
    plan = commit_plan(db, settings, mailer.signer, preview, OPTIONS, planned=planned)
    assert calls == [(plan.campaign_id, ("local-police",), 4)]
    assert len(deliveries(db)) == 10
    again = preview_plan(db, settings, mailer.signer, CAMPAIGN, OPTIONS)
    commit_plan(db, settings, mailer.signer, again, OPTIONS, planned=planned)
    assert len(calls) == 1  # nothing new to plan: nobody told


def test_helpers_sending_when_the_plan_fails_are_stopped_and_lose_nothing(
    db: Database, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper sends from the first chunk on; when the plan then fails (an error,
    Ctrl-C), it is stopped, what it sent is recorded, and the next send sends everyone
    else, each once."""
    monkeypatch.setattr(log, "PLAN_CHUNK", 300)
    add_recipients(db, 400)
    mailer = Mailer(settings, database=db)
    preview = preview_plan(db, settings, mailer.signer, CAMPAIGN, OPTIONS)

    class PlanFailed(Exception):
        pass

    with pytest.raises(PlanFailed), mailer.start_helpers(CAMPAIGN, OPTIONS, 1) as helpers:
        hand_over = hand_over_when_planned(helpers, preview.renderer)

        def planned(campaign_id: int, segments: tuple[str, ...]) -> None:
            hand_over(campaign_id, segments)
            deadline = time.monotonic() + 120
            while not helpers.counts():  # the helper is sending
                assert time.monotonic() < deadline and helpers.running()
                time.sleep(0.01)
            raise PlanFailed

        commit_plan(db, settings, mailer.signer, preview, OPTIONS, planned=planned)
    assert [p.exitcode for p in helpers.processes] == [0]  # stopped cleanly (SIGTERM)
    assert helpers.interrupted and helpers.errors == []
    rows = deliveries(db)
    assert len(rows) == 300  # the plan stopped after its first chunk
    statuses = Counter(row[1] for row in rows)
    assert set(statuses) <= {"sent", "queued"} and 0 < statuses["sent"] <= 300
    assert statuses["sent"] == helpers.counts()["sent"] == len(outbox(settings))

    # The next send plans the rest and sends everyone not sent yet, each once.
    plan = mailer.plan(CAMPAIGN, OPTIONS)
    summary = mailer.send(plan, OPTIONS, handle_signals=False)
    assert summary.totals == {"sent": 400}
    recipients = outbox_recipients(settings)
    assert len(recipients) == len(set(recipients)) == 400


def test_send_processes_2_that_ends_before_its_plan_ends_its_helpers_quietly(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    """The CLI starts the helpers while the check runs, before anything is asked: a
    declined prompt, an error and "Nothing to send" each end them at once (a helper left
    waiting would hold the command open: ``timeout``), without a trace on stderr."""
    add_recipients(db, 30)
    env = {**os.environ, **settings_env(settings)}

    def send(*args: str, answer: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        command = [sys.executable, "-m", "clara_mailer", "send", CAMPAIGN, "--processes", "2"]
        return subprocess.run(
            [*command, *args], cwd=tmp_path, env=env, input=answer, capture_output=True,
            timeout=120,
        )  # fmt: skip

    declined = send("--segment", "local-police", answer=b"n\n")
    assert declined.returncode == 1 and b"Send 30 message(s)?" in declined.stdout
    unknown = send("--segment", "nope", "--yes")
    assert unknown.returncode == 1
    assert b"unknown segment 'nope'" in unknown.stdout + unknown.stderr
    for ended in (declined, unknown):
        assert b"Traceback" not in ended.stderr, ended.stderr.decode()
    assert deliveries(db) == [] and outbox(settings) == []

    done = send("--segment", "local-police", "--yes")
    assert done.returncode == 0, done.stderr.decode()
    assert b"This run: 30 sent" in done.stdout
    nothing = send("--segment", "local-police", "--yes")
    assert nothing.returncode == 0 and b"Nothing to send." in nothing.stdout
    assert b"Traceback" not in done.stderr + nothing.stderr
    assert len(outbox(settings)) == 30
