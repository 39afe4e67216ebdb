"""Per-request cost of the proxy through the test Harness (no sockets), for comparing access-log changes.

    PYTHONPATH=. .venv/bin/python bench/access_log_cost.py [--format text|json] [--requests N] [--runs R]

Each request: a client connection, `GET /v2/team/app/manifests/1.0`, forwarded and answered by an
in-memory upstream (200, 2-byte body), logged. Every log goes to /dev/null through a real file
(twisted.logger's observer for its events, the access log's file for access lines), so what is
measured is formatting and writing, not a terminal. Prints the median microseconds per request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from twisted.logger import globalLogBeginner, textFileLogObserver

from ecr_twisted.testing.doubles import Harness


def run(n: int, fmt: str) -> float:
    h = Harness()
    sink = open(os.devnull, "w")
    if hasattr(h.handler, "access_log"):  # builds without it log through twisted.logger
        from ecr_twisted.observe.accesslog import AccessLog

        h.handler.access_log = AccessLog(fmt, sink)
    req = b"GET /v2/team/app/manifests/1.0 HTTP/1.1\r\nHost: h\r\nUser-Agent: bench\r\n\r\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-amzn-RequestId: r-1\r\n\r\n{}"
    for _ in range(200):  # warm up: the pool's connection, label children
        proto, _t = h.client()
        proto.dataReceived(req)
        h.upstreams.last()[0].dataReceived(answer)
    t0 = time.perf_counter()
    for _ in range(n):
        proto, _t = h.client()
        proto.dataReceived(req)
        h.upstreams.last()[0].dataReceived(answer)
    return (time.perf_counter() - t0) / n * 1e6


def isolated(n: int, fmt: str) -> tuple[float, float]:
    """The logging step alone, same values: the old `Logger.info` call (twisted.logger's event,
    publisher and text observer) against building an AccessRecord and writing it."""
    from twisted.logger import Logger

    from ecr_twisted.observe.accesslog import AccessLog, AccessRecord
    from ecr_twisted.registry.handler import redact_target

    log = Logger()
    target = b"/v2/team/app/manifests/1.0"
    t0 = time.perf_counter()
    for _ in range(n):
        log.info(
            "{method} {target} {status} {bytes_out} {duration:.3f}s upstream={upstream}{cache}{error}",
            method=b"GET".decode("ascii"), target=redact_target(target), status=200, bytes_out=2,
            duration=0.0123, upstream=200, cache="", error="",
        )
    old = (time.perf_counter() - t0) / n * 1e6
    out = AccessLog(fmt, open(os.devnull, "w"))
    t0 = time.perf_counter()
    for _ in range(n):
        out.write(AccessRecord(
            time=time.time(), client="127.0.0.1", user="anonymous", method=b"GET".decode("latin-1"),
            target=redact_target(target), route="manifest", status=200, bytes_in=0, bytes_out=2, duration=0.0123,
            request_id="0a1b2c3d4e5f-1f", repository="team/app", reference="1.0", upstream_status=200,
            upstream_request_id="r-1", cache=None, user_agent=b"bench".decode("latin-1"), reason=None, error=None,
        ))
    new = (time.perf_counter() - t0) / n * 1e6
    return old, new


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--format", default="text")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--isolated", action="store_true", help="time the logging step alone, old way and new")
    a = p.parse_args()
    globalLogBeginner.beginLoggingTo([textFileLogObserver(open(os.devnull, "w"))], redirectStandardIO=False)
    if a.isolated:
        pairs = [isolated(a.requests * 4, a.format) for _ in range(a.runs)]
        old = statistics.median(o for o, _ in pairs)
        new = statistics.median(n for _, n in pairs)
        print(f"logging step: twisted.logger {old:.1f} us, access log ({a.format}) {new:.1f} us (median of {a.runs})")
        return
    results = [run(a.requests, a.format) for _ in range(a.runs)]
    print(f"{statistics.median(results):.1f} us/request (median of {a.runs}; min {min(results):.1f})")


if __name__ == "__main__":
    main()
