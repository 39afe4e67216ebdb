"""The upstream side of the data path: connections to origins, and the pool that keeps them.

`UpstreamPool` keeps up to `max_per_origin` keep-alive connections per origin and queues
beyond. An `Attempt` is one try at getting a response head for an exchange: a pool place,
a connection, the request head; it retries once on a fresh connection when a pooled one
turns out to be closed. `UpstreamConnection` parses the response head, holds the body
until the handler decides, then relays it to the client, drains it, collects it (small
JSON), or hands it to a `Sink` (the cache). `UpstreamResponse` is what the handler sees.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from ecr_twisted.http.http11 import (
    CHUNKED,
    LENGTH,
    UNTIL_CLOSE,
    BadMessage,
    BodyReader,
    Fields,
    Head,
    parse_response_head,
    split_head,
)
from ecr_twisted.http.origin import Origin, UpstreamError
from ecr_twisted.http.policy import MAX_DRAIN, may_pool, may_retry, upstream_keep_alive, worth_draining
from ecr_twisted.http.sockets import Transport, Valve, big_reads, direct_writer
from ecr_twisted.timers import cancel

if TYPE_CHECKING:
    from ecr_twisted.http.exchange import Exchange, Sink

__all__ = ["Attempt", "UpstreamConnection", "UpstreamPool", "UpstreamResponse"]

_U_IDLE, _U_HEAD, _U_HOLD, _U_RELAY, _U_DRAIN, _U_COLLECT, _U_SINK = range(7)
_DRAIN_TIMEOUT = 30.0  # a discarded body that stalls must not hold a pool place


class UpstreamConnection(Protocol):
    """One persistent HTTP/1.1 connection to an origin, owned by the pool between requests."""

    transport: Transport  # type: ignore[assignment]  # set by makeConnection before any use
    send_body: Callable[[bytes], None]  # request body bytes, set once connected

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.reused = False
        self.valve: Valve | None = None
        self._mode = _U_IDLE
        self._attempt: Attempt | None = None
        self._buf = b""
        self._reader: BodyReader | None = None
        self._keep = True
        self._got_bytes = False
        self.request_complete = True
        self._drained = 0
        self.idle_call: IDelayedCall | None = None  # idle-in-pool, drain or collect deadline
        self.connected_ = False
        self.counted = True  # holds one of the pool's per-origin places until lost
        self._collect: tuple[Deferred[bytes], list[bytes], int] | None = None
        self._sink: Sink | None = None

    def connectionMade(self) -> None:
        self.connected_ = True
        self.valve = Valve(self.transport)
        big_reads(self.transport)
        self.send_body = direct_writer(self.transport)

    # -- request side
    def start(self, attempt: Attempt, head: bytes) -> None:
        self._attempt = attempt
        self._mode = _U_HEAD
        self._buf = b""
        self._got_bytes = False
        self._keep = True
        self.transport.write(head)

    # -- response side
    def dataReceived(self, data: bytes) -> None:
        mode = self._mode
        if mode == _U_RELAY:
            reader = self._reader
            attempt = self._attempt
            assert reader is not None and attempt is not None  # relaying: a head was read for an attempt
            try:
                n = reader.feed(data)
            except BadMessage:
                return self._bad_body()
            if n:
                attempt.exchange.upstream_body(data if n == len(data) else data[:n], reader)
            if reader.done:
                self._body_done(n < len(data))
            return
        if mode == _U_SINK:
            return self._sink_data(data)
        if mode == _U_HEAD:
            self._got_bytes = True
            self._buf = self._buf + data if self._buf else data
            self._parse_head()
            return
        if mode == _U_HOLD:
            self._buf += data
            return
        if mode == _U_DRAIN:
            reader = self._reader
            assert reader is not None  # draining the body of a head that was read
            try:
                n = reader.feed(data)
            except BadMessage:
                return self._bad_body()
            self._drained += n
            reader.payload.clear()
            if reader.done:
                self._body_done(n < len(data))
            elif self._drained > MAX_DRAIN:
                self.abort()
            return
        if mode == _U_COLLECT:
            return self._collect_data(data)
        # bytes on an idle connection: the server is confused; never reuse it
        self.abort()

    def _parse_head(self) -> None:
        attempt = self._attempt
        assert attempt is not None  # _U_HEAD: a request was sent for it
        while True:
            try:
                found = split_head(self._buf)
                if found is None:
                    return
                raw, used = found
                head = parse_response_head(raw, attempt.method)
            except BadMessage as e:
                self.abort()
                attempt.failed(UpstreamError("closed", f"invalid response: {e.reason}"))
                return
            self._buf = self._buf[used:]
            if 100 <= head.status < 200:
                if head.status == 101:
                    self.abort()
                    attempt.failed(UpstreamError("closed", "unexpected protocol switch"))
                    return
                continue  # interim responses are not relayed
            break
        self._mode = _U_HOLD
        self._keep = upstream_keep_alive(head)
        self._reader = BodyReader(head.framing, head.length, attempt.exchange.dechunk)
        self.transport.pauseProducing()
        attempt.got_head(head, self)

    def relay(self) -> None:
        """Start moving the held body to the exchange's client."""
        self._mode = _U_RELAY
        assert self._attempt is not None and self._reader is not None  # held: head read for an attempt
        ex = self._attempt.exchange
        reader = self._reader
        if reader.done:
            self._body_done(bool(self._buf))
            return
        ex.relay_from(self)
        buf, self._buf = self._buf, b""
        if buf:
            self.dataReceived(buf)
        if self._mode == _U_RELAY:
            self.transport.resumeProducing()

    def drain(self) -> None:
        """Drop the held body; the connection goes back to the pool once it has ended."""
        reader = self._reader
        if not self.connected_ or reader is None:
            return
        if not worth_draining(self.request_complete, reader.framing, reader.remaining):
            self.abort()
            return
        self._mode = _U_DRAIN
        self._drained = 0
        self.idle_call = self.pool.reactor.callLater(_DRAIN_TIMEOUT, self.abort)
        buf, self._buf = self._buf, b""
        if reader.done:
            self._body_done(bool(buf))
            return
        if buf:
            self.dataReceived(buf)
        if self._mode == _U_DRAIN:
            self.transport.resumeProducing()

    def collect(self, limit: int, timeout: float) -> Deferred[bytes]:
        """Read the held body into memory (at most `limit` bytes), for small JSON the proxy must edit."""
        reader = self._reader
        d: Deferred[bytes] = Deferred()
        if reader is None or (not self.connected_ and not reader.done):
            return fail(UpstreamError("closed", "upstream closed before the body"))
        if reader.framing == LENGTH and reader.remaining > limit:
            self.abort()
            return fail(UpstreamError("closed", f"body over {limit} bytes"))
        self._collect = (d, [], limit)
        self._drained = 0
        self._mode = _U_COLLECT
        reader.dechunk_on()
        self.idle_call = self.pool.reactor.callLater(timeout, self._collect_failed, UpstreamError("timeout", "body"))
        buf, self._buf = self._buf, b""
        if reader.done:
            self._collected(bool(buf))
            return d
        if buf:
            self._collect_data(buf)
        if self._mode == _U_COLLECT:
            self.transport.resumeProducing()
        return d

    def sink(self, sink: Sink) -> None:
        """Hand the held body to `sink` instead of a client; the exchange no longer owns this connection."""
        reader = self._reader
        assert reader is not None
        self._attempt = None
        self._sink = sink
        self._mode = _U_SINK
        reader.dechunk_on()
        buf, self._buf = self._buf, b""
        if reader.done:
            self._sink_done(bool(buf))
            return
        if buf:
            self._sink_data(buf)
        if self._mode == _U_SINK:
            self.transport.resumeProducing()

    def _sink_data(self, data: bytes) -> None:
        reader = self._reader
        sink = self._sink
        assert reader is not None and sink is not None
        try:
            n = reader.feed(data)
        except BadMessage:
            self._sink = None
            self._mode = _U_IDLE
            self.abort()
            sink.abort("invalid body framing from upstream")
            return
        if reader.framing == CHUNKED:
            for part in reader.payload:
                sink.write(part)
            reader.payload.clear()
        elif n:
            sink.write(data if n == len(data) else data[:n])
        if reader.done and self._sink is sink:
            self._sink_done(n < len(data))

    def _sink_done(self, extra: bool) -> None:
        sink, self._sink = self._sink, None
        self._body_done(extra)
        if sink is not None:
            sink.finish()

    def _collect_data(self, data: bytes) -> None:
        reader = self._reader
        assert self._collect is not None and reader is not None
        _, parts, limit = self._collect
        try:
            n = reader.feed(data)
        except BadMessage:
            return self._collect_failed(UpstreamError("closed", "invalid body framing from upstream"))
        if reader.framing == CHUNKED:
            for part in reader.payload:
                self._drained += len(part)  # the drain counter doubles as the running total
            parts.extend(reader.payload)
            reader.payload.clear()
        elif n:
            self._drained += n
            parts.append(data if n == len(data) else data[:n])
        if self._drained > limit:
            return self._collect_failed(UpstreamError("closed", f"body over {limit} bytes"))
        if reader.done:
            self._collected(n < len(data))

    def _collected(self, extra: bool) -> None:
        collect, self._collect = self._collect, None
        assert collect is not None
        self._body_done(extra)
        collect[0].callback(b"".join(collect[1]))

    def _collect_failed(self, err: UpstreamError) -> None:
        collect, self._collect = self._collect, None
        cancel(self.idle_call)
        self.idle_call = None
        self._attempt = None
        self._mode = _U_IDLE
        self.abort()
        if collect is not None:
            collect[0].errback(err)

    def _bad_body(self) -> None:
        """Malformed framing from upstream: never reuse the connection, never let the client see an end."""
        relayed = self._mode == _U_RELAY
        attempt = self._attempt
        self._attempt = None
        self._mode = _U_IDLE
        self.abort()
        if relayed and attempt is not None:
            attempt.exchange.upstream_truncated()

    def _body_done(self, extra: bool) -> None:
        relayed = self._mode == _U_RELAY
        attempt = self._attempt
        self._attempt = None
        self._mode = _U_IDLE
        self._reader = None
        cancel(self.idle_call)  # the drain or collect deadline
        self.idle_call = None
        # back to the pool first, so a pipelined request that starts next can reuse it
        if may_pool(self._keep, self.request_complete, extra):
            self.transport.resumeProducing()
            self.pool.release(self)
        else:
            self.abort()
        if relayed and attempt is not None:
            attempt.exchange.upstream_body_done(self)

    def abort(self) -> None:
        """Close at once; never reused."""
        self._keep = False
        if self.connected_:
            self.transport.abortConnection()

    def _until_close(self, reason: Failure) -> bool:
        """The body was framed by the connection's end, and that end was clean: it is complete."""
        reader = self._reader
        return reader is not None and reader.framing == UNTIL_CLOSE and reason.check(ierror.ConnectionDone) is not None

    def abandon(self) -> None:
        """Abort without telling the attempt or exchange it served: whoever calls this answers them."""
        self._attempt = None
        self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        mode = self._mode
        self._mode = _U_IDLE
        attempt = self._attempt
        self._attempt = None
        self.pool.lost(self)
        if mode == _U_SINK:
            sink, self._sink = self._sink, None
            if sink is not None:
                if self._until_close(reason):
                    sink.finish()
                else:
                    sink.abort("upstream closed mid-body")
            return
        if attempt is None:
            return
        if mode == _U_HEAD:
            attempt.lost_before_head(self, self._got_bytes)
        elif mode == _U_RELAY:
            if self._until_close(reason):
                attempt.exchange.upstream_body_done(self)
            else:
                attempt.exchange.upstream_truncated()
        elif mode == _U_HOLD:
            attempt.exchange.upstream_lost_held()
        elif mode == _U_COLLECT:
            if self._until_close(reason):
                self._collected(False)
            else:
                self._collect_failed(UpstreamError("closed", "upstream closed mid-body"))


class Attempt:
    """One try at getting a response head for an exchange from one origin."""

    __slots__ = ("exchange", "origin", "method", "head", "timeout", "d", "acquiring", "conn", "timer", "retried")

    def __init__(self, exchange: Exchange, origin: Origin, method: bytes, head: bytes, timeout: float) -> None:
        self.exchange = exchange
        self.origin = origin
        self.method = method
        self.head = head
        self.timeout = timeout
        self.d: Deferred[UpstreamResponse] | None = Deferred()
        self.acquiring: Deferred[UpstreamConnection] | None = None
        self.conn: UpstreamConnection | None = None
        self.timer: IDelayedCall | None = None
        self.retried = False

    def go(self) -> None:
        # the deadline covers waiting for a pool place and connecting, not only the response head
        if self.timer is None:
            self.timer = self.exchange.conn.reactor.callLater(self.timeout, self.timed_out)
        acquiring = self.acquiring = self.exchange.conn.pool.acquire(self.origin)
        acquiring.addCallbacks(self.connected, self.connect_failed)

    def connected(self, conn: UpstreamConnection) -> None:
        self.acquiring = None
        ex = self.exchange
        if self.d is None or ex.gone:
            conn.pool.release(conn)
            return
        self.conn = conn
        conn.request_complete = ex.request_read
        conn.start(self, self.head)
        if ex.has_body:
            ex.attach_upstream(conn)

    def connect_failed(self, reason: Failure) -> None:
        self.acquiring = None
        if self.d is None or reason.check(CancelledError):
            return  # timed out or cancelled: whoever gave up answers the exchange
        if reason.check(ierror.TimeoutError):
            self.failed(UpstreamError("timeout", "connect timed out"))
        else:
            self.failed(UpstreamError("unreachable", reason.getErrorMessage()))

    def timed_out(self) -> None:
        self.timer = None
        self.give_up()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abandon()
        self.failed(UpstreamError("timeout", "no response head in time"))

    def give_up(self) -> None:
        """Stop waiting for a pool place or a connect that nobody needs any more."""
        acquiring, self.acquiring = self.acquiring, None
        if acquiring is not None and not acquiring.called:
            acquiring.cancel()

    def cancel(self, err: UpstreamError | None = None) -> None:
        """The exchange no longer wants a response head: stop, cut the connection, errback with `err` if given."""
        if self.d is None:
            return
        self._stop_timer()
        d, self.d = self.d, None
        self.give_up()
        conn = self.conn
        if conn is not None and conn._attempt is self:
            conn.abandon()
        if err is not None:
            d.errback(err)

    def _stop_timer(self) -> None:
        cancel(self.timer)
        self.timer = None

    def got_head(self, head: Head, conn: UpstreamConnection) -> None:
        self._stop_timer()
        d, self.d = self.d, None
        ex = self.exchange
        ex.upstream_status = head.status
        if d is not None:
            d.callback(UpstreamResponse(head, conn, self))

    def lost_before_head(self, conn: UpstreamConnection, got_bytes: bool) -> None:
        ex = self.exchange
        # A pooled connection the server closed while idle: retry once on a fresh one
        # when nothing irreversible happened (no response bytes, no body bytes sent).
        if (
            may_retry(self.method, conn.reused, got_bytes, self.retried, ex.body_sent)
            and not ex.gone
            and not ex.responded
        ):
            self.retried = True
            self._stop_timer()
            self.conn = None
            ex.detach_upstream()
            self.go()
            return
        self._stop_timer()
        self.failed(UpstreamError("closed", "connection closed before a response"))

    def failed(self, err: UpstreamError) -> None:
        self._stop_timer()
        self.exchange.detach_upstream()
        d, self.d = self.d, None
        if d is not None:
            d.errback(err)


class UpstreamResponse:
    """A response head from upstream, its body held until `relay()` or `discard()`."""

    __slots__ = ("head", "_conn", "_attempt")

    def __init__(self, head: Head, conn: UpstreamConnection, attempt: Attempt) -> None:
        self.head = head
        self._conn = conn
        self._attempt = attempt

    @property
    def origin(self) -> Origin:
        return self._conn.origin

    def relay(self, status: int, fields: Fields) -> None:
        """Send `status` and `fields` (no framing fields; taken over) to the client, then the body."""
        ex = self._attempt.exchange
        if ex.gone:
            self._conn.abort()
            return
        head = self.head
        ex.start_response(status, fields, head.framing, head.get(b"content-length"))
        if self._conn._attempt is not self._attempt:
            # the connection died while the head was held: never let a partial body look whole
            ex.abort_response("upstream closed before the body")
            return
        self._conn.relay()

    def discard(self) -> None:
        self._conn.drain()

    def read(self, limit: int, timeout: float) -> Deferred[bytes]:
        """The whole body, for small bodies the proxy must edit (listings); bigger ones fail."""
        return self._conn.collect(limit, timeout)

    def into(self, sink: Sink) -> Callable[[], None]:
        """Send the (de-chunked) body to `sink` rather than the client, e.g. into the cache,
        whatever becomes of the exchange. Returns a function that cuts the transfer."""
        conn = self._conn
        if conn._attempt is not self._attempt:
            sink.abort("upstream closed before the body")
            return lambda: None
        conn.sink(sink)
        return conn.abort


class _OneConnection(Factory):
    """Hands out one prepared protocol; quiet, unlike connectProtocol's factory which logs every connection."""

    noisy = False

    def __init__(self, protocol: UpstreamConnection) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return self._protocol


class UpstreamPool:
    """Keep-alive connections per origin, at most `max_per_origin` of them, queueing beyond."""

    def __init__(
        self,
        reactor: Any,
        tls_for: Callable[[Origin], Any] | None = None,
        max_per_origin: int = 64,
        connect_timeout: float = 10.0,
        idle_timeout: float = 50.0,
        connector: Callable[[Origin, UpstreamConnection], Deferred[Any]] | None = None,
    ) -> None:
        self.reactor = reactor
        self._open = connector or self._open_socket
        self.tls_for = tls_for
        self.max_per_origin = max_per_origin
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple, list[UpstreamConnection]] = {}
        self._count: dict[tuple, int] = {}
        self._waiting: dict[tuple, deque[list[Any]]] = {}  # [origin, Deferred] per waiter

    def acquire(self, origin: Origin) -> Deferred[UpstreamConnection]:
        """A connection to `origin`: an idle one, a new one, or the next one freed (cancellable)."""
        key = origin.key
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            cancel(conn.idle_call)
            conn.idle_call = None
            if conn.connected_:
                conn.reused = True
                return succeed(conn)
        if self._count.get(key, 0) < self.max_per_origin:
            return self._connect(origin)
        queue = self._waiting.setdefault(key, deque())
        entry: list[Any] = [origin, None]

        def leave(d: Deferred[UpstreamConnection]) -> None:
            try:
                queue.remove(entry)
            except ValueError:
                pass

        d: Deferred[UpstreamConnection] = Deferred(leave)
        entry[1] = d
        queue.append(entry)
        return d

    def _connect(self, origin: Origin) -> Deferred[UpstreamConnection]:
        key = origin.key
        self._count[key] = self._count.get(key, 0) + 1
        conn = UpstreamConnection(self, origin)

        def failed(reason: Failure) -> Failure:
            self._count[key] -= 1
            self._wake(key)
            return reason

        return self._open(origin, conn).addCallback(lambda _: conn).addErrback(failed)

    def _open_socket(self, origin: Origin, conn: UpstreamConnection) -> Deferred[Any]:
        endpoint: Any = HostnameEndpoint(self.reactor, origin.host, origin.port, timeout=self.connect_timeout)
        if origin.scheme == "https":
            if self.tls_for is None:
                return fail(UpstreamError("unreachable", "TLS upstreams are not configured"))
            endpoint = wrapClientTLS(self.tls_for(origin), endpoint)
        return endpoint.connect(_OneConnection(conn))

    def release(self, conn: UpstreamConnection) -> None:
        """`conn` is free for another request: to the longest waiter, or idle until `idle_timeout`."""
        if not conn.connected_:
            return
        key = conn.origin.key
        waiting = self._waiting.get(key)
        while waiting:
            _, d = waiting.popleft()
            if not d.called:
                conn.reused = True
                d.callback(conn)
                return
        conn.idle_call = self.reactor.callLater(self.idle_timeout, conn.abort)
        self._idle.setdefault(key, []).append(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        """`conn` closed (called by the connection): free its place, wake a waiter."""
        key = conn.origin.key
        idle = self._idle.get(key)
        if idle and conn in idle:
            idle.remove(conn)
        cancel(conn.idle_call)
        conn.idle_call = None
        if not conn.counted:
            return
        conn.counted = False
        self._count[key] = self._count.get(key, 1) - 1
        self._wake(key)

    def _wake(self, key: tuple) -> None:
        waiting = self._waiting.get(key)
        while waiting and self._count.get(key, 0) < self.max_per_origin:
            origin, d = waiting.popleft()
            if not d.called:
                self._connect(origin).chainDeferred(d)

    def close(self) -> None:
        """Close the idle connections (at shutdown)."""
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn.abort()


