"""Where finished messages go: an SMTP relay, an outbox folder, or memory.

- ``base``: the ``Transport``/``Connection`` seam, ``SendResult`` and what an SMTP reply
  comes to, the envelope checks every transport shares, dot-stuffing;
- ``smtp``: ``SMTPTransport`` (aiosmtplib, with DATA done here), from an ``smtp_url``;
- ``outbox``: ``OutboxTransport`` (.eml files) and ``MemoryTransport`` (tests, benchmarks).

Plain bytes and addresses in, a ``SendResult`` out: nothing here reads or writes the
database; the sender records each result in the delivery log.
"""

from __future__ import annotations

from clara_mailer.core.errors import ConfigError
from clara_mailer.core.settings import Settings
from clara_mailer.transport.base import Connection, SendResult, Transport, classify, dot_stuff
from clara_mailer.transport.outbox import (
    MemoryConnection,
    MemoryTransport,
    OutboxConnection,
    OutboxTransport,
    Reply,
    outbox_filename,
)
from clara_mailer.transport.smtp import SMTPConnection, SMTPTransport


def transport_from_settings(settings: Settings, campaign_slug: str) -> Transport:
    """SMTP when ``smtp_url`` is set, otherwise .eml files in ``outbox_dir/<slug>``."""
    if settings.smtp_url:
        return SMTPTransport.from_url(
            settings.smtp_url,
            timeout=settings.smtp_timeout,
            data_timeout=settings.smtp_data_timeout,
            reconnect_after=settings.reconnect_after,
        )
    if not campaign_slug or "/" in campaign_slug or "\\" in campaign_slug or ".." in campaign_slug:
        raise ConfigError(f"campaign slug {campaign_slug!r} cannot name an outbox folder")
    return OutboxTransport(settings.outbox_dir / campaign_slug)


__all__ = [
    "Connection",
    "MemoryConnection",
    "MemoryTransport",
    "OutboxConnection",
    "OutboxTransport",
    "Reply",
    "SMTPConnection",
    "SMTPTransport",
    "SendResult",
    "Transport",
    "classify",
    "dot_stuff",
    "outbox_filename",
    "transport_from_settings",
]
