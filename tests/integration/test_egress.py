"""The egress proxy: a real proxy process reaches every upstream through a real forward proxy.

tinyproxy (Debian) listens on 127.0.0.1 with its own config; the proxy process gets
HTTPS_PROXY/HTTP_PROXY pointing at it (NO_PROXY removed). Each leg is checked by counting:
what the emulator received on a leg (the registry's access log, moto's log for the ECR API
and for presigned S3 GETs) is exactly what tinyproxy forwarded for that origin. tinyproxy
closes its client connections after each forwarded plain-http request, so a request that
went around it would show as one more on the emulator's side. The TLS registry is checked
by its CONNECT tunnels.
"""

from __future__ import annotations

import base64
import os
import pathlib
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from proxy_harness import (
    MANIFEST_ACCEPT,
    ProxyFactory,
    assert_layout_matches,
    assert_no_secret,
    free_port,
    port_open,
    pull_via,
    push_direct,
    push_via,
    raw_exchange,
    wait_for,
)

from ecr_twisted.testing.emulator import EmulatedECR, _parent_death_preexec
from ecr_twisted.testing.images import ImageInfo, make_oci_layout, make_tar_layer

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/1\.[01]")
_ACCESS = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]"')


class Tinyproxy:
    """One tinyproxy on 127.0.0.1 with its own config and log, optionally asking for BasicAuth."""

    def __init__(self, workdir: pathlib.Path, auth: tuple[str, str] | None = None) -> None:
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        assert os.access(binary, os.X_OK), "tinyproxy is not installed (make deps installs it: DEBIAN_TEST)"
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "tinyproxy.log"
        self.log_path.touch()
        conf = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 120",
            f'LogFile "{self.log_path}"',
            "LogLevel Connect",
            f'PidFile "{workdir / "tinyproxy.pid"}"',
            "MaxClients 200",
            "Allow 127.0.0.1",
            "DisableViaHeader Yes",
        ]
        if auth is not None:
            conf.append(f"BasicAuth {auth[0]} {auth[1]}")
        self.conf = workdir / "tinyproxy.conf"
        self.conf.write_text("\n".join(conf) + "\n")
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", str(self.conf)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_parent_death_preexec(),
        )
        wait_for(lambda: port_open(self.port), 10, "tinyproxy to listen")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request tinyproxy took, CONNECTs included, in order."""
        text = self.log_path.read_text("utf-8", "replace")
        return [(m.group(1), m.group(2)) for m in _REQUEST.finditer(text)]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def eg_ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    """An emulator of its own: nothing else talks to it, so its logs count this module's requests only."""
    with EmulatedECR(tmp_path_factory.mktemp("ecr-egress")) as emu:
        yield emu


@pytest.fixture
def tinyproxy(tmp_path: pathlib.Path) -> Iterator[Tinyproxy]:
    tp = Tinyproxy(tmp_path / "tinyproxy")
    yield tp
    tp.stop()


@pytest.fixture(scope="module")
def image(eg_ecr: EmulatedECR, tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    layers = [
        make_tar_layer({"etc/egress": b"through the forward proxy\n"}),
        os.urandom(1_200_000),
        os.urandom(70_000),
    ]
    info = make_oci_layout(tmp_path_factory.mktemp("egress-img"), layers, "e1")
    push_direct(eg_ecr, info, "egress/pull")
    return info


class Marks:
    """Where the emulator's logs stood: what was received after it is this test's doing."""

    def __init__(self, ecr: EmulatedECR) -> None:
        self.ecr = ecr
        self.registry = ecr.registry_log.stat().st_size
        self.moto = ecr.moto_log.stat().st_size

    def registry_requests(self) -> list[tuple[str, str]]:
        with open(self.ecr.registry_log, "rb") as f:
            f.seek(self.registry)
            text = f.read().decode("utf-8", "replace")
        return [(m.group(1), m.group(2)) for m in _ACCESS.finditer(text)]

    def moto_requests(self) -> list[tuple[str, str]]:
        with open(self.ecr.moto_log, "rb") as f:
            f.seek(self.moto)
            text = f.read().decode("utf-8", "replace")
        return [(m.group(1), m.group(2)) for m in _ACCESS.finditer(text)]


def _legs(ecr: EmulatedECR, marks: Marks, tp: Tinyproxy, since: int) -> dict[str, tuple[int, int]]:
    """Per leg: (requests the emulator received, requests tinyproxy forwarded to that origin)."""
    forwarded = tp.requests()[since:]
    moto_port = ecr.ecr_endpoint_url.rsplit(":", 1)[1]
    api_base = f"http://127.0.0.1:{moto_port}/"
    s3_base = f"http://localhost:{moto_port}/"
    reg_base = ecr.upstream_url + "/"
    moto = marks.moto_requests()
    return {
        # GetAuthorizationToken: botocore POSTs to / (the registry's own S3 calls never do)
        "ecr-api": (
            sum(1 for m, t in moto if m == "POST" and t == "/"),
            sum(1 for m, t in forwarded if t.startswith(api_base)),
        ),
        # presigned GETs (the registry's own S3 driver signs in headers, never in the query)
        "s3": (
            sum(1 for m, t in moto if m == "GET" and "X-Amz-Signature=" in t),
            sum(1 for m, t in forwarded if t.startswith(s3_base)),
        ),
        "registry": (
            len(marks.registry_requests()),
            sum(1 for m, t in forwarded if t.startswith(reg_base)),
        ),
    }


def _settled(ecr: EmulatedECR, marks: Marks, tp: Tinyproxy, since: int) -> dict[str, tuple[int, int]]:
    """The leg counts once both sides' logs agree (they are written a moment after the answer)."""
    last: dict[str, tuple[int, int]] = {}

    def agree() -> bool:
        nonlocal last
        last = _legs(ecr, marks, tp, since)
        return all(a == b for a, b in last.values())

    try:
        wait_for(agree, 10, "the emulator's and tinyproxy's logs to agree")
    except TimeoutError:
        pass
    return last


def _env(tp_url: str) -> dict[str, str]:
    return {"HTTPS_PROXY": tp_url, "HTTP_PROXY": tp_url}


def test_every_leg_goes_through_the_forward_proxy(
    eg_ecr: EmulatedECR, image: ImageInfo, tinyproxy: Tinyproxy, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    marks = Marks(eg_ecr)
    since = len(tinyproxy.requests())
    p = proxy_factory(eg_ecr, env_extra=_env(tinyproxy.url), env_drop=("NO_PROXY", "no_proxy"))
    assert f"egress proxy: https origins via {tinyproxy.url}, http origins via {tinyproxy.url}" in p.log_text()

    # pull: manifest from the registry, blobs via the registry's 307 to S3 (stream mode follows it)
    pull_via(p, "egress/pull", "e1", tmp_path / "pulled")
    assert_layout_matches(tmp_path / "pulled", "e1", image)
    blob = image.layer_digests[1]
    r = p.request(f"/v2/egress/pull/blobs/{blob}")
    assert r.status == 200 and r.body == image.blob_path(blob).read_bytes()

    # push: uploads (POST, PATCH/PUT) and the manifest PUT, then read it back directly
    pushed = make_oci_layout(tmp_path / "push-img", [os.urandom(300_000), make_tar_layer({"a": b"b"})], "p1")
    push_via(p, pushed, "egress/push")
    pull_via(p, "egress/push", "p1", tmp_path / "pushed")
    assert_layout_matches(tmp_path / "pushed", "p1", pushed)

    legs = _settled(eg_ecr, marks, tinyproxy, since)
    for leg, (received, forwarded) in legs.items():
        assert received >= 1, (leg, legs)
        assert received == forwarded, f"{leg}: the emulator got {received} requests, tinyproxy forwarded {forwarded}"
    methods = {m for m, t in tinyproxy.requests()[since:] if t.startswith(eg_ecr.upstream_url)}
    assert {"GET", "HEAD", "POST", "PUT"} <= methods, methods


def test_proxy_credentials_from_the_url_are_used_and_never_logged(
    eg_ecr: EmulatedECR, image: ImageInfo, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    user, password = "egress-user", "pw-" + secrets.token_hex(12)
    tp = Tinyproxy(tmp_path / "tinyproxy-auth", auth=(user, password))
    try:
        # a URL with percent-encoding: the password's "-" written as %2D must reach tinyproxy decoded
        url = f"http://{user}:{password.replace('-', '%2D')}@127.0.0.1:{tp.port}"
        marks = Marks(eg_ecr)
        p = proxy_factory(eg_ecr, env_extra=_env(url), env_drop=("NO_PROXY", "no_proxy"))
        pull_via(p, "egress/pull", "e1", tmp_path / "pulled")
        assert_layout_matches(tmp_path / "pulled", "e1", image)
        legs = _settled(eg_ecr, marks, tp, 0)
        assert legs["registry"][0] >= 1 and legs["s3"][0] >= 1, legs
        assert all(a == b for a, b in legs.values()), legs
        # tinyproxy forwarded all of it, and refuses anyone without the credentials
        anonymous = raw_exchange(tp.port, f"GET {eg_ecr.upstream_url}/v2/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert anonymous.startswith(b"HTTP/1.0 407 "), anonymous[:200]
        p.stop()
        log = p.log_text()
        assert f"http://127.0.0.1:{tp.port} (with credentials)" in log
        assert_no_secret(log, [password, password.replace("-", "%2D")], "the proxy's log")
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        assert basic[:40] not in log and user not in log
    finally:
        tp.stop()


def test_a_proxy_that_wants_credentials_is_named_in_the_error(
    eg_ecr: EmulatedECR, image: ImageInfo, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    """A proxy URL without the credentials the proxy wants: its 407 is never relayed as if the
    registry had said it; the client gets the registry's error envelope, the log names the proxy.
    (The ECR API goes direct here through NO_PROXY on its port, so the proxy gets ready.)"""
    tp = Tinyproxy(tmp_path / "tinyproxy-auth", auth=("someone", "secret"))
    try:
        api = "127.0.0.1:" + eg_ecr.ecr_endpoint_url.rsplit(":", 1)[1]
        p = proxy_factory(eg_ecr, env_extra={**_env(tp.url), "NO_PROXY": api}, env_drop=("no_proxy",))
        r = p.request("/v2/egress/pull/manifests/e1", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status == 502, (r.status, r.body[:300])
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE", r.body
        assert b"tinyproxy" not in r.body and b"Authentication" not in r.body
        wait_for(lambda: f"egress proxy {tp.url} answered 407" in p.log_text(), 5, "the refusal in the log")
        assert "wants credentials" in p.log_text()
    finally:
        tp.stop()


def test_no_proxy_sends_the_named_hosts_direct(
    eg_ecr: EmulatedECR, image: ImageInfo, tinyproxy: Tinyproxy, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    """NO_PROXY=localhost: the S3 leg (presigned URLs on localhost) goes direct, the rest through."""
    marks = Marks(eg_ecr)
    since = len(tinyproxy.requests())
    p = proxy_factory(eg_ecr, env_extra={**_env(tinyproxy.url), "NO_PROXY": "localhost"}, env_drop=("no_proxy",))
    pull_via(p, "egress/pull", "e1", tmp_path / "pulled")
    assert_layout_matches(tmp_path / "pulled", "e1", image)
    time.sleep(0.5)  # let the logs catch up: the check below is for something that must NOT appear
    legs = _legs(eg_ecr, marks, tinyproxy, since)
    assert legs["s3"][0] >= 1 and legs["s3"][1] == 0, legs
    assert legs["registry"][0] >= 1 and legs["registry"][0] == legs["registry"][1], legs
    assert legs["ecr-api"][0] >= 1 and legs["ecr-api"][0] == legs["ecr-api"][1], legs


# ---------------------------------------------------------------- a TLS registry: CONNECT tunnels
@pytest.fixture(scope="module")
def tls_ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    with EmulatedECR(tmp_path_factory.mktemp("ecr-egress-tls"), tls=True) as emu:
        yield emu


def test_tls_registry_through_connect_tunnels(
    tls_ecr: EmulatedECR, tinyproxy: Tinyproxy, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    assert tls_ecr.upstream_url.startswith("https://") and tls_ecr.ca_file is not None
    info = make_oci_layout(tmp_path / "img", [make_tar_layer({"t": b"tls\n"}), os.urandom(500_000)], "t1")
    push_direct(tls_ecr, info, "egress/tls")
    marks = Marks(tls_ecr)
    since = len(tinyproxy.requests())
    p = proxy_factory(
        tls_ecr, "--upstream-ca", str(tls_ecr.ca_file),
        env_extra=_env(tinyproxy.url), env_drop=("NO_PROXY", "no_proxy"),
    )
    pull_via(p, "egress/tls", "t1", tmp_path / "pulled")
    assert_layout_matches(tmp_path / "pulled", "t1", info)
    forwarded = tinyproxy.requests()[since:]
    authority = tls_ecr.registry_host  # 127.0.0.1:PORT: CONNECT always names the port
    tunnels = [t for m, t in forwarded if m == "CONNECT"]
    assert tunnels and set(tunnels) == {authority}, forwarded
    # no plain request ever went to the TLS registry, and the other legs still went through
    assert not any(t.startswith(tls_ecr.upstream_url) for m, t in forwarded if m != "CONNECT")
    legs = _settled(tls_ecr, marks, tinyproxy, since)
    assert legs["s3"][0] >= 1 and legs["s3"][0] == legs["s3"][1], legs
    assert legs["ecr-api"][0] >= 1 and legs["ecr-api"][0] == legs["ecr-api"][1], legs
    assert len(marks.registry_requests()) >= 2
