"""The operator's listener: /metrics, /healthz and /readyz, apart from registry traffic."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from ecr_twisted.observe.metrics import merge_expositions

__all__ = ["ops_site"]


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
) -> Site:
    """`others` gives the expositions of the other worker processes, summed into /metrics;
    `draining` says the process is stopping (then /readyz says so)."""

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
