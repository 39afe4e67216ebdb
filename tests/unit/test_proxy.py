"""The handler: header tables, token injection, refresh-and-retry, redirects, error envelopes."""

import io
import json
from collections.abc import Callable
from types import FrameType
from typing import Any, cast

import pytest
from twisted.logger import ILogObserver, globalLogPublisher

from ecr_twisted.observe.accesslog import AccessLog
from ecr_twisted.registry import errors
from ecr_twisted.registry.handler import ProxyConfig, redact_target, rewrite_link, rewrite_location
from ecr_twisted.testing.doubles import UPSTREAM, Harness, make_token

DIGEST = b"sha256:" + b"cd" * 32
BLOB = b"/v2/app/blobs/" + DIGEST


@pytest.fixture
def logged():
    events: list[dict] = []
    observer = cast(ILogObserver, events.append)  # a plain callable is an observer; zope cannot say so
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def split(raw: bytes) -> tuple[bytes, dict[bytes, list[bytes]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b": ")
        fields.setdefault(name.lower(), []).append(value)
    return lines[0], fields, body


def test_request_headers_are_rewritten_for_ecr() -> None:
    h = Harness()
    proto, _ = h.client()
    proto.dataReceived(
        b"GET /v2/app/manifests/1.2 HTTP/1.1\r\n"
        b"Host: registry.example.com\r\n"
        b"Authorization: Basic Y2xpZW50OnBhc3N3b3Jk\r\n"
        b"Accept: application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json\r\n"
        b"Range: bytes=0-10\r\n"
        b"Docker-Distribution-Api-Version: registry/2.0\r\n"
        b"Connection: keep-alive, X-Private\r\n"
        b"X-Private: drop me\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: h2c\r\n\r\n"
    )
    _, upstream = h.upstreams.last()
    line, fields, _ = split(upstream.value())
    assert line == b"GET /v2/app/manifests/1.2 HTTP/1.1"
    assert fields[b"host"] == [UPSTREAM.netloc]
    assert h.keeper.current is not None
    assert fields[b"authorization"] == [h.keeper.current.header]
    assert fields[b"accept"][0].startswith(b"application/vnd.oci.image.index.v1+json, ")
    assert fields[b"range"] == [b"bytes=0-10"]
    assert fields[b"docker-distribution-api-version"] == [b"registry/2.0"]
    for gone in (b"connection", b"x-private", b"keep-alive", b"proxy-authorization", b"te", b"upgrade"):
        assert gone not in fields, gone


def test_response_headers_are_rewritten_for_the_client() -> None:
    h = Harness(ProxyConfig(upstream=UPSTREAM, public_base=b"https://registry.example.com"))
    proto, client = h.client()
    proto.dataReceived(b"POST /v2/app/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    up, _ = h.upstreams.last()
    state = b"_state=AbC%2Fd%3D%3D&x=1"
    up.dataReceived(
        b"HTTP/1.1 202 Accepted\r\n"
        b"Location: " + UPSTREAM.base + b"/v2/app/blobs/uploads/u-1?" + state + b"\r\n"
        b"Link: <" + UPSTREAM.base + b":443/v2/_catalog?last=b%3D&n=2>; rel=\"next\"\r\n"
        b"WWW-Authenticate: Basic realm=\"https://123456789012.dkr.ecr.eu-west-1.amazonaws.com/\"\r\n"
        b"Docker-Upload-UUID: u-1\r\nRange: 0-0\r\nOCI-Chunk-Min-Length: 5242880\r\n"
        b"Connection: close, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n"
    )
    line, fields, _ = split(client.value())
    assert line == b"HTTP/1.1 202 Accepted"
    assert fields[b"location"] == [b"https://registry.example.com/v2/app/blobs/uploads/u-1?" + state]
    assert fields[b"link"] == [b'<https://registry.example.com/v2/_catalog?last=b%3D&n=2>; rel="next"']
    assert b"www-authenticate" not in fields and b"x-hop" not in fields
    assert fields[b"docker-upload-uuid"] == [b"u-1"] and fields[b"range"] == [b"0-0"]
    assert fields[b"oci-chunk-min-length"] == [b"5242880"]
    assert fields[b"content-length"] == [b"0"]


def test_fields_named_by_connection_are_dropped_wherever_they_stand() -> None:
    """The one-pass filters (Connection only keep-alive) fall back to the full one when Connection
    names a field, even one already passed (here before it, without a Location to rewrite)."""
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(
        b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: x\r\nX-Private: 1\r\nX-Kept: 1\r\n"
        b"Connection: Keep-Alive\r\nConnection: X-Private\r\n\r\n"
    )
    up, upstream = h.upstreams.last()
    _, sent, _ = split(upstream.value())
    assert b"x-private" not in sent and b"connection" not in sent and sent[b"x-kept"] == [b"1"]
    up.dataReceived(
        b"HTTP/1.1 200 OK\r\nX-Hop: 1\r\nX-Other: 2\r\nConnection: keep-alive\r\nConnection: x-hop\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    line, fields, _ = split(client.value())
    assert line == b"HTTP/1.1 200 OK"
    assert b"x-hop" not in fields and fields[b"x-other"] == [b"2"]
    client.clear()
    proto.dataReceived(b"GET /v2/app/manifests/2 HTTP/1.1\r\nHost: x\r\nX-Kept: 1\r\nConnection: keep-alive\r\n\r\n")
    up, upstream = h.upstreams.last()
    _, sent, _ = split(upstream.value())
    assert b"connection" not in sent and sent[b"x-kept"] == [b"1"]
    up.dataReceived(b"HTTP/1.1 200 OK\r\nX-Hop: 1\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n")
    _, fields, _ = split(client.value())
    assert fields[b"x-hop"] == [b"1"]


def test_public_url_from_request_and_trusted_forwarded_headers() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: reg.local:5000\r\nX-Forwarded-Proto: https\r\n"
                       b"X-Forwarded-Host: evil.example\r\nContent-Length: 0\r\n\r\n")
    up, _ = h.upstreams.last()
    up.dataReceived(
        b"HTTP/1.1 202 Accepted\r\nLocation: " + UPSTREAM.base + b"/v2/a/blobs/uploads/u\r\nContent-Length: 0\r\n\r\n"
    )
    assert split(client.value())[1][b"location"] == [b"http://reg.local:5000/v2/a/blobs/uploads/u"]
    h.config.trust_forwarded = True
    proto, client = h.client()
    proto.dataReceived(b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: reg.local:5000\r\nX-Forwarded-Proto: https\r\n"
                       b"X-Forwarded-Host: registry.example.com\r\nContent-Length: 0\r\n\r\n")
    up, _ = h.upstreams.last()
    up.dataReceived(
        b"HTTP/1.1 202 Accepted\r\nLocation: " + UPSTREAM.base + b"/v2/a/blobs/uploads/u\r\nContent-Length: 0\r\n\r\n"
    )
    assert split(client.value())[1][b"location"] == [b"https://registry.example.com/v2/a/blobs/uploads/u"]


def test_rewrite_tables() -> None:
    bases = (b"https://up.example", b"https://up.example:443")
    pub = b"https://pub"
    assert rewrite_location(b"https://up.example/v2/x?a=%2F", bases, pub) == b"https://pub/v2/x?a=%2F"
    assert rewrite_location(b"https://up.example:443/v2/x", bases, pub) == b"https://pub/v2/x"
    assert rewrite_location(b"https://up.example.evil/v2/x", bases, pub) == b"https://up.example.evil/v2/x"
    assert rewrite_location(b"/v2/relative", bases, pub) == b"/v2/relative"
    assert rewrite_location(b"https://s3.amazonaws.com/x?X-Amz-Signature=1", bases, pub).startswith(b"https://s3.")
    assert rewrite_link(b'</v2/t?last=x>; rel="next"', bases, pub) == b'</v2/t?last=x>; rel="next"'


def test_upstream_401_refreshes_once_and_retries_with_the_new_token(logged) -> None:
    h = Harness()
    old = h.keeper.current
    assert old is not None
    h.fetcher.hold = True
    clients = [h.client() for _ in range(3)]
    for proto, _ in clients:
        proto.dataReceived(b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: h\r\n\r\n")
    for _, conn, _ in list(h.upstreams.connections):
        expired = b"Your authorization token has expired. Reauthenticate and try again."
        conn.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(expired) + expired)
    assert h.fetcher.calls == 1  # three refusals, one GetAuthorizationToken
    new = make_token("rotated-password", now=h.reactor.seconds())
    h.fetcher.answer(new)
    retried = [t.value() for _, _, t in h.upstreams.connections if new.header in t.value()]
    assert len(retried) == 3
    for _, conn, _ in h.upstreams.connections:
        if conn.connected_ and conn._attempt is not None:
            conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    for _, client in clients:
        assert split(client.value())[0] == b"HTTP/1.1 200 OK"
        assert old.authorization.encode() not in client.value()
    text = repr(logged)
    assert old.authorization not in text and new.authorization not in text and "rotated-password" not in text


def test_a_refusal_after_the_retry_is_a_clear_error_and_never_the_upstream_challenge() -> None:
    h = Harness()
    h.fetcher.results = [make_token("still-bad", now=h.reactor.seconds())]
    proto, client = h.client()
    proto.dataReceived(b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: h\r\n\r\n")
    for _ in range(2):
        conn, _ = h.upstreams.last()
        conn.dataReceived(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"https://x.dkr.ecr\"\r\n"
                          b"Content-Length: 0\r\n\r\n")
    line, fields, body = split(client.value())
    assert line == b"HTTP/1.1 502 Bad Gateway" and b"www-authenticate" not in fields
    assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert h.fetcher.calls == 1


def test_a_refused_upload_with_a_body_is_not_retried_but_triggers_a_refresh() -> None:
    h = Harness()
    h.fetcher.hold = True
    proto, client = h.client()
    proto.dataReceived(b"PATCH /v2/app/blobs/uploads/u HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\ndata")
    conn, _ = h.upstreams.last()
    conn.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert split(client.value())[0] == b"HTTP/1.1 403 Forbidden"
    assert json.loads(split(client.value())[2])["errors"][0]["code"] == "DENIED"
    assert h.fetcher.calls == 1 and len(h.upstreams.connections) == 1


def test_stream_mode_follows_the_s3_redirect_without_authorization() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(
        b"GET " + BLOB + b" HTTP/1.1\r\nHost: h\r\nRange: bytes=2-5\r\nAuthorization: Basic eDp5\r\n\r\n"
    )
    conn, _ = h.upstreams.last()
    s3 = (b"https://prod-eu-west-1-starport-layer-bucket.s3.eu-west-1.amazonaws.com"
          b"/x/y?X-Amz-Signature=abc&X-Amz-Expires=3600")
    conn.dataReceived(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + s3 + b"\r\nContent-Length: 0\r\n\r\n")
    origin, s3conn, s3transport = h.upstreams.connections[-1]
    assert origin.host == "prod-eu-west-1-starport-layer-bucket.s3.eu-west-1.amazonaws.com"
    line, fields, _ = split(s3transport.value())
    assert line == b"GET /x/y?X-Amz-Signature=abc&X-Amz-Expires=3600 HTTP/1.1"
    assert b"authorization" not in fields and fields[b"range"] == [b"bytes=2-5"]
    assert fields[b"host"] == [origin.netloc]
    s3conn.dataReceived(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 2-5/10\r\nx-amz-request-id: R\r\n"
                        b"ETag: \"e\"\r\nContent-Length: 4\r\n\r\n2345")
    line, fields, body = split(client.value())
    assert line == b"HTTP/1.1 206 Partial Content" and body == b"2345"
    assert fields[b"docker-content-digest"] == [DIGEST] and fields[b"content-range"] == [b"bytes 2-5/10"]
    assert b"x-amz-request-id" not in fields and b"location" not in fields


def test_storage_errors_never_leak_the_signed_request() -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(b"GET " + BLOB + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    conn, _ = h.upstreams.last()
    conn.dataReceived(b"HTTP/1.1 307 Temporary Redirect\r\n"
                      b"Location: https://b.s3.eu-west-1.amazonaws.com/b?X-Amz-Signature=SIG\r\n"
                      b"Content-Length: 0\r\n\r\n")
    s3conn, _ = h.upstreams.last()
    body = b"<Error><Code>SignatureDoesNotMatch</Code><StringToSign>SIG</StringToSign></Error>"
    s3conn.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    line, _, out = split(client.value())
    assert line == b"HTTP/1.1 502 Bad Gateway" and b"SIG" not in client.value()
    assert json.loads(out)["errors"][0]["code"] == "UNAVAILABLE"
    assert json.loads(out)["errors"][0]["message"] == errors.STORAGE_ERROR.message


def test_redirect_mode_passes_the_307_unchanged() -> None:
    h = Harness(ProxyConfig(upstream=UPSTREAM, blob_mode="redirect"))
    proto, client = h.client()
    proto.dataReceived(b"GET " + BLOB + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    conn, _ = h.upstreams.last()
    s3 = b"https://bucket.s3.amazonaws.com/x?X-Amz-Signature=abc"
    conn.dataReceived(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + s3 + b"\r\nContent-Length: 0\r\n\r\n")
    line, fields, _ = split(client.value())
    assert line == b"HTTP/1.1 307 Temporary Redirect" and fields[b"location"] == [s3]
    assert len(h.upstreams.connections) == 1


def test_upstream_from_the_token_endpoint() -> None:
    h = Harness(ProxyConfig(), token=make_token(now=1_000_000, endpoint="https://999999999999.dkr.ecr.us-east-2.amazonaws.com"))
    proto, _ = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    origin, _, transport = h.upstreams.connections[-1]
    assert origin.key == ("https", "999999999999.dkr.ecr.us-east-2.amazonaws.com", 443)
    assert b"\r\nHost: 999999999999.dkr.ecr.us-east-2.amazonaws.com\r\n" in transport.value()


@pytest.mark.parametrize(
    "request_line,status,code",
    [
        (b"GET /index.html HTTP/1.1", 404, "NOT_FOUND"),
        (b"POST /v2/app/manifests/x HTTP/1.1", 405, "UNSUPPORTED"),
        (b"GET /v2/UPPER/manifests/x HTTP/1.1", 400, "NAME_INVALID"),
    ],
)
def test_local_errors_use_the_registry_envelope(request_line: bytes, status: int, code: str) -> None:
    h = Harness()
    proto, client = h.client()
    proto.dataReceived(request_line + b"\r\nHost: h\r\n\r\n")
    line, fields, body = split(client.value())
    assert line.startswith(b"HTTP/1.1 %d " % status)
    assert fields[b"content-type"] == [b"application/json; charset=utf-8"]
    assert fields[b"content-length"] == [b"%d" % len(body)]
    err = json.loads(body)["errors"][0]
    assert err["code"] == code and err["message"]
    assert h.upstreams.connections == []
    assert h.sample("ecrproxy_requests_total", {"method": "GET" if b"GET" in request_line else "POST",
                                                "route": "other" if status != 405 else "manifest",
                                                "status": str(status)}) == 1


def test_no_token_yet_is_503_with_retry_after() -> None:
    h = Harness()
    h.keeper.current = None
    proto, client = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    line, fields, body = split(client.value())
    assert line == b"HTTP/1.1 503 Service Unavailable" and fields[b"retry-after"] == [b"5"]
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


def _starting(h: Harness) -> None:
    """The keeper as at start-up: no token, the first fetch under way (held open by the test)."""
    h.keeper.current = None
    h.keeper.next_attempt = 0.0
    h.fetcher.hold = True
    h.keeper._check()
    assert h.fetcher.calls == 1


def test_a_request_during_the_first_token_fetch_waits_for_it() -> None:
    h = Harness()
    _starting(h)
    proto, client = h.client()
    proto.dataReceived(b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: h\r\n\r\n")
    h.reactor.advance(5)
    assert client.value() == b"" and h.upstreams.connections == [], "answered before the token came"
    token = make_token("first", now=h.reactor.seconds())
    h.fetcher.answer(token)
    conn, upstream = h.upstreams.last()
    assert b"\r\nAuthorization: " + token.header + b"\r\n" in upstream.value()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    line, _, body = split(client.value())
    assert line == b"HTTP/1.1 200 OK" and body == b"{}"
    # the wait's timer went with it
    assert not [c for c in h.reactor.calls if "imeout" in repr(c.func) and "Deferred" in repr(c.func)]


def test_a_failed_first_fetch_answers_the_waiting_requests_with_503() -> None:
    h = Harness()
    _starting(h)
    clients = []
    for _ in range(3):
        proto, client = h.client()
        proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
        clients.append(client)
    h.reactor.advance(1)
    assert all(c.value() == b"" for c in clients)
    h.fetcher.answer(RuntimeError("AccessDenied"))
    for client in clients:
        line, fields, body = split(client.value())
        assert line == b"HTTP/1.1 503 Service Unavailable" and fields[b"retry-after"] == [b"5"]
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    # while backing off there is nothing to wait for: 503 at once
    proto, client = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    assert split(client.value())[0] == b"HTTP/1.1 503 Service Unavailable"


def test_waiting_for_the_first_token_is_bounded_by_the_request_timeout() -> None:
    h = Harness(config=ProxyConfig(upstream=UPSTREAM, request_timeout=20.0))
    _starting(h)
    proto, client = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    h.reactor.advance(19.9)
    assert client.value() == b""
    h.reactor.advance(0.2)
    assert split(client.value())[0] == b"HTTP/1.1 503 Service Unavailable"
    # the fetch that comes in later neither answers that request twice nor fails
    h.fetcher.answer(make_token(now=h.reactor.seconds()))
    assert client.value().count(b"HTTP/1.1 ") == 1
    assert h.keeper.current is not None


def test_a_client_that_leaves_while_waiting_costs_nothing_upstream() -> None:
    h = Harness()
    _starting(h)
    proto, client = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    proto.connectionLost()
    h.fetcher.answer(make_token(now=h.reactor.seconds()))
    assert h.upstreams.connections == []
    assert h.sample("ecrproxy_requests_in_flight") == 0


def test_envelope_shape() -> None:
    assert json.loads(errors.envelope(errors.BLOB_UNKNOWN)) == {
        "errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry"}]
    }
    assert json.loads(errors.envelope(errors.STORAGE_ERROR, "storage status 500"))["errors"][0]["detail"]


def test_log_redaction() -> None:
    assert redact_target(b"/v2/a/blobs/uploads/u?_state=SECRET&digest=sha256:1") == (
        "/v2/a/blobs/uploads/u?_state=REDACTED&digest=sha256:1"
    )
    assert "SIG" not in redact_target(b"/x?X-Amz-Signature=SIG&X-Amz-Credential=AKIA/x&X-Amz-Security-Token=T")


def test_access_log_and_metrics_per_request() -> None:
    h = Harness()
    out = io.StringIO()
    h.handler.access_log = AccessLog("json", out)
    proto, _ = h.client()
    proto.dataReceived(b"GET " + BLOB + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    conn, _ = h.upstreams.last()
    h.reactor.advance(0.25)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx-amzn-RequestId: abc-1\r\n\r\nabc")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    e = json.loads(lines[0])
    assert (e["method"], e["status"], e["bytes_out"], e["upstream_status"]) == ("GET", 200, 3, 200)
    assert e["upstream_request_id"] == "abc-1"
    assert e["duration"] == pytest.approx(0.25)
    assert h.sample("ecrproxy_response_body_bytes_total", {"route": "blob"}) == 3
    assert h.sample("ecrproxy_request_duration_seconds_count", {"route": "blob"}) == 1
    assert h.sample("ecrproxy_upstream_response_seconds_count", {"target": "registry", "upstream": "default"}) == 1
    assert h.sample("ecrproxy_requests_in_flight") == 0


def test_a_5kb_token_is_sent_whole() -> None:
    token = make_token("p" * 5000, now=1_000_000)
    h = Harness(token=token)
    proto, _ = h.client()
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
    _, upstream = h.upstreams.last()
    assert b"\r\nAuthorization: " + token.header + b"\r\n" in upstream.value()
    assert len(token.header) > 6600


def test_an_iam_deny_does_not_turn_every_request_into_a_token_fetch() -> None:
    h = Harness()
    h.fetcher.results = [make_token("same", now=h.reactor.seconds()) for _ in range(10)]
    for _ in range(10):
        proto, client = h.client()
        proto.dataReceived(b"GET /v2/private/manifests/1 HTTP/1.1\r\nHost: h\r\n\r\n")
        while True:
            conn, _ = h.upstreams.last()
            if conn._attempt is None:
                break
            conn.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        assert split(client.value())[0] == b"HTTP/1.1 403 Forbidden"
        h.reactor.advance(1)
    assert h.fetcher.calls == 1


def test_a_client_leaving_is_not_an_upstream_error() -> None:
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    h = Harness()
    proto, _ = h.client()
    proto.dataReceived(b"GET /v2/app/manifests/1 HTTP/1.1\r\nHost: h\r\n\r\n")
    proto.connectionLost(Failure(ConnectionDone()))
    assert h.sample("ecrproxy_upstream_errors_total", {"kind": "closed", "upstream": "default"}) is None


def _deferreds_made_by_us(monkeypatch: pytest.MonkeyPatch, h: Harness, raw: bytes, answer: bytes) -> list[str]:
    """Where the Deferreds created while `raw` is forwarded and answered came from: the first frame
    outside Twisted that asked for one, as `package/module.py:function`."""
    import os
    import sys

    import twisted
    from twisted.internet import defer

    twisted_dir = os.path.dirname(twisted.__file__)
    made: list[str] = []
    real_init = defer.Deferred.__init__

    def counting_init(
        self: defer.Deferred[Any], canceller: Callable[[defer.Deferred[Any]], None] | None = None
    ) -> None:
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(twisted_dir):
            frame = frame.f_back
        where = frame.f_code.co_filename.split("/ecr_twisted/")[-1] if frame is not None else "?"
        made.append(f"{where}:{frame.f_code.co_name if frame is not None else '?'}")
        real_init(self, canceller)

    proto, client = h.client()
    monkeypatch.setattr(defer.Deferred, "__init__", counting_init)
    proto.dataReceived(raw)
    conn, _ = h.upstreams.last()
    conn.dataReceived(answer)
    monkeypatch.undo()
    assert split(client.value())[0] == b"HTTP/1.1 200 OK"
    return made


@pytest.mark.parametrize("cache", [False, True])
def test_a_plain_forwarded_get_makes_no_deferred_of_the_handler_or_the_cache(
    cache: bool, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-request fast path: handle -> gate -> _go_upstream -> _send -> relay. The only
    Deferreds are the data path's own (the upstream attempt and its pool place)."""
    h = Harness(cache_dir=str(tmp_path / "cache") if cache else None)
    target = b"/v2/app/tags/list" if cache else BLOB  # with a cache, blobs are the cache's: a listing is plain
    raw = b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    _deferreds_made_by_us(monkeypatch, h, raw, answer)  # the first request opens the pooled connection
    made = _deferreds_made_by_us(monkeypatch, h, raw, answer)
    assert not [m for m in made if m.startswith(("registry/", "cache/", "access/"))], made
    assert all(m.startswith("http/") for m in made), made
