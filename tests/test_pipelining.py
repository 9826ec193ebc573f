"""RFC 2920 pipelining in the SMTP transport: every reply order and failure the
unpipelined path handles, pipelined.

Two servers: the fault-injecting aiosmtpd server of tests/smtp_server.py with PIPELINING
offered (and without, for the unpipelined path), and a scripted server below that answers
each command as a test says (a reply, or a hang-up without one), joins or splits its
replies as a test says, and notes which commands arrived in one read, so a test can see
that MAIL, RCPT and DATA really went out together.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from clara_mailer.core.vocabulary import Outcome
from clara_mailer.transport import SendResult, SMTPTransport, dot_stuff
from clara_mailer.transport.smtp import SMTPConnection
from tests.smtp_server import DROP_AFTER_DATA, DROP_AFTER_RCPT, Faults, RecordingSMTPServer

SENDER = "bounces@clara.example"
HANG_UP = "hang-up"  # close the connection instead of answering
SILENT = "silent"  # answer nothing more, until the client goes
CLOSE = " (and close)"  # after a reply: close the connection once it is written


def message(n: int = 1, body: bytes = b"Hola Anna,\r\n.a line with a dot\r\n") -> bytes:
    return (
        b"From: CLARA <news@clara.example>\r\nTo: anna@policia.example\r\n"
        b"Subject: CLARA results\r\nMessage-ID: <n%d@clara.example>\r\n\r\n" % n + body
    )


# --- the scripted server ----------------------------------------------------------------


@dataclass
class Scripted:
    """An SMTP server on 127.0.0.1 whose replies a test chooses.

    ``script`` maps a verb (``MAIL``, ``RCPT``, ``DATA``, ``END`` for the end of the
    message, ``RSET``) to a list of answers used one per command, in turn (then the
    default): a reply line (ending in ``CLOSE``: then hang up), ``HANG_UP`` or
    ``SILENT``. ``joined``: replies to commands that arrived
    in one read go out in one write; ``split``: every reply goes out a byte at a time;
    ``hang_up_in_data``: hang up once a message's text has come, before its end.
    """

    pipelining: bool = True
    script: dict[str, list[str]] = field(default_factory=dict)
    joined: bool = True
    split: bool = False
    hang_up_in_data: bool = False
    reads: list[list[str]] = field(default_factory=list)  # the verbs of each read
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    port: int = 0

    DEFAULT: ClassVar[dict[str, str]] = {
        "MAIL": "250 2.1.0 OK",
        "RCPT": "250 2.1.5 OK",
        "DATA": "354 go ahead",
        "END": "250 2.0.0 queued",
        "RSET": "250 2.0.0 reset",
        "NOOP": "250 OK",
        "QUIT": "221 bye",
    }

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    def transport(self, **kwargs: float) -> SMTPTransport:
        return SMTPTransport.from_url(f"smtp://127.0.0.1:{self.port}?tls=none", **kwargs)  # type: ignore[arg-type]

    def _answer(self, verb: str) -> str:
        queue = self.script.get(verb)
        return queue.pop(0) if queue else self.DEFAULT.get(verb, "500 5.5.1 unknown")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        out: list[bytes] = []

        async def flush() -> None:
            data = b"".join(out)
            out.clear()
            if self.split:
                for i in range(len(data)):
                    writer.write(data[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(data)
                await writer.drain()

        async def reply(line: str) -> bool:
            """Queue a reply (False: hang up instead)."""
            if line == HANG_UP:
                await flush()
                writer.close()
                return False
            if line == SILENT:
                await flush()
                await reader.read()  # until the client gives up and closes
                return False
            if line.endswith(CLOSE):
                out.append(line.removesuffix(CLOSE).encode() + b"\r\n")
                await flush()
                writer.close()
                return False
            out.append(line.encode() + b"\r\n")
            if not self.joined:
                await flush()
            return True

        try:
            out.append(b"220 scripted ESMTP\r\n")
            await flush()
            buffer = b""
            in_data = False
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
                verbs: list[str] = []
                while True:
                    if in_data:
                        end = buffer.find(b"\r\n.\r\n")
                        if end == -1 and buffer.startswith(b".\r\n"):
                            end, skip = 0, 3
                        else:
                            skip = end + 5
                        if end == -1:
                            if self.hang_up_in_data and buffer:
                                return
                            break
                        self.messages.append(buffer[:end])
                        buffer, in_data = buffer[skip:], False
                        verbs.append("END")
                        if not await reply(self._answer("END")):
                            return
                        continue
                    line, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    buffer = rest
                    verb = line.split(b" ")[0].upper().decode()
                    verbs.append(verb)
                    if verb == "EHLO":
                        caps = ["250-scripted", "250-8BITMIME"]
                        caps += ["250-PIPELINING"] if self.pipelining else []
                        out.append(("\r\n".join([*caps, "250 SMTPUTF8"]) + "\r\n").encode())
                        continue
                    answer = self._answer(verb)
                    if not await reply(answer):
                        return
                    if verb == "DATA" and answer.startswith("354"):
                        in_data = True
                    if verb == "QUIT":
                        await flush()
                        writer.close()
                        return
                self.reads.append(verbs)
                await flush()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


def run(
    server: Scripted,
    recipients: list[str],
    check: Callable[[SMTPConnection], Awaitable[None]] | None = None,
    *,
    chained: bool = False,
    **kwargs: float,
) -> list[SendResult]:
    """Send one message to each recipient on one connection, with ``send`` or (chained)
    with ``send_chained``, and return the outcomes in the recipients' order."""

    async def go() -> list[SendResult]:
        async with server:
            connection = await server.transport(**kwargs).connect()
            try:
                if check is not None:
                    await check(connection)
                if not chained:
                    return [
                        await connection.send(SENDER, rcpt, message(i))
                        for i, rcpt in enumerate(recipients)
                    ]
                return await send_chained(connection, recipients)
            finally:
                await connection.close()

    return asyncio.run(go())


async def send_chained(
    connection: SMTPConnection, recipients: list[str], *, close: bool = True
) -> list[SendResult]:
    """Every message through ``send_chained``, then ``close`` (or ``settle``), which
    settles the last: each outcome must be settled exactly once."""
    settled: dict[int, SendResult] = {}

    def settle(i: int, result: SendResult) -> None:
        assert i not in settled, f"message {i} settled twice"
        settled[i] = result

    for i, rcpt in enumerate(recipients):
        await connection.send_chained(SENDER, rcpt, message(i), functools.partial(settle, i))
    await (connection.close() if close else connection.settle())
    return [settled[i] for i in range(len(recipients))]


# --- the scripted server: reply orders and failures --------------------------------------


@pytest.mark.parametrize("joined", [True, False])
@pytest.mark.parametrize("split", [False, True])
def test_pipelined_messages_arrive_in_one_write_per_envelope(joined: bool, split: bool) -> None:
    server = Scripted(joined=joined, split=split)

    async def is_pipelined(connection: SMTPConnection) -> None:
        assert connection.pipelining

    results = run(server, ["a@x.example", "b@x.example"], is_pipelined)
    assert [r.outcome for r in results] == [Outcome.SENT] * 2
    assert results[0] == SendResult(Outcome.SENT, 250, "2.0.0 queued")
    # MAIL, RCPT and DATA came in one read, the message and its end in another.
    assert ["MAIL", "RCPT", "DATA"] in server.reads
    # As it went over the wire: dot-stuffed, up to the end of data.
    assert server.messages == [dot_stuff(message(i))[:-5] for i in range(2)]
    assert server.messages[0].endswith(b"\r\n..a line with a dot")
    assert server.connections == 1


@pytest.mark.parametrize(
    ("verb", "reply", "outcome"),
    [
        ("MAIL", "451 4.3.0 try later", Outcome.DEFERRED),
        ("MAIL", "553 5.7.1 sender refused", Outcome.FAILED),
        ("RCPT", "450 4.2.0 mailbox busy", Outcome.DEFERRED),
        ("RCPT", "550 5.1.1 no such user", Outcome.FAILED),
        ("DATA", "451 4.3.0 no DATA now", Outcome.DEFERRED),
        ("DATA", "554 5.5.1 no valid recipients", Outcome.FAILED),
    ],
)
@pytest.mark.parametrize("joined", [True, False])
@pytest.mark.parametrize("chained", [False, True])
def test_refusal_at_each_command_then_rset_and_the_session_goes_on(
    verb: str, reply: str, outcome: Outcome, joined: bool, chained: bool
) -> None:
    # What follows a refused command in the same pipeline is refused too, as real
    # servers do (503 bad sequence, 554 no valid recipients).
    script = {verb: [reply]}
    if verb == "MAIL":
        script |= {"RCPT": ["503 5.5.1 need MAIL"], "DATA": ["503 5.5.1 need RCPT"]}
    elif verb == "RCPT":
        script |= {"DATA": ["554 5.5.1 no valid recipients"]}
    server = Scripted(script=script, joined=joined)
    first, second = run(server, ["a@x.example", "b@x.example"], chained=chained)
    code, text = reply.split(" ", 1)
    assert first == SendResult(outcome, int(code), text)
    assert second.outcome is Outcome.SENT
    assert server.connections == 1  # RSET kept the session usable
    assert len(server.messages) == 1
    assert any("RSET" in verbs for verbs in server.reads)


def test_refused_recipient_but_data_accepted_ends_the_empty_message() -> None:
    # RFC 2920 3.1: a server must refuse DATA without a valid recipient; if it says 354
    # anyway, the client ends the message at once and reports the refusal.
    server = Scripted(script={"RCPT": ["550 5.1.1 no such user"], "END": ["554 5.5.1 empty"]})
    first, second = run(server, ["a@x.example", "b@x.example"])
    assert first == SendResult(Outcome.FAILED, 550, "5.1.1 no such user")
    assert second.outcome is Outcome.SENT
    assert server.messages[0] == b""  # only the lone dot went out for the first


@pytest.mark.parametrize("chained", [False, True])
def test_refusal_at_the_end_of_data(chained: bool) -> None:
    server = Scripted(script={"END": ["552 5.3.4 message too big", "451 4.3.0 try later"]})
    first, second, third = run(
        server, ["a@x.example", "b@x.example", "c@x.example"], chained=chained
    )
    assert first == SendResult(Outcome.FAILED, 552, "5.3.4 message too big")
    assert second == SendResult(Outcome.DEFERRED, 451, "4.3.0 try later")
    assert third.outcome is Outcome.SENT
    assert server.connections == 1


@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DATA", "END"])
@pytest.mark.parametrize("joined", [True, False])
@pytest.mark.parametrize("chained", [False, True])
def test_421_mid_pipeline_defers_breaks_and_reconnects(
    verb: str, joined: bool, chained: bool
) -> None:
    # The server says 421 and closes: the replies after it never come.
    server = Scripted(script={verb: ["421 4.3.2 shutting down" + CLOSE]}, joined=joined)
    first, second = run(server, ["a@x.example", "b@x.example"], chained=chained)
    assert first == SendResult(Outcome.DEFERRED, 421, "4.3.2 shutting down", connection_broken=True)
    if chained and verb == "END":
        # The next envelope went out with the end of DATA: the 421 ends its session too.
        assert second == first
    else:
        assert second.outcome is Outcome.SENT
        assert server.connections == 2


@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DATA"])
@pytest.mark.parametrize("chained", [False, True])
def test_dropped_connection_after_each_envelope_command_is_deferred(
    verb: str, chained: bool
) -> None:
    server = Scripted(script={verb: [HANG_UP]})
    first, second = run(server, ["a@x.example", "b@x.example"], chained=chained)
    assert first.outcome is Outcome.DEFERRED and first.code == 0
    assert first.connection_broken and "before the message was sent" in first.reply
    assert second.outcome is Outcome.SENT  # a new connection, by itself
    assert server.connections == 2


def test_dropped_connection_after_the_end_of_data_is_unknown() -> None:
    server = Scripted(script={"END": [HANG_UP]})
    first, second = run(server, ["a@x.example", "b@x.example"])
    assert first.outcome is Outcome.UNKNOWN and first.connection_broken
    assert "may have accepted" in first.reply
    assert second.outcome is Outcome.SENT


@pytest.mark.parametrize("chained", [False, True])
def test_dropped_connection_at_rset_after_a_refusal(chained: bool) -> None:
    server = Scripted(script={"RCPT": ["550 5.1.1 no such user"], "RSET": [HANG_UP]})
    first, second = run(server, ["a@x.example", "b@x.example"], chained=chained)
    assert first == SendResult(Outcome.FAILED, 550, "5.1.1 no such user", connection_broken=True)
    assert second.outcome is Outcome.SENT
    assert server.connections == 2


@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DATA", "END"])
def test_silence_is_a_timeout_and_a_broken_connection(verb: str) -> None:
    server = Scripted(script={verb: [SILENT]})
    [result] = run(server, ["a@x.example"], timeout=0.5, data_timeout=0.5)
    assert result.connection_broken and "Timed out" in result.reply
    # Silence after the end of data: the server may have the message.
    assert result.outcome is (Outcome.UNKNOWN if verb == "END" else Outcome.DEFERRED)


@pytest.mark.parametrize("chained", [False, True])
def test_malformed_reply_breaks_the_connection(chained: bool) -> None:
    server = Scripted(script={"RCPT": ["2x0 what"]})
    [result] = run(server, ["a@x.example"], chained=chained)
    assert result.outcome is Outcome.DEFERRED and result.connection_broken


def test_multiline_replies_are_one_reply() -> None:
    server = Scripted(script={"RCPT": ["250-first line\r\n250-second\r\n250 2.1.5 OK"]})
    [result] = run(server, ["a@x.example"])
    assert result.outcome is Outcome.SENT


def test_control_characters_in_an_address_go_nowhere() -> None:
    server = Scripted()

    async def go() -> SendResult:
        async with server:
            connection = await server.transport().connect()
            try:
                return await connection.send("a\x01b@x.example", "b@x.example", message())
            finally:
                await connection.close()

    result = asyncio.run(go())
    assert result.outcome is Outcome.FAILED
    assert not any("MAIL" in verbs for verbs in server.reads)


@pytest.mark.parametrize("chained", [False, True])
def test_without_pipelining_commands_go_one_by_one(chained: bool) -> None:
    server = Scripted(pipelining=False, script={"RCPT": ["550 5.1.1 no such user"]})

    async def not_pipelined(connection: SMTPConnection) -> None:
        assert not connection.pipelining

    first, second = run(server, ["a@x.example", "b@x.example"], not_pipelined, chained=chained)
    assert first == SendResult(Outcome.FAILED, 550, "5.1.1 no such user")
    assert second.outcome is Outcome.SENT
    assert all(
        len([v for v in verbs if v in ("MAIL", "RCPT", "DATA")]) <= 1 for verbs in server.reads
    )


def test_the_end_of_data_is_held_back_until_the_callback() -> None:
    server = Scripted()
    seen: list[int] = []

    async def go() -> tuple[SendResult, SendResult]:
        async with server:
            connection = await server.transport().connect()
            try:
                ok = await connection.send(
                    SENDER, "a@x.example", message(), lambda: seen.append(len(server.messages))
                )

                def refuse() -> None:
                    raise OSError("journal full")

                refused = await connection.send(SENDER, "b@x.example", message(2), refuse)
                return ok, refused
            finally:
                await connection.close()

    ok, refused = asyncio.run(go())
    assert ok.outcome is Outcome.SENT and seen == [0]
    assert refused.outcome is Outcome.DEFERRED and refused.connection_broken
    assert len(server.messages) == 1


# --- chained: an end of DATA and the next envelope in one write ---------------------------


@pytest.mark.parametrize("joined", [True, False])
@pytest.mark.parametrize("split", [False, True])
def test_chained_end_of_data_goes_out_with_the_next_envelope(joined: bool, split: bool) -> None:
    server = Scripted(joined=joined, split=split)
    results = run(server, [f"r{i}@x.example" for i in range(3)], chained=True)
    assert results == [SendResult(Outcome.SENT, 250, "2.0.0 queued")] * 3
    # Each end of DATA but the last came in one read with the next MAIL, RCPT and DATA.
    assert server.reads.count(["END", "MAIL", "RCPT", "DATA"]) == 2
    assert server.messages == [dot_stuff(message(i))[:-5] for i in range(3)]
    assert server.connections == 1


def test_chained_hang_up_after_the_end_of_data() -> None:
    server = Scripted(script={"END": [HANG_UP]})
    first, second, third = run(server, ["a@x.example", "b@x.example", "c@x.example"], chained=True)
    # The server may have kept the first; the second's envelope got no reply: not sent.
    assert first.outcome is Outcome.UNKNOWN and "may have accepted" in first.reply
    assert second.outcome is Outcome.DEFERRED and second.code == 0 and second.connection_broken
    assert third.outcome is Outcome.SENT  # a new session, by itself
    assert server.connections == 2


def test_chained_silence_after_the_end_of_data() -> None:
    server = Scripted(script={"END": [SILENT]})
    first, second = run(
        server, ["a@x.example", "b@x.example"], chained=True, timeout=0.5, data_timeout=0.5
    )
    assert first.outcome is Outcome.UNKNOWN and "Timed out" in first.reply
    assert second.outcome is Outcome.DEFERRED and second.connection_broken


def test_chained_reply_that_came_before_a_hang_up_counts() -> None:
    # The second envelope's MAIL is answered by a hang-up; the first message's 250 came
    # before it, in the same read: the first is sent, the second is not.
    server = Scripted(script={"MAIL": ["250 2.1.0 OK", HANG_UP]})
    first, second, third = run(server, ["a@x.example", "b@x.example", "c@x.example"], chained=True)
    assert first == SendResult(Outcome.SENT, 250, "2.0.0 queued")
    assert second.outcome is Outcome.DEFERRED and second.connection_broken
    assert "before the message was sent" in second.reply
    assert third.outcome is Outcome.SENT
    assert len(server.messages) == 2


def test_chained_end_never_written_is_not_delivered() -> None:
    # The server hangs up once the text has come: the message's final ".<CRLF>" (owed, to
    # go out with the next envelope) cannot be written, so it cannot have been accepted.
    server = Scripted(hang_up_in_data=True)

    async def go() -> list[SendResult]:
        async with server:
            connection = await server.transport().connect()
            results: list[SendResult] = []
            await connection.send_chained(SENDER, "a@x.example", message(), results.append)
            await asyncio.sleep(0.2)  # the hang-up arrives
            await connection.settle()
            await connection.close()
            return results

    [result] = asyncio.run(go())
    assert result.outcome is Outcome.DEFERRED and result.connection_broken
    assert "before the end of the message was sent" in result.reply
    assert server.messages == []


def test_chained_settle_reads_the_last_reply_and_close_settles_it_too() -> None:
    server = Scripted(script={"END": ["250 2.0.0 first", "550 5.7.1 second refused"]})

    async def go() -> tuple[list[SendResult], list[SendResult]]:
        async with server:
            connection = await server.transport().connect()
            early: list[SendResult] = []
            await connection.send_chained(SENDER, "a@x.example", message(1), early.append)
            assert early == []  # its reply is still owed
            await connection.settle()
            late: list[SendResult] = []
            await connection.send_chained(SENDER, "b@x.example", message(2), late.append)
            await connection.close()
            return early, late

    early, late = asyncio.run(go())
    assert early == [SendResult(Outcome.SENT, 250, "2.0.0 first")]
    assert late == [SendResult(Outcome.FAILED, 550, "5.7.1 second refused")]
    assert server.reads[-1] == ["END"]  # close wrote the owed end alone, read its reply


def test_chained_the_end_is_held_back_until_the_callback() -> None:
    server = Scripted()
    seen: list[int] = []

    def refuse() -> None:
        raise OSError("journal full")

    async def go() -> list[SendResult]:
        async with server:
            connection = await server.transport().connect()
            results: list[SendResult] = []
            ok = functools.partial(seen.append, 0)
            await connection.send_chained(SENDER, "a@x.example", message(1), results.append, ok)
            await connection.send_chained(SENDER, "b@x.example", message(2), results.append, refuse)
            await connection.close()
            return results

    ok, refused = asyncio.run(go())
    assert ok.outcome is Outcome.SENT and seen == [0]
    assert refused.outcome is Outcome.DEFERRED and refused.connection_broken
    assert server.messages == [dot_stuff(message(1))[:-5]]


# --- the aiosmtpd server with PIPELINING offered ------------------------------------------


def send_all(
    server: RecordingSMTPServer, recipients: list[str], *, chained: bool = False
) -> list[SendResult]:
    async def go() -> list[SendResult]:
        connection = await SMTPTransport.from_url(server.url()).connect()
        try:
            assert connection.pipelining is server.pipelining
            if chained:
                return await send_chained(connection, recipients, close=False)
            return [await connection.send(SENDER, r, message(i)) for i, r in enumerate(recipients)]
        finally:
            await connection.close()

    return asyncio.run(go())


@pytest.mark.parametrize(("pipelining", "chained"), [(True, False), (False, False), (True, True)])
def test_aiosmtpd_faults_come_out_the_same_pipelined_or_not(
    pipelining: bool, chained: bool
) -> None:
    faults = Faults(
        replies={
            "bad@x.example": (550, "5.1.1 no such user"),
            "full@x.example": (452, "4.2.2 mailbox full"),
            "drop@x.example": DROP_AFTER_RCPT,
            "lost@x.example": DROP_AFTER_DATA,
        },
        greylist=False,
    )
    recipients = ["a@x.example", "bad@x.example", "full@x.example", "drop@x.example"]
    recipients += ["b@x.example", "lost@x.example", "c@x.example"]
    with RecordingSMTPServer(faults=faults, pipelining=pipelining) as server:
        results = send_all(server, recipients, chained=chained)
        # Chained, the last one's envelope went out with the end of DATA the server hung
        # up on: it was not sent (a retry sends it), where unchained it went on a new
        # session.
        last = Outcome.DEFERRED if chained else Outcome.SENT
        assert [r.outcome for r in results] == [
            Outcome.SENT,
            Outcome.FAILED,
            Outcome.DEFERRED,
            Outcome.DEFERRED,
            Outcome.SENT,
            Outcome.UNKNOWN,
            last,
        ]
        assert results[1] == SendResult(Outcome.FAILED, 550, "5.1.1 no such user")
        assert results[3].connection_broken and results[5].connection_broken
        assert results[6].connection_broken is chained
        assert server.connections == (2 if chained else 3)
        received = {m.recipients[0]: m.data for m in server.messages}
        assert received["a@x.example"] == message(0)
        assert received["b@x.example"] == message(4)
        # (DROP_AFTER_DATA hangs up before the server keeps the message.)
        expected = ["a@x.example", "b@x.example"] + ([] if chained else ["c@x.example"])
        assert sorted(received) == expected


@pytest.mark.parametrize("pipelining", [True, False])
def test_aiosmtpd_421_at_mail_and_greylisting(pipelining: bool) -> None:
    with RecordingSMTPServer(faults=Faults(max_per_connection=2), pipelining=pipelining) as server:
        results = send_all(server, [f"r{i}@x.example" for i in range(4)])
        assert [r.outcome for r in results] == [
            Outcome.SENT,
            Outcome.SENT,
            Outcome.DEFERRED,
            Outcome.SENT,
        ]
        assert results[2].code == 421 and results[2].connection_broken
    with RecordingSMTPServer(faults=Faults(greylist=True), pipelining=pipelining) as server:
        first, second = send_all(server, ["grey@x.example"] * 2)
        assert first.code == 451 and not first.connection_broken
        assert second.outcome is Outcome.SENT


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
@pytest.mark.parametrize("chained", [False, True])
def test_pipelining_over_tls(
    mode: str, chained: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The reader takes over the TLS transport aiosmtplib set up (STARTTLS and AUTH too)."""
    import trustme

    ca = trustme.CA()
    folder = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    pair = (str(folder / "cert.pem"), str(folder / "key.pem"))
    tls = {"starttls": pair} if mode == "starttls" else {"implicit_tls": pair}
    faults = Faults(replies={"bad@x.example": (550, "5.1.1 no such user")})
    auth = ("clara", "pw-123") if mode == "starttls" else None  # AUTH after STARTTLS
    with RecordingSMTPServer(
        pipelining=True,
        auth=auth,
        faults=faults,
        **tls,  # type: ignore[arg-type]
    ) as server:
        scheme = "smtp" if mode == "starttls" else "smtps"
        query = f"ca_file={folder / 'ca.pem'}" + ("&tls=starttls" if mode == "starttls" else "")
        url = server.url(scheme=scheme, query=query, user="clara:pw-123" if auth else "")

        async def go() -> list[SendResult]:
            connection = await SMTPTransport.from_url(url).connect()
            recipients = ["a@x.example", "bad@x.example", "c@x.example"]
            try:
                assert connection.pipelining
                if chained:
                    return await send_chained(connection, recipients, close=False)
                return [
                    await connection.send(SENDER, r, message(i)) for i, r in enumerate(recipients)
                ]
            finally:
                await connection.close()

        results = asyncio.run(go())
        assert [r.outcome for r in results] == [Outcome.SENT, Outcome.FAILED, Outcome.SENT]
        assert [m.data for m in server.messages] == [message(0), message(2)]
        assert len({m.connection for m in server.messages}) == 1  # RSET kept the session


def test_chained_across_a_reconnect() -> None:
    """``reconnect_after``: the session ends (QUIT) after every two messages; the reply
    owed to the last one's end of DATA is read first, and nothing is lost or doubled."""
    server = Scripted()

    async def go() -> list[SendResult]:
        async with server:
            transport = SMTPTransport.from_url(
                f"smtp://127.0.0.1:{server.port}?tls=none", reconnect_after=2
            )
            connection = await transport.connect()
            return await send_chained(connection, [f"r{i}@x.example" for i in range(5)])

    results = asyncio.run(go())
    assert [r.outcome for r in results] == [Outcome.SENT] * 5
    assert server.messages == [dot_stuff(message(i))[:-5] for i in range(5)]
    assert server.connections == 3
