"""Real clients through a real proxy process: skopeo push + pull (stream and redirect modes), podman pull.

Every check compares bytes and digests with what the test built and pushed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pathlib
import urllib.parse
from collections.abc import Iterator

import pytest
from proxy_harness import (
    MANIFEST_ACCEPT,
    Podman,
    Proxy,
    ProxyFactory,
    RecordingRelay,
    assert_layout_matches,
    http_request,
    pull_via,
    push_direct,
    push_via,
    raw_exchange,
)

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.images import OCI_MANIFEST, ImageInfo, make_oci_layout, make_tar_layer


def _layers(seed: str) -> list[bytes]:
    """Three real tar layers plus one raw random layer, ~4.5 MB in all."""
    return [
        make_tar_layer({"etc/os-release": f"ID=ecr-twisted-{seed}\n".encode(), "bin/tool": os.urandom(300_000)}),
        make_tar_layer({"usr/lib/data.bin": os.urandom(1_500_000)}),
        make_tar_layer({"srv/blob": os.urandom(2_700_000 + 123)}),
    ]


@pytest.fixture(scope="module")
def relay(ecr: EmulatedECR) -> Iterator[RecordingRelay]:
    """Sits between the redirect-mode proxy and the registry to record what the registry answered."""
    r = RecordingRelay(int(ecr.upstream_url.rsplit(":", 1)[1]))
    yield r
    r.close()


@pytest.fixture(scope="module")
def redirect_proxy(ecr: EmulatedECR, relay: RecordingRelay, module_proxy_factory: ProxyFactory) -> Proxy:
    """Redirect mode, ECR API given by --ecr-endpoint-url (AWS_ENDPOINT_URL_ECR removed from its env)."""
    p = module_proxy_factory(ecr, blob_mode="redirect", upstream=relay.url, ecr_endpoint_flag=True)
    assert "AWS_ENDPOINT_URL_ECR" not in p.env and "--ecr-endpoint-url" in p.args
    return p


def _blob_get_checks_stream(proxy: Proxy, repo: str, info: ImageInfo) -> None:
    for digest in info.blob_digests:
        expected = info.blob_path(digest).read_bytes()
        r = proxy.request(f"/v2/{repo}/blobs/{digest}")
        assert r.status == 200, (digest, r.status, r.body[:300])
        assert r.body == expected
        assert "sha256:" + hashlib.sha256(r.body).hexdigest() == digest
        assert r.header("Docker-Content-Digest") == digest
        assert int(r.header("Content-Length") or -1) == len(expected)
        assert r.header("Location") is None
        assert not any(h.lower().startswith("x-amz-") for h in r.headers.keys()), r.headers.keys()

        head = proxy.request(f"/v2/{repo}/blobs/{digest}", "HEAD")
        assert head.status == 200 and head.body == b""
        assert int(head.header("Content-Length") or -1) == len(expected)
        assert head.header("Docker-Content-Digest") == digest

    # HEAD must carry no body on the wire either: read the raw bytes until the proxy closes
    digest = info.layer_digests[-1]
    assert proxy.port is not None
    raw = raw_exchange(
        proxy.port,
        f"HEAD /v2/{repo}/blobs/{digest} HTTP/1.1\r\nHost: {proxy.host}\r\nConnection: close\r\n\r\n".encode(),
    )
    head_bytes, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep and head_bytes.startswith(b"HTTP/1.1 200 "), raw[:300]
    assert rest == b"", f"HEAD answered with {len(rest)} body bytes"
    assert f"content-length: {info.blob_path(digest).stat().st_size}".encode() in head_bytes.lower()


def test_skopeo_roundtrip_stream_mode(proxy: Proxy, ecr: EmulatedECR, tmp_path: pathlib.Path) -> None:
    repo = "roundtrip/stream"
    info = make_oci_layout(tmp_path / "src", _layers("stream") + [os.urandom(600_000)], "v1")
    assert len(info.layer_digests) >= 3 and sum(info.layer_sizes) > 4_000_000
    push_via(proxy, info, repo)
    # what the registry holds now is exactly what was pushed (checked without the proxy)
    direct = http_request(f"{ecr.upstream_url}/v2/{repo}/manifests/v1", password=ecr.password,
                          headers={"Accept": MANIFEST_ACCEPT})
    assert direct.status == 200 and direct.body == info.manifest
    assert direct.header("Docker-Content-Digest") == info.manifest_digest

    dest = tmp_path / "pulled"
    pull_via(proxy, repo, "v1", dest)
    assert_layout_matches(dest, "v1", info)

    m = proxy.request(f"/v2/{repo}/manifests/v1", headers={"Accept": MANIFEST_ACCEPT})
    assert m.status == 200 and m.body == info.manifest
    assert m.header("Docker-Content-Digest") == info.manifest_digest
    assert m.header("Content-Type") == OCI_MANIFEST
    _blob_get_checks_stream(proxy, repo, info)
    assert proxy.alive()


def test_skopeo_roundtrip_redirect_mode(
    redirect_proxy: Proxy, relay: RecordingRelay, ecr: EmulatedECR, tmp_path: pathlib.Path
) -> None:
    proxy = redirect_proxy
    repo = "roundtrip/redirect"
    info = make_oci_layout(tmp_path / "src", _layers("redirect"), "v2")
    push_via(proxy, info, repo)
    dest = tmp_path / "pulled"
    pull_via(proxy, repo, "v2", dest)
    assert_layout_matches(dest, "v2", info)

    moto_netloc = ecr.s3_endpoint_url.split("://", 1)[1]  # localhost:<motoport>
    for digest in info.blob_digests:
        for method in ("GET", "HEAD"):
            r = proxy.request(f"/v2/{repo}/blobs/{digest}", method)
            assert r.status == 307, (method, digest, r.status, r.body[:300])
            location = r.header("Location")
            assert location is not None
            loc = urllib.parse.urlsplit(location)
            assert loc.scheme == "http" and loc.netloc == moto_netloc, location
            assert "X-Amz-Signature=" in loc.query
            # byte for byte what the registry sent (recorded between proxy and registry)
            # (identical presigned URLs within one second are fine: same signature inputs)
            sent = relay.header_values("Location")
            assert location.encode("latin-1") in sent, "the S3 Location was changed by the proxy"
        # the presigned URL works for a client without the proxy's (or any) credentials
        assert location is not None
        s3 = http_request(location)
        assert s3.status == 200
        assert s3.body == info.blob_path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(s3.body).hexdigest() == digest


@pytest.mark.parametrize("mode", ["stream", "redirect"])
def test_podman_pull(
    mode: str, proxy: Proxy, redirect_proxy: Proxy, ecr: EmulatedECR, tmp_path: pathlib.Path
) -> None:
    p = proxy if mode == "stream" else redirect_proxy
    repo = f"podman/{mode}"
    info = make_oci_layout(tmp_path / "src", _layers(f"podman-{mode}"), "p1", labels={"test": mode})
    push_direct(ecr, info, repo)

    podman = Podman(tmp_path / "podman")
    ref = f"{p.host}/{repo}:p1"
    try:
        out = podman.pull(ref, "--tls-verify=false")
        image_id = out.stdout.strip().splitlines()[-1]
        assert "sha256:" + image_id == info.config_digest  # podman's image ID is the config digest

        inspected = json.loads(podman.run("image", "inspect", ref).stdout)
        assert len(inspected) == 1
        img = inspected[0]
        assert img["Id"] == info.config_digest.split(":", 1)[1]
        assert img["Digest"] == info.manifest_digest
        assert f"{p.host}/{repo}@{info.manifest_digest}" in img["RepoDigests"]
        assert img["ManifestType"] == OCI_MANIFEST
        # uncompressed layers: diff_ids are the layer digests
        assert img["RootFS"]["Layers"] == info.layer_digests
        assert img["Labels"] == {"test": mode}
        assert img["Architecture"] == "amd64" and img["Os"] == "linux"
        # the pulled content can be read back: podman's own view of the manifest and config
        exported = tmp_path / "exported"
        podman.run("push", "--tls-verify=false", "--format", "oci", ref, f"oci:{exported}:p1")
        config = json.loads((exported / "blobs" / "sha256" / info.config_digest.split(":", 1)[1]).read_bytes())
        assert config["rootfs"]["diff_ids"] == info.layer_digests
    finally:
        podman.cleanup()


def test_parallel_skopeo_pulls(proxy: Proxy, ecr: EmulatedECR, tmp_path: pathlib.Path) -> None:
    """Four clients pulling the same image at once all get every byte right."""
    repo = "roundtrip/parallel"
    info = make_oci_layout(tmp_path / "src", _layers("parallel"), "par")
    push_direct(ecr, info, repo)
    dests = [tmp_path / f"pulled-{i}" for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(dests)) as pool:
        list(pool.map(lambda d: pull_via(proxy, repo, "par", d), dests))
    for d in dests:
        assert_layout_matches(d, "par", info)
    assert proxy.metric("ecrproxy_requests_in_flight") == 0
