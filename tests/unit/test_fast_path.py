"""The per-request fast path (#14): one send per response, no reading toggled, deadlines instead of timers."""

from typing import Any

from ecr_twisted.http.exchange import Exchange
from ecr_twisted.http.origin import UpstreamError
from ecr_twisted.http.server import SWEEP
from ecr_twisted.http.sockets import no_delay
from ecr_twisted.http.upstream import SHORT, UpstreamResponse
from ecr_twisted.testing.doubles import UPSTREAM, Harness

MANIFEST = b"GET /v2/app/manifests/1.0 HTTP/1.1\r\nHost: registry.example.com\r\n\r\n"
SMALL = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello"


class Counting:
    """Counts the writes a connection makes (its direct writer and its transport's write), and
    whether its transport's reading was paused."""

    def __init__(self, transport: Any, conn: Any = None) -> None:
        self.writes: list[bytes] = []
        self.pauses = 0
        write, pause = transport.write, transport.pauseProducing

        def counted_write(data: bytes) -> None:
            self.writes.append(data)
            write(data)

        def counted_pause() -> None:
            self.pauses += 1
            pause()

        transport.write = counted_write
        transport.pauseProducing = counted_pause
        if conn is not None:
            conn.send_body = counted_write


def test_a_small_relayed_response_is_one_write_and_never_pauses_the_upstream() -> None:
    h = Harness()
    proto, client = h.client()
    out = Counting(client, proto)
    proto.dataReceived(MANIFEST)
    up, upstream = h.upstreams.last()
    inbound = Counting(upstream)
    up.dataReceived(SMALL)
    assert len(out.writes) == 1 and out.writes[0].startswith(b"HTTP/1.1 200 ") and out.writes[0].endswith(b"hello")
    assert inbound.pauses == 0 and upstream.producerState == "producing"
    # and the next request on the kept connections does the same
    proto.dataReceived(MANIFEST)
    assert h.upstreams.last()[0] is up
    up.dataReceived(SMALL)
    assert len(out.writes) == 2 and inbound.pauses == 0


def test_a_head_whose_body_is_late_goes_out_at_once() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(MANIFEST)
    up, _ = h.upstreams.last()
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 200 ")  # not held waiting for body bytes
    up.dataReceived(b"hello")
    assert client.value().endswith(b"\r\n\r\nhello")


def test_the_keepalive_timeout_is_a_deadline_swept_within_one_second() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(MANIFEST)
    up, _ = h.upstreams.last()
    h.reactor.advance(0.3)  # the response comes between two sweeps
    up.dataReceived(SMALL)
    keepalive = h.factory.limits.keepalive_timeout
    h.reactor.advance(keepalive - 0.3)
    h.reactor.advance(0.2)
    assert not client.disconnecting  # never before the configured time
    for _ in range(int(SWEEP / 0.1) + 2):
        h.reactor.advance(0.1)
    assert client.disconnecting  # and within one sweep after it


def test_no_timer_is_scheduled_per_request() -> None:
    h = Harness()
    proto, _ = h.client()
    proto.dataReceived(MANIFEST)
    up, _ = h.upstreams.last()
    up.dataReceived(SMALL)
    before = len(h.reactor.getDelayedCalls())
    for _ in range(5):
        proto.dataReceived(MANIFEST)
        up.dataReceived(SMALL)
    assert len(h.reactor.getDelayedCalls()) == before


class _Direct:
    """A handler that forwards with forward_to and keeps what it was called with."""

    def __init__(self) -> None:
        self.heads: list[UpstreamResponse] = []
        self.errors: list[Exception] = []

    def handle(self, ex: Exchange) -> None:
        def on_head(resp: UpstreamResponse) -> None:
            self.heads.append(resp)
            resp.relay(resp.head.status, [])

        ex.forward_to(on_head, self.errors.append, UPSTREAM, b"GET", ex.request.target, [], 5.0, SHORT)

    def finished(self, ex: Exchange) -> None:
        pass


def test_forward_to_calls_back_directly_and_its_errors_are_exceptions() -> None:
    h = Harness()
    direct = _Direct()
    h.factory.handler = direct
    proto, client = h.client()
    proto.handler = direct
    proto.dataReceived(MANIFEST)
    up, _ = h.upstreams.last()
    up.dataReceived(SMALL)
    assert len(direct.heads) == 1 and client.value().endswith(b"hello")
    proto.dataReceived(MANIFEST)
    h.reactor.advance(5.0 + SWEEP)
    assert len(direct.errors) == 1 and isinstance(direct.errors[0], UpstreamError)
    assert direct.errors[0].kind == "timeout"


def test_no_delay_is_set_on_tcp_and_skipped_elsewhere() -> None:
    class Tcp:
        on = False

        def setTcpNoDelay(self, on: bool) -> None:
            self.on = on

    t = Tcp()
    no_delay(t)
    assert t.on
    no_delay(object())  # unix or in-memory: nothing to set, no error
