"""The proxy's side of several upstreams' ECR API: child command lines and environments, the repository
listing cache (TTL, one shared call, stale fallback, denied vs unavailable), StaticTokens, named keepers."""

from __future__ import annotations

import base64
import json
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.python.failure import Failure

from ecr_twisted.ecr.aws import EXTERNAL_ID_ENV
from ecr_twisted.ecr.child import child_args, child_env
from ecr_twisted.ecr.repositories import (
    STALE_FACTOR,
    CatalogDenied,
    CatalogUnavailable,
    ListingError,
    RepositoryCache,
    RepositoryLister,
)
from ecr_twisted.ecr.tokens import (
    ProcessTokenFetcher,
    StaticTokens,
    Token,
    TokenFetchError,
    TokenKeeper,
    keeper_for,
)
from ecr_twisted.testing.doubles import FakeTokenFetcher, make_token
from ecr_twisted.upstreams.spec import UpstreamSpec, implicit

ROLE = "arn:aws:iam::222222222222:role/ecr-reader"
PROXY = "http://user:proxysecret@egress.example:3128"


class FakeProcessReactor(Clock):
    """spawnProcess that records the child instead of starting one."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, str, list[str], dict[str, str]]] = []
        self.signals: list[str] = []

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: dict[str, str], **kw: Any) -> Any:
        reactor = self

        class Process:
            def signalProcess(self, sig: str) -> None:
                reactor.signals.append(sig)

        self.spawned.append((proto, executable, args, env))
        return Process()


def role_spec(**kw: Any) -> UpstreamSpec:
    base: dict[str, Any] = dict(
        name="shared", registry_id="222222222222", region="eu-west-1", credentials="role", profile="base",
        role_arn=ROLE, external_id="ext-secret-42", session_name="proxy-1",
        ecr_endpoint_url="http://ecr.test", sts_endpoint_url="http://sts.test", prefix="shared",
    )
    base.update(kw)
    return UpstreamSpec(**base)


# ---------------------------------------------------------------- command lines and environments


def test_token_fetcher_for_a_role_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("https_proxy", "http://old.example:1")  # lower case would win in the child
    monkeypatch.setenv(EXTERNAL_ID_ENV, "leaked-from-parent")
    reactor = FakeProcessReactor()
    fetcher = ProcessTokenFetcher.for_upstream(reactor, role_spec(), {"HTTPS_PROXY": PROXY, "HTTP_PROXY": PROXY})
    fetcher.fetch()
    _, _, args, env = reactor.spawned[0]
    assert args[1:] == ["-m", "ecr_twisted.ecr.fetch_token", "--region", "eu-west-1", "--registry-id", "222222222222",
                        "--profile", "base", "--role-arn", ROLE, "--session-name", "proxy-1",
                        "--ecr-endpoint-url", "http://ecr.test", "--sts-endpoint-url", "http://sts.test"]
    assert "ext-secret-42" not in " ".join(args) and PROXY not in " ".join(args)  # argv is visible in ps
    assert env[EXTERNAL_ID_ENV] == "ext-secret-42"
    assert env["HTTPS_PROXY"] == PROXY and env["HTTP_PROXY"] == PROXY and "https_proxy" not in env


def test_default_and_profile_upstreams_have_no_role() -> None:
    reactor = FakeProcessReactor()
    ProcessTokenFetcher.for_upstream(reactor, implicit("111111111111", "us-east-1", None, None)).fetch()
    ProcessTokenFetcher.for_upstream(reactor, role_spec(credentials="profile", profile="prod")).fetch()
    ProcessTokenFetcher.for_upstream(reactor, role_spec(credentials="default")).fetch()
    default, profile, chain = (s[2][3:] for s in reactor.spawned)
    assert default == ["--region", "us-east-1", "--registry-id", "111111111111"]
    assert "--profile" in profile and "prod" in profile and "--role-arn" not in profile
    assert "--profile" not in chain and "--role-arn" not in chain
    assert all(EXTERNAL_ID_ENV not in s[3] for s in reactor.spawned)


def test_the_keyword_constructor_still_works() -> None:
    reactor = FakeProcessReactor()
    ProcessTokenFetcher(reactor, region="eu-west-1", registry_id="1", endpoint_url="http://moto").fetch()
    assert reactor.spawned[0][2][3:] == ["--region", "eu-west-1", "--registry-id", "1",
                                         "--ecr-endpoint-url", "http://moto"]


def test_a_registry_upstream_has_no_ecr_api() -> None:
    spec = UpstreamSpec("hub", kind="registry", url="https://mirror.example", credentials="none")
    with pytest.raises(ValueError, match="hub"):
        ProcessTokenFetcher.for_upstream(Clock(), spec)
    with pytest.raises(ValueError, match="role-arn"):
        ProcessTokenFetcher.for_upstream(Clock(), role_spec(role_arn=None))
    with pytest.raises(ValueError, match="without profile"):
        RepositoryLister(Clock(), role_spec(credentials="profile", profile=None))


def test_child_env_replaces_every_spelling_of_a_proxy_variable() -> None:
    base = {"PATH": "/bin", "no_proxy": "internal", "HTTPS_PROXY": "x", "https_proxy": "y", "HOME": "/root"}
    env = child_env(base, {"HTTPS_PROXY": PROXY, "NO_PROXY": ".corp"})
    assert env == {"PATH": "/bin", "HOME": "/root", "HTTPS_PROXY": PROXY, "NO_PROXY": ".corp"}
    assert child_env(base, {}) == base


def test_the_token_child_tells_its_error_code() -> None:
    reactor = FakeProcessReactor()
    errors: list[Failure] = []
    ProcessTokenFetcher.for_upstream(reactor, role_spec()).fetch().addErrback(errors.append)
    proto = reactor.spawned[0][0]
    proto.outReceived(json.dumps({"error": "AccessDenied", "message": "ClientError: ... AssumeRole"}).encode())
    proto.errReceived(b"ClientError: An error occurred (AccessDenied) when calling the AssumeRole operation\n")
    proto.processEnded(Failure(ProcessTerminated(exitCode=1)))
    error = errors[0].value
    assert isinstance(error, TokenFetchError)
    assert error.code == "AccessDenied" and "AssumeRole" in str(error)


# ---------------------------------------------------------------- the lister


def ended(proto: Any, out: bytes, status: int = 0, err: bytes = b"") -> None:
    proto.outReceived(out)
    if err:
        proto.errReceived(err)
    proto.processEnded(Failure(ProcessDone(0) if status == 0 else ProcessTerminated(exitCode=status)))


def test_lister_runs_its_child_and_parses() -> None:
    reactor = FakeProcessReactor()
    lister = RepositoryLister(reactor, role_spec(), {"HTTPS_PROXY": PROXY}, page_size=200)
    got: list[Any] = []
    lister.fetch().addBoth(got.append)
    _, _, args, env = reactor.spawned[0]
    assert args[1:4] == ["-m", "ecr_twisted.ecr.list_repositories", "--region"]
    assert args[-2:] == ["--page-size", "200"] and "ext-secret-42" not in args
    assert env[EXTERNAL_ID_ENV] == "ext-secret-42" and env["HTTPS_PROXY"] == PROXY
    ended(reactor.spawned[0][0], b'["app", "base/img"]')
    assert got == [["app", "base/img"]] and lister.name == "shared"


@pytest.mark.parametrize("out", [b"", b"{", b'{"a": 1}', b'["ok", 3]'])
def test_lister_refuses_what_is_not_a_list_of_names(out: bytes) -> None:
    reactor = FakeProcessReactor()
    got: list[Any] = []
    RepositoryLister(reactor, role_spec()).fetch().addBoth(got.append)
    ended(reactor.spawned[0][0], out)
    assert isinstance(got[0], Failure) and got[0].check(ListingError)


def test_lister_timeout_kills_the_child() -> None:
    reactor = FakeProcessReactor()
    got: list[Any] = []
    RepositoryLister(reactor, role_spec(), timeout=30).fetch().addBoth(got.append)
    reactor.advance(30)
    assert reactor.signals == ["KILL"] and got[0].check(ListingError) and "30 s" in str(got[0].value)



def test_one_child_runner_serves_both_children() -> None:
    """EcrChild: command line, environment made at each run (the proxy's own may change), the
    caller's error class and name in failures; the token fetcher and the lister are built on it."""
    from ecr_twisted.ecr.child import ChildFailed, EcrChild

    class Failed(ChildFailed):
        pass

    reactor = FakeProcessReactor()
    child = EcrChild(reactor, "some.module", role_spec(), Failed, "some child", extra=["--x", "1"],
                     proxy_env={"HTTPS_PROXY": PROXY}, timeout=5, python="/py")
    assert child.args == ["/py", "-m", "some.module", *child_args(role_spec()), "--x", "1"]
    assert "ext-secret-42" not in repr(child) and "ext-secret-42" not in child.args
    got: list[Any] = []
    child.run().addBoth(got.append)
    proto, executable, args, env = reactor.spawned[0]
    assert executable == "/py" and args == child.args
    assert env[EXTERNAL_ID_ENV] == "ext-secret-42" and env["HTTPS_PROXY"] == PROXY
    ended(proto, b'{"error": "ThrottlingException"}', 1, b"ClientError: slow down\n")
    assert got[0].check(Failed) and got[0].value.code == "ThrottlingException"
    assert str(got[0].value) == "ClientError: slow down"
    child.run().addBoth(got.append)
    reactor.advance(5)
    assert got[1].check(Failed) and str(got[1].value) == "some child gave no answer in 5 s"
    fetcher = ProcessTokenFetcher.for_upstream(reactor, role_spec(), {"HTTPS_PROXY": PROXY}, timeout=7)
    lister = RepositoryLister(reactor, role_spec(), {"HTTPS_PROXY": PROXY}, timeout=7)
    for runner, module in ((fetcher.child, "ecr_twisted.ecr.fetch_token"),
                           (lister.child, "ecr_twisted.ecr.list_repositories")):
        assert runner.args[1:] == ["-m", module, *child_args(role_spec())]
        assert (runner.proxy_env, runner.external_id, runner.timeout) == ({"HTTPS_PROXY": PROXY}, "ext-secret-42", 7)

# ---------------------------------------------------------------- the cache


class FakeLister:
    name = "prod"

    def __init__(self) -> None:
        self.calls: list[Deferred[list[str]]] = []

    def fetch(self) -> Deferred[list[str]]:
        d: Deferred[list[str]] = Deferred()
        self.calls.append(d)
        return d


def cache(ttl: float = 30.0, retry_after: float = 5.0) -> tuple[Clock, FakeLister, RepositoryCache, list[Any]]:
    clock = Clock()
    lister = FakeLister()
    c = RepositoryCache(lister, clock, ttl, retry_after=retry_after)
    events: list[Any] = []
    c.log = Logger(observer=cast(ILogObserver, events.append))
    return clock, lister, c, events


def collect(d: Deferred[list[str]]) -> list[Any]:
    got: list[Any] = []
    d.addBoth(got.append)
    return got


def test_concurrent_callers_share_one_call_and_the_listing_lives_ttl() -> None:
    clock, lister, c, _ = cache(ttl=30)
    a, b = collect(c.names()), collect(c.names())
    assert len(lister.calls) == 1 and a == b == []
    lister.calls[0].callback(["x", "y"])
    assert a == b == [["x", "y"]]
    a[0].append("mutated by a caller")
    clock.advance(29.9)
    assert collect(c.names()) == [["x", "y"]] and len(lister.calls) == 1
    clock.advance(0.1)
    late = collect(c.names())
    assert len(lister.calls) == 2 and late == []
    lister.calls[1].callback(["z"])
    assert late == [["z"]]


def unavailable() -> ListingError:
    return ListingError("ClientError: An error occurred (ThrottlingException)", "ThrottlingException")


@pytest.mark.parametrize("code", ["AccessDeniedException", "AccessDenied", "UnauthorizedOperation"])
def test_access_denied_is_told_as_such(code: str) -> None:
    clock, lister, c, _ = cache()
    got = collect(c.names())
    lister.calls[0].errback(ListingError(f"ClientError: An error occurred ({code})", code))
    err = got[0].value
    assert isinstance(err, CatalogDenied) and err.upstream == "prod" and code in err.message


def test_other_failures_are_unavailable_and_reused_briefly() -> None:
    clock, lister, c, _ = cache(ttl=30, retry_after=5)
    first = collect(c.names())
    lister.calls[0].errback(unavailable())
    assert isinstance(first[0].value, CatalogUnavailable)
    clock.advance(4.9)
    again = collect(c.names())
    assert len(lister.calls) == 1 and isinstance(again[0].value, CatalogUnavailable)
    clock.advance(0.1)
    c.names()
    assert len(lister.calls) == 2


def test_a_raising_lister_is_unavailable_not_a_crash() -> None:
    class Broken(FakeLister):
        def fetch(self) -> Deferred[list[str]]:
            raise RuntimeError("bug")

    c = RepositoryCache(Broken(), Clock(), 30)
    got = collect(c.names())
    assert isinstance(got[0].value, CatalogUnavailable) and "bug" in got[0].value.message


def test_a_stale_listing_stands_in_for_up_to_ten_ttls_logged_once() -> None:
    clock, lister, c, events = cache(ttl=30, retry_after=5)
    c.names()
    lister.calls[0].callback(["old"])
    clock.advance(31)
    got = collect(c.names())
    lister.calls[1].errback(unavailable())
    assert got == [["old"]]
    clock.advance(10)
    got = collect(c.names())
    lister.calls[2].errback(unavailable())
    assert got == [["old"]]
    warnings = [formatEvent(e) for e in events]
    assert len(warnings) == 1 and "prod" in warnings[0] and "ThrottlingException" in warnings[0]
    clock.advance(STALE_FACTOR * 30 - 41 + 1)  # older than ten TTLs: no longer served
    got = collect(c.names())
    lister.calls[3].errback(unavailable())
    assert isinstance(got[0].value, CatalogUnavailable)
    got = collect(c.names())  # within retry_after: the failure again, no call
    assert isinstance(got[0].value, CatalogUnavailable) and len(lister.calls) == 4
    clock.advance(5)
    got = collect(c.names())
    lister.calls[4].callback(["new"])
    assert got == [["new"]] and "works again" in formatEvent(events[-1])


def test_a_denial_is_not_hidden_behind_a_stale_listing() -> None:
    clock, lister, c, _ = cache(ttl=30)
    c.names()
    lister.calls[0].callback(["old"])
    clock.advance(31)
    got = collect(c.names())
    lister.calls[1].errback(ListingError("denied", "AccessDeniedException"))
    assert isinstance(got[0].value, CatalogDenied)


def test_ttl_zero_lists_every_time_but_still_shares() -> None:
    clock, lister, c, _ = cache(ttl=0)
    a, b = collect(c.names()), collect(c.names())
    lister.calls[0].callback(["x"])
    assert a == b == [["x"]]
    c.names()
    assert len(lister.calls) == 2


# ---------------------------------------------------------------- static tokens


def registry(**kw: Any) -> UpstreamSpec:
    return UpstreamSpec("mirror", kind="registry", url="https://mirror.example:5000", **kw)


def test_static_credentials_give_a_basic_header_and_never_show_the_password() -> None:
    keeper = StaticTokens(registry(credentials="static", username="robot", password="s3cr3t-pw"))
    token = keeper.token_for_request()
    assert token.header == b"Basic " + base64.b64encode(b"robot:s3cr3t-pw")
    assert token.endpoint == "https://mirror.example:5000"
    for shown in (repr(keeper), str(keeper), repr(token)):
        assert "s3cr3t-pw" not in shown and base64.b64encode(b"robot:s3cr3t-pw").decode() not in shown
    assert "robot" in repr(keeper)


def test_no_credentials_is_a_token_whose_header_is_empty() -> None:
    keeper = StaticTokens(registry(credentials="none"))
    token = keeper.token_for_request()
    assert token is not None and token.header == b""  # send no Authorization
    assert "anonymous" in repr(keeper)


def test_a_registry_without_a_credentials_key_is_static_with_a_username_else_anonymous() -> None:
    assert StaticTokens(registry()).current.header == b""
    with_user = StaticTokens(registry(username="robot", password="pw"))
    assert with_user.current.header == b"Basic " + base64.b64encode(b"robot:pw")


def test_static_tokens_are_always_ready_and_never_refreshed() -> None:
    keeper = StaticTokens(registry(credentials="none"))
    token = keeper.current
    got: list[Any] = []
    keeper.start().addCallback(got.append)
    keeper.first_token().addCallback(got.append)
    keeper.force_refresh(token).addCallback(got.append)
    assert got == [None, token, token]
    assert keeper.ready() and keeper.ready(1e12) and not keeper.expired()
    assert keeper.wait_for_token(5) is None and token.usable(1e12)
    keeper.stop()


@pytest.mark.parametrize("kw, message", [
    (dict(credentials="static", username="robot"), "password"),
    (dict(credentials="static", username="ro:bot", password="p"), "':'"),
    (dict(credentials="role"), "ECR"),
])
def test_static_tokens_refuse_what_cannot_work(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StaticTokens(registry(**kw))
    with pytest.raises(ValueError, match="url"):
        StaticTokens(UpstreamSpec("x", kind="registry", credentials="none"))


def test_ecr_tokens_still_send_their_header() -> None:
    token = make_token("abc", now=0)
    assert token.header.startswith(b"Basic ") and len(token.header) > len(b"Basic ")
    assert Token(authorization="", expires_at=1, endpoint="", fetched_at=0).header == b""


# ---------------------------------------------------------------- one keeper per upstream


def test_keeper_for_picks_the_keeper_and_names_it() -> None:
    results: list[tuple[str, str]] = []
    fetcher = FakeTokenFetcher()
    fetcher.results = [RuntimeError("AccessDenied on AssumeRole")]
    clock = Clock()
    keeper = keeper_for(clock, role_spec(), on_result=lambda r, t: results.append(("shared", r)), fetcher=fetcher)
    assert isinstance(keeper, TokenKeeper) and keeper.name == "shared"
    events: list[Any] = []
    keeper.log = Logger(observer=cast(ILogObserver, events.append))
    keeper.start()
    assert results == [("shared", "failure")]
    [line] = [formatEvent(e) for e in events]
    assert "(upstream shared)" in line and events[0]["upstream"] == "shared"
    keeper.stop()
    assert isinstance(keeper_for(clock, registry(credentials="none")), StaticTokens)
    spawned = keeper_for(FakeProcessReactor(), role_spec(), proxy_env={"HTTPS_PROXY": PROXY})
    assert isinstance(spawned, TokenKeeper)


def test_the_implicit_upstreams_log_lines_are_as_before() -> None:
    fetcher = FakeTokenFetcher()
    fetcher.results = [make_token(now=0)]
    keeper = TokenKeeper(Clock(), fetcher)
    events: list[Any] = []
    keeper.log = Logger(observer=cast(ILogObserver, events.append))
    keeper.start()
    assert formatEvent(events[0]).startswith("ECR token refreshed; expires in")
    keeper.stop()


def test_a_failed_listing_is_logged_once_per_run_of_failures_with_aws_words() -> None:
    """Clients are told only "denied" or "unavailable" (registry.catalog): AWS's own text, which
    names the principal, goes to the operator's log, once until listing works again."""
    clock, lister, c, events = cache(ttl=30, retry_after=5)
    c.names()
    lister.calls[0].errback(ListingError("User: arn:aws:iam::1:user/p is not authorized", "AccessDeniedException"))
    clock.advance(5)
    c.names()
    lister.calls[1].errback(unavailable())
    lines = [formatEvent(e) for e in events]
    assert len(lines) == 1 and "prod" in lines[0] and "arn:aws:iam::1:user/p" in lines[0]
    clock.advance(5)
    c.names()
    lister.calls[2].callback(["x"])
    assert "works again" in formatEvent(events[-1])
    clock.advance(60)
    c.names()
    lister.calls[3].errback(unavailable())
    assert len(events) == 3 and "ThrottlingException" in formatEvent(events[-1])
