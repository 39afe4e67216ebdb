"""--workers: metrics of several processes summed into one exposition; listener binding."""

import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ecr_twisted.observe.metrics import Metrics
from ecr_twisted.app.supervisor import ListenerError, bind_listener, merge_expositions


def exposition(requests: int, in_flight: int, expiry: float) -> bytes:
    registry = CollectorRegistry()
    m = Metrics(registry)
    for _ in range(requests):
        m.observe_request(b"GET", "blob", 200, 0.02, 0, 100)
    m.in_flight.set(in_flight)
    m.token_result("success", expiry)
    return generate_latest(registry)


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def test_merge_sums_counters_histograms_and_in_flight_and_keeps_the_latest_expiry() -> None:
    merged = samples(merge_expositions([exposition(3, 1, 1000.0), exposition(4, 2, 2000.0)]))
    key = (("method", "GET"), ("route", "blob"), ("status", "200"))
    assert merged[("ecrproxy_requests_total", key)] == 7
    assert merged[("ecrproxy_response_body_bytes_total", (("route", "blob"),))] == 700
    assert merged[("ecrproxy_request_duration_seconds_count", (("route", "blob"),))] == 7
    assert merged[("ecrproxy_request_duration_seconds_bucket", (("le", "0.025"), ("route", "blob")))] == 7
    assert merged[("ecrproxy_requests_in_flight", ())] == 3
    assert merged[("ecrproxy_token_expiry_timestamp_seconds", ())] == 2000.0
    assert merged[("ecrproxy_token_refresh_total", (("result", "success"),))] == 2


def test_bind_listener_forms() -> None:
    sock = bind_listener("tcp:0:interface=127.0.0.1")
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
        assert sock.get_inheritable()
    finally:
        sock.close()
    with pytest.raises(ListenerError, match="--workers needs"):
        bind_listener("systemd:domain=INET:index=0")
