"""The emulated ECR (moto + distribution on moto's S3) behaves like ECR, checked directly, no proxy.

Real processes throughout: moto's server, /usr/bin/docker-registry, skopeo.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import pathlib
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import botocore.session
import pytest

from ecr_twisted.testing.emulator import EmulatedECR, random_password
from ecr_twisted.testing.images import (
    OCI_MANIFEST,
    ImageInfo,
    make_big_oci_layout,
    make_oci_layout,
    make_tar_layer,
    skopeo_copy,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
OCI_ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


# ---------------------------------------------------------------- helpers
class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def request(
    url: str,
    method: str = "GET",
    *,
    password: str | None = None,
    headers: dict[str, str] | None = None,
    ca_file: pathlib.Path | None = None,
) -> Response:
    """One HTTP request, never following redirects (we want to see ECR-like 307s)."""
    u = urllib.parse.urlsplit(url)
    assert u.hostname is not None and u.port is not None
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=30, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    hdrs = dict(headers or {})
    if password is not None:
        hdrs["Authorization"] = "Basic " + base64.b64encode(f"AWS:{password}".encode()).decode()
    path = u.path + (f"?{u.query}" if u.query else "")
    try:
        conn.request(method, path, headers=hdrs)
        resp = conn.getresponse()
        body = resp.read()
        return Response(resp.status, resp.headers, body)
    finally:
        conn.close()


def ecr_client(ecr: EmulatedECR) -> Any:  # a botocore client: botocore ships no types
    return botocore.session.get_session().create_client(
        "ecr",
        region_name=ecr.region,
        endpoint_url=ecr.ecr_endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def push(ecr: EmulatedECR, info: ImageInfo, repo: str) -> None:
    host = ecr.upstream_url.split("://", 1)[1]
    skopeo_copy(
        f"oci:{info.layout_dir}:{info.tag}",
        f"docker://{host}/{repo}:{info.tag}",
        dest_creds=f"AWS:{ecr.password}",
        dest_cert_dir=ecr.ca_file.parent if ecr.ca_file else None,
    )


def assert_blob_redirects_to_s3(ecr: EmulatedECR, repo: str, digest: str, expected: bytes | None = None) -> None:
    """GET and HEAD of a blob answer 307 to a presigned URL on localhost (moto's S3), like ECR."""
    url = f"{ecr.upstream_url}/v2/{repo}/blobs/{digest}"
    for method in ("GET", "HEAD"):
        r = request(url, method, password=ecr.password, ca_file=ecr.ca_file)
        assert r.status == 307, (method, r.status, r.body[:200])
        location = r.headers["Location"]
        loc = urllib.parse.urlsplit(location)
        assert loc.scheme == "http" and loc.hostname == "localhost"
        assert f"{loc.hostname}:{loc.port}" == ecr.s3_endpoint_url.split("://", 1)[1]
        assert "X-Amz-Signature=" in loc.query
    s3 = request(location)  # no Authorization: S3 rejects two auth mechanisms
    assert s3.status == 200, s3.body[:300]
    assert "sha256:" + hashlib.sha256(s3.body).hexdigest() == digest
    if expected is not None:
        assert s3.body == expected


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    with EmulatedECR(tmp_path_factory.mktemp("ecr")) as emu:
        yield emu


@pytest.fixture(scope="module")
def pushed(ecr: EmulatedECR, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ImageInfo, list[bytes]]:
    """A 3-layer image pushed with skopeo: a real tar, random bytes, a bigger random layer."""
    layers = [
        make_tar_layer({"etc/hello.txt": b"hello from ecr-twisted\n", "bin/tool": os.urandom(1000)}),
        os.urandom(70_000),
        os.urandom(3 * 1024 * 1024 + 17),
    ]
    info = make_oci_layout(tmp_path_factory.mktemp("oci"), layers, "v1")
    push(ecr, info, "team/app")
    return "team/app", info, layers


# ---------------------------------------------------------------- tests
def test_defaults_look_like_ecr(ecr: EmulatedECR) -> None:
    assert ecr.registry_id == "123456789012" and ecr.region == "us-east-1"
    assert ecr.ecr_endpoint_url.startswith("http://127.0.0.1:")
    assert ecr.s3_endpoint_url.startswith("http://localhost:")
    assert ecr.ecr_endpoint_url.rsplit(":", 1)[1] == ecr.s3_endpoint_url.rsplit(":", 1)[1]
    assert ecr.upstream_url.startswith("http://127.0.0.1:") and ecr.ca_file is None
    assert 2000 <= len(ecr.password) <= 5000
    env = ecr.env()
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert env["AWS_DEFAULT_REGION"] == "us-east-1" and "AWS_CA_BUNDLE" not in env


def test_get_authorization_token(ecr: EmulatedECR) -> None:
    data = ecr_client(ecr).get_authorization_token()["authorizationData"]
    assert len(data) == 1
    token = data[0]
    assert base64.b64decode(token["authorizationToken"]).decode() == f"AWS:{ecr.password}"
    assert token["proxyEndpoint"] == "https://123456789012.dkr.ecr.us-east-1.amazonaws.com"
    assert token["expiresAt"].timestamp() == pytest.approx(ecr.moto_expires_at, abs=0.01)
    assert token["expiresAt"].timestamp() > time.time()  # unlike stock moto's 2015
    # registryIds (deprecated, but still sent by some clients) gets one entry per id
    many = ecr_client(ecr).get_authorization_token(registryIds=["111111111111", "222222222222"])
    assert [d["proxyEndpoint"] for d in many["authorizationData"]] == [
        "https://111111111111.dkr.ecr.us-east-1.amazonaws.com",
        "https://222222222222.dkr.ecr.us-east-1.amazonaws.com",
    ]


def test_v2_basic_challenge(ecr: EmulatedECR) -> None:
    anon = request(f"{ecr.upstream_url}/v2/")
    assert anon.status == 401
    assert anon.headers["WWW-Authenticate"] == 'Basic realm="https://123456789012.dkr.ecr.us-east-1.amazonaws.com/"'
    assert request(f"{ecr.upstream_url}/v2/", password="wrong").status == 401
    ok = request(f"{ecr.upstream_url}/v2/", password=ecr.password)
    assert ok.status == 200
    assert ok.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_push_pull_and_blob_redirect(ecr: EmulatedECR, pushed: tuple[str, ImageInfo, list[bytes]]) -> None:
    repo, info, layers = pushed
    # skopeo pushes the layout's manifest bytes unchanged: digests known in advance
    m = request(
        f"{ecr.upstream_url}/v2/{repo}/manifests/{info.tag}",
        password=ecr.password,
        headers={"Accept": OCI_ACCEPT},
    )
    assert m.status == 200
    assert m.headers["Content-Type"] == OCI_MANIFEST
    assert m.headers["Docker-Content-Digest"] == info.manifest_digest
    assert m.body == info.manifest
    assert [layer["digest"] for layer in json.loads(m.body)["layers"]] == info.layer_digests
    for digest, raw in zip(info.layer_digests, layers):
        assert_blob_redirects_to_s3(ecr, repo, digest, raw)
    assert_blob_redirects_to_s3(ecr, repo, info.config_digest, info.config)
    # blobs are not readable anonymously either
    assert request(f"{ecr.upstream_url}/v2/{repo}/blobs/{info.config_digest}").status == 401
    tags = request(f"{ecr.upstream_url}/v2/{repo}/tags/list", password=ecr.password)
    assert json.loads(tags.body) == {"name": repo, "tags": ["v1"]}


def test_moto_and_registry_tokens_can_diverge(ecr: EmulatedECR) -> None:
    registry_pw = ecr.password
    ecr.set_moto_token("moto-only", time.time() + 60)
    try:
        token = ecr_client(ecr).get_authorization_token()["authorizationData"][0]
        assert base64.b64decode(token["authorizationToken"]) == b"AWS:moto-only"
        assert abs(token["expiresAt"].timestamp() - (time.time() + 60)) < 5
        # the registry still wants the old password: a proxy would get 401 with the API's token
        assert request(f"{ecr.upstream_url}/v2/", password="moto-only").status == 401
        assert request(f"{ecr.upstream_url}/v2/", password=registry_pw).status == 200
    finally:
        ecr.set_moto_token(registry_pw, time.time() + 3600)


def test_rotation_without_restart(ecr: EmulatedECR, pushed: tuple[str, ImageInfo, list[bytes]]) -> None:
    repo, info, _ = pushed
    pid = ecr._registry.pid if ecr._registry else None
    old = ecr.password
    for _ in range(3):  # back-to-back rotations must each take effect (mtime-based reload)
        new = random_password()
        started = time.monotonic()
        ecr.set_token(new, time.time() + 7200)
        assert time.monotonic() - started < 5
        assert ecr.password == new
        assert request(f"{ecr.upstream_url}/v2/", password=old).status == 401
        assert request(f"{ecr.upstream_url}/v2/", password=new).status == 200
        token = ecr_client(ecr).get_authorization_token()["authorizationData"][0]
        assert base64.b64decode(token["authorizationToken"]).decode() == f"AWS:{new}"
        old = new
    assert ecr._registry is not None and ecr._registry.pid == pid  # same process: no restart
    # content is still there under the new credentials
    m = request(f"{ecr.upstream_url}/v2/{repo}/manifests/{info.manifest_digest}", password=ecr.password,
                headers={"Accept": OCI_ACCEPT})
    assert m.status == 200 and m.body == info.manifest
    # registry-only change: the API keeps handing out the previous token
    ecr.set_registry_password("registry-only-" + random_password(100))
    token = ecr_client(ecr).get_authorization_token()["authorizationData"][0]
    assert base64.b64decode(token["authorizationToken"]).decode() == f"AWS:{old}"
    assert request(f"{ecr.upstream_url}/v2/", password=old).status == 401
    ecr.set_token(old, time.time() + 7200)


def test_kill_and_restart_registry(ecr: EmulatedECR, pushed: tuple[str, ImageInfo, list[bytes]]) -> None:
    repo, info, layers = pushed
    url = ecr.upstream_url
    port = int(url.rsplit(":", 1)[1])
    ecr.kill_registry()
    assert not port_open(port)
    ecr.start_registry()
    assert ecr.upstream_url == url
    m = request(f"{url}/v2/{repo}/manifests/{info.tag}", password=ecr.password, headers={"Accept": OCI_ACCEPT})
    assert m.status == 200 and m.headers["Docker-Content-Digest"] == info.manifest_digest
    assert_blob_redirects_to_s3(ecr, repo, info.layer_digests[1], layers[1])


def test_big_layer_helper_streams(tmp_path: pathlib.Path) -> None:
    info = make_big_oci_layout(tmp_path, [5 * 1024 * 1024 + 3], "big", small_layers=[b"small"])
    assert len(info.layer_digests) == 2
    path = info.blob_path(info.layer_digests[1])
    data = path.read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == info.layer_digests[1]
    assert info.layer_sizes[1] == len(data) and len(data) % 512 == 0
    import tarfile

    with tarfile.open(path) as tar:
        (member,) = tar.getmembers()
        assert member.size == 5 * 1024 * 1024 + 3


def test_tls(tmp_path: pathlib.Path) -> None:
    started = time.time()
    with EmulatedECR(tmp_path / "ecr", tls=True, region="eu-west-1", account="210987654321") as ecr:
        assert ecr.upstream_url.startswith("https://127.0.0.1:")
        assert ecr.ca_file is not None and ecr.ca_file.is_file()
        anon = request(f"{ecr.upstream_url}/v2/", ca_file=ecr.ca_file)
        assert anon.status == 401
        assert anon.headers["WWW-Authenticate"] == 'Basic realm="https://210987654321.dkr.ecr.eu-west-1.amazonaws.com/"'
        assert request(f"{ecr.upstream_url}/v2/", password=ecr.password, ca_file=ecr.ca_file).status == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            request(f"{ecr.upstream_url}/v2/")  # system CAs do not trust it
        token = ecr_client(ecr).get_authorization_token()["authorizationData"][0]
        assert token["proxyEndpoint"] == "https://210987654321.dkr.ecr.eu-west-1.amazonaws.com"
        # default lifetime is ECR's 12 h
        assert started + 12 * 3600 <= token["expiresAt"].timestamp() <= time.time() + 12 * 3600 + 1
        assert base64.b64decode(token["authorizationToken"]).decode() == f"AWS:{ecr.password}"

        info = make_oci_layout(tmp_path / "oci", [b"tls layer one", os.urandom(10_000)], "t1")
        push(ecr, info, "secure/app")
        m = request(f"{ecr.upstream_url}/v2/secure/app/manifests/t1", password=ecr.password,
                    headers={"Accept": OCI_ACCEPT}, ca_file=ecr.ca_file)
        assert m.status == 200 and m.headers["Docker-Content-Digest"] == info.manifest_digest
        assert_blob_redirects_to_s3(ecr, "secure/app", info.layer_digests[0], b"tls layer one")

        new = random_password()
        ecr.set_token(new, time.time() + 60)
        assert request(f"{ecr.upstream_url}/v2/", password=new, ca_file=ecr.ca_file).status == 200


def test_cli_prints_endpoints_and_stops_on_sigterm(tmp_path: pathlib.Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    stderr_path = tmp_path / "cli.stderr"
    with open(stderr_path, "wb") as stderr, subprocess.Popen(
        [sys.executable, "-m", "ecr_twisted.testing.emulator", "--workdir", str(tmp_path / "w")],
        stdout=subprocess.PIPE,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # the emulator bounds its own start-up at ~20 s per process
            assert line, stderr_path.read_text()
            info = json.loads(line)
            assert set(info) >= {"ecr_endpoint_url", "upstream_url", "registry_id", "region", "ca_file"}
            assert info["registry_id"] == "123456789012" and info["region"] == "us-east-1"
            assert info["ca_file"] is None
            assert request(info["upstream_url"] + "/v2/").status == 401
            ports = [int(info["upstream_url"].rsplit(":", 1)[1]), int(info["ecr_endpoint_url"].rsplit(":", 1)[1])]
            assert all(port_open(p) for p in ports)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, stderr_path.read_text()
            assert not any(port_open(p) for p in ports)  # children are gone, not orphaned
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
