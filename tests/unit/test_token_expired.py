"""A 503 for want of a token says which: none held yet (start-up), or one held that expired and
could not be refreshed (the ECR API down for longer than the token lives)."""

from __future__ import annotations

import json

from ecr_twisted.testing.doubles import Harness, make_token


def test_an_expired_token_that_could_not_be_refreshed_says_so() -> None:
    h = Harness()
    h.keeper.current = make_token(now=h.reactor.seconds() - 13 * 3600)  # held, expired an hour ago
    proto, client = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    head, _, body = client.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 5" in head
    err = json.loads(body)["errors"][0]
    assert err["code"] == "UNAVAILABLE"
    assert err["message"] == "the ECR token expired and could not be refreshed; retry shortly"
    assert h.upstreams.connections == []


def test_no_token_at_all_still_says_none_is_held_yet() -> None:
    h = Harness()
    h.keeper.current = None
    proto, client = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    err = json.loads(client.value().partition(b"\r\n\r\n")[2])["errors"][0]
    assert err["message"] == "no valid ECR token is held yet; retry shortly"


def test_an_expired_token_whose_refresh_fails_while_waiting_says_so() -> None:
    h = Harness()
    h.keeper.current = make_token(now=h.reactor.seconds() - 13 * 3600)
    h.keeper.next_attempt = 0.0
    h.fetcher.hold = True
    h.keeper._check()  # a refresh under way: the request waits for it
    proto, client = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert client.value() == b""
    h.fetcher.answer(RuntimeError("EndpointConnectionError"))
    err = json.loads(client.value().partition(b"\r\n\r\n")[2])["errors"][0]
    assert err["message"] == "the ECR token expired and could not be refreshed; retry shortly"
