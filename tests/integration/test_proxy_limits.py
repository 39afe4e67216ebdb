"""The client side of a real proxy under pressure: bursts, a connection cap, too few file
descriptors, and clients that are slow, half-closed or malformed (issue #11).

Every load test is bounded in connections and time, on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import time
import urllib.parse

import pytest
from proxy_harness import (
    MIB,
    TEST_WORKERS,
    TWISTD,
    Proxy,
    ProxyFactory,
    http_request,
    parse_metrics,
    target_of,
    wait_for,
)

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.images import sha256_digest

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _request(host: str = "127.0.0.1", path: str = "/v2/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """(everything the proxy sent until it closed or reset the connection, seconds that took)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    data = bytearray()
    with contextlib.suppress(ConnectionResetError, socket.timeout):
        while chunk := sock.recv(65536):
            data += chunk
    return bytes(data), time.monotonic() - start


def _read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """One whole response with a Content-Length body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return head + b"\r\n\r\n" + body


def _process_tree(pid: int) -> list[int]:
    """`pid` and its children (the --workers processes; token fetchers come and go)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def _open_idle(port: int, n: int) -> list[socket.socket]:
    """`n` connections that send nothing (each process's backlog holds what it has not accepted)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    return socks


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


# ---------------------------------------------------------------- a burst of connections
def test_a_burst_of_1000_connections_is_accepted_without_drops(proxy: Proxy) -> None:
    """All at once: the listen backlog is the kernel's somaxconn (4096 here), not Twisted's 50,
    so no SYN is dropped (a dropped SYN is retried after a second: counted as a drop)."""
    assert proxy.port is not None
    n = 1000
    socks: list[socket.socket] = []
    start = time.monotonic()
    connected: dict[int, float] = {}
    failed = 0
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", proxy.port))
            socks.append(s)
        poller = select.poll()
        for s in socks:
            poller.register(s, select.POLLOUT)
        deadline = start + 15
        while len(connected) + failed < n and time.monotonic() < deadline:
            for fd, events in poller.poll(100):
                poller.unregister(fd)
                sock = next(s for s in socks if s.fileno() == fd)
                if events & (select.POLLERR | select.POLLHUP) or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                else:
                    connected[fd] = time.monotonic() - start
        late = sorted(t for t in connected.values() if t > 0.9)
        assert failed == 0 and len(connected) == n, (failed, len(connected))
        assert late == [], f"{len(late)} of {n} connections waited for a SYN retry (dropped by a full backlog)"
        # and the proxy serves every one of them
        for s in socks:
            s.setblocking(True)
            s.sendall(_request(extra="Connection: close\r\n"))
        answered = 0
        for s in socks:
            data, _ = _read_until_closed(s, 15)
            answered += data.startswith(b"HTTP/1.1 200 ")
        assert answered == n
        assert time.monotonic() - start < 20
    finally:
        _close_all(socks)


# ---------------------------------------------------------------- the connection cap
def test_connections_past_the_cap_get_a_fast_503_and_room_comes_back(
    ecr: EmulatedECR, proxy_factory: ProxyFactory
) -> None:
    p = proxy_factory(ecr, "--max-connections", "20")
    assert p.port is not None
    idle: list[socket.socket] = []
    try:
        # the kernel spreads connections over the --workers processes unevenly: add idle ones until
        # every process holds its 20 (those past a full process's cap are turned away)
        def full() -> bool:
            idle.extend(_open_idle(p.port or 0, 10))
            time.sleep(0.1)
            return (p.metric("ecrproxy_client_connections") or 0) >= 20 * TEST_WORKERS

        wait_for(full, 10, "every process to hold 20 connections", interval=0)
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            s.sendall(_request())
            answer, _ = _read_until_closed(s, 5)
        took = time.monotonic() - start
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"\r\nRetry-After: 1" in head and b'"code":"UNAVAILABLE"' in body
        assert took < 1.0
        assert p.ops("/healthz").status == 200  # the ops listener is not capped
    finally:
        _close_all(idle)
    # the cap frees as connections close
    wait_for(lambda: p.request("/v2/").status == 200, 5, "a connection under the cap")
    samples = p.metrics()
    assert sum(v for (name, labels), v in samples.items() if name == "ecrproxy_client_connections_refused_total") >= 1
    assert sum(v for (name, _), v in samples.items() if name == "ecrproxy_client_connections_max") == 20 * TEST_WORKERS


def _limited_proxy(ecr: EmulatedECR, proxy_factory: ProxyFactory, nofile: int, *extra: str) -> Proxy:
    return proxy_factory(ecr, *extra, argv0=["prlimit", f"--nofile={nofile}:{nofile}", str(TWISTD)])


def _probe(url: str, timeout: float = 2) -> tuple[int, float]:
    """(status or 0 if no answer in time, seconds taken) of one GET on a fresh connection."""
    start = time.monotonic()
    try:
        status = http_request(url, timeout=timeout).status
    except OSError:
        status = 0
    return status, time.monotonic() - start


def test_with_256_open_files_probes_still_pass_and_the_log_stays_small(
    ecr: EmulatedECR, proxy_factory: ProxyFactory
) -> None:
    """The measured fault: 1,200 idle connections under an open-file limit of 1,024 made 117 of
    127 health probes fail and Twisted log every EMFILE (108 MB in 120 s). Here: 256 files, 400
    idle connections; the cap (derived from the limit) turns the excess away cheaply, health
    probes pass, registry probes pass or get a fast 503, the log stays small, the CPU idle."""
    p = _limited_proxy(ecr, proxy_factory, 256)
    assert p.port is not None
    log_before = p.log_path.stat().st_size
    idle = _open_idle(p.port, 400)
    try:
        time.sleep(1.0)
        pids = _process_tree(p.pid)
        cpu_before, wall_before = _cpu_seconds(pids), time.monotonic()
        health, registry = [], []
        for _ in range(12):
            health.append(_probe(p.metrics_url + "/healthz"))
            registry.append(_probe(p.url + "/v2/"))
            time.sleep(0.25)
        busy = (_cpu_seconds(pids) - cpu_before) / (time.monotonic() - wall_before)
        assert all(status == 200 for status, _ in health), health
        assert all(status in (200, 503) and took < 1.0 for status, took in registry), registry
        assert busy < 0.25, f"the proxy used {busy:.0%} of a CPU while idle connections were held"
        assert p.alive()
    finally:
        _close_all(idle)
    wait_for(lambda: p.request("/v2/").status == 200, 5, "the proxy to serve again")
    logged = p.log_path.stat().st_size - log_before
    assert logged < 8000, p.log_text()[-3000:]
    assert "EMFILE" not in p.log_text()  # the cap kept descriptors free


def test_out_of_descriptors_accepting_pauses_quietly_and_resumes(
    ecr: EmulatedECR, proxy_factory: ProxyFactory
) -> None:
    """A cap above what the open-file limit allows (a misconfiguration): accept() fails with
    EMFILE. The listener waits instead of spinning, logs it once, counts it, and serves again as
    soon as descriptors free up."""
    p = _limited_proxy(ecr, proxy_factory, 256, "--max-connections", "5000")
    assert p.port is not None
    log_before = p.log_path.stat().st_size
    idle = _open_idle(p.port, 350 * TEST_WORKERS)  # more than every process can hold
    try:
        time.sleep(1.0)
        pids = _process_tree(p.pid)
        cpu_before, wall_before = _cpu_seconds(pids), time.monotonic()
        for _ in range(5):  # clients keep trying: each waits in a backlog, none makes the proxy spin
            _probe(p.url + "/v2/", timeout=0.5)
        time.sleep(max(0.0, 3 - (time.monotonic() - wall_before)))
        busy = (_cpu_seconds(pids) - cpu_before) / (time.monotonic() - wall_before)
        assert busy < 0.25, f"the proxy used {busy:.0%} of a CPU while out of descriptors"
        assert p.alive()
    finally:
        _close_all(idle)
    start = time.monotonic()
    wait_for(lambda: p.request("/v2/", timeout=2).status == 200, 5, "accepting to resume")
    assert time.monotonic() - start < 3
    text = p.log_text()[log_before:]
    assert 1 <= text.count("EMFILE") <= 2 * TEST_WORKERS, text[-3000:]
    assert p.log_path.stat().st_size - log_before < 8000
    errors = parse_metrics(p.metrics_text())
    assert sum(v for (name, labels), v in errors.items()
               if name == "ecrproxy_accept_errors_total" and dict(labels).get("error") == "EMFILE") >= 1


# ---------------------------------------------------------------- requests the parser refuses
def test_a_bare_lf_head_gets_400_at_once_and_unknown_methods_405(proxy: Proxy) -> None:
    assert proxy.port is not None
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\nHost: a\n\n")
        answer, took = _read_until_closed(s, 10)
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"code":"BAD_REQUEST"' in answer
    assert took < 2, "answered at once, not after the 30 s head timeout"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"BREW /v2/ HTTP/1.1\r\nHost: a\r\n\r\n")
        answer, _ = _read_until_closed(s, 10)
    assert answer.startswith(b"HTTP/1.1 405 ") and b'"code":"UNSUPPORTED"' in answer and b"\r\nAllow: " in answer


# ---------------------------------------------------------------- timers and half-close, end to end
@pytest.fixture(scope="module")
def quick(ecr: EmulatedECR, module_proxy_factory: ProxyFactory) -> Proxy:
    """A proxy with short client timers."""
    return module_proxy_factory(
        ecr, "--head-timeout", "1", "--keepalive-timeout", "2", "--min-body-rate", "1024",
        "--min-body-rate-window", "1", "--idle-timeout", "3",
    )


def test_each_head_has_the_head_timeout_and_idle_connections_the_keepalive_one(quick: Proxy) -> None:
    assert quick.port is not None
    with socket.create_connection(("127.0.0.1", quick.port), timeout=10) as s:  # the first head
        s.sendall(b"GET /v2/ HTTP/1.1\r\n")
        answer, took = _read_until_closed(s, 10)
    assert answer.startswith(b"HTTP/1.1 408 ") and 0.8 < took < 2.5, (answer[:100], took)
    with socket.create_connection(("127.0.0.1", quick.port), timeout=10) as s:  # a later one
        s.sendall(_request())
        assert _read_response(s).startswith(b"HTTP/1.1 200 ")
        s.sendall(b"G")
        answer, took = _read_until_closed(s, 10)
    assert answer.startswith(b"HTTP/1.1 408 ") and 0.8 < took < 2.0, (answer[:100], took)
    with socket.create_connection(("127.0.0.1", quick.port), timeout=10) as s:  # between requests
        s.sendall(_request())
        assert _read_response(s).startswith(b"HTTP/1.1 200 ")
        answer, took = _read_until_closed(s, 10)
    assert answer == b"" and 1.8 < took < 3.5, took


def test_a_half_closed_client_gets_its_answer(quick: Proxy) -> None:
    assert quick.port is not None
    with socket.create_connection(("127.0.0.1", quick.port), timeout=10) as s:
        s.sendall(_request() + _request(path="/v2/nope/manifests/x"))
        s.shutdown(socket.SHUT_WR)
        answer, took = _read_until_closed(s, 10)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 2, answer[:300]
    assert took < 2


def _upload_location(proxy: Proxy, name: str) -> str:
    r = proxy.request(f"/v2/{name}/blobs/uploads/", "POST", headers={"Content-Length": "0"})
    assert r.status == 202, r
    return target_of(r.header("Location") or "")


def test_an_upload_trickling_below_the_minimum_rate_is_cut(quick: Proxy) -> None:
    assert quick.port is not None
    location = _upload_location(quick, "limits/trickle")
    with socket.create_connection(("127.0.0.1", quick.port), timeout=10) as s:
        s.sendall(f"PATCH {location} HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n"
                  "Content-Type: application/octet-stream\r\n\r\n".encode())
        start = time.monotonic()
        cut = False
        while time.monotonic() - start < 8:
            try:
                s.sendall(b"x" * 50)  # 250 bytes a second
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            readable, _, _ = select.select([s], [], [], 0.2)
            if readable:
                with contextlib.suppress(ConnectionResetError):
                    if s.recv(4096) == b"":
                        cut = True
                        break
                cut = True
                break
        assert cut, "a body at 250 B/s went on for 8 s under a 1 KiB/s minimum"
        assert time.monotonic() - start < 4


def test_a_download_read_below_the_minimum_rate_is_cut(quick: Proxy) -> None:
    data = os.urandom(24 * MIB)
    location = _upload_location(quick, "limits/slow-reader")
    digest = sha256_digest(data)
    sep = "&" if "?" in location else "?"
    put = quick.request(f"{location}{sep}digest={urllib.parse.quote(digest)}", "PUT", body=data,
                        headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert put.status == 201, put
    assert quick.port is not None
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        s.connect(("127.0.0.1", quick.port))
        s.sendall(_request(path=f"/v2/limits/slow-reader/blobs/{digest}"))
        time.sleep(4)  # read nothing: a second's window with nothing moved is too slow
        got, _ = _read_until_closed(s, 10)
    finally:
        s.close()
    assert len(got) < len(data), "the whole blob went to a client that did not read"
