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

def exposed_metrics(tmp_path: Path) -> dict[str, set[str]]:
    """Every sample name a scrape of a proxy with a layer cache can show, with its label names
    (labelled families that have seen no traffic yet show only their # TYPE line: their sample names
    follow from the type, their label names from the metric objects behind them)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from ecr_twisted.testing.doubles import Harness

    h = Harness(cache_dir=str(tmp_path / "cache"))
    try:
        scrape = generate_latest(h.registry).decode()
        declared = {getattr(c, "_name", None): set(getattr(c, "_labelnames", ()))
                    for c in list(h.registry._collector_to_names)}
    finally:
        h.close()
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                "summary": ["_sum", "_count", "_created", ""], "gauge": [""], "info": ["_info"]}
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scrape):
        labels = set(declared.get(family.name, set()))
        labels |= {label for sample in family.samples for label in sample.labels}
        for name in [family.name + suffix for suffix in suffixes.get(family.type, [""])] + [
                sample.name for sample in family.samples]:
            names[name] = labels | ({"le"} if name.endswith("_bucket") else set())
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


TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series


def promql_labels(expr: str) -> set[str]:
    """Label names an expression matches on, groups by, or a Grafana legend shows."""
    import re

    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = {m.group(1) for matchers in re.findall(r"\{([^}]*)\}", e)
             for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers)}
    for group in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", e):
        names |= {name.strip() for name in group.split(",") if name.strip()}
    return names


def check_expression(expr: str, metrics: dict[str, set[str]], legend: str = "") -> set[str]:
    """The metric names `expr` uses, after checking that each exists and each label name it (or its
    legend) uses is one of theirs; AssertionError otherwise."""
    import re

    names = promql_metrics(expr)
    assert names, f"no metric in {expr!r}"
    assert names <= set(metrics), f"not exposed: {sorted(names - set(metrics))} in {expr!r}"
    known = TARGET_LABELS.union(*(metrics[name] for name in names))
    labels = promql_labels(expr) | set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))
    assert labels <= known, f"unknown labels {sorted(labels - known)} in {expr!r}"
    return names


def test_promql_labels_finds_matchers_groupings_and_nothing_in_strings() -> None:
    assert promql_labels('sum by (route, le) (rate(x{route=~"a|b", status!="2.."}[5m])) / on(instance) y') == {
        "route", "le", "status", "instance"}


@pytest.fixture(scope="module")
def metrics(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    names = exposed_metrics(tmp_path_factory.mktemp("scrape"))
    assert {"ecrproxy_token_expiry_timestamp_seconds", "ecrproxy_token_refresh_total",
            "ecrproxy_request_duration_seconds_bucket", "ecrproxy_cache_disk_full_total"} <= set(names)
    assert names["ecrproxy_requests_total"] == {"method", "route", "status"}
    assert names["ecrproxy_cache_hits_total"] == {"kind"}
    assert names["ecrproxy_request_duration_seconds_bucket"] == {"route", "le"}
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


def test_the_alert_rules_use_only_exposed_metrics_and_labels(metrics: dict[str, set[str]]) -> None:
    import re

    used: set[str] = set()
    for rule in alert_rules():
        used |= check_expression(str(rule["expr"]), metrics)
        annotations = " ".join(map(str, dict(rule.get("annotations", {})).values()))  # type: ignore[call-overload]
        labels = set(re.findall(r"\$labels\.([A-Za-z_][A-Za-z0-9_]*)", annotations))
        assert labels <= TARGET_LABELS | promql_labels(str(rule["expr"])), (rule["alert"], labels)
    wanted = {"ecrproxy_token_expiry_timestamp_seconds", "ecrproxy_token_refresh_total",
              "ecrproxy_upstream_errors_total", "ecrproxy_requests_total", "ecrproxy_cache_disk_full_total",
              "ecrproxy_request_duration_seconds_bucket"}
    assert wanted <= used


def test_every_alert_rule_is_unit_tested() -> None:
    tested = (PROMETHEUS / "alerts_test.yaml").read_text()
    for rule in alert_rules():
        assert f"alertname: {rule['alert']}" in tested, rule["alert"]


# --- Kubernetes manifests ---

KUBERNETES = DEPLOY / "kubernetes"


def load_yaml(path: Path) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render_kustomization() -> list[dict]:
    """What `kubectl kustomize deploy/kubernetes` makes of the features kustomization.yaml uses:
    its resources in order, with `labels` added to each object's metadata and `images` applied."""
    (kustomization,) = load_yaml(KUBERNETES / "kustomization.yaml")
    assert set(kustomization) <= {"apiVersion", "kind", "labels", "resources", "images"}, "render() knows no more"
    objects = [obj for name in kustomization["resources"] for obj in load_yaml(KUBERNETES / name)]
    for obj in objects:
        for entry in kustomization.get("labels", []):
            assert not entry.get("includeSelectors") and not entry.get("includeTemplates")
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            for image in kustomization.get("images", []):
                if container["image"] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def by_kind(objects: list[dict]) -> dict[str, dict]:
    kinds = {obj["kind"]: obj for obj in objects}
    assert len(kinds) == len(objects), "one object of each kind"
    return kinds


def test_the_kustomization_renders_to_valid_kubernetes_objects() -> None:
    import kubernetes_validate

    objects = render_kustomization()
    assert sorted(obj["kind"] for obj in objects) == sorted([
        "ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"])
    version = kubernetes_validate.latest_version()
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}: {str(e).splitlines()[0]}")
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "ecr-twisted"
    in_kustomization = {name for name in load_yaml(KUBERNETES / "kustomization.yaml")[0]["resources"]}
    on_disk = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk - in_kustomization == {"servicemonitor.yaml"}  # optional: needs the Prometheus Operator


def test_the_deployment_is_probed_drained_and_locked_down() -> None:
    kinds = by_kind(render_kustomization())
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 5000, "metrics": 9100}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # the proxy drains up to 30 s after SIGTERM (after the preStop pause): SIGKILL must come later
    env = kinds["ConfigMap"]["data"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] == 45 >= pre_stop + int(env["ECRPROXY_DRAIN_TIMEOUT"]) + 5
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert "USER 10001:10001" in (ROOT / "Dockerfile").read_text()
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert "memory" in container["resources"]["requests"] and "memory" in container["resources"]["limits"]
    # writable places on a read-only root: emptyDirs for /tmp and the optional cache
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    cache_dir = "/var/cache/ecrproxy"
    assert "emptyDir" in volumes[mounts[cache_dir]]
    assert f"# ECRPROXY_CACHE_DIR: {cache_dir}" in (KUBERNETES / "configmap.yaml").read_text()
    # options from the ConfigMap, the htpasswd and the token key from a Secret, credentials by IRSA
    assert container["envFrom"] == [{"configMapRef": {"name": kinds["ConfigMap"]["metadata"]["name"]}}]
    auth_dir = next(path for path, name in mounts.items() if "secret" in volumes[name])
    assert env["ECRPROXY_HTPASSWD"] == f"{auth_dir}/htpasswd" and env["ECRPROXY_TOKEN_KEY"] == f"{auth_dir}/token.key"
    assert env["ECRPROXY_METRICS_PORT"] == str(ports["metrics"]) and env["ECRPROXY_PORT"] == str(ports["http"])
    assert all(key.startswith("ECRPROXY_") for key in env)
    account = kinds["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_the_configmap_names_only_real_options() -> None:
    from ecr_twisted.app.options import ENV_PREFIX, Options

    options = Options(environ={})
    known = {ENV_PREFIX + name.upper().replace("-", "_") for name in options.keys()}
    # --drain-timeout comes with the drain work of issue #12; unknown ECRPROXY_* variables are ignored
    env = set(by_kind(render_kustomization())["ConfigMap"]["data"]) - {"ECRPROXY_DRAIN_TIMEOUT"}
    assert env <= known, env - known


def test_service_pdb_hpa_and_servicemonitor_select_the_deployment() -> None:
    kinds = by_kind(render_kustomization())
    deployment = kinds["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {"http": "http", "metrics": "metrics"}
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["minAvailable"] < kinds["HorizontalPodAutoscaler"]["spec"][
        "minReplicas"]
    target = kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (monitor,) = load_yaml(KUBERNETES / "servicemonitor.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


# --- systemd unit ---

UNIT = DEPLOY / "systemd" / "ecr-twisted.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_systemd_unit_stops_after_the_drain_and_runs_the_proxy() -> None:
    s = unit_settings()
    assert s["KillSignal"] == ["SIGTERM"] and s["TimeoutStopSec"] == ["45"] and s["KillMode"] == ["mixed"]
    assert s["ExecStart"] == ["/opt/ecrproxy/bin/twistd --nodaemon --pidfile= ecrproxy"]
    assert s["User"] == ["ecrproxy"] and s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]


def test_systemd_analyze_accepts_the_unit_and_rates_it_well_hardened(tmp_path: Path) -> None:
    import re
    import shutil

    # verify wants ExecStart's program to exist: the same unit, pointed at a program that does
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/ecrproxy/bin/twistd", str(shutil.which("true"))))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", verify.stdout + verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True,
                              text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert exposure is not None, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 2.5  # "OK" in systemd's scale (10 = unprotected)


# --- Grafana dashboard ---

DASHBOARD = DEPLOY / "grafana" / "ecr-twisted.json"


def test_the_dashboard_parses_and_its_panels_use_only_exposed_metrics(metrics: dict[str, set[str]]) -> None:
    import json
    import re

    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ecr-twisted" and dashboard["title"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and len(panels) >= 10
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            try:
                used |= check_expression(target["expr"], metrics, target.get("legendFormat", ""))
            except AssertionError as e:
                raise AssertionError(f"panel {panel['title']!r}: {e}") from None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    (metric,) = re.findall(r"label_values\((\w+), instance\)", variables["instance"]["query"]["query"])
    assert metric in metrics
    # the families an operator looks at first all show (a fixed list: metrics added later need not)
    assert {"ecrproxy_requests_total", "ecrproxy_request_duration_seconds_bucket", "ecrproxy_upstream_errors_total",
            "ecrproxy_upstream_response_seconds_bucket", "ecrproxy_token_expiry_timestamp_seconds",
            "ecrproxy_token_refresh_total", "ecrproxy_cache_hits_total", "ecrproxy_cache_size_bytes",
            "ecrproxy_cache_disk_full_total", "ecrproxy_client_connections", "ecrproxy_upstream_refused_total"} <= used
