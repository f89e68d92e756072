"""Identifiers."""

import os
import time
import uuid


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562, version 7): 48 bits of Unix time in milliseconds, then random.

    New keys of a busy table land next to each other at the end of its indexes instead of on random
    pages all over them (as version 4 keys do), so inserting one touches pages already in memory.
    """
    value = (time.time_ns() // 1_000_000 & (1 << 48) - 1) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return uuid.UUID(int=value)
