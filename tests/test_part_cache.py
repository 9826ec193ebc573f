"""The cache of what is made of a message's large parts (``core.parts``)."""

from __future__ import annotations

from clara_mailer.core.parts import PartCache


def test_a_part_is_kept_the_second_time_it_is_seen() -> None:
    """``PartCache`` keeps what recurs (a variant's shared parts), not each message's own
    parts, which come once."""
    made: list[bytes] = []

    def make(part: bytes) -> int:
        made.append(part)
        return len(part)

    cache = PartCache(make, smallest=4, most=8)
    shared = b"shared part" * 10
    assert cache(shared) == len(shared)
    assert len(cache) == 0  # seen once: noted, not kept
    assert cache(shared) == len(shared)
    assert len(cache) == 1  # seen again: kept
    for n in range(100):  # each message's own parts: never kept
        cache(b"own part %d" % n)
    assert len(cache) == 1
    made.clear()
    assert cache(shared) == len(shared)
    assert made == []  # found, not made again
    assert cache(b"abc") == 3 and len(cache) == 1  # below ``smallest``: made each time
