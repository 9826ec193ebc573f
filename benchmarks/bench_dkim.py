"""DKIM cost per message: signing the newsletter, RSA-2048, relaxed/relaxed.

Measures dkimpy directly (pure-Python RSA) and clara-mail's own signer
(clara_mailer.compose.dkim: its own canonicalisation, OpenSSL's RSA and Ed25519 through
``cryptography``) on the same bytes, RSA alone and RSA + Ed25519 (RFC 8463). Each
signature is verified once (Ed25519 only where PyNaCl lets dkimpy verify it), so a broken
signer cannot post a fast figure. Prints one JSON line per signer: milliseconds per
message and messages per second of one core.

The ``... GIL held`` lines are the part of a signature that keeps the GIL (parsing,
canonicalisation, building the header): what the sender's event loop still pays when the
worker signs on a thread beside it, since hashing and the RSA and Ed25519 steps release
the GIL and can run on another core (CPU time, see ``gil_held``).

Example:
    python benchmarks/bench_dkim.py --message newsletter.eml --messages 300
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim

from clara_mailer.compose.dkim import SIGNED_HEADERS, DkimSigner

DOMAIN = b"clara.example"
SELECTOR = b"bench"
ED25519_SELECTOR = b"bench-ed25519"


def _openssl_key(generate: list[str], public: list[str]) -> tuple[bytes, bytes]:
    """A fresh private key (PEM) from ``openssl generate...`` and its public key (DER)
    from ``openssl public... -pubout -outform DER``."""
    private = subprocess.run(["openssl", *generate], capture_output=True, check=True).stdout
    public_der = subprocess.run(
        ["openssl", *public, "-pubout", "-outform", "DER"],
        input=private,
        capture_output=True,
        check=True,
    ).stdout
    return private, public_der


def new_ed25519_key() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key from openssl(1): PEM private key, base64 raw public key."""
    private, public_der = _openssl_key(["genpkey", "-algorithm", "ed25519"], ["pkey"])
    return private, base64.b64encode(public_der[-32:])  # SubjectPublicKeyInfo ends with it


def new_key() -> tuple[bytes, bytes]:
    """A fresh RSA-2048 key from openssl(1): PEM private key, base64 public key for DNS."""
    private, public_der = _openssl_key(["genrsa", "-traditional", "2048"], ["rsa"])
    return private, base64.b64encode(public_der)


def with_unsubscribe_headers(message: bytes) -> bytes:
    extra = (
        b"List-Unsubscribe: <https://clara.example/u/0123456789abcdef>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    )
    return extra + message


def sign_with_dkimpy(private: bytes) -> Callable[[bytes], bytes]:
    def sign(message: bytes) -> bytes:
        signature: bytes = dkim.sign(
            message,
            SELECTOR,
            DOMAIN,
            private,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(SIGNED_HEADERS),
        )
        return signature + message

    return sign


def sign_with_fast_rsa(private: bytes) -> Callable[[bytes], bytes] | None:
    """What-if: dkimpy's canonicalisation and hashing, the RSA step done by the
    ``cryptography`` package (OpenSSL) instead of dkimpy's pure-Python ``pow``.
    Measured only where ``cryptography`` is installed; clara-mail signs on its own."""
    if importlib.util.find_spec("cryptography") is None:
        return None
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    key = serialization.load_pem_private_key(private, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    dkimpy = sign_with_dkimpy(private)
    module: Any = dkim

    def openssl_rsa(hash_obj: Any, _private_key: Any) -> bytes:
        digest = hash_obj.digest()
        return key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))

    def sign(message: bytes) -> bytes:
        original = module.RSASSA_PKCS1_v1_5_sign
        module.RSASSA_PKCS1_v1_5_sign = openssl_rsa
        try:
            return dkimpy(message)
        finally:
            module.RSASSA_PKCS1_v1_5_sign = original

    return sign


def verify(signed: bytes, public_b64: bytes, ed25519_b64: bytes | None = None) -> bool:
    """The top signature (RSA) verifies; with ``ed25519_b64``, the second one too, where
    PyNaCl lets dkimpy check Ed25519 (else that one is not checked here)."""
    records = {
        SELECTOR + b"._domainkey." + DOMAIN + b".": b"v=DKIM1; k=rsa; p=" + public_b64,
        ED25519_SELECTOR + b"._domainkey." + DOMAIN + b".": b"v=DKIM1; k=ed25519; p="
        + (ed25519_b64 or b""),
    }

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name, b"")

    if not dkim.verify(signed, dnsfunc=dnsfunc):
        return False
    if ed25519_b64 is None or importlib.util.find_spec("nacl") is None:
        return True
    try:
        return bool(dkim.DKIM(signed).verify(idx=1, dnsfunc=dnsfunc))
    except dkim.DKIMException:
        return False


def clara_signer(private_pem: bytes, ed25519_pem: bytes | None = None) -> DkimSigner:
    """clara-mail's signer on the same key (and the Ed25519 one for dual signatures)."""
    if ed25519_pem is None:
        return DkimSigner(DOMAIN.decode(), SELECTOR.decode(), private_pem)
    return DkimSigner(
        DOMAIN.decode(), SELECTOR.decode(), private_pem, ED25519_SELECTOR.decode(), ed25519_pem
    )


def gil_held(signer: DkimSigner, message: bytes, count: int) -> float:
    """CPU seconds a signature holds the GIL: the CPU time of ``sign`` less that of the
    calls in it that release the GIL (SHA-256 of the canonical body, then per key SHA-256
    of the header data and the RSA or Ed25519 step), each timed on CPU time, which other
    processes on a busy machine do not inflate as they do wall time."""
    from clara_mailer.compose import dkim as clara_dkim

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        started = time.thread_time()
        for _ in range(count):
            fn()
        return (time.thread_time() - started) / count

    body = clara_dkim._relaxed_body(clara_dkim._parse(message)[1])
    digest = hashlib.sha256(message[:600]).digest()
    keys = signer._keys
    released = cpu(lambda: hashlib.sha256(body).digest())
    released += sum(cpu(lambda key=key: key.sign(digest)) for key in keys)  # type: ignore[misc]
    return max(cpu(lambda: signer.sign(message)) - released, 0.0)


def measure(sign: Callable[[bytes], bytes], message: bytes, count: int) -> tuple[float, bytes]:
    signed = sign(message)  # warm-up, and the bytes verified below
    started = time.perf_counter()
    for _ in range(count):
        sign(message)
    return (time.perf_counter() - started) / count, signed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--message", type=Path, required=True, help="the newsletter .eml")
    parser.add_argument("--messages", type=int, default=300, help="signatures to time")
    args = parser.parse_args(argv)

    message = with_unsubscribe_headers(args.message.read_bytes())
    private, public = new_key()
    ed25519_private, ed25519_public = new_ed25519_key()
    signers: dict[str, tuple[Callable[[bytes], bytes], bytes | None]] = {
        "dkimpy": (sign_with_dkimpy(private), None)
    }
    rsa_only = clara_signer(private)
    dual = clara_signer(private, ed25519_private)
    signers["clara_mailer.compose.dkim (OpenSSL RSA)"] = (rsa_only.sign, None)
    signers["clara_mailer.compose.dkim, RSA + Ed25519"] = (dual.sign, ed25519_public)
    fast = sign_with_fast_rsa(private)
    if fast is not None:
        signers["what-if: dkimpy + OpenSSL RSA"] = (fast, None)

    status = 0
    for name, (sign, ed25519_b64) in signers.items():
        seconds, signed = measure(sign, message, args.messages)
        valid = verify(signed, public, ed25519_b64)
        status |= not valid
        print(
            json.dumps(
                {
                    "signer": name,
                    "ms_per_message": seconds * 1000,
                    "rate": 1 / seconds,
                    "verified": valid,
                }
            )
        )
    for name, signer in (("RSA", rsa_only), ("RSA + Ed25519", dual)):
        seconds = gil_held(signer, message, args.messages)
        print(
            json.dumps(
                {
                    "signer": f"clara_mailer.compose.dkim, {name}: GIL held",
                    "ms_per_message": seconds * 1000,
                    "rate": 1 / seconds if seconds else None,
                    "verified": True,
                }
            )
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
