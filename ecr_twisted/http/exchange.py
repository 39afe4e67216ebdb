"""One request and what became of it: the only thing routing, policy and metrics see.

A handler gets an `Exchange` per request with the parsed head; it answers locally with
`respond()` or `respond_file()`, or calls `forward()`, which sends the request upstream
and yields the response head as an `UpstreamResponse` to `relay()` or `discard()`. Bodies
never surface: they move as raw bytes, framing unchanged, each transport registered as
the other's producer so a slow side pauses the fast one.

The exchange also keeps the request's state for the three parts of the data path that
move its bytes: the client connection (`server`), the upstream attempt and connection
(`upstream`) and the file sender (`files`). Each has its own small set of methods below;
none of them touches the exchange's fields.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Protocol as TypingProtocol

from twisted.internet.defer import Deferred

from ecr_twisted.http.files import FileSender
from ecr_twisted.http.http11 import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    BodyReader,
    Fields,
    Head,
    serialize_head,
    status_line,
)
from ecr_twisted.http.origin import Origin, UpstreamError
from ecr_twisted.http.policy import (
    connection_field,
    expects_continue,
    keep_client_alive,
    request_framing,
    response_framing,
    send_continue,
)
from ecr_twisted.http.upstream import LONG, Attempt

if TYPE_CHECKING:
    from ecr_twisted.http.server import ClientConnection
    from ecr_twisted.http.upstream import UpstreamConnection, UpstreamResponse

__all__ = ["Exchange", "Fields", "Handler", "Sink", "Source"]

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Handler(TypingProtocol):
    """What the data path calls: routing and policy live behind this."""

    def handle(self, exchange: "Exchange") -> None: ...

    def finished(self, exchange: "Exchange") -> None: ...


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


class Exchange:
    """One client request and what became of it; the unit routing and metrics work with."""

    __slots__ = (
        "conn", "request", "started", "status", "upstream_status", "bytes_in", "bytes_out",
        "error", "ctx", "extra_field", "_dechunk", "_pending", "_body_complete", "_body_sent", "_upstream",
        "_attempt", "_relaying", "_responded", "_done", "_gone", "_keep", "_watch", "_moved",
        "_expect_continue", "_is_head", "_pending_size", "_sender", "_still", "_window", "_window_moved",
        "_held_head", "_pacing",
    )

    def __init__(self, conn: "ClientConnection", request: Head, started: float) -> None:
        self.conn = conn
        self.request = request
        self.started = started
        self.status = 0
        self.upstream_status = 0
        self.bytes_in = 0
        self.extra_field: tuple[bytes, bytes] | None = None  # added to whatever response head is sent
        self.bytes_out = 0
        self.error: str | None = None
        self.ctx: Any = None  # for the handler's own per-request state
        self._dechunk = request.version == b"1.0"
        self._pending: list[bytes] | None = [] if request.framing != NO_BODY else None
        self._pending_size = 0
        self._body_complete = request.framing == NO_BODY
        self._body_sent = 0
        self._upstream: UpstreamConnection | None = None  # where the request body goes
        self._attempt: Attempt | None = None
        self._relaying: UpstreamConnection | None = None  # where the response body comes from
        self._pacing = False  # the client transport is registered as that connection's consumer
        self._responded = False
        self._held_head = b""  # a response head not sent yet: it goes out with the first body bytes
        self._done = False
        self._gone = False
        self._keep = request.keep_alive()
        self._watch = 0.0  # when the watchdog next looks (reactor seconds, by the factory's sweep); 0: off
        self._moved = -1  # bytes moved both ways at the last watchdog tick
        self._still = 0.0  # seconds without any progress, in ticks
        self._window = 0.0  # seconds of the current minimum-rate window, in ticks
        self._window_moved = 0  # bytes moved when that window began
        self._is_head = request.method == b"HEAD"
        self._sender: FileSender | None = None
        self._expect_continue = expects_continue(request)

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

    def forward(
        self, origin: Origin, method: bytes, target: bytes, fields: Fields, timeout: float, pool_class: str = LONG
    ) -> Deferred[UpstreamResponse]:
        """Send the request (and its body, as it arrives) to `origin`; fires with the response head.

        `fields` (no framing fields) is taken over: the framing fields are appended to it.
        `pool_class` (`SHORT` or `LONG`) says which of the pool's shares the connection comes from:
        a request whose body is still arriving is a long transfer, whatever the caller says."""
        d: Deferred[UpstreamResponse] = Deferred()
        self.forward_to(d.callback, d.errback, origin, method, target, fields, timeout, pool_class)
        return d

    def forward_to(
        self,
        on_head: Callable[[UpstreamResponse], object],
        on_error: Callable[[Exception], object],
        origin: Origin,
        method: bytes,
        target: bytes,
        fields: Fields,
        timeout: float,
        pool_class: str = LONG,
    ) -> None:
        """`forward` without a Deferred: calls `on_head` with the response head or `on_error`
        with the exception (an `UpstreamError`, or RuntimeError when the body already went
        upstream), once, directly, possibly before returning. They must not raise: nothing
        catches it but the data path (a Deferred's callbacks cost microseconds per request)."""
        if self._gone:
            on_error(UpstreamError("closed", "client left"))
            return
        if self._body_sent:
            on_error(RuntimeError("request body already sent upstream"))
            return
        req = self.request
        framing = request_framing(req.framing, req.length, method)
        if framing is not None:
            fields.append(framing)
        head = serialize_head(method + b" " + target + b" HTTP/1.1", fields)
        if not self._body_complete:
            pool_class = LONG  # a slow sender must never hold a place kept for short exchanges
        attempt = Attempt(self, origin, method, head, timeout, pool_class, on_head, on_error)
        self._attempt = attempt
        attempt.go()

    def respond(self, status: int, fields: Fields, body: bytes = b"") -> None:
        """Answer locally (`fields` is taken over). Any request body not yet read closes the connection afterwards."""
        if self._gone or self._responded:
            return
        self._cancel_attempt()
        if self._upstream is not None:
            up, self._upstream = self._upstream, None
            if not self._body_complete:
                up.abort()
        if body:
            self.start_response(status, fields, LENGTH, b"%d" % len(body))
        else:
            self.start_response(status, fields, NO_BODY, None)
        if body and not self._is_head:
            self._held_head += body
            self.bytes_out += len(body)
        self.flush_head()
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
        self.start_response(status, fields, LENGTH, b"%d" % length)
        if self._is_head or length == 0:
            os.close(fd)
            self.flush_head()
            self._response_finished()
            return
        sender = self._sender = FileSender(self, fd, first, first + length, size, source)
        sender.start()

    # -- for the client connection (server.ClientConnection)
    @property
    def responded(self) -> bool:
        """A response head has gone to the client."""
        return self._responded

    def client_body(self, chunk: bytes) -> None:
        """Request body bytes (framing included) from the client."""
        self.bytes_in += len(chunk)
        up = self._upstream
        if up is not None:
            self._body_sent += len(chunk)
            up.send_body(chunk)
        elif self._pending is not None:
            self._pending.append(chunk)
            self._pending_size += len(chunk)
            if self._pending_size > 1 << 20:  # held for an upstream still being connected: 1 MiB at most
                self.conn.transport.pauseProducing()
        # else: the body is being discarded; the connection closes after the response

    def client_body_done(self) -> None:
        """The request body has been read to its end."""
        self._body_complete = True
        up = self._upstream
        if up is not None:
            up.request_complete = True
            if up.connected_:
                up.transport.unregisterProducer()
        if self._attempt is not None:
            self._attempt.body_done()
        if self._responded and self._relaying is None:
            self._finish()

    def client_lost(self) -> None:
        """The client left: cancel whatever is in flight upstream, never reuse that connection."""
        self._gone = True
        if self.error is None and not self._done:
            self.error = "client disconnected"
        self._disarm_watch()
        self._close_sender()
        self._cancel_attempt(UpstreamError("closed", "client left"))
        self._cut_upstreams()

    # -- for the upstream side (upstream.Attempt, UpstreamConnection, UpstreamResponse)
    @property
    def dechunk(self) -> bool:
        """The client cannot read chunked framing (HTTP/1.0): send it decoded bodies."""
        return self._dechunk

    @property
    def upstream_pending(self) -> bool:
        """A request waits for an upstream connection (a pool place or a connect): nothing went upstream yet."""
        attempt = self._attempt
        return attempt is not None and attempt.conn is None and attempt.acquiring is not None

    @property
    def request_read(self) -> bool:
        """The whole request body has been read from the client (true at once without a body)."""
        return self._body_complete

    @property
    def body_sent(self) -> int:
        """Request body bytes sent upstream so far."""
        return self._body_sent

    def attach_upstream(self, up: UpstreamConnection) -> None:
        """The request head went out on `up`: the body goes there from now on."""
        self._upstream = up
        if send_continue(self._expect_continue, self._responded):
            self._expect_continue = False
            self.conn.transport.write(_CONTINUE)
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

    def detach_upstream(self) -> None:
        """That connection failed before a response: stop sending it the body, keep it for a retry if none went out."""
        up, self._upstream = self._upstream, None
        if up is not None and not self._body_complete and up.connected_:
            up.transport.unregisterProducer()
        if not self._body_complete and self._body_sent == 0 and self._pending is None:
            self._pending = []  # nothing went out yet: a retry can still send it
            self._pending_size = 0

    def start_response(self, status: int, fields: Fields, framing: int, content_length: bytes | None) -> None:
        """Send the response head: `fields` (the caller's fresh list) gets the framing and
        Connection fields for a body framed as `framing` with `content_length`."""
        self._responded = True
        self.status = status
        if self.extra_field is not None:
            fields.append(self.extra_field)
        field, until_close = response_framing(status, framing, content_length, self._is_head, self._dechunk)
        if field is not None:
            fields.append(field)
        self._keep = keep_client_alive(self._keep, until_close, self._body_complete)
        if self._body_complete and self.conn.factory.draining:
            # the process is stopping: say so, so the client does not send into a closing connection
            self._keep = False
        field = connection_field(self._keep, self.request.version)
        if field is not None:
            fields.append(field)
        # held, so that a head and a small body leave in one send (see flush_head)
        self._held_head = serialize_head(status_line(status), fields)

    def flush_head(self) -> None:
        """Send a held response head now. Whoever starts a response flushes it once the first
        body bytes are joined to it, or at once when none are at hand."""
        head = self._held_head
        if head:
            self._held_head = b""
            if not self._gone:
                self.conn.send_body(head)

    def relay_from(self, up: UpstreamConnection) -> None:
        """The response body now flows from `up` to the client (first what came with its head)."""
        self._relaying = up
        self._arm_watch()  # before the first bytes: they count for the first window

    def relay_paced(self, up: UpstreamConnection) -> None:
        """The body did not come whole with its head: the client's transport paces `up` from now
        on. (A small body that came whole with its head costs no producer registration.)"""
        if self._relaying is up and not self._gone:
            self.flush_head()  # no body bytes came with the head: the client gets the head now
            self.conn.transport.registerProducer(up.valve, True)
            self._pacing = True

    def upstream_body(self, data: bytes, reader: BodyReader) -> None:
        """Response body bytes from upstream (raw, or de-chunked into `reader.payload`)."""
        if self._dechunk and reader.framing == CHUNKED:
            payload = reader.payload
            if payload:
                data = b"".join(payload)
                payload.clear()
            else:
                return
        self.send(data)

    def send(self, data: bytes) -> None:
        """Response body bytes to the client, behind the held head if it has not gone yet."""
        self.bytes_out += len(data)
        head = self._held_head
        if head:
            self._held_head = b""
            data = head + data
        self.conn.send_body(data)

    def upstream_body_done(self, up: UpstreamConnection) -> None:
        """The relayed response body ended."""
        self.flush_head()
        self._relaying = None
        if self._pacing:
            self._pacing = False
            if not self._gone:
                self.conn.transport.unregisterProducer()
        if self._upstream is up:
            self._upstream = None
            if not self._body_complete:
                self._keep = False
        self._response_finished()

    def upstream_truncated(self) -> None:
        """The relayed response body was cut: the client must never see it end."""
        self._relaying = None
        self.error = "upstream closed mid-body"
        self._abort_client()

    def upstream_lost_held(self) -> None:
        """The upstream closed while the handler holds its response head (before relay or discard)."""
        # the handler will still relay or discard it; a relay of a lost connection with an
        # unfinished body must not look complete
        if not self._responded:
            self.error = "upstream closed before the body"

    def abort_response(self, reason: str) -> None:
        """The response head went out but its body cannot follow: cut the client."""
        self.error = self.error or reason
        self._abort_client()

    # -- for the file sender (files.FileSender)
    def file_started(self, sender: FileSender) -> None:
        # the head stays held: the sender's first read goes out with it (or flush_head when it must wait)
        self.conn.transport.registerProducer(sender, True)
        self._arm_watch()

    def file_done(self) -> None:
        self._sender = None
        if not self._gone:
            self.conn.transport.unregisterProducer()
            self._response_finished()

    def file_failed(self, reason: str) -> None:
        self._sender = None
        if not self._gone:
            self.error = self.error or reason
            self.conn.transport.unregisterProducer()
            self._abort_client()

    # -- internals
    def _response_finished(self) -> None:
        if self._body_complete or not self._keep:
            self._finish()
        # else: the client is still sending a body that goes upstream; finish when it ends

    def _finish(self) -> None:
        self.flush_head()
        if self._done:
            return
        self._done = True
        self._disarm_watch()
        self.conn.exchange_done(self, self._keep and self._body_complete)

    def _abort_client(self) -> None:
        if self._done:
            return
        self._done = True
        self._keep = False
        self._disarm_watch()
        self.conn.exchange_done(self, False, abort=True)

    def _close_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()

    def _cut_upstreams(self) -> None:
        """Abort the connections carrying the request and response bodies, without telling their attempt."""
        for up in (self._upstream, self._relaying):
            if up is not None:
                up.abandon()
        self._upstream = self._relaying = None

    def _cancel_attempt(self, err: UpstreamError | None = None) -> None:
        """Stop waiting for a response head that nobody wants any more."""
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel(err)

    # -- deadlines, looked at by the client connection factory's sweep (`expire`, once a
    # second: no timer per request). The watchdog ticks every idle_timeout, or every
    # rate_window when that is shorter and a minimum rate is set (each tick within +1 s), and
    # cuts a body transfer that made no progress for idle_timeout or moved fewer than min_rate
    # bytes a second over a window (both directions count: a body is only as fast as its
    # slower side). No per-chunk work beyond the byte counters.
    def expire(self, now: float) -> None:
        """The sweep: run the watchdog's tick and the upstream attempt's timeout when they are due."""
        at = self._watch
        if at and now + 1e-6 >= at:
            self._check_progress(now)
        attempt = self._attempt
        if attempt is not None:
            attempt.expire(now)

    def _arm_watch(self) -> None:
        if not self._watch and not self._done:
            self._moved = self._window_moved = self.bytes_in + self.bytes_out
            self._still = self._window = 0.0
            self._watch = self.conn.reactor.seconds() + self._tick()

    def _tick(self) -> float:
        limits = self.conn.limits
        if limits.min_rate > 0:
            return min(limits.idle_timeout, limits.rate_window)
        return limits.idle_timeout

    def _disarm_watch(self) -> None:
        self._watch = 0.0

    def _check_progress(self, now: float) -> None:
        self._watch = 0.0
        limits = self.conn.limits
        tick = self._tick()
        moved = self.bytes_in + self.bytes_out
        progressed = moved != self._moved
        self._moved = moved
        if self._body_complete and self._attempt is not None and self._attempt.waiting:
            # the request went out whole and the upstream is at work on it (an upload commit can
            # take minutes): its response head has its own timeout, and windows start afresh
            self._still = self._window = 0.0
            self._window_moved = moved
        else:
            self._still = 0.0 if progressed else self._still + tick
            self._window += tick
            if self._still >= limits.idle_timeout:
                return self._give_up("idle timeout")
            if limits.min_rate > 0 and self._window >= limits.rate_window:
                if moved - self._window_moved < limits.min_rate * self._window:
                    return self._give_up(f"body slower than {limits.min_rate} bytes/s over {self._window:g} s")
                self._window = 0.0
                self._window_moved = moved
        self._watch = now + tick

    def _give_up(self, reason: str) -> None:
        self.error = reason
        self._close_sender()
        self._cut_upstreams()
        self._abort_client()
