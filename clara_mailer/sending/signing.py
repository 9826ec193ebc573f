"""DKIM's private-key step in a process of its own, beside the sender.

The sender prepares each message's signature on its event loop (``DkimSigner.unsigned``:
the canonical headers and the body hash) and hands only the 32-byte digests to this
process, which returns the RSA (and Ed25519) signatures: about 0.26 ms a message for
RSA-2048, on the other core. On a thread of the sender the same work competed with the
event loop for the GIL at every message, and whole messages through a pipe cost more
than they saved: 0.22x smtp-source either way, against 0.25x wanted.

The process dies with the sender (``die_with_parent``, as helper workers do). If it
cannot start or dies, the sender signs on a thread of its own instead, slower but the
same bytes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from clara_mailer.compose.dkim import DkimSigner
from clara_mailer.sending.processes import die_with_parent

_SIGNER: DkimSigner | None = None  # in the signing process: the keys, loaded once


def _start(parent: int, fields: tuple[str, str, bytes, str | None, bytes | None]) -> None:
    global _SIGNER
    die_with_parent(parent)
    _SIGNER = DkimSigner(*fields)
    _SIGNER.sign_digests([])  # load the keys now, not at the first group


def _sign(digests: list[bytes]) -> list[bytes]:
    assert _SIGNER is not None, "the signing process was not started"
    return _SIGNER.sign_digests(digests)


class SigningProcess:
    """Signs digests with ``signer``'s keys in one process started at once (spawned: the
    sender has threads, so it is never forked)."""

    def __init__(self, signer: DkimSigner) -> None:
        self.signer = signer
        fields = (
            signer.domain,
            signer.selector,
            signer.private_key,
            signer.ed25519_selector,
            signer.ed25519_key,
        )
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start,
            initargs=(os.getpid(), fields),
        )
        # Started now, so the interpreter's start overlaps the first claim and render.
        try:
            self._pool.submit(_sign, [])
        except (OSError, BrokenProcessPool):  # no process to be had: sign on a thread
            self._pool.shutdown(wait=False)
            self._pool = None

    async def sign(self, digests: Sequence[bytes]) -> list[bytes]:
        """``DkimSigner.sign_digests`` of ``digests``, made in the signing process (or on
        a thread here, if that process could not start or has died)."""
        loop = asyncio.get_running_loop()
        if self._pool is not None:
            try:
                return await loop.run_in_executor(self._pool, _sign, list(digests))
            except BrokenProcessPool:
                self._pool.shutdown(wait=False)
                self._pool = None
        return await loop.run_in_executor(None, self.signer.sign_digests, digests)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
