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


# --- the metric names a real proxy exposes ---

def exposed_metrics(tmp_path: Path) -> set[str]:
    """Every sample name a scrape of a proxy with a layer cache can show (labelled families that have
    seen no traffic yet show only their # TYPE line: their sample names follow from the type)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from ecr_twisted.testing.doubles import Harness

    h = Harness(cache_dir=str(tmp_path / "cache"))
    try:
        scrape = generate_latest(h.registry).decode()
    finally:
        h.close()
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["_sum", "_count", "_created", ""], "gauge": [""], "info": ["_info"]}
    names: set[str] = set()
    for family in text_string_to_metric_families(scrape):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        names.update(sample.name for sample in family.samples)
    return names


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "Inf", "NaN", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana target's) selects: identifiers that are not
    functions, keywords, label names or inside strings, label matchers or range brackets."""
    import re

    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "", e)  # Grafana variables
    e = re.sub(r"\b\d[\d.eE+-]*[smhdwy]?\b", "", e)  # numbers and durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if m.group() in _PROMQL_WORDS or e[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def test_promql_metrics_finds_metric_names_only() -> None:
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(foo_bucket{route=~"a|b", x="y"}[5m]))) > 2.5 '
            'and on (instance) bar_total / ignoring(x) baz - time() < 1e3')
    assert promql_metrics(expr) == {"foo_bucket", "bar_total", "baz"}
    assert promql_metrics('sum(rate(q_total{instance=~"$instance"}[$__rate_interval]))') == {"q_total"}


@pytest.fixture(scope="module")
def metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    names = exposed_metrics(tmp_path_factory.mktemp("scrape"))
    assert {"ecrproxy_token_expiry_timestamp_seconds", "ecrproxy_token_refresh_total",
            "ecrproxy_request_duration_seconds_bucket", "ecrproxy_cache_disk_full_total"} <= names
    return names


# --- Prometheus alert rules ---

PROMETHEUS = DEPLOY / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120)


def test_the_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "alerts.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", "alerts_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict[str, object]]:
    import yaml

    doc = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_the_alert_rules_use_only_exposed_metrics(metrics: set[str]) -> None:
    used = set()
    for rule in alert_rules():
        names = promql_metrics(str(rule["expr"]))
        assert names, rule
        assert names <= metrics, (rule["alert"], names - metrics)
        used |= names
    wanted = {"ecrproxy_token_expiry_timestamp_seconds", "ecrproxy_token_refresh_total",
              "ecrproxy_upstream_errors_total", "ecrproxy_requests_total", "ecrproxy_cache_disk_full_total",
              "ecrproxy_request_duration_seconds_bucket"}
    assert wanted <= used


def test_every_alert_rule_is_unit_tested() -> None:
    tested = (PROMETHEUS / "alerts_test.yaml").read_text()
    for rule in alert_rules():
        assert f"alertname: {rule['alert']}" in tested, rule["alert"]
