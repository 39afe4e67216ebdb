"""The operator's listener of a running proxy: /metrics after real traffic, /healthz, /readyz."""

from __future__ import annotations

import os
import time

import pytest
from proxy_harness import (
    MANIFEST_ACCEPT,
    Proxy,
    ProxyFactory,
    assert_no_secret,
    free_port,
    metric,
    metric_sum,
    parse_metrics,
    push_direct,
    restored_moto_token,
    wait_for,
)

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.images import ImageInfo, make_oci_layout


@pytest.fixture(scope="module")
def image(ecr: EmulatedECR, tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    info = make_oci_layout(tmp_path_factory.mktemp("ops-img"), [os.urandom(120_000), os.urandom(3_000)], "m1")
    push_direct(ecr, info, "ops/app")
    return info


@pytest.fixture(scope="module")
def ops_proxy(ecr: EmulatedECR, module_proxy_factory: ProxyFactory) -> Proxy:
    """A proxy of its own, so the counters hold only this module's traffic."""
    return module_proxy_factory(ecr)


def test_metrics_after_traffic(ops_proxy: Proxy, ecr: EmulatedECR, image: ImageInfo) -> None:
    proxy = ops_proxy
    n = 5
    for _ in range(n):
        r = proxy.request("/v2/ops/app/manifests/m1", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status == 200 and r.body == image.manifest
    blob = image.layer_digests[0]
    r = proxy.request(f"/v2/ops/app/blobs/{blob}")
    assert r.status == 200 and r.body == image.blob_path(blob).read_bytes()
    assert proxy.request("/v2/ops/app/manifests/nope", headers={"Accept": MANIFEST_ACCEPT}).status == 404
    assert proxy.request("/nope").status == 404

    def settled() -> dict | None:
        s = proxy.metrics()
        return s if metric(s, "ecrproxy_requests_in_flight") == 0 else None

    samples = wait_for(settled, 5, "ecrproxy_requests_in_flight 0")
    text = proxy.metrics_text()
    assert 'ecrproxy_requests_total{method="GET",route="manifest",status="200"}' in text
    assert metric(samples, "ecrproxy_requests_total", method="GET", route="manifest", status="200") == n
    assert metric(samples, "ecrproxy_requests_total", method="GET", route="manifest", status="404") == 1
    assert metric(samples, "ecrproxy_requests_total", method="GET", route="blob", status="200") == 1
    assert metric(samples, "ecrproxy_requests_total", method="GET", route="other", status="404") == 1
    assert "ecrproxy_request_duration_seconds_bucket" in text
    assert metric(samples, "ecrproxy_request_duration_seconds_count", route="manifest") == n + 1
    assert metric(samples, "ecrproxy_request_duration_seconds_bucket", route="manifest", le="+Inf") == n + 1
    manifest_bytes = metric(samples, "ecrproxy_response_body_bytes_total", route="manifest") or 0
    assert manifest_bytes >= n * len(image.manifest)
    assert (metric(samples, "ecrproxy_response_body_bytes_total", route="blob") or 0) >= image.layer_sizes[0]
    assert metric(samples, "ecrproxy_requests_in_flight") == 0
    assert "ecrproxy_requests_in_flight 0.0" in text or "ecrproxy_requests_in_flight 0\n" in text
    expiry = metric_sum(samples, "ecrproxy_token_expiry_timestamp_seconds")
    assert expiry == pytest.approx(ecr.moto_expires_at, abs=1.0)
    assert metric_sum(samples, "ecrproxy_token_refresh_total", result="success") >= 1
    assert metric_sum(samples, "ecrproxy_token_refresh_total", result="failure") == 0
    assert_no_secret(text, [ecr.password, ecr.moto_password], "/metrics")
    assert "_state" not in text and "X-Amz" not in text


def test_healthz_and_readyz(ops_proxy: Proxy) -> None:
    h = ops_proxy.ops("/healthz")
    assert h.status == 200 and h.body == b"ok\n"
    r = ops_proxy.ops("/readyz")
    assert r.status == 200 and r.body.startswith(b"ready")
    assert ops_proxy.ops("/readyz", "HEAD").status == 200
    assert ops_proxy.ops("/nope").status == 404


def test_readyz_503_when_token_expires_soon(
    ecr: EmulatedECR, image: ImageInfo, proxy_factory: ProxyFactory
) -> None:
    with restored_moto_token(ecr):
        expires = time.time() + 120
        ecr.set_moto_token(ecr.password, expires)  # same password: the token works, it is just short-lived
        p = proxy_factory(ecr, wait="token")
        assert p.ops("/healthz").status == 200
        r = p.ops("/readyz")
        assert r.status == 503, r.body
        assert b"not ready" in r.body
        assert p.metric_sum("ecrproxy_token_expiry_timestamp_seconds") == pytest.approx(expires, abs=1.0)
        # not ready for the load balancer, yet the token still serves the requests that do arrive
        m = p.request("/v2/ops/app/manifests/m1", headers={"Accept": MANIFEST_ACCEPT})
        assert m.status == 200 and m.body == image.manifest
    # once moto hands out a 12-hour token again, a fresh proxy is ready
    p2 = proxy_factory(ecr, wait="ready")
    assert p2.ops("/readyz").status == 200


def test_readyz_503_without_token(ecr: EmulatedECR, proxy_factory: ProxyFactory) -> None:
    """No reachable ECR API: the proxy runs (healthz) but is not ready and answers 503 JSON."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    p = proxy_factory(ecr, "--ecr-endpoint-url", dead, env_drop=["AWS_ENDPOINT_URL_ECR"], wait="healthz")
    assert p.ops("/readyz").status == 503
    r = p.request("/v2/")
    assert r.status == 503, r.body
    assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
    assert r.header("Retry-After") is not None
    samples = parse_metrics(p.metrics_text())
    assert metric_sum(samples, "ecrproxy_token_refresh_total", result="success") == 0
