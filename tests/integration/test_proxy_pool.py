"""Issue #11: one bad client must never take the proxy down for everyone, through the upstream pool.

A real ``twistd ecrproxy`` on a FakeUpstream (the token still comes from the emulator's moto):

* a burst of a few hundred clients that send a request and leave at once, twice: afterwards a
  probe is answered at once and no upstream connection is left in use (the pool once leaked
  its places here, and the proxy stalled until the upstream closed its idle connections);
* 70 slow clients (readers that stop reading a blob, uploaders that send a byte a second) while
  a probe pulls manifests: every probe is answered within PROBE_BOUND, because long transfers
  may hold only their share of the pool; those beyond it get 503 with Retry-After within
  --upstream-wait instead of hanging for the upstream timeout.

Everything is on 127.0.0.1 and bounded in time and count.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from proxy_harness import TEST_WORKERS, FakeUpstream, Proxy, ProxyFactory, wait_for

from ecr_twisted.testing.emulator import EmulatedECR

CONNECTIONS = 8  # --upstream-connections: 6 for long transfers, 2 kept for short exchanges
WAIT = 2.0  # --upstream-wait
PROBE_BOUND = 2.0  # seconds any probe may take, slow clients or not
BURST = 300  # clients per burst
SLOW = 70  # slow clients
DIGEST = "sha256:" + "ab" * 32
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}'


class Stub:
    """FakeUpstream handlers: quick answers, a burst route that answers late and closes, endless
    blobs and uploads that hold their connection until the proxy lets go."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    @staticmethod
    def base(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        return True

    @staticmethod
    def manifest(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(MANIFEST))
        sock.sendall(head + (b"" if method == "HEAD" else MANIFEST))
        return True

    @staticmethod
    def blob_head(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1234\r\n\r\n")
        return True

    @staticmethod
    def burst(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        time.sleep(0.3)  # answered late, on a connection that then closes: the pool keeps connecting
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
        return False

    def endless_blob(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (1 << 40))
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while not self.stop.is_set():
                sock.sendall(chunk)  # blocks while the proxy holds the body back for a slow reader
        return False

    def endless_upload(self, sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
        with contextlib.suppress(OSError):
            while not self.stop.is_set() and sock.recv(65536):
                pass
        return False


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[FakeUpstream, Stub]]:
    s = Stub()
    upstream = FakeUpstream(
        {
            ("GET", "/v2/burst/manifests/"): s.burst,
            ("GET", "/v2/app/manifests/"): s.manifest,
            ("HEAD", "/v2/app/manifests/"): s.manifest,
            ("HEAD", "/v2/app/blobs/"): s.blob_head,
            ("GET", "/v2/slow/blobs/sha256:"): s.endless_blob,
            ("PATCH", "/v2/slow/blobs/uploads/"): s.endless_upload,
            ("GET", "/v2/"): s.base,
        }
    )
    yield upstream, s
    s.stop.set()
    upstream.close()


@pytest.fixture
def pool_proxy(ecr: EmulatedECR, stub: tuple[FakeUpstream, Stub], proxy_factory: ProxyFactory) -> Proxy:
    upstream, _ = stub
    return proxy_factory(
        ecr, "--upstream-connections", str(CONNECTIONS), "--upstream-wait", str(WAIT), upstream=upstream.url
    )


def _timed_request(p: Proxy, method: str, path: str, timeout: float) -> tuple[int, float]:
    """(status, seconds) of one request on a fresh connection."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", p.port or 0), timeout=timeout) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            if not more:
                break
            data += more
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, time.monotonic() - started


def _in_use(p: Proxy) -> tuple[float, float]:
    m = p.metrics()
    return tuple(  # type: ignore[return-value]
        m.get(("ecrproxy_upstream_connections_in_use", (("class", c),)), -1.0) for c in ("short", "long")
    )


def _burst(p: Proxy, n: int) -> None:
    """`n` clients connect, send a request and all leave at once."""
    request = b"GET /v2/burst/manifests/latest HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    socks: list[socket.socket] = []
    lock = threading.Lock()

    def connect(count: int) -> None:
        for _ in range(count):
            with contextlib.suppress(OSError):
                s = socket.create_connection(("127.0.0.1", p.port or 0), timeout=5)
                s.sendall(request)
                with lock:
                    socks.append(s)

    threads = [threading.Thread(target=connect, args=(n // 10,)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    time.sleep(0.1)  # requests queued for the pool, some connects under way
    for i, s in enumerate(socks):  # all leave within a few milliseconds, as wrk's connections do at its end
        s.close()
        if i % 20 == 19:
            time.sleep(0.002)
    assert len(socks) >= n * 0.9, "the burst could not connect"


def test_a_burst_of_clients_that_leave_at_once_leaves_no_upstream_connection_busy(pool_proxy: Proxy) -> None:
    for _ in range(2):
        _burst(pool_proxy, BURST)
        # the next request is answered at once, not after the upstream drops leaked connections
        status, took = _timed_request(pool_proxy, "GET", "/v2/app/manifests/latest", timeout=10)
        assert status == 200 and took < PROBE_BOUND, (status, took)
    wait_for(lambda: _in_use(pool_proxy) == (0.0, 0.0), 5, "every upstream connection to be free")
    log = pool_proxy.log_text()
    assert "AlreadyCalledError" not in log and "Unhandled error" not in log
    assert pool_proxy.metric("ecrproxy_upstream_waiting", **{"class": "short"}) == 0


class SlowClients:
    """Readers that stop reading a blob and uploaders that send a byte a second, `n` in all."""

    def __init__(self, p: Proxy, n: int) -> None:
        self.socks: list[socket.socket] = []
        self.uploads: list[socket.socket] = []
        self.stop = threading.Event()
        for i in range(n):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes almost nothing
            s.settimeout(5)
            s.connect(("127.0.0.1", p.port or 0))
            if i % 2:
                s.sendall(f"GET /v2/slow/blobs/{DIGEST} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            else:
                s.sendall(b"PATCH /v2/slow/blobs/uploads/u%d HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\nx" % i)
                self.uploads.append(s)
            self.socks.append(s)
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self) -> None:
        while not self.stop.wait(1.0):
            for s in self.uploads:
                with contextlib.suppress(OSError):
                    s.send(b"x")

    def refused(self) -> int:
        """Slow clients answered 503 with Retry-After (those beyond the long transfers' share)."""
        n = 0
        for s in self.socks:
            s.setblocking(False)
            with contextlib.suppress(OSError):
                head = s.recv(4096, socket.MSG_PEEK)
                if head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: " in head:
                    n += 1
        return n

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


def test_slow_clients_never_starve_the_api_check_and_manifests(pool_proxy: Proxy) -> None:
    slow = SlowClients(pool_proxy, SLOW)
    try:
        time.sleep(1.0)  # they have taken the long transfers' share; the others wait in the queue
        probes = [("GET", "/v2/"), ("GET", "/v2/app/manifests/latest"), ("HEAD", "/v2/app/manifests/latest"),
                  ("HEAD", f"/v2/app/blobs/{DIGEST}")]
        took: list[float] = []
        deadline = time.monotonic() + WAIT + 3  # across the time the extra slow clients wait and are refused
        while time.monotonic() < deadline:
            for method, path in probes:
                status, seconds = _timed_request(pool_proxy, method, path, timeout=PROBE_BOUND + 1)
                assert status == 200 and seconds < PROBE_BOUND, (method, path, status, seconds)
                took.append(seconds)
            time.sleep(0.2)
        short, long = _in_use(pool_proxy)
        # the long transfers' share is taken (in at least one worker; the readers alone fill it), never more
        assert CONNECTIONS - CONNECTIONS // 4 <= long <= (CONNECTIONS - CONNECTIONS // 4) * TEST_WORKERS
        refused = pool_proxy.metric("ecrproxy_upstream_refused_total", **{"class": "long"}) or 0
        # at least the readers beyond the share (uploaders may also be cut for sending too slowly)
        assert refused >= SLOW // 2 - (CONNECTIONS - CONNECTIONS // 4) * TEST_WORKERS
        assert slow.refused() == refused  # each of them told so, with Retry-After
        assert len(took) >= 4 * 5
    finally:
        slow.close()
    # the slow clients gone, so are their upstream connections
    wait_for(lambda: _in_use(pool_proxy) == (0.0, 0.0), 5, "every upstream connection to be free")
