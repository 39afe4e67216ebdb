"""The client side of the data path: one HTTP/1.1 server connection per client.

`ClientConnection` parses request heads and frames request bodies, one request at a time
(pipelined bytes wait), makes an `Exchange` per request for the handler, and after each
response keeps the connection, closes it, or lingers so an unread body does not turn the
close into a reset. Requests the parser refuses are answered here, with a body from the
injected `error_body` (the composition root gives the registry's error envelope).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ecr_twisted.http.exchange import Exchange, Handler
from ecr_twisted.http.http11 import (
    METHODS,
    NO_BODY,
    BadMessage,
    BodyReader,
    parse_request_head,
    serialize_head,
    split_head,
    status_line,
)
from ecr_twisted.http.policy import CLOSE, LINGER, after_response
from ecr_twisted.http.sockets import Transport, Valve, big_reads, direct_writer, no_delay
from ecr_twisted.http.upstream import UpstreamPool
from ecr_twisted.timers import cancel

__all__ = ["ClientConnection", "ErrorBody", "Limits", "RelayFactory", "plain_error_body"]

log = Logger()

ErrorBody = Callable[[BadMessage], tuple[bytes, bytes]]
"""What a refused request is answered with: (Content-Type, body) for a `BadMessage`."""


def plain_error_body(e: BadMessage) -> tuple[bytes, bytes]:
    """The default `ErrorBody`: the parser's reason as plain text."""
    return b"text/plain; charset=utf-8", e.reason.encode("ascii", "replace") + b"\n"


class Limits:
    """Timeouts and rates of the data path (seconds, bytes per second); README "Options" names each.

    `head_timeout`: a request head, from its first byte (the first request's from the connection);
    `keepalive_timeout`: a kept-alive connection waiting for the next request's first byte;
    `idle_timeout`: a body transfer making no progress at all; `min_rate` (0: off) over each
    `rate_window`: a body transfer moving fewer bytes than that, uploads and downloads alike.
    Waiting for an upstream to answer a request sent whole is none of these (the handler's
    upstream timeouts cover it).

    The head, keep-alive and linger timeouts are deadlines checked by one sweep per factory
    every `SWEEP` second (no timer per request): they fire within +1 s, never earlier."""

    def __init__(
        self,
        head_timeout: float = 30.0,
        keepalive_timeout: float = 120.0,
        idle_timeout: float = 300.0,
        min_rate: int = 1024,
        rate_window: float = 60.0,
    ) -> None:
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        self.idle_timeout = idle_timeout
        self.min_rate = min_rate
        self.rate_window = rate_window


_C_HEAD, _C_BODY, _C_WAIT, _C_LINGER, _C_CLOSED = range(5)
SWEEP = 1.0  # seconds between the factory's deadline sweeps: the granularity of the connection timeouts
_EARLY = 1e-6  # float sums of sweep periods may land a hair before a deadline they equal
_LINGER_TIMEOUT = 2.0
_MAX_LINGER = 1 << 20
_METHOD_START = frozenset(bytes([c]) for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ALLOW = b", ".join(sorted(METHODS))


@implementer(IHalfCloseableProtocol)
class ClientConnection(Protocol):
    """Server side of one client connection: parses heads, frames request bodies, one request at a time.

    A client may shut down its sending side once its requests are out (TCP half-close, RFC 9112
    9.6): what it sent whole is still answered, then the connection closes. (Twisted's TLS layer
    has no half-close: there a client's FIN ends the connection.)"""

    transport: Transport  # type: ignore[assignment]  # set by makeConnection before any use
    send_body: Callable[[bytes], None]  # response body bytes, set once connected

    def __init__(self, factory: RelayFactory) -> None:
        self.handler = factory.handler
        self.reactor = factory.reactor
        self.pool = factory.pool
        self.limits = factory.limits
        self.is_tls = factory.is_tls
        self.on_error = factory.on_bad_request
        self.error_body = factory.error_body
        self.factory = factory
        self.valve: Valve | None = None
        self._state = _C_HEAD
        self._buf = b""
        self._scanned = 0
        self._lingered = 0
        self._reader: BodyReader | None = None
        self._exchange: Exchange | None = None
        self._parsing = False
        self._deadline = 0.0  # when the head, keep-alive or linger wait ends (reactor seconds); 0: none
        self._between = False  # kept alive, waiting for the next request's first byte
        self._read_closed = False  # the client sent its FIN: nothing more will come

    def connectionMade(self) -> None:
        self.factory.connection_started(self)
        self.valve = Valve(self.transport)
        big_reads(self.transport)
        no_delay(self.transport)
        self.send_body = direct_writer(self.transport)
        self._deadline = self.reactor.seconds() + self.limits.head_timeout

    @property
    def idle(self) -> bool:
        """Waiting for a request that has not begun: closing now loses nothing."""
        return self._state == _C_HEAD and self._exchange is None and not self._buf

    def drain(self) -> None:
        """The process is stopping: close now if idle, else after the response in progress."""
        if self.idle:
            self._state = _C_CLOSED
            self._deadline = 0.0
            self.transport.loseConnection()

    def expire(self, now: float) -> None:
        """The factory's sweep: end the wait whose deadline has passed."""
        deadline = self._deadline
        if deadline and now + _EARLY >= deadline:
            self._timeout()
        ex = self._exchange
        if ex is not None:
            ex.expire(now)

    def _timeout(self) -> None:
        self._deadline = 0.0
        if self._state == _C_HEAD and self._exchange is None:
            self._state = _C_CLOSED
            if self._buf:
                self._reject(BadMessage("request head not received in time", 408))
            else:
                self.transport.loseConnection()
        elif self._state == _C_LINGER:
            self._state = _C_CLOSED
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _C_BODY:
            self._body_data(data, 0)
        elif state == _C_HEAD:
            if self._between:
                # the next request has begun: its head gets head_timeout, as the first one did
                self._between = False
                if self._deadline:
                    self._deadline = self.reactor.seconds() + self.limits.head_timeout
            self._buf = self._buf + data if self._buf else data
            self._next_heads()
        elif state == _C_WAIT:
            # pipelined bytes while a response is in progress: keep them, stop reading
            self._buf += data
            self.transport.pauseProducing()
        elif state == _C_LINGER:
            self._lingered += len(data)
            if self._lingered > _MAX_LINGER:
                self._state = _C_CLOSED
                self.transport.loseConnection()

    def _next_heads(self) -> None:
        if self._parsing:
            return
        self._parsing = True
        try:
            while self._state == _C_HEAD and self._buf:
                if self._scanned == 0:
                    # A request starts with its method. RFC 9112 2.2 lets servers skip empty
                    # lines first; registry clients never send them, and being exactly as
                    # strict as the parser keeps the relay and the parser one model.
                    if self._buf[:1] not in _METHOD_START:
                        # not HTTP at all (a TLS ClientHello on a plain port, say): say so at once
                        self._reject(BadMessage("not an HTTP/1.1 request"))
                        return
                try:
                    found = split_head(self._buf, self._scanned)
                    if found is None:
                        self._scanned = len(self._buf)
                        return
                    raw, used = found
                    head = parse_request_head(raw)
                except BadMessage as e:
                    self._reject(e)
                    return
                self._scanned = 0
                self._deadline = 0.0
                rest = self._buf[used:]
                self._buf = b""
                ex = Exchange(self, head, self.reactor.seconds())
                self._exchange = ex
                if head.framing == NO_BODY:
                    self._state = _C_WAIT
                    self._buf = rest
                    if rest:
                        self.transport.pauseProducing()
                    self.handler.handle(ex)
                    continue
                self._state = _C_BODY
                self._reader = BodyReader(head.framing, head.length)
                self.transport.pauseProducing()  # until the body has somewhere to go
                # the handler sees the request before any body byte is judged, so an
                # exchange is always handled before it can be finished
                self.handler.handle(ex)
                if rest and self._state == _C_BODY and self._exchange is ex:
                    self._body_data(rest, 0)
        finally:
            self._parsing = False
        if self._read_closed:
            if self._state == _C_HEAD:
                self._end_of_requests()
            elif self._state == _C_BODY:  # a pipelined request whose body was cut by the half-close
                self._state = _C_CLOSED
                self.transport.abortConnection()

    def _body_data(self, data: bytes, off: int) -> None:
        reader = self._reader
        ex = self._exchange
        assert reader is not None and ex is not None  # _C_BODY: both set by the head that started it
        try:
            n = reader.feed(data, off)
        except BadMessage as e:
            self.on_error(e)
            if not ex.responded:
                content_type, body = self.error_body(e)
                ex.respond(e.status, [(b"Content-Type", content_type)], body)
            else:
                # mid-response: the upstream got a broken body; cut both sides
                self._state = _C_CLOSED
                self.transport.abortConnection()
            return
        if n:
            ex.client_body(data if (off == 0 and n == len(data)) else data[off : off + n])
        if reader.done:
            self._reader = None
            self._state = _C_WAIT
            end = off + n
            if end < len(data):
                self._buf = data[end:]
                self.transport.pauseProducing()
            ex.client_body_done()

    def readConnectionLost(self) -> None:
        """The client shut down its sending side (IHalfCloseableProtocol)."""
        if self._read_closed:
            return
        self._read_closed = True
        state = self._state
        if state == _C_BODY:
            # a request body that can never be whole: cut it, and whatever carries it upstream
            self._state = _C_CLOSED
            self.transport.abortConnection()
        elif state == _C_LINGER:
            self._state = _C_CLOSED
            self.transport.loseConnection()
        elif state == _C_HEAD:
            self._end_of_requests()
        elif state == _C_WAIT and self._exchange is not None and self._exchange.upstream_pending:
            # A FIN while the request still waits for an upstream place (queued or connecting): the
            # same bytes as a client that left, and after a burst of those (wrk's end, a CI runner
            # killed) the pool must not spend its places answering nobody. Nothing went upstream
            # yet, so nothing is lost; a client that half-closes gets its answer once the request
            # is under way upstream (see README, half-close).
            self._state = _C_CLOSED
            self.transport.abortConnection()
        # otherwise _C_WAIT: a whole request is being answered; exchange_done closes after it (and any pipelined)

    def writeConnectionLost(self) -> None:
        """Our side is shut down (lingering after an early answer); the client's close or the timer ends it."""

    def _end_of_requests(self) -> None:
        """No request can come any more: close, refusing a head the client began and never ended."""
        if self._buf:
            self._reject(BadMessage("connection closed in the middle of a request head"))
        else:
            self._state = _C_CLOSED
            self.transport.loseConnection()

    def _reject(self, e: BadMessage) -> None:
        self._state = _C_CLOSED
        self.on_error(e)
        content_type, body = self.error_body(e)
        fields = [
            (b"Content-Type", content_type),
            (b"Content-Length", b"%d" % len(body)),
            (b"Connection", b"close"),
        ]
        if e.status == 405:  # an unknown method (RFC 9110 15.5.6: a 405 says what is allowed)
            fields.append((b"Allow", _ALLOW))
        self.transport.write(serialize_head(status_line(e.status, b"Error"), fields) + body)
        self.transport.loseConnection()

    def exchange_done(self, ex: Exchange, keep: bool, abort: bool = False) -> None:
        """`ex` is over (called by the exchange): `keep` the connection for the next request, or close it."""
        if ex is not self._exchange:
            return
        self._exchange = None
        try:
            self.handler.finished(ex)
        except Exception:
            log.failure("access log / metrics hook failed")
        if abort:
            self._state = _C_CLOSED
            self.transport.abortConnection()
            return
        if self.factory.draining:
            keep = False
        step = after_response(keep, self._state == _C_BODY, self._state == _C_CLOSED)
        if step == LINGER:
            self._state = _C_LINGER
            self._reader = None
            self.transport.resumeProducing()
            lose_write = getattr(self.transport, "loseWriteConnection", None)
            if lose_write is None:
                self.transport.loseConnection()
                return
            lose_write()
            self._deadline = self.reactor.seconds() + _LINGER_TIMEOUT
            return
        if step == CLOSE:
            self._state = _C_CLOSED
            self.transport.loseConnection()
            return
        self._state = _C_HEAD
        if self._read_closed:
            if self._buf:
                self._next_heads()  # pipelined requests sent before the half-close; it closes after them
            else:
                self._end_of_requests()
            return
        if self._buf:  # a pipelined head has begun already
            self._deadline = self.reactor.seconds() + self.limits.head_timeout
        else:
            self._between = True
            self._deadline = self.reactor.seconds() + self.limits.keepalive_timeout
        self.transport.resumeProducing()
        if self._buf:
            self._next_heads()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connection_ended(self)
        self._state = _C_CLOSED
        self._deadline = 0.0
        ex, self._exchange = self._exchange, None
        if ex is not None:
            ex.client_lost()
            try:
                self.handler.finished(ex)
            except Exception:
                log.failure("access log / metrics hook failed")


class RelayFactory(Factory):
    """Builds client connections that hand each request to `handler`.

    `on_bad_request` is told of every refused request; `error_body` writes its answer."""

    def __init__(
        self,
        handler: Handler,
        reactor: Any,
        pool: UpstreamPool,
        *,
        is_tls: bool = False,
        limits: Limits | None = None,
        on_bad_request: Callable[[BadMessage], None] = lambda e: None,
        error_body: ErrorBody = plain_error_body,
    ) -> None:
        self.handler = handler
        self.reactor = reactor
        self.pool = pool
        self.is_tls = is_tls
        self.limits = limits or Limits()
        self.on_bad_request = on_bad_request
        self.error_body = error_body
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self._emptied: list[Deferred[None]] = []
        self._sweep: IDelayedCall | None = None  # runs while any connection is open

    def drain(self) -> None:
        """Stop keeping connections alive: idle ones close now, the others after their response."""
        self.draining = True
        for conn in list(self.connections):
            conn.drain()

    def abort_all(self) -> None:
        """Cut every connection still open (the drain's deadline): never a short body that looks whole."""
        for conn in list(self.connections):
            conn.transport.abortConnection()

    def emptied(self) -> Deferred[None]:
        """Fires once no connection of this factory is open."""
        d: Deferred[None] = Deferred()
        if self.connections:
            self._emptied.append(d)
        else:
            d.callback(None)
        return d

    def connection_started(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        if self._sweep is None:
            self._sweep = self.reactor.callLater(SWEEP, self._expire)

    def _expire(self) -> None:
        """One sweep over the connections' deadlines instead of a timer per request (a callLater,
        reset or cancel each cost microseconds, on every request)."""
        self._sweep = None
        if not self.connections:
            return
        now = self.reactor.seconds()
        for conn in list(self.connections):
            conn.expire(now)
        if self.connections:
            self._sweep = self.reactor.callLater(SWEEP, self._expire)

    def connection_ended(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            cancel(self._sweep)
            self._sweep = None
            waiting, self._emptied = self._emptied, []
            for d in waiting:
                d.callback(None)

    def buildProtocol(self, addr: Any) -> ClientConnection:
        return ClientConnection(self)
