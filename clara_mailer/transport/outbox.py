"""Transports that never touch the network: an outbox folder of .eml files (dry runs,
review) and memory (tests, benchmarks, scripted replies). Both check the envelope the
way the SMTP transport does, so a message they accept would be accepted by a relay.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from clara_mailer.core.errors import TransportError
from clara_mailer.core.vocabulary import Outcome
from clara_mailer.transport.base import (
    BeforeEndOfData,
    Connection,
    Message,
    SendResult,
    classify,
    prepare_envelope,
)

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._+-]+")
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


def message_id_of(message: bytes) -> str | None:
    """The Message-ID header of ``message`` (header section only), or None."""
    head = message.split(b"\r\n\r\n", 1)[0]
    found = _MESSAGE_ID.search(head)
    return found.group(1).strip().decode("ascii", "replace") if found else None


def outbox_filename(recipient: str, message_id: str | None = None) -> str:
    """A safe file name for a message: the recipient (its hash keeps look-alike addresses
    apart) and a short hash of the Message-ID, so that two messages to one address (test
    samples) are two files, while a resend (same Message-ID) replaces its file."""
    safe = _UNSAFE_FILENAME.sub("_", recipient.replace("@", "_at_"))[:80].strip("._") or "x"
    digest = hashlib.sha256(recipient.encode("utf-8")).hexdigest()[:10]
    if not message_id:
        return f"{safe}-{digest}.eml"
    mid = hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:8]
    return f"{safe}-{digest}-{mid}.eml"


class OutboxConnection(Connection):
    smtputf8 = True
    eightbitmime = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(
        self,
        envelope_from: str,
        recipient: str,
        message: Message,
        before_end_of_data: BeforeEndOfData | None = None,
    ) -> SendResult:
        envelope = prepare_envelope(envelope_from, recipient, message, self.smtputf8)
        if isinstance(envelope, SendResult):
            return envelope
        # One file per message: a resend of the same delivery (same Message-ID) replaces
        # its file. Write-then-rename so a reader never sees half a message (no fsync: a dry run
        # does not need to survive a power cut, and fsync would cost milliseconds).
        data = bytes(message)  # a CheckedMessage joined; plain bytes as they are
        target = self.directory / outbox_filename(recipient, message_id_of(data))
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            temporary.write_bytes(data)
            if before_end_of_data is not None:
                before_end_of_data()  # the rename is this transport's end of DATA
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


class MemoryConnection(Connection):
    def __init__(self, transport: MemoryTransport) -> None:
        self._transport = transport
        self.smtputf8 = transport.smtputf8
        self.eightbitmime = transport.eightbitmime

    async def send(
        self,
        envelope_from: str,
        recipient: str,
        message: Message,
        before_end_of_data: BeforeEndOfData | None = None,
    ) -> SendResult:
        envelope = prepare_envelope(envelope_from, recipient, message, self.smtputf8)
        if isinstance(envelope, SendResult):
            return envelope
        if before_end_of_data is not None:
            try:
                before_end_of_data()
            except OSError as exc:
                return SendResult(Outcome.DEFERRED, 0, f"not sent: {exc}", connection_broken=True)
        scripted = self._transport.replies.get(recipient)
        if isinstance(scripted, SendResult):
            result = scripted
        elif scripted is not None:
            result = classify(*scripted)
        else:
            result = SendResult(Outcome.SENT, 250, "2.0.0 OK (kept in memory)")
        if result.outcome in (Outcome.SENT, Outcome.UNKNOWN):
            self._transport.sent.append((envelope_from, recipient, bytes(message)))
        return result

    async def close(self) -> None:
        return None
