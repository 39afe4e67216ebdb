"""The access log through the whole proxy (Harness): who did what, as parseable JSON or one text line;
X-Request-Id returned and honoured only when trusted; no secret in any line; bad requests logged
rate-limited; process_* and build info in /metrics."""

from __future__ import annotations

import io
import json
from typing import Any, cast

import pytest

from ecr_twisted.observe.accesslog import AccessLog, AccessRecord, RateLimitedLog, RequestIds, json_line, text_line
from ecr_twisted.registry.handler import ProxyConfig
from ecr_twisted.testing.doubles import UPSTREAM, Harness

from .test_access import (
    SERVICE,
    alice_token,
    basic,
    bearer,
    call,
    forwarded,
    get_token,
    htpasswd,  # noqa: F401 (a fixture)
    make_proxy,
    request,
    send,
)

ALWAYS = {"time", "request_id", "client", "user", "method", "target", "route", "status", "bytes_in", "bytes_out",
          "duration"}


def logging(h: Harness, fmt: str = "json") -> io.StringIO:
    out = io.StringIO()
    h.handler.access_log = AccessLog(fmt, out)
    return out


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    parsed = [json.loads(line) for line in out.getvalue().splitlines()]
    for p in parsed:
        assert isinstance(p, dict) and ALWAYS <= p.keys(), p
    return parsed


def test_anonymous_pull_is_logged_with_every_field() -> None:
    h = Harness()
    out = logging(h)
    c = send(h, request("GET", "/v2/team/app/manifests/1.0", headers=[(b"User-Agent", b"docker/24.0 go/1.21")]))
    h.reactor.advance(0.5)
    h.upstreams.last()[0].dataReceived(
        b"HTTP/1.1 200 OK\r\nx-amzn-RequestId: 5e1f-aa\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert c.reply().status == 200
    [e] = lines(out)
    assert e["user"] == "anonymous" and e["method"] == "GET" and e["target"] == "/v2/team/app/manifests/1.0"
    assert (e["route"], e["repository"], e["reference"]) == ("manifest", "team/app", "1.0")
    assert (e["status"], e["bytes_in"], e["bytes_out"], e["upstream_status"]) == (200, 0, 2, 200)
    assert e["upstream_request_id"] == "5e1f-aa" and e["user_agent"] == "docker/24.0 go/1.21"
    assert e["duration"] == pytest.approx(0.5) and e["time"].endswith("Z")
    assert e["client"] and "reason" not in e
    assert c.reply().header(b"x-request-id") == e["request_id"].encode()


def test_logged_in_denied_and_failed_logins_carry_user_and_reason(htpasswd: str) -> None:  # noqa: F811
    h = make_proxy("basic", htpasswd=htpasswd)
    out = logging(h)
    forwarded(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "alice-pw")))
    call(h, "PUT", "/v2/team-b/shared/manifests/1.0", basic("alice", "alice-pw"), b"{}")  # denied
    call(h, "GET", "/v2/team-a/app/manifests/1.0", basic("alice", "wrong-pw"))  # failed login
    call(h, "GET", "/v2/team-a/app/manifests/1.0")  # anonymous: asked to log in
    ok, denied, failed, anonymous = lines(out)
    assert (ok["user"], ok["status"], ok.get("reason")) == ("alice", 200, None)
    assert (denied["user"], denied["status"], denied["reason"]) == ("alice", 403, "DENIED: push not allowed")
    assert (failed["user"], failed["status"]) == ("alice", 401)
    assert failed["reason"] == "login failed: invalid username or password"
    assert (anonymous["user"], anonymous["status"]) == ("anonymous", 401)
    assert "repository:team-a/app:pull" in anonymous["reason"]
    assert "wrong-pw" not in out.getvalue() and "alice-pw" not in out.getvalue()


def test_token_flow_and_bearer_requests_are_logged_as_the_user_without_the_token(htpasswd: str) -> None:  # noqa: F811
    h = make_proxy("token", htpasswd=htpasswd)
    out = logging(h)
    token = alice_token(h)
    bad = get_token(h, f"service={SERVICE}&scope=repository:team-a/app:pull", basic("alice", "nope"))
    assert bad.status == 401
    forwarded(h, call(h, "GET", "/v2/team-a/app/manifests/1.0", bearer(token)))
    call(h, "GET", "/v2/team-a/app/manifests/1.0", bearer(token + "x"))  # a forged token
    issued, refused, pulled, forged = lines(out)
    assert (issued["route"], issued["user"], issued["status"]) == ("token", "alice", 200)
    assert (refused["user"], refused["status"]) == ("alice", 401) and "invalid username" in refused["reason"]
    assert (pulled["user"], pulled["status"]) == ("alice", 200)
    assert forged["status"] == 401 and forged["reason"] == "login failed: invalid_token"
    text = out.getvalue()
    for secret in (token, token.split(".")[2], "alice-pw", "nope"):
        assert secret not in text


def test_presigned_and_state_values_are_redacted() -> None:
    h = Harness()
    out = logging(h)
    c = call(h, "PATCH", "/v2/team/app/blobs/uploads/u1?_state=SECRETSTATE&X-Amz-Signature=SIG123", body=b"x")
    h.upstreams.last()[0].dataReceived(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
    assert c.reply().status == 202
    text = out.getvalue()
    assert "SECRETSTATE" not in text and "SIG123" not in text and "REDACTED" in text
    assert lines(out)[0]["bytes_in"] == 1


def test_request_id_and_forwarded_for_are_honoured_only_when_trusted() -> None:
    headers = [(b"X-Request-Id", b"client-id-1"), (b"X-Forwarded-For", b"203.0.113.9, 198.51.100.7")]
    for trusted in (False, True):
        h = Harness(ProxyConfig(upstream=UPSTREAM, trust_forwarded=trusted))
        out = logging(h)
        c = send(h, request("GET", "/v2/", headers=headers))
        h.upstreams.last()[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        [e] = lines(out)
        rid = c.reply().header(b"x-request-id")
        assert rid == e["request_id"].encode()
        if trusted:
            assert (e["request_id"], e["client"]) == ("client-id-1", "198.51.100.7")
        else:
            assert e["request_id"] != "client-id-1" and e["client"] != "198.51.100.7"
    # a generated id is unique per request; a trusted one that is no id is replaced
    ids = RequestIds(trust_client=True)
    assert len({ids.take(None) for _ in range(1000)}) == 1000
    assert ids.take(b"bad id\x01") != "bad id\x01" and ids.take(b"x" * 200) != "x" * 200


def test_text_lines_are_one_line_with_quoted_values() -> None:
    r = AccessRecord(
        time=1_700_000_000.25, client="10.0.0.1", user='ev"il\nuser', method="PUT",
        target="/v2/team/app/manifests/1", route="manifest", status=201, bytes_in=10, bytes_out=0,
        duration=0.043, request_id="abc-1", repository="team/app", reference="1", upstream_status=201,
        user_agent="skopeo/1.9", reason=None,
    )
    line = text_line(r)
    assert "\n" not in line
    assert line.startswith(
        '2023-11-14T22:13:20.250Z 10.0.0.1 "ev\\"il\\nuser" PUT /v2/team/app/manifests/1 201 10 0 0.043s'
    )
    assert "upstream=201" in line and "id=abc-1" in line and 'agent="skopeo/1.9"' in line
    assert json.loads(json_line(r))["user"] == 'ev"il\nuser'


def test_text_format_through_the_harness() -> None:
    h = Harness(ProxyConfig(upstream=UPSTREAM, log_format="text"))
    assert h.handler.access_log.format == "text"
    out = logging(h, "text")
    call(h, "GET", "/v2/team/app/manifests/1.0")
    h.upstreams.last()[0].dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    [line] = out.getvalue().splitlines()
    assert ' GET /v2/team/app/manifests/1.0 404 0 0 ' in line
    assert '"anonymous"' in line and 'repo="team/app"' in line


def test_bad_requests_are_logged_at_most_once_per_interval_with_a_count() -> None:
    h = Harness()
    said: list[tuple[str, int]] = []
    h.built.proxy.bad_request_log = RateLimitedLog(lambda m, n: said.append((m, n)), h.reactor, 10.0)
    for _ in range(5):
        proto, transport = h.client()
        proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 400")
    h.reactor.advance(11)
    proto, _ = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n")
    assert len(said) == 2 and said[0][0].startswith("400 ") and said[1][1] == 4


def test_process_and_build_info_metrics() -> None:
    h = Harness()
    from ecr_twisted import VERSION

    assert h.sample("ecrproxy_build_info", {"version": VERSION}) == 1
    assert (h.sample("process_resident_memory_bytes") or 0) > 0
    assert (h.sample("process_max_fds") or 0) > 0
    info = [s for m in h.registry.collect() if m.name == "python_info" for s in m.samples]
    assert len(info) == 1 and info[0].value == 1


def test_no_twisted_logger_event_per_access_line() -> None:
    """Access lines go straight to the file object; twisted.logger is not involved."""
    from twisted.logger import ILogObserver, globalLogPublisher

    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)  # a plain callable is an observer; zope cannot say so
    globalLogPublisher.addObserver(observer)
    try:
        h = Harness()
        logging(h)
        call(h, "GET", "/v2/")
        h.upstreams.last()[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not [e for e in events if "/v2/" in str(e.get("log_format", ""))]

