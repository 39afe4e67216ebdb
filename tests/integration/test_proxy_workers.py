"""--workers 2: two processes serve one port, one /metrics counts both, children live and die with the main."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

from proxy_harness import ProxyFactory, assert_layout_matches, pull_via, push_via

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
