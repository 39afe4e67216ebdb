"""The registry API as data: which paths exist, what they are, and which methods they take.

Patterns follow CNCF distribution's reference grammar (repository name components,
tags, digests); anything else under /v2/ is refused before it reaches ECR.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "Route", "Match", "ROUTES", "NOT_FOUND", "match", "valid_name",
    "NAME", "TAG", "DIGEST", "REFERENCE", "UPLOAD_ID", "MAX_NAME",
    "BASE", "MANIFEST", "BLOB", "UPLOAD", "TAGS", "CATALOG", "REFERRERS", "OTHER",
]

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME = rf"{_COMPONENT}(?:/{_COMPONENT})*"
TAG = r"[\w][\w.-]{0,127}"
DIGEST = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}"
REFERENCE = rf"(?:{TAG}|{DIGEST})"
UPLOAD_ID = r"[a-zA-Z0-9._=-]+"
MAX_NAME = 255

# route kinds, also the metric label values
BASE = "base"
MANIFEST = "manifest"
BLOB = "blob"
UPLOAD = "upload"
TAGS = "tags"
CATALOG = "catalog"
REFERRERS = "referrers"
OTHER = "other"


@dataclass(frozen=True)
class Route:
    kind: str
    pattern: re.Pattern[bytes]
    methods: frozenset[bytes]


def _r(kind: str, regex: str, *methods: str) -> Route:
    return Route(kind, re.compile(regex.encode()), frozenset(m.encode() for m in methods))


ROUTES: tuple[Route, ...] = (
    _r(BASE, r"/v2/\Z", "GET", "HEAD"),
    _r(CATALOG, r"/v2/_catalog\Z", "GET"),
    _r(TAGS, rf"/v2/(?P<name>{NAME})/tags/list\Z", "GET"),
    _r(MANIFEST, rf"/v2/(?P<name>{NAME})/manifests/(?P<reference>{REFERENCE})\Z", "GET", "HEAD", "PUT", "DELETE"),
    _r(UPLOAD, rf"/v2/(?P<name>{NAME})/blobs/uploads/\Z", "POST"),
    _r(UPLOAD, rf"/v2/(?P<name>{NAME})/blobs/uploads/(?P<upload>{UPLOAD_ID})\Z", "GET", "PATCH", "PUT", "DELETE"),
    _r(BLOB, rf"/v2/(?P<name>{NAME})/blobs/(?P<digest>{DIGEST})\Z", "GET", "HEAD", "DELETE"),
    _r(REFERRERS, rf"/v2/(?P<name>{NAME})/referrers/(?P<digest>{DIGEST})\Z", "GET"),
)
"""The API, in the order paths are tried (the first that matches wins); `match` gives the same
answers without running these patterns: they document the grammar and are the tests' oracle."""

# A path shaped like an API call whose name part fails the grammar.
_NAME = re.compile(NAME.encode())
_SHAPED = re.compile(rb"/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)/")
_REFERENCE = re.compile(REFERENCE.encode())
_DIGEST = re.compile(DIGEST.encode())
_UPLOAD_ID = re.compile(UPLOAD_ID.encode())
_BASE, _CATALOG, _TAGS, _MANIFEST, _UPLOAD_START, _UPLOAD_ID_ROUTE, _BLOB, _REFERRERS = ROUTES


class Match(NamedTuple):
    """What a path is; a tuple, so building one per request is cheap and it cannot change."""

    route: Route | None
    name: str | None = None
    reference: str | None = None
    digest: str | None = None
    error: str | None = None  # "not_found", "method", "name"


NOT_FOUND = Match(None, error="not_found")


def valid_name(name: str) -> bool:
    """A repository name by the registry grammar (for names that arrive outside the path)."""
    return len(name) <= MAX_NAME and _NAME.fullmatch(name.encode("ascii", "replace")) is not None


def _split(path: bytes, sep: bytes, tail: re.Pattern[bytes] | None) -> tuple[bytes, bytes] | None:
    """(name, what follows `sep`) when `path` is /v2/<name><sep><tail> by the grammar.

    The last `sep` is the only place to split: no tail (reference, digest, upload id) can
    hold a "/", and every `sep` ends in one."""
    at = path.rfind(sep)
    if at < 5:  # the name needs at least one byte after "/v2/"
        return None
    rest = path[at + len(sep) :]
    if tail is None:
        if rest:
            return None
    elif tail.fullmatch(rest) is None:
        return None
    name = path[4:at]
    if _NAME.fullmatch(name) is None:
        return None
    return name, rest


def _found(route: Route, method: bytes, name: bytes, reference: bytes = b"", digest: bytes = b"") -> Match:
    if len(name) > MAX_NAME:
        return Match(route, error="name")
    if method not in route.methods:
        return Match(route, error="method")
    return Match(route, name.decode("ascii"), reference.decode("ascii") or None, digest.decode("ascii") or None)


def match(method: bytes, path: bytes) -> Match:
    """Classify a request path (no query string).

    The routes of ROUTES, tried in order, each only when the path holds its fixed part: a
    request costs a substring test or two and one match of the name grammar, not up to
    eight patterns run over the whole path."""
    if not path.startswith(b"/v2/"):
        return NOT_FOUND
    if len(path) == 4 or path == b"/v2/_catalog":
        route = _BASE if len(path) == 4 else _CATALOG
        return Match(route) if method in route.methods else Match(route, error="method")
    if path.endswith(b"/tags/list"):
        found = _split(path, b"/tags/list", None)
        if found is not None:
            return _found(_TAGS, method, found[0])
    if b"/manifests/" in path:
        found = _split(path, b"/manifests/", _REFERENCE)
        if found is not None:
            return _found(_MANIFEST, method, found[0], reference=found[1])
    if b"/blobs/" in path:
        if b"/blobs/uploads/" in path:
            found = _split(path, b"/blobs/uploads/", None)
            if found is not None:
                return _found(_UPLOAD_START, method, found[0])
            found = _split(path, b"/blobs/uploads/", _UPLOAD_ID)
            if found is not None:
                return _found(_UPLOAD_ID_ROUTE, method, found[0])
        found = _split(path, b"/blobs/", _DIGEST)
        if found is not None:
            return _found(_BLOB, method, found[0], digest=found[1])
    if b"/referrers/" in path:
        found = _split(path, b"/referrers/", _DIGEST)
        if found is not None:
            return _found(_REFERRERS, method, found[0], digest=found[1])
    shaped = _SHAPED.match(path)
    if shaped is not None and _NAME.fullmatch(shaped.group("name")) is None:
        return Match(None, error="name")
    return NOT_FOUND
