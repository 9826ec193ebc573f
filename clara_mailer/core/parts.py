"""What is made of a message's large parts, made once.

The renderer gives each message as parts (``compose.render.Renderer.render_parts``); the
parts every message of a variant shares are the same objects each time. DKIM's relaxed
body (``compose.dkim``) and the wire's checks and dot-stuffing (``transport.base``) are
made of each such part once, then looked up: a dictionary lookup finds the same object at
once, by identity, and a bytes object keeps its hash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

_MISSING = object()


class PartCache(Generic[T]):
    """``make(part)``, kept for parts of ``smallest`` bytes or more that come back, at
    most ``most`` of them (all forgotten when full: a campaign has a few dozen variants).

    A part is kept the second time it is seen: each message's own parts (its header, the
    lines with its fields) come once and are only noted, by their hash, so they never
    crowd out the shared ones (before, the cache filled with them and was emptied every
    few hundred messages, and the shared ~38 kB were made again)."""

    def __init__(self, make: Callable[[bytes], T], *, smallest: int = 1024, most: int = 256):
        self.make, self.smallest, self.most = make, smallest, most
        self._made: dict[bytes, T] = {}
        self._seen: set[int] = set()  # hashes of parts seen once

    def __call__(self, part: bytes) -> T:
        if len(part) < self.smallest:
            return self.make(part)
        found = self._made.get(part, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        made = self.make(part)
        key = hash(part)
        if key in self._seen:
            if len(self._made) >= self.most:
                self._made.clear()
            self._made[part] = made
        else:
            if len(self._seen) >= 16 * self.most:
                self._seen.clear()
            self._seen.add(key)
        return made

    def __len__(self) -> int:
        return len(self._made)
