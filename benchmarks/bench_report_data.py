"""Fill a database with a large delivery log for the report benchmark, in bulk SQL.

One campaign (``newsletter-2022-01``), N recipients and N deliveries in every state the
report counts (mostly sent; some failed, deferred, bounced, skipped, unknown), plus a
bounce row per bounced delivery. The rows are generated inside the database (a
recursive CTE on SQLite, ``generate_series`` on PostgreSQL), so a million rows take
seconds, not the hours the ORM would. The schema is made first by ``clara-mail db
upgrade`` (Alembic), so the tables are exactly the application's.

Example:
    python benchmarks/bench_report_data.py sqlite:///report.db --deliveries 1000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from clara_mailer.deliverylog.figures import recount_segments

CAMPAIGN = "newsletter-2022-01"

# Out of every 100 deliveries: the state, by i % 100.
STATUS_CASE = """CASE
    WHEN i % 100 < 88 THEN 'sent'
    WHEN i % 100 < 91 THEN 'bounced'
    WHEN i % 100 < 93 THEN 'failed'
    WHEN i % 100 < 95 THEN 'deferred'
    WHEN i % 100 < 97 THEN 'skipped'
    WHEN i % 100 < 98 THEN 'unknown'
    ELSE 'queued' END"""

SEGMENT_CASE = """CASE i % 3
    WHEN 0 THEN 'national-authorities' WHEN 1 THEN 'local-police' ELSE 'associations' END"""


def _series(dialect: str, count: int) -> str:
    if dialect == "postgresql":
        return f"(SELECT generate_series(1, {count}) AS i) AS seq"
    return (
        f"(WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {count}) "
        "SELECT i FROM s) AS seq"
    )


def statements(dialect: str, count: int) -> list[str]:
    series = _series(dialect, count)
    now = "CURRENT_TIMESTAMP"
    # Deferred rows wait for their retry an hour from now, as the sender leaves them.
    later = (
        "CURRENT_TIMESTAMP + INTERVAL '1 hour'"
        if dialect == "postgresql"
        else "datetime(CURRENT_TIMESTAMP, '+1 hour')"
    )
    return [
        f"INSERT INTO campaigns (id, slug, kind, created_at, started_at) "
        f"VALUES (1, '{CAMPAIGN}', 'newsletter', {now}, {now})",
        f"""INSERT INTO recipients (id, email, email_key, name, organisation, language,
                country, consent_basis, consent_source, created_at, updated_at)
            SELECT i, 'person' || i || '@recipients.example',
                'person' || i || '@recipients.example', 'Persona ' || i,
                'Organización ' || (i % 97), CASE WHEN i % 3 = 0 THEN 'en' ELSE 'es' END,
                'ES', 'legitimate-interest', 'benchmark', {now}, {now}
            FROM {series}""",
        # The standard segments come with the schema (migration 0001).
        f"""INSERT INTO recipient_segments (recipient_id, segment_id)
            SELECT i, segments.id FROM {series}
            JOIN segments ON segments.slug = {SEGMENT_CASE}""",
        f"""INSERT INTO deliveries (id, campaign_id, recipient_id, email, segment, language,
                status, attempts, smtp_code, smtp_reply, message_id, created_at,
                first_attempt_at, last_attempt_at, sent_at, next_attempt_at)
            SELECT i, 1, i, 'person' || i || '@recipients.example', {SEGMENT_CASE},
                CASE WHEN i % 3 = 0 THEN 'en' ELSE 'es' END, {STATUS_CASE},
                CASE WHEN i % 100 < 97 THEN 1 ELSE 0 END,
                CASE WHEN i % 100 < 91 THEN 250 WHEN i % 100 < 93 THEN 550
                     WHEN i % 100 < 95 THEN 451 ELSE NULL END,
                CASE WHEN i % 100 < 91 THEN '2.0.0 Ok: queued'
                     WHEN i % 100 < 93 THEN '5.1.1 User unknown'
                     WHEN i % 100 < 95 THEN '4.7.1 Try again later' ELSE NULL END,
                '<' || i || '.newsletter-2022-01@clara.example>', {now},
                {now}, {now}, CASE WHEN i % 100 < 91 THEN {now} ELSE NULL END,
                CASE WHEN i % 100 >= 93 AND i % 100 < 95 THEN {later} ELSE NULL END
            FROM {series}""",
        f"""INSERT INTO bounces (message_key, delivery_id, campaign_id, address_hash, kind,
                status_code, action, diagnostic, received_at)
            SELECT 'bounce-' || i, i, 1, 'hash' || i, 'hard', '5.1.1', 'failed',
                'smtp; 550 5.1.1 user unknown', {now}
            FROM {series} WHERE i % 100 >= 88 AND i % 100 < 91""",
    ]


def _resync_sequences(conn: object) -> None:
    """Explicit ids leave PostgreSQL's sequences behind: move them past the data."""
    for table in ("campaigns", "recipients", "deliveries", "bounces"):
        conn.execute(  # type: ignore[attr-defined]
            text(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"COALESCE((SELECT MAX(id) FROM {table}), 1))"
            )
        )


def clara_command() -> list[str]:
    script = Path(sys.executable).with_name("clara-mail")
    return [str(script)] if script.exists() else [sys.executable, "-m", "clara_mailer"]


#: Pages of `deliveries`, and how many of them the visibility map marks all-visible.
_VISIBILITY = text("SELECT relpages, relallvisible FROM pg_class WHERE relname = 'deliveries'")


def fill(url: str, count: int, workdir: Path) -> float:
    """Create the schema at ``url`` and fill it; return the seconds the inserts took."""
    env = {"CLARA_DATABASE_URL": url, "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [*clara_command(), "db", "upgrade"], cwd=workdir, env=env, check=True, capture_output=True
    )
    engine = create_engine(url)
    started = time.perf_counter()
    with engine.begin() as conn:
        for statement in statements(engine.dialect.name, count):
            conn.execute(text(statement))
        # Rows written in bulk SQL, not by the plan: count them per segment as it would.
        recount_segments(conn, 1)
        if engine.dialect.name == "postgresql":
            _resync_sequences(conn)
    # Fresh statistics, as a database in use would have. On PostgreSQL also what
    # autovacuum does within a minute of a million inserts (autovacuum_naptime 1 min,
    # insert threshold 1,000 + 20%): VACUUM sets the visibility map, without which every
    # index-only scan of the report also reads the table (0.57-0.67 s instead of
    # 0.44-0.50 s for the whole `report` over 1,000,000 deliveries, measured here).
    # A VACUUM right after the fill can leave every page of `deliveries` not all-visible
    # (relallvisible 0 of 2,538 pages at 100,000 rows, measured here), as if a snapshot
    # older than the fill were still open on the server; a few seconds later a VACUUM
    # marks them all. With the map unset the report took 0.65-0.76 s instead of ~0.44 s,
    # by whether autovacuum had come by since: so VACUUM again until the map is set.
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM (ANALYZE)"))
            for _ in range(60):
                pages, visible = conn.execute(_VISIBILITY).one()
                if visible >= pages:
                    break
                time.sleep(1)
                conn.execute(text("VACUUM deliveries"))
            else:
                raise RuntimeError("deliveries: VACUUM left pages not all-visible for 60 s")
            # Written out now, not by the checkpointer while the next rows are timed.
            conn.execute(text("CHECKPOINT"))
    else:
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()
    engine.dispose()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="SQLAlchemy URL of an empty database")
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    seconds = fill(args.url, args.deliveries, args.workdir)
    print(json.dumps({"deliveries": args.deliveries, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
