"""Real SMTP servers for tests and benchmarks (aiosmtpd), with fault injection.

In-process::

    faults = Faults(replies={"bad@x.example": (550, "5.1.1 no such user")})
    with RecordingSMTPServer(faults=faults) as server:
        ... send to 127.0.0.1:server.port ...
        assert server.messages[0].recipients == ["anna@x.example"]

As a subprocess (one JSON line per accepted message, flushed; exits on SIGTERM)::

    python -m tests.smtp_server --port 2525 --record accepted.jsonl \
        --faults '{"greylist": true, "p421": 0.05, "seed": 7}'
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

# What a scripted recipient gets: a reply, or one of these behaviours.
DROP_AFTER_RCPT = "drop-after-rcpt"  # close without answering RCPT
DROP_AFTER_DATA = "drop-after-data"  # read the whole message, close without answering
SLOW_AFTER_DATA = "slow-after-data"  # accept the message, answer after `slow_seconds`
Script = tuple[int, str] | str


@dataclass
class Faults:
    """What should go wrong. Random faults draw from ``random.Random(seed)``."""

    replies: Mapping[str, Script] = field(default_factory=dict)  # per recipient
    greylist: bool = False  # 451 4.7.1 on the first RCPT per recipient
    p421: float = 0.0  # chance of "421" (then close) at MAIL
    drop_stage: str | None = None  # "rcpt" or "data": where random drops happen
    p_drop: float = 0.0  # chance of a drop at drop_stage
    slow_seconds: float = 0.0  # how long SLOW_AFTER_DATA sleeps
    p_slow: float = 0.0  # chance of a slow reply after DATA
    max_per_connection: int = 0  # after this many messages MAIL gets 421 and close
    seed: int = 0

    @classmethod
    def from_json(cls, text: str) -> Faults:
        data = json.loads(text)
        if "replies" in data:
            data["replies"] = {
                k: tuple(v) if isinstance(v, list) else v for k, v in data["replies"].items()
            }
        return cls(**data)


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    recipients: list[str]
    data: bytes  # as received, after un-dot-stuffing, CRLF endings kept
    mail_options: list[str]
    connection: int  # 1-based number of the connection that carried it
    received_at: float

    @property
    def message_id(self) -> str | None:
        found = re.search(rb"(?im)^Message-ID:\s*(\S+)", self.data.split(b"\r\n\r\n", 1)[0])
        return found.group(1).decode("utf-8", "replace") if found else None


class _Handler:
    def __init__(self, server: RecordingSMTPServer) -> None:
        self.server = server

    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        if not getattr(session, "clara_number", None):
            session.clara_number = self.server._new_connection()  # type: ignore[attr-defined]
            session.clara_messages = 0  # type: ignore[attr-defined]
        session.host_name = hostname
        if self.server.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        faults = self.server.faults
        number = getattr(session, "clara_messages", 0)
        if faults.max_per_connection and number >= faults.max_per_connection:
            await self._close_with(smtp, "421 4.7.0 too many messages on this connection")
        if faults.p421 and self.server._chance(faults.p421):
            await self._close_with(smtp, "421 4.3.2 service shutting down, try later")
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        faults = self.server.faults
        script = faults.replies.get(address)
        if isinstance(script, tuple):
            return f"{script[0]} {script[1]}"
        if script == DROP_AFTER_RCPT or (
            faults.drop_stage == "rcpt" and faults.p_drop and self.server._chance(faults.p_drop)
        ):
            self._hang_up(smtp)
        if faults.greylist and self.server._first_attempt(address):
            return "451 4.7.1 greylisted, please try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        faults = self.server.faults
        script = next((faults.replies.get(r) for r in envelope.rcpt_tos), None)
        if script == DROP_AFTER_DATA or (
            faults.drop_stage == "data" and faults.p_drop and self.server._chance(faults.p_drop)
        ):
            self._hang_up(smtp)
        session.clara_messages = getattr(session, "clara_messages", 0) + 1  # type: ignore[attr-defined]
        self.server._record(envelope, getattr(session, "clara_number", 0))
        if script == SLOW_AFTER_DATA or (faults.p_slow and self.server._chance(faults.p_slow)):
            # A real server that is slow to answer has usually accepted the message.
            await asyncio.sleep(faults.slow_seconds)
        return "250 2.0.0 OK queued"

    async def _close_with(self, smtp: SMTP, reply: str) -> None:
        await smtp.push(reply)
        self._hang_up(smtp)

    def _hang_up(self, smtp: SMTP) -> None:
        if smtp.transport is not None:
            smtp.transport.close()
        # CancelledError is how aiosmtpd's own loop ends a session quietly.
        raise asyncio.CancelledError


class _Authenticator:
    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user.encode(), password.encode()

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == self.user
            and data.password == self.password
        )
        return AuthResult(success=ok, handled=False)


class _Controller(Controller):
    """aiosmtpd's Controller; port 0 means a free port, read back after binding."""

    def __init__(self, recorder: RecordingSMTPServer, port: int, **kwargs: Any) -> None:
        super().__init__(_Handler(recorder), hostname="127.0.0.1", port=port, **kwargs)

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]


class RecordingSMTPServer:
    """An aiosmtpd server on 127.0.0.1 that records what it accepts (thread-safe)."""

    def __init__(
        self,
        *,
        faults: Faults | None = None,
        smtputf8: bool = True,
        starttls: tuple[str, str] | None = None,  # (cert file, key file)
        implicit_tls: tuple[str, str] | None = None,
        auth: tuple[str, str] | None = None,  # (user, password); needs TLS
        pipelining: bool = False,
        port: int = 0,
        on_message: Callable[[ReceivedMessage], None] | None = None,
    ) -> None:
        if auth and not (starttls or implicit_tls):
            raise ValueError("auth needs starttls or implicit_tls (AUTH is only offered over TLS)")
        self.faults = faults or Faults()
        self.pipelining = pipelining
        self.on_message = on_message
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._connections = 0
        self._attempted: set[str] = set()
        self._random = random.Random(self.faults.seed)
        kwargs: dict[str, Any] = {
            "enable_SMTPUTF8": smtputf8,
            "server_hostname": "mx.test.example",
            "ident": "clara test SMTP",
        }
        if starttls:
            kwargs["tls_context"] = _server_context(*starttls)
            kwargs["require_starttls"] = True
        if implicit_tls:
            kwargs["ssl_context"] = _server_context(*implicit_tls)
        if auth:
            kwargs["authenticator"] = _Authenticator(*auth)
            kwargs["auth_required"] = True
        self._controller = _Controller(self, port, **kwargs)
        self.port = 0

    # -- lifecycle
    def start(self) -> RecordingSMTPServer:
        self._controller.start()
        self.port = self._controller.port
        with self._lock:  # the controller's own start-up probe is not a client
            self._connections = 0
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> RecordingSMTPServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @classmethod
    def fixture(cls, **kwargs: Any) -> Iterator[RecordingSMTPServer]:
        """``yield from RecordingSMTPServer.fixture(...)`` inside a pytest fixture."""
        with cls(**kwargs) as server:
            yield server

    # -- what happened
    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        """Sessions that said EHLO/HELO (the start-up probe is not counted)."""
        with self._lock:
            return self._connections

    @property
    def transactions(self) -> int:
        return len(self.messages)

    def url(self, scheme: str = "smtp", query: str = "tls=none", user: str = "") -> str:
        at = f"{user}@" if user else ""
        return f"{scheme}://{at}127.0.0.1:{self.port}" + (f"?{query}" if query else "")

    # -- called from the server thread
    def _new_connection(self) -> int:
        with self._lock:
            self._connections += 1
            return self._connections

    def _chance(self, probability: float) -> bool:
        with self._lock:
            return self._random.random() < probability

    def _first_attempt(self, address: str) -> bool:
        with self._lock:
            first = address not in self._attempted
            self._attempted.add(address)
            return first

    def _record(self, envelope: Envelope, connection: int) -> None:
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            recipients=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            mail_options=list(envelope.mail_options),
            connection=connection,
            received_at=time.time(),
        )
        with self._lock:
            self._messages.append(message)
            if self.on_message is not None:
                self.on_message(message)


def _server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context


def _json_line(message: ReceivedMessage) -> str:
    return json.dumps(
        {
            "mail_from": message.mail_from,
            "recipients": message.recipients,
            "message_id": message.message_id,
            "sha256": hashlib.sha256(message.data).hexdigest(),
            "connection": message.connection,
            "received_at": message.received_at,
        },
        ensure_ascii=False,
    )


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.smtp_server",
        description="A recording SMTP server on 127.0.0.1 with fault injection. "
        "Example: python -m tests.smtp_server --port 2525 --record accepted.jsonl "
        "--faults '{\"greylist\": true}'",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--record", type=Path, required=True, help="append JSON lines here")
    parser.add_argument("--faults", default="{}", help="JSON object of Faults fields")
    parser.add_argument("--no-smtputf8", action="store_true")
    args = parser.parse_args(argv)
    faults = Faults.from_json(args.faults)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with args.record.open("a", encoding="utf-8") as record:

        def write(message: ReceivedMessage) -> None:
            record.write(_json_line(message) + "\n")
            record.flush()

        server = RecordingSMTPServer(
            faults=faults, smtputf8=not args.no_smtputf8, port=args.port, on_message=write
        )
        with server:
            print(f"listening on 127.0.0.1:{server.port}", file=out, flush=True)
            while not stop.wait(0.2):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
