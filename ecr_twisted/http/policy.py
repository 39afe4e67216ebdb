"""Connection policy of the relay, as pure functions of message heads and flags.

How a response is framed, whether a client or upstream connection can carry another
request, when `100 Continue` is due, whether a request may be sent again: decided here,
without transports or timers, so the rules can be read and tested alone. The connection
classes in `server`, `upstream` and `exchange` call these and only move bytes.
"""

from __future__ import annotations

from ecr_twisted.http.http11 import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, Head

__all__ = [
    "CLOSE",
    "IDEMPOTENT",
    "KEEP",
    "LINGER",
    "MAX_DRAIN",
    "SENDS_BODY",
    "connection_field",
    "after_response",
    "expects_continue",
    "keep_client_alive",
    "may_pool",
    "may_retry",
    "request_framing",
    "response_framing",
    "send_continue",
    "upstream_keep_alive",
    "worth_draining",
]

Field = tuple[bytes, bytes]

SENDS_BODY = frozenset({b"POST", b"PUT", b"PATCH"})
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
MAX_DRAIN = 1 << 20  # discarded bodies beyond this are cheaper to cut than to read


# -- towards the client


def response_framing(
    status: int, framing: int, content_length: bytes | None, head_request: bool, dechunk: bool
) -> tuple[Field | None, bool]:
    """How to frame a response body for the client: (framing field to send or None, whether
    the body ends only when the connection closes).

    `framing` and `content_length` describe the body as it will be sent (an upstream
    response's, or a local one); `dechunk` is set for clients that cannot read chunked
    framing (HTTP/1.0), whose chunked bodies are decoded and delimited by closing.
    """
    if framing == CHUNKED and not dechunk:
        return (b"Transfer-Encoding", b"chunked"), False
    if content_length is not None and status != 204:
        return (b"Content-Length", content_length), False
    if framing != NO_BODY:
        return None, True
    if status >= 200 and status not in (204, 304) and not head_request:
        return (b"Content-Length", b"0"), False
    return None, False


def keep_client_alive(asked: bool, until_close: bool, request_read: bool) -> bool:
    """Whether the client connection can carry another request after this response.

    `asked`: the request allows it (`Head.keep_alive()`); `until_close`: the response body
    is delimited by closing; `request_read`: the whole request body has been read, without
    which the next request cannot be found."""
    return asked and not until_close and request_read


KEEP, LINGER, CLOSE = range(3)


def after_response(keep: bool, request_unread: bool, closed: bool) -> int:
    """What becomes of a client connection once an exchange is over: LINGER when the client
    is still sending a request body we answered early (close our side, but read on a little
    so the close does not become a reset that destroys the answer), CLOSE when it cannot
    carry another request, else KEEP it for the next one."""
    if request_unread:
        return LINGER
    if not keep or closed:
        return CLOSE
    return KEEP


def connection_field(keep: bool, version: bytes) -> Field | None:
    """The `Connection` field of a response: `close` when the connection ends after it,
    `keep-alive` for HTTP/1.0 clients (whose default is to close), else none."""
    if not keep:
        return (b"Connection", b"close")
    if version == b"1.0":
        return (b"Connection", b"keep-alive")
    return None


def expects_continue(request: Head) -> bool:
    """The client waits for `100 Continue` before sending its body (HTTP/1.1 only)."""
    expect = request.get(b"expect")
    return expect is not None and expect.lower() == b"100-continue" and request.version == b"1.1"


def send_continue(expected: bool, responded: bool) -> bool:
    """`100 Continue` is sent by the proxy, not relayed: once the body has an upstream to go
    to, and never after a final response (which tells the client not to send it)."""
    return expected and not responded


# -- towards the upstream


def request_framing(framing: int, length: int, method: bytes) -> Field | None:
    """The framing field of a forwarded request: the client's framing, unchanged; an empty
    POST/PUT/PATCH says `Content-Length: 0` (servers, S3 among them, may answer 411 otherwise)."""
    if framing == LENGTH:
        return (b"Content-Length", b"%d" % length)
    if framing == CHUNKED:
        return (b"Transfer-Encoding", b"chunked")
    if method in SENDS_BODY:
        return (b"Content-Length", b"0")
    return None


def upstream_keep_alive(response: Head) -> bool:
    """The upstream offers to keep its connection open after this response."""
    return (
        response.version == b"1.1"
        and b"close" not in response.connection_tokens()
        and response.framing != UNTIL_CLOSE
    )


def may_pool(keep: bool, request_sent: bool, extra_bytes: bool) -> bool:
    """Whether an upstream connection may go back to the pool once a response body ended:
    the upstream kept it open, the whole request went out (else the upstream still waits for
    body bytes), and nothing came after the response (a confused server is never trusted again)."""
    return keep and request_sent and not extra_bytes


def worth_draining(request_sent: bool, framing: int, remaining: int) -> bool:
    """Whether to read a response body nobody wants so its connection can be reused,
    rather than closing it: not if it only ends at close, or is known to be big."""
    if not request_sent or framing == UNTIL_CLOSE:
        return False
    return not (framing == LENGTH and remaining > MAX_DRAIN)


def may_retry(method: bytes, reused: bool, got_bytes: bool, retried: bool, body_sent: int) -> bool:
    """Whether a request whose connection closed before a response head may be sent again
    on a fresh connection: once, for idempotent methods, when the connection came from the
    pool (the server closed it while idle) and nothing irreversible happened (no response
    bytes, no request body bytes sent)."""
    return reused and method in IDEMPOTENT and not got_bytes and not retried and body_sent == 0
