"""Where finished messages go: an SMTP relay, an outbox folder, or memory.

A seam in the spirit of httpx's transports. ``Transport.connect()`` opens a
``Connection``; ``Connection.send()`` hands over one message for one recipient and
returns a ``SendResult`` instead of raising, so the caller's state machine decides
what to do with every outcome::

    2xx                                   -> SENT
    4xx                                   -> DEFERRED (421: connection_broken too)
    5xx                                   -> FAILED
    refused/reset/timeout before the end
      of DATA was written                 -> DEFERRED, connection_broken
    lost or timed out after the final
      <CRLF>.<CRLF> was written           -> UNKNOWN (never retried automatically)

The SMTP implementation keeps aiosmtplib for connect, EHLO, TLS, AUTH, MAIL and
RCPT, but does DATA itself: aiosmtplib normalises line endings and dot-stuffs with
regular expressions on every message (about a millisecond of CPU for a newsletter);
our messages already have CRLF endings, so one ``bytes.replace`` does the stuffing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
from aiosmtplib.errors import (
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import SMTPProtocol

from clara_mailer.core.errors import ConfigError, TransportError
from clara_mailer.core.settings import Settings


class Outcome(StrEnum):
    SENT = "sent"
    DEFERRED = "deferred"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    code: int  # SMTP reply code; 0 when there was no reply (connection lost, timeout)
    reply: str  # reply text incl. enhanced status code when given, or what happened
    connection_broken: bool = False  # unusable: reconnect (after backoff on 421)


class Connection(Protocol):
    """One open session; one ``send`` at a time."""

    smtputf8: bool
    eightbitmime: bool

    async def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult: ...

    async def close(self) -> None: ...


class Transport(Protocol):
    network: bool
    description: str

    async def connect(self) -> Connection: ...


def classify(code: int, text: str) -> SendResult:
    """Turn an SMTP reply into an outcome (RFC 5321 4.2.1)."""
    if 200 <= code < 300:
        return SendResult(Outcome.SENT, code, text)
    if 400 <= code < 500:
        return SendResult(Outcome.DEFERRED, code, text, connection_broken=code == 421)
    return SendResult(Outcome.FAILED, code, text)


# --- envelope checks shared by every transport -----------------------------------------

_FORBIDDEN_IN_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


@dataclass(frozen=True)
class _Envelope:
    mail_from: bytes
    rcpt_to: bytes
    smtputf8: bool  # the SMTPUTF8 MAIL parameter is needed


def _envelope_address(address: str, use_utf8: bool) -> bytes:
    """The address as it goes inside <...>; an IDN domain as A-labels without SMTPUTF8."""
    if use_utf8 or address.isascii():
        return address.encode("utf-8")
    local, _, domain = address.rpartition("@")
    return local.encode("ascii") + b"@" + domain.encode("idna")


def _prepare_envelope(
    envelope_from: str, recipient: str, message: bytes, server_smtputf8: bool
) -> _Envelope | SendResult:
    """Check the addresses and the line endings and choose the MAIL parameters, or say
    why the message cannot go."""
    bad = _bad_line_endings(message)
    if bad is not None:
        return bad
    for role, address in (("sender", envelope_from), ("recipient", recipient)):
        if (address or role == "recipient") and (
            _FORBIDDEN_IN_ADDRESS.search(address) or "@" not in address
        ):
            return SendResult(Outcome.FAILED, 0, f"invalid {role} address {address!r}")
    local_parts_ascii = (
        envelope_from.rpartition("@")[0].isascii() and recipient.rpartition("@")[0].isascii()
    )
    header_end = message.find(b"\r\n\r\n")
    headers_ascii = message[: header_end if header_end >= 0 else len(message)].isascii()
    needs_utf8 = not (local_parts_ascii and headers_ascii)
    if needs_utf8 and not server_smtputf8:
        why = "a non-ASCII local part" if not local_parts_ascii else "raw UTF-8 headers"
        return SendResult(
            Outcome.FAILED,
            0,
            f"server does not support SMTPUTF8 (RFC 6531), needed for {why}: {recipient}",
        )
    try:
        return _Envelope(
            _envelope_address(envelope_from, needs_utf8),
            _envelope_address(recipient, needs_utf8),
            needs_utf8,
        )
    except UnicodeError:
        return SendResult(Outcome.FAILED, 0, f"domain cannot be IDNA-encoded: {recipient}")


def _bad_line_endings(message: bytes) -> SendResult | None:
    # Two single-byte counts (~20 us for 26 kB) catch a bare LF or CR; counting "\r\n"
    # as well would double the cost for the rare message where bare ones balance out.
    if message.count(b"\n") != message.count(b"\r"):
        return SendResult(Outcome.FAILED, 0, "message has a bare CR or LF (needs CRLF endings)")
    return None


def dot_stuff(message: bytes) -> bytes:
    """The DATA payload: lines starting with "." doubled, ended by <CRLF>.<CRLF>."""
    # find() first: most messages have no line starting with ".", and it is 5x cheaper.
    stuffed = message.replace(b"\r\n.", b"\r\n..") if b"\r\n." in message else message
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


# --- SMTP --------------------------------------------------------------------------------

_SCHEMES = {"smtp": 587, "smtps": 465}
_TLS_MODES = {"starttls", "none"}
_QUERY_KEYS = {"tls", "ca_file", "ehlo"}


async def _wait_closed(protocol: SMTPProtocol | None, wait: float = 1.0) -> None:
    """Wait until a closed connection is really gone: closing TLS takes a round trip
    (close_notify), and an event loop that stops first leaves the socket to the GC."""
    if protocol is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while protocol.transport is not None and loop.time() < deadline:
        await asyncio.sleep(0.005)


class SMTPTransport:
    """An SMTP relay (aiosmtplib); credentials live only in this object's memory."""

    network = True

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: str = "starttls",
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        local_hostname: str | None = None,
        timeout: float = 60.0,
        data_timeout: float = 600.0,
        reconnect_after: int = 1000,
    ) -> None:
        if tls not in {"starttls", "implicit", "none"}:
            raise ConfigError(f"unknown TLS mode {tls!r}: use starttls, implicit or none")
        self.host, self.port, self.tls = host, port, tls
        self._username, self._password = username, password
        self.ca_file = ca_file
        self.local_hostname = local_hostname
        self.timeout, self.data_timeout = timeout, data_timeout
        self.reconnect_after = max(1, reconnect_after)
        scheme = "smtps" if tls == "implicit" else "smtp"
        user = f"{username}@" if username else ""
        mode = {"starttls": "STARTTLS", "implicit": "TLS", "none": "no TLS"}[tls]
        self.description = f"{scheme}://{user}{host}:{port} ({mode})"
        self._tls_context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"<SMTPTransport {self.description}>"

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 60.0,
        data_timeout: float = 600.0,
        reconnect_after: int = 1000,
    ) -> SMTPTransport:
        """``smtp://user:pass@host:587`` (STARTTLS), ``smtps://host:465``, ``...?tls=none``.

        Query parameters: ``tls=starttls|none`` (smtp only), ``ca_file=PATH`` (trust this
        CA instead of the system's), ``ehlo=NAME`` (our host name in EHLO).
        """
        from clara_mailer.core.settings import mask_url

        shown = mask_url(url) if "@" in url else url
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"smtp_url {shown!r} is not a valid URL: {exc}") from None
        if parts.scheme not in _SCHEMES:
            raise ConfigError(
                f"smtp_url {shown!r}: unknown scheme {parts.scheme!r}, use smtp:// or smtps://"
            )
        if not parts.hostname:
            raise ConfigError(f"smtp_url {shown!r} names no host")
        if parts.path not in ("", "/"):
            raise ConfigError(f"smtp_url {shown!r}: unexpected path {parts.path!r}")
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(query) - _QUERY_KEYS)
        if unknown:
            raise ConfigError(
                f"smtp_url {shown!r}: unknown parameter {unknown[0]!r} "
                f"(known: {', '.join(sorted(_QUERY_KEYS))})"
            )
        tls_param = query.get("tls", ["starttls"])[-1]
        if parts.scheme == "smtps":
            if "tls" in query:
                raise ConfigError(f"smtp_url {shown!r}: smtps:// always uses TLS; drop tls=")
            tls = "implicit"
        elif tls_param not in _TLS_MODES:
            raise ConfigError(f"smtp_url {shown!r}: tls must be starttls or none")
        else:
            tls = tls_param
        ca_file = query.get("ca_file", [None])[-1]
        if ca_file is not None and not Path(ca_file).is_file():
            raise ConfigError(f"smtp_url {shown!r}: ca_file {ca_file!r} is not a file")
        return cls(
            parts.hostname,
            port or _SCHEMES[parts.scheme],
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            ca_file=ca_file,
            local_hostname=query.get("ehlo", [None])[-1],
            timeout=timeout,
            data_timeout=data_timeout,
            reconnect_after=reconnect_after,
        )

    def _context(self) -> ssl.SSLContext:
        # Built once: aiosmtplib would build (and load the CA store) on every connect.
        if self._tls_context is None:
            self._tls_context = ssl.create_default_context(cafile=self.ca_file)
        return self._tls_context

    async def _open(self) -> aiosmtplib.SMTP:
        if self.local_hostname is None:
            self.local_hostname = await asyncio.to_thread(socket.getfqdn)
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.local_hostname,
            timeout=self.timeout,
            use_tls=self.tls == "implicit",
            start_tls=self.tls == "starttls",
            tls_context=self._context() if self.tls != "none" else None,
            username=self._username,
            password=self._password,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                await client.ehlo()
        except SMTPException as exc:
            await self._abandon(client)
            text = str(exc)
            if "STARTTLS extension not supported" in text:
                text = "the server does not offer STARTTLS (add ?tls=none to send unencrypted)"
            raise TransportError(f"cannot connect to {self.description}: {text}") from None
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            await self._abandon(client)
            raise TransportError(
                f"cannot connect to {self.description}: {exc or type(exc).__name__}"
            ) from None
        return client

    async def _abandon(self, client: aiosmtplib.SMTP) -> None:
        protocol = client.protocol
        client.close()
        if protocol is not None:
            await _wait_closed(protocol)
        elif self.tls != "none":
            # aiosmtplib closed it itself on this error and dropped its protocol: give the
            # TLS close a moment to finish (only on a failed connect).
            await asyncio.sleep(0.05)

    async def connect(self) -> SMTPConnection:
        return SMTPConnection(self, await self._open())


class SMTPConnection:
    """One SMTP session; reconnects by itself after ``reconnect_after`` messages."""

    def __init__(self, transport: SMTPTransport, client: aiosmtplib.SMTP) -> None:
        self._transport = transport
        self._client: aiosmtplib.SMTP | None = client
        self._sent_on_connection = 0
        self._learn(client)

    def _learn(self, client: aiosmtplib.SMTP) -> None:
        self.smtputf8 = client.supports_extension("smtputf8")
        self.eightbitmime = client.supports_extension("8bitmime")

    async def _fresh_client(self) -> aiosmtplib.SMTP | SendResult:
        if self._client is not None and self._sent_on_connection < self._transport.reconnect_after:
            return self._client
        if self._client is not None:
            await self.close()
        try:
            self._client = await self._transport._open()
        except TransportError as exc:
            return SendResult(Outcome.DEFERRED, 0, str(exc), connection_broken=True)
        self._sent_on_connection = 0
        self._learn(self._client)
        return self._client

    def _broken(self, what: str, exc: BaseException) -> SendResult:
        if self._client is not None:
            self._client.close()
        self._client = None
        return SendResult(
            Outcome.DEFERRED, 0, f"{what}: {exc or type(exc).__name__}", connection_broken=True
        )

    async def _command(self, client: aiosmtplib.SMTP, *args: bytes) -> tuple[int, str]:
        response = await client.execute_command(*args, timeout=self._transport.timeout)
        return response.code, response.message

    async def _reset(self, client: aiosmtplib.SMTP, result: SendResult) -> SendResult:
        """After a refusal mid-transaction: RSET so the session can carry on."""
        if result.connection_broken or not client.is_connected:
            client.close()  # a 421 leaves the socket open: close it, not leave it to GC
            self._client = None
            return SendResult(result.outcome, result.code, result.reply, connection_broken=True)
        try:
            code, _ = await self._command(client, b"RSET")
        except (SMTPException, OSError):
            code = 0
        if code != 250:
            client.close()
            self._client = None
            return SendResult(result.outcome, result.code, result.reply, connection_broken=True)
        return result

    async def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
        client_or_result = await self._fresh_client()
        if isinstance(client_or_result, SendResult):
            return client_or_result
        client = client_or_result
        envelope = _prepare_envelope(envelope_from, recipient, message, self.smtputf8)
        if isinstance(envelope, SendResult):
            return envelope
        options = []
        if envelope.smtputf8:
            options.append(b"SMTPUTF8")
        if self.eightbitmime and not message.isascii():
            options.append(b"BODY=8BITMIME")
        payload = dot_stuff(message)
        self._sent_on_connection += 1

        # MAIL, RCPT, DATA: trouble here means nothing was accepted, so DEFERRED is safe.
        try:
            code, text = await self._command(
                client, b"MAIL", b"FROM:<" + envelope.mail_from + b">", *options
            )
            if code != 250:
                return await self._reset(client, classify(code, text))
            code, text = await self._command(client, b"RCPT", b"TO:<" + envelope.rcpt_to + b">")
            if code not in (250, 251):
                return await self._reset(client, classify(code, text))
            code, text = await self._command(client, b"DATA")
            if code != 354:
                return await self._reset(client, classify(code, text))
            protocol = client.protocol
            if protocol is None:
                raise SMTPServerDisconnected("Connection lost")
            protocol.write(payload)
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPResponseException, OSError) as exc:
            return self._broken("connection lost before the message was sent", exc)
        except ValueError as exc:  # aiosmtplib refuses control characters in a command
            return SendResult(Outcome.FAILED, 0, f"invalid address: {exc}")

        # The final <CRLF>.<CRLF> is written: the server may accept the message
        # even if we never see its reply, so such a message must not go out again.
        return await self._final_reply(client, protocol)

    async def _final_reply(self, client: aiosmtplib.SMTP, protocol: SMTPProtocol) -> SendResult:
        try:
            response = await protocol.read_response(timeout=self._transport.data_timeout)
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPResponseException, OSError) as exc:
            client.close()
            self._client = None
            return SendResult(
                Outcome.UNKNOWN,
                0,
                f"no reply after the message was sent ({exc or type(exc).__name__}); "
                "the server may have accepted it",
                connection_broken=True,
            )
        result = classify(response.code, response.message)
        if result.connection_broken:
            client.close()
            self._client = None
        return result

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is None or not client.is_connected:
            return
        protocol = client.protocol  # quit() drops it from the client
        try:
            await client.quit(timeout=min(self._transport.timeout, 5.0))
        except (SMTPException, OSError):
            pass
        finally:
            client.close()
            await _wait_closed(protocol)


# --- outbox and memory ------------------------------------------------------------------

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._+-]+")


def outbox_filename(recipient: str) -> str:
    """A safe file name for a recipient; the hash keeps look-alike addresses apart."""
    safe = _UNSAFE_FILENAME.sub("_", recipient.replace("@", "_at_"))[:80].strip("._") or "x"
    digest = hashlib.sha256(recipient.encode("utf-8")).hexdigest()[:10]
    return f"{safe}-{digest}.eml"


class OutboxConnection:
    smtputf8 = True
    eightbitmime = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
        envelope = _prepare_envelope(envelope_from, recipient, message, self.smtputf8)
        if isinstance(envelope, SendResult):
            return envelope
        # One file per recipient: a resend of the same delivery replaces its file.
        # Write-then-rename so a reader never sees half a message (no fsync: a dry run
        # does not need to survive a power cut, and fsync would cost milliseconds).
        target = self.directory / outbox_filename(recipient)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(message)
            os.replace(temporary, target)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            return SendResult(Outcome.DEFERRED, 0, f"cannot write {target}: {exc.strerror}")
        return SendResult(Outcome.SENT, 250, f"written to {target}")

    async def close(self) -> None:
        return None


class OutboxTransport:
    """Writes each message as an .eml file; nothing goes over the network."""

    network = False

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.description = f"outbox {self.directory}"

    async def connect(self) -> OutboxConnection:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransportError(f"cannot create outbox {self.directory}: {exc.strerror}") from None
        return OutboxConnection(self.directory)


Reply = SendResult | tuple[int, str]


@dataclass
class MemoryTransport:
    """Keeps every message in ``sent``; for dry runs, tests and pipeline benchmarks.

    ``replies`` scripts the answer for a recipient, e.g.
    ``{"bad@x.example": (550, "5.1.1 no such user")}``; everyone else gets 250.
    """

    replies: Mapping[str, Reply] = field(default_factory=dict)
    smtputf8: bool = True
    eightbitmime: bool = True
    sent: list[tuple[str, str, bytes]] = field(default_factory=list)
    connections: int = 0
    network = False
    description = "memory (nothing is delivered)"

    async def connect(self) -> MemoryConnection:
        self.connections += 1
        return MemoryConnection(self)


class MemoryConnection:
    def __init__(self, transport: MemoryTransport) -> None:
        self._transport = transport
        self.smtputf8 = transport.smtputf8
        self.eightbitmime = transport.eightbitmime

    async def send(self, envelope_from: str, recipient: str, message: bytes) -> SendResult:
        envelope = _prepare_envelope(envelope_from, recipient, message, self.smtputf8)
        if isinstance(envelope, SendResult):
            return envelope
        scripted = self._transport.replies.get(recipient)
        if isinstance(scripted, SendResult):
            result = scripted
        elif scripted is not None:
            result = classify(*scripted)
        else:
            result = SendResult(Outcome.SENT, 250, "2.0.0 OK (kept in memory)")
        if result.outcome in (Outcome.SENT, Outcome.UNKNOWN):
            self._transport.sent.append((envelope_from, recipient, message))
        return result

    async def close(self) -> None:
        return None


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
