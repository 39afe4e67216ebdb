"""The access gate end to end: client bytes in, then what reached the upstream and what the client got.

Every test drives a whole proxy (`testing.Harness`) on a MemoryReactorClock with in-memory
transports, so "nothing went upstream" is a fact about the fake upstream, not a mock's say-so.
Time only moves with `h.reactor.advance`.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jwt
import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ecr_twisted.registry import handler as proxy
from ecr_twisted.access.gate import AccessConfig, Gate
from ecr_twisted.access.htpasswd import Htpasswd
from ecr_twisted.access.tokens import TokenIssuer
from ecr_twisted.access.webhook import WebhookAuthorizer
from ecr_twisted.access.policy import FixedPolicy, Policy
from ecr_twisted.registry.handler import MAX_HIDDEN_PAGES, ProxyConfig
from ecr_twisted.testing.doubles import UPSTREAM, Harness, synchronous_bcrypt, write_htpasswd

HOST = b"registry.example.com"
PUBLIC = b"http://" + HOST  # no public_base: the realm comes from the client's Host header
SERVICE = "registry.example.com"
KEY = b"k" * 48
DIGEST = "sha256:" + "ab" * 32
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}

# anonymous pulls public/*; alice works on team-a, reads team-b/shared and only stable tags of
# team-c/app; carol reads team-a; bob is a known user with no rights; nobody pushes `latest`.
POLICY = """
[[rule]]
principals = ["anonymous"]
actions = ["pull"]
repositories = ["public/*"]

[[rule]]
principals = ["user:alice"]
actions = ["pull", "push"]
repositories = ["team-a/*"]

[[rule]]
principals = ["user:alice"]
actions = ["pull"]
repositories = ["team-b/shared"]

[[rule]]
principals = ["user:alice"]
actions = ["pull"]
repositories = ["team-c/app"]
tags = ["stable*"]

[[rule]]
principals = ["user:carol"]
actions = ["pull"]
repositories = ["team-a/*"]

[[rule]]
effect = "deny"
principals = ["*"]
actions = ["push"]
repositories = ["*"]
tags = ["latest"]
"""

ANONYMOUS_PULL = """
[[rule]]
principals = ["anonymous"]
actions = ["pull"]
repositories = ["*"]
"""

OPEN = """
[[rule]]
principals = ["*"]
actions = ["pull", "push", "delete"]
repositories = ["*"]
"""


# -- building proxies
@pytest.fixture
def htpasswd(tmp_path: Path) -> str:
    path = str(tmp_path / "htpasswd")
    write_htpasswd(path, USERS)
    return path


class FakeWebhook:
    """The webhook transport: records each question and hands back a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], Deferred[tuple[int, bytes]]]] = []

    def __call__(self, body: bytes) -> Deferred[tuple[int, bytes]]:
        d: Deferred[tuple[int, bytes]] = Deferred()
        self.calls.append((json.loads(body), d))
        return d

    def question(self, i: int = -1) -> dict[str, Any]:
        return self.calls[i][0]

    def answer(self, status: int, verdict: dict[str, Any] | None, i: int = -1) -> None:
        self.calls[i][1].callback((status, json.dumps(verdict).encode() if verdict is not None else b""))

    def fail(self, reason: BaseException, i: int = -1) -> None:
        self.calls[i][1].errback(Failure(reason))


def make_proxy(
    mode: str,
    policy: str = POLICY,
    *,
    htpasswd: str | None = None,
    namespace: str | None = None,
    exclude: str | None = None,
    read_only: bool = False,
    webhook: FakeWebhook | None = None,
) -> Harness:
    """A Harness whose Gate is built by hand, wired like `tap.build_gate` (metrics, webhook on_error)."""

    def build(h: Harness) -> Gate:
        clock = h.reactor
        config = AccessConfig(
            mode=mode,
            namespace=re.compile(namespace) if namespace is not None else None,
            exclude=re.compile(exclude) if exclude is not None else None,
            read_only=read_only,
            service=SERVICE,
        )
        authorizer = None
        if webhook is not None:
            authorizer = WebhookAuthorizer(webhook, clock, on_error=lambda problem: h.access.webhook_errors.inc())
        return Gate(
            config,
            FixedPolicy(Policy.from_toml(policy)),
            clock,
            metrics=h.access,
            htpasswd=Htpasswd(htpasswd, clock, check=synchronous_bcrypt) if htpasswd is not None else None,
            issuer=TokenIssuer(KEY, SERVICE) if mode in ("basic", "token") else None,  # as tap.build_gate
            webhook=authorizer,
        )

    config = ProxyConfig(upstream=UPSTREAM, passthrough=True) if mode == "passthrough" else None
    return Harness(config, gate=build)


# -- playing the client
def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


def bearer(token: str) -> bytes:
    return b"Bearer " + token.encode()


def request(
    method: str,
    target: str,
    auth: bytes | None = None,
    body: bytes | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + HOST]
    if auth is not None:
        lines.append(b"Authorization: " + auth)
    lines.extend(n + b": " + v for n, v in headers)
    if body is None and method in ("PUT", "POST", "PATCH"):
        body = b""
    if body is not None:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


@dataclass
class Reply:
    status: int
    fields: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.fields.get(name.lower())
        return values[0] if values else None

    @property
    def code(self) -> str:
        """The registry error code of an error envelope (exactly one error)."""
        errors = json.loads(self.body)["errors"]
        assert len(errors) == 1, errors
        return errors[0]["code"]

    @property
    def error(self) -> dict[str, Any]:
        return json.loads(self.body)["errors"][0]


def parse_response(raw: bytes, head_request: bool = False) -> Reply:
    """The one response the client got, with its Content-Length checked against the body (none for HEAD)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response yet: {raw!r}"
    lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        fields.setdefault(name.lower(), []).append(value)
    assert b"transfer-encoding" not in fields, "tests only produce length-framed responses"
    length = fields.get(b"content-length")
    if length is not None:
        assert len(body) == (0 if head_request else int(length[0])), (length, body)
    return Reply(int(lines[0].split(b" ")[1]), fields, body)


@dataclass
class Call:
    """A request sent on its own client connection."""

    transport: Any
    head_request: bool = False

    @property
    def answered(self) -> bool:
        return self.transport.value() != b""

    def reply(self) -> Reply:
        return parse_response(self.transport.value(), self.head_request)


def send(h: Harness, raw: bytes) -> Call:
    proto, transport = h.client()
    proto.dataReceived(raw)
    return Call(transport, raw.startswith(b"HEAD "))


def call(h: Harness, method: str, target: str, auth: bytes | None = None, body: bytes | None = None) -> Call:
    return send(h, request(method, target, auth, body))


# -- playing the upstream
@dataclass
class Sent:
    """One request head as the upstream received it."""

    line: bytes
    fields: dict[bytes, list[bytes]] = field(default_factory=dict)

    @property
    def target(self) -> bytes:
        return self.line.split(b" ")[1]

    def header(self, name: bytes) -> bytes | None:
        values = self.fields.get(name.lower())
        return values[0] if values else None


_REQUEST_LINE = re.compile(rb"^(?:GET|HEAD|POST|PUT|PATCH|DELETE) \S+ HTTP/1\.1\r\n", re.M)


def upstream_requests(h: Harness) -> list[Sent]:
    """Every request head any upstream connection received (bodies in these tests never look like one)."""
    out: list[Sent] = []
    for _, _, transport in h.upstreams.connections:
        data = transport.value()
        for m in _REQUEST_LINE.finditer(data):
            head = data[m.start() :].split(b"\r\n\r\n", 1)[0]
            lines = head.split(b"\r\n")
            sent = Sent(lines[0])
            for line in lines[1:]:
                name, _, value = line.partition(b": ")
                sent.fields.setdefault(name.lower(), []).append(value)
            out.append(sent)
    return out


def answer(h: Harness, raw: bytes) -> None:
    """Feed the response to the upstream connection that is waiting for one."""
    waiting = [conn for _, conn, _ in h.upstreams.connections if conn._attempt is not None]
    assert len(waiting) == 1, f"{len(waiting)} upstream requests are waiting"
    waiting[0].dataReceived(raw)


def ok(body: bytes = b"{}", status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def forwarded(h: Harness, c: Call, status: int = 200) -> Sent:
    """The request went upstream exactly once: answer it and check the client got the answer."""
    sent = upstream_requests(h)
    assert len(sent) >= 1 and not c.answered
    answer(h, ok(status=b"%d X" % status))
    assert c.reply().status == status
    return sent[-1]


def assert_refused(h: Harness, c: Call, status: int, code: str, before: int = 0) -> Reply:
    """A local refusal: the error envelope, and not one more request upstream than `before`."""
    r = c.reply()
    assert r.status == status, r
    if not c.head_request:
        assert r.code == code, r
    assert r.header(b"content-type") == b"application/json; charset=utf-8"
    assert len(upstream_requests(h)) == before
    return r


def basic_challenge(realm: bytes = PUBLIC) -> bytes:
    return b'Basic realm="' + realm + b'"'


def bearer_challenge(scope: str | None = None, error: str | None = None) -> bytes:
    value = b'Bearer realm="' + PUBLIC + b'/token",service="' + SERVICE.encode() + b'"'
    if scope:
        value += b',scope="' + scope.encode() + b'"'
    if error:
        value += b',error="' + error.encode() + b'"'
    return value


# ---------------------------------------------------------------------------
# --auth none


def test_none_mode_forwards_anonymous_pulls_with_our_ecr_token() -> None:
    h = make_proxy("none", ANONYMOUS_PULL)
    client_auth = basic("someone", "their-password")
    c = call(h, "GET", "/v2/team-a/app/manifests/1.0", client_auth)
    sent = forwarded(h, c)
    assert sent.line == b"GET /v2/team-a/app/manifests/1.0 HTTP/1.1"
    assert h.keeper.current is not None
    assert sent.fields[b"authorization"] == [h.keeper.current.header]
    assert client_auth not in b"".join(t.value() for _, _, t in h.upstreams.connections)


@pytest.mark.parametrize(
    "method,target,action",
    [
        ("PUT", "/v2/team-a/app/manifests/1.0", "push"),
        ("POST", "/v2/team-a/app/blobs/uploads/", "push"),
        ("PATCH", "/v2/team-a/app/blobs/uploads/u-1", "push"),
        ("DELETE", "/v2/team-a/app/manifests/" + DIGEST, "delete"),
        ("DELETE", "/v2/team-a/app/blobs/" + DIGEST, "delete"),
    ],
)
def test_none_mode_denies_what_anonymous_may_not_do(method: str, target: str, action: str) -> None:
    h = make_proxy("none", ANONYMOUS_PULL)
    body = b'{"schemaVersion":2}' if method in ("PUT", "PATCH") else None
    r = assert_refused(h, call(h, method, target, basic("x", "y"), body), 403, "DENIED")
    assert r.header(b"www-authenticate") is None  # no login can help in mode none
    assert h.upstreams.connections == []
    assert h.sample("ecrproxy_access_denied_total", {"action": action}) == 1


# ---------------------------------------------------------------------------
# --namespace-pattern / --exclude-pattern


@pytest.mark.parametrize(
    "method,target",
    [
        ("GET", "/v2/{}/manifests/1.0"),
        ("HEAD", "/v2/{}/manifests/" + DIGEST),
        ("GET", "/v2/{}/blobs/" + DIGEST),
        ("GET", "/v2/{}/tags/list"),
        ("GET", "/v2/{}/referrers/" + DIGEST),
        ("POST", "/v2/{}/blobs/uploads/"),
        ("PATCH", "/v2/{}/blobs/uploads/u-1"),
    ],
)
@pytest.mark.parametrize("name", ["other/app", "team-a/secret", "team-a/secret/deep"])
def test_names_outside_the_namespace_do_not_exist(method: str, target: str, name: str) -> None:
    h = make_proxy("none", OPEN, namespace=r"team-[a-z]+/.+", exclude=r"team-a/secret(/.*)?")
    assert_refused(h, call(h, method, target.format(name)), 404, "NAME_UNKNOWN")
    assert h.upstreams.connections == []


def test_names_inside_the_namespace_are_forwarded() -> None:
    h = make_proxy("none", OPEN, namespace=r"team-[a-z]+/.+", exclude=r"team-a/secret(/.*)?")
    sent = forwarded(h, call(h, "GET", "/v2/team-a/secretive/manifests/1.0"))
    assert sent.target == b"/v2/team-a/secretive/manifests/1.0"


def test_invisible_names_are_unknown_before_any_login_is_asked_for(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd, namespace=r"team-.+")
    assert_refused(h, call(h, "GET", "/v2/other/app/manifests/1"), 404, "NAME_UNKNOWN")


# ---------------------------------------------------------------------------
# --read-only


@pytest.mark.parametrize(
    "method,target",
    [
        ("PUT", "/v2/team-a/app/manifests/1.0"),
        ("POST", "/v2/team-a/app/blobs/uploads/"),
        ("DELETE", "/v2/team-a/app/manifests/" + DIGEST),
    ],
)
def test_read_only_refuses_writes_even_to_allowed_users(htpasswd: str, method: str, target: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd, read_only=True)
    r = assert_refused(h, call(h, method, target, basic("alice", "alice-pw")), 403, "DENIED")
    assert "read-only" in r.error.get("detail", "")
    forwarded(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw")))


# ---------------------------------------------------------------------------
# --auth basic


NOBODY_ANONYMOUS = """
[[rule]]
principals = ["authenticated"]
actions = ["pull", "push"]
repositories = ["*"]
"""


def test_basic_base_without_credentials_is_a_basic_challenge_when_anonymous_may_do_nothing(htpasswd: str) -> None:
    h = make_proxy("basic", NOBODY_ANONYMOUS, htpasswd=htpasswd)
    for auth in (None, basic("", "")):  # `Basic Og==`: no credentials, as skopeo sends after a Basic challenge
        r = assert_refused(h, call(h, "GET", "/v2/", auth), 401, "UNAUTHORIZED")
        assert r.fields[b"www-authenticate"] == [basic_challenge()]
        assert r.header(b"docker-distribution-api-version") == b"registry/2.0"
    assert h.upstreams.connections == []
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "basic", "result": "failure"}) is None


def test_basic_base_without_credentials_is_a_bearer_challenge_when_anonymous_may_pull(htpasswd: str) -> None:
    """docker refuses a Basic challenge it has no credentials for ("no basic auth credentials"),
    so anonymous pulls need the token flow: the same challenge registries with public images send."""
    h = make_proxy("basic", htpasswd=htpasswd)
    r = assert_refused(h, call(h, "GET", "/v2/"), 401, "UNAUTHORIZED")
    assert r.fields[b"www-authenticate"] == [bearer_challenge()]
    assert r.header(b"docker-distribution-api-version") == b"registry/2.0"
    assert h.upstreams.connections == []


def test_basic_wrong_password_and_unknown_user_are_401(htpasswd: str) -> None:
    for policy, challenge in ((POLICY, bearer_challenge()), (NOBODY_ANONYMOUS, basic_challenge())):
        h = make_proxy("basic", policy, htpasswd=htpasswd)
        for auth in (basic("alice", "nope"), basic("mallory", "alice-pw"), b"Basic !!notbase64", b"Digest x=y",
                     basic("", "alice-pw")):
            r = assert_refused(h, call(h, "GET", "/v2/", auth), 401, "UNAUTHORIZED")
            assert r.header(b"www-authenticate") == challenge
        assert h.upstreams.connections == []
        assert h.sample("ecrproxy_auth_attempts_total", {"mode": "basic", "result": "failure"}) == 5


def test_empty_basic_credentials_are_anonymous_not_a_failed_login(htpasswd: str) -> None:
    """skopeo, podman and buildah answer a Basic challenge with `Basic Og==` when they hold no credentials."""
    h = make_proxy("basic", htpasswd=htpasswd)
    for _ in range(8):  # more than the throttle's free failures: none of these is one
        forwarded(h, call(h, "GET", "/v2/public/base/manifests/1.0", basic("", "")))
    r = assert_refused(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("", "")), 401, "UNAUTHORIZED", before=8)
    assert r.header(b"www-authenticate") == bearer_challenge("repository:team-a/app:pull")
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "basic", "result": "failure"}) is None
    # and a real login from the same address still goes through
    forwarded(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw")))


def test_basic_mode_token_flow_anonymous_pull_and_logged_in_push(htpasswd: str) -> None:
    """What docker does against basic mode with a public-read policy: an anonymous token for pulls;
    after `docker login`, a token bought with the password for pushes."""
    h = make_proxy("basic", htpasswd=htpasswd)
    anon = get_token(h, f"service={SERVICE}&scope=repository:public/base:pull")
    assert anon.status == 200
    anon_token = json.loads(anon.body)["token"]
    assert access_of(anon_token) == {"public/base": ["pull"]}
    forwarded(h, call(h, "GET", "/v2/", bearer(anon_token)))
    sent = forwarded(h, call(h, "GET", "/v2/public/base/manifests/1.0", bearer(anon_token)))
    assert h.keeper.current is not None
    assert sent.fields[b"authorization"] == [h.keeper.current.header]
    # the anonymous token opens nothing else, and what the policy refuses stays refused
    before = len(upstream_requests(h))
    r = assert_refused(h, call(h, "PUT", "/v2/public/base/manifests/1.0", bearer(anon_token), b"{}"), 401,
                       "UNAUTHORIZED", before=before)
    assert r.header(b"www-authenticate") == bearer_challenge("repository:public/base:push")
    assert access_of(json.loads(get_token(h, "scope=repository:team-a/app:pull,push").body)["token"]) == {}
    # docker login: /token with the password (a wrong one is refused and counted)
    bad = get_token(h, f"account=alice&client_id=docker&offline_token=true&service={SERVICE}", basic("alice", "no"))
    assert (bad.status, bad.code) == (401, "UNAUTHORIZED")
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "basic", "result": "failure"}) == 1
    token = alice_token(h, "repository:team-a/app:pull,push")
    assert access_of(token) == {"team-a/app": ["pull", "push"]}
    sent = forwarded(h, call(h, "PUT", "/v2/team-a/app/manifests/1.0", bearer(token), b"{}"), 201)
    assert sent.line == b"PUT /v2/team-a/app/manifests/1.0 HTTP/1.1"
    assert token.encode() not in b"".join(t.value() for _, _, t in h.upstreams.connections)
    # a forged or expired token is no way around the policy
    h.reactor.advance(301)
    assert_refused(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", bearer(token)), 401, "UNAUTHORIZED",
                   before=len(upstream_requests(h)))
    # Basic credentials keep working on every request, for simple clients
    forwarded(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw")))


def test_basic_mode_challenge_follows_a_policy_file_change(htpasswd: str, tmp_path: Path) -> None:
    from ecr_twisted.access.policy import PolicyFile

    path = tmp_path / "policy.toml"
    path.write_text(NOBODY_ANONYMOUS)
    h = make_proxy("basic", htpasswd=htpasswd)
    h.gate.policy = PolicyFile(str(path), h.reactor)
    assert call(h, "GET", "/v2/").reply().header(b"www-authenticate") == basic_challenge()
    path.write_text(ANONYMOUS_PULL + "\n# now public\n")
    h.reactor.advance(2)
    assert call(h, "GET", "/v2/").reply().header(b"www-authenticate") == bearer_challenge()


def test_basic_right_password_is_forwarded_with_our_token(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    sent = forwarded(h, call(h, "GET", "/v2/", basic("alice", "alice-pw")))
    assert sent.line == b"GET /v2/ HTTP/1.1"
    assert h.keeper.current is not None
    assert sent.fields[b"authorization"] == [h.keeper.current.header]
    sent = forwarded(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw")))
    assert sent.fields[b"authorization"] == [h.keeper.current.header]
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "basic", "result": "success"}) == 2


def test_basic_anonymous_gets_what_anonymous_may_and_is_asked_to_log_in_for_more(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    forwarded(h, call(h, "GET", "/v2/public/base/manifests/1.0"))
    r = assert_refused(h, call(h, "GET", "/v2/team-a/app/manifests/1.0"), 401, "UNAUTHORIZED", before=1)
    assert r.header(b"www-authenticate") == bearer_challenge("repository:team-a/app:pull")
    assert h.sample("ecrproxy_access_denied_total", {"action": "pull"}) == 1


@pytest.mark.parametrize(
    "user,method,target,action",
    [
        ("alice", "PUT", "/v2/team-b/shared/manifests/1.0", "push"),
        ("alice", "GET", "/v2/team-b/secret/manifests/1.0", "pull"),
        ("alice", "DELETE", "/v2/team-a/app/manifests/" + DIGEST, "delete"),
        ("bob", "GET", "/v2/team-a/app/manifests/1.0", "pull"),
        ("carol", "POST", "/v2/team-a/app/blobs/uploads/", "push"),
    ],
)
def test_basic_known_users_without_the_right_are_denied(
    htpasswd: str, user: str, method: str, target: str, action: str
) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    body = b"{}" if method == "PUT" else None
    r = assert_refused(h, call(h, method, target, basic(user, USERS[user]), body), 403, "DENIED")
    assert r.header(b"www-authenticate") is None
    assert h.sample("ecrproxy_access_denied_total", {"action": action}) == 1


def test_basic_tag_rule_refuses_one_tag_and_lets_another_through(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    alice = basic("alice", "alice-pw")
    manifest = b'{"schemaVersion":2}'
    assert_refused(h, call(h, "PUT", "/v2/team-a/app/manifests/latest", alice, manifest), 403, "DENIED")
    c = call(h, "PUT", "/v2/team-a/app/manifests/v1.2", alice, manifest)
    [sent] = upstream_requests(h)
    assert sent.line == b"PUT /v2/team-a/app/manifests/v1.2 HTTP/1.1"
    assert h.upstreams.connections[0][2].value().endswith(b"\r\n\r\n" + manifest)
    answer(h, ok(b"", b"201 Created", b"Docker-Content-Digest: " + DIGEST.encode() + b"\r\n"))
    r = c.reply()
    assert r.status == 201 and r.header(b"docker-content-digest") == DIGEST.encode()
    assert h.sample("ecrproxy_access_denied_total", {"action": "push"}) == 1


def test_basic_failed_logins_are_throttled_per_address(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    for _ in range(5):
        assert_refused(h, call(h, "GET", "/v2/", basic("alice", "guess")), 401, "UNAUTHORIZED")
    # the 6th attempt is not even checked, right password or not
    for auth in (basic("alice", "guess"), basic("alice", "alice-pw")):
        r = assert_refused(h, call(h, "GET", "/v2/", auth), 429, "TOOMANYREQUESTS")
        retry_after = r.header(b"retry-after")
        assert retry_after is not None and int(retry_after) >= 1
        assert r.header(b"www-authenticate") is None
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "basic", "result": "failure"}) == 5
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "basic", "result": "throttled"}) == 2
    assert retry_after is not None  # narrowed in the loop, not after it
    h.reactor.advance(int(retry_after))
    forwarded(h, call(h, "GET", "/v2/", basic("alice", "alice-pw")))
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "basic", "result": "success"}) == 1
    # a success adds nothing to the count (nor clears it): the next guess is checked and refused
    assert_refused(h, call(h, "GET", "/v2/", basic("alice", "guess")), 401, "UNAUTHORIZED", before=1)
    assert_refused(h, call(h, "GET", "/v2/", basic("alice", "alice-pw")), 429, "TOOMANYREQUESTS", before=1)


def test_basic_a_throttled_wrong_password_after_the_wait_doubles_the_penalty(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    for _ in range(5):
        call(h, "GET", "/v2/", basic("alice", "guess"))
    h.reactor.advance(1)
    assert_refused(h, call(h, "GET", "/v2/", basic("alice", "guess")), 401, "UNAUTHORIZED")
    h.reactor.advance(1)
    assert_refused(h, call(h, "GET", "/v2/", basic("alice", "alice-pw")), 429, "TOOMANYREQUESTS")
    h.reactor.advance(1)
    forwarded(h, call(h, "GET", "/v2/", basic("alice", "alice-pw")))


def test_basic_throttle_ignores_x_forwarded_for_unless_trusted(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)

    def login(password: str, forwarded_for: str) -> Call:
        headers = [(b"X-Forwarded-For", forwarded_for.encode())]
        return send(h, request("GET", "/v2/", basic("alice", password), headers=headers))

    for i in range(5):
        login("guess", f"10.0.0.{i}")
    # an attacker cannot pick a fresh address per guess
    assert login("alice-pw", "10.0.0.99").reply().status == 429
    h.config.trust_forwarded = True
    # behind a trusted load balancer the last hop's entry is the client: one client's failures
    # do not lock out another
    for _ in range(5):
        login("guess", "198.51.100.7, 10.1.1.1")
    assert login("alice-pw", "198.51.100.7, 10.1.1.1").reply().status == 429
    forwarded(h, login("alice-pw", "203.0.113.9, 10.1.1.2"))


def test_tag_limited_pull_applies_to_manifests_by_tag_not_by_digest(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    alice = basic("alice", "alice-pw")
    assert_refused(h, call(h, "GET", "/v2/team-c/app/manifests/dev", alice), 403, "DENIED")
    forwarded(h, call(h, "GET", "/v2/team-c/app/manifests/stable-1", alice))
    forwarded(h, call(h, "GET", f"/v2/team-c/app/manifests/{DIGEST}", alice))
    forwarded(h, call(h, "GET", f"/v2/team-c/app/blobs/{DIGEST}", alice))


# ---------------------------------------------------------------------------
# cross-repository blob mount


def _mount(h: Harness, source: str, extra: str = "") -> Sent:
    c = call(
        h, "POST", f"/v2/team-a/app/blobs/uploads/?mount={DIGEST}&from={source}{extra}", basic("alice", "alice-pw")
    )
    sent = upstream_requests(h)[-1]
    answer(h, ok(b"", b"202 Accepted", b"Location: /v2/team-a/app/blobs/uploads/u-1\r\n"))
    assert c.reply().status == 202
    return sent


def test_mount_from_an_unreadable_repository_becomes_a_plain_upload(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    sent = _mount(h, "team-b/secret")
    assert sent.line == b"POST /v2/team-a/app/blobs/uploads/ HTTP/1.1"
    sent = _mount(h, "team-b/secret", "&foo=bar")
    assert sent.target == b"/v2/team-a/app/blobs/uploads/?foo=bar"
    for bad in ("../team-a/app", "UPPER/app", ""):
        assert _mount(h, bad).target == b"/v2/team-a/app/blobs/uploads/"


def test_mount_from_a_readable_repository_is_left_alone(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    for source in ("team-b/shared", "team-a/base"):
        target = f"/v2/team-a/app/blobs/uploads/?mount={DIGEST}&from={source}".encode()
        assert _mount(h, source).target == target


def test_mount_from_outside_the_namespace_becomes_a_plain_upload(htpasswd: str) -> None:
    h = make_proxy("basic", OPEN.replace('"*"]\nactions', '"authenticated"]\nactions'), htpasswd=htpasswd,
                   namespace=r"team-.+", exclude=r"team-b/.*")
    assert _mount(h, "team-b/shared").target == b"/v2/team-a/app/blobs/uploads/"


# ---------------------------------------------------------------------------
# tags/list filtering

TAGS = b'{"name": "team-c/app", "tags": ["stable-1", "dev", "stable-2"]}'
LINK = b"Link: <" + UPSTREAM.base + b'/v2/team-c/app/tags/list?last=stable-2&n=3>; rel="next"\r\n'


def test_tags_list_shows_only_the_tags_the_caller_may_pull(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    c = call(h, "GET", "/v2/team-c/app/tags/list?n=3", basic("alice", "alice-pw"))
    [sent] = upstream_requests(h)
    assert sent.target == b"/v2/team-c/app/tags/list?n=3"
    answer(h, ok(TAGS, extra=b"Content-Type: application/json\r\n" + LINK))
    r = c.reply()
    assert r.status == 200
    assert json.loads(r.body) == {"name": "team-c/app", "tags": ["stable-1", "stable-2"]}
    assert r.header(b"content-length") == b"%d" % len(r.body)
    assert r.header(b"content-type") == b"application/json"
    assert r.header(b"link") == b"<" + PUBLIC + b'/v2/team-c/app/tags/list?last=stable-2&n=3>; rel="next"'


def test_tags_list_passes_unchanged_when_no_tag_rule_applies(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    body = b'{"name": "team-a/app", "tags": ["latest", "dev"]}  \n'
    c = call(h, "GET", "/v2/team-a/app/tags/list", basic("alice", "alice-pw"))
    answer(h, ok(body, extra=LINK))
    r = c.reply()
    assert r.status == 200 and r.body == body
    assert r.header(b"link") == b"<" + PUBLIC + b'/v2/team-c/app/tags/list?last=stable-2&n=3>; rel="next"'


def test_tags_list_from_a_chunked_upstream_body(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    c = call(h, "GET", "/v2/team-c/app/tags/list", basic("alice", "alice-pw"))
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    parts = [TAGS[:17], TAGS[17:40], TAGS[40:]]
    answer(h, head)
    for part in parts:
        answer(h, b"%x\r\n" % len(part) + part + b"\r\n")
        assert not c.answered
    answer(h, b"0\r\n\r\n")
    r = c.reply()
    assert r.status == 200 and json.loads(r.body)["tags"] == ["stable-1", "stable-2"]
    assert r.header(b"content-length") == b"%d" % len(r.body)


@pytest.mark.parametrize(
    "body",
    [b"<html>not json</html>", b'{"name": "team-c/app", "tags": "stable-1"}', b'["stable-1"]',
     b'{"tags": [1, 2]}'],
)
def test_tags_list_that_is_not_a_listing_is_a_bad_gateway(htpasswd: str, body: bytes) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    c = call(h, "GET", "/v2/team-c/app/tags/list", basic("alice", "alice-pw"))
    answer(h, ok(body))
    r = c.reply()
    assert (r.status, r.code) == (502, "UNAVAILABLE")
    assert b"stable" not in r.body and b"html" not in r.body


def test_tags_list_bigger_than_the_limit_is_a_bad_gateway(htpasswd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy, "MAX_LISTING", 64)
    h = make_proxy("basic", htpasswd=htpasswd)
    big = json.dumps({"name": "team-c/app", "tags": [f"stable-{i}" for i in range(50)]}).encode()
    c = call(h, "GET", "/v2/team-c/app/tags/list", basic("alice", "alice-pw"))
    answer(h, ok(big))
    r = c.reply()
    assert (r.status, r.code) == (502, "UNAVAILABLE")
    assert b"stable" not in r.body
    # the half-read upstream connection is dropped, never handed to the next request
    h.reactor.advance(0)
    c = call(h, "GET", "/v2/team-c/app/tags/list", basic("alice", "alice-pw"))
    assert len(h.upstreams.connections) == 2
    answer(h, ok(TAGS))
    assert json.loads(c.reply().body)["tags"] == ["stable-1", "stable-2"]


def test_tags_list_errors_from_upstream_are_relayed_not_filtered(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    c = call(h, "GET", "/v2/team-c/app/tags/list", basic("alice", "alice-pw"))
    body = b'{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}'
    answer(h, ok(body, b"404 Not Found"))
    r = c.reply()
    assert (r.status, r.code, r.body) == (404, "NAME_UNKNOWN", body)


# ---------------------------------------------------------------------------
# _catalog filtering

REPOSITORIES = ["other/y", "public/base", "team-a/app", "team-a/lib", "team-a/secret", "team-b/secret"]


def _catalog(h: Harness, auth: bytes | None, n: int | None = None) -> Reply:
    """_catalog is answered from DescribeRepositories (the Harness's `repositories`), never the registry."""
    h.repositories["default"] = REPOSITORIES
    before = len(upstream_requests(h))
    r = call(h, "GET", "/v2/_catalog" + (f"?n={n}" if n is not None else ""), auth).reply()
    assert r.status == 200
    assert len(upstream_requests(h)) == before
    return r


def test_catalog_lists_only_what_the_caller_may_pull(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    r = _catalog(h, basic("carol", "carol-pw"))
    assert json.loads(r.body) == {"repositories": ["team-a/app", "team-a/lib", "team-a/secret"]}
    r = _catalog(h, None)
    assert json.loads(r.body) == {"repositories": ["public/base"]}


def test_catalog_pages_hold_only_visible_names_and_the_cursor_names_one_of_them(htpasswd: str) -> None:
    """The policy filters before paging: a page is full and its cursor never names a hidden repository."""
    h = make_proxy("basic", htpasswd=htpasswd)
    r = _catalog(h, basic("carol", "carol-pw"), n=2)
    assert json.loads(r.body) == {"repositories": ["team-a/app", "team-a/lib"]}
    assert r.header(b"link") == b'</v2/_catalog?last=team-a%2Flib&n=2>; rel="next"'
    r = _catalog(h, basic("carol", "carol-pw"), n=2)  # the next page, after the cursor
    r = call(h, "GET", "/v2/_catalog?last=team-a%2Flib&n=2", basic("carol", "carol-pw")).reply()
    assert json.loads(r.body) == {"repositories": ["team-a/secret"]} and r.header(b"link") is None


def test_catalog_drops_names_outside_the_namespace() -> None:
    h = make_proxy("none", OPEN, namespace=r"team-[a-z]+/.+", exclude=r"team-a/secret")
    r = _catalog(h, None)
    assert json.loads(r.body) == {"repositories": ["team-a/app", "team-a/lib", "team-b/secret"]}


def test_catalog_pagination_cursor_does_not_name_hidden_repositories(htpasswd: str) -> None:
    """Filtering the body is not enough if the Link cursor (`last=`) still names a hidden repository."""
    h = make_proxy("basic", htpasswd=htpasswd, namespace=r"team-a/.+")
    r = _catalog(h, basic("carol", "carol-pw"), n=3)
    assert json.loads(r.body) == {"repositories": ["team-a/app", "team-a/lib", "team-a/secret"]}
    assert r.header(b"link") is None
    r = _catalog(h, basic("carol", "carol-pw"), n=2)
    assert r.header(b"link") == b'</v2/_catalog?last=team-a%2Flib&n=2>; rel="next"'
    assert b"team-b" not in r.body


def test_tags_pagination_cursor_does_not_name_hidden_tags(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    c = call(h, "GET", "/v2/team-c/app/tags/list?n=2", basic("alice", "alice-pw"))
    page = b'{"name":"team-c/app","tags":["stable-1","hidden-dev"]}'
    answer(h, ok(page, extra=b"Link: </v2/team-c/app/tags/list?last=hidden-dev&n=2>; rel=\"next\"\r\n"))
    assert json.loads(c.reply().body)["tags"] == ["stable-1"]
    assert b"hidden-dev" not in c.transport.value()


# ---------------------------------------------------------------------------
# --auth token


def get_token(h: Harness, query: str, auth: bytes | None = None) -> Reply:
    return call(h, "GET", "/token?" + query, auth).reply()


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def access_of(token: str) -> dict[str, list[str]]:
    return {e["name"]: e["actions"] for e in claims(token)["access"]}


def alice_token(h: Harness, scope: str = "repository:team-a/app:pull,push") -> str:
    r = get_token(h, f"service={SERVICE}&scope={scope}", basic("alice", "alice-pw"))
    assert r.status == 200, r
    return json.loads(r.body)["token"]


def test_token_base_without_a_token_is_a_bearer_challenge(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    for auth in (None, basic("alice", "alice-pw")):  # Basic is for /token, not for the API
        r = assert_refused(h, call(h, "GET", "/v2/", auth), 401, "UNAUTHORIZED")
        assert r.fields[b"www-authenticate"] == [bearer_challenge()]
        assert r.header(b"docker-distribution-api-version") == b"registry/2.0"
    assert h.upstreams.connections == []


def test_token_endpoint_grants_what_the_policy_allows(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    query = f"service={SERVICE}&scope=repository:team-a/app:pull,push&scope=repository:team-b/x:pull"
    r = get_token(h, query, basic("alice", "alice-pw"))
    assert r.status == 200
    assert r.header(b"content-type") == b"application/json"
    assert r.header(b"cache-control") == b"no-store"
    body = json.loads(r.body)
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    c = claims(body["token"])
    assert c["sub"] == "alice" and c["aud"] == SERVICE and c["exp"] - c["iat"] == 300
    assert access_of(body["token"]) == {"team-a/app": ["pull", "push"]}
    assert h.upstreams.connections == []
    # the way docker sends it: percent-encoded, several scopes in one parameter
    scope = "repository%3Ateam-a%2Fapp%3Apull+repository%3Ateam-b%2Fshared%3Apull%2Cpush%2Cdelete"
    assert access_of(alice_token(h, scope)) == {"team-a/app": ["pull"], "team-b/shared": ["pull"]}


def test_token_endpoint_wrong_password_is_a_basic_challenge_for_token(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    for auth in (basic("alice", "nope"), bearer("whatever")):
        r = get_token(h, f"service={SERVICE}&scope=repository:team-a/app:pull", auth)
        assert (r.status, r.code) == (401, "UNAUTHORIZED")
        assert r.fields[b"www-authenticate"] == [b'Basic realm="' + PUBLIC + b'/token"']
        assert b"token" not in json.loads(r.body)
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "token", "result": "failure"}) == 2


def test_token_endpoint_takes_empty_basic_credentials_as_anonymous(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    r = get_token(h, f"service={SERVICE}&scope=repository:public/base:pull", basic("", ""))
    assert r.status == 200 and access_of(json.loads(r.body)["token"]) == {"public/base": ["pull"]}
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "token", "result": "failure"}) is None


def test_token_endpoint_is_throttled_too(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    for _ in range(5):
        assert get_token(h, "scope=repository:team-a/app:pull", basic("alice", "nope")).status == 401
    r = get_token(h, "scope=repository:team-a/app:pull", basic("alice", "alice-pw"))
    assert (r.status, r.code) == (429, "TOOMANYREQUESTS") and r.header(b"retry-after")


def test_a_bearer_token_is_traded_for_our_ecr_token_upstream(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    token = alice_token(h)
    sent = forwarded(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", bearer(token)))
    assert h.keeper.current is not None
    assert sent.fields[b"authorization"] == [h.keeper.current.header]
    assert token.encode() not in b"".join(t.value() for _, _, t in h.upstreams.connections)
    forwarded(h, call(h, "GET", "/v2/", bearer(token)))


def test_a_request_outside_the_tokens_scope_asks_for_that_scope(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    token = alice_token(h, "repository:team-a/app:pull")
    r = assert_refused(h, call(h, "PUT", "/v2/team-a/app/manifests/1.0", bearer(token), b"{}"), 401, "UNAUTHORIZED")
    assert r.header(b"www-authenticate") == bearer_challenge("repository:team-a/app:push", "insufficient_scope")
    r = assert_refused(h, call(h, "GET", "/v2/team-a/other/manifests/1.0", bearer(token)), 401, "UNAUTHORIZED")
    assert r.header(b"www-authenticate") == bearer_challenge("repository:team-a/other:pull", "insufficient_scope")
    # what the policy refuses stays refused, token or not
    assert_refused(h, call(h, "GET", "/v2/team-b/secret/manifests/1.0", bearer(token)), 403, "DENIED")


def test_anonymous_api_request_is_challenged_with_its_scope(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    r = assert_refused(h, call(h, "GET", "/v2/public/base/manifests/1.0"), 401, "UNAUTHORIZED")
    assert r.header(b"www-authenticate") == bearer_challenge("repository:public/base:pull")


def test_an_expired_token_is_invalid(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    token = alice_token(h)
    h.reactor.advance(299)
    forwarded(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", bearer(token)))
    h.reactor.advance(1)
    r = assert_refused(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", bearer(token)), 401, "UNAUTHORIZED", before=1)
    assert r.header(b"www-authenticate") == bearer_challenge(error="invalid_token")


@pytest.mark.parametrize(
    "auth",
    [
        bearer("not-a-jwt"),
        bearer(jwt.encode({"sub": "alice", "aud": SERVICE, "iss": "ecr-twisted", "iat": 1_000_000, "exp": 2_000_000,
                           "access": [{"type": "repository", "name": "team-a/app", "actions": ["pull"]}]},
                          b"x" * 48, algorithm="HS256")),
        b"Bearer ",
    ],
)
def test_a_garbage_or_forged_bearer_is_invalid(htpasswd: str, auth: bytes) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    r = assert_refused(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", auth), 401, "UNAUTHORIZED")
    assert r.header(b"www-authenticate") == bearer_challenge(error="invalid_token")


def test_anonymous_token_grants_only_anonymous_scopes(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    r = get_token(h, f"service={SERVICE}&scope=repository:public/base:pull,push&scope=repository:team-a/app:pull")
    assert r.status == 200
    token = json.loads(r.body)["token"]
    assert claims(token)["sub"] == ""
    assert access_of(token) == {"public/base": ["pull"]}
    forwarded(h, call(h, "GET", "/v2/public/base/manifests/1.0", bearer(token)))
    r = assert_refused(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", bearer(token)), 401, "UNAUTHORIZED", before=1)
    assert r.header(b"www-authenticate") == bearer_challenge("repository:team-a/app:pull")


def test_token_scopes_outside_the_namespace_or_malformed_grant_nothing(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd, namespace=r"team-a/.+", exclude=r"team-a/secret")
    scope = ("repository:team-a/app:pull+repository:team-a/secret:pull+repository:team-b/shared:pull"
             "+registry:catalog:*+repository:../team-a/app:pull+repository:team-a/app")
    assert access_of(alice_token(h, scope)) == {"team-a/app": ["pull"]}


def test_token_mount_needs_pull_on_the_source_in_the_token_too(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    target = f"/v2/team-a/app/blobs/uploads/?mount={DIGEST}&from=team-b/shared"
    for scope, expected in [
        ("repository:team-a/app:pull,push", b"/v2/team-a/app/blobs/uploads/"),  # policy yes, token no
        ("repository:team-a/app:pull,push+repository:team-b/shared:pull", target.encode()),
    ]:
        c = call(h, "POST", target, bearer(alice_token(h, scope)))
        assert upstream_requests(h)[-1].target == expected
        answer(h, ok(b"", b"202 Accepted"))
        assert c.reply().status == 202


def test_token_catalog_needs_a_token_and_is_filtered_by_policy(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd)
    r = assert_refused(h, call(h, "GET", "/v2/_catalog"), 401, "UNAUTHORIZED")
    assert r.header(b"www-authenticate") == bearer_challenge()
    token = json.loads(get_token(h, "scope=registry:catalog:*", basic("carol", "carol-pw")).body)["token"]
    assert access_of(token) == {}
    r = _catalog(h, bearer(token))
    assert json.loads(r.body) == {"repositories": ["team-a/app", "team-a/lib", "team-a/secret"]}


def test_token_endpoint_exists_only_in_the_modes_with_tokens(htpasswd: str) -> None:
    for mode in ("none", "webhook"):
        h = make_proxy(mode, webhook=FakeWebhook() if mode == "webhook" else None)
        r = call(h, "GET", "/token?scope=repository:team-a/app:pull", basic("alice", "alice-pw")).reply()
        assert (r.status, r.code) == (404, "NOT_FOUND") and h.upstreams.connections == []
    h = make_proxy("basic", htpasswd=htpasswd)
    r = call(h, "GET", "/token?scope=repository:team-a/app:pull", basic("alice", "alice-pw")).reply()
    assert r.status == 200 and access_of(json.loads(r.body)["token"]) == {"team-a/app": ["pull"]}
    h = make_proxy("token", htpasswd=htpasswd)
    r = call(h, "POST", "/token", basic("alice", "alice-pw"), b"grant_type=password").reply()
    assert (r.status, r.code) == (405, "UNSUPPORTED")


def test_read_only_tokens_never_carry_push(htpasswd: str) -> None:
    h = make_proxy("token", htpasswd=htpasswd, read_only=True)
    assert access_of(alice_token(h, "repository:team-a/app:*")) == {"team-a/app": ["pull"]}


# ---------------------------------------------------------------------------
# --auth passthrough

AWS = basic("AWS", "ecr-password-of-the-client")


def test_passthrough_forwards_the_clients_own_credentials() -> None:
    h = make_proxy("passthrough", OPEN)
    for target in ("/v2/", "/v2/team-a/app/manifests/1.0"):
        sent = forwarded(h, call(h, "GET", target, AWS))
        assert sent.fields[b"authorization"] == [AWS]
    assert h.keeper.current is not None
    assert h.keeper.current.header not in b"".join(t.value() for _, _, t in h.upstreams.connections)
    assert h.fetcher.calls == 0


@pytest.mark.parametrize("target", ["/v2/", "/v2/team-a/app/manifests/1.0", "/v2/_catalog"])
def test_passthrough_without_credentials_is_a_basic_challenge(target: str) -> None:
    h = make_proxy("passthrough", OPEN)
    r = assert_refused(h, call(h, "GET", target), 401, "UNAUTHORIZED")
    assert r.fields[b"www-authenticate"] == [basic_challenge()]
    assert h.upstreams.connections == []


def test_passthrough_upstream_401_is_our_own_challenge_and_no_retry() -> None:
    h = make_proxy("passthrough", OPEN)
    c = call(h, "GET", "/v2/team-a/app/manifests/1.0", AWS)
    answer(h, b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="https://' + UPSTREAM.netloc
           + b'/",service="ecr.amazonaws.com"\r\nContent-Length: 14\r\n\r\nNot Authorized')
    r = c.reply()
    assert (r.status, r.code) == (401, "UNAUTHORIZED")
    assert r.fields[b"www-authenticate"] == [basic_challenge()]
    assert b"amazonaws" not in c.transport.value()
    assert len(upstream_requests(h)) == 1 and h.fetcher.calls == 0
    assert h.sample("ecrproxy_auth_attempts_total", {"mode": "passthrough", "result": "failure"}) == 1


def test_passthrough_upstream_403_is_denied() -> None:
    h = make_proxy("passthrough", OPEN)
    c = call(h, "GET", "/v2/team-a/app/manifests/1.0", AWS)
    answer(h, ok(b'{"errors":[{"code":"DENIED","message":"User: arn:aws:iam::1:user/x is not authorized"}]}',
                 b"403 Forbidden"))
    r = c.reply()
    assert (r.status, r.code) == (403, "DENIED")
    assert b"arn:aws" not in r.body
    assert len(upstream_requests(h)) == 1


# ---------------------------------------------------------------------------
# --auth webhook


def test_webhook_allow_is_forwarded() -> None:
    hook = FakeWebhook()
    h = make_proxy("webhook", webhook=hook)
    c = call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw"))
    assert hook.question() == {"user": "alice", "password": "alice-pw", "action": "pull",
                               "repository": "team-a/app", "tag": "1.0"}
    assert h.upstreams.connections == [] and not c.answered  # nothing moves before the verdict
    hook.answer(200, {"allow": True})
    sent = forwarded(h, c)
    assert h.keeper.current is not None
    assert sent.fields[b"authorization"] == [h.keeper.current.header]
    # the verdict is remembered: the same question is not asked twice
    forwarded(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw")))
    assert len(hook.calls) == 1


def test_webhook_deny_for_an_authenticated_user_is_403() -> None:
    hook = FakeWebhook()
    h = make_proxy("webhook", webhook=hook)
    c = call(h, "PUT", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw"), b"{}")
    hook.answer(200, {"allow": False})
    r = assert_refused(h, c, 403, "DENIED")
    assert r.header(b"www-authenticate") is None
    assert h.sample("ecrproxy_access_denied_total", {"action": "push"}) == 1


@pytest.mark.parametrize(
    "auth,verdict",
    [(basic("alice", "wrong"), {"allow": False, "authenticated": False}), (None, {"allow": False})],
)
def test_webhook_unauthenticated_or_anonymous_deny_is_401(auth: bytes | None, verdict: dict[str, Any]) -> None:
    hook = FakeWebhook()
    h = make_proxy("webhook", webhook=hook)
    c = call(h, "GET", "/v2/team-a/app/manifests/1.0", auth)
    hook.answer(200, verdict)
    r = assert_refused(h, c, 401, "UNAUTHORIZED")
    assert r.fields[b"www-authenticate"] == [basic_challenge()]


@pytest.mark.parametrize("failure", ["unreachable", "status 500", "no verdict"])
def test_webhook_failure_denies_and_is_counted(failure: str) -> None:
    hook = FakeWebhook()
    h = make_proxy("webhook", webhook=hook)
    c = call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw"))
    if failure == "unreachable":
        hook.fail(ConnectionRefusedError("webhook.local"))
    elif failure == "status 500":
        hook.answer(500, {"allow": True})
    else:
        hook.answer(200, {"allowed": "yes"})
    r = assert_refused(h, c, 403, "DENIED")
    assert "unavailable" in r.error["detail"]
    assert h.upstreams.connections == []
    assert h.sample("ecrproxy_auth_webhook_errors_total") == 1
    # failures are not remembered: the next request asks again
    call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw"))
    assert len(hook.calls) == 2


def test_webhook_login_on_the_base_route() -> None:
    hook = FakeWebhook()
    h = make_proxy("webhook", webhook=hook)
    r = assert_refused(h, call(h, "GET", "/v2/"), 401, "UNAUTHORIZED")
    assert r.header(b"www-authenticate") == basic_challenge() and hook.calls == []
    c = call(h, "GET", "/v2/", basic("alice", "alice-pw"))
    assert hook.question()["action"] == "login"
    hook.answer(200, {"allow": True})
    forwarded(h, c)


def test_webhook_mount_needs_a_pull_verdict_on_the_source() -> None:
    hook = FakeWebhook()
    h = make_proxy("webhook", webhook=hook)
    c = call(h, "POST", f"/v2/team-a/app/blobs/uploads/?mount={DIGEST}&from=team-b/secret", basic("alice", "alice-pw"))
    assert hook.question()["action"] == "push"
    hook.answer(200, {"allow": True})
    assert hook.question() == {"user": "alice", "password": "alice-pw", "action": "pull",
                               "repository": "team-b/secret", "tag": None}
    hook.answer(200, {"allow": False})
    [sent] = upstream_requests(h)
    assert sent.line == b"POST /v2/team-a/app/blobs/uploads/ HTTP/1.1"
    answer(h, ok(b"", b"202 Accepted"))
    assert c.reply().status == 202


def test_webhook_catalog_asks_about_each_visible_name() -> None:
    hook = FakeWebhook()
    h = make_proxy("webhook", webhook=hook, namespace=r"team-.+")
    assert_refused(h, call(h, "GET", "/v2/_catalog"), 401, "UNAUTHORIZED")
    assert hook.calls == []
    h.repositories["default"] = REPOSITORIES
    c = call(h, "GET", "/v2/_catalog", basic("alice", "alice-pw"))
    asked = [q["repository"] for q, _ in hook.calls]
    assert asked == ["team-a/app", "team-a/lib", "team-a/secret", "team-b/secret"]
    assert {q["action"] for q, _ in hook.calls} == {"pull"}
    assert not c.answered
    for i, allow in enumerate([True, True, False, False]):
        hook.answer(200, {"allow": allow}, i)
    assert json.loads(c.reply().body) == {"repositories": ["team-a/app", "team-a/lib"]}


def test_an_opaque_cursor_is_passed_on_and_hidden_pages_are_bounded(htpasswd: str) -> None:
    """ECR's `last=` is an opaque token, not a name: it goes on unchanged. A run of pages with
    nothing visible ends the listing after MAX_HIDDEN_PAGES upstream requests instead of looping."""
    h = make_proxy("basic", htpasswd=htpasswd)
    c = call(h, "GET", "/v2/team-c/app/tags/list?n=2", basic("alice", "alice-pw"))
    page = b'{"name":"team-c/app","tags":["stable-1","hidden-dev"]}'
    answer(h, ok(page, extra=b'Link: </v2/team-c/app/tags/list?last=ZW5jcnlwdGVk&n=2>; rel="next"\r\n'))
    r = c.reply()
    assert json.loads(r.body)["tags"] == ["stable-1"]
    assert r.header(b"link") == b'</v2/team-c/app/tags/list?last=ZW5jcnlwdGVk&n=2>; rel="next"'

    before = len(upstream_requests(h))
    c = call(h, "GET", "/v2/team-c/app/tags/list?n=1", basic("alice", "alice-pw"))
    for i in range(MAX_HIDDEN_PAGES + 1):
        body = json.dumps({"name": "team-c/app", "tags": [f"hidden-{i}"]}).encode()
        answer(h, ok(body, extra=b'Link: </v2/team-c/app/tags/list?last=hidden-%d&n=1>; rel="next"\r\n' % i))
    r = c.reply()
    assert json.loads(r.body)["tags"] == [] and r.header(b"link") is None
    assert len(upstream_requests(h)) - before == MAX_HIDDEN_PAGES + 1


def test_parallel_guesses_are_counted_before_bcrypt_and_own_logins_reset_nothing(htpasswd: str) -> None:
    """Guesses sent at once all count (a check is a failure until it proves right), identical
    credentials share one check, and logging in with one's own account does not wipe the count."""
    from twisted.internet.task import Clock

    from ecr_twisted.access.decision import Identity
    from ecr_twisted.access.credentials import Credentials
    from ecr_twisted.access.htpasswd import checkpw
    from ecr_twisted.access.modes import BasicAuth

    clock = Clock()
    pending: list[tuple[Deferred[bool], bytes, bytes]] = []

    def held_check(password: bytes, hashed: bytes) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        pending.append((d, password, hashed))
        return d

    gate = Gate(AccessConfig("basic"), FixedPolicy(Policy.preset("private")), clock,
                htpasswd=Htpasswd(htpasswd, clock, check=held_check))

    strategy = gate.strategy
    assert isinstance(strategy, BasicAuth)

    def login(user: str, password: str) -> Any:
        return strategy.login(Credentials("basic", user, password), lambda: "10.9.9.9")

    results = [login("alice", f"guess-{i}") for i in range(8)]
    assert len(pending) == 5  # the 6th guess onwards was throttled before any bcrypt ran
    assert all(
        isinstance(r, Identity) and r.failed is not None and r.failed.error is not None and r.failed.error.status == 429
        for r in results[5:]
    )
    refused = login("bob", "bob-pw")
    # the address is over its limit, whoever it claims to be
    assert len(pending) == 5 and refused.failed.error.status == 429
    for d, password, hashed in pending:
        d.callback(checkpw(password, hashed))
    clock.advance(60)
    assert isinstance(login("bob", "bob-pw"), Deferred) and len(pending) == 6
    twin = login("bob", "bob-pw")
    assert len(pending) == 6  # identical credentials in flight share one check
    pending[-1][0].callback(True)
    outcomes: list[Identity] = []
    twin.addCallback(outcomes.append)
    assert outcomes[0].failed is None and outcomes[0].who.user == "bob"
    # bob's own login took back only its own count: alice's five failures still stand, so one
    # more wrong guess (allowed once the 1 s penalty is over) doubles the penalty at once
    guess = login("alice", "guess-again")
    assert isinstance(guess, Deferred)
    pending[-1][0].callback(False)
    again = login("alice", "guess-again-2")
    assert isinstance(again, Identity) and again.failed is not None
    assert again.failed.error is not None and again.failed.error.status == 429
    assert again.failed.retry_after == 3  # 2 s penalty, rounded up past its start


def _upload(h: Harness, query: str) -> Sent:
    c = call(h, "POST", "/v2/team-a/app/blobs/uploads/?" + query, basic("alice", "alice-pw"))
    sent = upstream_requests(h)[-1]
    answer(h, ok(b"", b"202 Accepted"))
    assert c.reply().status == 202
    return sent


@pytest.mark.parametrize(
    "query",
    [
        f"%6Dount={DIGEST}&from=team-b/secret",  # encoded key: registries decode it
        f"mount={DIGEST}&%66rom=team-b/secret",
        f"Mount={DIGEST}&From=team-b/secret",
        f"mount={DIGEST}&from=team-b/shared&from=team-b/secret",  # which one would the upstream read?
        f"mount={DIGEST}",  # OCI: a mount without from= lets the registry look in any repository
        f"mount={DIGEST}&from=team-b%2Fsecret",
    ],
)
def test_mount_tricks_become_plain_uploads(htpasswd: str, query: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    assert _upload(h, query).target == b"/v2/team-a/app/blobs/uploads/"


def test_a_manifest_put_by_digest_with_tag_parameters_obeys_tag_rules(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    c = call(h, "PUT", f"/v2/team-a/app/manifests/{DIGEST}?tag=latest", basic("alice", "alice-pw"), b"{}")
    assert_refused(h, c, 403, "DENIED")
    c = call(h, "PUT", f"/v2/team-a/app/manifests/{DIGEST}?tag=1.0&%74ag=latest", basic("alice", "alice-pw"), b"{}")
    assert_refused(h, c, 403, "DENIED")
    c = call(h, "PUT", f"/v2/team-a/app/manifests/{DIGEST}?tag=1.0", basic("alice", "alice-pw"), b"{}")
    forwarded(h, c, 201)


def test_webhook_wrong_credentials_are_throttled_too() -> None:
    post = FakeWebhook()
    h = make_proxy("webhook", webhook=post)
    for i in range(5):
        c = call(h, "GET", "/v2/hook/app/tags/list", basic("ci", f"guess{i}"))
        post.answer(200, {"allow": False, "authenticated": False})
        assert_refused(h, c, 401, "UNAUTHORIZED")
    asked = len(post.calls)
    c = call(h, "GET", "/v2/hook/app/tags/list", basic("ci", "guess-6"))
    assert_refused(h, c, 429, "TOOMANYREQUESTS")
    assert len(post.calls) == asked  # not even asked


def test_filtered_listings_are_asked_for_uncompressed(htpasswd: str) -> None:
    h = make_proxy("basic", htpasswd=htpasswd)
    send(h, request("GET", "/v2/team-c/app/tags/list", basic("alice", "alice-pw"),
                    headers=[(b"Accept-Encoding", b"gzip")]))
    assert upstream_requests(h)[-1].header(b"accept-encoding") is None
    send(h, request("GET", "/v2/team-a/app/tags/list", basic("alice", "alice-pw"),
                    headers=[(b"Accept-Encoding", b"gzip")]))
    assert upstream_requests(h)[-1].header(b"accept-encoding") == b"gzip"  # nothing to filter there


def test_the_per_request_fast_paths_answer_with_a_decision_not_a_deferred(htpasswd: str) -> None:
    """What nearly every request takes is decided synchronously (the handler checks
    `type(decision) is Decision`): --auth none with the open policy, a remembered Basic
    login, a valid Bearer token of ours (token mode, and basic mode's token flow)."""
    from twisted.internet.task import Clock

    from ecr_twisted.access.decision import Decision
    from ecr_twisted.registry import routes

    clock = Clock()
    peer = lambda: "10.1.2.3"  # noqa: E731
    manifest = routes.match(b"GET", b"/v2/team-a/app/manifests/1.0")
    base = routes.match(b"GET", b"/v2/")

    def check(gate: Gate, auth: bytes | None, m: routes.Match = manifest) -> Any:
        assert m.route is not None
        return gate.check(b"GET", m.route.kind, m, b"/v2/team-a/app/manifests/1.0", auth, peer)

    anonymous = Gate(AccessConfig("none"), FixedPolicy(Policy.preset("open")), clock)
    assert anonymous.open and type(check(anonymous, None)) is Decision

    users = Htpasswd(htpasswd, clock, check=synchronous_bcrypt)
    issuer = TokenIssuer(KEY, SERVICE)
    basic_gate = Gate(AccessConfig("basic", service=SERVICE), FixedPolicy(Policy.from_toml(POLICY)), clock,
                      htpasswd=users, issuer=issuer)
    assert isinstance(check(basic_gate, basic("alice", "alice-pw")), Deferred)  # the first login runs bcrypt
    for m in (manifest, base):
        remembered = check(basic_gate, basic("alice", "alice-pw"), m)
        assert type(remembered) is Decision and remembered.error is None

    token, _ = issuer.issue("alice", [("team-a/app", ["pull"])], clock.seconds())
    token_gate = Gate(AccessConfig("token", service=SERVICE), FixedPolicy(Policy.from_toml(POLICY)), clock,
                      htpasswd=users, issuer=issuer)
    for gate in (token_gate, basic_gate):
        for m in (manifest, base):
            decision = check(gate, bearer(token), m)
            assert type(decision) is Decision and decision.error is None
