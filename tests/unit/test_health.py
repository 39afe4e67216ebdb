"""/readyz per upstream (#13), and the single-upstream form kept for existing callers."""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
from prometheus_client import CollectorRegistry
from twisted.web.test.requesthelper import DummyRequest

from ecr_twisted.observe.health import UpstreamState, ops_site, readiness, token_detail


def readyz(
    ready: Callable[[], bool] = lambda: True,
    draining: bool = False,
    upstreams: Callable[[], Sequence[tuple[str, bool, bool, str]]] | None = None,
) -> tuple[int, bytes]:
    site = ops_site(CollectorRegistry(), ready, draining=lambda: draining, upstreams=upstreams)
    request = DummyRequest([b"readyz"])
    body = site.getResourceFor(request).render(request)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/plain"]
    return request.responseCode or 200, body


PROD_OK = UpstreamState("prod", True, False, "token valid 11h58m")
SHARED_NONE = UpstreamState("shared", False, True, "no token yet")


def test_every_upstream_is_reported_and_an_optional_one_does_not_hold_readiness() -> None:
    assert readyz(upstreams=lambda: [PROD_OK, SHARED_NONE]) == (
        200,
        b"ready\n"
        b"upstream prod: ready (token valid 11h58m)\n"
        b"upstream shared: not ready (no token yet) [optional]\n",
    )


def test_a_required_upstream_without_a_token_makes_the_process_unready() -> None:
    states = [("prod", False, False, "token expired"), ("dev", False, False, "no token yet"), SHARED_NONE]
    assert readyz(upstreams=lambda: states) == (
        503,
        b"not ready: upstream prod, dev not ready\n"
        b"upstream prod: not ready (token expired)\n"
        b"upstream dev: not ready (no token yet)\n"
        b"upstream shared: not ready (no token yet) [optional]\n",
    )


def test_draining_wins_and_the_upstreams_are_still_listed() -> None:
    assert readyz(draining=True, upstreams=lambda: [PROD_OK]) == (
        503,
        b"not ready: draining (the process is stopping)\nupstream prod: ready (token valid 11h58m)\n",
    )


def test_ready_false_with_every_upstream_ready_is_unready() -> None:
    assert readyz(lambda: False, upstreams=lambda: [PROD_OK]) == (
        503, b"not ready\nupstream prod: ready (token valid 11h58m)\n"
    )


def test_the_states_are_read_at_each_request() -> None:
    states = [UpstreamState("default", False, False, "no token yet")]
    assert readyz(upstreams=lambda: states)[0] == 503
    states[0] = UpstreamState("default", True, False, "")
    assert readyz(upstreams=lambda: states) == (200, b"ready\nupstream default: ready\n")


def test_without_upstreams_the_old_answers_stay() -> None:
    assert readyz(lambda: True) == (200, b"ready\n")
    assert readyz(lambda: False) == (503, b"not ready: no ECR token valid for at least 5 more minutes\n")
    assert readyz(lambda: False, draining=True) == (503, b"not ready: draining (the process is stopping)\n")


def test_readiness_is_a_pure_function() -> None:
    assert readiness([]) == (200, b"ready\n")
    assert readiness([], draining=True)[0] == 503


@pytest.mark.parametrize(
    ("expires_at", "detail"),
    [
        (None, "no token yet"),
        (1000.0, "token expired"),
        (999.0, "token expired"),
        (1042.0, "token valid 42s"),
        (1000.0 + 4 * 60 + 59, "token valid 4m"),
        (1000.0 + 11 * 3600 + 58 * 60 + 30, "token valid 11h58m"),
        (1000.0 + 3600 + 60, "token valid 1h01m"),
    ],
)
def test_token_detail(expires_at: float | None, detail: str) -> None:
    assert token_detail(expires_at, 1000.0) == detail
