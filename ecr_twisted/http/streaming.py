"""The data path: how bytes move between a client socket and an upstream socket.

Everything above this module (routing, tokens, access policy, metrics) sees one
`Exchange` per request: the parsed request head, `respond()` for a local answer, and
`forward()`, which sends the request upstream and yields the response head as an
`UpstreamResponse` to be `relay()`ed to the client or `discard()`ed. Bodies never
surface: they are moved as raw bytes, framing unchanged, with each transport registered
as the other's producer so a slow side pauses the fast one. Framing headers
(Content-Length, Transfer-Encoding) and Connection are this module's business.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Protocol as TypingProtocol
from urllib.parse import urlsplit

from twisted.internet import error as ierror
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ecr_twisted.http.http11 import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    BadMessage,
    BodyReader,
    Head,
    parse_request_head,
    parse_response_head,
    serialize_head,
    split_head,
)

log = Logger()

REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content",
    206: b"Partial Content", 301: b"Moved Permanently", 302: b"Found", 303: b"See Other",
    307: b"Temporary Redirect", 308: b"Permanent Redirect", 400: b"Bad Request",
    401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 411: b"Length Required", 413: b"Payload Too Large",
    416: b"Range Not Satisfiable", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}

Fields = list[tuple[bytes, bytes]]


READ_SIZE = 256 * 1024


def _big_reads(transport: Any) -> None:
    """Read up to 256 KiB per recv() instead of Twisted's 64 KiB: a quarter of the syscalls
    and reactor turns per gigabyte. TLS transports wrap the socket one level down."""
    inner = getattr(transport, "transport", None)
    for t in (transport, inner):
        if t is not None and hasattr(t, "bufferSize"):
            t.bufferSize = READ_SIZE


def _direct_writer(transport: Any) -> Callable[[bytes], None]:
    """A write function for one transport's body bytes.

    Twisted's write() queues every chunk for the next reactor turn: an epoll round trip
    and two epoll_ctl calls per chunk. When a plain TCP transport has nothing queued,
    send() at once and queue only what the socket did not take; the queue keeps
    Twisted's producer accounting (and so backpressure) exactly as before. TLS, unix and
    in-memory transports get plain write().
    """
    sock = getattr(transport, "socket", None)
    if sock is None or not isinstance(transport, (tcp.Server, tcp.Client)):
        return transport.write
    send = sock.send
    queue = transport.write

    def write(data: bytes) -> None:
        if transport.dataBuffer or transport._tempDataBuffer or not transport.connected or transport.disconnecting:
            return queue(data)
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return queue(data)  # let Twisted see the error and close the connection its way
        if sent < len(data):
            queue(data[sent:])

    return write


class UpstreamError(Exception):
    """The upstream could not give a response head. `kind`: unreachable, timeout, closed."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class Origin:
    """Where an upstream lives; `base` is what its absolute URLs start with."""

    __slots__ = ("scheme", "host", "port", "netloc", "base", "key")

    def __init__(self, scheme: str, host: str, port: int | None = None) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        default = 443 if scheme == "https" else 80
        self.scheme = scheme
        self.host = host
        self.port = port or default
        shown = f"[{host}]" if ":" in host else host
        netloc = shown if self.port == default else f"{shown}:{self.port}"
        self.netloc = netloc.encode("ascii")
        self.base = f"{scheme}://{netloc}".encode("ascii")
        self.key = (scheme, host, self.port)

    @classmethod
    def from_url(cls, url: str | bytes) -> "Origin":
        if isinstance(url, bytes):
            url = url.decode("ascii")
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"no host in URL {url!r}")
        return cls(parts.scheme, parts.hostname, parts.port)

    def __repr__(self) -> str:
        return f"Origin({self.base.decode()})"


@implementer(IPushProducer)
class _Valve:
    """Lets a consumer transport pause and resume the reading side of another transport.

    stopProducing is a no-op: a lost connection is handled by its own protocol's
    connectionLost, which decides what happens to the other side.
    """

    __slots__ = ("transport",)

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class Handler(TypingProtocol):
    """What the data path calls: routing and policy live behind this."""

    def handle(self, exchange: "Exchange") -> None: ...

    def finished(self, exchange: "Exchange") -> None: ...


class Limits:
    """Timeouts and sizes of the data path, in seconds."""

    def __init__(
        self,
        head_timeout: float = 30.0,
        keepalive_timeout: float = 120.0,
        idle_timeout: float = 300.0,
    ) -> None:
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        self.idle_timeout = idle_timeout


# ---------------------------------------------------------------------------
# upstream side


_U_IDLE, _U_HEAD, _U_HOLD, _U_RELAY, _U_DRAIN, _U_COLLECT, _U_SINK = range(7)
_DRAIN_TIMEOUT = 30.0  # a discarded body that stalls must not hold a pool place
_MAX_DRAIN = 1 << 20  # discarded bodies beyond this are cheaper to cut than to read
_SENDS_BODY = frozenset({b"POST", b"PUT", b"PATCH"})
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})


class UpstreamConnection(Protocol):
    """One persistent HTTP/1.1 connection to an origin, owned by the pool between requests."""

    def __init__(self, pool: "UpstreamPool", origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.reused = False
        self.valve: _Valve | None = None
        self._mode = _U_IDLE
        self._attempt: _Attempt | None = None
        self._buf = b""
        self._reader: BodyReader | None = None
        self._keep = True
        self._got_bytes = False
        self.request_complete = True
        self._drained = 0
        self.idle_call: Any = None  # idle-in-pool or drain deadline
        self.connected_ = False
        self.counted = True  # holds one of the pool's per-origin places until lost
        self._collect: tuple[Deferred[bytes], list[bytes], int] | None = None
        self._sink: Sink | None = None

    def connectionMade(self) -> None:
        self.connected_ = True
        self.valve = _Valve(self.transport)
        _big_reads(self.transport)
        self.send_body = _direct_writer(self.transport)

    # -- request side
    def start(self, attempt: "_Attempt", head: bytes) -> None:
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
            try:
                n = reader.feed(data)
            except BadMessage:
                return self._bad_body()
            if n:
                self._attempt.exchange._upstream_body(data if n == len(data) else data[:n], reader)
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
            try:
                n = reader.feed(data)
            except BadMessage:
                return self._bad_body()
            self._drained += n
            reader.payload.clear()
            if reader.done:
                self._body_done(n < len(data))
            elif self._drained > _MAX_DRAIN:
                self.abort()
            return
        if mode == _U_COLLECT:
            return self._collect_data(data)
        # bytes on an idle connection: the server is confused; never reuse it
        self.abort()

    def _parse_head(self) -> None:
        attempt = self._attempt
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
        self._keep = head.version == b"1.1" and b"close" not in head.connection_tokens()
        if head.framing == UNTIL_CLOSE:
            self._keep = False
        self._reader = BodyReader(head.framing, head.length, attempt.exchange._dechunk)
        self.transport.pauseProducing()
        attempt.got_head(head, self)

    def relay(self) -> None:
        """Start moving the held body to the exchange's client."""
        self._mode = _U_RELAY
        ex = self._attempt.exchange
        reader = self._reader
        if reader.done:
            self._body_done(bool(self._buf))
            return
        ex.conn.transport.registerProducer(self.valve, True)
        ex._relaying = self
        ex._arm_watch()
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
        if not self.request_complete or reader.framing == UNTIL_CLOSE or (
            reader.framing == LENGTH and reader.remaining > 1 << 20
        ):
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

    def sink(self, sink: "Sink") -> None:
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
        if self.idle_call is not None and self.idle_call.active():
            self.idle_call.cancel()
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
            attempt.exchange.error = "invalid body framing from upstream"
            attempt.exchange._upstream_truncated()

    def _body_done(self, extra: bool) -> None:
        relayed = self._mode == _U_RELAY
        attempt = self._attempt
        self._attempt = None
        self._mode = _U_IDLE
        self._reader = None
        if self.idle_call is not None:  # the drain deadline
            if self.idle_call.active():
                self.idle_call.cancel()
            self.idle_call = None
        if extra:
            self._keep = False  # bytes past the response: never trust this connection again
        # back to the pool first, so a pipelined request that starts next can reuse it
        if self._keep and self.request_complete:
            self.transport.resumeProducing()
            self.pool.release(self)
        else:
            self.abort()
        if relayed:
            attempt.exchange._upstream_body_done(self)

    def abort(self) -> None:
        self._keep = False
        if self.connected_:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = ierror.ConnectionDone) -> None:
        self.connected_ = False
        mode = self._mode
        self._mode = _U_IDLE
        attempt = self._attempt
        self._attempt = None
        self.pool._lost(self)
        if mode == _U_SINK:
            sink, self._sink = self._sink, None
            if sink is not None:
                if self._reader.framing == UNTIL_CLOSE and reason.check(ierror.ConnectionDone):
                    sink.finish()
                else:
                    sink.abort("upstream closed mid-body")
            return
        if attempt is None:
            return
        if mode == _U_HEAD:
            attempt.lost_before_head(self, self._got_bytes)
        elif mode == _U_RELAY:
            if self._reader.framing == UNTIL_CLOSE and reason.check(ierror.ConnectionDone):
                attempt.exchange._upstream_body_done(self)
            else:
                attempt.exchange._upstream_truncated()
        elif mode == _U_HOLD:
            attempt.exchange._upstream_lost_held()
        elif mode == _U_COLLECT:
            if self._reader.framing == UNTIL_CLOSE and reason.check(ierror.ConnectionDone):
                self._collected(False)
            else:
                self._collect_failed(UpstreamError("closed", "upstream closed mid-body"))


class _Attempt:
    """One try at getting a response head for an exchange from one origin."""

    __slots__ = ("exchange", "origin", "method", "head", "timeout", "d", "acquiring", "conn", "timer", "retried")

    def __init__(self, exchange: "Exchange", origin: Origin, method: bytes, head: bytes, timeout: float) -> None:
        self.exchange = exchange
        self.origin = origin
        self.method = method
        self.head = head
        self.timeout = timeout
        self.d: Deferred[UpstreamResponse] | None = Deferred()
        self.acquiring: Deferred[UpstreamConnection] | None = None
        self.conn: UpstreamConnection | None = None
        self.timer: Any = None
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
        if self.d is None or ex._gone:
            conn.pool.release(conn)
            return
        self.conn = conn
        ex._attempt = self
        conn.request_complete = ex._body_complete or ex.request.framing == NO_BODY
        conn.start(self, self.head)
        if ex.request.framing != NO_BODY:
            ex._attach_body(conn)

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
            conn._attempt = None
            conn.abort()
        self.failed(UpstreamError("timeout", "no response head in time"))

    def give_up(self) -> None:
        """Stop waiting for a pool place or a connect that nobody needs any more."""
        acquiring, self.acquiring = self.acquiring, None
        if acquiring is not None and not acquiring.called:
            acquiring.cancel()

    def _stop_timer(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
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
            conn.reused
            and self.method in _IDEMPOTENT
            and not got_bytes
            and not self.retried
            and ex._body_sent == 0
            and not ex._gone
            and not ex._responded
        ):
            self.retried = True
            self._stop_timer()
            self.conn = None
            ex._detach_body()
            self.go()
            return
        self._stop_timer()
        self.failed(UpstreamError("closed", "connection closed before a response"))

    def failed(self, err: UpstreamError) -> None:
        self._stop_timer()
        self.exchange._detach_body()
        d, self.d = self.d, None
        if d is not None:
            d.errback(err)


class UpstreamResponse:
    """A response head from upstream, its body held until `relay()` or `discard()`."""

    __slots__ = ("head", "_conn", "_attempt")

    def __init__(self, head: Head, conn: UpstreamConnection, attempt: _Attempt) -> None:
        self.head = head
        self._conn = conn
        self._attempt = attempt

    @property
    def origin(self) -> Origin:
        return self._conn.origin

    def relay(self, status: int, fields: Fields) -> None:
        """Send `status` and `fields` (no framing fields; taken over) to the client, then the body."""
        ex = self._attempt.exchange
        if ex._gone:
            self._conn.abort()
            return
        ex._start_response(status, fields, self.head)
        if self._conn._attempt is not self._attempt:
            # the connection died while the head was held: never let a partial body look whole
            ex.error = ex.error or "upstream closed before the body"
            ex._abort_client()
            return
        self._conn.relay()

    def discard(self) -> None:
        self._conn.drain()

    def read(self, limit: int, timeout: float) -> Deferred[bytes]:
        """The whole body, for small bodies the proxy must edit (listings); bigger ones fail."""
        return self._conn.collect(limit, timeout)

    def into(self, sink: "Sink") -> Callable[[], None]:
        """Send the (de-chunked) body to `sink` rather than the client, e.g. into the cache,
        whatever becomes of the exchange. Returns a function that cuts the transfer."""
        conn = self._conn
        if conn._attempt is not self._attempt:
            sink.abort("upstream closed before the body")
            return lambda: None
        conn.sink(sink)
        return conn.abort


class Sink(TypingProtocol):
    """Where `UpstreamResponse.into` puts a body: `cache.Fill` is one."""

    def write(self, data: bytes) -> None: ...

    def finish(self) -> Any: ...

    def abort(self, reason: str) -> None: ...


class Source(TypingProtocol):
    """A file still being written (a `cache.Fill`): how much is there, and news of more."""

    written: int
    state: str  # "filling", then "done" or "failed"

    def on_progress(self, listener: Callable[[Any], None]) -> None: ...

    def off_progress(self, listener: Callable[[Any], None]) -> None: ...


_FILE_TURN = 8 << 20  # bytes sent from a file before letting other connections have the reactor


@implementer(IPushProducer)
class _FileSender:
    """Sends bytes [pos, end) of an open file to an exchange's client as fast as it reads them.

    With a `source` (a file still being written) it sends what is there and waits for more;
    the blob's last byte waits until the source is done (verified), so a body that fails
    verification never reaches a client whole."""

    __slots__ = ("ex", "fd", "pos", "end", "size", "source", "paused", "busy", "later")

    def __init__(self, ex: "Exchange", fd: int, pos: int, end: int, size: int, source: Source | None) -> None:
        self.ex: Exchange | None = ex
        self.fd = fd
        self.pos = pos
        self.end = end
        self.size = size
        self.source = source
        self.paused = False
        self.busy = False
        self.later: Any = None

    def start(self) -> None:
        ex = self.ex
        assert ex is not None
        ex.conn.transport.registerProducer(self, True)
        if self.source is not None:
            self.source.on_progress(self._progress)
        ex._arm_watch()
        self.pump()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.close()

    def _progress(self, source: Any) -> None:
        if not self.paused:
            self.pump()

    def _again(self) -> None:
        self.later = None
        self.pump()

    def pump(self) -> None:
        if self.busy or self.later is not None:
            return
        self.busy = True
        try:
            self._pump()
        finally:
            self.busy = False

    def _pump(self) -> None:
        budget = _FILE_TURN
        while not self.paused:
            ex = self.ex
            if ex is None:
                return
            limit = self.end
            source = self.source
            if source is not None:
                if source.state == "done":
                    source.off_progress(self._progress)
                    self.source = source = None
                elif source.state == "failed":
                    return self._abort("cache fill failed")
                else:
                    limit = min(limit, source.written, self.size - 1)
            if self.pos >= limit:
                if self.pos >= self.end:
                    return self._done()
                return  # wait for the source
            try:
                data = os.pread(self.fd, min(READ_SIZE, limit - self.pos), self.pos)
            except OSError:
                data = b""
            if not data:
                return self._abort("cached file shorter than expected")
            self.pos += len(data)
            ex.bytes_out += len(data)
            ex.conn.send_body(data)
            budget -= len(data)
            if budget <= 0:
                self.later = ex.conn.reactor.callLater(0, self._again)
                return

    def _done(self) -> None:
        ex = self.ex
        self.close()
        if ex is not None and not ex._gone:
            ex.conn.transport.unregisterProducer()
            ex._response_finished()

    def _abort(self, reason: str) -> None:
        ex = self.ex
        self.close()
        if ex is not None and not ex._gone:
            ex.error = ex.error or reason
            ex.conn.transport.unregisterProducer()
            ex._abort_client()

    def close(self) -> None:
        ex, self.ex = self.ex, None
        if ex is None:
            return
        if ex._sender is self:
            ex._sender = None
        if self.later is not None:
            if self.later.active():
                self.later.cancel()
            self.later = None
        if self.source is not None:
            self.source.off_progress(self._progress)
            self.source = None
        try:
            os.close(self.fd)
        except OSError:
            pass


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
        connector: Callable[[Origin, "UpstreamConnection"], Deferred[Any]] | None = None,
    ) -> None:
        self.reactor = reactor
        self._open = connector or self._open_socket
        self.tls_for = tls_for
        self.max_per_origin = max_per_origin
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple, list[UpstreamConnection]] = {}
        self._count: dict[tuple, int] = {}
        self._waiting: dict[tuple, deque[tuple[Origin, Deferred]]] = {}

    def acquire(self, origin: Origin) -> Deferred[UpstreamConnection]:
        key = origin.key
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.idle_call is not None and conn.idle_call.active():
                conn.idle_call.cancel()
            conn.idle_call = None
            if conn.connected_:
                conn.reused = True
                return succeed(conn)
        if self._count.get(key, 0) < self.max_per_origin:
            return self._connect(origin)
        queue = self._waiting.setdefault(key, deque())
        entry: list[Any] = [origin, None]

        def cancel(d: Deferred[UpstreamConnection]) -> None:
            try:
                queue.remove(entry)
            except ValueError:
                pass

        d: Deferred[UpstreamConnection] = Deferred(cancel)
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

    def _open_socket(self, origin: Origin, conn: "UpstreamConnection") -> Deferred[Any]:
        endpoint: Any = HostnameEndpoint(self.reactor, origin.host, origin.port, timeout=self.connect_timeout)
        if origin.scheme == "https":
            if self.tls_for is None:
                return fail(UpstreamError("unreachable", "TLS upstreams are not configured"))
            endpoint = wrapClientTLS(self.tls_for(origin), endpoint)
        return endpoint.connect(_OneConnection(conn))

    def release(self, conn: UpstreamConnection) -> None:
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

    def _lost(self, conn: UpstreamConnection) -> None:
        key = conn.origin.key
        idle = self._idle.get(key)
        if idle and conn in idle:
            idle.remove(conn)
        if conn.idle_call is not None and conn.idle_call.active():
            conn.idle_call.cancel()
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
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn.abort()


# ---------------------------------------------------------------------------
# client side


class Exchange:
    """One client request and what became of it; the unit routing and metrics work with."""

    __slots__ = (
        "conn", "request", "started", "status", "upstream_status", "bytes_in", "bytes_out",
        "error", "ctx", "_dechunk", "_pending", "_body_complete", "_body_sent", "_upstream",
        "_attempt", "_relaying", "_responded", "_done", "_gone", "_keep", "_watch", "_moved",
        "_expect_continue", "_is_head", "_pending_size", "_sender",
    )

    def __init__(self, conn: "ClientConnection", request: Head, started: float) -> None:
        self.conn = conn
        self.request = request
        self.started = started
        self.status = 0
        self.upstream_status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.error: str | None = None
        self.ctx: Any = None  # for the handler's own per-request state
        self._dechunk = request.version == b"1.0"
        self._pending: list[bytes] | None = [] if request.framing != NO_BODY else None
        self._pending_size = 0
        self._body_complete = request.framing == NO_BODY
        self._body_sent = 0
        self._upstream: UpstreamConnection | None = None
        self._attempt: _Attempt | None = None
        self._relaying: UpstreamConnection | None = None
        self._responded = False
        self._done = False
        self._gone = False
        self._keep = request.keep_alive()
        self._watch: Any = None
        self._moved = -1
        self._is_head = request.method == b"HEAD"
        self._sender: _FileSender | None = None
        expect = request.get(b"expect")
        self._expect_continue = (
            expect is not None and expect.lower() == b"100-continue" and request.version == b"1.1"
        )

    # -- what handlers use
    @property
    def is_tls(self) -> bool:
        return self.conn.is_tls

    @property
    def gone(self) -> bool:
        """The client has left: nothing more will reach it."""
        return self._gone

    @property
    def has_body(self) -> bool:
        return self.request.framing != NO_BODY

    def forward(self, origin: Origin, method: bytes, target: bytes, fields: Fields, timeout: float) -> Deferred[UpstreamResponse]:
        """Send the request (and its body, as it arrives) to `origin`; fires with the response head.

        `fields` (no framing fields) is taken over: the framing fields are appended to it."""
        if self._gone:
            return fail(UpstreamError("closed", "client left"))
        if self._body_sent:
            return fail(RuntimeError("request body already sent upstream"))
        req = self.request
        if req.framing == LENGTH:
            fields.append((b"Content-Length", b"%d" % req.length))
        elif req.framing == CHUNKED:
            fields.append((b"Transfer-Encoding", b"chunked"))
        elif method in _SENDS_BODY:
            fields.append((b"Content-Length", b"0"))  # servers (S3 among them) may want 411 otherwise
        head = serialize_head(method + b" " + target + b" HTTP/1.1", fields)
        attempt = _Attempt(self, origin, method, head, timeout)
        self._attempt = attempt
        d = attempt.d
        attempt.go()
        return d

    def respond(self, status: int, fields: Fields, body: bytes = b"") -> None:
        """Answer locally (`fields` is taken over). Any request body not yet read closes the connection afterwards."""
        if self._gone or self._responded:
            return
        self._cancel_attempt()
        if self._upstream is not None:
            up, self._upstream = self._upstream, None
            if not self._body_complete:
                up.abort()
        fake = Head()
        if body:
            fake.framing = LENGTH
            fake.length = len(body)
            fake.fields = [(b"content-length", b"Content-Length", b"%d" % len(body))]
        self._start_response(status, fields, fake)
        if body and not self._is_head:
            self.conn.transport.write(body)
            self.bytes_out += len(body)
        self._response_finished()

    def respond_file(
        self, status: int, fields: Fields, fd: int, first: int, length: int, size: int, source: Source | None = None
    ) -> None:
        """Answer with `length` bytes of the open file `fd` from offset `first` (`fd` is taken over
        and closed). `size` is the whole file's; with `source`, the file is still being written."""
        if self._gone or self._responded:
            os.close(fd)
            return
        self._cancel_attempt()
        fake = Head()
        fake.framing = LENGTH
        fake.length = length
        fake.fields = [(b"content-length", b"Content-Length", b"%d" % length)]
        self._start_response(status, fields, fake)
        if self._is_head or length == 0:
            os.close(fd)
            self._response_finished()
            return
        sender = self._sender = _FileSender(self, fd, first, first + length, size, source)
        sender.start()

    # -- internals: request body
    def _attach_body(self, up: UpstreamConnection) -> None:
        self._upstream = up
        if self._expect_continue and not self._responded:
            self._expect_continue = False
            self.conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        pending, self._pending = self._pending, None
        if pending:
            for chunk in pending:
                self._body_sent += len(chunk)
                up.transport.write(chunk)
        if self._body_complete:
            up.request_complete = True
            return
        up.transport.registerProducer(self.conn.valve, True)
        self.conn.transport.resumeProducing()
        self._arm_watch()

    def _detach_body(self) -> None:
        up, self._upstream = self._upstream, None
        if up is not None and not self._body_complete and up.connected_:
            up.transport.unregisterProducer()
        if not self._body_complete and self._body_sent == 0 and self._pending is None:
            self._pending = []  # nothing went out yet: a retry can still send it
            self._pending_size = 0

    def _client_body(self, chunk: bytes) -> None:
        self.bytes_in += len(chunk)
        up = self._upstream
        if up is not None:
            self._body_sent += len(chunk)
            up.send_body(chunk)
        elif self._pending is not None:
            self._pending.append(chunk)
            self._pending_size += len(chunk)
            if self._pending_size > 1 << 20:
                self.conn.transport.pauseProducing()
        # else: the body is being discarded; the connection closes after the response

    def _client_body_done(self) -> None:
        self._body_complete = True
        up = self._upstream
        if up is not None:
            up.request_complete = True
            if up.connected_:
                up.transport.unregisterProducer()
        if self._responded and self._relaying is None:
            self._finish()

    # -- internals: response
    def _start_response(self, status: int, fields: Fields, upstream: Head) -> None:
        self._responded = True
        self.status = status
        out = fields  # the caller's fresh list: framing and Connection are appended to it
        if upstream.framing == CHUNKED and not self._dechunk:
            out.append((b"Transfer-Encoding", b"chunked"))
        else:
            length = upstream.get(b"content-length")
            if length is not None and status != 204:
                out.append((b"Content-Length", length))
            elif upstream.framing != NO_BODY:
                self._keep = False  # body delimited by closing the connection
            elif status >= 200 and status not in (204, 304) and not self._is_head:
                out.append((b"Content-Length", b"0"))
        if not self._body_complete:
            self._keep = False  # the request body is not all read: cannot find the next request
        if not self._keep:
            out.append((b"Connection", b"close"))
        elif self.request.version == b"1.0":
            out.append((b"Connection", b"keep-alive"))
        line = b"HTTP/1.1 %d " % status + REASONS.get(status, b"Unknown")
        self.conn.transport.write(serialize_head(line, out))

    def _upstream_body(self, data: bytes, reader: BodyReader) -> None:
        if self._dechunk and reader.framing == CHUNKED:
            payload = reader.payload
            if payload:
                data = b"".join(payload)
                payload.clear()
            else:
                return
        self.bytes_out += len(data)
        self.conn.send_body(data)

    def _upstream_body_done(self, up: UpstreamConnection) -> None:
        registered = self._relaying is not None
        self._relaying = None
        if registered and not self._gone:
            self.conn.transport.unregisterProducer()
        if self._upstream is up:
            self._upstream = None
            if not self._body_complete:
                self._keep = False
        self._response_finished()

    def _upstream_truncated(self) -> None:
        self._relaying = None
        self.error = "upstream closed mid-body"
        self._abort_client()

    def _upstream_lost_held(self) -> None:
        # the handler still holds the response head and will relay or discard it; a
        # relay of a lost connection with an unfinished body must not look complete
        if not self._responded:
            self.error = "upstream closed before the body"

    def _response_finished(self) -> None:
        if self._body_complete or not self._keep:
            self._finish()
        # else: the client is still sending a body that goes upstream; finish when it ends

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._disarm_watch()
        self.conn._exchange_done(self, self._keep and self._body_complete)

    def _abort_client(self) -> None:
        if self._done:
            return
        self._done = True
        self._keep = False
        self._disarm_watch()
        self.conn._exchange_done(self, False, abort=True)

    def _client_lost(self) -> None:
        """The client left: cancel whatever is in flight upstream, never reuse that connection."""
        self._gone = True
        if self.error is None and not self._done:
            self.error = "client disconnected"
        self._disarm_watch()
        if self._sender is not None:
            self._sender.close()
        self._cancel_attempt(UpstreamError("closed", "client left"))
        for up in (self._upstream, self._relaying):
            if up is not None:
                up._attempt = None
                up.abort()
        self._upstream = self._relaying = None

    def _cancel_attempt(self, err: UpstreamError | None = None) -> None:
        """Stop waiting for a response head that nobody wants any more."""
        attempt, self._attempt = self._attempt, None
        if attempt is None or attempt.d is None:
            return
        attempt._stop_timer()
        d, attempt.d = attempt.d, None
        attempt.give_up()
        if attempt.conn is not None and attempt.conn._attempt is attempt:
            attempt.conn._attempt = None
            attempt.conn.abort()
        if err is not None:
            d.errback(err)

    # -- idle watchdog: one timer per exchange, no per-chunk work beyond the byte counters
    def _arm_watch(self) -> None:
        if self._watch is None and not self._done:
            self._moved = self.bytes_in + self.bytes_out
            self._watch = self.conn.reactor.callLater(self.conn.limits.idle_timeout, self._check_idle)

    def _disarm_watch(self) -> None:
        if self._watch is not None:
            if self._watch.active():
                self._watch.cancel()
            self._watch = None

    def _check_idle(self) -> None:
        self._watch = None
        moved = self.bytes_in + self.bytes_out
        waiting_for_head = self._attempt is not None and self._attempt.d is not None
        if moved != self._moved or waiting_for_head:
            self._arm_watch()
            return
        self.error = "idle timeout"
        if self._sender is not None:
            self._sender.close()
        for up in (self._upstream, self._relaying):
            if up is not None:
                up._attempt = None
                up.abort()
        self._upstream = self._relaying = None
        self._abort_client()


_C_HEAD, _C_BODY, _C_WAIT, _C_LINGER, _C_CLOSED = range(5)
_LINGER_TIMEOUT = 2.0
_MAX_LINGER = 1 << 20
_METHOD_START = frozenset(bytes([c]) for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


class ClientConnection(Protocol):
    """Server side of one client connection: parses heads, frames request bodies, one request at a time."""

    def __init__(self, factory: "RelayFactory") -> None:
        self.handler = factory.handler
        self.reactor = factory.reactor
        self.pool = factory.pool
        self.limits = factory.limits
        self.is_tls = factory.is_tls
        self.on_error = factory.on_bad_request
        self.valve: _Valve | None = None
        self._state = _C_HEAD
        self._buf = b""
        self._scanned = 0
        self._lingered = 0
        self._reader: BodyReader | None = None
        self._exchange: Exchange | None = None
        self._parsing = False
        self._timer: Any = None

    def connectionMade(self) -> None:
        self.valve = _Valve(self.transport)
        _big_reads(self.transport)
        self.send_body = _direct_writer(self.transport)
        self._timer = self.reactor.callLater(self.limits.head_timeout, self._timeout)

    def _timeout(self) -> None:
        self._timer = None
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
                if self._timer is not None:
                    if self._timer.active():
                        self._timer.cancel()
                    self._timer = None
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

    def _body_data(self, data: bytes, off: int) -> None:
        reader = self._reader
        ex = self._exchange
        try:
            n = reader.feed(data, off)
        except BadMessage as e:
            self.on_error(e)
            if ex is not None and not ex._responded:
                ex.respond(e.status, [(b"Content-Type", b"application/json")], _error_json(e))
            else:
                # mid-response: the upstream got a broken body; cut both sides
                self._state = _C_CLOSED
                self.transport.abortConnection()
            return
        if n:
            ex._client_body(data if (off == 0 and n == len(data)) else data[off : off + n])
        if reader.done:
            self._reader = None
            self._state = _C_WAIT
            end = off + n
            if end < len(data):
                self._buf = data[end:]
                self.transport.pauseProducing()
            ex._client_body_done()

    def _reject(self, e: BadMessage) -> None:
        self._state = _C_CLOSED
        self.on_error(e)
        body = _error_json(e)
        line = b"HTTP/1.1 %d " % e.status + REASONS.get(e.status, b"Error")
        self.transport.write(
            serialize_head(
                line,
                [
                    (b"Content-Type", b"application/json"),
                    (b"Content-Length", b"%d" % len(body)),
                    (b"Connection", b"close"),
                ],
            )
            + body
        )
        self.transport.loseConnection()

    def _exchange_done(self, ex: Exchange, keep: bool, abort: bool = False) -> None:
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
        if self._state == _C_BODY:
            # answered before the client finished sending: close our side once the answer is
            # out, but keep reading a little so the unread body does not turn the close into
            # a reset that destroys the answer before the client reads it
            self._state = _C_LINGER
            self._reader = None
            self.transport.resumeProducing()
            lose_write = getattr(self.transport, "loseWriteConnection", None)
            if lose_write is None:
                self.transport.loseConnection()
                return
            lose_write()
            self._timer = self.reactor.callLater(_LINGER_TIMEOUT, self._timeout)
            return
        if not keep or self._state == _C_CLOSED:
            self._state = _C_CLOSED
            self.transport.loseConnection()
            return
        self._state = _C_HEAD
        self._timer = self.reactor.callLater(self.limits.keepalive_timeout, self._timeout)
        self.transport.resumeProducing()
        if self._buf:
            self._next_heads()

    def connectionLost(self, reason: Failure = ierror.ConnectionDone) -> None:
        self._state = _C_CLOSED
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        ex, self._exchange = self._exchange, None
        if ex is not None:
            ex._client_lost()
            try:
                self.handler.finished(ex)
            except Exception:
                log.failure("access log / metrics hook failed")


def _error_json(e: BadMessage) -> bytes:
    code = b"UNSUPPORTED" if e.status in (501, 505) else b"BAD_REQUEST"
    msg = e.reason.replace('"', "'").encode("ascii", "replace")
    return b'{"errors":[{"code":"' + code + b'","message":"' + msg + b'"}]}'


class RelayFactory(Factory):
    """Builds client connections that hand each request to `handler`."""

    def __init__(
        self,
        handler: Handler,
        reactor: Any,
        pool: UpstreamPool,
        *,
        is_tls: bool = False,
        limits: Limits | None = None,
        on_bad_request: Callable[[BadMessage], None] = lambda e: None,
    ) -> None:
        self.handler = handler
        self.reactor = reactor
        self.pool = pool
        self.is_tls = is_tls
        self.limits = limits or Limits()
        self.on_bad_request = on_bad_request

    def buildProtocol(self, addr: Any) -> ClientConnection:
        return ClientConnection(self)
