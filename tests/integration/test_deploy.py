"""deploy/ against a real proxy: the Kubernetes ConfigMap's options start one (its file paths pointed at
a temporary directory, its ports at free ones), and the image's health probe follows its metrics port."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import yaml
from proxy_harness import ProxyFactory

from ecr_twisted.testing.doubles import write_htpasswd
from ecr_twisted.testing.emulator import EmulatedECR

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_the_configmap_options_run_a_proxy_the_probe_can_check(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: Path
) -> None:
    env = dict(yaml.safe_load((DEPLOY / "kubernetes" / "configmap.yaml").read_text())["data"])
    auth = tmp_path / "auth"  # what the Secret mounts at /etc/ecrproxy/auth
    auth.mkdir()
    assert env["ECRPROXY_HTPASSWD"] == "/etc/ecrproxy/auth/htpasswd"
    write_htpasswd(str(auth / "htpasswd"), {"alice": "wonderland"})
    (auth / "token.key").write_text(base64.b64encode(os.urandom(48)).decode() + "\n")
    (auth / "token.key").chmod(0o600)
    env = {k: v.replace("/etc/ecrproxy/auth", str(auth)) for k, v in env.items()}
    # --port, --metrics-port, --region and --registry-id given as flags win over the ConfigMap's values
    proxy = proxy_factory(ecr, anonymous=False, env_extra=env)
    assert proxy.metrics_port is not None
    assert proxy.request("/v2/").status == 401
    basic = base64.b64encode(b"alice:wonderland").decode()
    assert proxy.request("/v2/", headers={"Authorization": f"Basic {basic}"}).status == 200

    def probe(metrics_port: str, path: str) -> int:
        probe_env = dict(os.environ, ECRPROXY_METRICS_PORT=metrics_port)
        return subprocess.run([sys.executable, str(DEPLOY / "docker" / "ecrproxy-healthcheck"), path],
                              env=probe_env, capture_output=True, timeout=30).returncode

    for spec in (str(proxy.metrics_port), f"tcp:{proxy.metrics_port}:interface=127.0.0.1"):
        assert probe(spec, "/healthz") == 0 and probe(spec, "/readyz") == 0
