"""A registry upstream that uses the token flow (as ECR Public, Docker Hub, GHCR and Harbor do),
with real processes: distribution (`docker-registry`) configured with `auth: token`, a tiny token
server issuing JWTs signed by a key whose certificate is the registry's `rootcertbundle`, and the
proxy with two `[[upstream]]` tables on that registry: one anonymous, one with static credentials.

skopeo is the client everywhere: pushing straight to the registry (it follows the token flow
itself, which shows the token server is a faithful one), and through the proxy, which must then
follow the flow for it.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import pathlib
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from proxy_harness import (
    REPO_ROOT,
    Proxy,
    assert_layout_matches,
    free_port,
    http_request,
    port_open,
    wait_for,
)

from ecr_twisted.testing.emulator import REGISTRY_BINARY, _parent_death_preexec
from ecr_twisted.testing.images import make_oci_layout, skopeo_copy

SERVICE = "bearer-test-registry"
ISSUER = "bearer-test-issuer"
USER, PASSWORD = "robot", "robot-pw-5e9f1c"
LIFETIME = 300


class TokenServer:
    """The token server: anonymous callers get pull, `robot` gets what it asks; wrong credentials 401.
    Every request is recorded (path, Authorization) for the test to look at."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bearer-test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False, False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle = workdir / "token-signer.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()
        self.seen: list[tuple[str, str | None]] = []
        self.issued: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.answer(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def answer(self, req: BaseHTTPRequestHandler) -> None:
        auth = req.headers.get("Authorization")
        with self.lock:
            self.seen.append((req.path, auth))
        url = urllib.parse.urlsplit(req.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path != "/token" or query.get("service") != [SERVICE]:
            return self._send(req, 400, {"errors": [{"code": "BAD", "message": "unknown service"}]})
        user = ""
        if auth is not None:
            if auth != "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode():
                return self._send(req, 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
            user = USER
        access = []
        for scope in query.get("scope", []):
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = actions.split(",")
            granted = wanted if user else [a for a in wanted if a == "pull"]
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + LIFETIME, "nbf": now - 10, "iat": now,
                  "jti": base64.b32encode(os.urandom(10)).decode(), "access": access}
        token = jwt.encode(claims, self.key, algorithm="ES256", headers={"x5c": [self.x5c]})
        with self.lock:
            self.issued.append(token)
        self._send(req, 200, {"token": token, "expires_in": LIFETIME})

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def mark(self) -> int:
        with self.lock:
            return len(self.seen)

    def since(self, mark: int) -> list[tuple[str, str | None]]:
        with self.lock:
            return self.seen[mark:]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class TokenRegistry:
    """distribution with `auth: token` on the TokenServer, filesystem storage, on 127.0.0.1."""

    def __init__(self, workdir: pathlib.Path, tokens: TokenServer) -> None:
        self.port = free_port()
        config = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(workdir / "storage")}, "redirect": {"disable": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "auth": {"token": {"realm": tokens.realm, "service": SERVICE, "issuer": ISSUER,
                               "rootcertbundle": str(tokens.bundle)}},
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": base64.b64encode(os.urandom(16)).decode()},
        }
        self.config = workdir / "registry.yml"
        self.config.write_text(json.dumps(config))
        self.log_path = workdir / "registry.log"
        self.log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self.proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     preexec_fn=_parent_death_preexec())
        wait_for(lambda: port_open(self.port), 20, "docker-registry to listen")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def tokens(tmp_path: pathlib.Path) -> Iterator[TokenServer]:
    server = TokenServer(tmp_path)
    yield server
    server.close()


@pytest.fixture
def registry(tmp_path: pathlib.Path, tokens: TokenServer) -> Iterator[TokenRegistry]:
    reg = TokenRegistry(tmp_path, tokens)
    yield reg
    reg.close()


@pytest.fixture
def proxy(tmp_path: pathlib.Path, registry: TokenRegistry) -> Iterator[Proxy]:
    (tmp_path / "robot-password").write_text(PASSWORD + "\n")
    (tmp_path / "ecrproxy.toml").write_text(f"""
anonymous = true
region = "eu-west-1"  # needed even when no upstream is ECR

[[upstream]]
name = "pub"
url = "http://{registry.host}"
credentials = "none"
prefix = "pub"

[[upstream]]
name = "robot"
url = "http://{registry.host}"
credentials = "static"
username = "{USER}"
password-file = "robot-password"
prefix = "robot"
""")
    port, metrics_port = free_port(), free_port()
    args = ["-n", "--pidfile=", "ecrproxy", "--port", f"tcp:{port}:interface=127.0.0.1",
            "--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1", "--config", str(tmp_path / "ecrproxy.toml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECRPROXY_") and not k.lower().endswith("_proxy")}
    env.update(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", ECRPROXY_DRAIN_TIMEOUT="3")
    p = Proxy(args, env, tmp_path / "proxy.log", port=port, metrics_port=metrics_port)
    p.start(wait="healthz")
    wait_for(lambda: p.ops("/readyz").status == 200, 15, "the proxy to be ready")
    yield p
    p.stop()


def push_direct(tmp_path: pathlib.Path, registry: TokenRegistry, repo: str) -> Any:
    info = make_oci_layout(tmp_path / f"layout-{repo.replace('/', '-')}", [b"bearer layer one\n" * 300,
                                                                          b"bearer layer two\n" * 20], "v1")
    skopeo_copy(f"oci:{info.layout_dir}:v1", f"docker://{registry.host}/{repo}:v1", dest_creds=f"{USER}:{PASSWORD}")
    return info


def test_an_anonymous_upstream_pulls_through_the_token_flow(
    tmp_path: pathlib.Path, tokens: TokenServer, registry: TokenRegistry, proxy: Proxy
) -> None:
    info = push_direct(tmp_path, registry, "team/app")
    # the registry really wants a token: a plain request is refused with the challenge
    r = http_request(f"http://{registry.host}/v2/team/app/manifests/v1")
    assert r.status == 401 and (r.header("Www-Authenticate") or "").startswith("Bearer ")
    mark = tokens.mark()
    dest = tmp_path / "pulled"
    skopeo_copy(f"docker://{proxy.host}/pub/team/app:v1", f"oci:{dest}:v1")
    assert_layout_matches(dest, "v1", info)
    asked = tokens.since(mark)
    assert asked, "the proxy never asked the token server"
    assert all(auth is None for _, auth in asked)  # anonymous upstream: no credentials to the realm
    assert any("scope=repository:team/app:pull" in path for path, _ in asked)
    # a second pull of the same repository uses the kept token: the token server is not asked again
    mark = tokens.mark()
    r = proxy.request("/v2/pub/team/app/manifests/v1",
                      headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert (r.status, r.body) == (200, info.manifest)
    r = proxy.request(f"/v2/pub/team/app/blobs/{info.layer_digests[0]}")
    assert r.status == 200 and r.body == info.blob_path(info.layer_digests[0]).read_bytes()
    assert tokens.since(mark) == []
    # anonymous callers of the token server may not push: through the anonymous upstream, refused
    with pytest.raises(RuntimeError, match="502"):
        skopeo_copy(f"oci:{info.layout_dir}:v1", f"docker://{proxy.host}/pub/team/other:v1", timeout=120)
    log = proxy.log_text()
    for token in tokens.issued:
        assert token[-40:] not in log


def test_static_credentials_go_to_the_token_server_and_push_works(
    tmp_path: pathlib.Path, tokens: TokenServer, registry: TokenRegistry, proxy: Proxy
) -> None:
    info = make_oci_layout(tmp_path / "layout", [b"pushed through the proxy\n" * 500], "v2")
    mark = tokens.mark()
    skopeo_copy(f"oci:{info.layout_dir}:v2", f"docker://{proxy.host}/robot/team/pushed:v2", timeout=120)
    asked = tokens.since(mark)
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    # (`GET /v2/` goes to the first upstream, the anonymous one: its token request has no scope)
    robot = [(path, auth) for path, auth in asked if "scope=" in path]
    assert robot and all(auth == basic for _, auth in robot)
    assert any(":push" in path or ":pull,push" in path for path, _ in robot)
    # it is in the registry, and anyone pulls it through the anonymous upstream
    dest = tmp_path / "pulled"
    skopeo_copy(f"docker://{proxy.host}/pub/team/pushed:v2", f"oci:{dest}:v2")
    assert_layout_matches(dest, "v2", info)
    log = proxy.log_text()
    assert PASSWORD not in log and basic[6:] not in log
    for token in tokens.issued:
        assert token[-40:] not in log
