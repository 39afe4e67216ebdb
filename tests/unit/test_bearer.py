"""The registry token flow's decisions (upstreams/bearer.py): challenges, the realm's request,
its answer, and the per-upstream token cache, with the time as an argument."""

from __future__ import annotations

import base64
import json
from typing import Any, Sequence, cast

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

from ecr_twisted.app.build import Keepers, Parts, build
from ecr_twisted.app.config import ProxySettings
from ecr_twisted.ecr.tokens import TokenKeeper
from ecr_twisted.http.origin import Origin
from ecr_twisted.http.server import RelayFactory
from ecr_twisted.observe.accesslog import AccessRecord
from ecr_twisted.testing.doubles import FakeTokenFetcher, MemoryUpstreams
from ecr_twisted.upstreams.bearer import (
    DEFAULT_LIFETIME,
    EXPIRY_MARGIN,
    MAX_LIFETIME,
    MAX_TOKEN_ANSWER,
    MIN_LIFETIME,
    BearerToken,
    Challenge,
    TokenCache,
    bearer_challenge,
    credentials_allowed,
    parse_challenges,
    parse_token_answer,
    realm_allowed,
    request_scope,
    token_target,
)
from ecr_twisted.upstreams.spec import UpstreamSpec

from .test_access import ok
from .test_multi_upstream import MAIN, MAIN_ORIGIN, PROD, PROD_ORIGIN, Multi, answer, auth_of, call
from .test_multi_upstream import token as ecr_token
from .test_multi_upstream import upstream_requests_of

HUB = 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"'


@pytest.mark.parametrize(
    "value, expected",
    [
        (HUB, [("bearer", {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                           "scope": "repository:library/alpine:pull"})]),
        # case-insensitive scheme and names, spaces around '=' and ',', unquoted values
        ('BEARER Realm = "https://a/t" , Service=svc,scope=x', [("bearer", {"realm": "https://a/t", "service": "svc",
                                                                          "scope": "x"})]),
        # commas inside quotes do not split; escapes are undone
        ('Bearer realm="https://a/t",scope="repository:a:pull,push",error="x\\"y\\\\z"',
         [("bearer", {"realm": "https://a/t", "scope": "repository:a:pull,push", "error": 'x"y\\z'})]),
        # several challenges in one value, one with a comma in a quoted realm
        ('Basic realm="x, y", Bearer realm="https://a/t"', [("basic", {"realm": "x, y"}),
                                                            ("bearer", {"realm": "https://a/t"})]),
        # a token68 challenge before a Bearer one
        ('Negotiate abc==, Bearer realm="https://a/t"', [("negotiate", {}), ("bearer", {"realm": "https://a/t"})]),
        ("Bearer", [("bearer", {})]),
        ("", []),
        # a malformed tail does not hide what came before it
        ('Bearer realm="https://a/t" junk', [("bearer", {"realm": "https://a/t"})]),
        ('Bearer realm="https://a/t", "oops"', [("bearer", {"realm": "https://a/t"})]),
        # the first of a repeated param wins
        ('Bearer realm="https://a/t",realm="https://evil/t"', [("bearer", {"realm": "https://a/t"})]),
    ],
)
def test_parse_challenges(value: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    assert parse_challenges(value) == expected


@pytest.mark.parametrize(
    "values, expected",
    [
        ([HUB.encode()], Challenge("https://auth.docker.io/token", "registry.docker.io",
                                   "repository:library/alpine:pull")),
        # ECR Public
        ([b'Bearer realm="https://public.ecr.aws/token/",service="public.ecr.aws",scope="aws"'],
         Challenge("https://public.ecr.aws/token/", "public.ecr.aws", "aws")),
        ([b'Bearer realm="http://127.0.0.1:5001/auth",error="insufficient_scope"'],
         Challenge("http://127.0.0.1:5001/auth", error="insufficient_scope")),
        # a Basic challenge only, or a Bearer one without a realm: nothing to follow
        ([b'Basic realm="registry"'], None),
        ([b'Bearer service="x",scope="y"'], None),
        ([b'Bearer realm=""'], None),
        ([], None),
        # realms that are not http(s) URLs the proxy may ask
        ([b'Bearer realm="file:///etc/passwd"'], None),
        ([b'Bearer realm="ftp://a/t"'], None),
        ([b'Bearer realm="/token"'], None),
        ([b'Bearer realm="https://user:pw@a/t"'], None),
        ([b'Bearer realm="https://a/t#frag"'], None),
        ([b'Bearer realm="https://a:99999/t"'], None),
        ([b'Bearer realm="https://a/t\\"x"'], None),
        ([b'Bearer realm="https://a b/t"'], None),
        # the first usable Bearer challenge, over several header fields
        ([b'Basic realm="r"', b'Bearer realm="gopher://x", Bearer realm="https://b/t",service=s'],
         Challenge("https://b/t", "s")),
    ],
)
def test_bearer_challenge(values: list[bytes], expected: Challenge | None) -> None:
    assert bearer_challenge(values) == expected


@pytest.mark.parametrize(
    "challenge, target",
    [
        (Challenge("https://auth.docker.io/token", "registry.docker.io", "repository:library/alpine:pull"),
         b"/token?service=registry.docker.io&scope=repository:library/alpine:pull"),
        # one scope parameter per scope; a realm's own query kept; a realm without a path
        (Challenge("https://a/t?account=x", "s v", "repository:a:pull,push repository:b:pull"),
         b"/t?account=x&service=s%20v&scope=repository:a:pull,push&scope=repository:b:pull"),
        (Challenge("https://a"), b"/"),
        (Challenge("https://a", scope="registry:catalog:*"), b"/?scope=registry:catalog:*"),
        (Challenge("https://a/t", "s&scope=x"), b"/t?service=s%26scope%3Dx"),
    ],
)
def test_token_target(challenge: Challenge, target: bytes) -> None:
    assert token_target(challenge) == target


def test_credentials_go_in_clear_only_to_a_plain_http_registry() -> None:
    assert credentials_allowed("https://auth/t", "https")
    assert credentials_allowed("https://auth/t", "http")
    assert credentials_allowed("http://auth/t", "http")
    assert not credentials_allowed("http://auth/t", "https")


@pytest.mark.parametrize(
    "realm, registry, allowed",
    [
        ("https://auth.docker.io/token", "registry-1.docker.io", True),
        ("https://public.ecr.aws/token/", "public.ecr.aws", True),
        ("https://10.1.2.3/token", "harbor.internal", True),  # a private network is where mirrors live
        # the cloud's metadata services: never
        ("http://169.254.169.254/latest/meta-data/", "registry.example.com", False),
        ("http://169.254.170.2/v2/credentials", "169.254.170.2", False),
        ("http://[fe80::1]/t", "registry.example.com", False),
        # this machine: only for a registry on this machine
        ("http://127.0.0.1:5001/auth", "127.0.0.1", True),
        ("http://localhost:5001/auth", "::1", True),
        ("http://127.0.0.1:9090/token", "registry.example.com", False),
        ("http://localhost./token", "registry.example.com", False),
        ("http://[::1]/token", "registry.example.com", False),
        # the forms of those addresses the system's resolver accepts too (inet_aton, IPv4-mapped)
        ("http://2852039166/latest/meta-data/", "registry.example.com", False),  # 169.254.169.254
        ("http://0xa9.254.169.254/", "registry.example.com", False),
        ("http://0251.0376.0251.0376/", "registry.example.com", False),
        ("http://169.254.43518/", "registry.example.com", False),
        ("http://127.1/token", "registry.example.com", False),
        ("http://0x7f000001/token", "registry.example.com", False),
        ("http://[::ffff:169.254.169.254]/", "registry.example.com", False),
        ("http://[::ffff:a9fe:a9fe]/", "registry.example.com", False),
        ("http://[::ffff:127.0.0.1]/token", "registry.example.com", False),
        ("http://[fd00:ec2::254]/latest/meta-data/", "registry.example.com", False),  # AWS's IPv6 IMDS
        ("http://[fd00:ec2::23]/", "registry.example.com", False),
        ("http://0.0.0.0/token", "registry.example.com", False),  # connects to this machine
        ("http://0/token", "registry.example.com", False),
        ("http://[::]/token", "registry.example.com", False),
        ("http://auth.localhost/token", "registry.example.com", False),
        # numeric-looking but no address the resolver would take: refused rather than guessed
        ("http://1.2.3.4.5/token", "registry.example.com", False),
        ("http://169.254.169.256/", "registry.example.com", False),
        ("http://example.0x10/token", "registry.example.com", False),
        # this machine spelt otherwise, for a registry on this machine
        ("http://127.1:5001/auth", "127.0.0.1", True),
        ("http://127.0.0.1:5001/auth", "[::ffff:127.0.0.1]", True),
        # names that only look like numbers are names
        ("https://cafe.de/token", "registry.example.com", True),
        ("https://0x7f.example.com/token", "registry.example.com", True),
        ("http://[fd00:ec3::1]/token", "registry.example.com", True),
        ("http://8.8.8.8/token", "registry.example.com", True),
        ("http://134744072/token", "registry.example.com", True),  # 8.8.8.8
    ],
)
def test_realm_allowed(realm: str, registry: str, allowed: bool) -> None:
    assert realm_allowed(realm, registry) is allowed


@pytest.mark.parametrize(
    "body, header, lifetime",
    [
        (b'{"token":"abc.def-ghi_j","expires_in":300}', b"Bearer abc.def-ghi_j", 300.0),
        (b'{"access_token":"xyz=","expires_in":300}', b"Bearer xyz=", 300.0),
        (b'{"token":"t","access_token":"a"}', b"Bearer t", DEFAULT_LIFETIME),
        (b'{"token":"","access_token":"a","expires_in":45.5}', b"Bearer a", 45.5),
        (b'{"token":"t","expires_in":5}', b"Bearer t", MIN_LIFETIME),
        (b'{"token":"t","expires_in":-1}', b"Bearer t", MIN_LIFETIME),
        (b'{"token":"t","expires_in":86400}', b"Bearer t", MAX_LIFETIME),
        (b'{"token":"t","expires_in":"300"}', b"Bearer t", DEFAULT_LIFETIME),
        (b'{"token":"t","expires_in":true}', b"Bearer t", DEFAULT_LIFETIME),
    ],
)
def test_parse_token_answer(body: bytes, header: bytes, lifetime: float) -> None:
    token = parse_token_answer(body, 1000.0)
    assert token == BearerToken(header, 1000.0 + lifetime)
    assert header not in repr(token).encode()


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b'["token"]',
        b'{"token":null}',
        b'{"token":42}',
        b'{"expires_in":60}',
        b'{"token":"two words"}',
        b'{"token":"a\\r\\nX-Evil: 1"}',  # never a header injection
        b'{"token":"\\u00e9"}',
        json.dumps({"token": "a" * (MAX_TOKEN_ANSWER - 12)}).encode(),  # over the bound
        json.dumps({"token": "t", "pad": "x" * MAX_TOKEN_ANSWER}).encode(),
    ],
)
def test_unusable_token_answers(body: bytes) -> None:
    assert parse_token_answer(body, 0.0) is None


@pytest.mark.parametrize(
    "name, method, scope",
    [
        ("library/alpine", b"GET", "repository:library/alpine:pull"),
        ("library/alpine", b"HEAD", "repository:library/alpine:pull"),
        ("team/app", b"POST", "repository:team/app:pull,push"),
        ("team/app", b"PATCH", "repository:team/app:pull,push"),
        ("team/app", b"PUT", "repository:team/app:pull,push"),
        ("team/app", b"DELETE", "repository:team/app:pull,push"),
        (None, b"GET", ""),
    ],
)
def test_request_scope(name: str | None, method: bytes, scope: str) -> None:
    assert request_scope(name, method) == scope


def test_cache_keeps_a_token_per_scope_until_just_before_it_expires() -> None:
    cache = TokenCache()
    assert cache.get("repository:a:pull", 0.0) is None
    cache.put("repository:a:pull", "svc", BearerToken(b"Bearer a", 100.0))
    cache.put("repository:a:pull,push", "svc", BearerToken(b"Bearer ap", 300.0))
    assert cache.get("repository:a:pull", 0.0) == b"Bearer a"
    assert cache.get("repository:a:pull,push", 0.0) == b"Bearer ap"
    assert cache.get("repository:b:pull", 0.0) is None
    assert cache.get("repository:a:pull", 100.0 - EXPIRY_MARGIN - 0.001) == b"Bearer a"
    assert cache.get("repository:a:pull", 100.0 - EXPIRY_MARGIN) is None  # expired: dropped
    assert len(cache) == 1
    assert cache.get("repository:a:pull", 0.0) is None  # gone for good, even at an earlier time
    assert "Bearer" not in repr(cache)


def test_cache_lookups_use_the_service_of_the_last_challenge() -> None:
    cache = TokenCache()
    cache.put("repository:a:pull", "one", BearerToken(b"Bearer 1", 100.0))
    cache.put("repository:a:pull", "two", BearerToken(b"Bearer 2", 100.0))
    assert cache.get("repository:a:pull", 0.0) == b"Bearer 2"
    cache.put("repository:b:pull", "one", BearerToken(b"Bearer b", 100.0))
    assert cache.get("repository:a:pull", 0.0) == b"Bearer 1"
    cache.put("", None, BearerToken(b"Bearer base", 100.0))
    assert (cache.service, cache.get("", 0.0)) == (None, b"Bearer base")


def test_cache_is_bounded_and_drops_the_oldest() -> None:
    cache = TokenCache(max_entries=3)
    for name in "abc":
        cache.put(name, "s", BearerToken(name.encode(), 100.0))
    cache.put("a", "s", BearerToken(b"a2", 100.0))  # replaced: now the newest
    cache.put("d", "s", BearerToken(b"d", 100.0))  # full: b, the oldest, goes
    assert len(cache) == 3
    assert [cache.get(n, 0.0) for n in "abcd"] == [b"a2", None, b"c", b"d"]


def test_cache_drops_a_refused_token_only_if_it_is_still_the_one_kept() -> None:
    cache = TokenCache()
    cache.put("s", "svc", BearerToken(b"Bearer new", 100.0))
    cache.drop("s", b"Bearer old")  # another request already replaced it
    assert cache.get("s", 0.0) == b"Bearer new"
    cache.drop("s", b"Bearer new")
    assert cache.get("s", 0.0) is None
    cache.drop("s", b"Bearer new")  # nothing kept: nothing to do


# ---------------------------------------------------------------------------
# through the proxy: registry upstreams that answer 401 Bearer (the harness of test_multi_upstream)


HUB_ORIGIN = Origin("https", "registry.hub.example")
AUTH_ORIGIN = Origin("https", "auth.hub.example")
REALM = b"https://auth.hub.example/token"
ANON = UpstreamSpec("hub", "registry", url="https://registry.hub.example", credentials="none", prefix="hub")
STATIC = UpstreamSpec("hub", "registry", url="https://registry.hub.example", credentials="static", prefix="hub",
                      username="robot", password="s3cret-pw")
BASIC = b"Basic " + base64.b64encode(b"robot:s3cret-pw")
MANIFEST = b'{"schemaVersion":2}'


class Hub(Multi):
    """`Multi` with a registry-kind upstream (its keeper is StaticTokens: left as built)."""

    def __init__(self, specs: Sequence[UpstreamSpec] = (ANON, MAIN), **settings: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_000_000)
        self.upstreams = MemoryUpstreams(self.reactor)
        parts = Parts(fetchers={s.name: FakeTokenFetcher() for s in specs}, connector=self.upstreams)
        values: dict[str, Any] = {"auth": "none", "region": "eu-west-1", "upstream_connections": 4}
        values.update(settings)
        self.built = build(ProxySettings(upstreams=tuple(specs), **values), self.reactor, parts)
        proxy = self.built.proxy
        self.handler, self.cache, self.pool = proxy.handler, proxy.cache, proxy.pool
        keepers = proxy.keeper
        assert isinstance(keepers, Keepers)
        for name, keeper in keepers.keepers.items():
            if isinstance(keeper, TokenKeeper):
                keeper.current = ecr_token(name, self.reactor.seconds())
                keeper.next_attempt = float("inf")
        factory = self.built.factories[0]
        assert isinstance(factory, RelayFactory)
        self.factory = factory


def challenge(scope: bytes = b"repository:library/alpine:pull", realm: bytes = REALM, error: bytes = b"") -> bytes:
    value = b'Bearer realm="' + realm + b'",service="registry.hub.example",scope="' + scope + b'"'
    if error:
        value += b',error="' + error + b'"'
    return b"WWW-Authenticate: " + value + b"\r\n"


def unauthorized(scope: bytes = b"repository:library/alpine:pull", **kw: Any) -> bytes:
    body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
    return ok(body, b"401 Unauthorized", challenge(scope, **kw) + b"Content-Type: application/json\r\n")


def token_answer(token: bytes = b"tok-1", expires_in: int = 300) -> bytes:
    return ok(b'{"token":"' + token + b'","expires_in":%d,"issued_at":"2026-01-01T00:00:00Z"}' % expires_in)


def news(h: Multi) -> list[tuple[bytes, Any]]:
    """The upstream requests sent since the last call, with their origins (connections are reused,
    so `sent_to`'s order is by connection, not by time)."""
    seen: dict[int, int] = h.__dict__.setdefault("seen", {})
    out: list[tuple[bytes, Any]] = []
    for origin, conn, transport in h.upstreams.connections:
        sent = upstream_requests_of(transport.value())
        out.extend((origin.base, s) for s in sent[seen.get(id(conn), 0):])
        seen[id(conn)] = len(sent)
    return out


def new(h: Multi) -> tuple[bytes, Any]:
    """The one upstream request sent since the last look."""
    [one] = news(h)
    return one


@pytest.fixture
def hub() -> Any:
    proxy = Hub()
    yield proxy
    proxy.close()


def pull(h: Hub, token: bytes = b"tok-1", target: str = "/v2/hub/library/alpine/manifests/latest",
         scope: bytes = b"repository:library/alpine:pull") -> None:
    """A pull through the whole flow: 401, the realm's token, the retry, 200."""
    c = call(h, "GET", target)
    answer(h, unauthorized(scope))
    answer(h, token_answer(token))
    answer(h, ok(MANIFEST))
    assert c.reply().status == 200
    assert sorted(to for to, _ in news(h)) == [AUTH_ORIGIN.base, HUB_ORIGIN.base, HUB_ORIGIN.base]


def test_an_anonymous_pull_fetches_a_token_from_the_realm_and_retries_with_it(hub: Hub) -> None:
    c = call(hub, "GET", "/v2/hub/library/alpine/manifests/latest")
    to, first = new(hub)
    assert to == HUB_ORIGIN.base and first.target == b"/v2/library/alpine/manifests/latest"
    assert first.header(b"authorization") is None  # anonymous: nothing to send yet
    answer(hub, unauthorized())
    to, asked = new(hub)
    assert to == AUTH_ORIGIN.base
    assert asked.line == b"GET /token?service=registry.hub.example&scope=repository:library/alpine:pull HTTP/1.1"
    assert asked.header(b"host") == b"auth.hub.example"
    assert asked.header(b"authorization") is None
    assert not c.answered
    answer(hub, token_answer())
    to, retried = new(hub)
    assert to == HUB_ORIGIN.base and retried.target == b"/v2/library/alpine/manifests/latest"
    assert retried.fields[b"authorization"] == [b"Bearer tok-1"]
    answer(hub, ok(MANIFEST, extra=b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n"))
    r = c.reply()
    assert (r.status, r.body) == (200, MANIFEST)
    assert r.header(b"www-authenticate") is None
    assert news(hub) == []


def test_later_requests_of_the_scope_use_the_kept_token_up_front_until_it_expires(hub: Hub) -> None:
    pull(hub)
    # same repository, pull: the token goes up front, no 401 round trip
    c = call(hub, "HEAD", "/v2/hub/library/alpine/blobs/sha256:" + "cd" * 32)
    to, sent = new(hub)
    assert to == HUB_ORIGIN.base and sent.header(b"authorization") == b"Bearer tok-1"
    answer(hub, ok(b"", extra=b"Docker-Content-Digest: sha256:" + b"cd" * 32 + b"\r\n"))
    assert c.reply().status == 200
    # another repository: another scope, no token for it yet
    call(hub, "GET", "/v2/hub/library/busybox/manifests/1")
    assert new(hub)[1].header(b"authorization") is None
    answer(hub, unauthorized(b"repository:library/busybox:pull"))
    answer(hub, token_answer(b"tok-busybox"))
    answer(hub, ok(MANIFEST))
    news(hub)
    # past its lifetime (300 s, less the margin) the first token is no longer sent
    hub.reactor.advance(300 - EXPIRY_MARGIN - 1)
    c = call(hub, "GET", "/v2/hub/library/alpine/manifests/latest")
    assert new(hub)[1].header(b"authorization") == b"Bearer tok-1"
    answer(hub, ok(MANIFEST))
    assert c.reply().status == 200
    hub.reactor.advance(1)
    c = call(hub, "GET", "/v2/hub/library/alpine/manifests/latest")
    assert new(hub)[1].header(b"authorization") is None
    answer(hub, unauthorized())
    assert new(hub)[0] == AUTH_ORIGIN.base
    answer(hub, token_answer(b"tok-2"))
    assert new(hub)[1].header(b"authorization") == b"Bearer tok-2"
    answer(hub, ok(MANIFEST))
    assert c.reply().status == 200


def test_a_kept_token_the_registry_refuses_is_replaced_once(hub: Hub) -> None:
    pull(hub)
    c = call(hub, "GET", "/v2/hub/library/alpine/manifests/latest")
    assert new(hub)[1].header(b"authorization") == b"Bearer tok-1"
    answer(hub, unauthorized(error=b"invalid_token"))  # revoked early
    to, asked = new(hub)
    assert to == AUTH_ORIGIN.base and asked.header(b"authorization") is None
    answer(hub, token_answer(b"tok-2"))
    to, retried = new(hub)
    assert to == HUB_ORIGIN.base and retried.header(b"authorization") == b"Bearer tok-2"
    answer(hub, ok(MANIFEST))
    assert c.reply().status == 200


def test_a_fresh_token_refused_again_is_unauthorized_and_forgotten(hub: Hub) -> None:
    c = call(hub, "GET", "/v2/hub/private/app/manifests/latest")
    answer(hub, unauthorized(b"repository:private/app:pull"))
    answer(hub, token_answer())
    answer(hub, unauthorized(b"repository:private/app:pull", error=b"insufficient_scope"))
    r = c.reply()
    assert (r.status, r.code) == (502, "UNAUTHORIZED")
    assert r.header(b"www-authenticate") is None  # never the upstream's challenge
    assert len(news(hub)) == 3  # one retry only
    call(hub, "GET", "/v2/hub/private/app/manifests/latest")
    assert new(hub)[1].header(b"authorization") is None  # the refused token is not kept


@pytest.mark.parametrize(
    "token_server",
    [
        ok(b'{"errors":[{"code":"DENIED"}]}', b"401 Unauthorized", b'WWW-Authenticate: Basic realm="x"\r\n'),
        ok(b"oops", b"500 Internal Server Error"),
        ok(b"<html>not json</html>"),
        ok(b'{"token":""}'),
        ok(b'{"token":"a\\r\\nSet-Cookie: x"}'),
        ok(b"", b"302 Found", b"Location: https://elsewhere.example/token\r\n"),
    ],
)
def test_a_failing_token_server_is_unauthorized_without_its_challenge(hub: Hub, token_server: bytes) -> None:
    c = call(hub, "GET", "/v2/hub/library/alpine/manifests/latest")
    answer(hub, unauthorized())
    answer(hub, token_server)
    r = c.reply()
    assert (r.status, r.code) == (502, "UNAUTHORIZED")
    assert r.header(b"www-authenticate") is None and r.header(b"location") is None
    assert [to for to, _ in news(hub)] == [HUB_ORIGIN.base, AUTH_ORIGIN.base]  # no retry, nothing followed


def test_an_unreachable_token_server_is_an_upstream_error(hub: Hub) -> None:
    c = call(hub, "GET", "/v2/hub/library/alpine/manifests/latest")
    hub.upstreams.refuse = ConnectionRefusedError()
    answer(hub, unauthorized())
    r = c.reply()
    assert r.status == 502 and r.code != "UNAUTHORIZED"


def test_static_credentials_go_to_the_realm_only_and_as_basic() -> None:
    h = Hub((STATIC, MAIN))
    c = call(h, "GET", "/v2/hub/team/app/manifests/1")
    assert new(h)[1].header(b"authorization") == BASIC  # today's behaviour: Basic up front
    answer(h, unauthorized(b"repository:team/app:pull"))
    to, asked = new(h)
    assert to == AUTH_ORIGIN.base and asked.fields[b"authorization"] == [BASIC]
    answer(h, token_answer())
    to, retried = new(h)
    assert to == HUB_ORIGIN.base and retried.fields[b"authorization"] == [b"Bearer tok-1"]  # not Basic too
    answer(h, ok(MANIFEST))
    assert c.reply().status == 200
    h.close()


def test_static_credentials_never_go_in_clear_to_a_plain_http_realm() -> None:
    h = Hub((STATIC, MAIN))
    c = call(h, "GET", "/v2/hub/team/app/manifests/1")
    answer(h, unauthorized(b"repository:team/app:pull", realm=b"http://auth.hub.example/token"))
    r = c.reply()
    assert (r.status, r.code) == (502, "UNAUTHORIZED")
    assert len(news(h)) == 1
    h.close()
    # anonymous: there is nothing to protect
    h = Hub()
    call(h, "GET", "/v2/hub/team/app/manifests/1")
    answer(h, unauthorized(b"repository:team/app:pull", realm=b"http://auth.hub.example/token"))
    assert news(h)[-1][0] == Origin("http", "auth.hub.example").base
    h.close()


def test_a_push_gets_a_pull_push_token_on_its_bodiless_post_and_uses_it_for_the_body(hub: Hub) -> None:
    c = call(hub, "POST", "/v2/hub/team/app/blobs/uploads/?mount=sha256:" + "ab" * 32 + "&from=hub/team/base")
    assert new(hub)[1].target.endswith(b"&from=team%2Fbase")  # the private name, on the same upstream
    answer(hub, unauthorized(b"repository:team/app:pull,push repository:team/base:pull"))
    asked = new(hub)[1]
    assert asked.target == (b"/token?service=registry.hub.example"
                            b"&scope=repository:team/app:pull,push&scope=repository:team/base:pull")
    answer(hub, token_answer(b"tok-push"))
    retried = new(hub)[1]
    assert retried.line.startswith(b"POST /v2/team/app/blobs/uploads/?mount=")
    assert retried.header(b"authorization") == b"Bearer tok-push"
    answer(hub, ok(b"", b"202 Accepted", b"Location: /v2/team/app/blobs/uploads/u-1\r\n"))
    assert c.reply().status == 202
    # the upload's body goes with the kept token at once (a request with a body is never retried)
    c = call(hub, "PATCH", "/v2/hub/team/app/blobs/uploads/u-1", body=b"layer-bytes")
    sent = new(hub)[1]
    assert sent.header(b"authorization") == b"Bearer tok-push"
    answer(hub, ok(b"", b"202 Accepted"))
    assert c.reply().status == 202


def test_a_request_with_a_body_and_no_token_is_not_retried(hub: Hub) -> None:
    c = call(hub, "PUT", "/v2/hub/team/app/manifests/1", body=MANIFEST)
    answer(hub, unauthorized(b"repository:team/app:pull,push"))
    r = c.reply()
    assert (r.status, r.code) == (502, "UNAUTHORIZED")
    assert len(news(hub)) == 1  # no token fetched: the body could not be sent again


def test_a_registry_without_a_bearer_challenge_keeps_todays_refusal(hub: Hub) -> None:
    c = call(hub, "GET", "/v2/hub/library/alpine/manifests/latest")
    answer(hub, ok(b"", b"401 Unauthorized", b'WWW-Authenticate: Basic realm="hub"\r\n'))
    r = c.reply()
    assert (r.status, r.code) == (502, "UNAUTHORIZED")
    assert len(news(hub)) == 1


def test_ecr_upstreams_never_follow_a_bearer_challenge() -> None:
    h = Hub((ANON, PROD, MAIN))
    fresh = ecr_token("prod", h.reactor.seconds() + 1)
    h.built.proxy.keeper.keepers["prod"]._fetcher.results.append(fresh)  # type: ignore[union-attr]
    c = call(h, "GET", "/v2/prod/app/manifests/latest")
    answer(h, unauthorized(b"repository:app:pull"))
    answer(h, ok())
    assert c.reply().status == 200
    assert [(to, s.header(b"authorization")) for to, s in news(h)] == [
        (PROD_ORIGIN.base, auth_of("prod")), (PROD_ORIGIN.base, fresh.header)]  # a refreshed ECR token, no realm
    # and the default upstream still gets its own token
    call(h, "GET", "/v2/app/manifests/latest")
    assert new(h)[0] == MAIN_ORIGIN.base
    h.close()


def test_tokens_and_credentials_are_never_logged() -> None:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        h = Hub((STATIC, MAIN))
        written: list[Any] = []
        h.handler.access_log.request = lambda *values: written.append(AccessRecord(*values))  # type: ignore[method-assign]
        c = call(h, "GET", "/v2/hub/team/app/manifests/1?token=tok-secret")
        answer(h, unauthorized(b"repository:team/app:pull"))
        answer(h, token_answer(b"tok-secret"))
        answer(h, unauthorized(b"repository:team/app:pull", error=b"insufficient_scope"))
        assert c.reply().status == 502
        c = call(h, "GET", "/v2/hub/team/app/manifests/2")
        answer(h, unauthorized(b"repository:team/app:pull", realm=REALM + b"?x=s3cret-pw"))
        answer(h, ok(b"denied: tok-secret s3cret-pw", b"403 Forbidden"))
        assert c.reply().status == 502
        h.close()
    finally:
        globalLogPublisher.removeObserver(observer)

    text = "\n".join(formatEvent(e) for e in events) + "\n".join(repr(r) for r in written)
    assert "insufficient_scope" in text and "auth.hub.example/token" in text  # the lines were written
    for secret in ("tok-secret", "s3cret-pw", BASIC.decode()[6:]):
        assert secret not in text


def test_a_head_request_fetches_its_token_with_a_get(hub: Hub) -> None:
    digest = "sha256:" + "cd" * 32
    c = call(hub, "HEAD", f"/v2/hub/library/alpine/manifests/{digest}")
    assert new(hub)[1].line.startswith(b"HEAD ")
    answer(hub, unauthorized())
    assert new(hub)[1].line.startswith(b"GET /token?")
    answer(hub, token_answer())
    to, retried = new(hub)
    assert retried.line.startswith(b"HEAD ") and retried.header(b"authorization") == b"Bearer tok-1"
    answer(hub, b"HTTP/1.1 200 OK\r\nDocker-Content-Digest: " + digest.encode() + b"\r\nContent-Length: 19\r\n\r\n")
    r = c.reply()
    assert (r.status, r.header(b"docker-content-digest"), r.body) == (200, digest.encode(), b"")


def test_with_the_layer_cache_a_blob_is_fetched_with_the_token(tmp_path: Any) -> None:
    from .test_cache import blob

    h = Hub(cache_dir=str(tmp_path / "cache"))
    data, digest = blob(5000)
    c = call(h, "GET", f"/v2/hub/library/alpine/blobs/{digest}")
    assert new(h)[1].header(b"authorization") is None
    answer(h, unauthorized())
    assert new(h)[0] == AUTH_ORIGIN.base
    answer(h, token_answer())
    assert new(h)[1].header(b"authorization") == b"Bearer tok-1"
    answer(h, ok(data, extra=b"Docker-Content-Digest: " + digest.encode() + b"\r\n"))
    r = c.reply()
    assert (r.status, r.body) == (200, data)
    h.close()


def test_a_realm_on_the_metadata_service_is_never_asked(hub: Hub) -> None:
    c = call(hub, "GET", "/v2/hub/library/alpine/manifests/latest")
    answer(hub, unauthorized(realm=b"http://169.254.169.254/latest/meta-data/iam/security-credentials/x"))
    r = c.reply()
    assert (r.status, r.code) == (502, "UNAUTHORIZED")
    assert len(news(hub)) == 1
