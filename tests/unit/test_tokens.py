"""Token refresh on a task.Clock: schedule, backoff, resilience, single flight."""

import base64
import datetime

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from ecr_twisted.testing.doubles import FakeTokenFetcher, make_token
from ecr_twisted.ecr.tokens import READY_MARGIN, Token, TokenKeeper, backoff, parse_authorization_data, refresh_due

H = 3600.0


def keeper(clock: Clock, fetcher: FakeTokenFetcher, **kw) -> tuple[TokenKeeper, list[str]]:
    results: list[str] = []
    k = TokenKeeper(clock, fetcher, on_result=lambda r, t: results.append(r), rand=lambda: 0.5, **kw)
    return k, results


def test_refresh_due_is_half_the_lifetime_but_never_too_soon() -> None:
    assert refresh_due(make_token(now=100, lifetime=12 * H), 0.5, 60) == 100 + 6 * H
    # moto's tokens "expired" in 2015: refresh once a minute, not in a tight loop
    assert refresh_due(make_token(now=100, lifetime=-1e9), 0.5, 60) == 160


def test_backoff_grows_exponentially_is_capped_and_jittered() -> None:
    assert [backoff(n, 2, 300, lambda: 0.0) for n in (1, 2, 3, 4)] == [1, 2, 4, 8]
    assert backoff(20, 2, 300, lambda: 1.0) == 300
    assert backoff(20, 2, 300, lambda: 0.0) == 150


def test_parse_authorization_data_checks_and_strips() -> None:
    raw = base64.b64encode(b"AWS:" + b"p" * 5000).decode()
    expires = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    token = parse_authorization_data(
        {"authorizationToken": f"  {raw}\n", "expiresAt": expires, "proxyEndpoint": "https://x"}, now=5.0
    )
    assert token.authorization == raw and token.header == b"Basic " + raw.encode()
    assert token.expires_at == expires.timestamp() and token.fetched_at == 5.0
    assert raw not in repr(token)  # secrets never reach logs through repr
    with pytest.raises(ValueError):
        parse_authorization_data({"authorizationToken": "not base64!", "expiresAt": 0}, now=0)
    with pytest.raises(ValueError):
        parse_authorization_data({"authorizationToken": base64.b64encode(b"nocolon").decode(), "expiresAt": 0}, 0)


def test_refreshes_at_half_life_and_not_before() -> None:
    clock = Clock()
    fetcher = FakeTokenFetcher()
    fetcher.results = [make_token("one", now=0), make_token("two", now=6 * H)]
    k, results = keeper(clock, fetcher)
    k.start()
    assert fetcher.calls == 1 and k.current is not None
    clock.advance(6 * H - 1)
    assert fetcher.calls == 1
    clock.advance(1)
    assert fetcher.calls == 2
    assert k.current.authorization == make_token("two").authorization
    assert results == ["success", "success"]


def test_failures_back_off_keep_the_old_token_and_never_kill_the_loop() -> None:
    clock = Clock()
    fetcher = FakeTokenFetcher()
    first = make_token("one", now=0)
    fetcher.results = [first, *[RuntimeError("throttled")] * 5, make_token("two", now=6 * H + 47)]
    k, results = keeper(clock, fetcher)
    k.start()
    clock.advance(6 * H)  # due: fails
    assert fetcher.calls == 2 and k.current is first and k.failures == 1
    # backoff with rand=0.5 is 0.75 of steps 2, 4, 8, 16, 32: waits 1.5, 3, 6, 12, 24 s,
    # checked on a one-second tick: attempts at +2, +5, +11, +23 and +47 s
    start = clock.seconds()
    for at, calls in [(2, 3), (5, 4), (11, 5), (23, 6)]:
        clock.advance(start + at - 1 - clock.seconds())
        assert fetcher.calls == calls - 1, at
        clock.advance(1)
        assert fetcher.calls == calls, at
    assert k.current is first and k.token_for_request() is first
    clock.advance(start + 47 - clock.seconds())
    assert fetcher.calls == 7 and k.current is not first and k.failures == 0
    assert results.count("failure") == 5 and results[-1] == "success"
    assert k._loop.running


def test_a_raising_fetcher_does_not_stop_the_loop() -> None:
    class Exploding(FakeTokenFetcher):
        def fetch(self) -> Deferred[Token]:
            self.calls += 1
            raise ValueError("bug in the fetcher")

    clock = Clock()
    fetcher = Exploding()
    k, results = keeper(clock, fetcher)
    k.start()
    clock.advance(10)
    clock.advance(10)
    assert fetcher.calls >= 2 and k._loop.running and "failure" in results


def holding_keeper() -> tuple[FakeTokenFetcher, TokenKeeper, "Token"]:
    """A started keeper holding a 'stale' token, whose fetcher now holds every call open."""
    fetcher = FakeTokenFetcher()
    stale = make_token("stale", now=0)
    fetcher.results = [stale]
    k, _ = keeper(Clock(), fetcher)
    k.start()
    fetcher.hold = True
    return fetcher, k, stale


def test_forced_refresh_is_single_flight() -> None:
    fetcher, k, stale = holding_keeper()
    got: list = []
    for _ in range(50):
        k.force_refresh(stale).addCallback(got.append)
    assert fetcher.calls == 2  # one call for fifty refused requests
    fresh = make_token("fresh", now=0)
    fetcher.answer(fresh)
    assert got == [fresh] * 50
    # a request that failed with the stale token after the refresh: no new call
    k.force_refresh(stale).addCallback(got.append)
    assert fetcher.calls == 2 and got[-1] is fresh


def test_forced_refresh_failure_answers_none() -> None:
    fetcher, k, stale = holding_keeper()
    got: list = []
    k.force_refresh(stale).addCallback(got.append)
    fetcher.answer(RuntimeError("AWS down"))
    assert got == [None] and k.current is stale


def test_readiness_wants_five_minutes_and_expired_tokens_are_not_used() -> None:
    clock = Clock()
    fetcher = FakeTokenFetcher()
    fetcher.results = [make_token(now=0, lifetime=READY_MARGIN + 10)]
    k, _ = keeper(clock, fetcher, min_interval=1e9)
    assert not k.ready()
    k.start()
    assert k.ready()
    clock.advance(11)
    assert not k.ready() and k.token_for_request() is not None
    clock.advance(READY_MARGIN)
    assert k.token_for_request() is None


def test_forced_refreshes_are_rate_limited_and_respect_backoff() -> None:
    clock = Clock()
    fetcher = FakeTokenFetcher()
    first = make_token("one", now=0)
    fetcher.results = [first, make_token("one", now=0), RuntimeError("throttled")]
    k, _ = keeper(clock, fetcher)
    k.start()
    got: list = []
    k.force_refresh(first).addCallback(got.append)  # fetches: another token object comes back
    assert fetcher.calls == 2 and got[-1] is k.current and got[-1] is not first
    second = k.current
    clock.advance(9)
    k.force_refresh(second).addCallback(got.append)  # too soon: the same token, no call
    assert fetcher.calls == 2 and got[-1] is second
    clock.advance(1)
    k.force_refresh(second).addCallback(got.append)  # allowed again; it fails
    assert fetcher.calls == 3 and got[-1] is None and k.failures == 1
    k.next_attempt = clock.seconds() + 1000  # backing off for long
    clock.advance(30)
    k.force_refresh(second).addCallback(got.append)
    assert fetcher.calls == 3 and got[-1] is second


class FakeProcessReactor(Clock):
    """spawnProcess that records the child instead of starting one."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple] = []
        self.signals: list[str] = []

    def spawnProcess(self, proto, executable, args, env=None, **kw):
        reactor = self

        class Process:
            def signalProcess(self, sig: str) -> None:
                reactor.signals.append(sig)

        self.spawned.append((proto, executable, args, env))
        return Process()


def test_process_fetcher_runs_a_child_and_parses_its_answer() -> None:
    from twisted.internet.error import ProcessDone
    from twisted.python.failure import Failure

    from ecr_twisted.ecr.tokens import ProcessTokenFetcher

    reactor = FakeProcessReactor()
    reactor.advance(1000)
    fetcher = ProcessTokenFetcher(reactor, "eu-west-1", registry_id="123456789012", endpoint_url="http://moto")
    got: list = []
    fetcher.fetch().addCallback(got.append)
    proto, executable, args, env = reactor.spawned[0]
    assert args[1:] == ["-m", "ecr_twisted.ecr.fetch_token", "--region", "eu-west-1", "--registry-id", "123456789012",
                        "--ecr-endpoint-url", "http://moto"]
    raw = base64.b64encode(b"AWS:" + b"s" * 4000).decode()
    proto.outReceived(b'{"authorizationToken": "' + raw[:100].encode())
    proto.outReceived(raw[100:].encode() + b'", "expiresAt": 44200.5, "proxyEndpoint": "https://x"}')
    proto.processEnded(Failure(ProcessDone(0)))
    [token] = got
    assert token.authorization == raw and token.expires_at == 44200.5 and token.fetched_at == 1000


def test_process_fetcher_failures_and_timeouts_are_errors_not_hangs() -> None:
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    from ecr_twisted.ecr.tokens import ProcessTokenFetcher, TokenFetchError

    reactor = FakeProcessReactor()
    fetcher = ProcessTokenFetcher(reactor, "eu-west-1", timeout=60)
    errors: list = []
    fetcher.fetch().addErrback(errors.append)
    proto = reactor.spawned[0][0]
    proto.errReceived(b"ClientError: An error occurred (AccessDeniedException) when calling GetAuthorizationToken\n")
    proto.processEnded(Failure(ProcessTerminated(exitCode=1)))
    assert errors[0].check(TokenFetchError) and "AccessDeniedException" in str(errors[0].value)
    fetcher.fetch().addErrback(errors.append)
    reactor.advance(60)
    assert reactor.signals == ["KILL"] and errors[1].check(TokenFetchError) and "60 s" in str(errors[1].value)
