"""Registry listings (tags/list, _catalog) as data: parse, keep only some names, move the cursor.

Pure functions: the handler reads the upstream body and decides what the caller may see.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable
from urllib.parse import parse_qsl, urlencode

__all__ = ["read_listing", "with_names", "cursor", "with_cursor"]


def read_listing(body: bytes, key: str) -> tuple[dict[str, Any], list[str]] | None:
    """A registry listing (tags/list, _catalog) and its names under `key`; None if it is not one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    value = data.get(key)
    if value is None:
        return data, []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return data, value


def with_names(data: dict[str, Any], key: str, names: Iterable[str]) -> bytes:
    """The listing `data` (as parsed by read_listing) with only `names` under `key`."""
    data[key] = list(names)
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


_LINK_TARGET = re.compile(rb"<(?:[a-z]+://[^/>]*)?(/[^>]*)>")


def cursor(link: bytes) -> tuple[bytes, str] | None:
    """(target, last) of a registry Link header's next page, if it has a `last=`."""
    m = _LINK_TARGET.search(link)
    if m is None:
        return None
    target = m.group(1)
    for key, value in parse_qsl(target.partition(b"?")[2].decode("latin-1")):
        if key == "last":
            return target, value
    return None


def with_cursor(link: bytes, last: str) -> bytes:
    m = _LINK_TARGET.search(link)
    assert m is not None
    path, _, query = m.group(1).partition(b"?")
    params = [(k, last if k == "last" else v) for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    target = path + b"?" + urlencode(params).encode("ascii")
    return link[: m.start(1)] + target + link[m.end(1) :]
