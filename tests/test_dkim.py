"""DKIM signing: verified with dkimpy against the test public key, and sent unchanged."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from clara_mailer.compose.dkim import DkimSigner
from clara_mailer.core.errors import ConfigError
from clara_mailer.core.settings import Settings
from clara_mailer.core.vocabulary import Outcome
from clara_mailer.transport import SMTPTransport
from tests.smtp_server import RecordingSMTPServer

MESSAGE = (
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
    b"\r\n"
    b"Hola Anna,\r\n.a line with a dot\r\n"
)


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """(private key file, the DNS TXT record that publishes the public key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path_factory.mktemp("dkim") / "clara.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def signer_for(key_file: Path) -> DkimSigner:
    settings = Settings(dkim_domain="clara.example", dkim_selector="s2022", dkim_key_file=key_file)
    signer = DkimSigner.from_settings(settings)
    assert signer is not None
    return signer


def dns_for(record: bytes):  # type: ignore[no-untyped-def]
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"s2022._domainkey.clara.example." else None

    return lookup


def test_signature_verifies_and_covers_list_unsubscribe_post(key_pair: tuple[Path, bytes]) -> None:
    key_file, record = key_pair
    signed = signer_for(key_file).sign(MESSAGE)
    assert signed.endswith(MESSAGE) and signed.startswith(b"DKIM-Signature:")
    assert dkim.verify(signed, dnsfunc=dns_for(record))
    header = signed[: len(signed) - len(MESSAGE)].decode().replace("\r\n", "").replace(" ", "")
    assert "c=relaxed/relaxed" in header and "d=clara.example" in header
    signed_headers = header.split("h=")[1].split(";")[0].split(":")
    for name in ("from", "to", "subject", "date", "message-id", "list-id", "list-unsubscribe"):
        assert name in signed_headers
    assert "list-unsubscribe-post" in signed_headers


def test_altered_message_fails_verification(key_pair: tuple[Path, bytes]) -> None:
    key_file, record = key_pair
    signed = signer_for(key_file).sign(MESSAGE)
    forged = signed.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click", b"X: y")
    assert not dkim.verify(forged, dnsfunc=dns_for(record))


def test_signed_bytes_are_the_bytes_sent(key_pair: tuple[Path, bytes]) -> None:
    key_file, record = key_pair
    signed = signer_for(key_file).sign(MESSAGE)

    async def send(port: int) -> Outcome:
        transport = SMTPTransport.from_url(f"smtp://127.0.0.1:{port}?tls=none")
        connection = await transport.connect()
        result = await connection.send("bounces@clara.example", "anna@policia.example", signed)
        await connection.close()
        return result.outcome

    with RecordingSMTPServer() as server:
        assert asyncio.run(send(server.port)) is Outcome.SENT
        [received] = server.messages
    assert received.data == signed
    assert dkim.verify(received.data, dnsfunc=dns_for(record))


def test_no_dkim_settings_means_no_signer() -> None:
    assert DkimSigner.from_settings(Settings()) is None


def test_partial_settings_are_a_config_error(key_pair: tuple[Path, bytes]) -> None:
    with pytest.raises(ConfigError, match="DKIM needs dkim_selector"):
        DkimSigner.from_settings(Settings(dkim_domain="clara.example", dkim_key_file=key_pair[0]))


def test_unreadable_or_bad_key_is_a_config_error(tmp_path: Path) -> None:
    settings = Settings(
        dkim_domain="clara.example", dkim_selector="s", dkim_key_file=tmp_path / "x"
    )
    with pytest.raises(ConfigError, match="cannot read DKIM key"):
        DkimSigner.from_settings(settings)
    (tmp_path / "x").write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a PEM RSA private key"):
        DkimSigner.from_settings(settings)


def test_repr_hides_the_key(key_pair: tuple[Path, bytes]) -> None:
    assert "PRIVATE" not in repr(signer_for(key_pair[0]))
