"""Graceful drain on SIGTERM (issue #12), real processes (also under ECRTEST_WORKERS=2).

A 256 MiB download (read by a throttled client) and a 256 MiB upload (sent by a throttled
client) in flight when SIGTERM comes both finish with the right digest; meanwhile /readyz is 503
and new connections are refused; the process exits 0. A transfer outlasting --drain-timeout is
cut at the deadline: the client sees a broken connection, never a short body that looks whole.
The registry is a FakeUpstream serving and taking the bytes at full speed.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from proxy_harness import MIB, FakeUpstream, Proxy, ProxyFactory, wait_for

from ecr_twisted.testing.emulator import EmulatedECR

SIZE = 256 * MIB
BLOCK = hashlib.sha256(b"drain").digest() * (MIB // 32)  # 1 MiB, not all one byte
DIGEST = "sha256:" + hashlib.sha256(BLOCK * (SIZE // MIB)).hexdigest()


def _blob(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
    sock.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nDocker-Content-Digest: %s\r\n"
        b"Content-Length: %d\r\n\r\n" % (DIGEST.encode(), SIZE)
    )
    for _ in range(SIZE // MIB):
        sock.sendall(BLOCK)
    return True


UPSTREAM: list[FakeUpstream] = []


def _upload(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
    early = UPSTREAM[0].early.pop(sock.fileno(), b"")  # what came with the head
    left = int(headers["content-length"]) - len(early)
    h = hashlib.sha256(early)
    while left:
        data = sock.recv(min(left, 1 << 20))
        if not data:
            return False
        h.update(data)
        left -= len(data)
    got = "sha256:" + h.hexdigest()
    sock.sendall(b"HTTP/1.1 201 Created\r\nDocker-Content-Digest: %s\r\nContent-Length: 0\r\n\r\n" % got.encode())
    return False  # anything read past the body belongs to no request


def _base(sock: socket.socket, method: str, target: str, headers: dict[str, str]) -> bool:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    return True


@pytest.fixture(scope="module")
def registry() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream({
        ("GET", "/v2/drain/blobs/sha256:"): _blob,
        ("PUT", "/v2/drain/blobs/uploads/"): _upload,
        ("GET", "/v2/"): _base,
    })
    UPSTREAM[:] = [upstream]
    yield upstream
    upstream.close()


class Transfer(threading.Thread):
    """A blob download read, or an upload sent, at `rate` bytes a second."""

    def __init__(self, port: int, rate: float, upload: bool = False) -> None:
        super().__init__(daemon=True)
        self.port, self.rate, self.upload = port, rate, upload
        self.moved = 0
        self.status = 0
        self.digest = ""
        self.error: BaseException | None = None
        self.ended_at = 0.0

    def _pace(self, started: float) -> None:
        ahead = self.moved / self.rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
                if self.upload:
                    self._send(s)
                else:
                    self._receive(s)
        except BaseException as e:  # noqa: BLE001 (the test looks at it)
            self.error = e
        self.ended_at = time.monotonic()

    def _send(self, s: socket.socket) -> None:
        s.sendall(
            b"PUT /v2/drain/blobs/uploads/u-1?digest=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % (DIGEST.encode(), SIZE)
        )
        started = time.monotonic()
        for _ in range(SIZE // MIB):
            s.sendall(BLOCK)
            self.moved += MIB
            self._pace(started)
        head = b""
        while b"\r\n\r\n" not in head:
            more = s.recv(65536)
            if not more:
                raise ConnectionError(f"closed before the answer: {head!r}")
            head += more
        self.status = int(head.split(b" ", 2)[1])
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"docker-content-digest:"):
                self.digest = line.split(b":", 1)[1].strip().decode()

    def _receive(self, s: socket.socket) -> None:
        s.sendall(b"GET /v2/drain/blobs/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % DIGEST.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            more = s.recv(65536)
            if not more:
                raise ConnectionError("closed before the head")
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ", 2)[1])
        h = hashlib.sha256(rest)
        self.moved = len(rest)
        started = time.monotonic()
        while self.moved < SIZE:
            more = s.recv(min(1 << 16, SIZE - self.moved))
            if not more:
                raise ConnectionError(f"body cut at {self.moved} of {SIZE} bytes")
            h.update(more)
            self.moved += len(more)
            self._pace(started)
        self.digest = "sha256:" + h.hexdigest()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _sigterm_when_moving(p: Proxy, transfers: list[Transfer]) -> float:
    for t in transfers:
        t.start()
    wait_for(lambda: all(t.moved >= 16 * MIB for t in transfers), 20, "transfers under way")
    assert p.proc is not None
    p.proc.terminate()
    return time.monotonic()


def test_transfers_in_flight_finish_and_the_process_exits_0(
    ecr: EmulatedECR, registry: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    p = proxy_factory(ecr, "--drain-timeout", "25", upstream=registry.url)
    assert p.port is not None and p.proc is not None
    rate = 40 * MIB  # 256 MiB in ~6.4 s each: well in flight when SIGTERM comes
    down, up = Transfer(p.port, rate), Transfer(p.port, rate, upload=True)
    signalled = _sigterm_when_moving(p, [down, up])
    wait_for(lambda: p.ops("/readyz").status == 503, 2, "/readyz 503 while draining")
    readyz_at = time.monotonic() - signalled
    wait_for(lambda: _refused(p.port or 0), 3, "new connections refused")
    refused_at = time.monotonic() - signalled
    assert down.is_alive() and up.is_alive(), "the transfers were still in flight"
    rc = p.proc.wait(timeout=30)
    exited_at = time.monotonic() - signalled
    down.join(5)
    up.join(5)
    print(f"\ndrain: /readyz 503 after {readyz_at:.2f} s, refused after {refused_at:.2f} s, "
          f"download done {down.ended_at - signalled:.1f} s, upload done {up.ended_at - signalled:.1f} s, "
          f"exit after {exited_at:.1f} s")
    assert down.error is None and down.status == 200 and down.digest == DIGEST, down.error
    assert up.error is None and up.status == 201 and up.digest == DIGEST, up.error
    assert rc == 0
    log = p.log_text()
    assert "Traceback" not in log and "ReactorNotRunning" not in log, p.log_tail()


def test_a_transfer_past_the_drain_timeout_is_cut(
    ecr: EmulatedECR, registry: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    p = proxy_factory(ecr, "--drain-timeout", "2", upstream=registry.url)
    assert p.port is not None and p.proc is not None
    down = Transfer(p.port, 8 * MIB)  # ~32 s for the whole blob
    signalled = _sigterm_when_moving(p, [down])
    down.join(15)
    cut_at = down.ended_at - signalled
    rc = p.proc.wait(timeout=15)
    print(f"\ndrain timeout 2 s: download cut after {cut_at:.1f} s at {down.moved} bytes")
    assert isinstance(down.error, (ConnectionError, OSError)), down.error
    assert down.moved < SIZE and down.digest == ""
    assert 1.5 < cut_at < 6
    assert rc == 0
    assert "Traceback" not in p.log_text(), p.log_tail()




def test_a_second_sigterm_stops_at_once(ecr: EmulatedECR, registry: FakeUpstream, proxy_factory: ProxyFactory) -> None:
    p = proxy_factory(ecr, "--drain-timeout", "25", upstream=registry.url)
    assert p.port is not None and p.proc is not None
    down = Transfer(p.port, 8 * MIB)
    _sigterm_when_moving(p, [down])
    time.sleep(1)
    assert down.is_alive(), "the first SIGTERM drains: the transfer goes on"
    again = time.monotonic()
    p.proc.terminate()
    rc = p.proc.wait(timeout=10)
    down.join(5)
    print(f"\nsecond SIGTERM: exit after {time.monotonic() - again:.2f} s, download cut at {down.moved} bytes")
    assert isinstance(down.error, (ConnectionError, OSError)) and down.moved < SIZE
    assert time.monotonic() - again < 5
    assert rc == 0
    assert "Traceback" not in p.log_text(), p.log_tail()


def test_drain_delay_keeps_listening_while_readyz_says_503(
    ecr: EmulatedECR, registry: FakeUpstream, proxy_factory: ProxyFactory
) -> None:
    p = proxy_factory(ecr, "--drain-delay", "2", upstream=registry.url)
    assert p.port is not None and p.proc is not None
    p.proc.terminate()
    signalled = time.monotonic()
    wait_for(lambda: p.ops("/readyz").status == 503, 2, "/readyz 503 at once")
    r = p.request("/v2/")  # still served during the delay, and told the connection closes
    assert r.status == 200 and r.headers.get("connection") == "close", r
    assert time.monotonic() - signalled < 1.5
    wait_for(lambda: _refused(p.port or 0), 5, "new connections refused after the delay")
    refused_at = time.monotonic() - signalled
    rc = p.proc.wait(timeout=10)
    print(f"\n--drain-delay 2: refused after {refused_at:.1f} s, exit after {time.monotonic() - signalled:.1f} s")
    assert 1.5 < refused_at < 4 and rc == 0
