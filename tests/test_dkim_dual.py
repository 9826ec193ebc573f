"""Dual DKIM signatures: RSA and Ed25519 (RFC 8463), checked by dkimpy with PyNaCl.

dkimpy verifies ed25519-sha256 through PyNaCl (libsodium), not through OpenSSL, which
signs here: an independent implementation. Each header must be the very bytes dkimpy
writes for the same key, algorithm and time; both signatures of a message must verify,
and a tampered message must fail both. Also the settings that switch it on, their
one-line errors, and a whole send whose received messages carry both signatures.
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from clara_mailer.compose.dkim import OVER_SIGNED, SIGNED_HEADERS, DkimSigner
from clara_mailer.core.errors import ConfigError
from clara_mailer.core.settings import Settings, load_settings
from clara_mailer.store.database import Database
from tests.test_dkim_fast import MESSAGES, NOW

pytest.importorskip("nacl.signing", reason="dkimpy verifies ed25519 only with PyNaCl")

DOMAIN = b"clara.example"


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    """PEM RSA key, PEM and raw-base64 Ed25519 key, and the DNS records of both."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    raw = ed_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    ed_public = ed_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    rsa_public = rsa_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "rsa": rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
        "ed25519": ed_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        "ed25519_b64": base64.b64encode(raw),
        "rsa_record": b"v=DKIM1; k=rsa; p=" + base64.b64encode(rsa_public),
        "ed25519_record": b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_public),
    }


def _dns(keys: dict[str, bytes]):  # type: ignore[no-untyped-def]
    records = {
        b"s2022._domainkey.clara.example.": keys["rsa_record"],
        b"ed2022._domainkey.clara.example.": keys["ed25519_record"],
    }

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return lookup


def _dual(keys: dict[str, bytes], ed_key: str = "ed25519") -> DkimSigner:
    return DkimSigner("clara.example", "s2022", keys["rsa"], "ed2022", keys[ed_key])


def _verify(message: bytes, keys: dict[str, bytes], idx: int) -> bool:
    """The signature ``idx`` (0: the top one) of ``message``, as ``dkim.verify`` checks
    the top one: False where it fails."""
    try:
        return bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=_dns(keys)))
    except dkim.DKIMException:
        return False


def _signature_headers(signed: bytes, message: bytes) -> list[bytes]:
    head = signed[: len(signed) - len(message)]
    return re.findall(rb"DKIM-Signature:.*?\r\n(?![ \t])", head, re.S)


@pytest.mark.parametrize("name", sorted(MESSAGES))
@pytest.mark.parametrize("ed_key", ["ed25519", "ed25519_b64"])
def test_dual_headers_are_dkimpys_and_both_verify(
    keys: dict[str, bytes], name: str, ed_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = MESSAGES[name]
    ours = _dual(keys, ed_key).sign(message, now=NOW)
    monkeypatch.setattr(time, "time", lambda: float(NOW))
    common = {
        "canonicalize": (b"relaxed", b"relaxed"),
        "include_headers": [*SIGNED_HEADERS, *OVER_SIGNED],
    }
    theirs_ed = dkim.sign(
        message,
        b"ed2022",
        DOMAIN,
        keys["ed25519_b64"],
        signature_algorithm=b"ed25519-sha256",
        **common,
    )
    theirs_rsa = dkim.sign(theirs_ed + message, b"s2022", DOMAIN, keys["rsa"], **common)
    assert ours == theirs_rsa + theirs_ed + message
    rsa_header, ed_header = _signature_headers(ours, message)
    assert b"a=rsa-sha256;" in rsa_header and b"s=s2022;" in rsa_header
    assert b"a=ed25519-sha256;" in ed_header and b"s=ed2022;" in ed_header
    assert _verify(ours, keys, 0) and _verify(ours, keys, 1)


def test_ed25519_signs_the_sha256_hash_of_the_header_data(keys: dict[str, bytes]) -> None:
    """RFC 8463 section 3: PureEdDSA over SHA-256(data), checked here with the public key
    alone, not through dkimpy: rebuild the hashed data from the message by hand."""
    import hashlib

    message = MESSAGES["plain"]
    signed = _dual(keys).sign(message, now=NOW)
    _, ed_header = _signature_headers(signed, message)
    value = ed_header.split(b":", 1)[1]
    signature = base64.b64decode(re.sub(rb"\s", b"", value.split(b"b=")[-1]))
    unsigned = re.sub(rb"\s+", b" ", value.rsplit(b"b=", 1)[0] + b"b=").strip()
    # The message's headers as relaxed canonicalisation writes them, in h= order.
    fields = {}
    for line in message.split(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, rest = line.partition(b":")
        fields[name.lower()] = rest.strip()
    data = b"".join(b"%s:%s\r\n" % (n, fields[n]) for n in SIGNED_HEADERS if n in fields)
    data += b"dkim-signature:" + unsigned
    public = ed25519.Ed25519PrivateKey.from_private_bytes(
        base64.b64decode(keys["ed25519_b64"])
    ).public_key()
    public.verify(signature, hashlib.sha256(data).digest())  # raises if it does not verify


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"Hola Anna", b"Hola Anne"),  # the body
        (b"Subject: CLARA results", b"Subject: CLARA result"),  # a signed header
        (b"From: CLARA", b"From: evil <e@evil.example>\r\nFrom: CLARA"),  # an added From
    ],
)
def test_a_tampered_message_fails_both(keys: dict[str, bytes], old: bytes, new: bytes) -> None:
    signed = _dual(keys).sign(MESSAGES["plain"])
    assert _verify(signed, keys, 0) and _verify(signed, keys, 1)
    forged = signed.replace(old, new)
    assert forged != signed
    assert not _verify(forged, keys, 0)
    assert not _verify(forged, keys, 1)


def test_unsigned_then_signed_elsewhere_is_sign(keys: dict[str, bytes]) -> None:
    """The sender's way (``unsigned_parts`` here, ``sign_digests`` in the signing process,
    ``complete`` here) gives ``sign``'s two headers; a header dkimpy cannot read either is
    a ValueError that says why, before any signing."""
    signer = _dual(keys)
    message = MESSAGES["plain"]
    head, _, body = message.partition(b"\r\n\r\n")
    unsigned = signer.unsigned_parts(head + b"\r\n\r\n", [body[:7], body[7:]], now=NOW)
    assert len(unsigned.digests) == 2
    signed = unsigned.complete(signer.sign_digests(unsigned.digests)) + message
    assert signed == signer.sign(message, now=NOW)
    assert _verify(signed, keys, 0) and _verify(signed, keys, 1)
    bad = b" a continuation line first\r\nFrom: x@clara.example\r\n\r\n"
    with pytest.raises(ValueError, match="continuation"):
        signer.unsigned_parts(bad, [b"body\r\n"], now=NOW)


# -- settings -------------------------------------------------------------------------------


@pytest.fixture
def key_files(keys: dict[str, bytes], tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("rsa", "ed25519", "ed25519_b64"):
        files[name] = tmp_path / f"{name}.key"
        files[name].write_bytes(keys[name])
    return files


def _env(files: dict[str, Path], **extra: str) -> dict[str, str]:
    return {
        "CLARA_DKIM_DOMAIN": "clara.example",
        "CLARA_DKIM_SELECTOR": "s2022",
        "CLARA_DKIM_KEY_FILE": str(files["rsa"]),
        **extra,
    }


def test_settings_switch_on_the_second_signature(
    key_files: dict[str, Path], keys: dict[str, bytes]
) -> None:
    settings = load_settings(
        environ=_env(
            key_files,
            CLARA_DKIM_ED25519_SELECTOR="ed2022",
            CLARA_DKIM_ED25519_KEY_FILE=str(key_files["ed25519_b64"]),
        )
    )
    signer = DkimSigner.from_settings(settings)
    assert signer is not None and signer.ed25519_selector == "ed2022"
    assert "ed2022" in repr(signer) and "PRIVATE" not in repr(signer)
    signed = signer.sign(MESSAGES["plain"])
    assert len(_signature_headers(signed, MESSAGES["plain"])) == 2
    assert _verify(signed, keys, 0) and _verify(signed, keys, 1)
    rsa_only = DkimSigner.from_settings(load_settings(environ=_env(key_files)))
    assert rsa_only is not None and rsa_only.ed25519_key is None
    assert len(_signature_headers(rsa_only.sign(MESSAGES["plain"]), MESSAGES["plain"])) == 1


def test_relative_ed25519_key_file_is_in_the_project(
    key_files: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "clara-mail.toml").write_text(
        'dkim_domain = "clara.example"\ndkim_selector = "s2022"\n'
        'dkim_key_file = "rsa.key"\ndkim_ed25519_selector = "ed2022"\n'
        'dkim_ed25519_key_file = "ed25519.key"\n'
    )
    settings = load_settings(tmp_path, {})
    assert settings.dkim_ed25519_key_file == tmp_path.absolute() / "ed25519.key"
    assert DkimSigner.from_settings(settings) is not None


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (
            {"CLARA_DKIM_ED25519_SELECTOR": "ed2022"},
            "CLARA_DKIM_ED25519_SELECTOR: dkim_ed25519_selector is set, so DKIM needs "
            "dkim_ed25519_key_file too (or none of the dkim_ed25519_ settings)",
        ),
        (
            {"CLARA_DKIM_ED25519_KEY_FILE": "ed.key"},
            "CLARA_DKIM_ED25519_KEY_FILE: dkim_ed25519_key_file is set, so DKIM needs "
            "dkim_ed25519_selector too (or none of the dkim_ed25519_ settings)",
        ),
        (
            {"CLARA_DKIM_ED25519_SELECTOR": "s2022", "CLARA_DKIM_ED25519_KEY_FILE": "ed.key"},
            "CLARA_DKIM_ED25519_SELECTOR: dkim_ed25519_selector must differ from "
            "dkim_selector (each key has its own DNS record)",
        ),
    ],
)
def test_ed25519_settings_errors_are_one_line(
    key_files: dict[str, Path], extra: dict[str, str], error: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=_env(key_files, **extra))
    assert str(info.value) == error


def test_ed25519_without_rsa_is_refused() -> None:
    env = {"CLARA_DKIM_ED25519_SELECTOR": "ed2022", "CLARA_DKIM_ED25519_KEY_FILE": "ed.key"}
    with pytest.raises(ConfigError) as info:
        load_settings(environ=env)
    assert str(info.value) == (
        "CLARA_DKIM_ED25519_SELECTOR: dkim_ed25519_selector is set, so DKIM needs "
        "dkim_domain, dkim_selector and dkim_key_file too (Ed25519 signs beside RSA)"
    )
    settings = Settings(dkim_ed25519_selector="ed2022", dkim_ed25519_key_file=Path("ed.key"))
    with pytest.raises(ConfigError, match="DKIM needs dkim_domain, dkim_selector"):
        DkimSigner.from_settings(settings)


def test_bad_ed25519_key_files_are_config_errors(key_files: dict[str, Path]) -> None:
    def signer_with(path: Path) -> DkimSigner | None:
        return DkimSigner.from_settings(
            Settings(
                dkim_domain="clara.example",
                dkim_selector="s2022",
                dkim_key_file=key_files["rsa"],
                dkim_ed25519_selector="ed2022",
                dkim_ed25519_key_file=path,
            )
        )

    missing = key_files["rsa"].with_name("absent.key")
    with pytest.raises(ConfigError, match=r"absent.key: cannot read DKIM key"):
        signer_with(missing)
    for content, why in [
        (None, "a RSAPrivateKey key, not Ed25519"),  # the RSA key given as the Ed25519 one
        (b"not a key\n", "neither PEM nor base64"),
        (base64.b64encode(b"x" * 31) + b"\n", "31 bytes of base64, not 32"),
    ]:
        path = key_files["rsa"] if content is None else missing.with_name("bad.key")
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ConfigError) as info:
            signer_with(path)
        message = str(info.value)
        assert "not an Ed25519 private key" in message and why in message
        assert "\n" not in message and "PRIVATE" not in message


# -- a whole send ---------------------------------------------------------------------------


def test_a_dual_signed_send_verifies_both_as_received(
    db: Database, settings: Settings, key_files: dict[str, Path], keys: dict[str, bytes]
) -> None:
    """Signed in the signing process, then sent: every message as the server got it
    carries both signatures, RSA on top, and both verify."""
    from tests.send_helpers import add_recipients
    from tests.smtp_server import RecordingSMTPServer
    from tests.test_send import send, smtp_settings

    add_recipients(db, 5)
    with RecordingSMTPServer() as server:
        dual = smtp_settings(
            settings,
            server,
            dkim_domain="clara.example",
            dkim_selector="s2022",
            dkim_key_file=key_files["rsa"],
            dkim_ed25519_selector="ed2022",
            dkim_ed25519_key_file=key_files["ed25519"],
        )
        send(db, dual)
        received = [m.data for m in server.messages]
    assert len(received) == 5
    for data in received:
        headers = re.findall(rb"^DKIM-Signature:.*?a=([a-z0-9-]+);", data, re.M | re.S)
        assert headers == [b"rsa-sha256", b"ed25519-sha256"]
        assert _verify(data, keys, 0) and _verify(data, keys, 1)
        assert not _verify(data.replace(b"CLARA", b"CLAR4", 1), keys, 1)
