"""`_catalog` from the ECR API (registry.catalog): merge, sort, filter, paginate, failures, and the handler hook."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from ecr_twisted.access.gate import AccessConfig, Gate
from ecr_twisted.access.policy import FixedPolicy, Policy
from ecr_twisted.registry.catalog import (
    MAX_ENTRIES,
    Answer,
    Catalog,
    CatalogError,
    Pagination,
    Source,
    merge,
    paginate,
    pagination,
    warning_value,
)
from ecr_twisted.testing.doubles import Harness


def names(*values: str) -> Callable[[], Deferred[list[str]]]:
    return lambda: succeed(list(values))


def failing(err: Exception) -> Callable[[], Deferred[list[str]]]:
    return lambda: fail(err)


def result(d: Deferred[Answer]) -> Answer:
    out: list[Answer] = []
    d.addCallback(out.append)
    assert out, "the answer is not ready"
    return out[0]


def ask(catalog: Catalog, target: bytes = b"/v2/_catalog", keep: Any = None) -> Answer:
    return result(catalog.answer(target, keep))


def field(answer: Answer, name: bytes) -> list[bytes]:
    return [v for n, v in answer.fields if n.lower() == name.lower()]


def repos(answer: Answer) -> list[str]:
    assert field(answer, b"content-type") == [b"application/json"]
    body = json.loads(answer.body)
    assert list(body) == ["repositories"]
    return list(body["repositories"])


def error(answer: Answer) -> dict[str, str]:
    (entry,) = json.loads(answer.body)["errors"]
    return dict(entry)


TWO = [Source("prod", names("web", "api"), "prod"), Source("", names("zeta", "alpha", "prod-x"), "default")]


# -- merge and sort
def test_public_names_are_merged_across_upstreams_and_sorted_lexically() -> None:
    a = ask(Catalog(TWO))
    assert a.status == 200
    assert a.body == b'{"repositories":["alpha","prod-x","prod/api","prod/web","zeta"]}'
    assert field(a, b"link") == [] and field(a, b"warning") == []


def test_plain_tuples_are_sources_and_a_shadowed_name_is_listed_once() -> None:
    # the default upstream's "team/x" and prefix team's "x" are one public name
    a = ask(Catalog([("team", names("x")), ("", names("team/x", "B", "a"))]))
    assert repos(a) == ["B", "a", "team/x"]  # code point order: upper case first


def test_merge_is_a_pure_function() -> None:
    assert merge([("n", ["b", "a"]), ("", ["n/a", "c"])]) == ["c", "n/a", "n/b"]


def test_no_source_gives_an_empty_catalog() -> None:
    a = ask(Catalog([]))
    assert (a.status, a.body) == (200, b'{"repositories":[]}')


# -- the policy's filter
def test_a_filter_keeps_only_what_the_caller_may_see() -> None:
    a = ask(Catalog(TWO), keep=lambda ns: [n for n in ns if n.startswith("prod/")])
    assert repos(a) == ["prod/api", "prod/web"]


def test_a_filter_answering_later_is_waited_for() -> None:
    pending: Deferred[list[str]] = Deferred()
    seen: list[list[str]] = []

    def keep(ns: list[str]) -> Deferred[list[str]]:
        seen.append(ns)
        return pending

    d = Catalog(TWO).answer(b"/v2/_catalog?n=1", keep)
    out: list[Answer] = []
    d.addCallback(out.append)
    assert not out and seen == [["alpha", "prod-x", "prod/api", "prod/web", "zeta"]]
    pending.callback(["zeta", "prod/web", "alpha"])
    (a,) = out
    assert repos(a) == ["alpha"]
    assert field(a, b"link") == [b'</v2/_catalog?last=alpha&n=1>; rel="next"']


def test_pages_are_cut_after_filtering_so_a_cursor_never_names_a_hidden_repository() -> None:
    keep = lambda ns: [n for n in ns if n != "prod-x"]  # noqa: E731
    a = ask(Catalog(TWO), b"/v2/_catalog?n=2", keep)
    assert repos(a) == ["alpha", "prod/api"]
    assert field(a, b"link") == [b'</v2/_catalog?last=prod%2Fapi&n=2>; rel="next"']


# -- pagination
ALL = ["alpha", "prod-x", "prod/api", "prod/web", "zeta"]


@pytest.mark.parametrize(
    ("query", "shown", "link"),
    [
        ("", ALL, None),
        ("n=", ALL, None),  # empty n: as if absent
        ("n=0", [], None),
        ("n=0&last=alpha", [], None),
        ("n=2", ["alpha", "prod-x"], "last=prod-x&n=2"),
        ("n=2&last=prod-x", ["prod/api", "prod/web"], "last=prod%2Fweb&n=2"),
        ("last=prod%2Fweb&n=2", ["zeta"], None),
        ("n=5", ALL, None),  # exactly all: nothing remains, no Link
        ("n=4", ALL[:4], "last=prod%2Fweb&n=4"),
        ("n=100", ALL, None),
        ("last=zeta", [], None),
        ("last=zzz&n=3", [], None),
        ("last=b", ["prod-x", "prod/api", "prod/web", "zeta"], None),  # a cursor between names
        ("last=", ALL, None),
        ("n=2&n=9", ["alpha", "prod-x"], "last=prod-x&n=2"),  # the first n counts
        ("n=007", ALL, None),
    ],
)
def test_pagination_follows_the_distribution_spec(query: str, shown: list[str], link: str | None) -> None:
    a = ask(Catalog(TWO), b"/v2/_catalog?" + query.encode())
    assert a.status == 200
    assert repos(a) == shown
    expected = [] if link is None else [b"</v2/_catalog?" + link.encode() + b'>; rel="next"']
    assert field(a, b"link") == expected


def test_following_the_links_walks_the_whole_catalog_once() -> None:
    many = [f"r{i:03d}" for i in range(23)]
    catalog = Catalog([Source("", names(*reversed(many)))])
    seen: list[str] = []
    target = b"/v2/_catalog?n=5"
    for _ in range(10):
        a = ask(catalog, target)
        seen += repos(a)
        links = field(a, b"link")
        if not links:
            break
        m = re.fullmatch(rb'<(/v2/_catalog\?[^>]*)>; rel="next"', links[0])
        assert m is not None
        target = m.group(1)
    assert seen == many


def test_without_n_the_page_is_capped_and_links_to_the_rest() -> None:
    catalog = Catalog([Source("", names("a", "b", "c", "d"))], cap=3)
    a = ask(catalog)
    assert repos(a) == ["a", "b", "c"]
    assert field(a, b"link") == [b'</v2/_catalog?last=c&n=3>; rel="next"']
    a = ask(catalog, b"/v2/_catalog?n=1000")  # more than the cap: clamped, not refused
    assert repos(a) == ["a", "b", "c"] and field(a, b"link") == [b'</v2/_catalog?last=c&n=3>; rel="next"']
    assert MAX_ENTRIES == 10000


@pytest.mark.parametrize("n", ["-1", "abc", "1.5", "+3", " 2", "1e3", "%EF%BC%91", "0x10"])
def test_an_invalid_n_is_refused_with_the_pagination_error(n: str) -> None:
    a = ask(Catalog(TWO), b"/v2/_catalog?n=" + n.encode())
    assert a.status == 400
    assert (b"Content-Type", b"application/json; charset=utf-8") in a.fields
    assert error(a)["code"] == "PAGINATION_NUMBER_INVALID"


def test_pagination_and_paginate_are_pure_functions() -> None:
    assert pagination(b"n=3&last=x") == Pagination(3, "x", True)
    assert pagination(b"") == Pagination(MAX_ENTRIES, None, False)
    assert pagination(b"n=-2") is None
    assert paginate(["a", "b"], Pagination(1, None, True)) == (["a"], b'</v2/_catalog?last=a&n=1>; rel="next"')
    assert paginate([], Pagination(3, None, True)) == ([], None)


# -- upstreams failing
def test_one_upstream_failing_leaves_the_others_listed_with_a_warning() -> None:
    catalog = Catalog([
        Source("prod", failing(CatalogError("prod", "DescribeRepositories timed out")), "prod"),
        Source("", names("b", "a")),
    ])
    a = ask(catalog)
    assert a.status == 200 and repos(a) == ["a", "b"]
    assert field(a, b"warning") == [b'199 - "catalog incomplete: upstream prod: listing unavailable"']


def test_a_denied_upstream_among_others_is_a_warning_too() -> None:
    catalog = Catalog([
        Source("shared", failing(CatalogError("shared", "AccessDeniedException", denied=True)), "shared"),
        Source("prod", names("x"), "prod"),
    ])
    a = ask(catalog)
    assert a.status == 200 and repos(a) == ["prod/x"]
    assert field(a, b"warning") == [b'199 - "catalog incomplete: upstream shared: ecr:DescribeRepositories denied"']


def test_every_upstream_denied_says_which_permission_is_missing() -> None:
    catalog = Catalog([
        Source("a", failing(CatalogError("a", "no", denied=True)), "a"),
        Source("b", failing(CatalogError("b", "no", denied=True)), "b"),
    ])
    a = ask(catalog)
    assert a.status == 403
    assert error(a) == {
        "code": "DENIED",
        "message": "requested access to the resource is denied",
        "detail": "the proxy's AWS principal lacks ecr:DescribeRepositories on upstream a, b",
    }


def test_every_upstream_failing_is_unavailable_with_a_retry_after() -> None:
    catalog = Catalog([
        Source("a", failing(CatalogError("a", "no", denied=True)), "a"),
        Source("b", failing(CatalogError("b", "endpoint unreachable")), "b"),
    ])
    a = ask(catalog)
    assert a.status == 503
    assert field(a, b"retry-after") == [b"5"]
    assert error(a)["code"] == "UNAVAILABLE"
    assert error(a)["detail"] == "upstream a: ecr:DescribeRepositories denied; upstream b: listing unavailable"


def test_an_unexpected_exception_counts_as_that_upstream_unavailable(caplog: Any) -> None:
    def boom() -> Deferred[list[str]]:
        raise RuntimeError("secret-ish internals")

    catalog = Catalog([Source("x", boom, "x"), Source("y", failing(KeyError("k")), "y"), Source("", names("a"))])
    a = ask(catalog)
    assert a.status == 200 and repos(a) == ["a"]
    assert field(a, b"warning") == [
        b'199 - "catalog incomplete: upstream x: listing unavailable"',
        b'199 - "catalog incomplete: upstream y: listing unavailable"',
    ]
    assert b"internals" not in b"".join(v for _, v in a.fields) + a.body


def test_all_sources_are_asked_at_once() -> None:
    asked: list[str] = []
    pending = {k: Deferred[list[str]]() for k in ("a", "b")}

    def source(k: str) -> Callable[[], Deferred[list[str]]]:
        def start() -> Deferred[list[str]]:
            asked.append(k)
            return pending[k]

        return start

    d = Catalog([Source("a", source("a")), Source("b", source("b"))]).answer(b"/v2/_catalog")
    assert asked == ["a", "b"]
    pending["b"].callback(["y"])
    pending["a"].callback(["x"])
    assert repos(result(d)) == ["a/x", "b/y"]


def test_a_warning_text_cannot_break_out_of_its_quotes() -> None:
    value = warning_value("u", 'a "quoted"\\ \r\nthing\u00e9')
    assert value == b'199 - "catalog incomplete: upstream u: a ?quoted?? ??thing?"'


# -- the handler hook
HOST = b"registry.example.com"


def get(h: Harness, target: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    proto, transport = h.client()
    proto.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {n.lower(): v for n, _, v in (line.partition(b": ") for line in lines[1:])}
    assert int(fields[b"content-length"]) == len(body)
    return int(lines[0].split(b" ")[1]), fields, body


def test_the_handler_answers_catalog_from_the_catalog_without_asking_the_registry() -> None:
    h = Harness()
    try:
        h.handler.catalog = Catalog(TWO)
        status, fields, body = get(h, b"/v2/_catalog?n=2")
        assert status == 200
        assert body == b'{"repositories":["alpha","prod-x"]}'
        assert fields[b"link"] == b'</v2/_catalog?last=prod-x&n=2>; rel="next"'
        assert fields[b"content-type"] == b"application/json"
        assert h.upstreams.connections == []
        assert h.sample("ecrproxy_requests_total", {"method": "GET", "route": "catalog", "status": "200"}) == 1
    finally:
        h.close()


def test_the_handler_passes_the_gates_listing_filter() -> None:
    policy = '[[rule]]\nprincipals = ["*"]\nrepositories = ["*"]\nactions = ["pull"]\n'

    def gate(h: Harness) -> Gate:
        config = AccessConfig(mode="none", exclude=re.compile(r"prod/.*"), service="registry.example.com")
        return Gate(config, FixedPolicy(Policy.from_toml(policy)), h.reactor, metrics=h.access)

    h = Harness(gate=gate)
    try:
        h.handler.catalog = Catalog(TWO)
        status, _, body = get(h, b"/v2/_catalog")
        assert status == 200
        assert body == b'{"repositories":["alpha","prod-x","zeta"]}'
    finally:
        h.close()


def test_the_handler_writes_an_error_answer_as_is() -> None:
    h = Harness()
    try:
        h.handler.catalog = Catalog(TWO)
        status, fields, body = get(h, b"/v2/_catalog?n=x")
        assert status == 400 and json.loads(body)["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
    finally:
        h.close()


def test_passthrough_never_answers_from_the_proxys_own_principal() -> None:
    from ecr_twisted.registry.handler import ProxyConfig
    from ecr_twisted.testing.doubles import UPSTREAM

    h = Harness(ProxyConfig(upstream=UPSTREAM, passthrough=True))
    try:
        h.handler.catalog = Catalog(TWO)
        proto, transport = h.client()
        proto.dataReceived(b"GET /v2/_catalog HTTP/1.1\r\nHost: " + HOST + b"\r\nAuthorization: Basic QVdTOng=\r\n\r\n")
        assert transport.value() == b""  # went upstream with the client's credentials
        assert len(h.upstreams.connections) == 1
    finally:
        h.close()


def test_adapted_turns_the_ecr_helpers_exceptions_into_catalog_errors() -> None:
    from ecr_twisted.registry.catalog import adapted

    class Denied(Exception):
        def __init__(self, upstream: str, message: str) -> None:
            super().__init__(upstream, message)
            self.message = message

    class Unavailable(Exception):
        pass

    def source(err: Exception) -> Source:
        names = adapted(failing(err), "u-" + type(err).__name__, (Denied,), (Unavailable,))
        return Source(type(err).__name__, names, "u-" + type(err).__name__)

    a = ask(Catalog([source(Denied("x", "AccessDeniedException")), source(Unavailable("timed out")),
                     Source("", adapted(names("ok"), "default", (Denied,)))]))
    assert a.status == 200 and repos(a) == ["ok"]
    assert field(a, b"warning") == [
        b'199 - "catalog incomplete: upstream u-Denied: ecr:DescribeRepositories denied"',
        b'199 - "catalog incomplete: upstream u-Unavailable: listing unavailable"',
    ]
    a = ask(Catalog([source(Denied("x", "AccessDeniedException"))]))
    assert a.status == 403 and "ecr:DescribeRepositories on upstream u-Denied" in error(a)["detail"]
    a = ask(Catalog([source(Unavailable("timed out"))]))
    assert a.status == 503
