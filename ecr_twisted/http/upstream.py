"""The upstream side of the data path: connections to origins, and the pool that keeps them.

`UpstreamPool` keeps up to `max_per_origin` keep-alive connections per origin, keeps a share
of them for SHORT exchanges that LONG transfers (blob bodies, uploads) never hold, and queues
beyond for a bounded time. An `Attempt` is one try at getting a response head for an exchange:
a pool place, a connection, the request head; it retries once on a fresh connection when a
pooled one turns out to be closed. `UpstreamConnection` parses the response head, holds the body
until the handler decides, then relays it to the client, drains it, collects it (small
JSON), or hands it to a `Sink` (the cache). `UpstreamResponse` is what the handler sees.
With `EgressRules`, a new connection to an origin may go through a forward proxy: a CONNECT
tunnel for https (`http.tunnel`), absolute-form requests for http (`ForwardedConnection`).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

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
from ecr_twisted.http.egress import EgressProxy, EgressRules, absolute_form, forwarded_keep_alive
from ecr_twisted.http.origin import Origin, UpstreamError
from ecr_twisted.http.policy import MAX_DRAIN, may_pool, may_retry, upstream_keep_alive, worth_draining
from ecr_twisted.http.sockets import Transport, Valve, big_reads, direct_writer, no_delay
from ecr_twisted.http.tunnel import TunnelEndpoint, proxy_connect_error, refused_by_proxy
from ecr_twisted.timers import cancel

if TYPE_CHECKING:
    from ecr_twisted.http.exchange import Exchange, Sink

__all__ = [
    "CLASSES", "LONG", "SHORT", "Attempt", "ForwardedConnection", "PoolStats", "UpstreamConnection", "UpstreamPool",
    "UpstreamResponse", "default_reserved",
]

# Pool classes. SHORT: exchanges that need the upstream briefly (API check, manifests, HEADs,
# listings); LONG: blob bodies and uploads, which last as long as their client wants.
SHORT = "short"
LONG = "long"
CLASSES = (SHORT, LONG)
# a connection's place in the pool, besides in use for a class
NEW, IDLE, GONE = "new", "idle", "gone"
_IN_USE = frozenset(CLASSES)

_U_IDLE, _U_HEAD, _U_HOLD, _U_RELAY, _U_DRAIN, _U_COLLECT, _U_SINK = range(7)
_DRAIN_TIMEOUT = 30.0  # a discarded body that stalls must not hold a pool place
SWEEP = 1.0  # seconds between the pool's sweeps of idle connections: idle_timeout fires within +1 s


class UpstreamConnection(Protocol):
    """One persistent HTTP/1.1 connection to an origin, owned by the pool between requests."""

    transport: Transport  # type: ignore[assignment]  # set by makeConnection before any use
    send_body: Callable[[bytes], None]  # request body bytes, set once connected
    via: EgressProxy | None = None  # the forward proxy this connection goes through, if any
    keep_alive = staticmethod(upstream_keep_alive)  # whether a response leaves the connection reusable
    forwarded = False  # plain-http requests through a forward proxy: its 407 is not the origin's answer

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
        self.idle_call: IDelayedCall | None = None  # drain or collect deadline
        self.idle_until = 0.0  # idle in the pool: closed by the pool's sweep after this (reactor seconds)
        self.connected_ = False
        self.place = NEW  # the pool's: connecting or in use for a class, idle, gone (UpstreamPool._move)
        self._collect: tuple[Deferred[bytes], list[bytes], int] | None = None
        self._sink: Sink | None = None

    def connectionMade(self) -> None:
        self.connected_ = True
        if self.place == GONE:  # a connect the pool gave up on completed all the same
            self.transport.abortConnection()
            return
        self.valve = Valve(self.transport)
        big_reads(self.transport)
        no_delay(self.transport)
        self.send_body = direct_writer(self.transport)

    # -- request side
    def start(self, attempt: Attempt, head: bytes) -> None:
        self._attempt = attempt
        self._mode = _U_HEAD
        self._buf = b""
        self._got_bytes = False
        self._keep = True
        self.send_body(head)  # at once when the socket takes it: no reactor turn, no epoll_ctl pair

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
        if head.status == 407 and self.forwarded:  # the forward proxy's answer, never the origin's
            self.abandon()  # this attempt fails here, not again when the connection is lost
            assert self.via is not None
            attempt.failed(refused_by_proxy(self.via, self.origin, 407))
            return
        self._mode = _U_HOLD
        self._keep = self.keep_alive(head)
        self._reader = BodyReader(head.framing, head.length, attempt.exchange.dechunk)
        attempt.got_head(head, self)
        # Pause only if the handler still holds the head: a response relayed (or discarded) at
        # once keeps the connection reading, with no epoll registration change per request.
        if self._mode == _U_HOLD and self.connected_ and not getattr(self.transport, "disconnecting", False):
            self.transport.pauseProducing()

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
            ex.relay_paced(self)
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


class ForwardedConnection(UpstreamConnection):
    """A connection to an http origin through a forward proxy: requests go in absolute form
    with the proxy's credentials. Decided once per connection, so direct ones pay nothing.
    Reused only when the proxy says keep-alive in so many words (see `forwarded_keep_alive`)."""

    keep_alive = staticmethod(forwarded_keep_alive)
    forwarded = True

    def __init__(self, pool: UpstreamPool, origin: Origin, via: EgressProxy) -> None:
        super().__init__(pool, origin)
        self.via = via

    def start(self, attempt: Attempt, head: bytes) -> None:
        via = self.via
        assert via is not None
        super().start(attempt, absolute_form(head, self.origin.base, via.auth_line))


class Attempt:
    """One try at getting a response head for an exchange from one origin.

    It ends by calling `on_head` with the response or `on_error` with an `UpstreamError`, at
    most once and directly (no Deferred: a pooled connection and a prompt answer make it a plain
    call chain); `cancel` without an error ends it calling neither."""

    __slots__ = (
        "exchange", "origin", "method", "head", "timeout", "on_head", "on_error", "acquiring", "conn", "deadline",
        "retried", "pool_class",
    )

    def __init__(
        self,
        exchange: Exchange,
        origin: Origin,
        method: bytes,
        head: bytes,
        timeout: float,
        pool_class: str,
        on_head: Callable[[UpstreamResponse], object],
        on_error: Callable[[Exception], object],
    ) -> None:
        self.exchange = exchange
        self.origin = origin
        self.pool_class = pool_class
        self.method = method
        self.head = head
        self.timeout = timeout
        self.on_head: Callable[[UpstreamResponse], object] | None = on_head  # None once it has ended
        self.on_error = on_error
        self.acquiring: Deferred[UpstreamConnection] | None = None
        self.conn: UpstreamConnection | None = None
        # when the wait for the response head ends (reactor seconds; 0: not running), checked by the
        # client connection factory's sweep through `Exchange.expire`: it fires within +1 s
        self.deadline = 0.0
        self.retried = False

    def go(self) -> None:
        # the deadline covers waiting for a pool place and connecting, not only the response head
        if not self.deadline:
            self.deadline = self.exchange.conn.reactor.seconds() + self.timeout
        pool = self.exchange.conn.pool
        conn = pool.take(self.origin, self.pool_class)
        if conn is not None:  # an idle connection: no Deferred
            self.connected(conn)
            return
        acquiring = self.acquiring = pool.acquire(self.origin, self.pool_class)
        acquiring.addCallbacks(self.connected, self.connect_failed)

    @property
    def waiting(self) -> bool:
        """No response head or failure yet."""
        return self.on_head is not None

    def connected(self, conn: UpstreamConnection) -> None:
        self.acquiring = None
        ex = self.exchange
        if self.on_head is None or ex.gone:
            conn.pool.release(conn)
            return
        self.conn = conn
        conn.request_complete = ex.request_read
        conn.start(self, self.head)
        if ex.has_body:
            if not ex.request_read:
                # the body may take longer than the whole deadline (a 52 GB layer): while it moves, the
                # body-rate watchdog guards it; the wait for the answer starts when it is all sent
                self._stop_timer()
            ex.attach_upstream(conn)

    def body_done(self) -> None:
        """The whole request body has been read from the client: the deadline for the answer runs again."""
        if not self.deadline and self.on_head is not None and self.conn is not None:
            self.deadline = self.exchange.conn.reactor.seconds() + self.timeout

    def connect_failed(self, reason: Failure) -> None:
        self.acquiring = None
        if self.on_head is None or reason.check(CancelledError):
            return  # timed out or cancelled: whoever gave up answers the exchange
        err = reason.value
        self.failed(err if isinstance(err, UpstreamError) else UpstreamError("unreachable", reason.getErrorMessage()))

    def expire(self, now: float) -> None:
        """The sweep: time out if the deadline has passed."""
        deadline = self.deadline
        if deadline and now + 1e-6 >= deadline:
            self.timed_out()

    def timed_out(self) -> None:
        self.deadline = 0.0
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
        if self.on_head is None:
            return
        self._stop_timer()
        self.on_head = None
        self.give_up()
        conn = self.conn
        if conn is not None and conn._attempt is self:
            conn.abandon()
        if err is not None:
            self.on_error(err)

    def _stop_timer(self) -> None:
        self.deadline = 0.0

    def got_head(self, head: Head, conn: UpstreamConnection) -> None:
        self._stop_timer()
        on_head, self.on_head = self.on_head, None
        ex = self.exchange
        ex.upstream_status = head.status
        if on_head is not None:
            on_head(UpstreamResponse(head, conn, self))

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
        on_head, self.on_head = self.on_head, None
        if on_head is not None:
            self.on_error(err)


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


class PoolStats(NamedTuple):
    """What the pool holds, read at scrape time."""

    in_use: dict[str, int]  # per class: connections connecting or serving a request
    waiting: dict[str, int]  # per class: requests queued for a place
    refused: dict[str, int]  # per class: requests refused because no place freed within the wait (ever)
    idle: int  # connections kept alive for the next request


class _Host:
    """One origin's connections and queues. The counters change only in `UpstreamPool._move`."""

    __slots__ = ("open", "idle", "using", "queues")

    def __init__(self) -> None:
        self.open = 0  # connections holding a place: connecting, in use or idle
        self.idle: dict[UpstreamConnection, None] = {}  # insertion ordered: the newest is reused first
        self.using = {SHORT: 0, LONG: 0}
        self.queues: dict[str, deque[_Waiter]] = {SHORT: deque(), LONG: deque()}


class _Waiter:
    """One `acquire` not answered at once: queued, or waiting for the connect made for it."""

    __slots__ = ("origin", "cls", "d", "live", "timer", "connecting")

    def __init__(self, origin: Origin, cls: str, canceller: Callable[[Deferred[UpstreamConnection]], None]) -> None:
        self.origin = origin
        self.cls = cls
        self.live = True  # no answer yet: fired only by UpstreamPool._answer, at most once
        self.timer: IDelayedCall | None = None  # the bound on waiting in the queue
        self.connecting: Deferred[Any] | None = None  # the connect made for this request, while under way
        self.d: Deferred[UpstreamConnection] = Deferred(canceller)


class UpstreamPool:
    """Keep-alive connections per origin: at most `max_per_origin`, of which long transfers may
    hold at most `max_per_origin - reserved` (the rest is kept for short exchanges); a request
    that finds no place waits at most `wait` seconds, then fails with `UpstreamError("busy")`.

    Correct by construction: a connection holds a place from the start of its connect until it
    is lost, and its state (`UpstreamConnection.place`) changes only in `_move`, which alone
    changes the counts. A request's Deferred is fired only by `_answer`, once. Cancelling it
    takes it out of the queue or stops the connect made for it; a connect that completes for a
    request that left goes idle (to the next request) instead.

    Idle connections close `idle_timeout` after they went idle, within +1 s: one sweep every
    `SWEEP` second while any is idle, not a timer per request.
    """

    def __init__(
        self,
        reactor: Any,
        tls_for: Callable[[Origin], Any] | None = None,
        max_per_origin: int = 64,
        connect_timeout: float = 10.0,
        idle_timeout: float = 50.0,
        connector: Callable[[Origin, UpstreamConnection], Deferred[Any]] | None = None,
        reserved: int | None = None,
        wait: float = 5.0,
        egress: EgressRules | None = None,
    ) -> None:
        self.reactor = reactor
        self.egress = egress if egress else None  # no proxy configured: no look-up per connection
        self._open = connector or self._open_socket
        self.tls_for = tls_for
        self.max_per_origin = max_per_origin
        self.reserved = default_reserved(max_per_origin) if reserved is None else reserved
        if not 0 <= self.reserved < max_per_origin:
            raise ValueError("reserved must be at least 0 and less than max_per_origin")
        self.cap = {SHORT: max_per_origin, LONG: max_per_origin - self.reserved}
        self.wait = wait
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._hosts: dict[tuple, _Host] = {}
        self._refused = {SHORT: 0, LONG: 0}
        self._sweep: IDelayedCall | None = None  # runs while any connection is idle

    # -- what the data path calls
    def acquire(self, origin: Origin, cls: str = LONG) -> Deferred[UpstreamConnection]:
        """A connection to `origin` for a request of class `cls` (SHORT or LONG): an idle one, a new
        one, or the next one freed within `wait` seconds. Cancel it to give up."""
        conn = self.take(origin, cls)
        if conn is not None:
            return succeed(conn)
        host = self._host(origin.key)
        w = _Waiter(origin, cls, lambda d: self._leave(w))
        if host.queues[cls] or not self._room(host, cls):
            w.timer = self.reactor.callLater(self.wait, self._expired, w)
            host.queues[cls].append(w)
        else:
            self._connect(w, host)
        return w.d

    def take(self, origin: Origin, cls: str = LONG) -> UpstreamConnection | None:
        """An idle connection to `origin` for class `cls` if one may be had at once (the common
        case, answered without a Deferred), else None: then `acquire`."""
        host = self._host(origin.key)
        if not host.queues[cls] and self._room(host, cls):
            return self._take_idle(host, cls)
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """`conn` finished its request cleanly: to the longest waiter that may take it, or idle."""
        if conn.place not in _IN_USE or not conn.connected_:
            return
        host = self._hosts[conn.origin.key]
        self._move(conn, host, IDLE)
        self._wake(host)

    def lost(self, conn: UpstreamConnection) -> None:
        """`conn` closed (called by the connection): its place is free."""
        cancel(conn.idle_call)
        conn.idle_call = None
        host = self._hosts.get(conn.origin.key)
        if host is not None and self._move(conn, host, GONE):
            self._wake(host)

    def stats(self) -> PoolStats:
        in_use = {SHORT: 0, LONG: 0}
        waiting = {SHORT: 0, LONG: 0}
        idle = 0
        for host in self._hosts.values():
            idle += len(host.idle)
            for cls in CLASSES:
                in_use[cls] += host.using[cls]
                waiting[cls] += len(host.queues[cls])
        return PoolStats(in_use, waiting, dict(self._refused), idle)

    def counts(self, origin: Origin) -> tuple[int, int, int, int]:
        """(connections held, idle, in use for short, in use for long) for `origin`."""
        host = self._hosts.get(origin.key)
        if host is None:
            return (0, 0, 0, 0)
        return (host.open, len(host.idle), host.using[SHORT], host.using[LONG])

    def waiting(self, origin: Origin, cls: str) -> int:
        """Requests of class `cls` queued for a connection to `origin`."""
        host = self._hosts.get(origin.key)
        return len(host.queues[cls]) if host is not None else 0

    def close(self) -> None:
        """Close the idle connections (at shutdown)."""
        cancel(self._sweep)
        self._sweep = None
        for host in list(self._hosts.values()):
            for conn in list(host.idle):
                conn.abort()

    def _expire_idle(self) -> None:
        """Close the connections idle for longer than idle_timeout; again in a second while any is idle."""
        self._sweep = None
        now = self.reactor.seconds() + 1e-6  # float sums of sweep periods may land a hair early
        idle = False
        for host in list(self._hosts.values()):
            for conn in list(host.idle):
                if now >= conn.idle_until:
                    conn.abort()  # its connectionLost takes it out of the pool (lost)
                else:
                    idle = True
        if idle:
            self._sweep = self.reactor.callLater(SWEEP, self._expire_idle)

    # -- places
    def _host(self, key: tuple) -> _Host:
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = _Host()
        return host

    def _room(self, host: _Host, cls: str) -> bool:
        """A request of class `cls` may have a connection now."""
        return host.using[cls] < self.cap[cls] and (bool(host.idle) or host.open < self.max_per_origin)

    def _move(self, conn: UpstreamConnection, host: _Host, to: str) -> bool:
        """The one place where a connection changes state and the counts with it. A gone connection
        stays gone; returns whether anything changed."""
        was = conn.place
        if was == to or was == GONE:
            return False
        if was == NEW:
            host.open += 1
        elif was == IDLE:
            del host.idle[conn]
        else:
            host.using[was] -= 1
        if to == GONE:
            host.open -= 1
        elif to == IDLE:
            host.idle[conn] = None
            conn.idle_until = self.reactor.seconds() + self.idle_timeout
            if self._sweep is None:
                self._sweep = self.reactor.callLater(SWEEP, self._expire_idle)
        else:
            host.using[to] += 1
        conn.place = to
        return True

    def _take_idle(self, host: _Host, cls: str) -> UpstreamConnection | None:
        while host.idle:
            conn = next(reversed(host.idle))
            if not conn.connected_:  # closing: its connectionLost is on the way
                self._move(conn, host, GONE)
                continue
            self._move(conn, host, cls)
            conn.reused = True
            return conn
        return None

    def _connect(self, w: _Waiter, host: _Host) -> None:
        """Start a new connection for `w`: it holds a place of `w`'s class from now on."""
        via = self.egress.proxy_for(w.origin) if self.egress is not None else None
        if via is None:
            conn = UpstreamConnection(self, w.origin)
        elif w.origin.scheme == "http":
            conn = ForwardedConnection(self, w.origin, via)
        else:
            conn = UpstreamConnection(self, w.origin)
            conn.via = via  # tunnelled: the requests are the same as on a direct connection
        self._move(conn, host, w.cls)
        try:
            connecting = self._open(w.origin, conn)
        except Exception:
            connecting = fail()
        w.connecting = connecting
        connecting.addCallbacks(self._connected, self._connect_failed, (w, conn), {}, (w, conn))

    def _connected(self, _: Any, w: _Waiter, conn: UpstreamConnection) -> None:
        w.connecting = None
        host = self._hosts[conn.origin.key]
        if conn.place == GONE or not conn.connected_:  # lost before its connect was reported
            self._move(conn, host, GONE)
            self._answer(w, Failure(UpstreamError("closed", "upstream closed on connect")))
            self._wake(host)
        elif w.live:
            self._answer(w, conn)
        else:  # the request left: the connection is the pool's, for the next request
            self._move(conn, host, IDLE)
            self._wake(host)

    def _connect_failed(self, reason: Failure, w: _Waiter, conn: UpstreamConnection) -> None:
        w.connecting = None
        host = self._hosts[conn.origin.key]
        self._move(conn, host, GONE)
        if conn.connected_:  # a connector that connected all the same: never leave it open unowned
            conn.abort()
        err = reason.value
        if reason.check(ierror.TimeoutError):
            err = UpstreamError("timeout", "connect timed out")
        elif not isinstance(err, UpstreamError):
            err = UpstreamError("unreachable", reason.getErrorMessage())
        self._answer(w, Failure(err))
        self._wake(host)

    def _wake(self, host: _Host) -> None:
        """Places may have come free: serve the queues, short exchanges first."""
        for cls in CLASSES:
            queue = host.queues[cls]
            while queue and self._room(host, cls):
                w = queue.popleft()
                cancel(w.timer)
                w.timer = None
                if not w.live:
                    continue
                conn = self._take_idle(host, cls)
                if conn is not None:
                    self._answer(w, conn)
                else:
                    self._connect(w, host)

    def _answer(self, w: _Waiter, result: UpstreamConnection | Failure) -> None:
        """The one place a request's Deferred fires; a connection nobody takes goes back."""
        if not w.live:
            if isinstance(result, UpstreamConnection):
                self.release(result)
            return
        w.live = False
        if isinstance(result, Failure):
            w.d.errback(result)
        else:
            w.d.callback(result)

    def _leave(self, w: _Waiter) -> None:
        """The request's Deferred was cancelled: out of the queue, or stop its connect."""
        w.live = False
        cancel(w.timer)
        w.timer = None
        host = self._hosts[w.origin.key]
        queue = host.queues[w.cls]
        try:
            queue.remove(w)
        except ValueError:
            pass
        connecting, w.connecting = w.connecting, None
        if connecting is not None:
            connecting.cancel()  # fails it (its place comes back), or it already completed and goes idle

    def _expired(self, w: _Waiter) -> None:
        """No place came free in time: refuse rather than wait as long as the upstream timeout."""
        w.timer = None
        host = self._hosts[w.origin.key]
        try:
            host.queues[w.cls].remove(w)
        except ValueError:
            return
        self._refused[w.cls] += 1
        self._answer(w, Failure(UpstreamError("busy", f"no free upstream connection within {self.wait:g}s")))

    def _open_socket(self, origin: Origin, conn: UpstreamConnection) -> Deferred[Any]:
        via = conn.via
        if via is not None:
            return self._open_via(origin, conn, via)
        endpoint: Any = HostnameEndpoint(self.reactor, origin.host, origin.port, timeout=self.connect_timeout)
        if origin.scheme == "https":
            if self.tls_for is None:
                return fail(UpstreamError("unreachable", "TLS upstreams are not configured"))
            endpoint = wrapClientTLS(self.tls_for(origin), endpoint)
        return endpoint.connect(_OneConnection(conn))

    def _open_via(self, origin: Origin, conn: UpstreamConnection, via: EgressProxy) -> Deferred[Any]:
        """Through a forward proxy: a CONNECT tunnel, then TLS as on a direct connection, for
        https; for http a plain connection to the proxy (the requests say where they go)."""
        endpoint: Any = HostnameEndpoint(self.reactor, via.host, via.port, timeout=self.connect_timeout)
        if origin.scheme == "https":
            if self.tls_for is None:
                return fail(UpstreamError("unreachable", "TLS upstreams are not configured"))
            tunnel = TunnelEndpoint(endpoint, via, origin, self.reactor, self.connect_timeout)
            return wrapClientTLS(self.tls_for(origin), tunnel).connect(_OneConnection(conn))

        def failed(reason: Failure) -> None:
            raise proxy_connect_error(via, reason)

        return endpoint.connect(_OneConnection(conn)).addErrback(failed)


def default_reserved(max_per_origin: int) -> int:
    """Places per origin kept for short exchanges: a quarter, at least one when there are two."""
    return max(1, max_per_origin // 4) if max_per_origin > 1 else 0
