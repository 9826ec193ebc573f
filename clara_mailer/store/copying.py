"""Copy a whole clara-mail database to another (SQLite -> PostgreSQL, typically).

The target is upgraded to the newest schema and must hold no data of its own (the
standard segments the first migration creates are replaced by the source's). Rows keep
their ids, so tokens already sent out (which name campaign and recipient ids) stay valid,
and the copy runs in one transaction on the target: all or nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Table, delete, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from clara_mailer.core.errors import DatabaseError
from clara_mailer.store.database import Database
from clara_mailer.store.models import Base, Campaign, Recipient, Segment

CHUNK = 5000


@dataclass
class CopyReport:
    source: str
    target: str
    rows: dict[str, int] = field(default_factory=dict)


def _tables() -> list[Table]:
    return list(Base.metadata.sorted_tables)


def check_source_exists(url: str) -> None:
    """DatabaseError unless a SQLite source names an existing file.

    Call it before opening the source: opening a SQLite URL creates the file (and its
    directory), so a typo would otherwise be copied as an empty database.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"database URL is not valid: {url!r}") from None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    path = Path(parsed.database)
    if not path.is_file():
        raise DatabaseError(f"the source database {path} does not exist")


def copy_database(
    source: Database, target: Database, *, progress: Callable[[str, int], None] | None = None
) -> CopyReport:
    source.ensure_current()
    target.ensure_current()
    if source.url == target.url:
        raise DatabaseError("the source and the target are the same database")
    report = CopyReport(source.safe_url, target.safe_url)
    with target.engine.begin() as out:
        for model in (Recipient, Campaign):
            if out.scalar(select(func.count()).select_from(model)):
                raise DatabaseError(
                    f"the target {target.safe_url} already holds {model.__table__.name}: "
                    "copy only into a new, empty database"
                )
        out.execute(delete(Segment))
        with source.engine.connect() as inp:
            for table in _tables():
                count = 0
                result = inp.execution_options(yield_per=CHUNK).execute(select(table))
                for chunk in result.partitions(CHUNK):
                    out.execute(table.insert(), [dict(row._mapping) for row in chunk])
                    count += len(chunk)
                    if progress is not None:
                        progress(table.name, count)
                report.rows[table.name] = count
        if target.dialect == "postgresql":
            # Rows kept their ids: move each id sequence past the largest copied id.
            for table in _tables():
                if "id" in table.c and table.c.id.autoincrement:
                    out.execute(
                        text(
                            f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), "
                            f"COALESCE((SELECT MAX(id) FROM {table.name}), 0) + 1, false)"
                        )
                    )
    return report
