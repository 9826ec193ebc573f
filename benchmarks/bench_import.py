"""Import speed and peak memory: ``clara-mail import`` of generated CSV files.

Generates files of 100,000 and 1,000,000 rows (semicolon-separated, UTF-8, names with
accents, 2,000 domains, 1% case-variant duplicates, a segment column) in a temporary
directory, runs ``clara-mail import`` on each in a fresh process into a fresh database,
and prints rows/s and the child's peak RSS. Flat memory shows as the same MB for both.

    .venv/bin/python benchmarks/bench_import.py                  # SQLite
    .venv/bin/python benchmarks/bench_import.py --postgres postgresql+psycopg://postgres@127.0.0.1:55432/postgres
    .venv/bin/python benchmarks/bench_import.py --rows 100000    # one size only
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import tempfile
import time
import unicodedata
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

SEGMENTS = ("national-authorities", "local-police", "associations")
FIRST = ("María", "José", "Lucía", "Íñigo", "Núria", "Andrés", "Begoña", "Raúl", "Ana", "Jon")
LAST = ("Pérez", "Muñoz", "Gómez", "Ibáñez", "Sánchez", "Martín", "López", "Ruiz", "Díaz")


def generate(path: Path, rows: int, seed: int = 2022) -> None:
    rng = random.Random(seed)
    domains = [f"entidad-{i}.example" for i in range(2000)]
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, delimiter=";", lineterminator="\r\n")
        writer.writerow(["Correo electrónico", "Nombre", "Entidad", "Segmento", "Idioma", "País"])
        for n in range(rows):
            # 1% repeat an earlier row's address in capitals: in-file duplicates.
            i = rng.randrange(n) if n and rng.random() < 0.01 else n
            first, last = FIRST[i % len(FIRST)], LAST[(i // 7) % len(LAST)]
            plain = unicodedata.normalize("NFKD", f"{first[0]}.{last}{i}")
            local = plain.encode("ascii", "ignore").decode().lower()
            address = f"{local}@{domains[i % len(domains)]}"
            if i != n:
                address = address.upper()
            writer.writerow(
                [
                    address,
                    f"{first} {last}",
                    f"Asociación «{last}», {i % 977}",
                    SEGMENTS[i % 3],
                    "es" if i % 4 else "en",
                    "ES",
                ]
            )


def fresh_database(postgres: str | None, workdir: Path) -> tuple[str, str | None]:
    if postgres is None:
        return f"sqlite:///{workdir / f'bench-{uuid.uuid4().hex[:8]}.db'}", None
    name = f"clara_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(postgres).set(database=name).render_as_string(hide_password=False), name


def drop_database(postgres: str, name: str) -> None:
    admin = create_engine(postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run_import(csv_path: Path, database_url: str, workdir: Path) -> tuple[float, float, float, str]:
    """Wall and CPU seconds, peak RSS (MB) and output of one ``clara-mail import``."""
    env = dict(os.environ, CLARA_DATABASE_URL=database_url)
    env["CLARA_SECRET_KEY"] = "bench-secret-key-0123456789abcdef"
    exe = Path(sys.executable).with_name("clara-mail")
    # Create and migrate the database first, so only the import is timed.
    subprocess.run([str(exe), "segments"], env=env, cwd=workdir, check=True, capture_output=True)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [str(exe), "import", str(csv_path), "--segment", "associations"],
            env=env,
            cwd=workdir,
            stdout=out,
            stderr=err,
        )
        # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would be the max of all).
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode not in (0, 1):
        raise SystemExit(f"import failed ({child.returncode}): {stderr.strip()}")
    cpu = usage.ru_utime + usage.ru_stime
    return seconds, cpu, usage.ru_maxrss / 1024, stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, action="append", help="rows (repeatable)")
    parser.add_argument("--postgres", metavar="URL", help="server URL to create databases on")
    args = parser.parse_args()
    sizes = args.rows or [100_000, 1_000_000]
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(f"clara-mail import benchmark ({backend}, {os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="clara-bench-import-") as tmp:
        workdir = Path(tmp)
        for rows in sizes:
            csv_path = workdir / f"recipients-{rows}.csv"
            generate(csv_path, rows)
            size_mb = csv_path.stat().st_size / 1e6
            url, pg_name = fresh_database(args.postgres, workdir)
            try:
                seconds, cpu, peak_mb, summary = run_import(csv_path, url, workdir)
            finally:
                if args.postgres and pg_name:
                    drop_database(args.postgres, pg_name)
            print(
                f"{rows:>9,} rows ({size_mb:6.1f} MB file): {seconds:6.2f} s, "
                f"{rows / seconds:>8,.0f} rows/s; CPU {cpu:6.2f} s of the import process "
                f"({rows / cpu:,.0f} rows/CPU-s); peak RSS {peak_mb:6.1f} MB"
            )
            print(f"    {summary.splitlines()[0] if summary else ''}")


if __name__ == "__main__":
    main()
