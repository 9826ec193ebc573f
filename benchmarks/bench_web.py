"""The unsubscribe page under uvicorn on 127.0.0.1: GET page views and one-click POSTs.

Serves ``create_app`` in a thread, then makes ``--requests`` sequential requests with one
keep-alive httpx client: first GET /u/TOKEN for distinct recipients, then the RFC 8058
one-click POST for each. Every response must be 200, and the suppressions must all be in
the database at the end, so a broken app cannot post a fast figure. Prints one JSON line
per kind of request: requests, seconds, rate, milliseconds each.

Example:
    python benchmarks/bench_web.py --requests 500
    python benchmarks/bench_web.py --database-url postgresql+psycopg://postgres@127.0.0.1:55432/bench
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from sqlalchemy import func, select

from clara_mailer.mailer import Mailer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.store.database import open_database
from clara_mailer.store.models import Campaign, Recipient, Suppression
from clara_mailer.web.app import create_app
from tests.web_server import serve_in_thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--database-url", help="an empty database (default: a new SQLite file)")
    args = parser.parse_args()
    url = args.database_url or f"sqlite:///{tempfile.mkdtemp()}/bench-web.db"
    settings = Settings(database_url=url, secret_key="bench-secret-key-0123456789abcdef")
    db = open_database(settings)
    signer = TokenSigner(db.secret_key(settings))
    with db.session() as s:
        campaign = Campaign(slug="bench-web", kind="newsletter")
        people = [
            Recipient(email=f"r{i}@bench.example", email_key=f"r{i}@bench.example")
            for i in range(args.requests)
        ]
        s.add(campaign)
        s.add_all(people)
        s.flush()
        tokens = [signer.sign("u", campaign.id, person.id) for person in people]

    with serve_in_thread(create_app(Mailer(settings))) as base, httpx.Client(base_url=base) as http:
        kinds = {
            "get-page": lambda token: http.get(f"/u/{token}"),
            "one-click": lambda token: http.post(
                f"/u/{token}", data={"List-Unsubscribe": "One-Click"}
            ),
        }
        for kind, request in kinds.items():
            start = time.perf_counter()
            for token in tokens:
                response = request(token)
                if response.status_code != 200:
                    raise SystemExit(f"{kind}: HTTP {response.status_code}")
            seconds = time.perf_counter() - start
            figure = {
                "benchmark": "web",
                "database": db.dialect,
                "kind": kind,
                "requests": len(tokens),
                "seconds": round(seconds, 3),
                "per_second": round(len(tokens) / seconds, 1),
                "ms_each": round(seconds / len(tokens) * 1000, 2),
            }
            print(json.dumps(figure), flush=True)

    with db.session() as s:
        stored = s.scalar(select(func.count()).select_from(Suppression))
    if stored != len(tokens):
        raise SystemExit(f"expected {len(tokens)} suppressions, found {stored}")
    db.dispose()


if __name__ == "__main__":
    main()
