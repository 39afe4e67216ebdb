"""The parser is the security boundary: it must refuse what a careful server refuses."""

import pytest

from ecr_twisted.http.http11 import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    BadMessage,
    BodyReader,
    parse_request_head,
    parse_response_head,
    split_head,
)


def req(*lines: bytes) -> bytes:
    return b"\r\n".join(lines)


def test_parses_request_line_fields_and_length() -> None:
    head = parse_request_head(req(b"PATCH /v2/a/blobs/uploads/x?_state=1 HTTP/1.1", b"Host: h", b"Content-Length: 12",
                                  b"X-Thing:  padded value \t"))
    assert (head.method, head.target, head.version) == (b"PATCH", b"/v2/a/blobs/uploads/x?_state=1", b"1.1")
    assert head.framing == LENGTH and head.length == 12
    assert head.get(b"x-thing") == b"padded value"
    assert head.fields[0] == (b"host", b"Host", b"h")


def test_chunked_request() -> None:
    head = parse_request_head(req(b"PATCH / HTTP/1.1", b"Host: h", b"Transfer-Encoding: Chunked"))
    assert head.framing == CHUNKED


def test_no_body_without_length() -> None:
    assert parse_request_head(req(b"GET / HTTP/1.1", b"Host: h")).framing == NO_BODY


@pytest.mark.parametrize(
    "raw,status",
    [
        (req(b"GET / HTTP/1.1", b"Host: h", b"Content-Length: 5", b"Content-Length: 5"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"Content-Length: 5, 6"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"Content-Length: -1"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"Content-Length: +1"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"Content-Length: 5", b"Transfer-Encoding: chunked"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"Transfer-Encoding: gzip, chunked"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"X: a", b" folded"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"Bad Name: a"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"X : a"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"X: a\nY: b"), 400),
        (req(b"GET / HTTP/1.1", b"Host: h", b"X: a\x00"), 400),
        (req(b"GET / HTTP/1.1"), 400),
        (req(b"GET / HTTP/1.1", b"Host: a", b"Host: b"), 400),
        (req(b"BREW / HTTP/1.1", b"Host: h"), 405),
        (req(b"GET  / HTTP/1.1", b"Host: h"), 400),
        (req(b"GET http://evil/ HTTP/1.1", b"Host: h"), 400),
        (req(b"GET / HTTP/2.0", b"Host: h"), 400),
        (req(b"GET /a b HTTP/1.1", b"Host: h"), 400),
        (req(b"POST / HTTP/1.0", b"Transfer-Encoding: chunked"), 400),
    ],
)
def test_refuses_dangerous_requests(raw: bytes, status: int) -> None:
    with pytest.raises(BadMessage) as e:
        parse_request_head(raw)
    assert e.value.status == status


def test_oversized_head_is_refused_before_it_ends() -> None:
    with pytest.raises(BadMessage) as e:
        split_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 70000)
    assert e.value.status == 431
    assert split_head(b"GET / HTTP/1.1\r\nHost: h\r\n") is None
    assert split_head(b"GET / HTTP/1.1\r\nHost: h\r\n\r\nrest") == (b"GET / HTTP/1.1\r\nHost: h", 27)


def test_response_framing() -> None:
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3", b"GET").framing == LENGTH
    # HEAD, 204 and 304 never have bodies whatever the headers say
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3", b"HEAD")
    assert head.framing == NO_BODY and head.get(b"content-length") == b"3"
    assert parse_response_head(b"HTTP/1.1 204 No Content", b"GET").framing == NO_BODY
    assert parse_response_head(b"HTTP/1.1 200 OK", b"GET").framing == UNTIL_CLOSE
    assert parse_response_head(b"HTTP/1.1 200", b"GET").status == 200
    with pytest.raises(BadMessage) as e:
        parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2", b"GET")
    assert e.value.status == 502


def test_length_reader_stops_at_the_end() -> None:
    r = BodyReader(LENGTH, 5)
    assert r.feed(b"abc") == 3 and not r.done
    assert r.feed(b"deNEXT") == 2 and r.done
    assert r.feed(b"more") == 0


def test_chunked_reader_finds_the_end_across_any_split() -> None:
    body = b"5\r\nhello\r\n1a;ext=1\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: v\r\n\r\n"
    stream = body + b"GET /next"
    for cut in range(1, len(body)):
        r = BodyReader(CHUNKED, dechunk=True)
        n1 = r.feed(stream[:cut])
        n2 = r.feed(stream, cut)
        assert r.done, cut
        assert n1 + n2 == len(body), cut
        assert b"".join(r.payload) == b"hello" + b"x" * 26


@pytest.mark.parametrize(
    "body",
    [b"g\r\n", b"5\r\nhelloX\r\n", b"5\nhello\r\n", b"-1\r\n", b"12345678901234567\r\n", b"0\r\nbad trailer\r\n\r\n"],
)
def test_chunked_reader_refuses_bad_framing(body: bytes) -> None:
    r = BodyReader(CHUNKED)
    with pytest.raises(BadMessage):
        r.feed(body)
