"""Subscribing through the web form, with double opt-in and proof of consent.

Nothing about a visitor is stored before they confirm. ``POST /subscribe`` seals the
form's answers (address, name, organisation, language, segments), the SHA-256 of the
consent text shown, when the form was sent and when the link expires into the
confirmation link itself: encrypted (HMAC-SHA256 in counter mode, so the address cannot be
read from a proxy's log) and signed (HMAC-SHA256, truncated to 128 bits), with keys derived
from the secret key. The one row written before the confirmation is the consent text,
which is not about anyone (``consent_texts``, keyed by its hash).

Confirming (a POST from the page the link opens) adds the recipient, or extends their
segments, and writes a ``consents`` row: when consent was given, the text's hash, the
language, the source (``web form``), the confirmation time. A suppressed address (opted
out, bounced, erased) comes back only this way: the confirmation lifts its suppressions
and the record says which. Each link confirms once (its id is unique in ``consents``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime, make_msgid
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from clara_mailer.core.errors import InputError, TokenError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import LANGUAGES, Language
from clara_mailer.optouts.suppressions import active_suppressions, lift_hash
from clara_mailer.registry.addresses import AddressError, AddressValidator, email_key
from clara_mailer.registry.importer import clean_text
from clara_mailer.registry.recipients import find_recipient
from clara_mailer.store.database import Database
from clara_mailer.store.models import Consent, ConsentText, Recipient, Segment, utcnow
from clara_mailer.transport import SendResult, Transport, transport_from_settings

SOURCE = "web form"
#: The outbox folder (without smtp_url) the confirmation messages are written to.
OUTBOX_FOLDER = "subscribe-confirmations"
#: The longest value each field of the form may hold, in characters.
FIELD_LIMITS = {"email": 254, "name": 200, "organisation": 200}
FIELD_NAMES = {
    "es": {"email": "La dirección", "name": "El nombre", "organisation": "La entidad"},
    "en": {"email": "The address", "name": "The name", "organisation": "The organisation"},
}

DEFAULT_CONSENT = {
    "es": (
        "Acepto recibir por correo electrónico los boletines, invitaciones y avisos del "
        "proyecto CLARA de los grupos que he marcado, y que se traten para ello mi dirección, "
        "mi nombre, mi entidad y mi idioma, como explica el aviso de privacidad. Puedo darme "
        "de baja en cualquier momento con el enlace que lleva cada mensaje."
    ),
    "en": (
        "I agree to receive the CLARA project's newsletters, invitations and announcements "
        "for the groups I have ticked by email, and to my address, name, organisation and "
        "language being processed for that, as the privacy notice explains. I can "
        "unsubscribe at any time with the link in every message."
    ),
}


def consent_text(settings: Settings, language: str) -> str:
    """The consent text the form shows in ``language`` (the setting, else the built-in)."""
    configured = settings.consent_text_en if language == "en" else settings.consent_text_es
    return configured or DEFAULT_CONSENT[language]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def offered_segments(db: Database, settings: Settings) -> list[tuple[str, str]]:
    """(slug, name) of each segment the form offers: those of ``subscribe_segments`` that
    exist, in the setting's order. Empty: no form."""
    wanted = [s for s in (settings.subscribe_segments or "").split(",") if s]
    if not wanted:
        return []
    with db.session() as session:
        rows = session.execute(select(Segment.slug, Segment.name).where(Segment.slug.in_(wanted)))
        names = {slug: name for slug, name in rows}
    return [(slug, names[slug]) for slug in wanted if slug in names]


# -- the sealed request --------------------------------------------------------------------


@dataclass(frozen=True)
class SubscribeRequest:
    """What the form asked for, as the confirmation link carries it."""

    email: str
    name: str
    organisation: str
    language: str
    segments: tuple[str, ...]
    consent_sha256: str
    given_at: int  # Unix time the form was sent
    expires: int  # Unix time the link stops working
    token_id: str = ""  # the link's nonce, hex: set when sealed

    @property
    def given(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.given_at, dt.UTC).replace(tzinfo=None)


_NONCE = 12
_MAC = 16
_VERSION = 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    if not text.isascii() or "=" in text:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:  # one spelling only
        raise ValueError("non-canonical")
    return data


class SubscribeTokens:
    """Seals a ``SubscribeRequest`` into a URL-safe token and opens it again."""

    def __init__(self, secret: str) -> None:
        key = secret.encode("utf-8")
        self._enc = hmac.new(key, b"clara-mail subscribe encrypt", hashlib.sha256).digest()
        self._mac = hmac.new(key, b"clara-mail subscribe sign", hashlib.sha256).digest()

    def _stream(self, nonce: bytes, size: int) -> bytes:
        blocks = []
        for counter in range((size + 31) // 32):
            blocks.append(
                hmac.new(self._enc, nonce + counter.to_bytes(4, "big"), hashlib.sha256).digest()
            )
        return b"".join(blocks)[:size]

    def _sign(self, data: bytes) -> bytes:
        return hmac.new(self._mac, data, hashlib.sha256).digest()[:_MAC]

    def seal(self, request: SubscribeRequest) -> tuple[str, SubscribeRequest]:
        """The token, and the request with its ``token_id``."""
        nonce = secrets.token_bytes(_NONCE)
        payload = json.dumps(
            [
                _VERSION,
                request.email,
                request.name,
                request.organisation,
                request.language,
                list(request.segments),
                request.consent_sha256,
                request.given_at,
                request.expires,
            ],
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")
        body = bytes(a ^ b for a, b in zip(payload, self._stream(nonce, len(payload)), strict=True))
        sealed = nonce + body
        token = _b64(sealed + self._sign(sealed))
        return token, _with_id(request, nonce.hex())

    def open(self, token: str, now: float | None = None) -> SubscribeRequest:
        """The request a token holds; TokenError (saying nothing more) when it is forged,
        malformed or expired."""
        try:
            raw = _unb64(token)
        except (ValueError, TypeError):
            raise TokenError("invalid link") from None
        if len(raw) <= _NONCE + _MAC:
            raise TokenError("invalid link")
        sealed, mac = raw[:-_MAC], raw[-_MAC:]
        if not hmac.compare_digest(mac, self._sign(sealed)):
            raise TokenError("invalid link")
        nonce, body = sealed[:_NONCE], sealed[_NONCE:]
        payload = bytes(a ^ b for a, b in zip(body, self._stream(nonce, len(body)), strict=True))
        try:
            values = json.loads(payload.decode("utf-8"))
            version, email, name, org, language, segments, digest, given, expires = values
            if version != _VERSION or not all(isinstance(s, str) for s in segments):
                raise ValueError
            request = SubscribeRequest(
                str(email),
                str(name),
                str(org),
                str(language),
                tuple(segments),
                str(digest),
                int(given),
                int(expires),
                nonce.hex(),
            )
        except (ValueError, TypeError, UnicodeDecodeError):
            raise TokenError("invalid link") from None
        if request.expires <= (time.time() if now is None else now):
            raise TokenError("invalid link")
        return request


def _with_id(request: SubscribeRequest, token_id: str) -> SubscribeRequest:
    return SubscribeRequest(
        request.email,
        request.name,
        request.organisation,
        request.language,
        request.segments,
        request.consent_sha256,
        request.given_at,
        request.expires,
        token_id,
    )


# -- the form --------------------------------------------------------------------------------


class FormError(InputError):
    """A form that cannot be taken: the message says why, in the visitor's language."""


def read_form(
    settings: Settings,
    offered: list[tuple[str, str]],
    fields: Mapping[str, str],
    segments: list[str],
    *,
    now: float | None = None,
) -> SubscribeRequest:
    """Check the form's fields; the request to seal, or FormError naming the first problem."""
    language = fields.get("language", "")
    page_language = fields.get("lang", "es") if fields.get("lang") in LANGUAGES else "es"
    es = page_language == "es"
    names = FIELD_NAMES[page_language]
    for key, limit in FIELD_LIMITS.items():
        if len(fields.get(key, "")) > limit:
            raise FormError(
                f"{names[key]} es demasiado larga: {limit} caracteres como máximo."
                if es
                else f"{names[key]} is too long: at most {limit} characters."
            )
    try:
        email = AddressValidator().normalise(fields.get("email", "").strip())
    except AddressError:
        raise FormError(
            "Escriba una dirección de correo válida." if es else "Enter a valid email address."
        ) from None
    if language not in LANGUAGES:
        raise FormError("Elija un idioma." if es else "Choose a language.")
    known = {slug for slug, _ in offered}
    chosen = list(dict.fromkeys(segments))
    if not chosen or any(slug not in known for slug in chosen):
        raise FormError(
            "Elija al menos uno de los grupos ofrecidos."
            if es
            else "Choose at least one of the groups offered."
        )
    if fields.get("consent") != "yes":
        raise FormError(
            "Marque la casilla de consentimiento para suscribirse."
            if es
            else "Tick the consent box to subscribe."
        )
    shown = fields.get("consent_sha256", "")
    if shown not in {text_hash(consent_text(settings, lang)) for lang in LANGUAGES}:
        # The consent text changed since the form was shown: show the new one.
        raise FormError(
            "El texto de consentimiento ha cambiado: léalo de nuevo y envíe el formulario."
            if es
            else "The consent text has changed: read it again and send the form."
        )
    when = int(time.time() if now is None else now)
    return SubscribeRequest(
        email=email,
        name=clean_text(fields.get("name", "").strip()),
        organisation=clean_text(fields.get("organisation", "").strip()),
        language=language,
        segments=tuple(chosen),
        consent_sha256=shown,
        given_at=when,
        expires=when + settings.confirm_hours * 3600,
    )


def keep_consent_text(db: Database, settings: Settings, digest: str) -> None:
    """Store the consent text with hash ``digest`` once (not personal data)."""
    for language in LANGUAGES:
        text = consent_text(settings, language)
        if text_hash(text) != digest:
            continue
        with db.session() as session:
            if session.get(ConsentText, digest) is None:
                session.add(ConsentText(sha256=digest, language=language, text=text))
        return


# -- the confirmation message ------------------------------------------------------------------

_MESSAGE = {
    "es": {
        "subject": "Confirme su suscripción a los envíos de CLARA",
        "hello": "Hola{name}:",
        "body": (
            "Alguien, seguramente usted, ha pedido suscribir esta dirección a los envíos del "
            "proyecto CLARA ({segments}). Para confirmarlo, abra este enlace y pulse el botón:"
        ),
        "until": "El enlace funciona hasta el {until} (UTC).",
        "ignore": (
            "Si no lo ha pedido usted, no haga nada: sin su confirmación no se guarda ningún "
            "dato suyo y no recibirá nada más."
        ),
        "button": "Confirmar la suscripción",
        "sender": "Envía",
        "contact": "Responsable del tratamiento",
        "privacy": "Aviso de privacidad",
    },
    "en": {
        "subject": "Confirm your subscription to CLARA's mailings",
        "hello": "Hello{name},",
        "body": (
            "Someone, most likely you, asked to subscribe this address to the CLARA project's "
            "mailings ({segments}). To confirm, open this link and press the button:"
        ),
        "until": "The link works until {until} (UTC).",
        "ignore": (
            "If you did not ask for this, do nothing: without your confirmation nothing about "
            "you is kept and you will receive nothing more."
        ),
        "button": "Confirm the subscription",
        "sender": "Sent by",
        "contact": "Data controller",
        "privacy": "Privacy notice",
    },
}


def confirm_link(settings: Settings, token: str) -> str:
    return f"{settings.base_url.rstrip('/')}/subscribe/confirm/{token}"


def from_address(settings: Settings) -> str:
    """``sender_address``, else no-reply at the host of ``base_url``."""
    if settings.sender_address:
        return settings.sender_address
    host = urlsplit(settings.base_url).hostname or "localhost"
    return f"no-reply@{host}"


def confirmation_message(
    settings: Settings, request: SubscribeRequest, link: str, segment_names: Mapping[str, str]
) -> bytes:
    """A small text + HTML message with the link and the legal footer."""
    from html import escape

    words = _MESSAGE[request.language if request.language in _MESSAGE else "es"]
    sender = from_address(settings)
    segments = ", ".join(segment_names.get(s, s) for s in request.segments)
    until = dt.datetime.fromtimestamp(request.expires, dt.UTC).strftime("%Y-%m-%d %H:%M")
    greeting = words["hello"].format(name=f" {request.name}" if request.name else "")
    paragraphs = [greeting, words["body"].format(segments=segments)]
    after = [words["until"].format(until=until), words["ignore"]]
    footer = [
        (
            words["sender"],
            ", ".join(v for v in (settings.sender_legal_name, settings.sender_postal_address) if v),
        ),
        (words["contact"], settings.controller_contact or ""),
        (words["privacy"], settings.privacy_url or ""),
    ]
    footer = [(label, value) for label, value in footer if value]
    text = "\n\n".join([*paragraphs, link, *after])
    if footer:
        text += "\n\n-- \n" + "\n".join(f"{label}: {value}" for label, value in footer)
    html = (
        f'<!doctype html><html lang="{request.language}"><head><meta charset="utf-8">'
        f"<title>{escape(words['subject'])}</title></head><body>"
        + "".join(f"<p>{escape(p)}</p>" for p in paragraphs)
        + f'<p><a href="{escape(link)}">{escape(words["button"])}</a></p>'
        + "".join(f"<p>{escape(p)}</p>" for p in after)
        + (
            '<hr><p style="font-size:small;color:#555">'
            + "<br>".join(f"{escape(label)}: {escape(value)}" for label, value in footer)
            + "</p>"
            if footer
            else ""
        )
        + "</body></html>"
    )
    smtputf8 = not request.email.isascii()
    msg = EmailMessage(policy=SMTPUTF8 if smtputf8 else SMTP)
    msg["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    msg["From"] = sender
    msg["To"] = request.email
    msg["Subject"] = words["subject"]
    msg["Message-ID"] = make_msgid("subscribe", sender.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"
    msg["Content-Language"] = request.language
    msg.set_content(text, subtype="plain", cte="quoted-printable")
    msg.add_alternative(html, subtype="html", cte="quoted-printable")
    return msg.as_bytes()


def send_confirmation(
    settings: Settings, request: SubscribeRequest, message: bytes, transport: Transport | None
) -> SendResult:
    """Hand the message over (SMTP, or the outbox's ``subscribe-confirmations`` folder)."""
    transport = transport or transport_from_settings(settings, OUTBOX_FOLDER)
    envelope_from = settings.bounce_address or from_address(settings)

    async def go() -> SendResult:
        conn = await transport.connect()
        try:
            return await conn.send(envelope_from, request.email, message)
        finally:
            await conn.close()

    return asyncio.run(go())


# -- confirming -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Confirmation:
    email: str
    #: new: added to the registry; extended: segments added to a known recipient;
    #: unchanged: known, in every segment already; again: this link had confirmed before.
    outcome: str
    segments: tuple[str, ...]
    lifted: tuple[str, ...]  # the reasons of the suppressions the confirmation lifted


def confirm(db: Database, signer: TokenSigner, request: SubscribeRequest) -> Confirmation:
    """Record a confirmed subscription: the recipient and the consent record, one
    transaction. TokenError when the consent text it names is not stored."""
    now = utcnow()
    with db.session() as session:
        if session.scalar(select(Consent.id).where(Consent.token_id == request.token_id)):
            return Confirmation(request.email, "again", request.segments, ())
        if session.get(ConsentText, request.consent_sha256) is None:
            raise TokenError("invalid link")
        segments = list(
            session.scalars(
                select(Segment).where(Segment.slug.in_(request.segments)).order_by(Segment.slug)
            )
        )
        address_hash = signer.address_hash(request.email)
        lifted: list[str] = []
        if active_suppressions(session, [address_hash]):
            rows = lift_hash(
                session,
                address_hash,
                note=f"lifted by a confirmed subscription ({SOURCE}, double opt-in) "
                f"at {now:%Y-%m-%d %H:%M:%S} UTC",
            )
            lifted = sorted({str(row.reason) for row in rows})
        recipient = find_recipient(session, request.email)
        if recipient is None:
            outcome = "new"
            recipient = Recipient(
                email=request.email,
                email_key=email_key(request.email),
                name=request.name,
                organisation=request.organisation,
                language=Language(request.language),
                consent_basis="consent",
                consent_source=SOURCE,
                segments=segments,
            )
            session.add(recipient)
        else:
            current = {s.slug for s in recipient.segments}
            added = [s for s in segments if s.slug not in current]
            outcome = "extended" if added else "unchanged"
            if added:
                recipient.segments = sorted([*recipient.segments, *added], key=lambda s: s.slug)
            recipient.name = recipient.name or request.name
            recipient.organisation = recipient.organisation or request.organisation
            recipient.consent_basis = "consent"
        session.flush()
        note = f"lifted suppression(s): {', '.join(lifted)}" if lifted else ""
        session.add(
            Consent(
                recipient_id=recipient.id,
                text_sha256=request.consent_sha256,
                language=request.language,
                source=SOURCE,
                segments=";".join(s.slug for s in segments),
                given_at=request.given,
                confirmed_at=now,
                token_id=request.token_id,
                note=note,
            )
        )
    return Confirmation(request.email, outcome, tuple(s.slug for s in segments), tuple(lifted))


def consent_records(
    session: Session, recipient_id: int, *, with_text: bool = False
) -> list[dict[str, Any]]:
    """A recipient's consent records, oldest first (``with_text``: the text itself too)."""
    rows = session.execute(
        select(Consent, ConsentText.text)
        .join(ConsentText, ConsentText.sha256 == Consent.text_sha256)
        .where(Consent.recipient_id == recipient_id)
        .order_by(Consent.confirmed_at, Consent.id)
    ).all()
    out = []
    for row, text in rows:
        record: dict[str, Any] = {
            "given_at": row.given_at.isoformat(timespec="seconds"),
            "confirmed_at": row.confirmed_at.isoformat(timespec="seconds"),
            "source": row.source,
            "language": row.language,
            "segments": row.segments,
            "consent_text_sha256": row.text_sha256,
            "note": row.note,
        }
        if with_text:
            record["consent_text"] = text
        out.append(record)
    return out


def consent_summary(records: list[dict[str, Any]]) -> str:
    """One readable line per record, for ``recipients show``."""
    return " | ".join(
        f"given {r['given_at']} UTC, confirmed {r['confirmed_at']} UTC ({r['source']}, "
        f"{r['language']}, segments {r['segments']}, text sha256 {r['consent_text_sha256']})"
        + (f"; {r['note']}" if r["note"] else "")
        for r in records
    )


def find_recipient_id(session: Session, address: str) -> int | None:
    recipient = find_recipient(session, address)
    return recipient.id if recipient is not None else None
