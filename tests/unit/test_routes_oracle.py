"""Differential test of `routes.match` against the regex implementation it replaced.

`match` dispatches on the path's fixed parts and matches the name grammar once; the oracle
below is the previous code, kept verbatim: every route pattern of `ROUTES` tried in order.
Both must give equal `Match` values for any method and path.
"""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from ecr_twisted.registry import routes
from ecr_twisted.registry.routes import MAX_NAME, NAME, NOT_FOUND, ROUTES, Match

_NAME = re.compile(NAME.encode())
_SHAPED = re.compile(rb"/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)/")


def oracle(method: bytes, path: bytes) -> Match:
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


D = b"sha256:" + b"a" * 64
_PIECES = st.sampled_from(
    [b"/v2/", b"/v2", b"/", b"//", b"a", b"app", b"team", b"a.b", b"a__b", b"a___b", b"a--b", b"-a", b"A", b"0",
     b"manifests", b"/manifests/", b"blobs", b"/blobs/", b"uploads", b"/blobs/uploads/", b"/uploads/", b"tags",
     b"/tags/list", b"list", b"/referrers/", b"referrers", b"_catalog", b"latest", b"v1.2", b"_x", b".x",
     D, b"sha256:", b"sha256:abc", b"sha256+x.y:" + b"Z=_-" * 8, b"x" * 130, b"a" * 256, b"a" * 250, b"%2F", b"..",
     b":", b"=", b"\n", b"\xff", b"?", b"~"]
)
_METHODS = st.sampled_from([b"GET", b"HEAD", b"PUT", b"POST", b"PATCH", b"DELETE", b"OPTIONS"])


@st.composite
def paths(draw: st.DrawFn) -> bytes:
    head = draw(st.sampled_from([b"/v2/", b"/v2/", b"/v2/", b"", b"/v1/"]))
    return head + b"".join(draw(st.lists(_PIECES | st.binary(max_size=4), max_size=8)))


@st.composite
def api_paths(draw: st.DrawFn) -> bytes:
    component = st.from_regex(rb"\A[a-z0-9]{1,3}(?:(?:\.|_|__|-+)[a-z0-9]{1,2}){0,2}\Z")
    name = b"/".join(draw(st.lists(component | _PIECES, min_size=1, max_size=4)))
    tail = draw(st.sampled_from([
        b"/tags/list", b"/manifests/", b"/blobs/uploads/", b"/blobs/", b"/referrers/", b"/manifests/latest",
        b"/manifests/" + D, b"/blobs/" + D, b"/referrers/" + D, b"/blobs/uploads/0a-b=c.d", b"/blobs/uploads/a/b",
    ]))
    return b"/v2/" + name + tail + draw(st.sampled_from([b"", b"", b"x", b"/", D]))


@settings(max_examples=1500, deadline=None)
@given(_METHODS, paths() | api_paths())
@example(b"GET", b"/v2/")
@example(b"POST", b"/v2/")
@example(b"GET", b"/v2/_catalog")
@example(b"GET", b"/v2/manifests/x")
@example(b"GET", b"/v2/a/manifests/manifests/x")
@example(b"GET", b"/v2/a/blobs/uploads/blobs/" + D)
@example(b"POST", b"/v2/a/blobs/uploads/blobs/uploads/")
@example(b"GET", b"/v2//tags/list")
@example(b"GET", b"/v2/tags/list")
@example(b"GET", b"/v2/a/tags/list/tags/list")
@example(b"GET", b"/v2/" + b"a" * 256 + b"/manifests/x")
@example(b"PUT", b"/v2/" + b"a" * 255 + b"/manifests/x")
@example(b"GET", b"/v2/a\n/manifests/x")
def test_match_agrees_with_the_route_patterns(method: bytes, path: bytes) -> None:
    assert routes.match(method, path) == oracle(method, path)


def test_known_paths_agree() -> None:
    for method in (b"GET", b"HEAD", b"PUT", b"POST", b"PATCH", b"DELETE"):
        for path in (b"/v2/bench/small/manifests/v1", b"/v2/a/blobs/" + D, b"/v2/a/b/tags/list",
                     b"/v2/a/blobs/uploads/", b"/v2/a/blobs/uploads/u-1", b"/v2/a/referrers/" + D):
            got = routes.match(method, path)
            assert got == oracle(method, path) and got.route is not None
