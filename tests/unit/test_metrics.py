"""The `upstream` label (#13): bounded to the configured names, "default" for callers that name none."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from ecr_twisted.observe.metrics import DEFAULT_UPSTREAM, Metrics


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_callers_naming_no_upstream_count_under_default() -> None:
    r = CollectorRegistry()
    m = Metrics(r)
    m.observe_upstream("registry", 0.02)
    m.upstream_errors.labels("timeout", DEFAULT_UPSTREAM).inc()
    m.token_result("success", 1234.0)
    assert DEFAULT_UPSTREAM == "default"
    assert sample(r, "ecrproxy_upstream_response_seconds_count", target="registry", upstream="default") == 1
    assert sample(r, "ecrproxy_upstream_errors_total", kind="timeout", upstream="default") == 1
    assert sample(r, "ecrproxy_token_refresh_total", result="success", upstream="default") == 1
    assert sample(r, "ecrproxy_token_expiry_timestamp_seconds", upstream="default") == 1234.0


def test_each_upstream_has_its_own_series() -> None:
    r = CollectorRegistry()
    m = Metrics(r, upstreams=("prod", "shared"))
    m.observe_upstream("storage", 0.5, "shared")
    m.observe_upstream("storage", 0.5, upstream="shared")
    m.upstream_errors.labels("unreachable", "prod").inc()
    m.upstream_errors.labels("unreachable", upstream="prod").inc()
    m.token_result("failure", None, "shared")
    m.token_result("success", 99.0, upstream="prod")
    assert sample(r, "ecrproxy_upstream_response_seconds_count", target="storage", upstream="shared") == 2
    assert sample(r, "ecrproxy_upstream_errors_total", kind="unreachable", upstream="prod") == 2
    assert sample(r, "ecrproxy_upstream_errors_total", kind="unreachable", upstream="shared") is None
    assert sample(r, "ecrproxy_token_refresh_total", result="failure", upstream="shared") == 1
    assert sample(r, "ecrproxy_token_expiry_timestamp_seconds", upstream="prod") == 99.0
    # a failure leaves the expiry as it was; every configured upstream shows one from the start
    assert sample(r, "ecrproxy_token_expiry_timestamp_seconds", upstream="shared") == 0.0


def test_the_expiry_gauge_shows_zero_before_any_token() -> None:
    r = CollectorRegistry()
    Metrics(r, upstreams=("a", "b"))
    text = generate_latest(r).decode()
    assert 'ecrproxy_token_expiry_timestamp_seconds{upstream="a"} 0.0' in text
    assert 'ecrproxy_token_expiry_timestamp_seconds{upstream="b"} 0.0' in text
    assert 'upstream="default"' not in text


@pytest.mark.parametrize("call", ["latency", "errors", "refresh"])
def test_an_unconfigured_upstream_is_a_wiring_error_not_a_new_series(call: str) -> None:
    r = CollectorRegistry()
    m = Metrics(r, upstreams=("prod",))
    with pytest.raises(ValueError, match="'evil' is not configured"):
        if call == "latency":
            m.observe_upstream("registry", 1.0, "evil")
        elif call == "errors":
            m.upstream_errors.labels("closed", "evil")
        else:
            m.token_result("success", 1.0, "evil")
    assert 'upstream="evil"' not in generate_latest(r).decode()


def test_an_upstream_error_always_names_its_upstream() -> None:
    """The handler names the leg's upstream; a call without one is a wiring error, not "default"."""
    m = Metrics(CollectorRegistry(), upstreams=("prod",))
    with pytest.raises(TypeError):
        m.upstream_errors.labels("timeout")  # type: ignore[call-arg]


def test_label_children_are_looked_up_once() -> None:
    m = Metrics(CollectorRegistry(), upstreams=("prod",))
    assert m.upstream_errors.labels("busy", "prod") is m.upstream_errors.labels("busy", "prod")
    m.observe_upstream("registry", 0.1, "prod")
    child = m._upstream[("registry", "prod")]
    m.observe_upstream("registry", 0.1, "prod")
    assert m._upstream == {("registry", "prod"): child}
