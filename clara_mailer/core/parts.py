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


class PartCache(Generic[T]):
    """``make(part)``, kept for parts of ``smallest`` bytes or more, ``most`` of them
    (all forgotten when full: a campaign has a few dozen variants)."""

    def __init__(self, make: Callable[[bytes], T], *, smallest: int = 1024, most: int = 256):
        self.make, self.smallest, self.most = make, smallest, most
        self._made: dict[bytes, T] = {}

    def __call__(self, part: bytes) -> T:
        if len(part) < self.smallest:
            return self.make(part)
        try:
            return self._made[part]
        except KeyError:
            made = self.make(part)
            if len(self._made) >= self.most:
                self._made.clear()
            self._made[part] = made
            return made

    def __len__(self) -> int:
        return len(self._made)
