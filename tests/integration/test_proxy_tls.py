"""TLS on both legs of a real proxy process.

Upstream: an emulator serving HTTPS with its own CA (``--upstream-ca``, none, ``--upstream-insecure``).
Clients: the proxy terminates TLS for 127.0.0.1 with a certificate from a throw-away CA;
skopeo verifies it (``--src-cert-dir``), TLS 1.1 clients are refused.
"""

from __future__ import annotations

import os
import pathlib
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator

import pytest
from proxy_harness import (
    MANIFEST_ACCEPT,
    Proxy,
    ProxyFactory,
    assert_layout_matches,
    client_tls_context,
    free_port,
    http_request,
    pull_via,
    push_direct,
    push_via,
    sha256_file,
)

from ecr_twisted.testing.emulator import EmulatedECR, _make_tls_files
from ecr_twisted.testing.images import ImageInfo, make_oci_layout, make_tar_layer

REPO = "tls/app"


# ---------------------------------------------------------------- TLS towards the upstream
@pytest.fixture(scope="module")
def tls_ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    with EmulatedECR(tmp_path_factory.mktemp("ecr-tls"), tls=True) as emu:
        yield emu


@pytest.fixture(scope="module")
def tls_image(tls_ecr: EmulatedECR, tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    layers = [make_tar_layer({"tls.txt": b"over https\n"}), os.urandom(900_000), os.urandom(64_000)]
    info = make_oci_layout(tmp_path_factory.mktemp("tls-img"), layers, "t1")
    push_direct(tls_ecr, info, REPO)
    return info


def test_upstream_tls_with_ca(
    tls_ecr: EmulatedECR, tls_image: ImageInfo, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    assert tls_ecr.upstream_url.startswith("https://") and tls_ecr.ca_file is not None
    p = proxy_factory(tls_ecr, "--upstream-ca", str(tls_ecr.ca_file))
    pull_via(p, REPO, "t1", tmp_path / "pulled")
    assert_layout_matches(tmp_path / "pulled", "t1", tls_image)
    # and a push over the verified TLS upstream
    extra = make_oci_layout(tmp_path / "extra", [os.urandom(30_000)], "t2")
    push_via(p, extra, REPO)
    m = p.request(f"/v2/{REPO}/manifests/t2", headers={"Accept": MANIFEST_ACCEPT})
    assert m.status == 200 and m.body == extra.manifest


def test_upstream_tls_unverified_is_refused(
    tls_ecr: EmulatedECR, tls_image: ImageInfo, proxy_factory: ProxyFactory
) -> None:
    p = proxy_factory(tls_ecr)  # no --upstream-ca: the emulator's CA is not trusted
    for path in (f"/v2/{REPO}/manifests/t1", "/v2/", f"/v2/{REPO}/blobs/{tls_image.config_digest}"):
        r = p.request(path, headers={"Accept": MANIFEST_ACCEPT}, timeout=20)
        assert r.status == 502, (path, r.status, r.body)
        assert (r.header("Content-Type") or "").startswith("application/json")
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert tls_image.manifest not in r.body
    assert p.alive()


def test_upstream_tls_insecure_flag(
    tls_ecr: EmulatedECR, tls_image: ImageInfo, proxy_factory: ProxyFactory
) -> None:
    p = proxy_factory(tls_ecr, "--upstream-insecure")
    m = p.request(f"/v2/{REPO}/manifests/t1", headers={"Accept": MANIFEST_ACCEPT})
    assert m.status == 200 and m.body == tls_image.manifest
    assert m.header("Docker-Content-Digest") == tls_image.manifest_digest
    for digest in tls_image.blob_digests:
        b = p.request(f"/v2/{REPO}/blobs/{digest}")
        assert b.status == 200 and b.body == tls_image.blob_path(digest).read_bytes()


# ---------------------------------------------------------------- TLS towards clients
@pytest.fixture(scope="module")
def client_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """(CA file, server cert, server key) for 127.0.0.1; the CA sits alone in its dir (a --cert-dir)."""
    return _make_tls_files(tmp_path_factory.mktemp("client-tls"))


@pytest.fixture(scope="module")
def plain_image(ecr: EmulatedECR, tmp_path_factory: pytest.TempPathFactory) -> ImageInfo:
    layers = [make_tar_layer({"hello": b"client tls\n"}), os.urandom(500_000), os.urandom(1_000)]
    info = make_oci_layout(tmp_path_factory.mktemp("ctls-img"), layers, "c1")
    push_direct(ecr, info, REPO)
    return info


def _tls11_context() -> ssl.SSLContext:
    """A client that offers at most TLS 1.1 (SECLEVEL=0, so it is the server that says no)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def _check_client_tls(
    p: Proxy, ca_file: pathlib.Path, image: ImageInfo, tmp_path: pathlib.Path
) -> None:
    # a verified HTTPS request
    r = http_request(f"https://127.0.0.1:{p.port}/v2/", context=client_tls_context(ca_file))
    assert r.status == 200 and r.body == b"{}"
    # clients that offer ALPN (curl, urllib3, Go do by default) complete the handshake on http/1.1
    for offer in (["http/1.1"], ["h2", "http/1.1"], ["h2"]):
        ctx = client_tls_context(ca_file)
        ctx.set_alpn_protocols(offer)
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s, \
                ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            assert t.selected_alpn_protocol() == ("http/1.1" if "http/1.1" in offer else None), offer
            t.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert t.recv(64).startswith(b"HTTP/1.1 200"), offer
    digest = image.blob_digests[-1]
    curl = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(ca_file), "-o", str(tmp_path / "curl-blob"),
         "-w", "%{http_version}", f"https://127.0.0.1:{p.port}/v2/{REPO}/blobs/{digest}"],
        capture_output=True, text=True, timeout=60,
    )
    assert curl.returncode == 0, f"curl with its defaults (ALPN offered) failed: {curl.stderr}"
    assert curl.stdout == "1.1"
    assert sha256_file(tmp_path / "curl-blob") == digest
    # skopeo verifies the certificate against the CA (cert dir) and pulls every blob through TLS
    pull_via(p, REPO, image.tag, tmp_path / "pulled", cert_dir=ca_file.parent)
    assert_layout_matches(tmp_path / "pulled", image.tag, image)
    # URLs the proxy hands out name https
    post = http_request(f"https://127.0.0.1:{p.port}/v2/{REPO}/blobs/uploads/", "POST",
                        headers={"Content-Length": "0"}, context=client_tls_context(ca_file))
    assert post.status == 202
    assert (post.header("Location") or "").startswith(f"https://127.0.0.1:{p.port}/v2/{REPO}/blobs/uploads/")
    # TLS 1.2 is the floor: the same client offering up to 1.2 gets in, up to 1.1 is refused by the server
    control = _tls11_context()
    control.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s, control.wrap_socket(s) as t:
        assert t.version() == "TLSv1.2"
    with pytest.raises(ssl.SSLError) as err:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s, _tls11_context().wrap_socket(s):
            pass
    assert "PROTOCOL_VERSION" in str(err.value).upper().replace(" ", "_"), err.value
    # plain HTTP on the TLS port gets nothing usable
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        try:
            answer = s.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:100]
    assert p.alive()


def test_client_tls_cert_and_key_options(
    ecr: EmulatedECR, plain_image: ImageInfo, client_tls: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
    proxy_factory: ProxyFactory, tmp_path: pathlib.Path,
) -> None:
    """``--port tcp:N:interface=127.0.0.1 --tls-cert C --tls-key K``: the proxy's own TLS options.

    Open bug: tap.Options._listener applies --tls-cert/--tls-key only to a bare port number
    (which binds every interface); for an endpoint string such as tcp:N:interface=127.0.0.1
    it silently serves plain HTTP, while the operator asked for TLS.
    """
    ca, cert, key = client_tls
    p = proxy_factory(ecr, "--tls-cert", str(cert), "--tls-key", str(key), scheme="https")
    assert p.port is not None
    assert not _answers_plain_http(p.port), "--tls-cert/--tls-key were ignored: the port serves plain HTTP"
    _check_client_tls(p, ca, plain_image, tmp_path)


def _answers_plain_http(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        s.settimeout(10)
        try:
            return s.recv(16).startswith(b"HTTP/1.1")
        except OSError:
            return False


def test_client_tls_ssl_endpoint(
    ecr: EmulatedECR, plain_image: ImageInfo, client_tls: tuple[pathlib.Path, pathlib.Path, pathlib.Path],
    proxy_factory: ProxyFactory, tmp_path: pathlib.Path,
) -> None:
    """``--port ssl:N:interface=127.0.0.1:privateKey=K:certKey=C`` (Twisted's own TLS endpoint)."""
    ca, cert, key = client_tls
    port = free_port()
    p = proxy_factory(
        ecr, port_spec=f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}", port=port, scheme="https"
    )
    _check_client_tls(p, ca, plain_image, tmp_path)


def test_client_tls_suites_are_the_intermediate_profile(
    ecr: EmulatedECR, client_tls: tuple[pathlib.Path, pathlib.Path, pathlib.Path], proxy_factory: ProxyFactory,
) -> None:
    """Each TLS 1.2 suite Python's OpenSSL knows, offered alone: the proxy takes exactly the README's
    ("intermediate": ECDHE with AES-GCM or CHACHA20-POLY1305; the test certificate is ECDSA); TLS 1.3 works."""
    _, cert, key = client_tls
    p = proxy_factory(ecr, "--tls-cert", str(cert), "--tls-key", str(key), scheme="https")
    assert p.port is not None
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    suites = sorted({c["name"] for c in probe.get_ciphers() if not c["name"].startswith("TLS_")})
    assert len(suites) > 30
    accepted = set()
    for suite in suites:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(suite + ":@SECLEVEL=0")
        try:
            with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s, ctx.wrap_socket(s) as t:
                cipher = t.cipher()
                assert cipher is not None and cipher[0] == suite and t.version() == "TLSv1.2"
                accepted.add(suite)
        except (ssl.SSLError, ConnectionResetError):
            pass
    assert accepted == {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                        "ECDHE-ECDSA-CHACHA20-POLY1305"}
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s, ctx.wrap_socket(s) as t:
        assert t.version() == "TLSv1.3"
        t.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert t.recv(64).startswith(b"HTTP/1.1 200")
    assert p.alive()
