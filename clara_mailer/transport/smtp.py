"""The SMTP transport: a relay reached through aiosmtplib, named by an ``smtp_url``.

It keeps aiosmtplib for connect, EHLO, TLS, AUTH, MAIL and RCPT, but does DATA itself:
aiosmtplib normalises line endings and dot-stuffs with regular expressions on every
message (about a millisecond of CPU for a newsletter); our messages already have CRLF
endings, so one ``bytes.replace`` does the stuffing (``base.dot_stuff``). What each
reply, refusal or lost connection comes to is in ``base``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
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
from clara_mailer.core.vocabulary import Outcome
from clara_mailer.transport.base import SendResult, classify, dot_stuff, prepare_envelope

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
        envelope = prepare_envelope(envelope_from, recipient, message, self.smtputf8)
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
