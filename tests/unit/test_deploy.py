"""The deployment files under deploy/ and the Dockerfile: they parse, validate against their tools'
schemas and checkers, and name only metrics a real proxy exposes.

Every tool used here is installed by `make test` (Debian: prometheus for promtool; PyPI test extras:
kubernetes-validate, pyyaml), so nothing is skipped for want of one.
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HEALTHCHECK = DEPLOY / "docker" / "ecrproxy-healthcheck"


# --- the health probe script (Dockerfile HEALTHCHECK, usable by k8s exec probes and systemd) ---

@pytest.fixture
def metrics_listener() -> Iterator[int]:
    """A stand-in for the metrics listener: /healthz 200, /readyz 503; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def probe(metrics_port: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ECRPROXY_METRICS_PORT"}
    if metrics_port is not None:
        env["ECRPROXY_METRICS_PORT"] = metrics_port
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("spec", ["{port}", "tcp:{port}", "tcp:{port}:interface=127.0.0.1",
                                  "tcp:port={port}:interface=0.0.0.0"])
def test_the_probe_follows_the_configured_metrics_port(metrics_listener: int, spec: str) -> None:
    assert probe(spec.format(port=metrics_listener)).returncode == 0
    assert probe(spec.format(port=metrics_listener), "/healthz").returncode == 0


def test_the_probe_fails_on_a_non_200_answer_and_on_nothing_listening(metrics_listener: int) -> None:
    not_ready = probe(str(metrics_listener), "/readyz")
    assert not_ready.returncode == 1 and "503" in not_ready.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]  # bound, not listening: connections are refused
        assert probe(str(free)).returncode == 1


def test_the_probe_refuses_a_metrics_port_it_cannot_reach() -> None:
    result = probe("unix:/run/ecrproxy-metrics.sock")
    assert result.returncode == 1 and "ECRPROXY_METRICS_PORT" in result.stderr


def test_the_probe_is_executable_and_the_image_uses_it() -> None:
    assert os.access(HEALTHCHECK, os.X_OK)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/docker/ecrproxy-healthcheck /opt/ecrproxy/bin/ecrproxy-healthcheck" in dockerfile
    healthcheck = [line for line in dockerfile.splitlines() if line.startswith("HEALTHCHECK")]
    assert len(healthcheck) == 1 and "ecrproxy-healthcheck" in healthcheck[0] and "9100" not in healthcheck[0]
    assert "--format docker" in dockerfile  # OCI-format builds drop HEALTHCHECK: said where it is written
