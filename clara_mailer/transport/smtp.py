"""The SMTP transport: a relay reached through aiosmtplib, named by an ``smtp_url``.

It keeps aiosmtplib for connect, EHLO, TLS and AUTH. When the server offers PIPELINING
(RFC 2920), the session is then handed to ``_ReplyReader``, a small protocol of our own
on the same transport (TLS included): MAIL, RCPT and DATA go out in one write and their
three replies are read in order, so a message takes two round trips instead of four.
``send_chained`` takes one away again: the next message's MAIL, RCPT and DATA follow the
end of DATA before its reply is read, so the reply to one message's end of DATA and the
three to the next one's envelope come back together. aiosmtplib's protocol cannot do
that: it keeps one reply per read and drops what arrives while no command waits. Without
PIPELINING, aiosmtplib sends MAIL and RCPT one by one.

DATA is ours either way: aiosmtplib normalises line endings and dot-stuffs with regular
expressions on every message (about a millisecond of CPU for a newsletter); our messages
already have CRLF endings, so one ``bytes.replace`` does the stuffing
(``base.dot_stuff``), and a message joined by ``base.MessageChecker`` goes out as its
stuffed pieces in one gather write. What each reply, refusal or lost connection comes
to is in ``base``.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import cast
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
from clara_mailer.transport.base import (
    BeforeEndOfData,
    Message,
    SendResult,
    Settle,
    classify,
    is_ascii,
    payload_text,
    prepare_envelope,
)

_SCHEMES = {"smtp": 587, "smtps": 465}
#: What aiosmtplib refuses in a command argument (CR and LF would inject a command).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
#: A whole reply, continuation lines included, may not be longer (aiosmtplib's bound).
_MAX_REPLY = 8192 * 4
_TLS_MODES = {"starttls", "none"}
_QUERY_KEYS = {"tls", "ca_file", "ehlo"}


async def _wait_closed(protocol: SMTPProtocol | _ReplyReader | None, wait: float = 1.0) -> None:
    """Wait until a closed connection is really gone: closing TLS takes a round trip
    (close_notify), and an event loop that stops first leaves the socket to the GC."""
    if protocol is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while protocol.transport is not None and loop.time() < deadline:
        await asyncio.sleep(0.005)


class _ReplyReader(asyncio.Protocol):
    """The session's protocol once aiosmtplib has set it up, on a server that offers
    PIPELINING: keeps every reply that arrives, in order, however the server splits or
    joins them, so several commands can be written before their replies are read.

    A lost connection (or EOF) is kept too: replies that arrived before it are still
    read, then ``reply`` raises ``SMTPServerDisconnected``."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport: asyncio.Transport | None = transport
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._lost: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if not self._buffer and self._lost is None and data[-1:] == b"\n":
            # The usual packet: whole one-line replies ("250 2.1.0 Ok\r\n..."), each
            # parsed as ``_parse`` would; anything else goes the general way below.
            lines = data.split(b"\n")
            lines.pop()
            if all(line[3:4] == b" " for line in lines):
                try:
                    self._replies.extend(
                        [(int(line[:3]), _text(line[4:].strip(b" \t\r\n"))) for line in lines]
                    )
                except ValueError:
                    pass  # a malformed line: the general way below says so
                else:
                    self._wake()
                    return
        self._buffer += data
        while self._lost is None:
            end = self._reply_end()
            if end is None:
                break
            try:
                self._replies.append(self._parse(bytes(self._buffer[:end])))
            except SMTPResponseException as exc:
                self._fail(exc)
            del self._buffer[:end]
        if len(self._buffer) > _MAX_REPLY:
            self._fail(SMTPResponseException(-1, "Response too long"))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        lost = SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self.transport = None

    # -- for SMTPConnection

    @property
    def is_connected(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        self.writelines((data,))

    def writelines(self, pieces: Sequence[bytes]) -> None:
        """Write ``pieces`` in one go (a message's shared parts as they are: one gather
        write, no joined copy)."""
        if self.transport is None or self.transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self.transport.writelines(pieces)

    async def reply(self, timeout: float | None) -> tuple[int, str]:
        """The next reply, in the order the commands went out."""
        while not self._replies:
            if self._lost is not None:
                raise self._lost
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            # A timer of our own, not ``asyncio.wait_for``: this runs for most messages,
            # and wait_for adds a second future and its callbacks each time.
            timer = None if timeout is None else loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self._replies.popleft()

    def reply_nowait(self) -> tuple[int, str] | None:
        """The next reply if it has arrived already (the connection may be gone since)."""
        return self._replies.popleft() if self._replies else None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- parsing

    def _reply_end(self) -> int | None:
        """Where the first complete reply in the buffer ends (after its last line)."""
        start = 0
        while True:
            newline = self._buffer.find(b"\n", start)
            if newline == -1:
                return None
            if self._buffer[start + 3 : start + 4] != b"-":
                return newline + 1
            start = newline + 1

    @staticmethod
    def _parse(raw: bytes) -> tuple[int, str]:
        lines = raw.split(b"\n")[:-1]
        try:
            code = int(lines[-1][:3])
        except ValueError:
            shown = lines[-1].decode("utf-8", "replace")
            raise SMTPResponseException(-1, f"Malformed SMTP response line: {shown}") from None
        return code, _text(b"\n".join(line[4:].strip(b" \t\r\n") for line in lines))

    def _fail(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _text(text: bytes) -> str:
    return text.decode("utf-8", "surrogateescape")


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(SMTPTimeoutError("Timed out waiting for server response"))


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
        self._reader: _ReplyReader | None = None
        self._sent_on_connection = 0
        #: Who takes the outcome of the last message while its reply is unread
        #: (``send_chained``); its final ".<CRLF>" may still be owed: it goes out in one
        #: write with the next envelope, so the server reads (and answers) them together.
        self._unsettled: Settle | None = None
        self._end_owed = False
        self._learn(client)

    def _learn(self, client: aiosmtplib.SMTP) -> None:
        self.smtputf8 = client.supports_extension("smtputf8")
        self.eightbitmime = client.supports_extension("8bitmime")
        self._reader = None
        protocol = client.protocol
        transport = protocol.transport if protocol is not None else None
        # asyncio's transports and uvloop's (which are not asyncio.Transport subclasses)
        # can change protocol; a transport that cannot keeps the unpipelined path.
        if client.supports_extension("pipelining") and hasattr(transport, "set_protocol"):
            # From here on every byte of the session goes through the reader.
            self._reader = _ReplyReader(cast(asyncio.Transport, transport))
            self._reader.transport.set_protocol(self._reader)  # type: ignore[union-attr]

    @property
    def pipelining(self) -> bool:
        """MAIL, RCPT and DATA go out in one write (the server offers PIPELINING)."""
        return self._reader is not None

    def _drop(self, client: aiosmtplib.SMTP) -> None:
        """Close the session at once (no QUIT). A message whose end of DATA went out
        unanswered is settled with its reply if that has arrived, else as `unknown`."""
        settle, self._unsettled = self._unsettled, None
        if settle is not None:
            reply = self._reader.reply_nowait() if self._reader is not None else None
            if self._end_owed:  # its end never went out: not delivered
                settle(
                    SendResult(
                        Outcome.DEFERRED,
                        0,
                        "connection lost before the end of the message was sent",
                        connection_broken=True,
                    )
                )
            else:
                settle(_no_final_reply("connection lost") if reply is None else classify(*reply))
        self._end_owed = False
        if self._reader is not None:
            self._reader.close()
        client.close()
        self._client = None

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
            self._drop(self._client)
        self._client = None
        return SendResult(
            Outcome.DEFERRED, 0, f"{what}: {exc or type(exc).__name__}", connection_broken=True
        )

    async def _command(self, client: aiosmtplib.SMTP, *args: bytes) -> tuple[int, str]:
        if self._reader is None:
            response = await client.execute_command(*args, timeout=self._transport.timeout)
            return response.code, response.message
        self._reader.write(_command_line(*args))
        return await self._reader.reply(self._transport.timeout)

    def _connected(self, client: aiosmtplib.SMTP) -> bool:
        return self._reader.is_connected if self._reader is not None else client.is_connected

    def _write(self, client: aiosmtplib.SMTP, *pieces: bytes) -> None:
        if self._reader is not None:
            self._reader.writelines(pieces)
            return
        protocol = client.protocol
        if protocol is None:
            raise SMTPServerDisconnected("Connection lost")
        protocol.write(b"".join(pieces))

    async def _reset(self, client: aiosmtplib.SMTP, result: SendResult) -> SendResult:
        """After a refusal mid-transaction: RSET so the session can carry on."""
        if result.connection_broken or not self._connected(client):
            self._drop(client)  # a 421 leaves the socket open: close it, not leave it to GC
            return SendResult(result.outcome, result.code, result.reply, connection_broken=True)
        try:
            code, _ = await self._command(client, b"RSET")
        except (SMTPException, OSError):
            code = 0
        if code != 250:
            self._drop(client)
            return SendResult(result.outcome, result.code, result.reply, connection_broken=True)
        return result

    async def _envelope_pipelined(
        self, client: aiosmtplib.SMTP, mail: tuple[bytes, ...], rcpt: tuple[bytes, ...]
    ) -> SendResult | None:
        """MAIL, RCPT and DATA in one write (RFC 2920), then their replies in order:
        ``None`` once DATA got 354, else what the first refusal comes to (after RSET).
        A 421 ends the session at once: the replies after it never come."""
        assert self._reader is not None
        reader, timeout = self._reader, self._transport.timeout
        commands = _command_line(*mail) + _command_line(*rcpt) + b"DATA\r\n"
        reader.write(b".\r\n" + commands if self._end_owed else commands)
        self._end_owed = False
        if self._unsettled is not None:
            # The message before ended its DATA ahead of these three: its reply comes first.
            previous = await self._settle_unsettled(client)
            if previous.connection_broken:  # the session is gone (421, or lost)
                if previous.code == 421:
                    return previous  # the server's word on the session holds for this one
                return SendResult(
                    Outcome.DEFERRED,
                    0,
                    "connection lost before the message was sent (with the one before)",
                    connection_broken=True,
                )
        refusal: SendResult | None = None
        for expected in ((250,), (250, 251), (354,)):
            code, text = await reader.reply(timeout)
            if code == 354 and refusal is not None:
                # DATA accepted although MAIL or RCPT was refused (RFC 2920 section 3.1:
                # a server must not, but if it does): end the empty message at once.
                reader.write(b".\r\n")
                await reader.reply(timeout)
                continue
            if code in expected:
                continue
            result = classify(code, text)
            if result.connection_broken:
                return await self._reset(client, result)
            refusal = refusal or result
        return None if refusal is None else await self._reset(client, refusal)

    async def send(
        self,
        envelope_from: str,
        recipient: str,
        message: Message,
        before_end_of_data: BeforeEndOfData | None = None,
    ) -> SendResult:
        await self.settle()
        result = await self._up_to_end_of_data(
            envelope_from, recipient, message, before_end_of_data, chained=False
        )
        if result is not None:
            return result
        assert self._client is not None  # nothing drops the session after the end of DATA
        return await self._final_reply(self._client)

    async def send_chained(
        self,
        envelope_from: str,
        recipient: str,
        message: Message,
        settle: Settle,
        before_end_of_data: BeforeEndOfData | None = None,
    ) -> None:
        """``send``, handing the outcome to ``settle``. With PIPELINING the reply to the
        end of DATA is left unread: the next message's MAIL, RCPT and DATA go out first,
        in the same round trip (or ``settle``/``close`` reads it). At most one message per
        session is ever unanswered, so a crash leaves at most one `unknown` per
        connection, as before."""
        result = await self._up_to_end_of_data(
            envelope_from, recipient, message, before_end_of_data, chained=True
        )
        if result is not None:
            settle(result)
        elif self._reader is None:  # no PIPELINING: nothing can go out before the reply
            assert self._client is not None
            settle(await self._final_reply(self._client))
        else:
            self._unsettled = settle

    async def settle(self) -> None:
        """End the last message (its final ".<CRLF>" if still owed), read its reply and
        settle it."""
        client = self._client
        if self._unsettled is None or client is None:
            return
        if self._end_owed:
            try:
                self._write(client, b".\r\n")
            except (SMTPServerDisconnected, OSError):
                self._drop(client)  # never written: settled as not delivered
                return
            self._end_owed = False
        await self._settle_unsettled(client)

    async def _settle_unsettled(self, client: aiosmtplib.SMTP) -> SendResult:
        settle, self._unsettled = self._unsettled, None
        assert settle is not None
        result = await self._final_reply(client)
        settle(result)
        return result

    async def _up_to_end_of_data(
        self,
        envelope_from: str,
        recipient: str,
        message: Message,
        before_end_of_data: BeforeEndOfData | None,
        *,
        chained: bool,
    ) -> SendResult | None:
        """Everything up to the end of DATA: ``None`` once the message is ended (its
        reply unread), else its outcome. ``chained`` on a pipelining session: the final
        ".<CRLF>" is left owed (``_end_owed``), for the next envelope's write."""
        client_or_result = await self._fresh_client()
        if isinstance(client_or_result, SendResult):
            return client_or_result
        client = client_or_result
        hold_end = chained and self._reader is not None
        envelope = prepare_envelope(envelope_from, recipient, message, self.smtputf8)
        if isinstance(envelope, SendResult):
            return envelope
        options = []
        if envelope.smtputf8:
            options.append(b"SMTPUTF8")
        if self.eightbitmime and not is_ascii(message):
            options.append(b"BODY=8BITMIME")
        pieces = payload_text(message)  # the DATA payload but its final ".<CRLF>"
        self._sent_on_connection += 1

        mail = (b"MAIL", b"FROM:<" + envelope.mail_from + b">", *options)
        rcpt = (b"RCPT", b"TO:<" + envelope.rcpt_to + b">")
        # MAIL, RCPT, DATA: trouble here means nothing was accepted, so DEFERRED is safe.
        try:
            if self._reader is not None:
                refused = await self._envelope_pipelined(client, mail, rcpt)
                if refused is not None:
                    return refused
            else:
                code, text = await self._command(client, *mail)
                if code != 250:
                    return await self._reset(client, classify(code, text))
                code, text = await self._command(client, *rcpt)
                if code not in (250, 251):
                    return await self._reset(client, classify(code, text))
                code, text = await self._command(client, b"DATA")
                if code != 354:
                    return await self._reset(client, classify(code, text))
            if before_end_of_data is None and not hold_end:
                self._write(client, *pieces, b".\r\n")
            else:
                # Everything but the final ".<CRLF>" (the body ends with its own CRLF):
                # the server cannot take the message before that arrives.
                self._write(client, *pieces)
                if before_end_of_data is not None:
                    await self._flushed(client)
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPResponseException, OSError) as exc:
            return self._broken("connection lost before the message was sent", exc)
        except ValueError as exc:  # aiosmtplib refuses control characters in a command
            return SendResult(Outcome.FAILED, 0, f"invalid address: {exc}")
        if before_end_of_data is not None:
            try:
                before_end_of_data()
            except Exception as exc:  # the caller refuses: the message must not go out
                return self._broken("not sent (the end of the message was held back)", exc)
        if hold_end:
            self._end_owed = True  # written by the next envelope, ``settle`` or ``close``
            return None
        if before_end_of_data is not None:
            try:
                self._write(client, b".\r\n")
            except (SMTPServerDisconnected, OSError) as exc:
                # Never written (the connection was already going): not delivered.
                return self._broken("connection lost at the end of the message", exc)

        # The final <CRLF>.<CRLF> is written: the server may accept the message
        # even if we never see its reply, so such a message must not go out again.
        return None

    async def _flushed(self, client: aiosmtplib.SMTP) -> None:
        """Wait until the kernel has taken what was written (only when it has not at once,
        i.e. the server reads slowly), so the end of DATA follows right after the
        callback. Lost connections surface at the next write."""
        holder = self._reader if self._reader is not None else client.protocol
        transport = cast(asyncio.WriteTransport | None, getattr(holder, "transport", None))
        if transport is None or not transport.get_write_buffer_size():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._transport.data_timeout
        while (
            not transport.is_closing()
            and transport.get_write_buffer_size()
            and loop.time() < deadline
        ):
            await asyncio.sleep(0.0005)

    async def _final_reply(self, client: aiosmtplib.SMTP) -> SendResult:
        timeout = self._transport.data_timeout
        try:
            if self._reader is not None:
                code, text = await self._reader.reply(timeout)
            else:
                protocol = client.protocol
                if protocol is None:
                    raise SMTPServerDisconnected("Connection lost")
                response = await protocol.read_response(timeout=timeout)
                code, text = response.code, response.message
        except (SMTPServerDisconnected, SMTPTimeoutError, SMTPResponseException, OSError) as exc:
            self._drop(client)
            return _no_final_reply(str(exc) or type(exc).__name__)
        result = classify(code, text)
        if result.connection_broken:
            self._drop(client)
        return result

    async def close(self) -> None:
        await self.settle()
        client, self._client = self._client, None
        reader, self._reader = self._reader, None
        if client is None:
            return
        if reader is not None:
            if reader.is_connected:
                try:
                    reader.write(b"QUIT\r\n")
                    await reader.reply(min(self._transport.timeout, 5.0))
                except (SMTPException, OSError):
                    pass
            reader.close()
            client.close()
            await _wait_closed(reader)
            return
        if not client.is_connected:
            return
        protocol = client.protocol  # quit() drops it from the client
        try:
            await client.quit(timeout=min(self._transport.timeout, 5.0))
        except (SMTPException, OSError):
            pass
        finally:
            client.close()
            await _wait_closed(protocol)


def _no_final_reply(why: str) -> SendResult:
    return SendResult(
        Outcome.UNKNOWN,
        0,
        f"no reply after the message was sent ({why}); the server may have accepted it",
        connection_broken=True,
    )


def _command_line(*args: bytes) -> bytes:
    """One command as it goes out; ValueError (as aiosmtplib) for a control character."""
    for arg in args:
        if _CONTROL.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"
