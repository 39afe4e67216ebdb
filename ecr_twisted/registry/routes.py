"""The registry API as data: which paths exist, what they are, and which methods they take.

Patterns follow CNCF distribution's reference grammar (repository name components,
tags, digests); anything else under /v2/ is refused before it reaches ECR.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

# A path shaped like an API call whose name part fails the grammar.
_NAME = re.compile(NAME.encode())
_SHAPED = re.compile(rb"/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)/")


@dataclass(frozen=True)
class Match:
    route: Route | None
    name: str | None = None
    reference: str | None = None
    digest: str | None = None
    error: str | None = None  # "not_found", "method", "name"


NOT_FOUND = Match(None, error="not_found")


def valid_name(name: str) -> bool:
    """A repository name by the registry grammar (for names that arrive outside the path)."""
    return len(name) <= MAX_NAME and _NAME.fullmatch(name.encode("ascii", "replace")) is not None


def match(method: bytes, path: bytes) -> Match:
    """Classify a request path (no query string)."""
    if not path.startswith(b"/v2/"):
        return NOT_FOUND
    for route in ROUTES:
        m = route.pattern.match(path)
        if m is None:
            continue
        groups = m.groupdict()
        name = groups.get("name")
        if name is not None and len(name) > MAX_NAME:
            return Match(route, error="name")
        if method not in route.methods:
            return Match(route, error="method")
        return Match(
            route,
            name=name.decode("ascii") if name else None,
            reference=groups["reference"].decode("ascii") if groups.get("reference") else None,
            digest=groups["digest"].decode("ascii") if groups.get("digest") else None,
        )
    shaped = _SHAPED.match(path)
    if shaped is not None and _NAME.fullmatch(shaped.group("name")) is None:
        return Match(None, error="name")
    return NOT_FOUND
