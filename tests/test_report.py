"""Delivery reports against a log made by real sends (aiosmtpd), real DSN bounces and
opt-outs, on SQLite and PostgreSQL: every format's figures are checked against it."""

from __future__ import annotations

import csv
import datetime as dt
import gc
import io
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from sqlalchemy import select

from clara_mailer.cli.app import App
from clara_mailer.core.settings import Settings
from clara_mailer.core.vocabulary import Status
from clara_mailer.reporting.report import DELIVERY_COLUMNS, build_report
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery
from tests.report_helpers import (
    FORMULA_ORG,
    INVITATION,
    NEWSLETTER,
    BuiltLog,
    build_invitation_log,
    build_newsletter_log,
)

Cli = Callable[..., Result]


@pytest.fixture
def log(db: Database, settings: Settings, tmp_path: Path) -> BuiltLog:
    return build_newsletter_log(db, settings, tmp_path)


def test_the_scenario_is_what_the_server_saw(log: BuiltLog, db: Database) -> None:
    # The ground truth the other tests compare against: the server accepted exactly
    # the messages the scenario expects (sent, plus the bounced ones it later returned).
    everyone = [a for members in log.addresses.values() for a in members]
    for address in everyone:
        accepted = log.expected_status(address) in ("sent", "bounced")
        assert log.accepted[address] == (1 if accepted else 0), address
    with db.session() as s:
        stored = dict(s.execute(select(Delivery.email, Delivery.status)).all())
    assert stored == {a: log.expected_status(a) for a in everyone}


def test_json_figures_match_the_log(log: BuiltLog, cli: Cli) -> None:
    result = cli("report", NEWSLETTER, "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)

    expected = log.expected_segments()
    assert data["campaign"]["slug"] == NEWSLETTER
    assert data["campaign"]["kind"] == "newsletter"
    assert data["campaign"]["started_at"]
    assert data["segments"] == {
        seg: {st: counts.get(st, 0) for st in Status} for seg, counts in expected.items()
    }
    totals = sum(expected.values(), Counter())
    assert data["totals"] == {st: totals.get(st, 0) for st in Status}
    assert data["total"] == sum(len(m) for m in log.addresses.values())

    failures = {(f["status"], f["code"], f["reply"]): f["count"] for f in data["failures"]}
    # The three 550 replies quote different addresses: one group.
    assert (
        failures[("failed", 550, "550 5.1.1 <address>: Recipient address rejected: User unknown")]
        == 3
    )
    assert failures[("failed", 553, "553 5.1.3 Bad destination mailbox address syntax")] == 1
    assert failures[("deferred", 451, "451 4.3.0 Mailbox temporarily unavailable")] == 2
    bounced = {k: n for k, n in failures.items() if k[0] == "bounced"}
    assert sum(bounced.values()) == len(log.hard_bounced) + len(log.policy_bounced)
    assert [f["count"] for f in data["failures"]] == sorted(
        (f["count"] for f in data["failures"]), reverse=True
    )

    retry = data["retry"]
    assert retry["deferred"] == len(log.deferred)
    assert retry["due_now"] == 0  # the backoff is minutes away
    assert retry["next_attempt_at"] and retry["next_attempt_at"] <= retry["last_attempt_at"]
    assert sum(h["count"] for h in retry["schedule"]) == len(log.deferred)
    assert retry["queued"] == retry["sending"] == retry["unknown"] == 0

    assert data["bounces"]["by_kind"] == {"hard": 2, "policy": 1}
    assert data["bounces"]["policy"] == 1
    assert {(c["kind"], c["status_code"]): c["count"] for c in data["bounces"]["codes"]} == {
        ("hard", "5.1.1"): 2,
        ("policy", "5.7.1"): 1,
    }
    # Hard bounces suppress the address too, but they are not opt-outs; nor is a manual
    # opt-out that names no campaign.
    assert data["optouts"] == {
        "active": log.optouts_active,
        "lifted": log.optouts_lifted,
        "by_reason": {"one-click": 1},
    }
    assert data["rsvps"] is None  # a newsletter asks for none

    timeline = data["timeline"]
    assert timeline["unit"] == "minute"
    assert sum(p["count"] for p in timeline["sent"]) == sum(log.accepted.values())


def test_a_report_without_its_timeline_has_every_other_figure(log: BuiltLog, db: Database) -> None:
    # The terminal summary asks for no timeline (it shows none): the rest is the same.
    now = dt.datetime(2026, 12, 1, 12, 0)
    whole = build_report(db, NEWSLETTER, now=now).as_json()
    summary = build_report(db, NEWSLETTER, now=now, timeline=False).as_json()
    assert summary["timeline"] is None
    assert sum(p["count"] for p in whole["timeline"]["sent"]) == sum(log.accepted.values())
    assert {k: v for k, v in summary.items() if k != "timeline"} == {
        k: v for k, v in whole.items() if k != "timeline"
    }


def test_loading_pauses_the_collector_and_freezes_what_it_loaded() -> None:
    app = App()
    assert gc.isenabled()
    with app.loading():
        assert not gc.isenabled()
        loaded = [[n] for n in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(loaded)  # left out of the collector's passes
    app.close()  # puts them back under the collector (a process running many commands)
    assert gc.get_freeze_count() == 0


def test_the_report_command_leaves_the_collector_as_it_found_it(log: BuiltLog, cli: Cli) -> None:
    result = cli("report", NEWSLETTER)
    assert result.exit_code == 0, result.output
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_segment_filter_narrows_every_figure(log: BuiltLog, cli: Cli) -> None:
    result = cli("report", NEWSLETTER, "--segment", "associations", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = log.expected_segments()["associations"]
    assert data["segment_filter"] == "associations"
    assert list(data["segments"]) == ["associations"]
    assert data["totals"] == {st: expected.get(st, 0) for st in Status}
    assert data["bounces"]["by_kind"] == {"hard": 1}
    assert {f["code"] for f in data["failures"] if f["status"] == "failed"} == {553}


def test_table_summary_shows_counts_percentages_and_warnings(log: BuiltLog, cli: Cli) -> None:
    result = cli("report", NEWSLETTER)
    assert result.exit_code == 0, result.output
    out = result.stdout
    police = log.expected_segments()["local-police"]
    n = len(log.addresses["local-police"])
    row = next(line for line in out.splitlines() if "local-police" in line)
    assert f"{police['sent']} ({100 * police['sent'] / n:.1f}%)" in row
    assert f"{police['failed']} ({100 * police['failed'] / n:.1f}%)" in row
    assert "5.1.1 <address>: Recipient address rejected" in out
    assert "2 deferred, 0 due now" in out
    assert "policy bounce" in out and "Warning" in out
    assert "Opt-outs from this campaign: 1 (1 one-click); 1 undone" in out


def test_status_lists_who_did_not_get_it(log: BuiltLog, cli: Cli) -> None:
    result = cli("report", NEWSLETTER, "--status", "failed", "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout.lstrip("\ufeff"))))
    assert {r["email"] for r in rows} == set(log.refused)
    for r in rows:
        code, reply = log.refused[r["email"]]
        assert r["status"] == "failed" and r["smtp_code"] == str(code)
        assert r["smtp_reply"].endswith(reply) and r["last_attempt_at"]
        assert r["segment"] == log.segment_of(r["email"])

    table = cli("report", NEWSLETTER, "--status", "failed")
    assert table.exit_code == 0, table.output
    assert f"{len(log.refused)} recipient(s) failed" in table.stdout
    for address in log.refused:
        assert address in table.stdout.replace("\n", "")
    assert "Policía Municipal" in table.stdout
    sent_address = log.addresses["local-police"][-1]
    assert sent_address not in table.stdout


def test_csv_export_is_one_safe_row_per_delivery(log: BuiltLog, cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "deliveries.csv"
    result = cli("report", NEWSLETTER, "--format", "csv", "--output", str(target))
    assert result.exit_code == 0, result.output
    raw = target.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # UTF-8 BOM: Excel reads the accents right
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"))))
    assert list(rows[0]) == DELIVERY_COLUMNS
    everyone = [a for members in log.addresses.values() for a in members]
    assert sorted(r["email"] for r in rows) == sorted(everyone)
    assert {r["email"]: r["status"] for r in rows} == {a: log.expected_status(a) for a in everyone}
    formula = next(r for r in rows if r["email"] == log.addresses["associations"][0])
    assert formula["organisation"] == "'" + FORMULA_ORG
    assert all(not r[c].startswith(("=", "+", "-", "@")) for r in rows for c in DELIVERY_COLUMNS)
    assert "Policía Municipal" in {r["organisation"] for r in rows}
    assert not list(tmp_path.glob(".deliveries.csv.*"))  # no temporary file left behind


def test_html_page_is_self_contained_and_escaped(log: BuiltLog, cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    result = cli("report", NEWSLETTER, "--format", "html", "-o", str(target))
    assert result.exit_code == 0, result.output
    page = target.read_text(encoding="utf-8")
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org", "")
    assert "@media print" in page
    # Reply texts are data: the quoted <address> is escaped, never markup.
    assert "&lt;address&gt;: Recipient address rejected" in page
    assert page.count('class="bar" data-kind="failed"') >= 3  # segments x2 + failures chart
    assert 'id="policy-warning"' in page
    police = log.expected_segments()["local-police"]
    assert f"<title>local-police: {police['sent']} sent" in page


def test_invitation_report_counts_rsvps(db: Database, settings: Settings, cli: Cli) -> None:
    addresses = build_invitation_log(db, settings)
    data = json.loads(cli("report", INVITATION, "--format", "json").stdout)
    assert data["campaign"]["kind"] == "invitation"
    assert data["totals"]["sent"] == len(addresses)
    assert data["rsvps"] == {"yes": 2, "no": 1}
    assert "RSVPs: 2 yes, 1 no (3 answers)" in cli("report", INVITATION).stdout


def test_campaigns_lists_each_logged_campaign_with_figures(
    log: BuiltLog, db: Database, settings: Settings, cli: Cli
) -> None:
    build_invitation_log(db, settings)
    result = cli("campaigns", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {r["slug"]: r for r in json.loads(result.stdout)}
    news = rows[NEWSLETTER]
    totals = sum(log.expected_segments().values(), Counter())
    assert news["subject"] and news["kind"] == "newsletter"  # the definition's columns stay
    for status in ("sent", "deferred", "failed", "bounced", "unknown", "skipped"):
        assert news[status] == totals.get(status, 0), status
    assert news["opted_out"] == log.optouts_active
    assert news["started_at"]
    assert rows[INVITATION]["sent"] == 5 and rows[INVITATION]["finished_at"]


def test_bad_input_is_one_line_and_writes_nothing(log: BuiltLog, cli: Cli, tmp_path: Path) -> None:
    unknown = cli("report", "newsletter-1999-01")
    assert unknown.exit_code == 1
    assert unknown.stderr.strip().splitlines() == [
        f"Error: no delivery log for campaign 'newsletter-1999-01' (logged: {NEWSLETTER})"
    ]
    target = tmp_path / "out.json"
    segment = cli("report", NEWSLETTER, "--segment", "nope", "--format", "json", "-o", str(target))
    assert segment.exit_code == 1 and "no deliveries in segment 'nope'" in segment.stderr
    assert not target.exists()
    status = cli("report", NEWSLETTER, "--status", "lost")
    assert status.exit_code == 2 and "'lost' is not one of" in status.stderr
    folder = cli("report", NEWSLETTER, "--format", "csv", "-o", str(tmp_path / "none" / "x.csv"))
    assert folder.exit_code == 2
    assert folder.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'none' / 'x.csv'}: the folder {tmp_path / 'none'} does not exist"
    ]
