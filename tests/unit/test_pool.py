"""The upstream pool: every place taken is given back exactly once, a full pool answers 503 soon,
and long transfers never starve short exchanges (issue #11)."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure

from ecr_twisted.http.origin import Origin, UpstreamError
from ecr_twisted.http.upstream import CLASSES, LONG, SHORT, UpstreamConnection, UpstreamPool, default_reserved
from ecr_twisted.testing.doubles import Harness, MemoryUpstreams

# POOL_PROPERTY_SCALE=20 (say) multiplies the number of examples for a deeper, slower search.
_SCALE = max(1, int(os.environ.get("POOL_PROPERTY_SCALE", "1")))

BLOB = b"/v2/app/blobs/sha256:" + b"ab" * 32


def get(path: bytes = b"/v2/app/manifests/1.0") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: registry.example.com\r\n\r\n"


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    """Failures logged while the test runs (unhandled errors in Deferreds show up at garbage collection)."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            events.append(event)

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        gc.collect()
        globalLogPublisher.removeObserver(observer)


def _failures(events: list[dict[str, Any]]) -> list[str]:
    gc.collect()  # a Deferred left holding a failure logs it when collected
    return [repr(e.get("log_failure") or e.get("log_format")) for e in events]


def test_a_client_that_leaves_while_its_connect_is_under_way_gives_the_place_back(
    logged_errors: list[dict[str, Any]],
) -> None:
    """Fault 0 of issue #11 (mass client disconnect): a queued request is handed a new connect when a
    place frees; its client leaves before the connect completes. That place must come back."""
    h = Harness()
    n = h.pool.max_per_origin
    busy = [h.client() for _ in range(n)]
    for proto, _ in busy:
        proto.dataReceived(get())
    assert len(h.upstreams.connections) == n
    late, _ = h.client()
    late.dataReceived(get())  # the pool is full: waits
    h.upstreams.hold = True
    first = h.upstreams.connections[0][1]
    first.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    h.reactor.advance(0)  # the closed connection is lost: its place goes to the waiting request
    assert len(h.upstreams.pending) == 1
    late.connectionLost(Failure(ConnectionDone()))  # ... whose client leaves before the connect completes
    if h.upstreams.pending:  # a connect nobody waits for may be stopped, or completed and kept
        h.upstreams.complete()
    h.upstreams.hold = False
    for _, conn, _ in h.upstreams.connections[1:n]:
        conn.dataReceived(OK)
    # every place is free again: n requests at once all go upstream at once
    clients = [h.client() for _ in range(n)]
    for proto, _ in clients:
        proto.dataReceived(get())
    assert sum(t.value().count(b"GET /v2/app/manifests/1.0 ") for _, _, t in h.upstreams.connections) == 2 * n
    assert _failures(logged_errors) == []
    for _, conn, _ in h.upstreams.connections:
        if conn.connected_ and conn.place == "short":
            conn.dataReceived(OK)
    assert h.config.upstream is not None
    held, idle, short, long = h.pool.counts(h.config.upstream)
    assert (held, idle, short, long) == (n, n, 0, 0)  # nothing in use, nothing lost
    h.close()


def test_long_transfers_holding_every_long_place_do_not_stop_short_exchanges() -> None:
    """Fault 1 of issue #11: slow readers of blobs and slow uploaders held every pooled connection,
    and no API check or manifest got through. Long transfers now hold at most their share."""
    h = Harness()
    n = h.pool.max_per_origin
    slow: list[Any] = []
    # slow readers: blob GETs whose clients stop reading (their socket buffers are full)
    for _ in range(2):
        proto, client = h.client()
        proto.dataReceived(get(BLOB))
        slow.append((proto, client))
    # slow uploaders: a layer chunk and a manifest whose bodies trickle in
    for target in (b"/v2/app/blobs/uploads/u1", b"/v2/app/manifests/2.0"):
        proto, client = h.client()
        method = b"PATCH" if b"uploads" in target else b"PUT"
        proto.dataReceived(method + b" " + target + b" HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\nx")
        slow.append((proto, client))
    for _ in range(n):  # more blob GETs than the pool has places
        proto, client = h.client()
        proto.dataReceived(get(BLOB))
        slow.append((proto, client))
    for _, conn, _ in h.upstreams.connections:
        if conn._attempt is not None and conn._attempt.method == b"GET":
            conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    for _, client in slow:
        if client.producer is not None:
            client.producer.pauseProducing()  # the client reads no more
    long_places = len(h.upstreams.connections)
    assert long_places < n  # long transfers hold no more than their share...
    # ... so the API check, manifests, HEADs and listings still go upstream at once, one after the other
    for target, method in [(b"/v2/", b"GET"), (b"/v2/app/manifests/1.0", b"GET"), (b"/v2/app/manifests/1.0", b"HEAD"),
                           (BLOB, b"HEAD"), (b"/v2/app/tags/list", b"GET")]:
        proto, client = h.client()
        proto.dataReceived(method + b" " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        conn, upstream = h.upstreams.last()
        assert method + b" " + target + b" HTTP/1.1\r\n" in upstream.value()
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + (b"" if method == b"HEAD" else b"{}")
        conn.dataReceived(answer)
        assert client.value().startswith(b"HTTP/1.1 200 OK\r\n"), (target, client.value())
    assert len(h.upstreams.connections) == long_places + 1  # one short place, reused
    assert h.sample("ecrproxy_upstream_connections_in_use", {"class": "long"}) == n - h.pool.reserved
    assert h.sample("ecrproxy_upstream_connections_in_use", {"class": "short"}) == 0
    assert h.sample("ecrproxy_upstream_connections_idle") == 1
    waiting = h.sample("ecrproxy_upstream_waiting", {"class": "long"})
    assert waiting == len(slow) - (n - h.pool.reserved)
    h.reactor.advance(h.pool.wait)  # the long transfers beyond their share are refused, soon
    refused = [c for _, c in slow if c.value().startswith(b"HTTP/1.1 503 ")]
    assert len(refused) == waiting and all(b"\r\nRetry-After: " in c.value() for c in refused)
    assert h.sample("ecrproxy_upstream_refused_total", {"class": "long"}) == waiting
    assert h.sample("ecrproxy_upstream_waiting", {"class": "long"}) == 0
    h.close()


# --- the pool alone, under random interleavings ------------------------------------------

ORIGINS = (Origin("https", "registry.example"), Origin("https", "storage.example"))


class _Request:
    """One acquire and what became of it, as its caller sees it."""

    def __init__(self, pool: UpstreamPool, origin: Origin, cls: str) -> None:
        self.origin = origin
        self.cls = cls
        self.results: list[Any] = []
        self.conn: UpstreamConnection | None = None  # held until released or lost
        self.left = False  # the caller cancelled
        self.d = pool.acquire(origin, cls)
        self.d.addBoth(self._answered)

    def _answered(self, result: Any) -> None:
        self.results.append(result)
        if isinstance(result, UpstreamConnection):
            self.conn = result
        return None  # failures are expected answers: never left unhandled


class PoolMachine(RuleBasedStateMachine):
    """Acquires of both classes on two origins, connects that succeed or fail, clients that leave,
    time passing (the pool's wait, idle timeouts), releases and connections lost, in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.reactor = MemoryReactorClock()
        self.upstreams = MemoryUpstreams(self.reactor)
        self.upstreams.hold = True
        self.connects: list[Deferred[Any]] = []

        def connect(origin: Origin, conn: UpstreamConnection) -> Deferred[Any]:
            d = self.upstreams(origin, conn)
            self.connects.append(d)
            return d

        self.pool = UpstreamPool(self.reactor, max_per_origin=4, connector=connect, wait=2.0, idle_timeout=7.0)
        self.requests: list[_Request] = []
        self.errors: list[Any] = []
        self.observer = cast(ILogObserver, self._log)
        globalLogPublisher.addObserver(self.observer)

    def _log(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.errors.append(event)

    def _pick(self, items: list[Any], i: int) -> Any:
        return items[i % len(items)]

    def _unanswered(self) -> list[_Request]:
        return [r for r in self.requests if not r.results]

    def _holders(self) -> list[_Request]:
        return [r for r in self.requests if r.conn is not None]

    def _take(self, i: int) -> UpstreamConnection:
        r = self._pick(self._holders(), i)
        conn, r.conn = r.conn, None
        assert conn is not None
        return conn

    @rule(origin=st.sampled_from(ORIGINS), cls=st.sampled_from(CLASSES))
    def acquire(self, origin: Origin, cls: str) -> None:
        self.requests.append(_Request(self.pool, origin, cls))

    @precondition(lambda self: self.upstreams.pending)
    @rule(i=st.integers(0, 99))
    def connect_succeeds(self, i: int) -> None:
        self._pick(self.upstreams.pending, i)
        self.upstreams.complete(i % len(self.upstreams.pending))

    @precondition(lambda self: self.upstreams.pending)
    @rule(i=st.integers(0, 99), timeout=st.booleans())
    def connect_fails(self, i: int, timeout: bool) -> None:
        self._pick(self.upstreams.pending, i)
        self.upstreams.fail(i % len(self.upstreams.pending), TimeoutError() if timeout else None)

    @precondition(lambda self: self._unanswered())
    @rule(i=st.integers(0, 99))
    def client_leaves(self, i: int) -> None:
        r = self._pick(self._unanswered(), i)
        r.left = True
        r.d.cancel()

    @rule(late=st.booleans())
    def cancels_come_too_late(self, late: bool) -> None:
        """From now on, cancelling a connect under way stops it, or finds it already made."""
        self.upstreams.too_late_to_cancel = late

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.0]))
    def time_passes(self, seconds: float) -> None:
        self.reactor.advance(seconds)

    @precondition(lambda self: self._holders())
    @rule(i=st.integers(0, 99))
    def request_done(self, i: int) -> None:
        self.pool.release(self._take(i))

    @precondition(lambda self: self._holders())
    @rule(i=st.integers(0, 99), abort=st.booleans())
    def held_connection_lost(self, i: int, abort: bool) -> None:
        conn = self._take(i)
        if abort:  # the proxy cuts it (client left mid-body, bad framing)
            conn.abort()
        else:  # the server closes it
            conn.transport.loseConnection()
        self.reactor.advance(0)

    def _idle(self) -> list[UpstreamConnection]:
        held = {id(r.conn) for r in self._holders()}
        return [c for _, c, _ in self.upstreams.connections if c.connected_ and id(c) not in held]

    @precondition(lambda self: self._idle())
    @rule(i=st.integers(0, 99))
    def idle_connection_closed_by_server(self, i: int) -> None:
        self._pick(self._idle(), i).transport.loseConnection()
        self.reactor.advance(0)

    @invariant()
    def counts_equal_the_connections_held(self) -> None:
        held = [r.conn for r in self._holders()]
        assert len({id(c) for c in held}) == len(held), "one connection handed to two requests"
        assert all(c is not None and c.connected_ for c in held)
        for origin in ORIGINS:
            pending = [c for o, c, _ in self.upstreams.pending if o is origin]
            live = [c for o, c, _ in self.upstreams.connections if o is origin and c.connected_]
            mine = [r for r in self._holders() if r.origin is origin]
            open_, idle, short, long = self.pool.counts(origin)
            assert open_ == len(pending) + len(live) <= self.pool.max_per_origin
            assert idle == len(live) - len(mine)
            in_use = {SHORT: short, LONG: long}
            assert long <= self.pool.cap[LONG]
            for cls in CLASSES:
                connecting = [c for c in pending if c.place == cls]
                assert in_use[cls] == len(connecting) + len([r for r in mine if r.cls == cls])
                # every request not answered yet is queued or has a connect under way, never both
                waiting = self.pool.waiting(origin, cls)
                assert waiting + len(connecting) == len([r for r in self._unanswered() if r.origin is origin
                                                         and r.cls == cls])
                if waiting:  # nobody waits while there is a place for them
                    assert in_use[cls] >= self.pool.cap[cls] or (idle == 0 and open_ >= self.pool.max_per_origin)
        assert all(len(r.results) <= 1 for r in self.requests)
        for r in self.requests:
            if r.left:  # a caller that left is told so, and never handed a connection
                assert r.conn is None and isinstance(r.results[0], Failure)
                assert r.results[0].check(CancelledError)
        assert self.errors == []

    def teardown(self) -> None:
        try:
            # let everything end: connects complete, requests finish, queues time out
            for _ in range(100):
                if self.upstreams.pending:
                    self.upstreams.complete()
                elif self._holders():
                    r = self._holders()[0]
                    conn, r.conn = r.conn, None
                    assert conn is not None
                    self.pool.release(conn)
                elif self._unanswered():
                    self.reactor.advance(1.0)
                else:
                    break
            self.counts_equal_the_connections_held()
            assert all(len(r.results) == 1 for r in self.requests), "a request was never answered"
            for origin in ORIGINS:
                open_, idle, short, long = self.pool.counts(origin)
                assert (short, long) == (0, 0) and open_ == idle
            self.reactor.advance(7.0)  # idle connections time out; every place comes back
            assert all(self.pool.counts(o) == (0, 0, 0, 0) for o in ORIGINS)
            # an exception in the pool's callbacks (AlreadyCalledError, say) would be left in the
            # connect's Deferred, to be logged at garbage collection: look for it there at once
            assert [d.result for d in self.connects if d.called and isinstance(d.result, Failure)] == []
            assert self.errors == []
        finally:
            globalLogPublisher.removeObserver(self.observer)


PoolMachine.TestCase.settings = settings(
    max_examples=int(300 * _SCALE), stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_pool_model = PoolMachine.TestCase


def test_a_connect_that_cannot_be_stopped_is_closed_when_it_completes() -> None:
    """A connector that ignores cancellation: the connection it makes later is closed at once, never
    counted twice nor handed to anyone."""
    reactor = MemoryReactorClock()
    made: list[tuple[UpstreamConnection, Deferred[Any]]] = []

    def connect(origin: Origin, conn: UpstreamConnection) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()  # no canceller: cancel() errbacks it, the connect goes on
        made.append((conn, d))
        return d

    pool = UpstreamPool(reactor, max_per_origin=2, connector=connect)
    origin = ORIGINS[0]
    first = pool.acquire(origin, SHORT)
    first.addErrback(lambda f: f.trap(CancelledError))
    first.cancel()
    assert pool.counts(origin) == (0, 0, 0, 0)
    conn, _ = made[0]
    transport = MemoryUpstreams(reactor)._connect  # the socket connects after all
    transport(origin, conn)
    assert conn.transport.disconnecting  # type: ignore[attr-defined]
    reactor.advance(0)
    assert pool.counts(origin) == (0, 0, 0, 0)


def test_each_class_has_its_share() -> None:
    assert [default_reserved(n) for n in (1, 2, 4, 8, 64, 100)] == [0, 1, 1, 2, 16, 25]
    reactor = MemoryReactorClock()
    upstreams = MemoryUpstreams(reactor)
    pool = UpstreamPool(reactor, max_per_origin=4, connector=upstreams, wait=3.0)
    origin = ORIGINS[0]
    longs = [pool.acquire(origin, LONG) for _ in range(4)]
    assert [d.called for d in longs] == [True, True, True, False]  # the fourth place is kept for short ones
    short = pool.acquire(origin, SHORT)
    assert short.called and pool.counts(origin) == (4, 0, 1, 3)
    assert pool.acquire(origin, SHORT).called is False  # full: waits
    refused: list[Failure] = []
    longs[3].addErrback(refused.append)
    reactor.advance(3.0)
    err = refused[0].value
    assert isinstance(err, UpstreamError) and err.kind == "busy"
    assert pool.stats().refused == {"short": 1, "long": 1}
    with pytest.raises(ValueError):
        UpstreamPool(reactor, max_per_origin=4, reserved=4)
