"""What the proxy sends to ECR and how it treats ECR's peculiar answers, seen from a scripted upstream.

The emulator's registry cannot produce some of ECR's behaviour (absolute ``Link`` headers,
403 plain-text "token expired", slow upload commits), so a FakeUpstream plays ECR here while
the token still comes from the emulator's moto.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from proxy_harness import TEST_WORKERS, FakeUpstream, Proxy, ProxyFactory, metric_sum

from ecr_twisted.testing.emulator import EmulatedECR

DIGEST = "sha256:" + "cd" * 32


class Script:
    def __init__(self) -> None:
        self.upstream_port = 0
        self.storage_port = 0
        self.expired_once_calls = 0
        self.release = threading.Event()

    def _send(self, sock: socket.socket, status: str, headers: list[str], body: bytes = b"",
              head_only: bool = False) -> None:
        head = f"HTTP/1.1 {status}\r\n" + "".join(f"{h}\r\n" for h in headers)
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + (b"" if head_only else body))

    def base(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        self._send(sock, "200 OK", ["Content-Type: application/json"], b"{}")
        return True

    def tags(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        link = (f'<http://127.0.0.1:{self.upstream_port}/v2/contract/tags/tags/list'
                f'?last=b3BhcXVl%2Btb2tlbg%3D%3D&n=2>; rel="next"')
        self._send(sock, "200 OK", ["Content-Type: application/json", f"Link: {link}"],
                   b'{"name":"contract/tags","tags":["a","b"]}')
        return True

    def expired_once(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        self.expired_once_calls += 1
        if self.expired_once_calls == 1:
            self._send(sock, "403 Forbidden", ["Content-Type: text/plain"],
                       b"Your authorization token has expired. Reauthenticate and try again.")
        else:
            self._send(sock, "200 OK", ["Content-Type: application/vnd.oci.image.manifest.v1+json",
                                        f"Docker-Content-Digest: {DIGEST}"], b'{"schemaVersion":2}')
        return True

    def challenge(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        self._send(
            sock, "401 Unauthorized",
            ['WWW-Authenticate: Basic realm="https://123456789012.dkr.ecr.us-east-1.amazonaws.com/",'
             'service="ecr.amazonaws.com"', "Content-Type: application/json"],
            b'{"errors":[{"code":"DENIED","message":"Not Authorized"}]}',
        )
        return True

    def redirect(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        loc = f"http://localhost:{self.storage_port}/starport/blob?X-Amz-Signature=abc&X-Amz-Credential=x"
        self._send(sock, "307 Temporary Redirect", [f"Location: {loc}"])
        return True

    def storage(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        self._send(sock, "200 OK", ["Content-Type: application/octet-stream", "x-amz-request-id: r1"],
                   b"blob-from-storage", head_only=method == "HEAD")
        return True

    def slow_commit(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        self.release.wait(4)  # a large layer's commit takes a while in ECR
        self._send(sock, "201 Created",
                   [f"Location: http://127.0.0.1:{self.upstream_port}/v2/contract/slow/blobs/{DIGEST}",
                    f"Docker-Content-Digest: {DIGEST}"])
        return True

    def upload_start(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        # ECR: 202, absolute Location on the registry host, no Docker-Upload-UUID
        self._send(sock, "202 Accepted",
                   [f"Location: http://127.0.0.1:{self.upstream_port}/v2/contract/up/blobs/uploads/"
                    "f00d-1?uploadState=a%2Fb%3D%3D&x=1"])
        return True


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[FakeUpstream, FakeUpstream, Script]]:
    s = Script()
    storage = FakeUpstream({("GET", "/starport/"): s.storage, ("HEAD", "/starport/"): s.storage})
    s.storage_port = storage.port
    upstream = FakeUpstream(
        {
            ("GET", "/v2/contract/tags/tags/list"): s.tags,
            ("GET", "/v2/contract/expired/"): s.expired_once,
            ("GET", "/v2/contract/challenge/"): s.challenge,
            ("GET", "/v2/contract/blob/blobs/"): s.redirect,
            ("HEAD", "/v2/contract/blob/blobs/"): s.redirect,
            ("PUT", "/v2/contract/slow/"): s.slow_commit,
            ("POST", "/v2/contract/up/blobs/uploads/"): s.upload_start,
            ("GET", "/v2/"): s.base,
        }
    )
    s.upstream_port = upstream.port
    yield upstream, storage, s
    s.release.set()
    upstream.close()
    storage.close()


@pytest.fixture(scope="module")
def contract_proxy(
    ecr: EmulatedECR, scripted: tuple[FakeUpstream, FakeUpstream, Script], module_proxy_factory: ProxyFactory
) -> Proxy:
    upstream, _, _ = scripted
    return module_proxy_factory(ecr, "--upstream-timeout", "1.5", upstream=upstream.url)


def test_upstream_sees_the_ecr_token_not_the_clients_credentials(
    contract_proxy: Proxy, scripted: tuple[FakeUpstream, FakeUpstream, Script], ecr: EmulatedECR
) -> None:
    upstream, _, _ = scripted
    r = contract_proxy.request("/v2/", headers={"Authorization": "Bearer client-secret-xyz"})
    assert r.status == 200
    method, target, headers = upstream.requests[-1]
    assert (method, target) == ("GET", "/v2/")
    expected = "Basic " + base64.b64encode(f"AWS:{ecr.moto_password}".encode()).decode()
    assert headers["authorization"] == expected
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    assert "client-secret-xyz" not in repr(upstream.requests)


def test_absolute_link_is_rewritten_and_token_kept(
    contract_proxy: Proxy, scripted: tuple[FakeUpstream, FakeUpstream, Script]
) -> None:
    r = contract_proxy.request("/v2/contract/tags/tags/list?n=2")
    assert r.status == 200 and r.json()["tags"] == ["a", "b"]
    assert r.header("Link") == (
        f'<{contract_proxy.url}/v2/contract/tags/tags/list?last=b3BhcXVl%2Btb2tlbg%3D%3D&n=2>; rel="next"'
    )


def test_ecr_style_upload_location_is_rewritten(contract_proxy: Proxy) -> None:
    r = contract_proxy.request("/v2/contract/up/blobs/uploads/", "POST", headers={"Content-Length": "0"})
    assert r.status == 202
    assert r.header("Location") == (
        f"{contract_proxy.url}/v2/contract/up/blobs/uploads/f00d-1?uploadState=a%2Fb%3D%3D&x=1"
    )


def test_plain_text_403_expired_token_refreshes_and_retries(
    contract_proxy: Proxy, scripted: tuple[FakeUpstream, FakeUpstream, Script]
) -> None:
    _, _, script = scripted
    before = contract_proxy.metric_sum("ecrproxy_token_refresh_total", result="success")
    r = contract_proxy.request("/v2/contract/expired/manifests/latest")
    assert r.status == 200, r.body
    assert r.header("Docker-Content-Digest") == DIGEST
    assert script.expired_once_calls == 2
    after = contract_proxy.metric_sum("ecrproxy_token_refresh_total", result="success")
    assert after is not None
    assert before + 1 <= after <= before + TEST_WORKERS  # single flight holds per serving process


def test_upstream_challenge_never_reaches_the_client(contract_proxy: Proxy) -> None:
    r = contract_proxy.request("/v2/contract/challenge/manifests/latest")
    assert r.status == 502, r.body
    assert r.header("WWW-Authenticate") is None
    assert b"dkr.ecr" not in r.body and b"Not Authorized" not in r.body
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"


def test_storage_redirect_followed_without_authorization(
    contract_proxy: Proxy, scripted: tuple[FakeUpstream, FakeUpstream, Script]
) -> None:
    _, storage, _ = scripted
    r = contract_proxy.request(f"/v2/contract/blob/blobs/{DIGEST}", headers={"Range": "bytes=0-"})
    assert r.status == 200 and r.body == b"blob-from-storage"
    assert r.header("Docker-Content-Digest") == DIGEST  # added from the path: S3 does not send it
    assert r.header("x-amz-request-id") is None
    method, target, headers = storage.requests[-1]
    assert method == "GET" and target.startswith("/starport/blob?X-Amz-Signature=abc")
    assert "authorization" not in headers, "S3 rejects a presigned request that also carries Authorization"
    assert headers["host"] == f"localhost:{storage.port}"
    assert headers.get("range") == "bytes=0-"
    h = contract_proxy.request(f"/v2/contract/blob/blobs/{DIGEST}", "HEAD")
    assert h.status == 200 and h.body == b""
    assert h.header("Content-Length") == str(len(b"blob-from-storage"))
    assert storage.requests[-1][0] == "HEAD", "blob HEAD must stay HEAD"


def test_slow_upload_commit_is_not_cut_by_the_request_timeout(contract_proxy: Proxy) -> None:
    """--upstream-timeout is 1.5 s here; the final PUT of an upload may take much longer (upload timeout)."""
    started = time.monotonic()
    r = contract_proxy.request(f"/v2/contract/slow/blobs/uploads/abc?digest={DIGEST}", "PUT",
                               headers={"Content-Length": "0"}, timeout=30)
    elapsed = time.monotonic() - started
    assert r.status == 201, (r.status, r.body)
    assert elapsed > 3
    assert r.header("Location") == f"{contract_proxy.url}/v2/contract/slow/blobs/{DIGEST}"
    samples = contract_proxy.metrics()
    assert metric_sum(samples, "ecrproxy_upstream_errors_total", kind="timeout") == 0
