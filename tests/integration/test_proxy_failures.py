"""Upstream failures in the middle of a transfer: a client must never take a broken transfer for a whole one.

* the registry is SIGKILLed while a large PATCH streams through the proxy (own emulator);
* a hand-written misbehaving upstream (plain sockets) truncates bodies, stalls, or never answers.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import pathlib
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator

import pytest
from proxy_harness import (
    MIB,
    FakeUpstream,
    Proxy,
    ProxyFactory,
    free_port,
    http_request,
    metric_sum,
    target_of,
    wait_for,
)

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.images import sha256_digest, write_big_tar_layer

DECLARED = 10_000_000
SENT = 1 * MIB


@pytest.fixture(scope="module")
def fail_ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    """An emulator of its own: its registry gets killed."""
    with EmulatedECR(tmp_path_factory.mktemp("ecr-failures")) as emu:
        yield emu


# ---------------------------------------------------------------- registry killed mid-upload
def _read_response_or_reset(sock: socket.socket, timeout: float) -> bytes | None:
    """Whatever the proxy answers before closing; None if the connection was reset with nothing."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return bytes(data) if data else None


def test_registry_killed_during_streamed_patch(fail_ecr: EmulatedECR, proxy_factory: ProxyFactory) -> None:
    ecr = fail_ecr
    p = proxy_factory(ecr)
    name = "fail/upload"
    post = p.request(f"/v2/{name}/blobs/uploads/", "POST", headers={"Content-Length": "0"})
    assert post.status == 202
    location = post.header("Location") or ""
    total = 200 * MIB
    piece = os.urandom(256 * 1024)
    sock = socket.create_connection(("127.0.0.1", p.port), timeout=30)
    sent = 0
    send_error: BaseException | None = None
    try:
        sock.sendall(
            (f"PATCH {target_of(location)} HTTP/1.1\r\nHost: {p.host}\r\n"
             f"Content-Type: application/octet-stream\r\nContent-Length: {total}\r\n\r\n").encode()
        )
        for _ in range(32):  # 8 MiB first: the upload is under way in the registry
            sock.sendall(piece)
            sent += len(piece)
        wait_for(lambda: p.metric("ecrproxy_requests_in_flight") == 1, 10, "the PATCH to be in flight")
        ecr.kill_registry()
        # keep feeding the body slowly after the kill: the proxy must stop us, not accept it
        deadline = time.monotonic() + 20
        try:
            while sent < total and time.monotonic() < deadline:
                sock.sendall(piece)
                sent += len(piece)
        except OSError as e:  # reset / broken pipe: the proxy gave up on the request
            send_error = e
        answer = _read_response_or_reset(sock, timeout=20)
    finally:
        sock.close()
        ecr.start_registry()

    assert sent < total, "the proxy swallowed the whole 200 MiB body although the registry was dead"
    if answer is not None:
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 "), answer[:200]
        status = int(status_line.split()[1])
        assert not 200 <= status < 300, f"a 2xx for an upload whose registry died: {answer[:300]!r}"
        assert status >= 500, answer[:300]
        body = answer.partition(b"\r\n\r\n")[2]
        assert body.startswith(b'{"errors":[{"code":"'), body[:200]
    print(f"sent {sent // MIB} MiB; send error: {send_error!r}; answer: {(answer or b'(reset)')[:120]!r}")

    # the proxy is fine and, with the registry back, serves and accepts uploads again
    assert p.alive() and p.ops("/healthz").status == 200
    wait_for(lambda: p.request("/v2/").status == 200, 15, "the proxy to reach the restarted registry")
    data = os.urandom(100_000)
    digest = sha256_digest(data)
    post = p.request(f"/v2/{name}/blobs/uploads/", "POST", headers={"Content-Length": "0"})
    assert post.status == 202
    put = http_request(f"{post.header('Location')}&digest={urllib.parse.quote(digest)}", "PUT", body=data)
    assert put.status == 201, put.body
    got = p.request(f"/v2/{name}/blobs/{digest}")
    assert got.status == 200 and got.body == data
    assert p.metric("ecrproxy_requests_in_flight") == 0


# ---------------------------------------------------------------- a misbehaving upstream
class Misbehaving:
    """Handlers for FakeUpstream; ``release`` frees handlers that stall."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.storage_port = 0

    @staticmethod
    def base(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Docker-Distribution-API-Version: registry/2.0\r\nContent-Length: 2\r\n\r\n{}"
        )
        return True

    @staticmethod
    def truncated_length(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % DECLARED
        )
        sock.sendall(os.urandom(SENT))
        sock.shutdown(socket.SHUT_WR)
        return False

    @staticmethod
    def truncated_chunked(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(SENT // 65536):
            sock.sendall(b"%x\r\n" % 65536 + os.urandom(65536) + b"\r\n")
        sock.sendall(b"%x\r\n" % 65536 + os.urandom(1000))  # dies inside a chunk, no last-chunk
        sock.shutdown(socket.SHUT_WR)
        return False

    def redirect(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        loc = f"http://localhost:{self.storage_port}/storage/blob?X-Amz-Signature=abc"
        sock.sendall(f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {loc}\r\nContent-Length: 0\r\n\r\n".encode())
        return True

    def stalled(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % DECLARED + os.urandom(SENT))
        self.release.wait(60)
        return False

    def silent(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        self.release.wait(60)
        return False


@pytest.fixture(scope="module")
def misbehaving() -> Iterator[tuple[FakeUpstream, Misbehaving]]:
    m = Misbehaving()
    storage = FakeUpstream({("GET", "/storage/"): m.truncated_length})
    m.storage_port = storage.port
    upstream = FakeUpstream(
        {
            ("GET", "/v2/trunc/length/"): m.truncated_length,
            ("GET", "/v2/trunc/chunked/"): m.truncated_chunked,
            ("GET", "/v2/trunc/redirect/blobs/"): m.redirect,
            ("GET", "/v2/trunc/stalled/"): m.stalled,
            ("GET", "/v2/trunc/silent/"): m.silent,
            ("GET", "/v2/"): m.base,
        }
    )
    yield upstream, m
    m.release.set()
    upstream.close()
    storage.close()


@pytest.fixture(scope="module")
def bad_proxy(
    ecr: EmulatedECR, misbehaving: tuple[FakeUpstream, Misbehaving], module_proxy_factory: ProxyFactory
) -> Proxy:
    """A stream-mode proxy on the fake upstream (the token still comes from the emulator's moto)."""
    upstream, _ = misbehaving
    return module_proxy_factory(ecr, "--upstream-timeout", "1.5", "--idle-timeout", "1.5", upstream=upstream.url)


DIGEST = "sha256:" + "ab" * 32


def _get_truncated(p: Proxy, path: str) -> tuple[int, int, BaseException | None]:
    """(status, body bytes received, error while reading the body)."""
    conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        received = 0
        err: BaseException | None = None
        try:
            while chunk := resp.read(65536):
                received += len(chunk)
        except (http.client.IncompleteRead, ConnectionResetError) as e:
            err = e
        return resp.status, received, err
    finally:
        conn.close()


def test_base_through_fake_upstream(bad_proxy: Proxy) -> None:
    r = bad_proxy.request("/v2/")
    assert r.status == 200 and r.body == b"{}"


@pytest.mark.parametrize(
    "path",
    [
        f"/v2/trunc/length/blobs/{DIGEST}",
        "/v2/trunc/length/manifests/latest",
        f"/v2/trunc/chunked/blobs/{DIGEST}",
        f"/v2/trunc/redirect/blobs/{DIGEST}",  # stream mode follows to a "storage" that truncates
    ],
    ids=["content-length", "manifest", "chunked", "storage-after-redirect"],
)
def test_truncated_body_never_looks_complete(bad_proxy: Proxy, path: str) -> None:
    status, received, err = _get_truncated(bad_proxy, path)
    if 200 <= status < 300:
        assert err is not None, f"status {status} and a clean end after {received} bytes: truncation hidden"
        assert received < DECLARED
        if isinstance(err, http.client.IncompleteRead):
            assert err.expected is None or err.expected > 0
    else:
        assert status >= 500
    log = bad_proxy.log_text()
    assert "error=" in log


def test_truncation_visible_on_raw_socket(bad_proxy: Proxy) -> None:
    """Below http.client: the declared length is passed on and the connection ends short of it."""
    with socket.create_connection(("127.0.0.1", bad_proxy.port), timeout=30) as s:
        s.sendall(f"GET /v2/trunc/length/blobs/{DIGEST} HTTP/1.1\r\nHost: {bad_proxy.host}\r\n\r\n".encode())
        data = bytearray()
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"content-length: {DECLARED}".encode() in head.lower()
    # the proxy resets the connection (abort), so the kernel may drop some of the bytes in flight
    assert len(body) <= SENT < DECLARED


def test_stalled_body_is_aborted_by_idle_timeout(bad_proxy: Proxy) -> None:
    started = time.monotonic()
    status, received, err = _get_truncated(bad_proxy, f"/v2/trunc/stalled/blobs/{DIGEST}")
    elapsed = time.monotonic() - started
    assert status == 200 and received == SENT
    assert err is not None, "a stalled transfer ended as if it were complete"
    assert elapsed < 20, elapsed
    assert "idle timeout" in bad_proxy.log_text()


def test_silent_upstream_gets_504(bad_proxy: Proxy) -> None:
    started = time.monotonic()
    r = bad_proxy.request("/v2/trunc/silent/manifests/latest", timeout=30)
    elapsed = time.monotonic() - started
    assert r.status == 504, r.body
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert 1.4 < elapsed < 15, elapsed  # --upstream-timeout 1.5


def test_unreachable_upstream_gets_502(ecr: EmulatedECR, proxy_factory: ProxyFactory) -> None:
    p = proxy_factory(ecr, upstream=f"http://127.0.0.1:{free_port()}")
    r = p.request("/v2/some/repo/manifests/latest")
    assert r.status == 502, r.body
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    samples = p.metrics()
    assert metric_sum(samples, "ecrproxy_upstream_errors_total", kind="unreachable") >= 1


# ---------------------------------------------------------------- clients that leave or dawdle
def _put_blob_direct(ecr: EmulatedECR, name: str, path: pathlib.Path, digest: str) -> None:
    """Upload a file as a blob straight to the registry (streamed from disk)."""
    post = http_request(f"{ecr.upstream_url}/v2/{name}/blobs/uploads/", "POST", password=ecr.password,
                        headers={"Content-Length": "0"})
    assert post.status == 202
    location = post.header("Location") or ""
    conn = http.client.HTTPConnection("127.0.0.1", int(ecr.upstream_url.rsplit(":", 1)[1]), timeout=300,
                                      blocksize=1 << 20)
    try:
        with open(path, "rb") as f:
            conn.request("PUT", f"{target_of(location)}&digest={urllib.parse.quote(digest)}", body=f,
                         headers={"Content-Length": str(path.stat().st_size),
                                  "Authorization": "Basic " + base64.b64encode(
                                      f"AWS:{ecr.password}".encode()).decode()})
        resp = conn.getresponse()
        assert resp.status == 201, resp.read()[:300]
        resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def big_blob(fail_ecr: EmulatedECR, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, int]:
    """(repository, digest, size) of a 96 MiB blob in the failures emulator."""
    path = tmp_path_factory.mktemp("big-blob") / "blob"
    digest = write_big_tar_layer(path, 96 * MIB, seed=7)
    size = path.stat().st_size
    _put_blob_direct(fail_ecr, "fail/big", path, digest)
    path.unlink()
    return "fail/big", digest, size


def _open_blob_get(p: Proxy, path: str, rcvbuf: int | None = None) -> tuple[socket.socket, bytes, int]:
    """Send a GET on a raw socket; return (socket, body bytes already read, Content-Length)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    s.connect(("127.0.0.1", p.port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {p.host}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    assert m is not None, head
    return s, body, int(m.group(1))


def test_slow_reader_gets_backpressure(
    fail_ecr: EmulatedECR, big_blob: tuple[str, str, int], proxy_factory: ProxyFactory
) -> None:
    """A client that stops reading must stop the proxy reading from storage (no buffering of the blob)."""
    name, digest, size = big_blob
    p = proxy_factory(fail_ecr)
    assert p.request("/v2/").status == 200
    baseline = p.rss()
    s, body, length = _open_blob_get(p, f"/v2/{name}/blobs/{digest}", rcvbuf=64 * 1024)
    h = hashlib.sha256(body)
    got = len(body)
    try:
        while got < 1 * MIB:
            chunk = s.recv(65536)
            assert chunk
            h.update(chunk)
            got += len(chunk)
        # the client stalls for 3 s; watch the proxy meanwhile (bounded polling)
        samples = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            samples.append(p.rss())
            threading.Event().wait(0.1)
        while got < length and (chunk := s.recv(1 << 20)):
            h.update(chunk)
            got += len(chunk)
    finally:
        s.close()
    assert length == size and got == size
    assert "sha256:" + h.hexdigest() == digest
    growth = max(samples) - baseline
    print(f"slow reader: baseline {baseline / MIB:.1f} MiB, peak while stalled {max(samples) / MIB:.1f} MiB")
    assert growth < 30 * MIB, f"the proxy buffered {growth / MIB:.1f} MiB for a stalled client"


def test_client_leaving_mid_download_frees_everything(
    fail_ecr: EmulatedECR, big_blob: tuple[str, str, int], proxy_factory: ProxyFactory
) -> None:
    name, digest, size = big_blob
    p = proxy_factory(fail_ecr)
    for _ in range(3):
        s, body, length = _open_blob_get(p, f"/v2/{name}/blobs/{digest}")
        assert length == size
        got = len(body)
        while got < 2 * MIB:
            chunk = s.recv(65536)
            assert chunk
            got += len(chunk)
        s.close()  # leave in the middle
    wait_for(lambda: p.metric("ecrproxy_requests_in_flight") == 0, 10, "in-flight requests to drop to 0")
    assert "client disconnected" in p.log_text()
    # the proxy still serves the whole blob correctly afterwards
    s, body, _ = _open_blob_get(p, f"/v2/{name}/blobs/{digest}")
    h = hashlib.sha256(body)
    got = len(body)
    try:
        while got < size and (chunk := s.recv(1 << 20)):
            h.update(chunk)
            got += len(chunk)
    finally:
        s.close()
    assert got == size and "sha256:" + h.hexdigest() == digest
