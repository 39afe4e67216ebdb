"""The operator's listener: /metrics, /healthz and /readyz, apart from registry traffic.

With several upstreams (#13) /readyz reports each one on its own line, from a callable giving
`UpstreamState`s (so this module knows nothing of token keepers), and is ready when every
required (not optional) upstream is, the process is not draining and `ready()` holds.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ecr_twisted.observe.metrics import merge_expositions

__all__ = ["ops_site", "UpstreamState", "readiness", "token_detail"]


class UpstreamState(NamedTuple):
    """One upstream as /readyz shows it; `detail` (e.g. "token valid 11h58m") must carry no secret."""

    name: str
    ready: bool
    optional: bool
    detail: str


def token_detail(expires_at: float | None, now: float) -> str:
    """How an upstream's token looks, for `UpstreamState.detail`: "no token yet", "token expired",
    "token valid 11h58m"."""
    if expires_at is None:
        return "no token yet"
    left = int(expires_at - now)
    if left <= 0:
        return "token expired"
    if left < 60:
        return f"token valid {left}s"
    hours, minutes = divmod(left // 60, 60)
    return f"token valid {hours}h{minutes:02d}m" if hours else f"token valid {minutes}m"


def readiness(
    upstreams: Sequence[tuple[str, bool, bool, str]], draining: bool = False, ready: bool = True
) -> tuple[int, bytes]:
    """(status, body) of /readyz: 200 when `ready`, not `draining` and every required upstream is
    ready; the first line says so (or why not), then one line per upstream."""
    states = [UpstreamState(*u) for u in upstreams]
    missing = [u.name for u in states if not u.ready and not u.optional]
    if draining:
        first = b"not ready: draining (the process is stopping)"
    elif missing:
        first = ("not ready: upstream " + ", ".join(missing) + " not ready").encode("utf-8")
    elif not ready:
        first = b"not ready"
    else:
        first = b"ready"
    lines = [first]
    for u in states:
        line = f"upstream {u.name}: {'ready' if u.ready else 'not ready'}"
        if u.detail:
            line += f" ({u.detail})"
        if u.optional:
            line += " [optional]"
        lines.append(line.encode("utf-8"))
    status = 200 if first == b"ready" else 503
    return status, b"\n".join(lines) + b"\n"


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[Any], bytes]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Any) -> bytes:
        return self._render(request)

    def render_HEAD(self, request: Any) -> bytes:
        return self._render(request)


def ops_site(
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    others: Callable[[], Deferred[list[bytes]]] | None = None,
    draining: Callable[[], bool] = lambda: False,
    upstreams: Callable[[], Sequence[tuple[str, bool, bool, str]]] | None = None,
) -> Site:
    """`others` gives the expositions of the other worker processes, summed into /metrics;
    `draining` says the process is stopping (then /readyz says so); `upstreams` gives each
    upstream's state (name, ready, optional, detail) for /readyz (see `readiness`); without it
    /readyz answers from `ready` alone, as before upstream lists."""

    def metrics(request: Any) -> Any:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        if others is None:
            return generate_latest(registry)
        def write(texts: list[bytes]) -> None:
            request.write(merge_expositions([generate_latest(registry), *texts]))
            request.finish()

        def failed(reason: Any) -> None:
            request.setResponseCode(500)
            request.write(b"could not gather worker metrics\n")
            request.finish()

        others().addCallbacks(write, failed)
        return NOT_DONE_YET

    def healthz(request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return b"ok\n"

    def readyz(request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        if upstreams is not None:
            status, body = readiness(upstreams(), draining(), ready())
            request.setResponseCode(status)
            return body
        if ready():
            return b"ready\n"
        request.setResponseCode(503)
        if draining():
            return b"not ready: draining (the process is stopping)\n"
        return b"not ready: no ECR token valid for at least 5 more minutes\n"

    root = Resource()
    root.putChild(b"metrics", _Leaf(metrics))
    root.putChild(b"healthz", _Leaf(healthz))
    root.putChild(b"readyz", _Leaf(readyz))
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]  # scrapes every few seconds would drown the access log
    site.displayTracebacks = False
    site.noisy = False
    return site
