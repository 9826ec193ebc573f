"""The pipelining session's reply reader: however the server's bytes are split into
packets, the same replies come out, in order (whole one-line replies take a shorter way
through ``data_received`` than the rest)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from aiosmtplib import SMTPResponseException

from clara_mailer.transport.smtp import _ReplyReader

STREAMS = [
    b"250 2.0.0 Ok: queued as 4Xk\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n",
    b"250-first\r\n250-  second  \r\n250 last\r\n550 5.1.1 no\r\n",
    b"250 \xc3\xa9t\xc3\xa9 \xff\r\n421 4.3.2 bye \t \r\n",
    b"250\r\n251 x\n354 \r\n",
    b"250-a\r\n250-\r\n250 b\r\n",
]


class _Transport(asyncio.Transport):
    def is_closing(self) -> bool:
        return False


def _replies(chunks: list[bytes]) -> list[Any]:
    reader = _ReplyReader(_Transport())
    out: list[Any] = []
    for chunk in chunks:
        reader.data_received(chunk)
    while (reply := reader.reply_nowait()) is not None:
        out.append(reply)
    return out


@pytest.mark.parametrize("stream", STREAMS)
def test_the_same_replies_however_the_packets_fall(stream: bytes) -> None:
    one_by_one = _replies([stream[i : i + 1] for i in range(len(stream))])
    assert _replies([stream]) == one_by_one
    rng = random.Random(len(stream))
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 4)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert _replies(chunks) == one_by_one


def test_what_whole_packets_give() -> None:
    assert _replies([STREAMS[0]]) == [
        (250, "2.0.0 Ok: queued as 4Xk"),
        (250, "2.1.0 Ok"),
        (250, "2.1.5 Ok"),
        (354, "End data"),
    ]
    assert _replies([STREAMS[1]]) == [(250, "first\nsecond\nlast"), (550, "5.1.1 no")]


def test_a_malformed_line_in_a_whole_packet_fails_the_session() -> None:
    reader = _ReplyReader(_Transport())
    reader.data_received(b"250 Ok\r\nxyz nonsense\r\n")
    assert reader.reply_nowait() == (250, "Ok")
    with pytest.raises(SMTPResponseException):
        asyncio.run(reader.reply(1.0))
