"""The plan's two passes over the segments: the read-only preview a shell shows before
asking, and the commit that writes the rows. Both skip hashing addresses while no
suppression of the campaign's kind exists, and the commit writes its rows through one
compiled INSERT: these tests hold both to what the rows must be, on SQLite and
PostgreSQL, in several chunks."""

from __future__ import annotations

import datetime as dt
from collections import Counter

import pytest
from sqlalchemy import insert, select

from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import Status
from clara_mailer.deliverylog import log
from clara_mailer.deliverylog.log import open_campaign
from clara_mailer.mailer import Mailer
from clara_mailer.optouts.suppressions import any_active_suppression, lift, suppress
from clara_mailer.plan.plan import Plan, SendOptions, commit_plan, preview_plan
from clara_mailer.store import tables
from clara_mailer.store.database import Database
from clara_mailer.store.models import Campaign, Delivery, Recipient
from tests.send_helpers import add_recipients, add_to_segment

CAMPAIGN = "newsletter-2022-01"  # a newsletter
SEGMENTS = ("local-police", "associations")


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 4 members: a few recipients cross several chunks and transactions."""
    monkeypatch.setattr(log, "PLAN_CHUNK", 4)


def _preview(db: Database, settings: Settings) -> Plan:
    mailer = Mailer(settings, database=db)
    return preview_plan(db, settings, mailer.signer, CAMPAIGN, SendOptions(segments=SEGMENTS))


def _commit(db: Database, settings: Settings, preview: Plan) -> Plan:
    mailer = Mailer(settings, database=db)
    return commit_plan(db, settings, mailer.signer, preview, SendOptions(segments=SEGMENTS))


def _rows(db: Database) -> dict[str, Delivery]:
    with db.session() as s:
        rows = s.scalars(select(Delivery).join(Campaign).where(Campaign.slug == CAMPAIGN)).all()
        s.expunge_all()
    return {row.email or "": row for row in rows}


def _suppress(db: Database, signer: TokenSigner, address: str, reason: str, scope: str) -> None:
    with db.session() as s:
        suppress(s, signer, address, reason=reason, scope=scope)


def test_preview_counts_what_the_commit_writes(
    db: Database, settings: Settings, small_chunks: None
) -> None:
    police = add_recipients(db, 9, "local-police")
    associations = add_recipients(db, 6, "associations", prefix="asoc", domain="asoc.example")
    add_to_segment(db, associations[0], "local-police")  # planned once, under local-police
    signer = Mailer(settings, database=db).signer
    _suppress(db, signer, police[2].upper(), "unsubscribe", "all")  # the hash is case-folded
    _suppress(db, signer, police[7], "hard-bounce", "newsletter")
    _suppress(db, signer, associations[3], "manual", "invitation")  # not this kind
    _suppress(db, signer, associations[4], "complaint", "all")
    with db.session() as s:
        lift(s, signer, associations[4], note="came back")  # lifted: no longer counts

    preview = _preview(db, settings)
    assert _rows(db) == {}  # the preview wrote nothing
    assert preview.new_rows == {"local-police": (8, 2), "associations": (5, 0)}
    plan = _commit(db, settings, preview)

    rows = _rows(db)
    assert (plan.added, plan.skipped) == (preview.added, preview.skipped) == (13, 2)
    assert len(rows) == 15
    assert rows[associations[0]].segment == "local-police"
    skipped = {a: r.smtp_reply for a, r in rows.items() if r.status == "skipped"}
    assert skipped == {police[2]: "suppressed: unsubscribe", police[7]: "suppressed: hard-bounce"}
    per_segment = Counter((r.segment, r.status) for r in rows.values())
    assert per_segment == {
        ("local-police", "queued"): 8,
        ("local-police", "skipped"): 2,
        ("associations", "queued"): 5,
    }
    # The figures kept per segment (campaign_segments) are exact.
    assert (
        plan.counts
        == preview.counts
        == {
            "local-police": {"queued": 8, "skipped": 2},
            "associations": {"queued": 5},
        }
    )
    with db.session() as s:
        recipients = {r.email: r for r in s.scalars(select(Recipient))}
    for address, row in rows.items():
        recipient = recipients[address]
        assert (row.recipient_id, row.language) == (recipient.id, recipient.language)
        assert (row.attempts, row.worker_id, row.next_attempt_at) == (0, None, None)
        assert row.created_at is not None and row.smtp_code is None
        if row.status == "queued":
            assert row.smtp_reply is None

    # Idempotent: a second plan finds everyone planned and adds nothing.
    again = _commit(db, settings, _preview(db, settings))
    assert (again.added, again.skipped) == (0, 0)
    assert len(_rows(db)) == 15


def test_no_suppression_of_the_kind_hashes_nothing_and_skips_nobody(
    db: Database, settings: Settings, small_chunks: None
) -> None:
    police = add_recipients(db, 7, "local-police")
    signer = Mailer(settings, database=db).signer
    _suppress(db, signer, police[1], "manual", "invitation")
    _suppress(db, signer, police[2], "unsubscribe", "all")
    with db.session() as s:
        lift(s, signer, police[2])
        assert not any_active_suppression(s, "newsletter")
        assert any_active_suppression(s, "invitation")

    preview = _preview(db, settings)
    assert preview.new_rows == {"local-police": (7, 0), "associations": (0, 0)}
    _commit(db, settings, preview)
    assert Counter(r.status for r in _rows(db).values()) == {"queued": 7}


def test_an_optout_between_preview_and_commit_is_skipped(
    db: Database, settings: Settings, small_chunks: None
) -> None:
    """The preview found no suppression at all (and hashed nothing); the commit checks
    again, in the transaction of each chunk, and skips the address opted out meanwhile
    (while the user read the plan at the prompt)."""
    police = add_recipients(db, 10, "local-police")
    preview = _preview(db, settings)
    assert preview.new_rows["local-police"] == (10, 0)

    _suppress(db, Mailer(settings, database=db).signer, police[9], "one-click", "all")
    plan = _commit(db, settings, preview)

    rows = _rows(db)
    assert (plan.added, plan.skipped) == (9, 1)
    assert rows[police[9]].status == "skipped"
    assert rows[police[9]].smtp_reply == "suppressed: one-click"
    assert plan.counts == {"local-police": {"queued": 9, "skipped": 1}}


def test_a_plan_resumed_after_newcomers_adds_only_them(
    db: Database, settings: Settings, small_chunks: None
) -> None:
    """A second plan (a resumed send) adds a row for each member that has none yet, with
    the segment's count grown by exactly those."""
    add_recipients(db, 5, "local-police")
    _commit(db, settings, _preview(db, settings))
    later = add_recipients(db, 6, "local-police", start=5)
    _suppress(db, Mailer(settings, database=db).signer, later[0], "unsubscribe", "newsletter")

    preview = _preview(db, settings)
    assert preview.new_rows["local-police"] == (5, 1)
    plan = _commit(db, settings, preview)

    assert (plan.added, plan.skipped) == (5, 1)
    assert plan.counts == {"local-police": {"queued": 10, "skipped": 1}}
    assert len(_rows(db)) == 11


def test_planned_rows_are_stored_as_sqlalchemy_stores_them(db: Database) -> None:
    """The plan's compiled insert converts its values itself: each column must reach the
    database exactly as through SQLAlchemy's own insert (SQLite's DATETIME as text with
    its microseconds even when they are 0, the enums as their words)."""
    add_recipients(db, 4, language="en")
    campaign_id = open_campaign(db, CAMPAIGN, "newsletter", "0" * 64)
    now = dt.datetime(2022, 1, 20, 9, 0, 0)  # microsecond 0: ISO text would drop it
    columns = ", ".join(c for c in log._PLANNED_COLUMNS if c not in ("recipient_id", "email"))
    with db.session() as s:
        conn = s.connection()
        members = conn.execute(
            select(Recipient.id, Recipient.email, Recipient.language).order_by(Recipient.id)
        ).all()
        log._PlannedInsert(conn).write(
            conn, campaign_id, "local-police", members[:2], {members[1].id: "manual"}, now
        )
        for member, reason in ((members[2], None), (members[3], "manual")):
            conn.execute(
                insert(tables.deliveries).values(
                    campaign_id=campaign_id,
                    recipient_id=member.id,
                    email=member.email,
                    segment="local-police",
                    language=member.language,
                    status=Status.SKIPPED if reason else Status.QUEUED,
                    smtp_reply=f"suppressed: {reason}" if reason else None,
                    attempts=0,
                    created_at=now,
                )
            )
        # Raw values: what the database holds, not what SQLAlchemy reads back.
        stored = conn.exec_driver_sql(
            f"SELECT recipient_id, email, {columns} FROM deliveries ORDER BY recipient_id"
        ).all()
    ours, sqlalchemys = stored[:2], stored[2:]
    assert [row[2:] for row in ours] == [row[2:] for row in sqlalchemys]
    assert [tuple(row[:2]) for row in stored] == [(m.id, m.email) for m in members]
    if db.dialect == "sqlite":
        assert {row[-1] for row in stored} == {"2022-01-20 09:00:00.000000"}
    assert {row[5] for row in ours} == {"queued", "skipped"}


def test_the_set_based_plan_insert_stores_what_the_per_row_insert_stores(db: Database) -> None:
    """PostgreSQL plans a chunk with one INSERT ... SELECT FROM unnest: the same values
    as row by row, ids ascending in the members' order, and a member planned already is
    left alone (ON CONFLICT DO NOTHING), its row unchanged."""
    if db.dialect != "postgresql":
        pytest.skip("SQLite inserts row by row")
    add_recipients(db, 6, language="en")
    first = open_campaign(db, CAMPAIGN, "newsletter", "0" * 64)
    second = open_campaign(db, "invitation-2022-02", "invitation", "0" * 64)
    now = dt.datetime(2022, 1, 20, 9, 0, 0, 7)
    with db.session() as s:
        conn = s.connection()
        members = conn.execute(
            select(Recipient.id, Recipient.email, Recipient.language).order_by(Recipient.id.desc())
        ).all()
        reasons = {members[1].id: "manual", members[4].id: 'hard "bounce", {x}'}
        for campaign_id, set_based in ((first, True), (second, False)):
            planned = log._PlannedInsert(conn)
            planned.set_based = set_based
            # One member planned already, under another segment: it must stay as it is.
            planned.write(conn, campaign_id, "ngos", members[2:3], {}, now)
            planned.write(conn, campaign_id, "local-police", members, reasons, now)
        columns = ", ".join(c for c in log._PLANNED_COLUMNS if c != "campaign_id")
        stored = {
            campaign_id: conn.exec_driver_sql(
                f"SELECT {columns} FROM deliveries WHERE campaign_id = {campaign_id} ORDER BY id"
            ).all()
            for campaign_id in (first, second)
        }
    assert stored[first] == stored[second]
    assert [row[0] for row in stored[first]] == [members[2].id] + [
        m.id for m in members if m.id != members[2].id
    ]
    assert stored[first][0][2] == "ngos"
    assert {row[5] for row in stored[first]} == {
        None,
        "suppressed: manual",
        'suppressed: hard "bounce", {x}',
    }


@pytest.mark.parametrize("where", [(), ("language=en",)])
def test_without_suppressions_the_preview_counts_what_the_commit_writes(
    db: Database, settings: Settings, small_chunks: None, where: tuple[str, ...]
) -> None:
    """No suppression of the kind: the preview counts each segment in one query. Members
    in both segments count once, under the first; members planned already and members
    the filters leave out do not count."""
    police = add_recipients(db, 9, "local-police")
    associations = add_recipients(db, 6, "associations", prefix="asoc", domain="asoc.example")
    for address in (*associations[:2], *police[:1]):
        add_to_segment(db, address, "associations" if address in police else "local-police")
    options = SendOptions(segments=SEGMENTS, where=where)
    mailer = Mailer(settings, database=db)
    first = preview_plan(db, settings, mailer.signer, CAMPAIGN, options)
    if where:  # the members whose language is English, each once, in its first segment
        with db.session() as s:
            english = set(s.scalars(select(Recipient.email).where(Recipient.language == "en")))
        in_police = {*police, *associations[:2]} & english
        expected = {
            "local-police": (len(in_police), 0),
            "associations": (len(set(associations[2:]) & english), 0),
        }
        assert 0 < len(english) < 15
    else:
        expected = {"local-police": (11, 0), "associations": (4, 0)}
    assert first.new_rows == expected
    plan = commit_plan(db, settings, mailer.signer, first, options)
    per_segment = Counter(r.segment for r in _rows(db).values())
    assert {slug: (per_segment[slug], 0) for slug in SEGMENTS} == expected
    assert (plan.added, plan.skipped) == (first.added, first.skipped)
    # Everyone planned: a second preview has nothing to add.
    again = preview_plan(db, settings, mailer.signer, CAMPAIGN, options)
    assert again.new_rows == {"local-police": (0, 0), "associations": (0, 0)}
