"""Time the delivery report over a large delivery log (a million rows by default).

The log is generated in bulk SQL by bench_report_data.py (SQLite file, and PostgreSQL
when ``--postgres-url`` names a server: a fresh database is created there and dropped
afterwards). Then each report is timed in-process through the library, as the CLI
runs it: the JSON figures, the terminal summary, the HTML page, the campaigns overview,
the ``--status failed`` listing and the streamed CSV export (with its peak Python
memory, which must not grow with the log).

Example:
    python benchmarks/bench_report.py --deliveries 1000000 \
        --postgres-url postgresql+psycopg://postgres@127.0.0.1:55432/postgres
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_report_data import CAMPAIGN, fill
from clara_mailer.cli.report_view import show_report
from clara_mailer.core.settings import Settings
from clara_mailer.reporting.report import build_report, campaign_overview
from clara_mailer.store.database import open_database


class _Sink(io.StringIO):
    """A text stream that counts and forgets what is written (as a pipe to a file would)."""

    def __init__(self) -> None:
        super().__init__()
        self.chars = 0

    def write(self, s: str) -> int:
        self.chars += len(s)
        return len(s)


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


def run(url: str, repeat: int) -> None:
    settings = Settings(database_url=url, secret_key="bench-secret-0123456789abcdef")
    db = open_database(settings)

    def to_sink(
        fmt: str, segment: str | None = None, status: str | None = None, sink: _Sink | None = None
    ) -> Callable[[], object]:
        def go() -> None:
            out = Console(file=sink or _Sink(), width=120)
            show_report(db, CAMPAIGN, fmt, segment, status, None, out)

        return go

    cases: list[tuple[str, Callable[[], object]]] = [
        ("figures (build_report)", lambda: build_report(db, CAMPAIGN)),
        ("report --format json", to_sink("json")),
        ("report (table summary)", to_sink("table")),
        ("report --format html", to_sink("html")),
        ("report --segment local-police --format json", to_sink("json", "local-police")),
        ("campaigns overview", lambda: campaign_overview(db, settings)),
        ("report --status failed --format csv", to_sink("csv", status="failed")),
    ]
    try:
        for name, fn in cases:
            best, median = _time(fn, repeat)
            print(f"  {name:<46} best {best:6.3f} s   median {median:6.3f} s")
        # The whole export, timed alone; then again under tracemalloc for its peak memory.
        sink = _Sink()
        started = time.perf_counter()
        to_sink("csv", sink=sink)()
        seconds = time.perf_counter() - started
        tracemalloc.start()
        to_sink("csv")()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"  {'report --format csv (every delivery)':<46} {seconds:6.2f} s, "
            f"{sink.chars / 1e6:.0f} M chars, peak Python memory {peak / 1e6:.1f} MB"
        )
    finally:
        db.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per report")
    parser.add_argument("--postgres-url", help="a PostgreSQL server to benchmark as well")
    parser.add_argument("--keep", type=Path, help="keep the SQLite file here (default: a temp dir)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        workdir = Path(tmp)
        path = args.keep or workdir / "report.db"
        if path.exists():
            raise SystemExit(f"{path} exists: give a new file to --keep")
        sqlite_url = f"sqlite:///{path}"
        seconds = fill(sqlite_url, args.deliveries, workdir)
        print(f"SQLite ({path}): {args.deliveries:,} deliveries generated in {seconds:.1f} s")
        run(sqlite_url, args.repeat)

        if args.postgres_url:
            name = f"clara_bench_{uuid.uuid4().hex[:10]}"
            admin = create_engine(args.postgres_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            url = make_url(args.postgres_url).set(database=name)
            pg_url = url.render_as_string(hide_password=False)
            try:
                seconds = fill(pg_url, args.deliveries, workdir)
                print(f"PostgreSQL: {args.deliveries:,} deliveries generated in {seconds:.1f} s")
                run(pg_url, args.repeat)
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
