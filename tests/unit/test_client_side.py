"""The client side of the data path on in-memory transports: what a client that misbehaves
(slowly, half-closed, with heads the parser refuses) gets, and when."""

from __future__ import annotations

import json

from twisted.internet.testing import StringTransport

from ecr_twisted.testing.doubles import UPSTREAM, Harness

GET = b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: h\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def error_of(client: StringTransport) -> tuple[int, dict[bytes, bytes], dict[str, str]]:
    """(status, header fields, first JSON error) of the one answer a client got."""
    head, _, body = client.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.lower()] = value.strip()
    return int(lines[0].split(b" ")[1]), fields, json.loads(body)["errors"][0]


# -- heads the parser refuses: answered at once, with the registry's JSON envelope, never 5xx


def test_a_bare_lf_head_is_refused_at_once() -> None:
    for pieces in ([b"GET /v2/ HTTP/1.1\nHost: h\n\n"], [b"GET /v2/ HTTP/1.1\r", b"\nHost: h\n"]):
        h = Harness()
        proto, client = h.client()
        for piece in pieces:
            proto.dataReceived(piece)
        status, _, err = error_of(client)
        assert (status, err["code"]) == (400, "BAD_REQUEST"), pieces
        assert client.disconnecting and h.upstreams.connections == []


def test_a_head_split_between_cr_and_lf_is_still_fine() -> None:
    h = Harness()
    proto, client = h.client()
    for piece in (GET[:16], GET[16:17], GET[17:]):  # ...HTTP/1.1\r | \n | Host...
        proto.dataReceived(piece)
    assert h.upstreams.last()[1].value().startswith(b"GET /v2/app/manifests/1 ")


def test_an_unknown_method_is_405_with_allow() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"BREW /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    status, fields, err = error_of(client)
    assert (status, err["code"]) == (405, "UNSUPPORTED")
    assert fields[b"allow"] == b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
    assert h.sample("ecrproxy_bad_requests_total", {"status": "405"}) == 1


def test_an_unsupported_transfer_coding_is_400() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"PATCH /v2/a/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
    status, _, err = error_of(client)
    assert (status, err["code"]) == (400, "BAD_REQUEST")
    assert client.disconnecting and h.upstreams.connections == []


# -- timers: a head in 30 s, each one; between requests the keep-alive wait; bodies at a minimum rate

BLOB = b"/v2/app/blobs/sha256:" + b"ab" * 32


def answered_once(h: Harness, proto: object, client: StringTransport) -> None:
    """One request answered on a kept-alive connection."""
    proto.dataReceived(GET)  # type: ignore[attr-defined]
    h.upstreams.last()[0].dataReceived(OK)
    assert client.value().endswith(b"\r\n\r\nok") and not client.disconnecting


def test_the_first_head_has_the_head_timeout_from_the_connection() -> None:
    h = Harness()
    limits = h.factory.limits
    assert (limits.head_timeout, limits.keepalive_timeout) == (30.0, 120.0)
    proto, client = h.client()
    h.reactor.advance(limits.head_timeout - 1)
    proto.dataReceived(GET[:10])
    h.reactor.advance(1)
    assert client.value().startswith(b"HTTP/1.1 408 ") and client.disconnecting
    proto, client = h.client()
    h.reactor.advance(limits.head_timeout)
    assert client.value() == b"" and client.disconnecting  # nothing asked, nothing said


def test_a_later_head_gets_the_head_timeout_not_the_keep_alive_wait() -> None:
    h = Harness()
    limits = h.factory.limits
    proto, client = h.client()
    answered_once(h, proto, client)
    h.reactor.advance(limits.keepalive_timeout - 1)  # idle between requests: allowed
    assert not client.disconnecting
    proto.dataReceived(GET[:10])  # the next head starts: from now on it has head_timeout
    h.reactor.advance(limits.head_timeout - 1)
    assert not client.disconnecting
    h.reactor.advance(1)
    assert client.value().split(b"\r\n\r\nok", 1)[1].startswith(b"HTTP/1.1 408 ") and client.disconnecting


def test_a_second_head_sent_slowly_right_away_gets_30_s_not_120() -> None:
    h = Harness()
    proto, client = h.client()
    answered_once(h, proto, client)
    proto.dataReceived(b"G")
    h.reactor.advance(h.factory.limits.head_timeout)
    assert client.disconnecting


def test_an_idle_kept_alive_connection_closes_after_the_keep_alive_wait() -> None:
    h = Harness()
    proto, client = h.client()
    answered_once(h, proto, client)
    h.reactor.advance(h.factory.limits.keepalive_timeout - 1)
    assert not client.disconnecting
    h.reactor.advance(1)
    assert client.disconnecting and client.value().endswith(b"\r\n\r\nok")  # closed without a word


def test_an_upload_trickling_below_the_minimum_rate_is_cut() -> None:
    h = Harness()
    limits = h.factory.limits
    assert (limits.min_rate, limits.rate_window) == (1024, 60.0)
    proto, client = h.client()
    proto.dataReceived(b"PATCH /v2/app/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n")
    _, upstream = h.upstreams.last()
    for _ in range(5):  # 100 bytes every 10 s: progress, but far below 1 KiB/s
        proto.dataReceived(b"x" * 100)
        h.reactor.advance(10)
    assert not client.disconnected
    h.reactor.advance(limits.rate_window)
    assert client.disconnected and upstream.disconnected


def test_an_upload_at_the_minimum_rate_goes_on() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"PATCH /v2/app/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nContent-Length: 300000\r\n\r\n")
    _, upstream = h.upstreams.last()
    for _ in range(250):  # 1,200 bytes a second for 250 s
        proto.dataReceived(b"x" * 1200)
        h.reactor.advance(1)
    assert not client.disconnected and not upstream.disconnected
    assert upstream.value().endswith(b"x" * 300000)


def test_a_download_read_below_the_minimum_rate_is_cut() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET.replace(b"/v2/app/manifests/1", BLOB))
    conn, upstream = h.upstreams.last()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"y" * 65536)
    assert client.producer is not None
    client.producer.pauseProducing()  # the client stops reading (64 KiB in the first minute: enough)
    h.reactor.advance(h.factory.limits.rate_window)
    assert not client.disconnected
    h.reactor.advance(h.factory.limits.rate_window)  # nothing in the second
    assert client.disconnected and upstream.disconnected


def test_waiting_for_the_upstream_to_commit_an_upload_is_not_slowness() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"PUT /v2/app/blobs/uploads/u?digest=sha256:x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n"
                       b"12345")
    conn, upstream = h.upstreams.last()
    h.reactor.advance(h.config.upload_timeout - 1)  # ECR may take minutes to commit a big layer
    assert not client.disconnected and not upstream.disconnected
    conn.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 201 ")


def test_the_minimum_rate_can_be_turned_off_leaving_the_idle_timeout() -> None:
    h = Harness()
    limits = h.factory.limits
    limits.min_rate, limits.idle_timeout = 0, 100.0
    proto, client = h.client()
    proto.dataReceived(b"PATCH /v2/app/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n")
    for _ in range(5):  # a byte every 99 s is progress
        proto.dataReceived(b"x")
        h.reactor.advance(limits.idle_timeout - 1)
    assert not client.disconnected
    for _ in range(3):  # none at all: cut, uploads too (checked once per idle_timeout)
        h.reactor.advance(limits.idle_timeout)
    assert client.disconnected


def test_the_timers_are_options() -> None:
    import pytest
    from twisted.internet.testing import MemoryReactorClock
    from twisted.python.usage import UsageError

    from ecr_twisted.app.build import build
    from ecr_twisted.app.options import Options

    def limits_of(args: list[str], env: dict[str, str] | None = None) -> object:
        o = Options(environ=env or {})
        o.parseOptions(["--anonymous", "--region", "eu-west-1", *args])
        return build(o.settings, MemoryReactorClock()).proxy.limits

    got = limits_of(["--head-timeout", "10", "--keepalive-timeout", "5", "--min-body-rate", "0",
                     "--min-body-rate-window", "20", "--idle-timeout", "7"])
    assert vars(got) == {"head_timeout": 10.0, "keepalive_timeout": 5.0, "min_rate": 0, "rate_window": 20.0,
                         "idle_timeout": 7.0}
    assert vars(limits_of([], {"ECRPROXY_MIN_BODY_RATE": "4096"}))["min_rate"] == 4096
    for bad in (["--head-timeout", "0"], ["--keepalive-timeout", "-1"], ["--min-body-rate", "-5"],
                ["--min-body-rate-window", "0"]):
        with pytest.raises(UsageError, match=bad[0]):
            limits_of(bad)


# -- half-close: a client that shuts down its sending side after a whole request still gets its answer


def test_the_client_connection_takes_half_closes() -> None:
    from twisted.internet.interfaces import IHalfCloseableProtocol

    h = Harness()
    proto, _ = h.client()
    # without this Twisted's TCP transport calls connectionLost on the client's FIN
    assert IHalfCloseableProtocol.providedBy(proto)


def test_a_request_then_a_half_close_is_answered_then_closed() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET)
    proto.readConnectionLost()
    conn, upstream = h.upstreams.last()
    assert not upstream.disconnecting  # the request goes on
    conn.dataReceived(OK)
    assert client.value().startswith(b"HTTP/1.1 200 ") and client.value().endswith(b"\r\n\r\nok")
    assert client.disconnecting and not client.disconnected  # closed after the answer, not aborted


def test_a_fin_while_the_request_waits_for_an_upstream_place_is_a_departure() -> None:
    """The FIN of a client that left looks like a half-close; while its request has not gone upstream
    (queued for a pool place) it is taken as a departure, so bursts of departed clients cost no upstream."""
    h = Harness()
    h.upstreams.hold = True  # the connect stays under way: the request has not gone upstream
    proto, client = h.client()
    proto.dataReceived(GET)
    assert client.value() == b""
    proto.readConnectionLost()
    assert client.disconnected  # aborted: nothing was sent upstream, nothing is lost
    proto.connectionLost()  # as the reactor reports the abort
    assert h.upstreams.pending == []  # its connect was stopped
    assert h.pool.counts(UPSTREAM) == (0, 0, 0, 0)


def test_pipelined_requests_then_a_half_close_are_all_answered() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET + GET.replace(b"/1 ", b"/2 "))
    proto.readConnectionLost()
    conn, upstream = h.upstreams.last()
    conn.dataReceived(OK)
    assert not client.disconnecting
    conn.dataReceived(OK)
    assert client.value().count(b"HTTP/1.1 200 OK") == 2 and client.disconnecting
    assert b"GET /v2/app/manifests/2 " in upstream.value()


def test_a_half_close_between_requests_or_mid_head_ends_the_connection() -> None:
    h = Harness()
    proto, client = h.client()
    answered_once(h, proto, client)
    proto.readConnectionLost()
    assert client.disconnecting
    proto, client = h.client()
    proto.dataReceived(GET[:20])
    proto.readConnectionLost()
    assert client.value().startswith(b"HTTP/1.1 400 ") and client.disconnecting


def test_a_half_close_mid_body_cuts_the_request() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"PATCH /v2/app/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    proto.readConnectionLost()  # the body can never be whole
    assert client.disconnected


def test_a_pipelined_request_cut_by_the_half_close_is_not_sent_whole() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(GET + b"PATCH /v2/app/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
    proto.readConnectionLost()
    conn, _ = h.upstreams.last()
    conn.dataReceived(OK)
    assert client.value().count(b"HTTP/1.1 200 OK") == 1 and client.disconnected
