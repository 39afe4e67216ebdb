"""Range arithmetic for answers from the cache: which bytes of a stored blob a `Range` header asks for.

Kept apart from the store (which knows files, not HTTP) and from the cache's decisions (which
only need the outcome), so the RFC 9110 rules live, and are tested, in one place.
"""

from __future__ import annotations

import re
from typing import Final, Literal

__all__ = ["UNSATISFIABLE", "parse_range"]

_RANGE = re.compile(rb"bytes=(\d*)-(\d*)\Z")
UNSATISFIABLE: Final = "unsatisfiable"


def parse_range(value: bytes | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """The one byte range (first, last inclusive) a `Range` header asks of `size` bytes.

    None: serve the whole blob (no header, a unit other than bytes, several ranges, or
    nonsense, all of which RFC 9110 lets a server ignore). UNSATISFIABLE: answer 416."""
    if value is None:
        return None
    m = _RANGE.match(value.strip())
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        n = int(last)  # a suffix: the last n bytes
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    return start, min(int(last), size - 1) if last else size - 1
