"""Blob redirects from an upstream one does not control: the real proxy process follows them to blob
storage only.

A fake registry answers blob GETs with 307s to bad places (malformed, loopback, the proxy's own
metrics and registry listeners, private and link-local addresses, userinfo and decimal-IP tricks,
a redirect loop). Each must be a 502 with the registry's JSON error, never a 500, and nothing
may be fetched from a forbidden address: a sentinel server on a loopback address counts what
reaches it. Run in stream mode, and in redirect mode with the layer cache (a cache fill follows
redirects too). Test proxies may follow redirects to `http://localhost:*` (the emulator's S3).
"""

from __future__ import annotations

import hashlib
import pathlib
import socket
from collections.abc import Iterator

import pytest
from proxy_harness import FakeUpstream, Proxy, ProxyFactory, http_request, metric

from ecr_twisted.registry.redirects import MAX_REDIRECTS
from ecr_twisted.testing.emulator import EmulatedECR

BLOB = b"the blob from storage\n"
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()  # the cache checks what it stores
SECRET = b"internal service, not for clients"


def _answer(sock: socket.socket, status: bytes, body: bytes = b"", extra: bytes = b"") -> None:
    sock.sendall(b"HTTP/1.1 " + status + b"\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


class Places:
    """Where the fake registry's redirects point; filled in once every server has its port."""

    def __init__(self) -> None:
        self.sentinel = 0  # an internal service on 127.0.0.1 (not a storage host)
        self.storage = 0  # a storage host the test proxies may use (http://localhost:*)
        self.proxy = 0
        self.metrics = 0

    def location(self, case: str) -> str:
        return {
            "ok": f"http://localhost:{self.storage}/storage/blob?X-Amz-Signature=SIGNATURE",
            "malformed": "http://[::1",
            "loopback": f"http://127.0.0.1:{self.sentinel}/internal",
            "loopback-v6-mapped": f"http://[::ffff:127.0.0.1]:{self.sentinel}/internal",
            "decimal-ip": f"http://2130706433:{self.sentinel}/internal",
            "userinfo": f"http://localhost:{self.storage}@127.0.0.1:{self.sentinel}/internal",
            "metrics": f"http://127.0.0.1:{self.metrics}/metrics",
            "metrics-by-name": f"http://localhost:{self.metrics}/metrics",
            "own-port": f"http://localhost:{self.proxy}/v2/",
            "private": "http://10.255.255.1/x?X-Amz-Signature=SIGNATURE",
            "metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
            "scheme": f"gopher://127.0.0.1:{self.sentinel}/_",
            "loop": f"http://localhost:{self.storage}/loop?X-Amz-Signature=SIGNATURE",
        }[case]


REFUSED = ["malformed", "loopback", "loopback-v6-mapped", "decimal-ip", "userinfo", "metrics", "metrics-by-name",
           "own-port", "private", "metadata", "scheme", "loop"]


@pytest.fixture(scope="module")
def places() -> Iterator[tuple[Places, FakeUpstream, FakeUpstream, FakeUpstream]]:
    p = Places()

    def internal(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        _answer(sock, b"200 OK", SECRET)
        return True

    def storage_blob(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        _answer(sock, b"200 OK", BLOB if method == "GET" else b"")
        return True

    def loop(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        _answer(sock, b"307 Temporary Redirect", extra=f"Location: {p.location('loop')}\r\n".encode())
        return True

    def redirect(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        case = target.split("/")[3]  # /v2/redir/<case>/blobs/<digest>
        _answer(sock, b"307 Temporary Redirect", extra=f"Location: {p.location(case)}\r\n".encode())
        return True

    def base(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        _answer(sock, b"200 OK", b"{}", b"Content-Type: application/json\r\n")
        return True

    sentinel = FakeUpstream({("GET", "/"): internal, ("HEAD", "/"): internal})
    storage = FakeUpstream({("GET", "/storage/"): storage_blob, ("HEAD", "/storage/"): storage_blob,
                            ("GET", "/loop"): loop, ("HEAD", "/loop"): loop})
    registry = FakeUpstream({("GET", "/v2/redir/"): redirect, ("HEAD", "/v2/redir/"): redirect, ("GET", "/v2/"): base})
    p.sentinel, p.storage = sentinel.port, storage.port
    yield p, sentinel, storage, registry
    for server in (sentinel, storage, registry):
        server.close()


@pytest.fixture(scope="module", params=["stream", "redirect+cache"])
def redirecting(
    request: pytest.FixtureRequest,
    ecr: EmulatedECR,
    places: tuple[Places, FakeUpstream, FakeUpstream, FakeUpstream],
    module_proxy_factory: ProxyFactory,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Proxy, Places, FakeUpstream, FakeUpstream]:
    """A proxy on the fake registry (its token still comes from the emulator's moto). In redirect
    mode the cache fills blob GETs by following the redirect; a HEAD's 307 goes to the client."""
    p, sentinel, storage, registry = places
    extra: list[str] = ["--upstream-timeout", "5"]
    if request.param == "redirect+cache":
        cache = pathlib.Path(tmp_path_factory.mktemp("redirect-cache"))
        extra += ["--blob-mode", "redirect", "--cache-dir", str(cache), "--cache-size", "64MiB"]
    proxy = module_proxy_factory(ecr, *extra, upstream=registry.url)
    assert proxy.port is not None and proxy.metrics_port is not None
    p.proxy, p.metrics = proxy.port, proxy.metrics_port
    return proxy, p, sentinel, storage


def _digest(case: str) -> str:
    """A digest of its own per case: the cache would answer a digest it holds, whatever the redirect."""
    return "sha256:" + hashlib.sha256(case.encode()).hexdigest()


def places_of(redirecting: tuple[Proxy, Places, FakeUpstream, FakeUpstream]) -> Places:
    return redirecting[1]


def _internal_requests(server: FakeUpstream) -> int:
    return len(server.requests)


def test_a_redirect_to_storage_is_followed(redirecting: tuple[Proxy, Places, FakeUpstream, FakeUpstream]) -> None:
    proxy, _, _, storage = redirecting
    r = proxy.request(f"/v2/redir/ok/blobs/{DIGEST}")
    assert r.status == 200 and r.body == BLOB, (r.status, r.body[:300])
    assert any(t.startswith("/storage/blob?") for _, t, _ in storage.requests)


@pytest.mark.parametrize("case", REFUSED)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_bad_redirect_is_a_502_and_nothing_is_fetched(
    redirecting: tuple[Proxy, Places, FakeUpstream, FakeUpstream], case: str, method: str
) -> None:
    proxy, _, sentinel, storage = redirecting
    loops_before = sum(1 for _, t, _ in storage.requests if t.startswith("/loop"))
    before = _internal_requests(sentinel)
    r = http_request(f"{proxy.url}/v2/redir/{case}/blobs/{_digest(case)}", method, timeout=20)
    if method == "HEAD" and "--blob-mode" in proxy.args:  # redirect mode: the client follows it, if it will
        assert r.status == 307 and r.header("Location") == places_of(redirecting).location(case)
        assert _internal_requests(sentinel) == before
        return
    assert r.status == 502, (case, r.status, r.body[:300])
    assert (r.header("Content-Type") or "").startswith("application/json")
    if method == "GET":
        err = r.json()["errors"][0]
        assert (err["code"], err["message"]) == ("UNAVAILABLE", "blob storage redirect refused"), err
        assert b"ecrproxy_" not in r.body and SECRET not in r.body and b"SIGNATURE" not in r.body
    assert _internal_requests(sentinel) == before, f"{case}: the proxy fetched from the internal service"
    loops = sum(1 for _, t, _ in storage.requests if t.startswith("/loop")) - loops_before
    assert loops == (MAX_REDIRECTS if case == "loop" else 0)  # then the next redirect is refused


def test_refusals_are_logged_without_secrets_and_never_as_errors(
    redirecting: tuple[Proxy, Places, FakeUpstream, FakeUpstream],
) -> None:
    proxy, _, _, _ = redirecting
    for case in REFUSED:
        assert proxy.request(f"/v2/redir/{case}/blobs/{_digest(case)}").status == 502
    log = proxy.log_text()
    assert "blob storage redirect refused" in log
    assert "Traceback" not in log and "Unhandled" not in log and "proxy bug" not in log
    assert "SIGNATURE" not in log
    samples = proxy.metrics()
    assert not metric(samples, "ecrproxy_requests_total", method="GET", route="blob", status="500")
    assert (metric(samples, "ecrproxy_requests_total", method="GET", route="blob", status="502") or 0) >= len(REFUSED)
