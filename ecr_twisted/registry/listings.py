"""Registry listings (tags/list, _catalog) as data: parse, keep only some names, move the cursor.

The policy may hide tags or repositories from a caller, so a listing the gate marked is read
whole and rewritten. What to do with one upstream page is decided here, as a value: the
`Page` to show, or the `NextPage` to fetch instead when nothing on this one may be shown and
its cursor would name a hidden entry. The handler reads the body (bounded), acts on the value
and counts the pages; nothing here does I/O (the filter itself may wait for a webhook).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable
from urllib.parse import parse_qsl, urlencode

from twisted.internet.defer import Deferred

from ecr_twisted.registry import routes

__all__ = [
    "KEYS", "Page", "NextPage", "Filter",
    "filtered", "page", "read_listing", "with_names", "cursor", "with_cursor", "renamed",
]

KEYS = {routes.TAGS: "tags", routes.CATALOG: "repositories"}  # where each listing holds its names

Fields = list[tuple[bytes, bytes]]
Filter = Callable[[list[str]], "list[str] | Deferred[list[str]]"]  # the names the caller may see


@dataclass(frozen=True, slots=True)
class Page:
    """Answer the client with this listing (200)."""

    fields: Fields
    body: bytes


@dataclass(frozen=True, slots=True)
class NextPage:
    """Nothing on this page may be shown and its cursor names a hidden entry: ask the upstream for
    `target` rather than hand out that name; `last_resort` is the answer once too many were skipped."""

    target: bytes
    last_resort: Page


async def filtered(body: bytes, fields: Fields, key: str, keep: Filter) -> Page | NextPage | None:
    """What to make of one upstream page (`fields`: the response fields as the client would get
    them). None: the body is not a listing."""
    parsed = read_listing(body, key)
    if parsed is None:
        return None
    data, names = parsed
    kept = keep(names)
    if isinstance(kept, Deferred):
        kept = await kept
    return page(fields, data, names, kept, key)


def page(fields: Fields, data: dict[str, Any], names: list[str], kept: list[str], key: str) -> Page | NextPage:
    """The page showing only `kept` of `names`, its cursor moved off hidden names (a name-style
    cursor, distribution's; ECR's is opaque). Content-Encoding goes: the body is rewritten."""
    out: Fields = []
    for n, v in fields:
        ln = n.lower()
        if ln == b"link":
            found = cursor(v)
            if found is not None and found[1] in names and found[1] not in kept:
                if not kept:
                    plain = [(n, v) for n, v in fields if n.lower() not in (b"link", b"content-encoding")]
                    return NextPage(found[0], Page(plain, with_names(data, key, [])))
                v = with_cursor(v, kept[-1])
        elif ln == b"content-encoding":
            continue
        out.append((n, v))
    return Page(out, with_names(data, key, kept))


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


def renamed(body: bytes, name: str) -> bytes | None:
    """A tags/list body with its `name` set to `name` (what the client calls the repository when
    the upstream calls it otherwise); None if it is not a JSON object."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if "name" in data:
        data["name"] = name
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
    """The Link header `link` with its `last=` cursor set to `last` (everything else byte for byte)."""
    m = _LINK_TARGET.search(link)
    assert m is not None
    path, _, query = m.group(1).partition(b"?")
    params = [(k, last if k == "last" else v) for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    target = path + b"?" + urlencode(params).encode("ascii")
    return link[: m.start(1)] + target + link[m.end(1) :]
