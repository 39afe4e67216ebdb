"""--workers 2: two processes serve one port, one /metrics counts both, children live and die with the main;
each process listens on a socket of its own (SO_REUSEPORT) once it is ready, and no connection is refused
while a worker starts or restarts."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from proxy_harness import ProxyFactory, assert_layout_matches, http_request, pull_via, push_via

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.images import make_oci_layout


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "ecr_twisted.app.worker"], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 15.0, step: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_two_workers_serve_pull_and_push_and_share_metrics(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    p = proxy_factory(ecr, "--workers", "2")
    [child] = wait_for(lambda: children_of(p.pid))
    # both processes hold a token: one refresh each, summed in one scrape
    wait_for(lambda: p.metric_sum("ecrproxy_token_refresh_total", result="success") == 2)
    info = make_oci_layout(tmp_path / "src", [os.urandom(300_000), os.urandom(700_000)], "w1")
    push_via(p, info, "workers/app")
    pull_via(p, "workers/app", "w1", tmp_path / "dest")
    assert_layout_matches(tmp_path / "dest", "w1", info)
    for _ in range(40):
        assert p.request("/v2/").status == 200
    total = sum(v for (name, _), v in p.metrics().items() if name == "ecrproxy_requests_total")
    assert total >= 40 + 4  # every request of both processes is counted once
    # a worker that dies is replaced; when the main process stops, no child is left behind
    os.kill(child, signal.SIGKILL)
    [replacement] = wait_for(lambda: [c for c in children_of(p.pid) if c != child])
    assert p.request("/v2/").status == 200
    main_pid = p.pid
    p.stop()
    wait_for(lambda: not children_of(main_pid) and not _alive(replacement))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def sockets_of(port: int, pids: list[int], state: str = "0A") -> dict[int, int]:
    """How many TCP sockets with local port `port` in `state` (0A: listening, 01: established)
    each of `pids` holds (descriptors of one socket count once), from /proc (no tool needed)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = pathlib.Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == state and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    held = {}
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            links = []
        held[pid] = len({link for link in links if link.startswith("socket:[") and link[8:-1] in inodes})
    return held


class Hammer(threading.Thread):
    """GET /v2/ on a fresh connection, again and again, recording every outcome."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.outcomes: list[object] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.outcomes.append(http_request(self.url + "/v2/", timeout=10).status)
            except OSError as e:
                self.outcomes.append(repr(e))

    def stop(self) -> list[object]:
        self.done.set()
        self.join(15)
        return self.outcomes


def test_each_worker_listens_on_its_own_socket_and_none_is_refused_while_a_worker_starts(
    ecr: EmulatedECR, proxy_factory: ProxyFactory
) -> None:
    p = proxy_factory(ecr, "--workers", "2", wait="healthz")
    assert p.port is not None
    hammer = Hammer(p.url)
    hammer.start()  # while the child starts: it must not take connections before it serves
    [child] = wait_for(lambda: children_of(p.pid))
    wait_for(lambda: sockets_of(p.port or 0, [p.pid, child]) == {p.pid: 1, child: 1}, 30)
    time.sleep(0.5)
    outcomes = hammer.stop()
    assert outcomes and all(o == 200 for o in outcomes), [o for o in outcomes if o != 200][:5]
    # the kernel hashes fresh connections over both sockets
    spread = _connections_held(p.port, [p.pid, child])
    assert min(spread.values()) >= 4, spread
    # a worker that dies takes its socket with it; connections go to the main process meanwhile,
    # and its replacement joins only once it serves
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not _alive(child))
    hammer = Hammer(p.url)
    hammer.start()
    [replacement] = wait_for(lambda: [c for c in children_of(p.pid) if c != child])
    wait_for(lambda: sockets_of(p.port or 0, [p.pid, replacement]) == {p.pid: 1, replacement: 1}, 30)
    time.sleep(0.5)
    outcomes = hammer.stop()
    assert len(outcomes) > 10 and all(o == 200 for o in outcomes), [o for o in outcomes if o != 200][:5]


def _connections_held(port: int, pids: list[int], n: int = 32) -> dict[int, int]:
    """Open `n` connections at once; how many did each process accept?"""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    try:
        def all_held() -> dict[int, int]:
            held = sockets_of(port, pids, "01")
            return held if sum(held.values()) == n else {}

        return wait_for(all_held)
    finally:
        for s in socks:
            s.close()


def test_a_unix_socket_listener_is_still_shared_by_inheritance(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    path = tmp_path / "proxy.sock"
    p = proxy_factory(ecr, "--workers", "2", port_spec=f"unix:{path}")
    [child] = wait_for(lambda: children_of(p.pid))
    # one socket, held by both processes (no SO_REUSEPORT for unix sockets)
    inode = os.stat(path).st_ino
    wait_for(lambda: all(_holds_unix_listener(pid, path) for pid in (p.pid, child)))
    for _ in range(20):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert os.stat(path).st_ino == inode


def _holds_unix_listener(pid: int, path: pathlib.Path) -> bool:
    """Does `pid` hold the listening unix socket bound at `path` (/proc/net/unix: flags 00010000 = listening)?"""
    inodes = {
        fields[6]
        for fields in (row.split() for row in pathlib.Path("/proc/net/unix").read_text().splitlines()[1:])
        if len(fields) >= 8 and fields[7] == str(path) and fields[3] == "00010000"
    }
    links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    return any(f"socket:[{inode}]" in links for inode in inodes)
