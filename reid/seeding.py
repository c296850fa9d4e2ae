"""Seeds that are identical in every process for the same inputs (Python's hash() is not)."""

from __future__ import annotations

import zlib


def stable_seed(*parts: object) -> int:
    """A 31-bit seed derived from the parts' text, e.g. (run seed, site name, round)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF
