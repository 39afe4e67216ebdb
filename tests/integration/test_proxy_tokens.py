"""ECR token rotation under a running proxy: no restart, one shared refresh, secrets never shown.

Uses an emulator of its own: these tests change what the registry accepts.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import pathlib
import time
from collections.abc import Iterator

import pytest
from proxy_harness import (
    TEST_WORKERS,
    MANIFEST_ACCEPT,
    Proxy,
    ProxyFactory,
    Response,
    assert_layout_matches,
    assert_no_secret,
    metric_sum,
    pull_via,
    push_direct,
    push_via,
    wait_for,
)

from ecr_twisted.testing.emulator import EmulatedECR, random_password
from ecr_twisted.testing.images import ImageInfo, make_oci_layout, make_tar_layer

TWELVE_HOURS = 12 * 3600
REPO = "rotate/app"


@pytest.fixture(scope="module")
def rot_ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    with EmulatedECR(tmp_path_factory.mktemp("ecr-rotation")) as emu:
        yield emu


@pytest.fixture(scope="module")
def image(rot_ecr: EmulatedECR, tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    layers = [make_tar_layer({"a": os.urandom(10_000)}), os.urandom(400_000), os.urandom(1_100_000)]
    info = make_oci_layout(tmp_path_factory.mktemp("rot-img"), layers, "r1")
    push_direct(rot_ecr, info, REPO)
    return info


# with ECRTEST_WORKERS=N every proxy runs N processes; refreshes are single-flight per process
WORKERS = TEST_WORKERS


def _refreshes(p: Proxy) -> tuple[float, float]:
    s = p.metrics()
    return (
        metric_sum(s, "ecrproxy_token_refresh_total", result="success"),
        metric_sum(s, "ecrproxy_token_refresh_total", result="failure"),
    )


def _get_all(p: Proxy, info: ImageInfo) -> list[tuple[str, Response]]:
    out = [
        ("manifest-tag", p.request(f"/v2/{REPO}/manifests/{info.tag}", headers={"Accept": MANIFEST_ACCEPT})),
        ("manifest-digest",
         p.request(f"/v2/{REPO}/manifests/{info.manifest_digest}", headers={"Accept": MANIFEST_ACCEPT})),
    ]
    out += [(d, p.request(f"/v2/{REPO}/blobs/{d}")) for d in info.blob_digests]
    return out


def _assert_all_ok(results: list[tuple[str, Response]], info: ImageInfo) -> None:
    for what, r in results:
        assert r.status == 200, (what, r.status, r.body[:300])
        assert r.header("WWW-Authenticate") is None
        if what.startswith("manifest"):
            assert r.body == info.manifest and r.header("Docker-Content-Digest") == info.manifest_digest
        else:
            assert r.body == info.blob_path(what).read_bytes() and r.header("Docker-Content-Digest") == what


def test_rotation_without_restart(
    rot_ecr: EmulatedECR, image: ImageInfo, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    ecr = rot_ecr
    p = proxy_factory(ecr)
    pid = p.pid
    pull_via(p, REPO, image.tag, tmp_path / "before")
    assert_layout_matches(tmp_path / "before", image.tag, image)
    ok0, failed0 = _refreshes(p)
    assert ok0 == WORKERS  # each serving process holds its own token (the harness waits for all)
    passwords = [ecr.password]

    # rotate: the registry now refuses the proxy's token; moto hands out the new one
    new = random_password()
    new_expiry = time.time() + TWELVE_HOURS
    ecr.set_token(new, new_expiry)
    passwords.append(new)

    # a real client first: skopeo's push starts with GET /v2/, which meets the 401 and the refresh.
    # With --workers N each process refreshes on its own first 401, and an upload body that already
    # went upstream cannot be replayed (README, Tokens): a push whose PATCH lands on a process that has
    # not met the 401 yet fails once. So with N > 1, bodyless requests meet every process first.
    if WORKERS > 1:
        wait_for(lambda: p.request("/v2/").status == 200 and _refreshes(p)[0] >= ok0 + WORKERS, 30,
                 "every worker to refresh its token")
    extra = make_oci_layout(tmp_path / "extra", [os.urandom(70_000)], "r2")
    push_via(p, extra, REPO)
    for _ in range(3):
        _assert_all_ok(_get_all(p, image), image)
    pull_via(p, REPO, "r2", tmp_path / "after")
    assert_layout_matches(tmp_path / "after", "r2", extra)
    ok1, failed1 = _refreshes(p)
    assert failed1 == failed0 and ok0 + 1 <= ok1 <= ok0 + WORKERS, "one refresh per process for the whole rotation"
    assert p.metric_sum("ecrproxy_token_expiry_timestamp_seconds") == pytest.approx(new_expiry, abs=1.0)

    assert p.alive() and p.pid == pid, "the proxy was not restarted"
    assert_no_secret(p.log_text(), passwords, "proxy log")
    assert_no_secret(p.metrics_text(), passwords, "/metrics")


def test_concurrent_requests_share_one_refresh(
    rot_ecr: EmulatedECR, image: ImageInfo, proxy_factory: ProxyFactory
) -> None:
    ecr = rot_ecr
    p = proxy_factory(ecr)
    _assert_all_ok(_get_all(p, image), image)
    ok0, failed0 = _refreshes(p)
    ecr.set_token(random_password(), time.time() + TWELVE_HOURS)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: _get_all(p, image), range(8)))
    for results in batches:
        _assert_all_ok(results, image)
    ok1, failed1 = _refreshes(p)
    assert failed1 == failed0 and ok0 + 1 <= ok1 <= ok0 + WORKERS, (
        "concurrent requests must share one GetAuthorizationToken call per process"
    )


def test_registry_only_password_change_fails_fast_with_json(
    rot_ecr: EmulatedECR, image: ImageInfo, proxy_factory: ProxyFactory
) -> None:
    ecr = rot_ecr
    p = proxy_factory(ecr)
    _assert_all_ok(_get_all(p, image), image)
    handed_out = ecr.moto_password
    registry_only = "registry-only-" + random_password(200)
    ecr.set_registry_password(registry_only)  # moto still hands out the old token
    secrets = [handed_out, registry_only]
    try:
        requests = [
            ("GET", f"/v2/{REPO}/manifests/{image.tag}", {"Accept": MANIFEST_ACCEPT}),
            ("HEAD", f"/v2/{REPO}/manifests/{image.tag}", {"Accept": MANIFEST_ACCEPT}),
            ("GET", f"/v2/{REPO}/blobs/{image.layer_digests[1]}", {}),
            ("GET", "/v2/", {}),
            ("POST", f"/v2/{REPO}/blobs/uploads/", {"Content-Length": "0"}),
        ]
        for method, path, headers in requests:
            started = time.monotonic()
            r = p.request(path, method, headers=headers, timeout=20)
            elapsed = time.monotonic() - started
            assert elapsed < 10, f"{method} {path} took {elapsed:.1f}s"
            assert r.status == 502, (method, path, r.status, r.body)
            assert r.header("WWW-Authenticate") is None
            assert (r.header("Content-Type") or "").startswith("application/json")
            if method == "HEAD":
                assert r.body == b""
                continue
            err = r.json()["errors"][0]
            assert err["code"] == "UNAUTHORIZED", r.body
            assert_no_secret(r.body, secrets, f"error body of {method} {path}")
        log = p.log_text()
        assert "after a token refresh" in log  # the operator is told what happened ...
        assert_no_secret(log, secrets, "proxy log")  # ... without the secret
        assert_no_secret(p.metrics_text(), secrets, "/metrics")
        assert p.metric("ecrproxy_requests_total", method="GET", route="manifest", status="502") == 1
    finally:
        # the registry accepts the handed-out token again: the same proxy recovers, no restart
        # (a rotation right now would wait out the proxy's 30 s limit on forced refreshes)
        ecr.set_registry_password(handed_out)
    _assert_all_ok(_get_all(p, image), image)


def test_persistent_rejection_does_not_call_ecr_api_per_request(
    rot_ecr: EmulatedECR, image: ImageInfo, proxy_factory: ProxyFactory
) -> None:
    """GetAuthorizationToken is throttled account-wide (20 TPS): a registry that keeps refusing
    (a 403 for a repository the IAM principal may not read looks the same) must not turn every
    client request into an ECR API call. Allow a handful of refreshes for 30 requests.

    (Failed before 0d834c9: one call per refused request. Forced refreshes are now limited
    to one per 30 s.)
    """
    ecr = rot_ecr
    p = proxy_factory(ecr)
    ok0, failed0 = _refreshes(p)
    ecr.set_registry_password("refuse-" + random_password(200))
    try:
        for _ in range(30):
            r = p.request(f"/v2/{REPO}/manifests/{image.tag}", headers={"Accept": MANIFEST_ACCEPT}, timeout=20)
            assert r.status == 502 and r.json()["errors"][0]["code"] == "UNAUTHORIZED"
        ok1, failed1 = _refreshes(p)
        calls = (ok1 - ok0) + (failed1 - failed0)
        print(f"GetAuthorizationToken calls for 30 refused requests: {calls}")
        assert calls <= 5, f"{calls} GetAuthorizationToken calls for 30 refused requests"
    finally:
        ecr.set_registry_password(ecr.moto_password)


def test_a_request_sent_the_moment_the_port_opens_succeeds(
    rot_ecr: EmulatedECR, image: ImageInfo, proxy_factory: ProxyFactory
) -> None:
    """Clients started together with the proxy (a CI job, a pod and its sidecar) wait for the first
    token instead of getting 503 for the half second its fetch takes."""
    p = proxy_factory(rot_ecr, wait=None)
    assert p.port is not None
    deadline = time.monotonic() + 15
    while True:
        assert p.alive(), p.log_tail()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=30)
            conn.connect()
            break
        except OSError:
            assert time.monotonic() < deadline, "the port never opened"
            time.sleep(0.005)  # polling a real process's port: there is no clock to advance
    try:
        conn.request("GET", f"/v2/{REPO}/manifests/{image.tag}", headers={"Accept": MANIFEST_ACCEPT})
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    assert r.status == 200, (r.status, body)
    assert r.getheader("Docker-Content-Digest") == image.manifest_digest
    assert body == image.manifest
