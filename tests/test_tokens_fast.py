"""The token module's own base32 and HMAC against the standard library's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import pickle
import random

import pytest

from clara_mailer.core.tokens import TokenSigner, _b32, _HmacSha256, _unb32


def test_base32_is_the_standard_one_lowercased_without_padding() -> None:
    rng = random.Random(18)
    for length in range(0, 70):
        for data in (bytes(length), b"\xff" * length, rng.randbytes(length), rng.randbytes(length)):
            expected = base64.b32encode(data).decode("ascii").rstrip("=").lower()
            assert _b32(data) == expected, data
            assert _unb32(expected) == data


@pytest.mark.parametrize("key_length", [0, 1, 16, 32, 63, 64, 65, 200])
def test_hmac_sha256_is_the_standard_one(key_length: int) -> None:
    rng = random.Random(key_length)
    key = rng.randbytes(key_length)
    mac = _HmacSha256(key)
    for length in (0, 1, 5, 55, 56, 63, 64, 65, 1000):
        message = rng.randbytes(length)
        assert mac.digest(message) == hmac.new(key, message, hashlib.sha256).digest()
    # Copies of the key's states are used, never the states themselves: a second
    # digest of the same message is the same.
    assert mac.digest(b"again") == mac.digest(b"again")
    # A signer goes to the helper processes of ``send --processes`` pickled.
    assert pickle.loads(pickle.dumps(mac)).digest(b"again") == mac.digest(b"again")


def test_tokens_hashes_and_message_ids_are_what_they_were() -> None:
    """Tokens already sent (unsubscribe links, VERP addresses) must still verify, and
    address hashes must still match the suppressions stored: the values are those the
    plain ``hmac`` and ``base64`` construction gives."""
    signer = TokenSigner("a-secret-key-of-32-characters!!!")
    key = b"a-secret-key-of-32-characters!!!"
    token_key = hmac.new(key, b"clara-mail token", hashlib.sha256).digest()
    address_key = hmac.new(key, b"clara-mail address", hashlib.sha256).digest()
    id_key = hmac.new(key, b"clara-mail message-id", hashlib.sha256).digest()

    def b32(data: bytes) -> str:
        return base64.b32encode(data).decode("ascii").rstrip("=").lower()

    payload = b"u" + bytes([7]) + bytes([0xAC, 0x02])  # varints of 7 and 300
    mac = hmac.new(token_key, payload, hashlib.sha256).digest()[:16]
    assert signer.sign("u", 7, 300) == b32(payload[1:] + mac)
    assert signer.verify("u", b32(payload[1:] + mac)).recipient_id == 300
    assert (
        signer.address_hash(" Ana@Example.Example ")
        == hmac.new(address_key, b"ana@example.example", hashlib.sha256).hexdigest()
    )
    expected_id = b32(hmac.new(id_key, b"newsletter\x0042", hashlib.sha256).digest()[:15])
    assert signer.message_id_part("newsletter", 42) == expected_id
