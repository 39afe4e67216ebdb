"""Several upstreams behind one proxy (#13): routing by prefix and by host, names rewritten both
ways, the policy on public names, mounts within and across upstreams, one token keeper each.

Every test drives the whole proxy built by `app.build.build` from `ProxySettings(upstreams=...)`
on a MemoryReactorClock, with one FakeTokenFetcher per upstream and in-memory upstream
connections: "went to upstream X" means a request reached X's origin with X's token.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import jwt
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from ecr_twisted.access.gate import AccessConfig, Gate
from ecr_twisted.access.htpasswd import Htpasswd
from ecr_twisted.observe.accesslog import AccessRecord
from ecr_twisted.access.policy import FixedPolicy, Policy
from ecr_twisted.access.tokens import TokenIssuer
from ecr_twisted.app.build import Keepers, Parts, build
from ecr_twisted.app.config import ProxySettings
from ecr_twisted.cache.store import BlobStore
from ecr_twisted.ecr.tokens import Token, TokenKeeper
from ecr_twisted.http.origin import Origin
from ecr_twisted.http.server import ClientConnection, RelayFactory
from ecr_twisted.testing.doubles import (
    FakeTokenFetcher,
    MemoryUpstreams,
    make_token,
    synchronous_bcrypt,
    synchronous_verify,
    write_htpasswd,
)
from ecr_twisted.upstreams.spec import UpstreamSpec

from .test_access import Call, Sent, ok, upstream_requests
from .test_access import answer as _answer
from .test_cache import REDIRECT, STORAGE_GET, blob, storage_ok

HOST = "registry.example.com"
MIRROR_HOST = "mirror.registry.example.com"
DIGEST = "sha256:" + "ab" * 32

PROD_ORIGIN = Origin("https", "111111111111.dkr.ecr.eu-west-1.amazonaws.com")
MAIN_ORIGIN = Origin("https", "333333333333.dkr.ecr.us-east-1.amazonaws.com")
MIRROR_ORIGIN = Origin("https", "mirror.example")

PROD = UpstreamSpec("prod", registry_id="111111111111", region="eu-west-1", prefix="prod")
# a host-routed upstream whose origin is its `url` (not its token's proxyEndpoint)
MIRROR = UpstreamSpec("mirror", registry_id="222222222222", region="eu-west-1", url="https://mirror.example",
                      hosts=(MIRROR_HOST,))
MAIN = UpstreamSpec("main", registry_id="333333333333", region="us-east-1", default=True)

ENDPOINTS = {"prod": "https://" + PROD_ORIGIN.netloc.decode(), "main": "https://" + MAIN_ORIGIN.netloc.decode(),
             "mirror": "https://222222222222.dkr.ecr.eu-west-1.amazonaws.com", "opt": "https://opt.example"}


class Multi:
    """A whole proxy with several upstreams: `Harness`, for an upstream list."""

    def __init__(
        self, specs: Sequence[UpstreamSpec] = (PROD, MIRROR, MAIN), gate: Callable[[Any], Gate] | None = None,
        **settings: Any,
    ) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_000_000)
        self.fetchers = {spec.name: FakeTokenFetcher() for spec in specs}
        self.upstreams = MemoryUpstreams(self.reactor)
        parts = Parts(
            fetchers=dict(self.fetchers), connector=self.upstreams, verify=synchronous_verify,
            gate=(lambda metrics: gate(self.reactor)) if gate is not None else None,
            blob_store=lambda root, max_bytes: BlobStore(root, max_bytes),
        )
        values: dict[str, Any] = {"auth": "none", "region": "eu-west-1", "upstream_connections": 4}
        values.update(settings)
        self.built = build(ProxySettings(upstreams=tuple(specs), **values), self.reactor, parts)
        proxy = self.built.proxy
        self.handler = proxy.handler
        self.cache = proxy.cache
        self.pool = proxy.pool
        keepers = proxy.keeper
        assert isinstance(keepers, Keepers)
        self.keepers: dict[str, TokenKeeper] = keepers.keepers
        for name, keeper in self.keepers.items():
            keeper.current = token(name, self.reactor.seconds())
            keeper.next_attempt = float("inf")
        factory = self.built.factories[0]
        assert isinstance(factory, RelayFactory)
        self.factory = factory

    def client(self) -> tuple[ClientConnection, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(transport)
        return proto, transport

    def close(self) -> None:
        self.pool.close()
        if self.cache is not None:
            self.cache.close()
        self.upstreams.close()


def answer(h: Multi, raw: bytes) -> None:
    """test_access's `answer`, for this proxy (it reads only `upstreams`)."""
    _answer(h, raw)  # type: ignore[arg-type]


def token(name: str, now: float) -> Token:
    return make_token(f"{name}-password", now=now, endpoint=ENDPOINTS[name])


def auth_of(name: str, now: float = 1_000_000) -> bytes:
    return token(name, now).header


def req(method: str, target: str, host: str = HOST, auth: bytes | None = None, body: bytes | None = None,
        headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + host.encode()]
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    lines.extend(n + b": " + v for n, v in headers)
    if body is None and method in ("PUT", "POST", "PATCH"):
        body = b""
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def call(h: Multi, method: str, target: str, host: str = HOST, auth: bytes | None = None, **kw: Any) -> Call:
    proto, transport = h.client()
    proto.dataReceived(req(method, target, host, auth, **kw))
    return Call(transport, method == "HEAD")


def sent_to(h: Multi) -> list[tuple[bytes, Sent]]:
    """Each upstream request with the origin it went to (one request per connection in these tests)."""
    out: list[tuple[bytes, Sent]] = []
    for origin, _, transport in h.upstreams.connections:
        conn_sent = upstream_requests_of(transport.value())
        out.extend((origin.base, s) for s in conn_sent)
    return out


def upstream_requests_of(data: bytes) -> list[Sent]:
    class _T:
        def value(self) -> bytes:
            return data

    class _H:
        class upstreams:
            connections = [(None, None, _T())]

    return upstream_requests(_H)  # type: ignore[arg-type]


def last(h: Multi) -> tuple[bytes, Sent]:
    return sent_to(h)[-1]


def policy_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def h() -> Any:
    proxy = Multi()
    yield proxy
    proxy.close()


# ---------------------------------------------------------------------------
# routing


@pytest.mark.parametrize(
    "host, client, origin, private, upstream",
    [
        (HOST, "prod/app", PROD_ORIGIN, "app", "prod"),
        (HOST, "prod/team/app", PROD_ORIGIN, "team/app", "prod"),
        (HOST, "app", MAIN_ORIGIN, "app", "main"),
        (HOST, "team/app", MAIN_ORIGIN, "team/app", "main"),
        (MIRROR_HOST, "library/alpine", MIRROR_ORIGIN, "library/alpine", "mirror"),
        (MIRROR_HOST + ":443", "prod/app", MIRROR_ORIGIN, "prod/app", "mirror"),  # host wins over prefix
    ],
)
def test_names_go_to_their_upstream_with_its_token_and_private_name(
    h: Multi, host: str, client: str, origin: Origin, private: str, upstream: str
) -> None:
    c = call(h, "GET", f"/v2/{client}/manifests/latest", host)
    [(to, sent)] = sent_to(h)
    assert to == origin.base
    assert sent.line == f"GET /v2/{private}/manifests/latest HTTP/1.1".encode()
    assert sent.header(b"host") == origin.netloc
    assert sent.header(b"authorization") == auth_of(upstream)
    answer(h, ok(b"{}", extra=b"Docker-Content-Digest: " + DIGEST.encode() + b"\r\n"))
    assert c.reply().status == 200


def test_a_name_that_is_just_a_prefix_is_unknown(h: Multi) -> None:
    r = call(h, "GET", "/v2/prod/manifests/latest").reply()
    assert (r.status, r.code) == (404, "NAME_UNKNOWN")
    assert sent_to(h) == []


def test_unroutable_names_are_unknown_after_the_gate(tmp_path: Path) -> None:
    h = Multi((PROD, MIRROR))  # no default upstream
    r = call(h, "GET", "/v2/other/app/manifests/latest").reply()
    assert (r.status, r.code) == (404, "NAME_UNKNOWN")
    h.close()
    # the gate decides first: a caller the policy refuses learns nothing about the name
    only_prod = '[[rule]]\nprincipals = ["anonymous"]\nactions = ["pull"]\nrepositories = ["prod/*"]\n'
    h = Multi((PROD, MIRROR), policy=policy_file(tmp_path, only_prod))
    r = call(h, "GET", "/v2/other/app/manifests/latest").reply()
    assert (r.status, r.code) == (403, "DENIED")
    assert sent_to(h) == []
    h.close()


def test_base_goes_to_the_default_upstream_else_the_first_required_one() -> None:
    h = Multi()
    c = call(h, "GET", "/v2/")
    assert last(h)[0] == MAIN_ORIGIN.base and last(h)[1].header(b"authorization") == auth_of("main")
    answer(h, ok())
    assert c.reply().status == 200
    h.close()
    optional = UpstreamSpec("opt", registry_id="444444444444", region="eu-west-1", prefix="opt", optional=True,
                            url="https://opt.example")
    h = Multi((optional, PROD))
    call(h, "GET", "/v2/")
    assert last(h)[0] == PROD_ORIGIN.base
    h.close()


def test_catalog_is_answered_from_the_upstreams_listings_with_public_names(h: Multi) -> None:
    from twisted.internet.defer import succeed

    from ecr_twisted.registry.catalog import Catalog, Source

    h.handler.catalog = Catalog([
        Source("prod", lambda: succeed(["app", "lib/x"]), "prod"),
        Source("", lambda: succeed(["base", "tools"]), "main"),
    ])
    r = call(h, "GET", "/v2/_catalog?n=3").reply()
    assert r.status == 200
    assert json.loads(r.body) == {"repositories": ["base", "prod/app", "prod/lib/x"]}
    assert r.header(b"link") == b'</v2/_catalog?last=prod%2Flib%2Fx&n=3>; rel="next"'
    assert sent_to(h) == []  # no registry's own _catalog was asked


def test_catalog_names_what_the_callers_host_reaches_as_it_calls_it(h: Multi) -> None:
    """On a host-routed name the catalog lists that upstream's repositories as clients there write
    them (and its cursor too); the default upstream's names that are another's public names are
    out of reach, so never listed (review of #13)."""
    from twisted.internet.defer import succeed

    from ecr_twisted.registry.catalog import Catalog, Source

    h.handler.catalog = Catalog([
        Source("mirror", lambda: succeed(["lib/app", "lib/b"]), "mirror"),
        Source("", lambda: succeed(["base", "mirror/shadowed", "prod/shadowed"]), "main"),
        Source("prod", lambda: succeed(["app"]), "prod"),
    ])
    r = call(h, "GET", "/v2/_catalog?n=1", MIRROR_HOST).reply()
    assert json.loads(r.body) == {"repositories": ["lib/app"]}
    assert r.header(b"link") == b'</v2/_catalog?last=lib%2Fapp&n=1>; rel="next"'
    r = call(h, "GET", "/v2/_catalog?last=lib%2Fapp", MIRROR_HOST).reply()
    assert json.loads(r.body) == {"repositories": ["lib/b"]}
    r = call(h, "GET", "/v2/_catalog").reply()
    assert json.loads(r.body) == {"repositories": ["base", "mirror/lib/app", "mirror/lib/b", "prod/app"]}


def test_a_catalog_failure_tells_the_client_no_aws_text(h: Multi) -> None:
    """AWS's error text names the proxy's principal (ARN, account): logged, never sent."""
    from twisted.internet.defer import fail, succeed

    from ecr_twisted.registry.catalog import Catalog, CatalogError, Source

    arn = "User: arn:aws:iam::999999999999:user/ecr-proxy is not authorized"
    h.handler.catalog = Catalog([
        Source("prod", lambda: fail(CatalogError("prod", arn, denied=True)), "prod"),
        Source("", lambda: succeed(["base"]), "main"),
    ])
    c = call(h, "GET", "/v2/_catalog")
    r = c.reply()
    assert r.status == 200 and b"999999999999" not in c.transport.value() and b"arn:aws" not in c.transport.value()
    assert r.header(b"warning") == b'199 - "catalog incomplete: upstream prod: ecr:DescribeRepositories denied"'
    h.handler.catalog = Catalog([Source("prod", lambda: fail(CatalogError("prod", arn)), "prod")])
    c = call(h, "GET", "/v2/_catalog")
    assert c.reply().status == 503 and b"999999999999" not in c.transport.value()


def test_a_request_answered_here_counts_under_a_configured_upstream(h: Multi) -> None:
    """No upstream is called "default" here: metrics of requests with no upstream of their own
    (`_catalog`, `/token`) use the upstream of `/v2/`, never a label the metrics refuse."""
    from ecr_twisted.registry.handler import _Ctx

    assert h.handler._leg_name(_Ctx("catalog")) in {"prod", "mirror", "main"}
    assert h.handler._leg_name(None) in {"prod", "mirror", "main"}
    h.handler.metrics.upstream_errors.labels("aborted", h.handler._leg_name(None)).inc()


# ---------------------------------------------------------------------------
# names rewritten on the way back


def test_upload_location_names_the_client_repository(h: Multi) -> None:
    c = call(h, "POST", "/v2/prod/app/blobs/uploads/")
    assert last(h)[1].target == b"/v2/app/blobs/uploads/"
    location = PROD_ORIGIN.base + b"/v2/app/blobs/uploads/u-1?_state=abc"
    answer(h, ok(b"", b"202 Accepted", b"Location: " + location + b"\r\n"))
    r = c.reply()
    assert r.status == 202
    assert r.header(b"location") == b"http://" + HOST.encode() + b"/v2/prod/app/blobs/uploads/u-1?_state=abc"
    # relative Locations too; the client's next step goes to the same upload, private name upstream
    c = call(h, "PATCH", "/v2/prod/app/blobs/uploads/u-1?_state=abc", body=b"data")
    assert last(h)[1].target == b"/v2/app/blobs/uploads/u-1?_state=abc"
    answer(h, ok(b"", b"202 Accepted", b"Location: /v2/app/blobs/uploads/u-1?_state=def\r\n"))
    assert c.reply().header(b"location") == b"/v2/prod/app/blobs/uploads/u-1?_state=def"


def test_a_storage_redirect_location_is_not_renamed() -> None:
    h = Multi(blob_mode="redirect")
    storage = b"https://bucket.s3.amazonaws.com/v2/app/blobs/x?X-Amz-Signature=s"
    c = call(h, "GET", f"/v2/prod/app/blobs/{DIGEST}")
    answer(h, ok(b"", b"307 Temporary Redirect", b"Location: " + storage + b"\r\n"))
    assert c.reply().header(b"location") == storage
    h.close()


def test_tags_list_name_and_link_are_the_client_name(h: Multi) -> None:
    body = b'{"name":"team/app","tags":["a","b"]}'
    link = b"Link: <" + PROD_ORIGIN.base + b'/v2/team/app/tags/list?last=b&n=2>; rel="next"\r\n'
    c = call(h, "GET", "/v2/prod/team/app/tags/list?n=2", headers=[(b"Accept-Encoding", b"gzip")])
    [(_, sent)] = sent_to(h)
    assert sent.target == b"/v2/team/app/tags/list?n=2"
    assert sent.header(b"accept-encoding") is None  # the body is rewritten: asked for uncompressed
    answer(h, ok(body, extra=b"Content-Type: application/json\r\n" + link))
    r = c.reply()
    assert r.status == 200
    assert json.loads(r.body) == {"name": "prod/team/app", "tags": ["a", "b"]}
    assert r.header(b"content-length") == b"%d" % len(r.body)
    assert r.header(b"link") == b"<http://" + HOST.encode() + b'/v2/prod/team/app/tags/list?last=b&n=2>; rel="next"'


def test_tags_list_of_a_name_the_upstream_shares_is_relayed_as_is(h: Multi) -> None:
    body = b'{"name": "library/alpine", "tags": ["3"]}  \n'
    c = call(h, "GET", "/v2/library/alpine/tags/list", MIRROR_HOST)
    answer(h, ok(body))
    assert c.reply().body == body


# ---------------------------------------------------------------------------
# mounts


@pytest.mark.parametrize(
    "host, client, source, upstream_target",
    [
        # within one upstream: the private name of the source
        (HOST, "prod/app", "prod/base", f"/v2/app/blobs/uploads/?mount={DIGEST}&from=base"),
        (HOST, "app", "base", f"/v2/app/blobs/uploads/?mount={DIGEST}&from=base"),
        (MIRROR_HOST, "lib/app", "lib/base", f"/v2/lib/app/blobs/uploads/?mount={DIGEST}&from=lib/base"),
        # across upstreams (or from nowhere): a plain upload the client completes
        (HOST, "prod/app", "base", "/v2/app/blobs/uploads/"),
        (HOST, "app", "prod/base", "/v2/app/blobs/uploads/"),
        (HOST, "prod/app", "prod", "/v2/app/blobs/uploads/"),
    ],
)
def test_mounts_within_an_upstream_and_across_upstreams(
    h: Multi, host: str, client: str, source: str, upstream_target: str
) -> None:
    c = call(h, "POST", f"/v2/{client}/blobs/uploads/?mount={DIGEST}&from={source}", host)
    assert last(h)[1].target.replace(b"%3A", b":").replace(b"%2F", b"/") == upstream_target.encode()
    answer(h, ok(b"", b"202 Accepted", b"Location: /v2/app/blobs/uploads/u-1\r\n"))
    assert c.reply().status == 202


# ---------------------------------------------------------------------------
# the policy sees public names

ONLY_PROD = """
[[rule]]
principals = ["anonymous"]
actions = ["pull", "push"]
repositories = ["prod/*"]
"""


@pytest.mark.parametrize(
    "method, target, host",
    [
        ("GET", "/v2/app/manifests/latest", HOST),
        ("HEAD", f"/v2/app/blobs/{DIGEST}", HOST),
        ("GET", f"/v2/app/blobs/{DIGEST}", HOST),
        ("POST", "/v2/app/blobs/uploads/", HOST),
        ("PUT", "/v2/app/manifests/v1", HOST),
        ("GET", "/v2/app/tags/list", HOST),
        ("GET", "/v2/prod/manifests/latest", MIRROR_HOST),  # public mirror/prod: not prod's
        ("GET", "/v2/lib/app/tags/list", MIRROR_HOST),
    ],
)
def test_a_policy_for_one_upstream_refuses_the_others(tmp_path: Path, method: str, target: str, host: str) -> None:
    h = Multi(policy=policy_file(tmp_path, ONLY_PROD))
    r = call(h, method, target, host).reply()
    assert r.status == 403
    assert sent_to(h) == []
    h.close()


def test_a_policy_for_one_upstream_lets_its_requests_through(tmp_path: Path) -> None:
    h = Multi(policy=policy_file(tmp_path, ONLY_PROD))
    for method, target in [("GET", "/v2/prod/app/manifests/latest"), ("GET", "/v2/prod/app/tags/list"),
                           ("POST", "/v2/prod/app/blobs/uploads/"), ("GET", f"/v2/prod/app/blobs/{DIGEST}")]:
        c = call(h, method, target)
        assert last(h)[0] == PROD_ORIGIN.base
        answer(h, ok(b'{"name":"app","tags":[]}'))
        assert c.reply().status == 200
    # a mount from a repository of another upstream the caller may not read: a plain upload
    c = call(h, "POST", f"/v2/prod/app/blobs/uploads/?mount={DIGEST}&from=base")
    assert last(h)[1].target == b"/v2/app/blobs/uploads/"
    answer(h, ok(b"", b"202 Accepted"))
    assert c.reply().status == 202
    h.close()


def test_the_policy_sees_host_routed_names_under_their_namespace(tmp_path: Path) -> None:
    only_mirror = '[[rule]]\nprincipals = ["anonymous"]\nactions = ["pull", "push"]\nrepositories = ["mirror/*"]\n'
    h = Multi(policy=policy_file(tmp_path, only_mirror))
    c = call(h, "GET", "/v2/lib/app/manifests/1", MIRROR_HOST)
    assert last(h) [0] == MIRROR_ORIGIN.base and last(h)[1].target == b"/v2/lib/app/manifests/1"
    answer(h, ok())
    assert c.reply().status == 200
    # a mount's from= is checked by its public name too: mirror/lib/base is readable, mounted as lib/base
    c = call(h, "POST", f"/v2/lib/app/blobs/uploads/?mount={DIGEST}&from=lib/base", MIRROR_HOST)
    assert last(h)[1].target.endswith(b"&from=lib/base")  # the same name on that upstream: as sent
    answer(h, ok(b"", b"202 Accepted"))
    assert c.reply().status == 202
    # the same name on the ordinary host is another repository (on the default upstream): refused
    assert call(h, "GET", "/v2/lib/app/manifests/1").reply().status == 403
    h.close()


# ---------------------------------------------------------------------------
# token mode: scopes in the client's names, tokens on public names

USERS = {"alice": "alice-pw"}


def token_mode(tmp_path: Path, rules: str) -> Multi:
    """Token mode as build_gate makes it, with bcrypt on the test's thread."""
    htpasswd = str(tmp_path / "htpasswd")
    write_htpasswd(htpasswd, USERS)

    def gate(clock: Any) -> Gate:
        return Gate(AccessConfig("token", service="svc"), FixedPolicy(Policy.from_toml(rules)), clock,
                    htpasswd=Htpasswd(htpasswd, clock, check=synchronous_bcrypt), issuer=TokenIssuer(b"k" * 48, "svc"))

    return Multi(gate=gate, auth="token", htpasswd=htpasswd, token_key=str(tmp_path / "key"))
ALICE_MIRROR = '[[rule]]\nprincipals = ["user:alice"]\nactions = ["pull"]\nrepositories = ["mirror/*"]\n'


def test_token_flow_on_a_host_routed_upstream(tmp_path: Path) -> None:
    h = token_mode(tmp_path, ALICE_MIRROR)
    r = call(h, "GET", "/v2/lib/app/manifests/1", MIRROR_HOST).reply()
    assert r.status == 401
    challenge = r.header(b"www-authenticate")
    assert challenge is not None and b'scope="repository:lib/app:pull"' in challenge  # the client's name
    alice = b"Basic " + base64.b64encode(b"alice:alice-pw")
    r = call(h, "GET", "/token?service=svc&scope=repository:lib/app:pull", MIRROR_HOST, alice).reply()
    assert r.status == 200
    issued = json.loads(r.body)["token"]
    claims = jwt.decode(issued, options={"verify_signature": False})
    assert claims["access"] == [{"type": "repository", "name": "mirror/lib/app", "actions": ["pull"]}]
    c = call(h, "GET", "/v2/lib/app/manifests/1", MIRROR_HOST, b"Bearer " + issued.encode())
    origin, sent = last(h)
    assert origin == MIRROR_ORIGIN.base and sent.target == b"/v2/lib/app/manifests/1"
    assert sent.header(b"authorization") == auth_of("mirror")
    answer(h, ok())
    assert c.reply().status == 200
    # the token names the public repository: on the ordinary host, lib/app is another one
    r = call(h, "GET", "/v2/lib/app/manifests/1", HOST, b"Bearer " + issued.encode()).reply()
    assert r.status in (401, 403)
    h.close()


def test_token_flow_on_a_prefix_keeps_the_name(tmp_path: Path) -> None:
    h = token_mode(tmp_path, ALICE_MIRROR.replace("mirror/*", "prod/*"))
    r = call(h, "GET", "/v2/prod/app/manifests/1").reply()
    assert b'scope="repository:prod/app:pull"' in (r.header(b"www-authenticate") or b"")
    h.close()


# ---------------------------------------------------------------------------
# one token keeper per upstream


def test_a_refused_token_refreshes_that_upstream_keeper_only(h: Multi) -> None:
    fresh = make_token("prod-fresh", now=h.reactor.seconds(), endpoint=ENDPOINTS["prod"])
    h.fetchers["prod"].results.append(fresh)
    c = call(h, "GET", "/v2/prod/app/manifests/latest")
    answer(h, ok(b"", b"401 Unauthorized"))
    assert h.fetchers["prod"].calls == 1
    assert (h.fetchers["main"].calls, h.fetchers["mirror"].calls) == (0, 0)
    origin, sent = last(h)
    assert origin == PROD_ORIGIN.base and sent.header(b"authorization") == fresh.header  # retried with the new one
    answer(h, ok())
    assert c.reply().status == 200
    assert h.keepers["main"].current is not None and h.keepers["main"].current.header == auth_of("main")


def test_an_upstream_without_token_fails_alone(h: Multi) -> None:
    h.keepers["prod"].current = None
    r = call(h, "GET", "/v2/prod/app/manifests/latest").reply()
    assert (r.status, r.header(b"retry-after")) == (503, b"5")  # NO_TOKEN, this upstream only
    assert sent_to(h) == []
    c = call(h, "GET", "/v2/app/manifests/latest")
    assert last(h)[0] == MAIN_ORIGIN.base
    answer(h, ok())
    assert c.reply().status == 200


def test_readiness_waits_for_required_upstreams_only() -> None:
    optional = UpstreamSpec("mirror", registry_id="222222222222", region="eu-west-1", url="https://mirror.example",
                            hosts=(MIRROR_HOST,), optional=True)
    h = Multi((PROD, optional, MAIN))
    keeper = h.built.keeper
    assert keeper.ready()
    h.keepers["mirror"].current = None
    assert keeper.ready()  # optional
    h.keepers["main"].current = None
    assert not keeper.ready()
    h.close()


def test_an_empty_token_header_sends_no_authorization(h: Multi) -> None:
    # a registry without credentials (the ecrapi helper's StaticTokens): its token's header is empty
    anonymous = make_token(now=h.reactor.seconds(), endpoint=ENDPOINTS["mirror"])
    object.__setattr__(anonymous, "header", b"")
    h.keepers["mirror"].current = anonymous
    c = call(h, "GET", "/v2/lib/app/manifests/1", MIRROR_HOST)
    assert last(h)[1].header(b"authorization") is None
    answer(h, ok())
    assert c.reply().status == 200


# ---------------------------------------------------------------------------
# the cache: stored once, served per repository only after its own upstream confirmed it


def test_a_cached_blob_is_served_for_another_upstream_only_after_it_confirmed(tmp_path: Path) -> None:
    h = Multi(cache_dir=str(tmp_path / "cache"))
    data, digest = blob(70_000)
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    assert last(h)[0] == MAIN_ORIGIN.base
    answer(h, REDIRECT)
    answer(h, storage_ok(len(data)) + data)
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    assert [s.line for _, s in sent_to(h)][-1] == STORAGE_GET
    asked = len(sent_to(h))
    # the same digest in prod/app (the same private name, on another upstream): prod is asked first
    c = call(h, "GET", f"/v2/prod/app/blobs/{digest}")
    origin, sent = last(h)
    assert origin == PROD_ORIGIN.base and sent.line == f"HEAD /v2/app/blobs/{digest} HTTP/1.1".encode()
    assert sent.header(b"authorization") == auth_of("prod")
    answer(h, ok(b"", b"404 Not Found"))
    origin, sent = last(h)  # not confirmed: the request itself goes to prod, the stored copy is not shown
    assert origin == PROD_ORIGIN.base and sent.line == f"GET /v2/app/blobs/{digest} HTTP/1.1".encode()
    answer(h, ok(b"", b"404 Not Found"))
    assert c.reply().status == 404
    # main's repository is served from disk, nothing asked
    asked = len(sent_to(h))
    r = call(h, "GET", f"/v2/app/blobs/{digest}").reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"HIT")
    # prod/team confirmed by prod: served from the one stored copy, then without asking again
    c = call(h, "GET", f"/v2/prod/team/blobs/{digest}")
    origin, sent = last(h)
    assert origin == PROD_ORIGIN.base and sent.line == f"HEAD /v2/team/blobs/{digest} HTTP/1.1".encode()
    answer(h, storage_ok(len(data)))
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"HIT")
    r = call(h, "GET", f"/v2/prod/team/blobs/{digest}").reply()
    assert (r.status, r.body) == (200, data)
    assert len(sent_to(h)) == asked + 1
    h.close()


STABLE_ONLY = """
[[rule]]
principals = ["anonymous"]
actions = ["pull"]
repositories = ["prod/*"]
tags = ["stable*"]
"""


def test_a_filtered_tags_list_is_renamed_and_its_hidden_pages_fetched_by_private_name(tmp_path: Path) -> None:
    h = Multi(policy=policy_file(tmp_path, STABLE_ONLY))
    c = call(h, "GET", "/v2/prod/app/tags/list?n=1")
    assert last(h)[1].target == b"/v2/app/tags/list?n=1"
    # nothing on this page may be shown and its cursor names a hidden tag: the proxy asks for the next
    answer(h, ok(b'{"name":"app","tags":["dev"]}', extra=b'Link: </v2/app/tags/list?last=dev&n=1>; rel="next"\r\n'))
    origin, sent = last(h)
    assert origin == PROD_ORIGIN.base and sent.target == b"/v2/app/tags/list?last=dev&n=1"
    answer(h, ok(b'{"name":"app","tags":["stable-1"]}'))
    r = c.reply()
    assert r.status == 200
    assert json.loads(r.body) == {"name": "prod/app", "tags": ["stable-1"]}
    h.close()


def test_access_log_names_the_public_repository(h: Multi) -> None:
    written: list[Any] = []
    h.handler.access_log.request = lambda *values: written.append(AccessRecord(*values))  # type: ignore[method-assign]
    c = call(h, "GET", "/v2/lib/app/manifests/1", MIRROR_HOST)
    answer(h, ok())
    assert c.reply().status == 200
    assert [(rec.repository, rec.reference) for rec in written] == [("mirror/lib/app", "1")]


def test_each_ecr_upstream_fetches_its_own_registry_token() -> None:
    from ecr_twisted.app.build import build_keeper
    from ecr_twisted.observe.metrics import Metrics
    from prometheus_client import CollectorRegistry

    settings = ProxySettings(auth="none", region="eu-west-1", upstreams=(PROD, MAIN))
    metrics = Metrics(CollectorRegistry())
    reactor = MemoryReactorClock()
    made = {spec.name: build_keeper(settings, reactor, metrics, None, spec) for spec in (PROD, MAIN)}
    args = {name: k._fetcher.child.args[3:] for name, k in made.items()}  # type: ignore[union-attr]
    assert args == {"prod": ["--region", "eu-west-1", "--registry-id", "111111111111"],
                    "main": ["--region", "us-east-1", "--registry-id", "333333333333"]}
    registry = UpstreamSpec("hub", "registry", url="https://registry-1.docker.io", credentials="none", prefix="hub")
    from ecr_twisted.ecr.tokens import StaticTokens

    static = build_keeper(settings, reactor, metrics, None, registry)
    assert isinstance(static, StaticTokens) and static.token_for_request().header == b""
    role = UpstreamSpec("shared", registry_id="222222222222", region="eu-west-1", credentials="role",
                        role_arn="arn:aws:iam::222222222222:role/pull", prefix="shared")
    keeper = build_keeper(settings, reactor, metrics, None, role)
    argv = keeper._fetcher.child.args  # type: ignore[union-attr]
    assert argv[argv.index("--role-arn") + 1] == "arn:aws:iam::222222222222:role/pull"


def test_a_fetcher_per_upstream_or_one_for_all() -> None:
    one, prod = FakeTokenFetcher(), FakeTokenFetcher()
    settings = ProxySettings(auth="none", region="eu-west-1", upstreams=(PROD, MIRROR, MAIN))
    built = build(settings, MemoryReactorClock(), Parts(fetcher=one, fetchers={"prod": prod}))
    keepers = built.keeper
    assert isinstance(keepers, Keepers)
    fetchers = {name: k._fetcher for name, k in keepers.keepers.items()}
    assert fetchers == {"prod": prod, "mirror": one, "main": one}
    built.proxy.pool.close()


def test_host_routing_follows_x_forwarded_host_only_when_trusted() -> None:
    forwarded = [(b"X-Forwarded-Host", MIRROR_HOST.encode())]
    for trusted, origin in ((True, MIRROR_ORIGIN), (False, MAIN_ORIGIN)):
        h = Multi(trust_forwarded=trusted)
        call(h, "GET", "/v2/lib/app/manifests/1", HOST, headers=forwarded)
        assert last(h)[0] == origin.base
        h.close()


def test_a_worker_serves_after_a_bounded_wait_when_one_upstream_has_no_token() -> None:
    """`--workers` children listen once every required upstream holds a token; one upstream with
    broken credentials must not keep the others from being served (review of #13)."""
    reactor = MemoryReactorClock()
    good, broken = FakeTokenFetcher(), FakeTokenFetcher()
    settings = ProxySettings(auth="none", region="eu-west-1", upstreams=(PROD, MAIN))
    built = build(settings, reactor, Parts(fetchers={"prod": good, "main": broken}))
    keepers = built.keeper
    assert isinstance(keepers, Keepers)
    fired: list[object] = []
    keepers.first_token().addCallback(fired.append)
    keepers.keepers["prod"].current = make_token(now=reactor.seconds())
    reactor.advance(Keepers.FIRST_TOKEN_WAIT - 1)
    assert fired == []
    reactor.advance(1)
    assert fired == [None]
    keepers.first_token()
    assert any(c.active() for c in reactor.getDelayedCalls())
    keepers.stop()  # every bound's timer is cancelled with the keepers
    assert not any(c.active() for c in reactor.getDelayedCalls())
