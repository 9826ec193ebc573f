"""``MessageChecker``: a message made of parts keeps them (not joined) with its DATA
payload, made part by part, when its line ends are all CRLF; whatever the parts, what
goes out is what the wire's own checks and dot-stuffing make of the plain bytes, and
the envelope's choices (SMTPUTF8, 8BITMIME) are those the plain bytes would get."""

from __future__ import annotations

import random

import pytest

from clara_mailer.transport.base import (
    CheckedMessage,
    Envelope,
    Message,
    MessageChecker,
    SendResult,
    bad_line_endings,
    dot_stuff,
    is_ascii,
    prepare_envelope,
)

LONG = b"".join(b"line %d of a shared part\r\n" % i for i in range(100))  # cached


def _wire_view(message: Message) -> tuple[object, ...]:
    """What the wire makes of a message: its payload, the verdict on its line ends, and
    the envelope a server with SMTPUTF8 and one without would get."""
    envelopes: list[Envelope | SendResult] = [
        prepare_envelope("sender@clara.example", "r@x.example", message, utf8)
        for utf8 in (True, False)
    ]
    return dot_stuff(message), bad_line_endings(message), is_ascii(message), envelopes


def _as_plain(message: Message) -> tuple[object, ...]:
    return _wire_view(bytes(message))  # plain bytes: every scan runs on them


@pytest.mark.parametrize(
    ("parts", "checked"),
    [
        ([b"Subject: x\r\n\r\n", LONG, b"end\r\n"], True),
        ([b"Subject: x\r\n\r\n", LONG, b".end\r\n"], True),  # a line starts with "."
        ([b".Subject: x\r\n\r\n", LONG], True),  # the message does
        ([b"", b".x\r\n"], True),  # after an empty part too
        ([b"Subject: x\r\n\r\nbody\r\n.dot\r\n"], True),
        ([b"Subject: x\r\n\r\n", LONG.replace(b"line 7", b".line 7")], True),
        ([b"Subject: x\r\n\r\n", b"bare\nLF\r\n"], False),
        ([b"Subject: x\r\n\r\n", b"bare\rCR\r\n"], False),
        ([b"Subject: x\r\n\r\n", b"split\r", b"\nCRLF\r\n"], False),
        ([b"Subject: x\r\n\r\n", LONG, b"no final line end"], False),
        ([b"Subject: x\r\n\r\n", b"a part that ends mid-line. ", b".not a line start\r\n"], True),
        ([], False),
    ],
)
def test_checked_only_when_every_line_end_is_crlf(parts: list[bytes], checked: bool) -> None:
    checker = MessageChecker()
    for _ in range(2):  # the second time from the kept verdicts
        joined = checker.join(parts)
        assert bytes(joined) == b"".join(parts)
        assert isinstance(joined, CheckedMessage) is checked
        assert _wire_view(joined) == _as_plain(joined)


def random_parts(
    rng: random.Random,
    pieces: list[bytes],
    shared: list[bytes],
    share: float,
    most: int,
    fewest: int,
) -> list[bytes]:
    """``fewest`` to 5 parts, each one of ``shared`` (with chance ``share``) or up to
    ``most`` random ``pieces``: the renderer's shared parts among a message's own."""
    return [
        rng.choice(shared)
        if rng.random() < share
        else b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, most)))
        for _ in range(rng.randrange(fewest, 6))
    ]


def test_random_parts_go_out_as_their_bytes() -> None:
    """Random parts of text, dots, CRs and LFs, large shared ones among them (seeded):
    the payload and the verdict on line ends are always those of the plain bytes."""
    pieces = [b"w", b".", b"\r\n", b"\r\n.", b"\r", b"\n", b" ", b"\r\n\r\n", "é".encode()]
    rng = random.Random(5321)
    shared = [LONG, LONG.replace(b"line 7", b".line 7"), LONG + b"\r\n." * 3]
    checker = MessageChecker()
    seen = {True: 0, False: 0}
    head_utf8 = {True: 0, False: 0}  # checked messages with 7-bit headers, and without
    for _ in range(400):
        parts = random_parts(rng, pieces, shared, 0.3, 12, 1)
        joined = checker.join(parts)
        assert bytes(joined) == b"".join(parts)
        assert _wire_view(joined) == _as_plain(joined), parts
        seen[isinstance(joined, CheckedMessage)] += 1
        if isinstance(joined, CheckedMessage):
            head_utf8[joined.headers_ascii] += 1
    assert seen[True] and seen[False], seen  # both ways were taken
    assert head_utf8[True] and head_utf8[False], head_utf8


def test_a_rendered_message_is_checked() -> None:
    """The renderer's messages take the fast way, those with a line that starts with "."
    too (quoted-printable wraps before a full stop in some), and go out byte for byte as
    before."""
    from tests.test_render import CAMPAIGNS, person, renderer

    checker = MessageChecker()
    stuffed = False
    for slug in CAMPAIGNS:
        for language in ("es", "en"):
            head, body = renderer(slug).render_parts(person(language=language))
            joined = checker.join([head, *body])
            assert isinstance(joined, CheckedMessage), (slug, language)
            assert _wire_view(joined) == _as_plain(joined)
            stuffed = stuffed or b"\r\n.." in dot_stuff(joined)
    assert stuffed, "no rendered line starts with a dot: the case above is not met"


def test_a_checked_message_holds_its_shared_parts_not_a_copy() -> None:
    """A message waiting in the sender's queue costs its own bytes: the shared part and
    its payload piece are the very objects every message of the variant holds."""
    checker = MessageChecker()
    first, second = (
        checker.join([b"To: %d@x.example\r\n\r\n" % i, LONG, b"bye %d\r\n" % i]) for i in (1, 2)
    )
    assert isinstance(first, CheckedMessage) and isinstance(second, CheckedMessage)
    assert first.parts[1] is LONG and second.parts[1] is LONG
    assert first.wire[1] is second.wire[1]  # stuffed once, shared
    assert bytes(first) == b"".join(first.parts)
