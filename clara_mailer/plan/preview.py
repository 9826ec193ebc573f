"""What one recipient would receive, before anything is sent.

The campaign id in tokens is the ``campaigns`` row id when a send has created it, else 0.
"""

from __future__ import annotations

import dataclasses

from clara_mailer.compose.campaigns import load_campaign
from clara_mailer.compose.render import RecipientView, Renderer, message_parts
from clara_mailer.core.errors import InputError, NotFound
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.deliverylog.log import campaign_id_of
from clara_mailer.registry.recipients import find_recipient, require_segment
from clara_mailer.store.database import Database

FORMATS = ("html", "text", "eml")
#: A sample recipient per language whose name, organisation and address agree.
SAMPLES = {
    "es": RecipientView(
        0,
        "ana.perez@policia-ejemplo.example",
        "Ana María Pérez",
        "Policía Local de Ejemplo",
        "es",
        "",
        "ejemplo: directorio público de la entidad",
    ),
    "en": RecipientView(
        0,
        "alex.morgan@police-example.example",
        "Alex Morgan",
        "Example City Police",
        "en",
        "",
        "example: the organisation's public directory",
    ),
}


def _recipient_view(db: Database, address: str, segments: tuple[str, ...]) -> RecipientView:
    """The registry's recipient with ``address``; segment: the first the campaign targets."""
    with db.session() as s:
        row = find_recipient(s, address)
        if row is None:
            raise NotFound(f"no recipient {address!r} in the registry")
        own = [seg.slug for seg in row.segments]
        segment = next((x for x in own if x in segments), own[0] if own else "")
        return RecipientView(
            row.id, row.email, row.name, row.organisation, row.language, segment, row.consent_source
        )


def preview(
    db: Database,
    settings: Settings,
    signer: TokenSigner,
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
        recipient = _recipient_view(db, address, defn.default_segments)
    else:
        language = language or defn.languages[0]
        if language not in defn.languages:
            raise InputError(
                f"campaign {slug} has no {language!r} version ({', '.join(defn.languages)})"
            )
        if segment is not None:
            require_segment(db, segment)
        sample = SAMPLES.get(language, SAMPLES["en"])
        recipient = dataclasses.replace(
            sample,
            language=language,
            segment=segment if segment is not None else (defn.default_segments or ("",))[0],
        )
    renderer = Renderer(defn, settings, signer, campaign_id_of(db, slug))
    data = renderer.render(recipient, smtputf8=not recipient.email.split("@")[0].isascii())
    if fmt == "eml":
        return data
    text, html = message_parts(data)
    return (html if fmt == "html" else text).encode("utf-8")
