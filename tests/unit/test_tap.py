"""Command line and environment: every bad value is a usage error naming its option, before listening."""

import os
import shutil
from typing import Any

import pytest
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.usage import UsageError

from ecr_twisted.app.build import build, proxy_config
from ecr_twisted.app.options import Options, makeService, parse_size

BASE = ["--anonymous", "--region", "eu-west-1"]


def parse(args: list[str], env: dict[str, str] | None = None) -> Options:
    o = Options(environ=env or {})
    o.parseOptions(args)
    return o


def listening(o: Options) -> list[tuple[Any, bool]]:
    """(endpoint, TLS applied by the proxy?) of each registry listener the options make."""
    built = build(o.settings, MemoryReactorClock())
    services = [s for s in built.top if isinstance(s, StreamServerEndpointService)]
    return [(s.endpoint, isinstance(s.factory, TLSMemoryBIOFactory)) for s in services][: len(o.settings.ports)]


def test_defaults() -> None:
    o = parse(BASE)
    assert o["port"] == ["5000"] and o["blob-mode"] == "stream" and o.settings.upstream is None
    assert proxy_config(o.settings).upstream is None
    [(endpoint, is_tls)] = listening(o)
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
        (["--upstream-wait", "0"], "--upstream-wait"),
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
    assert proxy_config(o.settings).public_base == b"https://registry.example.com"
    o = parse(["--port", "7000", "--blob-mode", "stream", "--region", "eu-west-1"], env)
    assert o["port"] == ["7000"] and o["blob-mode"] == "stream" and o["region"] == "eu-west-1"


def test_bad_environment_values_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="ECRPROXY_ANONYMOUS"):
        parse(["--region", "eu-west-1"], {"ECRPROXY_ANONYMOUS": "maybe"})
    with pytest.raises(UsageError, match="ECRPROXY_UPSTREAM_CONNECTIONS"):
        parse(["--anonymous", "--region", "eu-west-1"], {"ECRPROXY_UPSTREAM_CONNECTIONS": "many"})


def test_bare_port_with_tls_files_means_tls(tmp_path) -> None:
    from ecr_twisted.testing.emulator import _make_tls_files

    (tmp_path / "own").mkdir()
    ca, cert, key = _make_tls_files(tmp_path)
    _, own_cert, own_key = _make_tls_files(tmp_path / "own")
    o = parse(BASE + ["--port", "8443", "--port", "tcp:8080:interface=127.0.0.1", "--tls-cert", str(cert),
                      "--tls-key", str(key)])
    # every listener gets the proxy's TLS, endpoint strings included (they were silently plain once)
    assert [wrap for _, wrap in listening(o)] == [True, True]
    # an ssl: endpoint speaks TLS with its own certificate, --tls-cert or not
    for extra in ([], ["--tls-cert", str(cert), "--tls-key", str(key)]):
        o = parse(BASE + ["--port", f"ssl:8443:interface=127.0.0.1:privateKey={own_key}:certKey={own_cert}"] + extra)
        [(endpoint, wrap)] = listening(o)
        assert isinstance(endpoint, TCP4ServerEndpoint) and wrap
        [spec] = build(o.settings, MemoryReactorClock()).listeners
        assert (spec.description, spec.cert, spec.key) == ("tcp:8443:interface=127.0.0.1", str(own_cert), str(own_key))


def test_make_service_builds_listeners_and_metrics() -> None:
    o = parse(BASE + ["--port", "tcp:5001", "--port", "tcp:5002", "--metrics-port", "tcp:9100"])
    top = makeService(o, reactor=MemoryReactorClock())

    def walk(svc: Any) -> list[Any]:
        children = list(svc) if isinstance(svc, service.MultiService) else []
        return [svc] + [s for child in children for s in walk(child)]

    listeners = [s for s in walk(top) if isinstance(s, StreamServerEndpointService)]
    assert len(listeners) == 3


def test_access_must_be_chosen_among_the_auth_modes() -> None:
    with pytest.raises(UsageError, match="--auth none|basic|token"):
        parse(["--region", "eu-west-1"])
    with pytest.raises(UsageError, match="--auth must be one of"):
        parse(["--region", "eu-west-1", "--auth", "kerberos"])
    with pytest.raises(UsageError, match="--anonymous means --auth none"):
        parse(BASE + ["--auth", "basic"])


@pytest.fixture
def htpasswd(tmp_path) -> str:
    from ecr_twisted.testing.doubles import write_htpasswd

    path = str(tmp_path / "htpasswd")
    write_htpasswd(path, {"alice": "pw"})
    return path


@pytest.mark.parametrize(
    "args,named",
    [
        (["--auth", "basic"], "--htpasswd"),
        (["--auth", "basic", "--htpasswd", "/nonexistent"], "--htpasswd"),
        (["--auth", "none", "--htpasswd", "HTPASSWD"], "--htpasswd is for"),
        (["--auth", "webhook"], "--auth-webhook"),
        (["--auth", "webhook", "--auth-webhook", "gopher://x"], "--auth-webhook"),
        (["--auth", "webhook", "--auth-webhook", "http://x/check", "--policy", "open"], "--policy does not apply"),
        (["--auth", "none", "--auth-webhook", "http://x/"], "--auth-webhook is for"),
        (["--auth", "passthrough"], "--upstream URL or --registry-id"),
        (["--auth", "none", "--policy", "everything"], "--policy"),
        (["--auth", "none", "--namespace-pattern", "team-a/("], "--namespace-pattern"),
        (["--auth", "none", "--exclude-pattern", "*"], "--exclude-pattern"),
        (["--auth", "token", "--htpasswd", "HTPASSWD", "--token-ttl", "5"], "--token-ttl"),
        (["--auth", "token", "--htpasswd", "HTPASSWD", "--token-service", 'a"b'], "--token-service"),
    ],
)
def test_bad_auth_options_name_their_option(args: list[str], named: str, htpasswd: str) -> None:
    args = [htpasswd if a == "HTPASSWD" else a for a in args]
    with pytest.raises(UsageError, match=named):
        parse(["--region", "eu-west-1"] + args)


def test_bad_policy_file_is_a_usage_error_with_its_line(tmp_path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('[[rule]]\nprincipals = ["root"]\nactions = ["pull"]\nrepositories = ["*"]\n')
    with pytest.raises(UsageError, match="rule 1: unknown principal"):
        parse(["--region", "eu-west-1", "--auth", "none", "--policy", str(bad)])


def test_policy_defaults_per_mode_and_token_key_for_workers(htpasswd: str, tmp_path) -> None:
    assert parse(["--region", "eu-west-1", "--auth", "none"]).settings.policy == "open"
    o = parse(["--region", "eu-west-1", "--auth", "basic", "--htpasswd", htpasswd])
    assert o.settings.policy == "private"
    o = parse(["--region", "eu-west-1", "--auth", "token", "--htpasswd", htpasswd])
    # no --token-key: one is made for this start, and --workers children are told where it is
    assert o.settings.token_key is None
    built = build(o.settings, MemoryReactorClock())
    made = built.settings.token_key
    try:
        assert made is not None and built.child_argv[-2:] == ("--token-key", made)
        assert len(open(made, "rb").read().strip()) >= 32
    finally:
        if made is not None:
            shutil.rmtree(os.path.dirname(made))
    key = tmp_path / "token.key"
    o = parse(["--region", "eu-west-1", "--auth", "token", "--htpasswd", htpasswd, "--token-key", str(key)])
    assert not key.exists()  # options create nothing
    built = build(o.settings, MemoryReactorClock())
    assert key.stat().st_mode & 0o077 == 0 and built.child_argv.count("--token-key") == 1
    o = parse(["--region", "eu-west-1", "--auth", "passthrough", "--registry-id", "123456789012"])
    assert o["auth"] == "passthrough"


@pytest.mark.parametrize(
    "value,expected",
    [("50GiB", 50 << 30), ("512MiB", 512 << 20), ("10G", 10 * 10**9), ("1.5TiB", int(1.5 * (1 << 40))),
     ("2097152", 2 << 20), ("3 mib", 3 << 20)],
)
def test_cache_sizes(value: str, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "args,named",
    [
        (["--cache-size", "lots"], "--cache-size"),
        (["--cache-size", "100KiB"], "--cache-size"),  # too small for layers
        (["--tag-ttl", "-1"], "--tag-ttl"),
        (["--stale-if-error", "-5"], "--stale-if-error"),
    ],
)
def test_bad_cache_options_name_their_option(args: list[str], named: str) -> None:
    with pytest.raises(UsageError, match=named):
        parse(BASE + args)


def test_the_cache_is_built_only_with_a_directory_and_its_metrics_are_exposed(tmp_path) -> None:
    from prometheus_client import generate_latest

    registry = build(parse(BASE).settings, MemoryReactorClock()).registry
    assert registry.get_sample_value("ecrproxy_cache_size_bytes") is None
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    with pytest.raises(UsageError, match="--cache-dir"):
        parse(BASE + ["--cache-dir", str(a_file)])
    where = tmp_path / "cache"
    o = parse(BASE + ["--cache-dir", str(where), "--cache-size", "1GiB", "--tag-ttl", "5"])
    assert not where.exists()  # options create nothing
    built = build(o.settings, MemoryReactorClock())
    assert (where / "blobs" / "sha256").is_dir() and (where / "tmp").is_dir()
    text = generate_latest(built.registry).decode()
    assert "ecrproxy_cache_size_bytes 0.0" in text and 'ecrproxy_cache_hits_total{kind="blob"} 0.0' in text


# -- reading options has no side effects; the composition root has them all

_PLAIN = (str, bytes, int, float, bool, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _tree(tmp_path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))


def test_options_create_nothing_and_hold_no_reactor_objects(htpasswd: str, tmp_path, monkeypatch) -> None:
    import dataclasses
    import tempfile

    from ecr_twisted.testing.emulator import _make_tls_files

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where a token key for this start would go
    _, cert, key = _make_tls_files(tmp_path)
    for token_key in ([], ["--token-key", str(tmp_path / "keys" / "token.key")]):
        if token_key:
            (tmp_path / "keys").mkdir()
        before = _tree(tmp_path)
        o = parse(["--region", "eu-west-1", "--auth", "token", "--htpasswd", htpasswd, "--cache-dir",
                   str(tmp_path / "cache" / "deep"), "--port", "5001", "--port",
                   f"ssl:5002:privateKey={key}:certKey={cert}", "--tls-cert", str(cert), "--tls-key", str(key),
                   "--metrics-port", "tcp:9100", "--workers", "2"] + token_key)
        assert _tree(tmp_path) == before, "parsing options created files or directories"
        assert all(_plain(v) for v in o.values()), {k: v for k, v in o.items() if not _plain(v)}
        settings = o.settings
        assert dataclasses.is_dataclass(settings) and settings.__dataclass_params__.frozen  # type: ignore[attr-defined]
        assert all(_plain(getattr(settings, f.name)) for f in dataclasses.fields(settings))
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.settings.workers = 3  # type: ignore[misc]


def test_build_listens_on_the_reactor_it_is_given(tmp_path) -> None:
    from ecr_twisted.http.server import RelayFactory
    from ecr_twisted.testing.emulator import _make_tls_files

    _, cert, key = _make_tls_files(tmp_path)
    o = parse(BASE + ["--port", "tcp:5001:interface=127.0.0.1", "--port", f"ssl:5002:privateKey={key}:certKey={cert}",
                      "--metrics-port", "tcp:9100", "--cache-dir", str(tmp_path / "cache")])
    reactor = MemoryReactorClock()
    built = build(o.settings, reactor)
    assert reactor.tcpServers == []  # nothing listens before the tree starts
    built.top.startService()
    try:
        listening = [(port, interface) for port, _, _, interface in reactor.tcpServers]
        assert listening == [(5001, "127.0.0.1"), (5002, ""), (9100, "")]
        relay, tls, ops = (factory for _, factory, _, _ in reactor.tcpServers)
        assert isinstance(relay, RelayFactory) and relay.reactor is reactor and relay.handler is built.proxy.handler
        assert isinstance(tls, TLSMemoryBIOFactory) and tls.wrappedFactory.pool is built.proxy.pool
        assert ops is not relay
        assert built.proxy.pool.reactor is reactor and built.proxy.cache is not None
        assert built.proxy.cache.clock is reactor
        assert reactor.getDelayedCalls(), "token refreshes and cache rescans run on the given reactor"
    finally:
        built.top.stopService()
    assert all(not call.active() for call in reactor.getDelayedCalls())


def test_ssl_descriptions_become_tcp_with_the_files_they_name() -> None:
    from ecr_twisted.app.listeners import DescriptionError, listener_spec, parse_description

    spec = listener_spec(r"ssl:8443:interface=\:\:1:backlog=5:privateKey=/k\:ey.pem:certKey=/c.pem")
    assert (spec.description, spec.cert, spec.key) == (r"tcp:8443:interface=\:\:1:backlog=5", "/c.pem", "/k:ey.pem")
    assert parse_description(spec.description).kwargs == {"interface": "::1", "backlog": "5"}
    assert listener_spec("ssl:port=443:privateKey=/both.pem").cert == "/both.pem"  # Twisted's certKey default
    assert listener_spec("5000").description == "tcp:5000" and not listener_spec("5000").tls
    assert listener_spec("unix:/run/x.sock", "/c", "/k") == type(spec)("unix:/run/x.sock", "/c", "/k")
    for bad in ("ssl:443:privateKey=/k:extraCertChain=/c.pem", "ssl:443:privateKey=/k:nonsense=1", "ssl:privateKey=/k"):
        with pytest.raises(DescriptionError):
            listener_spec(bad)
