"""Helpers for the sending tests: a registry filled directly through the models."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from sqlalchemy import insert, select

from clara_mailer.core.settings import Settings
from clara_mailer.store.database import Database
from clara_mailer.store.models import Delivery, Recipient, Segment, recipient_segments, utcnow


def add_recipients(
    db: Database,
    count: int,
    segment: str = "local-police",
    *,
    prefix: str = "agente",
    domain: str = "policia.example",
    language: str | None = None,
    start: int = 0,
) -> list[str]:
    """Add ``count`` recipients to ``segment``; returns their addresses."""
    now = utcnow()
    addresses = [f"{prefix}{i:05d}@{domain}" for i in range(start, start + count)]
    with db.session() as s:
        segment_id = s.scalar(select(Segment.id).where(Segment.slug == segment))
        rows = [
            {
                "email": a,
                "email_key": a.casefold(),
                "name": f"Agente {i}",
                "organisation": "Policía Municipal",
                "language": language or ("es" if i % 3 else "en"),
                "country": "ES",
                "consent_basis": "legitimate-interest",
                "consent_source": "test",
                "created_at": now,
                "updated_at": now,
            }
            for i, a in enumerate(addresses, start)
        ]
        s.execute(insert(Recipient), rows)
        ids = dict(
            s.execute(
                select(Recipient.email, Recipient.id).where(Recipient.email.in_(addresses))
            ).all()
        )
        s.execute(
            insert(recipient_segments),
            [{"recipient_id": ids[a], "segment_id": segment_id} for a in addresses],
        )
    return addresses


def add_to_segment(db: Database, address: str, segment: str) -> None:
    with db.session() as s:
        recipient = s.scalars(select(Recipient).where(Recipient.email == address)).one()
        recipient.segments.append(s.scalars(select(Segment).where(Segment.slug == segment)).one())


def start_sender(
    settings: Settings,
    smtp_url: str,
    cwd: Path,
    *args: str,
    output: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A real `clara-mail send` process (python -m clara_mailer) for crash and scale tests;
    ``args`` follow ``send`` (campaign, options)."""
    from tests.conftest import settings_env

    full_env = {
        **os.environ,
        **settings_env(settings),
        "CLARA_SMTP_URL": smtp_url,
        **(env or {}),
    }
    pipe = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "clara_mailer", "send", *args],
        cwd=cwd,
        env=full_env,
        stdout=pipe,
        stderr=pipe,
    )


def check_received_once(db: Database, received: Counter[str], total: int) -> Counter[str]:
    """The crash and scale-out promise, checked against what the SMTP server received:
    every recipient ended `sent` or `unknown`; each `sent` one arrived exactly once; an
    `unknown` one (in flight when a sender died) at most once; nobody else arrived.
    Returns the count of each status."""
    with db.session() as s:
        rows: dict[str | None, str] = {
            e: st for e, st in s.execute(select(Delivery.email, Delivery.status))
        }
    statuses = Counter(rows.values())
    assert len(rows) == total
    assert set(statuses) <= {"sent", "unknown"}, statuses
    for address, status in rows.items():
        expected = {1} if status == "sent" else {0, 1}
        assert received[address] in expected, (address, status, received[address])
    assert set(received) <= set(rows), "the server received mail for no planned recipient"
    return statuses
