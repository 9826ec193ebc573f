"""Messages from campaign templates: Jinja, CSS inlining, text part, MIME bytes.

The expensive steps (Jinja, premailer ~30 ms, html-to-text, MIME structure) run once
per *variant*: language x segment x (name given?) x (organisation given?), the only
things templates may branch on. Each variant is rendered with sentinel values for the
per-recipient fields and cut into pieces: static runs of lines, quoted-printable
encoded once, and the few lines holding a sentinel, kept as format strings. A
recipient's message is those pieces joined with their escaped values, the dynamic lines
encoded with ``binascii.b2a_qp`` (C), plus a few headers built directly.

``render_reference`` builds the same message the slow, obvious way (Jinja + premailer +
``EmailMessage``); tests and ``check_campaign`` compare the two.
"""

from __future__ import annotations

import binascii
import copy
import dataclasses
import datetime as dt
import email
import email.policy
import functools
import hashlib
import html
import importlib
import logging
import re
import sys
import time
import traceback
import types
from collections.abc import Iterable
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses
from pathlib import Path
from typing import Any

import jinja2

from clara_mailer.compose.campaigns import CampaignDef, load_campaign
from clara_mailer.compose.headers import address_header, ascii_header, wire_address
from clara_mailer.compose.ics import ICS_FILENAME, event_ics
from clara_mailer.compose.markdown import MarkdownLoader
from clara_mailer.core.errors import CampaignError, ConfigError, MailerError
from clara_mailer.core.settings import Settings
from clara_mailer.core.tokens import TokenSigner
from clara_mailer.core.vocabulary import LANGUAGES, STANDARD_SEGMENTS

MAX_SUBJECT_CHARS = 78
MAX_MESSAGE_BYTES = 100 * 1024  # Gmail clips at 102 kB
_POLICIES = {False: email.policy.SMTP, True: email.policy.SMTPUTF8}

# Per-recipient fields, in this order in every value tuple.
FIELDS = ("name", "organisation", "email", "unsubscribe_token", "rsvp_token", "consent_source")
_SENTINELS = tuple(f"ZQX{i}qclaraXQZ" for i in range(len(FIELDS)))
_SENTINEL_RE = re.compile(r"ZQX([0-9])qclaraXQZ")
# Controls, line/paragraph separators, surrogates, non-characters: never in a field.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff\ufffe\uffff]")

_MONTHS = {
    "es": [
        "enero",
        "febrero",
        "marzo",
        "abril",
        "mayo",
        "junio",
        "julio",
        "agosto",
        "septiembre",
        "octubre",
        "noviembre",
        "diciembre",
    ],
    "en": [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ],
}
_DAYS = {
    "es": ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"],
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
}


def clean_field(value: str) -> str:
    """One line of text: controls (CR, LF, ...) become spaces, runs of spaces one space."""
    return " ".join(_UNSAFE.sub(" ", value).split())


@dataclass(frozen=True)
class RecipientView:
    id: int
    email: str
    name: str
    organisation: str
    language: str
    segment: str
    #: Where the address came from (the registry's ``consent_source``): the footer says it.
    consent_source: str = ""


def _long_date(day: dt.date, language: str) -> str:
    weekday, month = _DAYS[language][day.weekday()], _MONTHS[language][day.month - 1]
    if language == "es":
        return f"{weekday}, {day.day} de {month} de {day.year}"
    return f"{weekday} {day.day} {month} {day.year}"


def _template_error(exc: Exception, fallback: Path) -> CampaignError:
    """A Jinja error as ``file:line: message``."""
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return CampaignError(f"{exc.filename or exc.name or fallback}:{exc.lineno}: {exc.message}")
    if isinstance(exc, jinja2.TemplateNotFound):
        return CampaignError(f"{fallback}: template not found: {exc.name}")
    # Jinja rewrites tracebacks so that frames point into the template files.
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if f.filename.endswith((".j2", ".css", ".md"))
    ]
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else str(fallback)
    if frames and frames[-1].filename.endswith(".md"):  # a line of the Markdown, not of
        from clara_mailer.compose.markdown import markdown_location  # the Jinja made of it

        where = markdown_location(frames[-1].filename, frames[-1].lineno)
    message = exc.message if isinstance(exc, jinja2.TemplateError) else repr(exc)
    return CampaignError(f"{where}: {message}")


#: How premailer is run: the network off; rules it cannot inline (``@media``) stay in
#: ``<style>``.
PREMAILER_OPTIONS: dict[str, Any] = {
    "allow_network": False,
    "allow_loading_external_files": False,
    "disable_validation": True,
    "cssutils_logging_level": logging.CRITICAL,
    "strip_important": False,
}


def inline_css(document: str) -> str:
    """The CSS of ``document``'s ``<style>`` inlined into its elements (premailer)."""
    return str(_premailer()(document, **PREMAILER_OPTIONS).transform())


def _html_to_text(document: str) -> str:
    """The text part of ``document`` (``textpart``, imported on first use: lxml)."""
    from clara_mailer.compose.textpart import html_to_text

    return html_to_text(document)


@functools.cache
def _premailer() -> Any:
    """premailer's class, imported on first use (lxml, cssutils: ~9 MB). premailer imports
    ``requests`` at its top (urllib3, idna, charset detection: ~6 MB more) only to fetch
    external stylesheets, which ``inline_css`` never lets it do: unless something has
    imported it already, ``requests`` is a stand-in that imports it on first use."""
    if "requests" not in sys.modules:
        sys.modules["requests"] = _ImportedOnFirstUse("requests")
    from premailer import Premailer

    class SharedRules(Premailer):  # type: ignore[misc]  # premailer has no types
        """premailer, keeping the rules made of a stylesheet for the next document: every
        variant of a campaign has the same ``<style>``, and turning it into rules
        (cssutils' serialisation of every property) is ~70% of an inlining. premailer
        only reads the two lists it gets; each call gets its own copies."""

        def _parse_style_rules(self, css_body: str, ruleset_index: int) -> Any:
            key = (css_body, ruleset_index, self.strip_important, self.disable_validation)
            found = _STYLE_RULES.get(key)
            if found is None:
                if len(_STYLE_RULES) >= 16:
                    _STYLE_RULES.clear()
                found = _STYLE_RULES[key] = super()._parse_style_rules(css_body, ruleset_index)
            rules, leftover = found
            return list(rules), list(leftover)

        def _css_rules_to_string(self, rules: Any) -> str:
            """The rules left in ``<style>`` (``@media``), as text: the same rule objects
            each time (kept above), so the same text; premailer would serialise them
            again for every document (~30% of an inlining)."""
            key = (tuple(map(id, rules)), self.strip_important)
            found = _RULES_TEXT.get(key)
            if found is None:
                if len(_RULES_TEXT) >= 16:
                    _RULES_TEXT.clear()
                # The rules are kept with their text, so that their ids stay theirs.
                found = _RULES_TEXT[key] = (super()._css_rules_to_string(rules), list(rules))
            text: str = found[0]
            return text

    return SharedRules


_STYLE_RULES: dict[tuple[str, int, bool, bool], Any] = {}
_RULES_TEXT: dict[tuple[tuple[int, ...], bool], tuple[str, list[Any]]] = {}


class _ImportedOnFirstUse(types.ModuleType):
    """Stands in for a module in ``sys.modules`` until one of its attributes is read, then
    imports it for real and hands that attribute over (and every later one)."""

    def __getattr__(self, name: str) -> Any:
        real = self.__dict__.get("_real")
        if real is None:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = self.__dict__["_real"] = importlib.import_module(self.__name__)
        return getattr(real, name)


def _crlf(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    return text.replace("\n", "\r\n")


def _qp(text: str) -> bytes:
    return binascii.b2a_qp(text.encode("utf-8"), istext=True)


def _qp_open(text: str) -> bytes:
    """``text`` quoted-printable, ending with a soft line break (``=`` CRLF): what follows
    begins a line of its own and decodes as if it ran on. So the text around a field can
    be encoded once, and only the field's value for each message."""
    if not text:
        return b""
    encoded = _qp(text)
    if "\n" not in text:  # b2a_qp breaks lines with LF unless the text has CRLF in it
        encoded = encoded.replace(b"\n", b"\r\n")
    start = encoded.rfind(b"\n") + 1
    if len(encoded) - start > _QP_LINE - 1:  # no room for the "=": break the line earlier
        cut = start + _QP_LINE - 1
        if encoded[cut - 1 : cut] == b"=":
            cut -= 1
        elif encoded[cut - 2 : cut - 1] == b"=":
            cut -= 2
        encoded = encoded[:cut] + b"=\r\n" + encoded[cut:]
    return encoded + b"=\r\n"


#: Characters an encoded line may hold, the "=" of a soft line break included (RFC 2045).
_QP_LINE = 76


def _qp_value(text: str) -> bytes:
    """``_qp_open(text)``, at once for the usual value (a token, most addresses and
    names): short printable ASCII without "=" or a trailing blank is its own encoding.
    ``tests/test_qp_fields.py`` holds the two to the same bytes."""
    if (
        text
        and len(text) <= _QP_LINE - 4
        and text.isascii()
        and text.isprintable()
        and "=" not in text
        and text[-1] != " "
        and text != "."
    ):
        return text.encode("ascii") + b"=\r\n"
    return _qp_open(text)


@dataclass(frozen=True)
class _Dynamic:
    """Lines that hold sentinels: the text around the sentinels quoted-printable, encoded
    once (``runs``, each but the last ending with a soft line break, ``_qp_open``), and
    the field each sentinel stands for (``fields``: one fewer than runs). ``template``
    is the runs joined as a ``bytes`` format, a ``%s`` where each field goes."""

    runs: tuple[bytes, ...]
    fields: tuple[int, ...]
    html: bool
    template: bytes

    @classmethod
    def of(cls, lines: str, html: bool) -> _Dynamic:
        """``lines`` (CRLF, each with its line end) with their sentinels cut out."""
        cut = _SENTINEL_RE.split(lines)  # text, field, text, field, ..., text
        texts, fields = cut[::2], tuple(int(f) for f in cut[1::2])
        runs = (*(_qp_open(text) for text in texts[:-1]), _qp(texts[-1]))
        return cls._made(runs, fields, html)

    @classmethod
    def _made(cls, runs: tuple[bytes, ...], fields: tuple[int, ...], html: bool) -> _Dynamic:
        template = b"%s".join(run.replace(b"%", b"%%") for run in runs)
        return cls(runs, fields, html, template)

    @classmethod
    def static(cls, text: bytes, html: bool) -> _Dynamic:
        """Encoded text without a field, as a piece to join others (``then``)."""
        return cls._made((text,), (), html)

    def then(self, other: _Dynamic) -> _Dynamic:
        """This piece followed by ``other``, as one."""
        runs = (*self.runs[:-1], self.runs[-1] + other.runs[0], *other.runs[1:])
        return _Dynamic._made(runs, self.fields + other.fields, self.html)

    def encode(self, values: tuple[str, ...]) -> bytes:
        """The lines with ``values`` in place of their sentinels, quoted-printable (one
        piece alone; ``render_parts`` encodes a message's values once for all its pieces
        and calls ``fill``)."""
        return self.fill(tuple(_qp_value(value) for value in values))

    def fill(self, encoded: tuple[bytes, ...]) -> bytes:
        """``encode``, with each value encoded already (``_qp_value``)."""
        return self.template % tuple([encoded[field] for field in self.fields])


_Piece = bytes | _Dynamic


def _pieces(text: str, *, html_part: bool) -> list[_Piece]:
    """Cut a part's CRLF text into encoded static runs and dynamic line templates."""
    out: list[_Piece] = []
    static: list[str] = []
    dynamic: list[str] = []
    for line in text.splitlines(keepends=True):
        if _SENTINEL_RE.search(line):
            if static:
                out.append(_qp("".join(static)))
                static = []
            dynamic.append(line)
        else:
            if dynamic:
                out.append(_Dynamic.of("".join(dynamic), html_part))
                dynamic = []
            static.append(line)
    if static:
        out.append(_qp("".join(static)))
    if dynamic:
        out.append(_Dynamic.of("".join(dynamic), html_part))
    return out


#: Static text shorter than this goes into the lines with fields next to it (``_merge``).
_SHARED_BYTES = 1024


def _merge(pieces: list[_Piece]) -> tuple[_Piece, ...]:
    """Adjacent static pieces joined; then static text shorter than ``_SHARED_BYTES``
    taken into the neighbouring lines with fields (of the same part, text or HTML).

    What stays a ``bytes`` piece is large and shared by every message of the variant; the
    rest is one ``_Dynamic`` per stretch, filled once per message. For the newsletter a
    message is then 7 pieces, not 11: each piece a message has of its own is checked and
    dot-stuffed on its way out (``transport.base.MessageChecker``), the shared ones once."""
    joined: list[_Piece] = []
    for piece in pieces:
        if isinstance(piece, bytes) and joined and isinstance(joined[-1], bytes):
            joined[-1] = joined[-1] + piece
        else:
            joined.append(piece)
    merged: list[_Piece] = []
    for piece in joined:
        last = merged[-1] if merged else None
        if isinstance(piece, _Dynamic):
            if isinstance(last, _Dynamic) and last.html == piece.html:
                merged[-1] = last.then(piece)
                continue
            if isinstance(last, bytes) and len(last) < _SHARED_BYTES:
                merged[-1] = _Dynamic.static(last, piece.html).then(piece)
                continue
        elif isinstance(last, _Dynamic) and len(piece) < _SHARED_BYTES:
            merged[-1] = last.then(_Dynamic.static(piece, last.html))
            continue
        merged.append(piece)
    return tuple(merged)


#: (language, segment, name given, organisation given, consent source given)
_VariantKey = tuple[str, str, bool, bool, bool]


@dataclass
class _Variant:
    language: str
    body: tuple[_Piece, ...]
    heads: dict[bool, bytes]  # static headers, by smtputf8
    html: str  # with sentinels, for checks
    text: str


#: A renderer's prepared variants, as one hands them to another (picklable).
PreparedVariants = dict[_VariantKey, _Variant]


def for_sending(variants: PreparedVariants) -> PreparedVariants:
    """``variants`` as a sender needs them, in a third of the memory: without the HTML
    and text kept for the checks (a renderer that adopts these sends; it does not check
    again), and with equal pieces made one object, so that the variants of a campaign
    share their static runs (the newsletter's: 4.5 MB pickled -> 1.2 MB)."""
    shared: dict[bytes, bytes] = {}

    def one(piece: bytes) -> bytes:
        return shared.setdefault(piece, piece)

    return {
        key: dataclasses.replace(
            variant,
            body=tuple(one(p) if isinstance(p, bytes) else p for p in variant.body),
            heads={flag: one(head) for flag, head in variant.heads.items()},
            html="",
            text="",
        )
        for key, variant in variants.items()
    }


class Renderer:
    """Renders one campaign for many recipients; variants are prepared on first use."""

    def __init__(
        self, defn: CampaignDef, settings: Settings, signer: TokenSigner, campaign_id: int
    ) -> None:
        self.defn, self.settings, self.signer = defn, settings, signer
        self.campaign_id = campaign_id
        self.base_url = settings.base_url.rstrip("/")
        if not self.base_url.isascii():
            raise ConfigError(f"base_url must be ASCII (IDNA), not {settings.base_url!r}")
        self.env = jinja2.Environment(
            # Markdown bodies (body.<language>.md) load as templates extending the layout.
            loader=MarkdownLoader([str(defn.path), str(Path(settings.templates_dir))]),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=True,
        )
        self._variants: dict[_VariantKey, _Variant] = {}
        self.footer = {
            "legal_name": settings.sender_legal_name or "",
            "postal_address": settings.sender_postal_address or "",
            "controller_contact": settings.controller_contact or "",
            "privacy_url": settings.privacy_url or "",
        }
        self._ics: dict[str, bytes] = {}
        self._headers: dict[tuple[str, bool], bytes] = {}
        self._date_second = -1
        self._date = b""

    def for_campaign(self, campaign_id: int) -> Renderer:
        """This renderer for another campaign id, sharing the variants already prepared
        (they hold no token and no id: those are per recipient)."""
        other = copy.copy(self)
        other.campaign_id = campaign_id
        return other

    # -- per-variant work -------------------------------------------------------------

    def language_for(self, language: str) -> str:
        return language if language in self.defn.languages else self.defn.languages[0]

    def _context(self, language: str, segment: str, values: tuple[str, ...]) -> dict[str, Any]:
        d = self.defn
        name, organisation, address, utoken, rtoken, source = values
        ctx: dict[str, Any] = {
            "language": language,
            "segment": segment,
            "name": name,
            "organisation": organisation,
            "email": address,
            "consent_source": source,
            "data": d.data,
            "project": d.project,
            "footer": self.footer,
            "subject": d.subjects.get(language, ""),
            "preheader": d.preheaders.get(language, ""),
            "sender_name": d.display_name(language),
            "unsubscribe_url": f"{self.base_url}/u/{utoken}",
            # The campaign's public archive page in this language ("view in browser").
            "view_url": f"{self.base_url}/archive/{d.slug}/{language}",
            "segment_names": STANDARD_SEGMENTS,
        }
        if d.event is not None:
            ev = d.event
            ctx["rsvp_yes_url"] = f"{self.base_url}/r/{rtoken}?answer=yes"
            ctx["rsvp_no_url"] = f"{self.base_url}/r/{rtoken}?answer=no"
            ctx["event"] = {
                "title": ev.title[language],
                "date": _long_date(ev.start.date(), language),
                "start": ev.start.strftime("%H:%M"),
                "end": ev.end.strftime("%H:%M"),
                "timezone": ev.timezone,
                "place": ev.place[language],
                "venue_name": ev.venue_name,
                "venue_address": ev.venue_address,
                "location": d.location(language),
                "organiser": ev.organiser,
            }
        return ctx

    def render_html(self, language: str, segment: str, values: tuple[str, ...]) -> str:
        """Jinja, then CSS inlining (after Jinja: premailer would rewrite ``{{ }}``)."""
        path = self.defn.template_file(language)
        try:
            template = self.env.get_template(path.name)
            document = template.render(self._context(language, segment, values))
        except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise _template_error(exc, path) from None
        return inline_css(document)

    def ics(self, language: str) -> bytes:
        if language not in self._ics:
            self._ics[language] = event_ics(
                self.defn, language, self.defn.preheaders.get(language, "")
            )
        return self._ics[language]

    def _static_headers(self, language: str, smtputf8: bool) -> bytes:
        """The campaign's own header fields in ``language``: the same for every variant in
        it, so folded once (a check of the newsletter folded them 132 times, now 4)."""
        found = self._headers.get((language, smtputf8))
        if found is None:
            found = self._headers[(language, smtputf8)] = self._fold_headers(language, smtputf8)
        return found

    def _fold_headers(self, language: str, smtputf8: bool) -> bytes:
        d, policy = self.defn, _POLICIES[smtputf8]
        # Our own folding for From, as for To: the stdlib's can leave an ASCII tail after
        # an encoded word ("(OBER" + "AXE)"), which readers then show with a space.
        sender = address_header("From", d.display_name(language), d.sender, smtputf8=smtputf8)
        subject = d.subjects.get(language, "")
        plain_subject = ascii_header("Subject", subject)
        if plain_subject is not None:
            sender += plain_subject
        fields = [
            *([] if plain_subject is not None else [("Subject", subject)]),
            ("Reply-To", d.reply_to),
            ("MIME-Version", "1.0"),
            ("Auto-Submitted", "auto-generated"),
            ("List-Id", f"{d.list_name} <{d.list_id}>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ]
        # header_factory + fold: policy.fold() alone leaves a plain str unencoded.
        folded = (policy.header_factory(k, v).fold(policy=policy) for k, v in fields)
        return sender + "".join(folded).encode("utf-8")

    def _prepare(self, key: _VariantKey) -> _Variant:
        language, segment, has_name, has_org, has_source = key
        values = (
            _SENTINELS[0] if has_name else "",
            _SENTINELS[1] if has_org else "",
            *_SENTINELS[2:5],
            _SENTINELS[5] if has_source else "",
        )
        document = self.render_html(language, segment, values)
        text = _html_to_text(document)
        tag = hashlib.sha256(repr((self.defn.slug, key)).encode()).hexdigest()[:20]
        alt = f"=_clara_alt_{tag}"
        text_head = b'Content-Type: text/plain; charset="utf-8"\r\n'
        html_head = b'Content-Type: text/html; charset="utf-8"\r\n'
        qp = b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        pieces: list[_Piece] = [
            f"--{alt}\r\n".encode() + text_head + qp,
            *_pieces(_crlf(text), html_part=False),
            # The CRLF before a boundary belongs to it: end each part with its own newline.
            f"\r\n--{alt}\r\n".encode() + html_head + qp,
            *_pieces(_crlf(document), html_part=True),
            f"\r\n--{alt}--\r\n".encode(),
        ]
        if self.defn.event is None:
            content_type = f'Content-Type: multipart/alternative; boundary="{alt}"\r\n\r\n'
        else:
            mixed = f"=_clara_mix_{tag}"
            content_type = f'Content-Type: multipart/mixed; boundary="{mixed}"\r\n\r\n'
            ics = binascii.b2a_base64(self.ics(language), newline=False)
            ics_lines = b"\r\n".join(ics[i : i + 76] for i in range(0, len(ics), 76))
            pieces = [
                f"--{mixed}\r\n".encode()
                + f'Content-Type: multipart/alternative; boundary="{alt}"\r\n\r\n'.encode(),
                *pieces,
                f"--{mixed}\r\n".encode()
                + b'Content-Type: text/calendar; charset="utf-8"; method=PUBLISH; '
                + f'name="{ICS_FILENAME}"\r\n'.encode()
                + f'Content-Disposition: inline; filename="{ICS_FILENAME}"\r\n'.encode()
                + b"Content-Transfer-Encoding: base64\r\n\r\n"
                + ics_lines
                + b"\r\n",
                f"--{mixed}--\r\n".encode(),
            ]
        heads = {
            flag: self._static_headers(language, flag) + content_type.encode()
            for flag in (False, True)
        }
        return _Variant(language, _merge(pieces), heads, document, text)

    def prepared(self) -> PreparedVariants:
        """The variants prepared so far, for another renderer of the same campaign and
        settings (``adopt``)."""
        return dict(self._variants)

    def adopt(self, variants: PreparedVariants) -> None:
        """Take over variants another renderer of this campaign prepared (``prepared``,
        or ``for_sending``): a helper process of ``send --processes`` sends what its
        parent checked, and a sending process what its check's process prepared, without
        inlining the CSS again (nor importing premailer)."""
        self._variants.update(variants)

    def variant(
        self, language: str, segment: str, has_name: bool, has_org: bool, has_source: bool = False
    ) -> _Variant:
        key = (self.language_for(language), segment, has_name, has_org, has_source)
        found = self._variants.get(key)
        if found is None:
            found = self._variants[key] = self._prepare(key)
        return found

    # -- per-recipient work -----------------------------------------------------------

    def message_id(self, r: RecipientView) -> str:
        """``<part.slug@sender-domain>``: the same for every render of (campaign, recipient)."""
        part = self.signer.message_id_part(self.defn.slug, r.id)
        return f"<{part}.{self.defn.slug}@{self.defn.sender_domain}>"

    def _date_header(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            stamp = format_datetime(dt.datetime.fromtimestamp(now, dt.UTC))
            self._date, self._date_second = f"Date: {stamp}\r\n".encode(), now
        return self._date

    def _tokens(self, r: RecipientView) -> tuple[str, str]:
        utoken = self.signer.sign("u", self.campaign_id, r.id)
        rtoken = self.signer.sign("r", self.campaign_id, r.id) if self.defn.event else ""
        return utoken, rtoken

    def _list_unsubscribe(self, utoken: str) -> str:
        return (
            f"<{self.base_url}/u/{utoken}>, "
            f"<mailto:{self.defn.unsubscribe_address}?subject=unsubscribe-{utoken}>"
        )

    def render(
        self, r: RecipientView, *, smtputf8: bool = False, message_id: str | None = None
    ) -> bytes:
        """The final message bytes for ``r``: CRLF lines, not dot-stuffed.
        ``message_id``: ``self.message_id(r)``, when the caller has it already."""
        head, body = self.render_parts(r, smtputf8=smtputf8, message_id=message_id)
        return head + b"".join(body)

    def render_parts(
        self, r: RecipientView, *, smtputf8: bool = False, message_id: str | None = None
    ) -> tuple[bytes, list[bytes]]:
        """``render``'s message as its header (with the empty line that ends it) and the
        parts of its body: the parts every message of a variant shares are the same
        objects each time (DKIM makes them relaxed once, ``DkimSigner.unsigned_parts``)."""
        address = wire_address(r.email.strip(), smtputf8=smtputf8)
        name, organisation = clean_field(r.name), clean_field(r.organisation)
        shown, source = clean_field(r.email), clean_field(r.consent_source)
        v = self.variant(r.language, r.segment, bool(name), bool(organisation), bool(source))
        utoken, rtoken = self._tokens(r)
        # Each value quoted-printable once, and again for the HTML part only where
        # escaping changed it (a tag's characters, "&", quotes).
        text_values = (name, organisation, shown, utoken, rtoken, source)
        text_encoded = tuple([_qp_value(value) for value in text_values])
        esc = html.escape
        html_values = (
            esc(name, False),
            esc(organisation, False),
            esc(shown, False),
            utoken,
            rtoken,
            esc(source, False),
        )
        html_encoded = tuple(
            [
                encoded if escaped == value else _qp_value(escaped)
                for escaped, value, encoded in zip(
                    html_values, text_values, text_encoded, strict=True
                )
            ]
        )
        head = b"".join(
            [
                self._date_header(),
                address_header("To", name, address, smtputf8=smtputf8),
                f"Message-ID: {message_id or self.message_id(r)}\r\n"
                f"List-Unsubscribe: <{self.base_url}/u/{utoken}>,\r\n"
                f" <mailto:{self.defn.unsubscribe_address}?subject=unsubscribe-{utoken}>\r\n".encode(),
                v.heads[smtputf8],
            ]
        )
        body = [
            piece
            if isinstance(piece, bytes)
            else piece.fill(html_encoded if piece.html else text_encoded)
            for piece in v.body
        ]
        return head, body

    def render_reference(self, r: RecipientView, *, smtputf8: bool = False) -> bytes:
        """The same message built the slow, obvious way (for tests and checks)."""
        address = wire_address(r.email.strip(), smtputf8=smtputf8)
        name, organisation = clean_field(r.name), clean_field(r.organisation)
        language = self.language_for(r.language)
        utoken, rtoken = self._tokens(r)
        values = (name, organisation, clean_field(r.email), utoken, rtoken)
        document = self.render_html(language, r.segment, (*values, clean_field(r.consent_source)))
        d = self.defn
        msg = EmailMessage(policy=_POLICIES[smtputf8])
        msg["Date"] = format_datetime(dt.datetime.now(dt.UTC))
        msg["From"] = Address(display_name=d.display_name(language), addr_spec=d.sender)
        local, _, domain = address.rpartition("@")
        # username/domain, not addr_spec: the parser refuses UTF-8 local parts (RFC 6532).
        msg["To"] = Address(display_name=name, username=local, domain=domain)
        msg["Subject"] = d.subjects.get(language, "")
        msg["Message-ID"] = self.message_id(r)
        msg["Reply-To"] = d.reply_to
        msg["Auto-Submitted"] = "auto-generated"
        msg["List-Id"] = f"{d.list_name} <{d.list_id}>"
        msg["List-Unsubscribe"] = self._list_unsubscribe(utoken)
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg.set_content(_html_to_text(document), subtype="plain", cte="quoted-printable")
        msg.add_alternative(document, subtype="html", cte="quoted-printable")
        if d.event is not None:
            msg.make_mixed()
            msg.add_attachment(
                self.ics(language),
                maintype="text",
                subtype="calendar",
                params={"method": "PUBLISH", "charset": "utf-8"},
                filename=ICS_FILENAME,
                disposition="inline",  # clients offer "add to calendar"
            )
        return msg.as_bytes()


# -- reading messages back ------------------------------------------------------------


def parse_message(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def message_parts(data: bytes) -> tuple[str, str]:
    """The decoded (text, html) parts of a rendered message."""
    msg = parse_message(data)
    text = html_part = ""
    for part in msg.walk():
        ctype = part.get_content_type()
        if isinstance(part, EmailMessage) and not part.is_multipart():
            if ctype == "text/plain" and not text:
                text = str(part.get_content())
            elif ctype == "text/html" and not html_part:
                html_part = str(part.get_content())
    # Parts travel with CRLF; as text they read with plain newlines.
    return text.replace("\r\n", "\n"), html_part.replace("\r\n", "\n")


def rfc2047_addresses(raw: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of a raw address header, decoded per RFC 2047.

    Not ``policy.default``: its parser keeps the space between adjacent encoded-words in
    a display name (RFC 2047 6.2 says to drop it), so a long name does not round-trip.
    """
    unfolded = re.sub(r"\r?\n[ \t]", " ", raw)
    return getaddresses([str(make_header(decode_header(unfolded)))])


def raw_headers(data: bytes) -> list[tuple[str, str]]:
    """The top-level header fields as (name, unfolded raw value), UTF-8 decoded."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    unfolded = re.sub(r"\r\n(?=[ \t])", "", head)
    return [
        (name.strip(), value.strip())
        for name, _, value in (line.partition(":") for line in unfolded.split("\r\n"))
    ]


def _header_view(data: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw_headers(data):
        if key.lower() in ("date", "content-type"):
            continue
        if key.lower() in ("from", "to", "reply-to"):
            out[key.lower()] = rfc2047_addresses(value)
        else:  # folding whitespace is not content
            out[key.lower()] = " ".join(str(make_header(decode_header(value))).split())
    return out


def compare_renders(fast: bytes, reference: bytes, *, skip: tuple[str, ...] = ()) -> list[str]:
    """What differs between two renders (headers except Date and ``skip``, decoded parts)."""
    a, b = parse_message(fast), parse_message(reference)
    diffs = []
    ha, hb = _header_view(fast), _header_view(reference)
    for key in sorted((set(ha) | set(hb)) - set(skip)):
        if ha.get(key) != hb.get(key):
            diffs.append(f"header {key}: {ha.get(key)!r} != {hb.get(key)!r}")
    types_a = [p.get_content_type() for p in a.walk()]
    types_b = [p.get_content_type() for p in b.walk()]
    if types_a != types_b:
        diffs.append(f"structure: {types_a} != {types_b}")
    for label, x, y in zip(
        ("text", "html"), message_parts(fast), message_parts(reference), strict=True
    ):
        if x != y:
            at = next(
                (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                min(len(x), len(y)),
            )
            diffs.append(
                f"{label} part differs at {at}: {x[at : at + 40]!r} != {y[at : at + 40]!r}"
            )
    return diffs


# -- checking a campaign before it is sent ----------------------------------------------

SAMPLE = RecipientView(
    0,
    "ana.perez@ayuntamiento.example",
    "Ana María Pérez",
    "Policía Municipal",
    "es",
    "",
    "informe CLARA D5.2, sección 5.3",
)
# Fields that stress every path: markup, quotes, braces, encoded-word lookalikes, accents.
HOSTILE = RecipientView(
    0,
    "o'brien&co@ejemplo.example",
    "Zoë \"<b>' {0} \\ O'Brien",
    "<script>alert(1)</script> & Co {name} ZQX9qclaraXQZ",
    "es",
    "",
    "<i>web</i> {0} & ZQX5qclaraXQZ",
)


#: Which personal fields are given, in the combinations ``check`` renders.
_PRESENCE = ((True, True, True), (False, False, False), (True, False, True), (False, True, False))


def check_campaign(
    settings: Settings,
    slug: str,
    renderer: Renderer | None = None,
    segments: Iterable[str] | None = None,
) -> list[str]:
    """Every problem that would spoil a send, each with file (and line); empty when fine.
    With ``renderer`` (for this campaign), the variants it prepares stay in its cache for
    the send that follows the check. ``segments``: check only the variants of these (a
    send checks the segments it sends to; ``check`` checks every segment)."""
    try:
        defn = load_campaign(settings, slug)
    except CampaignError as exc:
        return [str(exc)]
    problems: list[str] = []
    toml = defn.toml_path
    for language in LANGUAGES:
        if language not in defn.languages:
            problems.append(f"{toml}: no [languages.{language}] table: {language} version missing")
        elif not defn.template_file(language).is_file():
            problems.append(f"{defn.template_file(language)}: missing ({language} version)")
        if language in defn.languages and not defn.subjects.get(language):
            problems.append(f"{toml}: languages.{language}.subject: missing")
        subject = defn.subjects.get(language, "")
        if len(subject) > MAX_SUBJECT_CHARS:
            problems.append(
                f"{toml}: languages.{language}.subject is {len(subject)} characters, "
                f"over {MAX_SUBJECT_CHARS}"
            )
    if renderer is None:
        signer = TokenSigner(settings.secret_key or "check-only: these tokens are never sent")
        renderer = Renderer(defn, settings, signer, 0)
    chosen = {"", *defn.default_segments, *STANDARD_SEGMENTS} if segments is None else {*segments}
    for language in defn.languages:
        template = defn.template_file(language)
        if not template.is_file():
            continue
        for segment in sorted(chosen):
            for has_name, has_org, has_source in _PRESENCE:
                sample = RecipientView(
                    SAMPLE.id,
                    SAMPLE.email,
                    SAMPLE.name if has_name else "",
                    SAMPLE.organisation if has_org else "",
                    language,
                    segment,
                    SAMPLE.consent_source if has_source else "",
                )
                try:
                    variant = renderer.variant(language, segment, has_name, has_org, has_source)
                    size = len(renderer.render(sample))
                except MailerError as exc:
                    problems.append(str(exc))
                    continue
                where = f"{template} ({language}, segment {segment or '(none)'})"
                unsubscribe = f"{renderer.base_url}/u/{_SENTINELS[3]}"
                if f'href="{unsubscribe}"' not in variant.html:
                    problems.append(f"{where}: no unsubscribe link in the HTML")
                if unsubscribe not in variant.text:
                    problems.append(f"{where}: no unsubscribe link in the text part")
                if size > MAX_MESSAGE_BYTES:
                    problems.append(
                        f"{where}: message is {size / 1024:.0f} kB, over "
                        f"{MAX_MESSAGE_BYTES // 1024} kB (Gmail clips at 102 kB)"
                    )
        if not any(p.startswith(str(template)) for p in problems):
            hostile = dataclasses.replace(HOSTILE, language=language)
            diffs = compare_renders(renderer.render(hostile), renderer.render_reference(hostile))
            problems.extend(
                f"{template}: a personal field is used in a way only plain "
                f"{{{{ name }}}}-style output supports ({d})"
                for d in diffs
            )
    # One Jinja error shows up once per variant: report it once.
    return list(dict.fromkeys(problems))


#: The settings of the legal footer, each with what a message lacks while it is empty.
#: Sending over SMTP is refused until every one is set (``plan.checked_campaign``).
FOOTER_SETTINGS = {
    "sender_legal_name": "the footer does not say who sends the message and holds the data",
    "sender_postal_address": "the footer gives no postal address",
    "controller_contact": "the footer names no data controller contact (it says to reply)",
    "privacy_url": "the footer links to no privacy notice",
}


def campaign_warnings(settings: Settings, defn: CampaignDef, now: dt.datetime) -> list[str]:
    """What a send of ``defn`` at ``now`` (aware) may go out with but should not: an
    invitation without its venue or to an event already past, and each empty footer
    setting. One line each; none stops ``check``, an empty footer setting stops an SMTP send."""
    warnings: list[str] = []
    ev = defn.event
    if ev is not None:
        toml = defn.toml_path
        empty = [key for key in ("venue_name", "venue_address") if not getattr(ev, key)]
        if empty:
            keys = " and ".join(f"[event] {key}" for key in empty)
            verb = "are" if len(empty) > 1 else "is"
            warnings.append(
                f"{toml}: {keys} {verb} empty: the venue is not set, the invitation says "
                f"only {defn.location(defn.languages[0])!r}"
            )
        when = f"{ev.start:%Y-%m-%d %H:%M} ({ev.timezone})"
        now = now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)
        if ev.end <= now:
            warnings.append(
                f"{toml}: [event] start {when} is in the past: "
                "this invitation announces an event that has already taken place"
            )
        elif ev.start <= now:
            warnings.append(
                f"{toml}: [event] start {when} is in the past: "
                "this invitation announces an event that has already begun"
            )
    for name, lack in FOOTER_SETTINGS.items():
        if not getattr(settings, name):
            warnings.append(
                f"setting {name} is not set: {lack}; set it in clara-mail.toml or as "
                f"CLARA_{name.upper()} (sending over SMTP is refused until it is)"
            )
    return warnings
