"""A variant's lines that hold a recipient's fields: the text around the fields is
quoted-printable once, each field's value per message, joined by soft line breaks. What
a reader decodes must be the lines with the values in place, and the encoding must stay
valid quoted-printable (RFC 2045: lines of at most 76 characters, CRLF line ends)."""

from __future__ import annotations

import binascii
import random

import pytest

from clara_mailer.compose.render import _SENTINELS, _Dynamic, _qp_open, _qp_value


def _decoded(encoded: bytes) -> str:
    return binascii.a2b_qp(encoded).decode("utf-8")


def _assert_valid(encoded: bytes) -> None:
    assert encoded.count(b"\n") == encoded.count(b"\r\n") == encoded.count(b"\r")
    for line in encoded.split(b"\r\n"):
        assert len(line) <= 76, line
        assert line.isascii()
        # Whitespace never ends an encoded line (a soft break's "=" comes after it).
        assert not line.endswith((b" ", b"\t")), line


AWKWARD = [
    "",
    "x",
    "x" * 75,
    "x" * 76,
    "x" * 77,
    "x" * 74 + "é",  # an escape across the 76th character
    "x" * 73 + "é",
    "x" * 75 + "=",
    "ends with a space ",
    "ends with a tab\t",
    ".starts with a dot",
    "From the start",
    "a=b; c=d",
    "Núñez, Policía Local de Elche " * 9,
]


@pytest.mark.parametrize("text", AWKWARD)
def test_a_run_decodes_to_its_text_and_ends_with_a_soft_break(text: str) -> None:
    encoded = _qp_open(text)
    if not text:
        assert encoded == b""
        return
    assert encoded.endswith(b"=\r\n")
    _assert_valid(encoded)
    assert _decoded(encoded) == text


def test_lines_with_fields_decode_to_the_lines_with_the_values() -> None:
    rng = random.Random(2022)
    alphabet = "ab .=\té<>&\"'"
    for _ in range(400):
        count = rng.randint(1, 4)
        texts = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 160)))
            for _ in range(count + 1)
        ]
        fields = [rng.randrange(len(_SENTINELS)) for _ in range(count)]
        lines = texts[0]
        for field, text in zip(fields, texts[1:], strict=True):
            lines += _SENTINELS[field] + text
        lines = lines.replace("\n", "") + "\r\n"
        values = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90))) for _ in _SENTINELS
        )
        piece = _Dynamic.of(lines, html=False)
        assert piece.fields == tuple(fields)
        encoded = piece.encode(values)
        _assert_valid(encoded)
        expected = lines
        for field, sentinel in enumerate(_SENTINELS):
            expected = expected.replace(sentinel, values[field])
        assert _decoded(encoded).replace("\r\n", "\n") == expected.replace("\r\n", "\n")


def test_the_text_around_the_fields_is_encoded_once() -> None:
    lines = f"Dear {_SENTINELS[0]}, of {_SENTINELS[1]}: welcome.\r\nUnsubscribe: https://x.example/u/{_SENTINELS[3]}\r\n"
    piece = _Dynamic.of(lines, html=False)
    first = piece.encode(("Ana", "Org", "", "tok1", "", ""))
    second = piece.encode(("Bob", "Other", "", "tok2", "", ""))
    # Every message holds the runs as they were encoded once; only the values differ.
    for run in piece.runs:
        assert run in first and run in second
    assert (
        _decoded(first) == "Dear Ana, of Org: welcome.\r\nUnsubscribe: https://x.example/u/tok1\r\n"
    )


def test_a_value_s_quick_encoding_is_the_general_one() -> None:
    """``_qp_value`` takes a short cut for short printable ASCII: the same bytes as
    ``_qp_open`` for every value, the awkward ones and random ones."""
    rng = random.Random(18)
    alphabet = "aZ09 .=\t-_@é<>&\"'%~"
    values = [
        *AWKWARD,
        ".",
        " ",
        "a ",
        "=",
        "x" * 71,
        "x" * 72,
        "x" * 73,
        "tok2abc",
        "ana@x.example",
    ]
    values += [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90))) for _ in range(2000)
    ]
    for value in values:
        assert _qp_value(value) == _qp_open(value), value
