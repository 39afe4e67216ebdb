"""The relay's connection policy, alone: framing, keep-alive, 100-continue, reuse and retry."""

from __future__ import annotations

import pytest

from ecr_twisted.http.http11 import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, parse_request_head, parse_response_head
from ecr_twisted.http.policy import (
    CLOSE,
    KEEP,
    LINGER,
    MAX_DRAIN,
    after_response,
    connection_field,
    expects_continue,
    keep_client_alive,
    may_pool,
    may_retry,
    request_framing,
    response_framing,
    send_continue,
    upstream_keep_alive,
    worth_draining,
)

TE = (b"Transfer-Encoding", b"chunked")


def cl(n: bytes) -> tuple[bytes, bytes]:
    return (b"Content-Length", n)


# -- response framing towards the client


@pytest.mark.parametrize(
    "status, framing, length, head_request, dechunk, expected",
    [
        # chunked passes through to HTTP/1.1 clients
        (200, CHUNKED, None, False, False, (TE, False)),
        # HTTP/1.0 clients get it decoded, delimited by closing
        (200, CHUNKED, None, False, True, (None, True)),
        (200, LENGTH, b"10", False, False, (cl(b"10"), False)),
        (200, LENGTH, b"10", False, True, (cl(b"10"), False)),
        # HEAD keeps the Content-Length of the GET it stands for
        (200, NO_BODY, b"123456", True, False, (cl(b"123456"), False)),
        (304, NO_BODY, b"42", False, False, (cl(b"42"), False)),
        # 204 never says Content-Length
        (204, NO_BODY, b"0", False, False, (None, False)),
        (204, NO_BODY, None, False, False, (None, False)),
        # no length known: ends when the connection closes
        (200, UNTIL_CLOSE, None, False, False, (None, True)),
        # an empty body says so, except where no body is allowed
        (200, NO_BODY, None, False, False, (cl(b"0"), False)),
        (201, NO_BODY, None, False, False, (cl(b"0"), False)),
        (304, NO_BODY, None, False, False, (None, False)),
        (200, NO_BODY, None, True, False, (None, False)),
        (100, NO_BODY, None, False, False, (None, False)),
    ],
)
def test_response_framing(
    status: int, framing: int, length: bytes | None, head_request: bool, dechunk: bool, expected: object
) -> None:
    assert response_framing(status, framing, length, head_request, dechunk) == expected


def test_the_client_connection_is_kept_only_if_asked_delimited_and_read() -> None:
    assert keep_client_alive(True, False, True)
    assert not keep_client_alive(False, False, True)  # Connection: close, or HTTP/1.0 without keep-alive
    assert not keep_client_alive(True, True, True)  # body ends at close
    assert not keep_client_alive(True, False, False)  # request body unread: next request cannot be found


def test_connection_field() -> None:
    assert connection_field(False, b"1.1") == (b"Connection", b"close")
    assert connection_field(False, b"1.0") == (b"Connection", b"close")
    assert connection_field(True, b"1.0") == (b"Connection", b"keep-alive")
    assert connection_field(True, b"1.1") is None


def test_after_response() -> None:
    assert after_response(True, False, False) == KEEP
    assert after_response(False, False, False) == CLOSE
    assert after_response(True, False, True) == CLOSE
    # answered before the body was read: linger whatever else holds
    assert after_response(True, True, False) == LINGER
    assert after_response(False, True, False) == LINGER


# -- 100-continue


def test_expects_continue_only_for_http11_and_the_exact_token() -> None:
    put = b"PUT /v2/a/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
    assert expects_continue(parse_request_head(put + b"Expect: 100-continue"))
    assert expects_continue(parse_request_head(put + b"Expect: 100-Continue"))
    assert not expects_continue(parse_request_head(put + b"Expect: 100-continue-ish"))
    assert not expects_continue(parse_request_head(put.rstrip(b"\r\n")))
    old = b"PUT /v2/a/blobs/uploads/u HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue"
    assert not expects_continue(parse_request_head(old))


def test_continue_is_sent_unless_a_final_response_went_first() -> None:
    assert send_continue(True, False)
    assert not send_continue(True, True)
    assert not send_continue(False, False)


# -- towards the upstream


@pytest.mark.parametrize(
    "framing, length, method, expected",
    [
        (LENGTH, 8, b"PATCH", cl(b"8")),
        (CHUNKED, 0, b"PATCH", TE),
        (NO_BODY, 0, b"POST", cl(b"0")),
        (NO_BODY, 0, b"PUT", cl(b"0")),
        (NO_BODY, 0, b"PATCH", cl(b"0")),
        (NO_BODY, 0, b"GET", None),
        (NO_BODY, 0, b"HEAD", None),
        (NO_BODY, 0, b"DELETE", None),
    ],
)
def test_request_framing(framing: int, length: int, method: bytes, expected: object) -> None:
    assert request_framing(framing, length, method) == expected


@pytest.mark.parametrize(
    "raw, method, keep",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2", b"GET", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close", b"GET", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: Keep-Alive, CLOSE", b"GET", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive", b"GET", False),
        (b"HTTP/1.1 200 OK", b"GET", False),  # ends at close
        (b"HTTP/1.1 200 OK", b"HEAD", True),  # no body after a HEAD
        (b"HTTP/1.1 204 No Content", b"DELETE", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", b"GET", True),
    ],
)
def test_upstream_keep_alive(raw: bytes, method: bytes, keep: bool) -> None:
    assert upstream_keep_alive(parse_response_head(raw, method)) is keep


def test_an_upstream_connection_is_pooled_only_when_clean() -> None:
    assert may_pool(True, True, False)
    assert not may_pool(False, True, False)
    assert not may_pool(True, False, False)  # the upstream still waits for request body bytes
    assert not may_pool(True, True, True)  # bytes after the response: a confused server


def test_worth_draining() -> None:
    assert worth_draining(True, NO_BODY, 0)
    assert worth_draining(True, CHUNKED, 0)
    assert worth_draining(True, LENGTH, MAX_DRAIN)
    assert not worth_draining(True, LENGTH, MAX_DRAIN + 1)
    assert not worth_draining(True, UNTIL_CLOSE, 0)
    assert not worth_draining(False, LENGTH, 10)


def test_may_retry_once_when_nothing_irreversible_happened() -> None:
    assert may_retry(b"GET", True, False, False, 0)
    for method in (b"HEAD", b"OPTIONS", b"PUT", b"DELETE"):
        assert may_retry(method, True, False, False, 0)
    assert not may_retry(b"POST", True, False, False, 0)
    assert not may_retry(b"PATCH", True, False, False, 0)
    assert not may_retry(b"GET", False, False, False, 0)  # a fresh connection: a real failure
    assert not may_retry(b"GET", True, True, False, 0)  # response bytes seen
    assert not may_retry(b"GET", True, False, True, 0)  # once only
    assert not may_retry(b"PUT", True, False, False, 1)  # body bytes went out
