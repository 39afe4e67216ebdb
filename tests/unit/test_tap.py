"""Command line and environment: every bad value is a usage error naming its option, before listening."""

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.python.usage import UsageError

from ecr_twisted.tap import Options, makeService

BASE = ["--anonymous", "--region", "eu-west-1"]


def parse(args: list[str], env: dict[str, str] | None = None) -> Options:
    o = Options(environ=env or {})
    o.parseOptions(args)
    return o


def test_defaults() -> None:
    o = parse(BASE)
    assert o["port"] == ["5000"] and o["blob-mode"] == "stream" and o["upstream-origin"] is None
    [(endpoint, is_tls)] = o["listeners"]
    assert isinstance(endpoint, TCP4ServerEndpoint) and not is_tls


def test_access_must_be_chosen() -> None:
    with pytest.raises(UsageError, match="--anonymous"):
        parse(["--region", "eu-west-1"])


@pytest.mark.parametrize(
    "args,named",
    [
        (["--blob-mode", "copy"], "--blob-mode"),
        (["--registry-id", "12345"], "--registry-id"),
        (["--region", "moon"], "--region"),
        (["--upstream", "ftp://x"], "--upstream"),
        (["--upstream", "https://x/path"], "--upstream"),
        (["--public-url", "registry.example.com"], "--public-url"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "--tls-cert"),
        (["--tls-cert", "/etc/hostname"], "--tls-key"),
        (["--upstream-ca", "/nonexistent"], "--upstream-ca"),
        (["--port", "nonsense:1"], "--port"),
        (["--port", "99999"], "--port"),
        (["--metrics-port", "bogus:x"], "--metrics-port"),
        (["--upstream-connections", "0"], "--upstream-connections"),
        (["--upload-timeout", "-1"], "--upload-timeout"),
    ],
)
def test_bad_values_name_their_option(args: list[str], named: str) -> None:
    with pytest.raises(UsageError, match=named):
        parse(BASE + args)


def test_environment_configures_and_the_command_line_wins() -> None:
    env = {
        "ECRPROXY_ANONYMOUS": "true",
        "ECRPROXY_REGION": "us-east-2",
        "ECRPROXY_PORT": "tcp:6000:interface=127.0.0.1, 6001",
        "ECRPROXY_BLOB_MODE": "redirect",
        "ECRPROXY_UPSTREAM_CONNECTIONS": "8",
        "ECRPROXY_PUBLIC_URL": "https://registry.example.com",
    }
    o = parse([], env)
    assert o["region"] == "us-east-2" and o["blob-mode"] == "redirect" and o["upstream-connections"] == 8
    assert o["port"] == ["tcp:6000:interface=127.0.0.1", "6001"]
    assert o["public-base"] == b"https://registry.example.com"
    o = parse(["--port", "7000", "--blob-mode", "stream", "--region", "eu-west-1"], env)
    assert o["port"] == ["7000"] and o["blob-mode"] == "stream" and o["region"] == "eu-west-1"


def test_bad_environment_values_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="ECRPROXY_ANONYMOUS"):
        parse(["--region", "eu-west-1"], {"ECRPROXY_ANONYMOUS": "maybe"})
    with pytest.raises(UsageError, match="ECRPROXY_UPSTREAM_CONNECTIONS"):
        Options(environ={"ECRPROXY_UPSTREAM_CONNECTIONS": "many"})


def test_bare_port_with_tls_files_means_tls(tmp_path) -> None:
    from ecr_twisted.emulator import _make_tls_files

    ca, cert, key = _make_tls_files(tmp_path)
    o = parse(BASE + ["--port", "8443", "--port", "tcp:8080:interface=127.0.0.1", "--tls-cert", str(cert),
                      "--tls-key", str(key)])
    # every listener gets the proxy's TLS, endpoint strings included (they were silently plain once)
    assert [wrap for _, wrap in o["listeners"]] == [True, True]
    o = parse(BASE + ["--port", f"ssl:8443:privateKey={key}:certKey={cert}"])
    [(endpoint, wrap)] = o["listeners"]
    assert isinstance(endpoint, SSL4ServerEndpoint) and not wrap


def test_make_service_builds_listeners_and_metrics() -> None:
    from twisted.internet.testing import MemoryReactorClock

    o = parse(BASE + ["--port", "tcp:5001", "--port", "tcp:5002", "--metrics-port", "tcp:9100"])
    top = makeService(o, reactor=MemoryReactorClock())
    listeners = [s for s in top if isinstance(s, StreamServerEndpointService)]
    assert len(listeners) == 3
