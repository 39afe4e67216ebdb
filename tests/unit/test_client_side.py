"""The client side of the data path on in-memory transports: what a client that misbehaves
(slowly, half-closed, with heads the parser refuses) gets, and when."""

from __future__ import annotations

import json

from twisted.internet.testing import StringTransport

from ecr_twisted.testing.doubles import Harness

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
