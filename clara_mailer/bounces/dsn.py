"""Bounce processing: read delivery-status reports, match them to deliveries, apply policy.

A bounce often arrives long after the SMTP server said 250. This module turns each one
into a ``bounces`` row linked to the delivery that caused it, and applies the policy of
STANDARDS.md:

- hard (5.1.1, 5.1.2, 5.1.3, 5.1.10, 5.2.1): the delivery becomes ``bounced`` and the
  address is suppressed (reason ``hard-bounce``);
- soft (4.x.x, 5.2.2 and any other permanent code we cannot place): the delivery becomes
  ``bounced``; after ``soft_bounce_limit`` soft bounces within ``soft_bounce_window_days``
  the address is suppressed (reason ``soft-bounces``);
- policy (5.7.x) speaks of the sender: the delivery becomes ``bounced``, the report warns,
  the recipient is not suppressed;
- delayed (``Action: delayed``): recorded, nothing else changes.

Matching tries, in order, the VERP token of the envelope sender (which the bounce is
addressed to), the Message-ID of the returned original, then the address (within one
campaign when given). Each bounce is recorded once, keyed by its own Message-ID or a
hash of its content, so reading a mailbox twice changes nothing.

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesHeaderParser, HeaderParser
from email.utils import getaddresses, parsedate_to_datetime

from flufl.bounce import all_failures
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clara_mailer.bounces.mailboxes import BounceSource, MailboxMessage, OpenMailbox
from clara_mailer.core.errors import NotFound, TokenError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner, verp_token
from clara_mailer.optouts.suppressions import active_suppressions, suppress_hash
from clara_mailer.store.database import Database
from clara_mailer.store.models import Bounce, Campaign, Delivery, Status, utcnow

HARD_STATUSES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.10", "5.2.1"})
KINDS = ("hard", "soft", "policy", "delayed")

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


# --- classification ----------------------------------------------------------------------


def normalise_status(text: str) -> str:
    """The first RFC 3463 enhanced status code in ``text`` (``"5.1.1"``), else ``""``."""
    found = _STATUS_RE.search(text or "")
    if not found:
        return ""
    return ".".join(str(int(part)) for part in found.groups())


def classify(status: str, action: str = "failed") -> str:
    """``hard``, ``soft``, ``policy``, ``delayed``, or ``none`` for a success report.

    >>> classify("5.1.1"), classify("4.2.2"), classify("5.7.1"), classify("4.4.1", "delayed")
    ('hard', 'soft', 'policy', 'delayed')
    """
    action = action.strip().lower()
    if action.startswith("delayed"):
        return "delayed"
    if action.startswith(("delivered", "relayed", "expanded")):
        return "none"
    code = normalise_status(status)
    if not code:
        return "soft"  # failed without saying why: count it, never suppress at once
    klass, subject, _detail = code.split(".")
    if klass == "2":
        return "none"
    if code in HARD_STATUSES:
        return "hard"
    if klass == "5" and subject == "7":
        return "policy"
    return "soft"


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
    def kind(self) -> str:
        return classify(self.status, self.action)


@dataclass
class ParsedMessage:
    """What one message from the bounce mailbox says.

    ``category`` is ``bounce``, ``auto-reply`` or ``other`` (neither: left for a person).
    """

    category: str
    message_key: str
    subject: str = ""
    events: list[BounceEvent] = field(default_factory=list)
    verp_candidates: list[str] = field(default_factory=list)
    original_message_id: str | None = None
    received_at: dt.datetime = field(default_factory=utcnow)


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
            if event.kind != "none":
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
    events = []
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
        events.append(BounceEvent(address, action, status, _one_line(nearby)[:_MAX_DIAGNOSTIC]))
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
    now = utcnow()
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


def parse_message(raw: bytes) -> ParsedMessage:
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


# --- matching and recording --------------------------------------------------------------


@dataclass(frozen=True)
class Unmatched:
    """A bounce that names no delivery we know."""

    ref: str
    address: str
    status: str
    kind: str


@dataclass(frozen=True)
class PolicyWarning:
    """A 5.7.x bounce: the receiver refused the sender, not the address."""

    ref: str
    address: str
    status: str
    diagnostic: str


@dataclass
class BounceReport:
    """What an import read and did (``dry_run``: nothing was written)."""

    source: str = ""
    dry_run: bool = False
    read: int = 0
    bounces: int = 0
    hard: int = 0
    soft: int = 0
    policy: int = 0
    delayed: int = 0
    auto_replies: int = 0
    not_bounces: int = 0
    matched: int = 0
    already_seen: int = 0
    suppressed: int = 0
    unmatched: list[Unmatched] = field(default_factory=list)
    warnings: list[PolicyWarning] = field(default_factory=list)
    matched_by: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {
            "read": self.read,
            "bounces": self.bounces,
            "hard": self.hard,
            "soft": self.soft,
            "policy": self.policy,
            "delayed": self.delayed,
            "auto-replies ignored": self.auto_replies,
            "not bounces": self.not_bounces,
            "unmatched": len(self.unmatched),
            "already seen": self.already_seen,
            "addresses suppressed": self.suppressed,
        }

    def merge(self, other: BounceReport) -> None:
        for name in (
            "read",
            "bounces",
            "hard",
            "soft",
            "policy",
            "delayed",
            "auto_replies",
            "not_bounces",
            "matched",
            "already_seen",
            "suppressed",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unmatched += other.unmatched
        self.warnings += other.warnings
        for how, n in other.matched_by.items():
            self.matched_by[how] = self.matched_by.get(how, 0) + n


def _by_verp(session: Session, signer: TokenSigner, candidates: Iterable[str]) -> Delivery | None:
    for candidate in candidates:
        token = verp_token(candidate)
        if not token:
            continue
        try:
            data = signer.verify("b", token)
        except TokenError:
            continue  # someone else's plus-address, or an altered token
        delivery = session.scalars(
            select(Delivery).where(
                Delivery.campaign_id == data.campaign_id,
                Delivery.recipient_id == data.recipient_id,
            )
        ).first()
        if delivery is not None:
            return delivery
    return None


def _by_message_id(session: Session, message_id: str | None) -> Delivery | None:
    if not message_id:
        return None
    bare = message_id.strip().strip("<>")
    return session.scalars(
        select(Delivery).where(Delivery.message_id.in_([f"<{bare}>", bare])).order_by(Delivery.id)
    ).first()


def _by_address(session: Session, address: str, campaign_id: int | None) -> Delivery | None:
    if not address:
        return None
    query = select(Delivery).where(
        func.lower(Delivery.email) == address.strip().lower(),
        Delivery.status.in_([Status.SENT, Status.UNKNOWN, Status.BOUNCED]),
    )
    if campaign_id is not None:
        query = query.where(Delivery.campaign_id == campaign_id)
    # Without a campaign the newest message sent to the address is the likeliest cause.
    query = query.order_by(Delivery.sent_at.desc().nulls_last(), Delivery.id.desc())
    return session.scalars(query).first()


def match_delivery(
    session: Session,
    signer: TokenSigner,
    parsed: ParsedMessage,
    event: BounceEvent,
    campaign_id: int | None = None,
) -> tuple[Delivery | None, str]:
    """The delivery a bounce speaks of and how it was found (``verp``, ``message-id``,
    ``address``), or ``(None, "")``."""
    delivery = _by_verp(session, signer, parsed.verp_candidates)
    if delivery is not None:
        return delivery, "verp"
    delivery = _by_message_id(session, parsed.original_message_id)
    if delivery is not None:
        return delivery, "message-id"
    delivery = _by_address(session, event.address, campaign_id)
    if delivery is not None:
        return delivery, "address"
    return None, ""


def _soft_bounces_in_window(
    session: Session, address_hash: str, until: dt.datetime, days: int
) -> int:
    since = until - dt.timedelta(days=days)
    return (
        session.scalar(
            select(func.count())
            .select_from(Bounce)
            .where(
                Bounce.address_hash == address_hash,
                Bounce.kind == "soft",
                Bounce.received_at > since,
                Bounce.received_at <= until,
            )
        )
        or 0
    )


def record_message(
    session: Session,
    signer: TokenSigner,
    settings: Settings,
    message: MailboxMessage,
    *,
    campaign_id: int | None = None,
) -> BounceReport:
    """Parse one message and record what it means in ``session`` (not committed)."""
    report = BounceReport(read=1)
    parsed = parse_message(message.raw)
    if parsed.category == "auto-reply":
        report.auto_replies = 1
        return report
    if parsed.category == "other":
        report.not_bounces = 1
        return report
    for index, event in enumerate(parsed.events):
        key = parsed.message_key if index == 0 else f"{parsed.message_key}#{index}"
        if session.scalar(select(Bounce.id).where(Bounce.message_key == key)) is not None:
            report.already_seen += 1
            continue
        kind = event.kind
        delivery, how = match_delivery(session, signer, parsed, event, campaign_id)
        address = (delivery.email if delivery is not None else None) or event.address
        address_hash = signer.address_hash(address) if address else None
        session.add(
            Bounce(
                message_key=key,
                delivery_id=delivery.id if delivery is not None else None,
                campaign_id=delivery.campaign_id if delivery is not None else None,
                address_hash=address_hash,
                kind=kind,
                status_code=event.status,
                action=event.action[:16],
                diagnostic=event.diagnostic,
                received_at=parsed.received_at,
            )
        )
        session.flush()
        report.bounces += 1
        setattr(report, kind, getattr(report, kind) + 1)
        if kind == "policy":
            report.warnings.append(
                PolicyWarning(message.ref, address or "", event.status, event.diagnostic)
            )
        if delivery is None:
            report.unmatched.append(Unmatched(message.ref, event.address, event.status, kind))
            continue
        report.matched += 1
        report.matched_by[how] = report.matched_by.get(how, 0) + 1
        if kind == "delayed":
            continue
        delivery.status = Status.BOUNCED.value
        delivery.smtp_code = smtp_code(event.diagnostic)
        delivery.smtp_reply = f"bounce {event.status} {event.diagnostic}".strip()
        if address_hash is None:
            continue
        reason = None
        if kind == "hard":
            reason = "hard-bounce"
        elif (
            kind == "soft"
            and _soft_bounces_in_window(
                session, address_hash, parsed.received_at, settings.soft_bounce_window_days
            )
            >= settings.soft_bounce_limit
        ):
            reason = "soft-bounces"
        if reason is not None:
            if address_hash not in active_suppressions(session, [address_hash]):
                report.suppressed += 1
            suppress_hash(
                session,
                address_hash,
                reason=reason,
                source=f"bounce {event.status}"[:200],
                campaign_id=delivery.campaign_id,
                note=event.diagnostic,
            )
    return report


def import_bounces(
    db: Database,
    settings: Settings,
    source: BounceSource,
    *,
    dry_run: bool = False,
    campaign: str | None = None,
) -> BounceReport:
    """Read every new message in ``source``, record its bounces, apply the policy.

    Each message is committed on its own before the mailbox marks it processed, so an
    interrupted run loses nothing and a rerun records nothing twice. ``dry_run`` reads
    and reports but writes nothing and leaves the mailbox as it was.
    """
    signer = TokenSigner(db.secret_key(settings))
    report = BounceReport(source=source.describe(), dry_run=dry_run)
    with db.sessionmaker() as session:
        campaign_id = None
        if campaign is not None:
            campaign_id = session.scalar(select(Campaign.id).where(Campaign.slug == campaign))
            if campaign_id is None:
                raise NotFound(f"no campaign {campaign!r}")
        with OpenMailbox(source, readonly=dry_run) as box:
            for message in box.messages():
                outcome = record_message(
                    session, signer, settings, message, campaign_id=campaign_id
                )
                if not dry_run:
                    try:
                        session.commit()
                    except IntegrityError:
                        # Another import recorded the same bounce meanwhile.
                        session.rollback()
                        outcome = BounceReport(read=1, already_seen=max(1, outcome.bounces))
                report.merge(outcome)
                box.done(message, handled=outcome.not_bounces == 0)
        session.rollback()
    return report
