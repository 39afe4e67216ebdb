"""``twistd ecrproxy`` as an operator starts it: usage errors, and ECRPROXY_* variables instead of flags."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest
from proxy_harness import (
    MANIFEST_ACCEPT,
    Proxy,
    ProxyFactory,
    free_port,
    port_open,
    proxy_env,
    run_twistd,
)

from ecr_twisted.testing.emulator import EmulatedECR


def _base_args(ecr: EmulatedECR, port: int) -> list[str]:
    return [
        "-n", "--pidfile=", "ecrproxy",
        "--port", f"tcp:{port}:interface=127.0.0.1",
        "--region", ecr.region, "--registry-id", ecr.registry_id,
        "--upstream", ecr.upstream_url,
    ]


@pytest.mark.parametrize(
    "extra,needle",
    [
        ([], "--anonymous"),
        (["--anonymous", "--blob-mode", "bogus"], "--blob-mode"),
        (["--anonymous", "--registry-id", "12345"], "--registry-id"),
        (["--anonymous", "--upstream-ca", "/nonexistent/ca.pem"], "--upstream-ca"),
        (["--anonymous", "--tls-cert", "/nonexistent/cert.pem"], "--tls-key"),
    ],
    ids=["no-anonymous", "blob-mode", "registry-id", "upstream-ca", "tls-cert-alone"],
)
def test_usage_errors_exit_before_listening(ecr: EmulatedECR, extra: list[str], needle: str) -> None:
    port = free_port()
    started = time.monotonic()
    proc = run_twistd(_base_args(ecr, port) + extra, proxy_env(ecr), timeout=30)
    assert proc.returncode != 0, proc.stdout
    assert needle in proc.stdout, proc.stdout[-2000:]
    assert "RelayFactory starting" not in proc.stdout and "starting on" not in proc.stdout
    assert not port_open(port)
    assert time.monotonic() - started < 30


def test_anonymous_from_environment(ecr: EmulatedECR, proxy_factory: ProxyFactory) -> None:
    p = proxy_factory(ecr, anonymous=False, env_extra={"ECRPROXY_ANONYMOUS": "1"})
    assert "--anonymous" not in p.args
    r = p.request("/v2/")
    assert r.status == 200 and r.body == b"{}"


def test_anonymous_env_false_is_refused(ecr: EmulatedECR) -> None:
    env = proxy_env(ecr, extra={"ECRPROXY_ANONYMOUS": "0"})
    proc = run_twistd(_base_args(ecr, free_port()), env)
    assert proc.returncode != 0 and "--anonymous" in proc.stdout


def test_port_and_options_from_environment(ecr: EmulatedECR, proxy_factory: ProxyFactory) -> None:
    """ECRPROXY_PORT (no --port at all), and a few more ECRPROXY_* settings, with redirect blob mode."""
    port = free_port()
    p = proxy_factory(
        ecr,
        port_spec="",  # no --port flag
        port=port,
        env_extra={
            "ECRPROXY_PORT": f"tcp:{port}:interface=127.0.0.1",
            "ECRPROXY_BLOB_MODE": "redirect",
            "ECRPROXY_PUBLIC_URL": "https://env.example.com",
        },
    )
    assert "--port" not in p.args
    assert p.request("/v2/").status == 200
    post = p.request("/v2/cli/env/blobs/uploads/", "POST", headers={"Content-Length": "0"})
    assert post.status == 202
    assert (post.header("Location") or "").startswith("https://env.example.com/v2/cli/env/blobs/uploads/")


def test_command_line_wins_over_environment(ecr: EmulatedECR, proxy_factory: ProxyFactory) -> None:
    env_port = free_port()
    p = proxy_factory(ecr, env_extra={"ECRPROXY_PORT": f"tcp:{env_port}:interface=127.0.0.1",
                                      "ECRPROXY_BLOB_MODE": "bogus-but-overridden"}, blob_mode="stream")
    assert p.request("/v2/").status == 200
    assert not port_open(env_port)


def test_ecr_endpoint_flag_without_env(ecr: EmulatedECR, proxy_factory: ProxyFactory) -> None:
    """--ecr-endpoint-url alone (AWS_ENDPOINT_URL_ECR removed) finds the ECR API; the token works upstream."""
    p = proxy_factory(ecr, ecr_endpoint_flag=True)
    assert "AWS_ENDPOINT_URL_ECR" not in p.env
    assert p.request("/v2/").status == 200
    assert p.request("/v2/cli/none/manifests/latest", headers={"Accept": MANIFEST_ACCEPT}).status == 404


def test_sigterm_stops_cleanly(ecr: EmulatedECR, proxy_factory: ProxyFactory) -> None:
    p: Proxy = proxy_factory(ecr)
    port, metrics_port = p.port, p.metrics_port
    assert p.request("/v2/").status == 200
    rc = p.stop()
    # twistd shuts down cleanly, then re-raises SIGTERM so the exit status names the signal
    assert rc in (0, -signal.SIGTERM), p.log_tail()
    assert port is not None and not port_open(port)
    assert metrics_port is not None and not port_open(metrics_port)
    assert "Server Shut Down" in p.log_text()


@pytest.mark.parametrize("busy_option", ["--port", "--metrics-port"])
def test_port_in_use_exits_nonzero(ecr: EmulatedECR, busy_option: str) -> None:
    """A listener that cannot be bound must stop the proxy with an error, not leave a process
    that looks healthy (/healthz, even /readyz 200) while it serves nothing.

    Open bug: tap.makeService adds StreamServerEndpointService without
    ``_raiseSynchronously = True`` (which twisted.application.strports.service sets), so
    twistd logs "Unhandled Error ... CannotListenError" and keeps running.
    """
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_spec = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        other_spec = f"tcp:{free_port()}:interface=127.0.0.1"
        args = ["-n", "--pidfile=", "ecrproxy", "--anonymous", "--region", ecr.region,
                "--upstream", ecr.upstream_url]
        if busy_option == "--port":
            args += ["--port", busy_spec, "--metrics-port", other_spec]
        else:
            args += ["--port", other_spec, "--metrics-port", busy_spec]
        try:
            proc = run_twistd(args, proxy_env(ecr), timeout=10)
        except subprocess.TimeoutExpired as e:  # run() has killed it
            out = e.output.decode() if isinstance(e.output, bytes) else (e.output or "")
            proc = None
    if proc is None:
        pytest.fail(f"the proxy kept running with {busy_option} unbindable; log:\n{out[-1200:]}", pytrace=False)
    assert proc.returncode != 0
    assert "Address already in use" in proc.stdout or "CannotListenError" in proc.stdout
