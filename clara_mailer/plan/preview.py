"""What one recipient would receive, before anything is sent.

The campaign id in tokens is the ``campaigns`` row id when a send has created it, else 0.
"""

from __future__ import annotations

from sqlalchemy import select

from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.compose.render import SAMPLE, RecipientView, Renderer, message_parts
from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.store.database import Database
from clara_mailer.store.models import Campaign, Recipient

FORMATS = ("html", "text", "eml")


def campaign_id(db: Database, slug: str) -> int:
    with db.session() as s:
        found = s.scalars(select(Campaign.id).where(Campaign.slug == slug)).first()
    return found or 0


def find_recipient(db: Database, address: str, segments: tuple[str, ...]) -> RecipientView:
    """The registry's recipient with ``address``; segment: the first the campaign targets."""
    key = address.strip().casefold()
    with db.session() as s:
        row = s.scalars(select(Recipient).where(Recipient.email_key == key)).first()
        if row is None:
            raise NotFound(f"no recipient {address!r} in the registry")
        own = [seg.slug for seg in row.segments]
        segment = next((x for x in own if x in segments), own[0] if own else "")
        return RecipientView(row.id, row.email, row.name, row.organisation, row.language, segment)


def preview(
    settings: Settings,
    db: Database,
    slug: str,
    *,
    address: str | None = None,
    language: str | None = None,
    segment: str | None = None,
    fmt: str = "html",
) -> bytes:
    """The message (``eml``) or one decoded part (``html``, ``text``) as bytes."""
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    defn = load_campaign(settings, slug)
    if address is not None:
        recipient = find_recipient(db, address, defn.default_segments)
    else:
        language = language or defn.languages[0]
        if language not in defn.languages:
            raise InputError(
                f"campaign {slug} has no {language!r} version ({', '.join(defn.languages)})"
            )
        recipient = RecipientView(
            SAMPLE.id,
            SAMPLE.email,
            SAMPLE.name if language == "es" else "Alex Morgan",
            SAMPLE.organisation if language == "es" else "City Council",
            language,
            segment if segment is not None else (defn.default_segments or ("",))[0],
        )
    signer = TokenSigner(db.secret_key(settings))
    renderer = Renderer(defn, settings, signer, campaign_id(db, slug))
    data = renderer.render(recipient, smtputf8=not recipient.email.split("@")[0].isascii())
    if fmt == "eml":
        return data
    text, html = message_parts(data)
    return (html if fmt == "html" else text).encode("utf-8")
