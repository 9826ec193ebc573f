"""The signing process (``sending.signing``): DKIM's private-key step beside the sender.

The same signatures as signing here (RSA PKCS#1 v1.5 and Ed25519 are deterministic), made
in another process; a dead signing process costs speed, never a message; and the signing
process dies with the sender.
"""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from clara_mailer.compose.dkim import DkimSigner
from clara_mailer.sending.signing import SigningProcess

DIGESTS = [hashlib.sha256(b"message %d" % i).digest() for i in range(12)]


@pytest.fixture(scope="module")
def signer() -> DkimSigner:
    none = serialization.NoEncryption()
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none
    )
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, none
    )
    return DkimSigner("clara.example", "s2022", rsa_pem, "ed2022", ed_pem)


def _children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children() if p.pid is not None}


def test_signs_in_another_process_as_here(signer: DkimSigner) -> None:
    before = _children()
    process = SigningProcess(signer)
    try:
        made = asyncio.run(process.sign(DIGESTS))
        assert _children() - before, "no signing process was started"
    finally:
        process.close()
    assert made == signer.sign_digests(DIGESTS)
    assert [len(s) for s in made[:2]] == [256, 64]  # RSA-2048, then Ed25519
    assert not _children() - before, "the signing process outlived close()"


def test_a_dead_signing_process_signs_here_instead(signer: DkimSigner) -> None:
    before = _children()
    process = SigningProcess(signer)
    try:
        first = asyncio.run(process.sign(DIGESTS[:2]))
        (pid,) = _children() - before
        os.kill(pid, signal.SIGKILL)
        again = asyncio.run(process.sign(DIGESTS))
    finally:
        process.close()
    assert first == signer.sign_digests(DIGESTS[:2])
    assert again == signer.sign_digests(DIGESTS)


def test_no_process_to_be_had_signs_here(
    signer: DkimSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The system refuses a new process (EAGAIN, as at a process limit): the sender
    signs on a thread, the same bytes, instead of stopping."""
    import concurrent.futures

    from clara_mailer.sending import signing

    class Refused(concurrent.futures.ProcessPoolExecutor):
        def submit(self, *args: object, **kwargs: object) -> concurrent.futures.Future[object]:
            raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(signing, "ProcessPoolExecutor", Refused)
    process = SigningProcess(signer)
    try:
        assert asyncio.run(process.sign(DIGESTS)) == signer.sign_digests(DIGESTS)
    finally:
        process.close()


SENDER = """
import asyncio, multiprocessing, os, sys, time
from clara_mailer.compose.dkim import DkimSigner
from clara_mailer.sending.signing import SigningProcess

if __name__ == "__main__":
    key = open(sys.argv[1], "rb").read()
    process = SigningProcess(DkimSigner("clara.example", "s2022", key))
    asyncio.run(process.sign([bytes(32)]))
    (child,) = multiprocessing.active_children()
    print(child.pid, flush=True)
    time.sleep(60)
"""


def test_the_signing_process_dies_with_the_sender(signer: DkimSigner, tmp_path: Path) -> None:
    """kill -9 of the sender: its signing process must not live on."""
    key = tmp_path / "dkim.pem"
    key.write_bytes(signer.private_key)
    script = tmp_path / "sender.py"
    script.write_text(SENDER)
    sender = subprocess.Popen(
        [sys.executable, str(script), str(key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # its resource tracker's notes on the kill
        text=True,
    )
    try:
        assert sender.stdout is not None
        child = int(sender.stdout.readline())
        os.kill(child, 0)  # alive while the sender is
        sender.kill()
        sender.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"signing process {child} outlived its sender")
    finally:
        sender.kill()
        sender.wait(10)
        if sender.stdout is not None:
            sender.stdout.close()
