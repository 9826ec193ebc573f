"""DKIM cost per message: signing the 26 kB newsletter, RSA-2048, relaxed/relaxed.

Measures dkimpy directly (pure-Python RSA) and clara-mail's own signer
(clara_mailer.compose.dkim: its own canonicalisation, OpenSSL's RSA through
``cryptography``) on the same bytes. Each
signature is verified once, so a broken signer cannot post a fast figure. Prints one
JSON line per signer: milliseconds per message and messages per second of one core.

Example:
    python benchmarks/bench_dkim.py --message newsletter.eml --messages 300
"""

from __future__ import annotations

import argparse
import base64
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


def new_key() -> tuple[bytes, bytes]:
    """A fresh RSA-2048 key from openssl(1): PEM private key, base64 public key for DNS."""
    private = subprocess.run(
        ["openssl", "genrsa", "-traditional", "2048"], capture_output=True, check=True
    ).stdout
    public_der = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"],
        input=private,
        capture_output=True,
        check=True,
    ).stdout
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


def verify(signed: bytes, public_b64: bytes) -> bool:
    record = b"v=DKIM1; k=rsa; p=" + public_b64

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record if name == SELECTOR + b"._domainkey." + DOMAIN + b"." else b""

    return bool(dkim.verify(signed, dnsfunc=dnsfunc))


def clara_signer(private_pem: bytes) -> Callable[[bytes], bytes]:
    """clara-mail's signer on the same key."""
    return DkimSigner(DOMAIN.decode(), SELECTOR.decode(), private_pem).sign


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
    signers: dict[str, Callable[[bytes], bytes]] = {"dkimpy": sign_with_dkimpy(private)}
    signers["clara_mailer.compose.dkim (OpenSSL RSA)"] = clara_signer(private)
    fast = sign_with_fast_rsa(private)
    if fast is not None:
        signers["what-if: dkimpy + OpenSSL RSA"] = fast

    status = 0
    for name, sign in signers.items():
        seconds, signed = measure(sign, message, args.messages)
        valid = verify(signed, public)
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
    return status


if __name__ == "__main__":
    sys.exit(main())
