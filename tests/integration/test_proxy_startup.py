"""``twistd ecrproxy`` starting and failing to start, as an operator sees it (issue #12)."""

from __future__ import annotations

import glob
import os
import socket
import tempfile

import bcrypt
import pytest
from proxy_harness import ProxyFactory, free_port, port_open, proxy_env, run_twistd

import ecr_twisted
from ecr_twisted.testing.emulator import EmulatedECR


def _args(ecr: EmulatedECR, port: int, *extra: str) -> list[str]:
    return [
        "-n", "--pidfile=", "ecrproxy", "--port", f"tcp:{port}:interface=127.0.0.1",
        "--region", ecr.region, "--registry-id", ecr.registry_id, "--upstream", ecr.upstream_url, *extra,
    ]


def _key_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ecrproxy-key-*")))


@pytest.mark.parametrize(
    "extra,env,line",
    [
        (["--anonymous", "--upstream-timeout", "abc"], {},
         "twistd ecrproxy: --upstream-timeout: 'abc' is not a number (see --help)"),
        (["--anonymous", "--bogus"], {}, "twistd ecrproxy: option --bogus not recognized (see --help)"),
        (["--anonymous"], {"ECRPROXY_WORKERS": "two"},
         "twistd ecrproxy: ECRPROXY_WORKERS: 'two' is not a whole number (see --help)"),
    ],
    ids=["float-option", "unknown-option", "env-variable"],
)
def test_a_usage_error_is_one_line(ecr: EmulatedECR, extra: list[str], env: dict[str, str], line: str) -> None:
    port = free_port()
    proc = run_twistd(_args(ecr, port, *extra), proxy_env(ecr, extra=env))
    assert proc.returncode == 1
    assert proc.stdout == line + "\n"
    assert not port_open(port)


def test_version(ecr: EmulatedECR) -> None:
    proc = run_twistd(["ecrproxy", "--version"], proxy_env(ecr))
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"ecr-twisted {ecr_twisted.__version__} (Twisted ")


def test_a_port_in_use_is_one_line_and_leaves_nothing_behind(ecr: EmulatedECR, tmp_path) -> None:
    htpasswd = tmp_path / "users"
    htpasswd.write_bytes(b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) + b"\n")
    before = _key_dirs()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pidfile = tmp_path / "twistd.pid"
        args = _args(ecr, port, "--auth", "token", "--htpasswd", str(htpasswd))
        args[1] = f"--pidfile={pidfile}"
        proc = run_twistd(args, proxy_env(ecr))
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout
    [line] = [line for line in proc.stdout.splitlines() if "Address already in use" in line]
    assert str(port) in line  # one process: bound when twistd starts it; --workers: while building
    assert _key_dirs() == before
    assert not pidfile.exists()


def test_startup_line_and_unknown_variables(ecr: EmulatedECR, proxy_factory: ProxyFactory) -> None:
    p = proxy_factory(ecr, env_extra={"ECRPROXY_UPSTREAM_TIMOUT": "5"})
    log = p.log_text()
    [line] = [line for line in log.splitlines() if f"ecr-twisted {ecr_twisted.__version__}:" in line]
    assert "auth=none" in line and "policy=open" in line and f"upstream={ecr.upstream_url}" in line
    assert "unknown variables ignored: ECRPROXY_UPSTREAM_TIMOUT (did you mean ECRPROXY_UPSTREAM_TIMEOUT?)" in log
