"""The report's counts come from ``campaign_segments`` (kept by the plan) and two partial
indexes (migration 0005), not from a scan of the log. These tests hold them to a count of
the whole log after real sends, bounces, opt-outs, an erasure, a second plan and a copy,
on SQLite and PostgreSQL, and check that the report's queries really use the indexes."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, insert, select, text

from clara_mailer.core.settings import Settings
from clara_mailer.core.vocabulary import Status
from clara_mailer.deliverylog.figures import recount_segments, segment_status_counts
from clara_mailer.mailer import Mailer
from clara_mailer.reporting.report import build_report
from clara_mailer.store import tables
from clara_mailer.store.database import Database
from tests.report_helpers import NEWSLETTER, build_newsletter_log, send
from tests.send_helpers import add_recipients

D = tables.deliveries


def _whole_log(db: Database, campaign_id: int) -> dict[str, dict[Status, int]]:
    """segment -> status -> count, by a GROUP BY over every row (the reference)."""
    out: dict[str, dict[Status, int]] = {}
    with db.reading() as conn:
        for segment, status, n in conn.execute(
            select(D.c.segment, D.c.status, func.count())
            .where(D.c.campaign_id == campaign_id)
            .group_by(D.c.segment, D.c.status)
        ):
            out.setdefault(segment, {})[Status(status)] = n
    return out


def _assert_summary_is_the_log(db: Database) -> None:
    with db.reading() as conn:
        per_segment = Counter(
            {
                (c, s): n
                for c, s, n in conn.execute(
                    select(D.c.campaign_id, D.c.segment, func.count()).group_by(
                        D.c.campaign_id, D.c.segment
                    )
                )
            }
        )
        kept = Counter(
            {
                (c, s): n
                for c, s, n in conn.execute(select(tables.campaign_segments))
                if n  # a segment whose rows were all deleted keeps a 0
            }
        )
        campaign_ids = conn.scalars(select(tables.campaigns.c.id)).all()
    assert kept == per_segment
    for campaign_id in campaign_ids:
        with db.reading() as conn:
            assert segment_status_counts(conn, campaign_id) == _whole_log(db, campaign_id)
            for segment in _whole_log(db, campaign_id):
                assert segment_status_counts(conn, campaign_id, [segment]) == {
                    segment: _whole_log(db, campaign_id)[segment]
                }


def _campaign_id(db: Database) -> int:
    with db.reading() as conn:
        found: int = conn.execute(
            select(tables.campaigns.c.id).where(tables.campaigns.c.slug == NEWSLETTER)
        ).scalar_one()
        return found


def test_the_summary_follows_every_writer_of_the_log(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    log = build_newsletter_log(db, settings, tmp_path)  # sends, refusals, bounces, opt-outs
    campaign_id = _campaign_id(db)
    counts = _whole_log(db, campaign_id)
    assert {Status.SENT, Status.FAILED, Status.DEFERRED, Status.BOUNCED} <= set(
        counts["local-police"]
    )
    _assert_summary_is_the_log(db)

    Mailer(settings, database=db).erase(log.addresses["local-police"][0])  # keeps the row
    _assert_summary_is_the_log(db)

    # New members, a second plan and send (to the outbox): the counts grow by them only.
    add_recipients(db, 3, "local-police", prefix="nuevo", start=500)
    add_recipients(db, 2, "national-authorities", prefix="ministerio", start=600)
    segments = ("local-police", "associations", "national-authorities")
    send(db, settings, NEWSLETTER, segments)
    after = _whole_log(db, campaign_id)
    assert sum(after["local-police"].values()) == sum(counts["local-police"].values()) + 3
    assert sum(after["national-authorities"].values()) == 2
    _assert_summary_is_the_log(db)

    # Rows written behind the plan's back (a bulk load): recount_segments catches up.
    with db.engine.begin() as conn:
        conn.execute(
            insert(D),
            [
                {"campaign_id": campaign_id, "email": f"x{i}@raw.example", "segment": seg}
                for i, seg in enumerate(["raw-a", "raw-b", "raw-a", "local-police"])
            ],
        )
        recount_segments(conn, campaign_id)
    _assert_summary_is_the_log(db)

    report = build_report(db, NEWSLETTER)
    assert report.segments == _whole_log(db, campaign_id)


def test_a_copied_database_has_the_same_summary(
    db: Database, settings: Settings, tmp_path: Path
) -> None:
    build_newsletter_log(db, settings, tmp_path)
    from clara_mailer.store.copying import copy_database

    target = Database(f"sqlite:///{tmp_path / 'copy.db'}")
    try:
        target.ensure_current()
        copied = copy_database(db, target)
        assert copied.rows["campaign_segments"] == 2
        _assert_summary_is_the_log(target)
        assert build_report(target, NEWSLETTER).segments == build_report(db, NEWSLETTER).segments
    finally:
        target.dispose()


def test_the_report_reads_the_partial_indexes_not_the_log(
    settings: Settings, tmp_path: Path
) -> None:
    """SQLite's planner uses a partial index only when the query repeats its condition
    literally: EXPLAIN every statement the report runs, as it runs it."""
    db = Database(f"sqlite:///{tmp_path / 'plans.db'}")
    try:
        db.ensure_current()
        build_newsletter_log(db, settings, tmp_path)
        statements: list[tuple[str, Any]] = []

        def seen(conn: Any, cursor: Any, sql: str, params: Any, *_: Any) -> None:
            if sql.lstrip().upper().startswith("SELECT"):
                statements.append((sql, params))

        event.listen(db.engine, "before_cursor_execute", seen)
        build_report(db, NEWSLETTER)
        event.remove(db.engine, "before_cursor_execute", seen)
        plans: dict[str, str] = {}
        with db.engine.connect() as conn:
            for sql, params in statements:
                rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params).all()
                plans[sql] = " | ".join(str(r[-1]) for r in rows)
        unsent = [p for s, p in plans.items() if "<> 'sent'" in s]
        problems = [p for s, p in plans.items() if "smtp_reply" in s and "GROUP BY" in s]
        assert unsent and all("COVERING INDEX ix_deliveries_unsent" in p for p in unsent), plans
        assert problems and all("COVERING INDEX ix_deliveries_problems" in p for p in problems)
        assert all("TEMP B-TREE" not in p for p in problems), problems
        # No statement of the report walks the whole table.
        assert not [p for p in plans.values() if "SCAN deliveries" in p], plans
    finally:
        db.dispose()


def _migration(filename: str) -> Any:
    """A migration's module, loaded from migrations/versions/ (not a package)."""
    path = Path(__file__).parents[1] / "migrations" / "versions" / filename
    spec = importlib.util.spec_from_file_location(f"migration_{filename[:4]}", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    return migration


def test_the_partial_index_conditions_are_migration_0005s() -> None:
    migration = _migration("0005_report_summary.py")
    assert migration.UNSENT == tables.UNSENT
    assert migration.PROBLEMS == tables.PROBLEMS
    tables.declare_partial_indexes()
    with_where = {i.name: i for i in D.indexes if i.dialect_options["sqlite"]["where"] is not None}
    assert set(with_where) == {"ix_deliveries_unsent", "ix_deliveries_problems", *tables.SET_ONLY}
    assert str(text(tables.UNSENT)) in str(
        with_where["ix_deliveries_unsent"].dialect_options["sqlite"]["where"]
    )


def test_the_set_only_indexes_are_migration_0006s() -> None:
    migration = _migration("0006_partial_send_indexes.py")
    assert {name: (list(columns), columns[-1]) for name, columns in tables.SET_ONLY.items()} == (
        migration.INDEXES
    )
    tables.declare_partial_indexes()
    for name, columns in tables.SET_ONLY.items():
        index = next(i for i in D.indexes if i.name == name)
        assert [c.name for c in index.columns] == list(columns)
        for dialect in ("sqlite", "postgresql"):
            assert str(index.dialect_options[dialect]["where"]) == f"{columns[-1]} IS NOT NULL"
