"""Reading one message from the bounce mailbox: is it a bounce, an automatic reply or
neither, and for a bounce, which addresses failed, with which status, and which of our
messages it returns. No database: ``apply`` matches the result to deliveries.

A bounce is classified by its enhanced status code (``bounce_kind``):

- hard (5.1.1, 5.1.2, 5.1.3, 5.1.10, 5.2.1): the address does not exist;
- soft (4.x.x, 5.2.2 and any other permanent code we cannot place);
- policy (5.7.x): the receiver refused the sender, not the address;
- delayed (``Action: delayed``): a delay notice, not a bounce.

Statuses come from the DSN's ``Status`` and ``Diagnostic-Code`` fields, read here rather
than from flufl.bounce, which counts ``Action: failed`` with a 4.x.x status as permanent;
flufl.bounce only finds the addresses in the non-standard formats (Exim, qmail, ...).
"""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import hashlib
import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser, HeaderParser
from email.utils import getaddresses, parsedate_to_datetime
from typing import Literal

from flufl.bounce import all_failures

from clara_mailer.core.vocabulary import BounceKind

HARD_STATUSES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.10", "5.2.1"})

#: ``bounce``, ``auto-reply``, or ``other`` (neither: left for a person).
Category = Literal["bounce", "auto-reply", "other"]

_STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
_SMTP_CODE_RE = re.compile(r"(?<![\d.])([245]\d\d)(?=[ \-]|$)", re.MULTILINE)
_MESSAGE_ID_RE = re.compile(r"^Message-ID:[ \t]*(<[^>\s]+>)", re.IGNORECASE | re.MULTILINE)
_RETURN_PATH_RE = re.compile(r"^Return-Path:[ \t]*<([^>\s]+)>", re.IGNORECASE | re.MULTILINE)
# Text bounces without an enhanced code (qmail, old Exchange) still say why in words.
_UNKNOWN_USER_RE = re.compile(
    r"user unknown|unknown user|no such user|no mailbox here by that name|does not exist|"
    r"recipient not found|no such (?:address|recipient|mailbox)|mailbox not found",
    re.IGNORECASE,
)
# Where a text bounce starts quoting the original message: stop reading reasons there.
_QUOTE_START_RE = re.compile(
    r"^(?:-{2,}.*(?:copy of|original message|below this line).*|--- Below this line.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_AUTO_REPLY_SUBJECT_RE = re.compile(
    r"out of (?:the )?office|automatic reply|auto(?:matic)?[- ]?(?:reply|response)|"
    r"^auto:|fuera de la oficina|respuesta autom[aá]tica|ausencia|absence|abwesend|"
    r"vacation|vacaciones",
    re.IGNORECASE,
)
_MAX_DIAGNOSTIC = 1000


def _utcnow() -> dt.datetime:
    """Naive UTC, as the database keeps times (``store.models.utcnow``; no store here)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# --- classification ----------------------------------------------------------------------


def normalise_status(text: str) -> str:
    """The first RFC 3463 enhanced status code in ``text`` (``"5.1.1"``), else ``""``."""
    found = _STATUS_RE.search(text or "")
    if not found:
        return ""
    return ".".join(str(int(part)) for part in found.groups())


def bounce_kind(status: str, action: str = "failed") -> BounceKind | None:
    """What a DSN status (and action) says of the address, or ``None`` for a success report.

    >>> [bounce_kind("5.1.1"), bounce_kind("4.2.2"), bounce_kind("5.7.1")]
    [<BounceKind.HARD: 'hard'>, <BounceKind.SOFT: 'soft'>, <BounceKind.POLICY: 'policy'>]
    >>> bounce_kind("4.4.1", "delayed"), bounce_kind("2.0.0", "delivered")
    (<BounceKind.DELAYED: 'delayed'>, None)
    """
    action = action.strip().lower()
    if action.startswith("delayed"):
        return BounceKind.DELAYED
    if action.startswith(("delivered", "relayed", "expanded")):
        return None
    code = normalise_status(status)
    if not code:
        return BounceKind.SOFT  # failed without saying why: count it, never suppress at once
    klass, subject, _detail = code.split(".")
    if klass == "2":
        return None
    if code in HARD_STATUSES:
        return BounceKind.HARD
    if klass == "5" and subject == "7":
        return BounceKind.POLICY
    return BounceKind.SOFT


def smtp_code(diagnostic: str) -> int | None:
    """The basic SMTP reply code in a diagnostic such as ``550 5.1.1 ...``."""
    found = _SMTP_CODE_RE.search(diagnostic or "")
    return int(found.group(1)) if found else None


# --- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BounceEvent:
    """One recipient's line in a bounce: what happened to which address."""

    address: str
    action: str
    status: str
    diagnostic: str

    @property
    def kind(self) -> BounceKind | None:
        """``None`` only for a success report, which ``parse_bounce`` leaves out."""
        return bounce_kind(self.status, self.action)


@dataclass
class ParsedMessage:
    """What one message from the bounce mailbox says.

    ``category`` is ``bounce``, ``auto-reply`` or ``other`` (neither: left for a person).
    """

    category: Category
    message_key: str
    subject: str = ""
    events: list[BounceEvent] = field(default_factory=list)
    verp_candidates: list[str] = field(default_factory=list)
    original_message_id: str | None = None
    received_at: dt.datetime = field(default_factory=_utcnow)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _header_text(value: object) -> str:
    if value is None:
        return ""
    try:
        return _one_line(str(make_header(decode_header(str(value)))))
    except (UnicodeError, LookupError, ValueError):
        return _one_line(str(value))


def _address_field(value: str) -> str:
    """``rfc822; user@example`` -> ``user@example``."""
    _type, _sep, address = value.rpartition(";")
    return address.strip().strip("<>").strip()


def _diagnostic_field(value: str) -> str:
    """``smtp; 550 5.1.1 ...`` -> ``550 5.1.1 ...``."""
    kind, sep, rest = value.partition(";")
    text = (
        rest
        if sep and kind.strip().lower() in ("smtp", "x-unix", "x-postfix", "x-local")
        else value
    )
    return _one_line(text)[:_MAX_DIAGNOSTIC]


def _best_status(status_field: str, diagnostic: str) -> str:
    """The DSN's Status, or the more specific code its Diagnostic-Code gives (x.0.0 -> x.1.1)."""
    status = normalise_status(status_field)
    from_diagnostic = normalise_status(diagnostic)
    if not status:
        return from_diagnostic
    if status.endswith(".0.0") and from_diagnostic[:1] == status[:1]:
        return from_diagnostic
    return status


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return str(part.get_payload() or "")
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _status_blocks(part: Message) -> list[Message]:
    """The header blocks of a message/delivery-status part, however it was encoded."""
    payload = part.get_payload()
    if isinstance(payload, list):
        return [block for block in payload if isinstance(block, Message)]
    text = _part_text(part).replace("\r\n", "\n")
    return [
        HeaderParser().parsestr(block + "\n")
        for block in re.split(r"\n\s*\n", text)
        if block.strip()
    ]


def _dsn_events(msg: Message) -> tuple[list[BounceEvent], list[str]] | None:
    """RFC 3464 per-recipient blocks, and sender addresses named in per-message blocks."""
    parts = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    if not parts:
        return None
    events: list[BounceEvent] = []
    senders: list[str] = []
    for part in parts:
        for block in _status_blocks(part):
            if block.get("X-Postfix-Sender"):
                senders.append(_address_field(str(block["X-Postfix-Sender"])))
            action = _one_line(str(block.get("Action", ""))).lower()
            recipient = str(block.get("Original-Recipient") or block.get("Final-Recipient") or "")
            if not action or not recipient:
                continue
            diagnostic = _diagnostic_field(str(block.get("Diagnostic-Code", "")))
            status = _best_status(str(block.get("Status", "")), diagnostic)
            event = BounceEvent(_address_field(recipient), action.split()[0], status, diagnostic)
            if event.kind is not None:
                events.append(event)
    return events, senders


def _text_body(msg: Message) -> str:
    texts = [
        _part_text(part)
        for part in msg.walk()
        if part.get_content_type() == "text/plain" and not part.get_filename()
    ]
    return "\n".join(texts).replace("\r\n", "\n")


def _text_events(msg: Message, body: str) -> list[BounceEvent]:
    """Non-DSN bounces: flufl.bounce finds the addresses, the text around each says why."""
    temporary, permanent = all_failures(msg)
    quote = _QUOTE_START_RE.search(body)
    reasons = body[: quote.start()] if quote else body
    events: list[BounceEvent] = []
    for raw_address, action in [(a, "failed") for a in sorted(permanent)] + [
        (a, "delayed") for a in sorted(temporary - permanent)
    ]:
        address = raw_address.decode("ascii", "replace")
        at = reasons.lower().find(address.lower())
        start = reasons.rfind("\n", 0, at) + 1 if at >= 0 else 0
        window = reasons[start : start + 800]
        # The paragraph about this address ends at the next blank line after its text.
        paragraphs = re.split(r"\n\s*\n", window.strip(), maxsplit=2)
        nearby = "\n".join(paragraphs[:2]) if len(paragraphs[0]) < 80 else paragraphs[0]
        status = normalise_status(nearby) or normalise_status(reasons)
        if not status:
            code = smtp_code(nearby) or smtp_code(reasons)
            if _UNKNOWN_USER_RE.search(nearby) and action == "failed":
                status = "5.1.1"
            elif code:
                status = f"{code // 100}.0.0"
            else:
                status = "5.0.0" if action == "failed" else "4.0.0"
        event = BounceEvent(address, action, status, _one_line(nearby)[:_MAX_DIAGNOSTIC])
        if event.kind is not None:  # a 2.x.x status near the address: not a failure
            events.append(event)
    return events


def is_auto_reply(msg: Message) -> bool:
    """Out-of-office and other automatic replies (RFC 3834 and the usual vendor headers)."""
    auto_submitted = str(msg.get("Auto-Submitted", "")).strip().lower()
    if auto_submitted.startswith("auto-replied"):
        return True
    if any(msg.get(h) is not None for h in ("X-Autoreply", "X-Autorespond", "X-Auto-Response")):
        return True
    if str(msg.get("Precedence", "")).strip().lower() == "auto_reply":
        return True
    if (
        str(msg.get("X-Auto-Response-Suppress", ""))
        and "oof" in str(msg.get("X-MS-Exchange-Inbox-Rules-Loop", "")).lower()
    ):
        return True
    return bool(_AUTO_REPLY_SUBJECT_RE.search(_header_text(msg.get("Subject"))))


def _original_headers(msg: Message, body: str) -> tuple[str | None, list[str]]:
    """Message-ID and Return-Path of the returned original, wherever the bounce put them."""
    message_ids: list[str] = []
    return_paths: list[str] = []
    for part in msg.walk():
        ctype = part.get_content_type()
        original: Message | None = None
        if ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                original = payload[0]
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers"):
            headers = part.get_payload(decode=True)
            if isinstance(headers, bytes):
                original = BytesHeaderParser().parsebytes(headers)
        if original is not None:
            if original.get("Message-ID"):
                message_ids.append(_one_line(str(original["Message-ID"])))
            if original.get("Return-Path"):
                return_paths.append(str(original["Return-Path"]).strip().strip("<>"))
    message_ids += _MESSAGE_ID_RE.findall(body)
    return_paths += _RETURN_PATH_RE.findall(body)
    return (message_ids[0] if message_ids else None), return_paths


def _received_at(msg: Message) -> dt.datetime:
    now = _utcnow()
    try:
        when = parsedate_to_datetime(str(msg.get("Date", "")))
    except (TypeError, ValueError, IndexError):
        return now
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return min(when, now)


def message_key(msg: Message, raw: bytes) -> str:
    """The bounce's own Message-ID, else a hash of its content (line endings normalised)."""
    message_id = _one_line(str(msg.get("Message-ID", "")))
    if message_id and len(message_id) <= 180:
        return message_id
    if message_id:
        return "sha256:" + hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()
    body = raw.replace(b"\r\n", b"\n")
    if body.startswith(b"From "):
        body = body.split(b"\n", 1)[-1]
    return "sha256:" + hashlib.sha256(body.strip()).hexdigest()


def read_headers(raw: bytes) -> tuple[Message, str]:
    """A message's headers only (for ``message_key``) and its Subject as one line of text."""
    msg = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    return msg, _header_text(msg.get("Subject"))


def parse_bounce(raw: bytes) -> ParsedMessage:
    """Read one message from the bounce mailbox (no database needed)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    parsed = ParsedMessage(
        category="other",
        message_key=message_key(msg, raw),
        subject=_header_text(msg.get("Subject")),
        received_at=_received_at(msg),
    )
    body = _text_body(msg)
    dsn = _dsn_events(msg)
    senders: list[str] = []
    if dsn is not None:
        parsed.events, senders = dsn
    elif is_auto_reply(msg) and not msg.get("X-Failed-Recipients"):
        # Exim marks its bounces auto-replied too; only its X-Failed-Recipients tells them apart.
        parsed.category = "auto-reply"
        return parsed
    else:
        parsed.events = _text_events(msg, body)
    if parsed.events:
        parsed.category = "bounce"
    parsed.original_message_id, return_paths = _original_headers(msg, body)
    envelope = [
        address
        for header in ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")
        for _name, address in getaddresses([str(v) for v in msg.get_all(header, [])])
    ]
    parsed.verp_candidates = [a for a in [*envelope, *senders, *return_paths] if a]
    return parsed
