"""The DKIM signer (OpenSSL's RSA, our own canonicalisation) against dkimpy itself.

For the same key, time and header list, ``DkimSigner.sign`` must write the very bytes
``dkim.sign`` writes (so it verifies wherever dkimpy's signatures verify), and dkimpy must
verify them, over messages that stress the canonicalisation: folded and tabbed headers,
whitespace at line ends, blank lines at the end, an empty body, LF line ends, repeated
headers, headers absent, long values that fold mid-token.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from clara_mailer.compose.dkim import OVER_SIGNED, SIGNED_HEADERS, DkimSigner
from clara_mailer.core.errors import ConfigError
from clara_mailer.core.settings import Settings

NOW = 1_700_000_000

HEADERS = (
    b"From: CLARA <news@clara.example>\r\n"
    b"To: Anna <anna@policia.example>\r\n"
    b"Subject: CLARA results\r\n"
    b"Date: Tue, 18 Jan 2022 10:00:00 +0100\r\n"
    b"Message-ID: <n1.42@clara.example>\r\n"
    b"List-Id: CLARA newsletter <newsletter.clara.example>\r\n"
    b"List-Unsubscribe: <https://clara.example/u/abc>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
)

MESSAGES = {
    "plain": HEADERS + b"\r\nHola Anna,\r\n.a line with a dot\r\n",
    "whitespace": HEADERS.replace(b"Subject: CLARA results", b"Subject:  CLARA \t results  ")
    + b"\r\nline with trailing spaces   \r\n\ttabs\t\tinside \t here\r\n  \r\n",
    "blank lines at the end": HEADERS + b"\r\nbody\r\n\r\n\r\n\r\n",
    "no final line end": HEADERS + b"\r\nbody without CRLF",
    "empty body": HEADERS + b"\r\n",
    "only blank lines": HEADERS + b"\r\n\r\n\r\n",
    "no body at all": HEADERS,
    "LF line ends": (HEADERS + b"\r\nHola\r\n  spaced  \r\n").replace(b"\r\n", b"\n"),
    "folded headers": HEADERS.replace(
        b"Subject: CLARA results",
        b"Subject: CLARA results of a long\r\n\tsubject folded\r\n   over three lines",
    ).replace(b"To: Anna <anna@policia.example>", b"TO:Anna\r\n <anna@policia.example>")
    + b"\r\nbody\r\n",
    "repeated and absent headers": b"Reply-To: a@clara.example\r\n"
    + HEADERS
    + b"From: second <second@clara.example>\r\nSubject: second\r\n\r\nbody\r\n",
    "no list headers": b"From: x@clara.example\r\nSubject: s\r\n\r\nb\r\n",
    "a lone CR": HEADERS + b"\r\nline\rwith CR\r\r\n\r\n",
    "long body": HEADERS
    + b"\r\n"
    + b"".join(b"line %d with some text . and dots \t\r\n" % i for i in range(3000)),
}


def _pem(key: object, fmt: serialization.PrivateFormat) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, fmt, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def rsa_key() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def _dns(record: bytes, selector: bytes = b"s2022"):  # type: ignore[no-untyped-def]
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == selector + b"._domainkey.clara.example." else None

    return lookup


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8]
)
def test_same_bytes_as_dkimpy_and_verified_by_it(
    rsa_key: tuple[rsa.RSAPrivateKey, bytes],
    name: str,
    fmt: serialization.PrivateFormat,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, record = rsa_key
    pem = _pem(key, fmt)
    message = MESSAGES[name]
    ours = DkimSigner("clara.example", "s2022", pem).sign(message, now=NOW)
    monkeypatch.setattr(time, "time", lambda: float(NOW))
    theirs = dkim.sign(
        message,
        b"s2022",
        b"clara.example",
        pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[*SIGNED_HEADERS, *OVER_SIGNED],
    )
    assert ours == theirs + message
    assert dkim.verify(ours, dnsfunc=_dns(record))


@pytest.mark.parametrize("selector", ["s", "a-much-longer-selector-2022", "x" * 40])
def test_folding_of_other_selectors_and_domains(
    rsa_key: tuple[rsa.RSAPrivateKey, bytes], selector: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, record = rsa_key
    pem = _pem(key, serialization.PrivateFormat.TraditionalOpenSSL)
    message = MESSAGES["plain"]
    ours = DkimSigner("clara.example", selector, pem).sign(message)
    assert dkim.verify(ours, dnsfunc=_dns(record, selector.encode()))
    stamp = int(ours.split(b"t=")[1].split(b";")[0])
    monkeypatch.setattr(time, "time", lambda: float(stamp))
    theirs = dkim.sign(
        message,
        selector.encode(),
        b"clara.example",
        pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[*SIGNED_HEADERS, *OVER_SIGNED],
    )
    assert ours == theirs + message


def test_altered_body_or_header_fails(rsa_key: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    key, record = rsa_key
    signer = DkimSigner("clara.example", "s2022", _pem(key, serialization.PrivateFormat.PKCS8))
    signed = signer.sign(MESSAGES["plain"])
    assert dkim.verify(signed, dnsfunc=_dns(record))
    assert not dkim.verify(signed.replace(b"Hola", b"Hole"), dnsfunc=_dns(record))
    # A second From added above the signed one breaks the over-signed h= list.
    forged = signed.replace(b"From: CLARA", b"From: evil <e@evil.example>\r\nFrom: CLARA")
    assert not dkim.verify(forged, dnsfunc=_dns(record))


def test_a_key_that_is_not_rsa_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(
        _pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8)
    )
    settings = Settings(dkim_domain="clara.example", dkim_selector="s", dkim_key_file=path)
    with pytest.raises(ConfigError, match="not a PEM RSA private key"):
        DkimSigner.from_settings(settings)


def test_random_whitespace_and_line_ends(
    rsa_key: tuple[rsa.RSAPrivateKey, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies and headers of random words, spaces, tabs, CRs and line ends (seeded)."""
    import random

    key, record = rsa_key
    pem = _pem(key, serialization.PrivateFormat.TraditionalOpenSSL)
    signer = DkimSigner("clara.example", "s2022", pem)
    monkeypatch.setattr(time, "time", lambda: float(NOW))
    pieces = [b"word", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\n", b".", b"\r\n\r\n", b"\xc3\xa9"]
    rng = random.Random(2022)
    for _ in range(60):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 200)))
        subject = b"".join(rng.choice(pieces[:5]) for _ in range(rng.randrange(1, 30)))
        message = HEADERS.replace(b"Subject: CLARA results", b"Subject:" + subject) + b"\r\n"
        message += body
        ours = signer.sign(message, now=NOW)
        theirs = dkim.sign(
            message,
            b"s2022",
            b"clara.example",
            pem,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[*SIGNED_HEADERS, *OVER_SIGNED],
        )
        assert ours == theirs + message, message
        assert dkim.verify(ours, dnsfunc=_dns(record))


def test_body_canonicalisation_is_dkimpys_over_long_runs() -> None:
    """The one-scan collapse of space runs against dkimpy's own relaxed body, over bodies
    of long and short runs of spaces and tabs, at line ends and at the end (seeded)."""
    import random

    from dkim.canonicalization import Relaxed

    from clara_mailer.compose.dkim import _relaxed_body

    pieces = [b"w", b" ", b"  ", b" " * 7, b" " * 33, b"\t", b"\t \t", b"\r\n", b"\r\n\r\n"]
    rng = random.Random(8463)
    for _ in range(400):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 120)))
        assert _relaxed_body(body) == Relaxed.canonicalize_body(body), body


# -- a body given in parts (the renderer's), made relaxed part by part ----------------------


def _head_and_body(message: bytes) -> tuple[bytes, bytes]:
    end = message.find(b"\r\n\r\n")
    return (message, b"") if end == -1 else (message[: end + 4], message[end + 4 :])


def _cut(body: bytes, rng: object) -> list[bytes]:
    """``body`` cut at random places: mid-line, between CR and LF, empty parts too."""
    import random

    assert isinstance(rng, random.Random)
    cuts = sorted(rng.randrange(0, len(body) + 1) for _ in range(rng.randrange(0, 6)))
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_parts_give_the_digests_of_the_whole_message(
    rsa_key: tuple[rsa.RSAPrivateKey, bytes], name: str
) -> None:
    """Every message of the set above, its body cut anywhere (and again, from the cache
    of relaxed parts): the same tags and digests as the whole message."""
    import random

    signer = DkimSigner(
        "clara.example", "s2022", _pem(rsa_key[0], serialization.PrivateFormat.PKCS8)
    )
    message = MESSAGES[name]
    head, body = _head_and_body(message)
    whole = signer.unsigned(message, now=NOW)
    rng = random.Random(name)
    for _ in range(20):
        parts = _cut(body, rng)
        assert signer.unsigned_parts(head, parts, now=NOW) == whole, parts
        assert signer.unsigned_parts(head, parts, now=NOW) == whole, parts  # cached
    # A header that does not end where the parts begin is read as a whole message.
    assert signer.unsigned_parts(message, [], now=NOW) == whole


@pytest.mark.parametrize(
    "head",
    [
        b"\r\n",
        b"\n\r\n",
        b"\n",
        b"From: a@clara.example\n\nX-Body: 1\r\n\r\n",
        b"From: a@clara.example\r\n\r\nX-Body: 1\r\n\r\n",
        b"From: a@clara.example\nSubject: LF \t then CRLF\n\r\n",
        b"From: a@clara.example\r\nSubject: no empty line\r\n",
    ],
)
def test_parts_after_an_odd_header(rsa_key: tuple[rsa.RSAPrivateKey, bytes], head: bytes) -> None:
    """Where the empty line that ends the header is not the end of ``head``, the parts
    still give the whole message's digests."""
    signer = DkimSigner(
        "clara.example", "s2022", _pem(rsa_key[0], serialization.PrivateFormat.PKCS8)
    )
    parts = [b"X-Part: body  line \r\n", b"\r\n", b"body\r\n"]
    assert signer.unsigned_parts(head, parts, now=NOW) == signer.unsigned(
        head + b"".join(parts), now=NOW
    )


def test_parts_of_random_bodies(rsa_key: tuple[rsa.RSAPrivateKey, bytes]) -> None:
    """Random bodies of spaces, tabs, CRs and line ends, cut at random (seeded), the large
    parts met again with other neighbours: always the whole message's digests."""
    import random

    from tests.test_message_checker import random_parts

    signer = DkimSigner(
        "clara.example", "s2022", _pem(rsa_key[0], serialization.PrivateFormat.PKCS8)
    )
    pieces = [b"w", b" ", b"  ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b" \r\n"]
    rng = random.Random(6376)
    shared = [b"".join(rng.choice(pieces) for _ in range(800)) + b"\r\n" for _ in range(3)]
    for _ in range(300):
        parts = random_parts(rng, pieces, shared, 0.4, 40, 0)
        whole = signer.unsigned(HEADERS + b"\r\n" + b"".join(parts), now=NOW)
        assert signer.unsigned_parts(HEADERS + b"\r\n", parts, now=NOW) == whole, parts
    assert signer._relaxed, "the large shared parts were kept"


def test_the_renderers_parts_sign_as_its_message(
    rsa_key: tuple[rsa.RSAPrivateKey, bytes],
) -> None:
    """What the sender signs: the renderer's header and body parts give the digests of
    the message it renders, and the signature made from them verifies with dkimpy."""
    from tests.test_render import CAMPAIGNS, person, renderer

    key, record = rsa_key
    signer = DkimSigner("clara.example", "s2022", _pem(key, serialization.PrivateFormat.PKCS8))
    for slug in CAMPAIGNS:
        campaign = renderer(slug)
        for language, name in (("es", "Inés  García"), ("en", ""), ("es", "Ana\tPérez ")):
            who = person(language=language, name=name)
            message_id = campaign.message_id(who)
            head, body = campaign.render_parts(who, message_id=message_id)
            assert head.endswith(b"\r\n\r\n") and len(body) > 1
            message = head + b"".join(body)
            whole = signer.unsigned(message, now=NOW)
            assert signer.unsigned_parts(head, body, now=NOW) == whole
            signed = whole.complete(signer.sign_digests(whole.digests)) + message
            assert signed == signer.sign(message, now=NOW)
            assert dkim.verify(signed, dnsfunc=_dns(record))
