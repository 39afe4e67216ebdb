"""The egress proxy (#13): which origins go through it, what is said to it, and the CONNECT
tunnel, over in-memory transports. Credentials never appear in what is shown or logged."""

from __future__ import annotations

import base64
import os
import pathlib
import urllib.request
from dataclasses import replace
from typing import Any, cast

import pytest
from twisted.internet import error as ierror
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect

from ecr_twisted.app.build import build_proxy
from ecr_twisted.app.options import Options
from ecr_twisted.http.egress import (
    EgressProxy,
    EgressRules,
    NoProxy,
    absolute_form,
    connect_request,
    forwarded_keep_alive,
    parse_proxy_url,
)
from ecr_twisted.http.http11 import parse_response_head
from ecr_twisted.http.origin import Origin, UpstreamError
from ecr_twisted.http.tls import client_creator_factory, server_options
from ecr_twisted.http.tunnel import MAX_CONNECT_HEAD, TunnelEndpoint
from ecr_twisted.http.upstream import ForwardedConnection, UpstreamConnection, UpstreamPool
from ecr_twisted.registry.handler import ProxyConfig
from ecr_twisted.testing.doubles import Harness
from ecr_twisted.testing.emulator import _make_tls_files

PASSWORD = "s3cr3t:p@ss/word"  # every character that needs percent-encoding in a URL's userinfo
URL = "http://alice:s3cr3t%3Ap%40ss%2Fword@proxy.corp.example:3128"
BASIC = b"Basic " + base64.b64encode(b"alice:" + PASSWORD.encode())
REGISTRY = Origin("https", "123456789012.dkr.ecr.eu-west-1.amazonaws.com")
PLAIN = Origin("http", "mirror.internal", 5000)


def secret_forms() -> list[str]:
    return [PASSWORD, "s3cr3t%3Ap%40ss%2Fword", BASIC.decode()[6:], "alice"]


def assert_no_credentials(text: str) -> None:
    for form in secret_forms():
        assert form not in text, form


# ---------------------------------------------------------------- the proxy URL
def test_proxy_url_with_percent_encoded_credentials() -> None:
    p = parse_proxy_url(URL)
    assert (p.host, p.port) == ("proxy.corp.example", 3128)
    assert p.auth_line == b"Proxy-Authorization: " + BASIC + b"\r\n"
    assert p.shown == "http://proxy.corp.example:3128"
    for text in (repr(p), str(p), p.shown, f"{p}"):
        assert_no_credentials(text)
    assert "with credentials" in repr(p)


@pytest.mark.parametrize(
    "url,host,port,auth",
    [
        ("http://proxy:8080", "proxy", 8080, b""),
        ("http://proxy", "proxy", 80, b""),  # Go's default for http
        ("proxy.example:3128", "proxy.example", 3128, b""),  # no scheme: http, as curl and Go
        ("HTTP://Proxy.Example:3128/", "proxy.example", 3128, b""),
        ("http://[fd00::1]:3128", "fd00::1", 3128, b""),
        ("http://bob@proxy:1", "proxy", 1, b"Proxy-Authorization: Basic " + base64.b64encode(b"bob:") + b"\r\n"),
        ("  http://proxy:9  ", "proxy", 9, b""),
    ],
)
def test_proxy_urls(url: str, host: str, port: int, auth: bytes) -> None:
    p = parse_proxy_url(url)
    assert (p.host, p.port, p.auth_line) == (host, port, auth)


def test_ipv6_proxy_is_shown_bracketed() -> None:
    assert parse_proxy_url("http://[fd00::1]:3128").shown == "http://[fd00::1]:3128"


@pytest.mark.parametrize(
    "url,says",
    [
        ("https://alice:s3cr3t@proxy:443", "only http://"),
        ("socks5://alice:s3cr3t@proxy:1080", "only http://"),
        ("http://alice:s3cr3t@:3128", "no host"),
        ("http://alice:s3cr3t@proxy:3128/path", "no path"),
        ("http://alice:s3cr3t@proxy:99999", "not a proxy URL"),
        ("http://alice:s3cr3t@proxy:port", "not a proxy URL"),
    ],
)
def test_bad_proxy_urls_say_why_without_the_password(url: str, says: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_proxy_url(url, "HTTPS_PROXY")
    assert says in str(e.value) and str(e.value).startswith("HTTPS_PROXY: ")
    assert "s3cr3t" not in str(e.value) and "alice" not in str(e.value)


# ---------------------------------------------------------------- NO_PROXY
@pytest.mark.parametrize(
    "value,host,port,direct",
    [
        ("", "example.com", 443, False),
        ("*", "anything.example", 443, True),
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),  # the domain and everything under it
        ("example.com", "notexample.com", 443, False),  # a suffix only at a dot
        (".example.com", "example.com", 443, True),  # the leading dot is dropped (curl, Python)
        (".example.com", "a.b.example.com", 443, True),
        ("*.example.com", "a.example.com", 443, True),
        ("EXAMPLE.com", "Api.Example.COM", 443, True),  # case-insensitive
        ("example.com.", "api.example.com", 443, True),  # trailing dots ignored
        ("example.com", "api.example.com.", 443, True),
        (" a.test , example.com ,", "example.com", 443, True),  # spaces and empty entries
        ("a.test,b.test", "c.test", 443, False),
        ("example.com:5000", "example.com", 5000, True),  # with a port: that port only (Go)
        ("example.com:5000", "example.com", 443, False),
        ("10.1.2.3", "10.1.2.3", 443, True),
        ("10.1.2.3", "10.1.2.4", 443, False),
        ("10.0.0.0/8", "10.200.3.4", 443, True),  # CIDR (curl, Go)
        ("10.0.0.0/8", "11.0.0.1", 443, False),
        ("10.0.0.0/8", "ten.example", 443, False),  # names are never resolved for it
        ("10.1.2.3:80", "10.1.2.3", 80, True),
        ("10.1.2.3:80", "10.1.2.3", 443, False),
        ("::1", "::1", 443, True),
        ("[::1]:5000", "::1", 5000, True),
        ("[::1]:5000", "::1", 5001, False),
        ("fd00::/8", "fd12::5", 443, True),
        ("fd00::/8", "10.0.0.1", 443, False),
        ("127.0.0.1", "localhost", 443, False),  # no loopback exemption, no resolving
        ("localhost", "127.0.0.1", 443, False),
        ("exa[mple", "example", 443, False),  # nonsense matches nothing
        ("example.com:http", "example.com", 80, False),
    ],
)
def test_no_proxy_table(value: str, host: str, port: int, direct: bool) -> None:
    assert NoProxy(value).matches(host, port) is direct


# ---------------------------------------------------------------- the rules
def test_rules_from_the_environment() -> None:
    env = (
        ("HTTPS_PROXY", "http://upper:1"), ("https_proxy", "http://lower:2"),  # lower case wins (curl, Python)
        ("HTTP_PROXY", "http://plain:3"),
        ("NO_PROXY", "ignored.example"), ("no_proxy", "mirror.internal,.s3.amazonaws.com"),
    )
    rules = EgressRules.from_settings(None, env)
    assert rules.proxy_for(REGISTRY) == EgressProxy("lower", 2)
    assert rules.proxy_for(Origin("http", "registry.example")) == EgressProxy("plain", 3)
    assert rules.proxy_for(PLAIN) is None  # no_proxy
    assert rules.proxy_for(Origin("https", "bucket.s3.amazonaws.com")) is None
    assert rules.proxy_for(Origin("https", "ignored.example")) == EgressProxy("lower", 2)  # NO_PROXY lost to no_proxy


def test_egress_proxy_wins_for_both_schemes_and_no_proxy_still_applies() -> None:
    env = (("HTTPS_PROXY", "http://env:1"), ("HTTP_PROXY", "http://env:2"), ("NO_PROXY", "mirror.internal"))
    rules = EgressRules.from_settings(URL, env)
    assert rules.proxy_for(REGISTRY) == parse_proxy_url(URL)
    assert rules.proxy_for(Origin("http", "registry.example")) == parse_proxy_url(URL)
    assert rules.proxy_for(PLAIN) is None


def test_only_https_proxy_leaves_http_origins_direct() -> None:
    rules = EgressRules.from_settings(None, (("HTTPS_PROXY", "http://p:1"), ("HTTP_PROXY", "  ")))
    assert rules.proxy_for(REGISTRY) == EgressProxy("p", 1)
    assert rules.proxy_for(PLAIN) is None
    assert rules


def test_a_lower_case_name_set_to_nothing_means_no_proxy() -> None:
    """As in Python's urllib, which the ECR API child (botocore) goes by: both legs agree."""
    rules = EgressRules.from_settings(None, (("HTTPS_PROXY", "http://p:1"), ("https_proxy", "")))
    assert rules.proxy_for(REGISTRY) is None


@pytest.mark.parametrize(
    "environ",
    [
        {"HTTPS_PROXY": "http://upper:1", "https_proxy": ""},  # lower case set to nothing: no proxy
        {"HTTPS_PROXY": "", "https_proxy": "http://lower:2"},
        {"HTTPS_PROXY": "http://upper:1"},
        {"HTTPS_PROXY": ""},
        {"https_proxy": ""},
        {"HTTP_PROXY": "http://upper:3", "http_proxy": "", "HTTPS_PROXY": "http://upper:1"},
        {"HTTP_PROXY": "http://upper:3", "NO_PROXY": "registry.example", "no_proxy": ""},
        {"HTTP_PROXY": "http://upper:3", "NO_PROXY": "registry.example"},
        {"HTTP_PROXY": "http://upper:3", "no_proxy": "registry.example", "NO_PROXY": ""},
    ],
)
def test_the_data_path_reads_the_environment_as_python_does(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the environment through Options to the rules, as botocore (urllib) in the ECR API
    child reads the same variables: an empty lower-case one must reach the rules, not be dropped."""
    o = Options(environ=environ)
    o.parseOptions(["--anonymous", "--region", "eu-west-1", "--registry-id", "123456789012"])
    rules = EgressRules.from_settings(None, o.settings.proxy_env)
    monkeypatch.setattr(os, "environ", dict(environ))
    proxies = urllib.request.getproxies_environment()
    for origin in (REGISTRY, Origin("http", "registry.example")):
        python = proxies.get(origin.scheme)
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # not in typeshed
        if python is not None and bypass(origin.host, proxies):
            python = None
        assert rules.proxy_for(origin) == (parse_proxy_url(python) if python else None), origin


def test_no_proxy_variables_means_no_rules() -> None:
    rules = EgressRules.from_settings(None, (("NO_PROXY", "*"), ("HTTPS_PROXY", "")))
    assert not rules
    assert rules.proxy_for(REGISTRY) is None


def test_a_bad_url_in_the_environment_is_named() -> None:
    with pytest.raises(ValueError, match="^https_proxy: only http://"):
        EgressRules.from_settings(None, (("https_proxy", "https://alice:s3cr3t@p:1"),))
    with pytest.raises(ValueError, match="^--egress-proxy: no host"):
        EgressRules.from_settings("http://:1", ())


def test_describe_and_repr_never_show_credentials() -> None:
    rules = EgressRules.from_settings(URL, (("NO_PROXY", "a,b"),))
    line = rules.describe()
    assert line == (
        "egress proxy: https origins via http://proxy.corp.example:3128 (with credentials), "
        "http origins via http://proxy.corp.example:3128 (with credentials), NO_PROXY with 2 entries"
    )
    assert_no_credentials(line)
    assert_no_credentials(repr(rules))


# ---------------------------------------------------------------- what is said to the proxy
def test_connect_request_always_names_the_port() -> None:
    proxy = parse_proxy_url(URL)
    assert connect_request(proxy, REGISTRY) == (
        b"CONNECT 123456789012.dkr.ecr.eu-west-1.amazonaws.com:443 HTTP/1.1\r\n"
        b"Host: 123456789012.dkr.ecr.eu-west-1.amazonaws.com:443\r\n"
        b"Proxy-Authorization: " + BASIC + b"\r\n\r\n"
    )
    assert connect_request(EgressProxy("p", 1), Origin("https", "::1", 8443)) == (
        b"CONNECT [::1]:8443 HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n"
    )


def test_absolute_form() -> None:
    head = b"GET /v2/app/manifests/1?x=1 HTTP/1.1\r\nHost: mirror.internal:5000\r\nAccept: */*\r\n\r\n"
    auth = b"Proxy-Authorization: Basic eA==\r\n"
    assert absolute_form(head, PLAIN.base, auth) == (
        b"GET http://mirror.internal:5000/v2/app/manifests/1?x=1 HTTP/1.1\r\n"
        b"Proxy-Authorization: Basic eA==\r\n"
        b"Host: mirror.internal:5000\r\nAccept: */*\r\n\r\n"
    )
    assert absolute_form(head, PLAIN.base, b"").startswith(b"GET http://mirror.internal:5000/v2/app/manifests/1?x=1 ")
    # a target already absolute (or *) is left as it is
    options = b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"
    assert absolute_form(options, PLAIN.base, b"") == options
    assert absolute_form(b"garbage", PLAIN.base, auth) == b"garbage"


@pytest.mark.parametrize(
    "head,keep",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0", False),  # tinyproxy: no word, then it closes
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0", True),
        (b"HTTP/1.1 200 OK\r\nProxy-Connection: Keep-Alive\r\nContent-Length: 0", True),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0", False),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive", False),  # body until close
    ],
)
def test_forwarded_keep_alive(head: bytes, keep: bool) -> None:
    assert forwarded_keep_alive(parse_response_head(head, b"GET")) is keep


# ---------------------------------------------------------------- the CONNECT tunnel
class Inner(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.made = 0
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


class ProxyEndpoint:
    """Stands for the TCP endpoint to the proxy: connects to a StringTransport, or fails, or waits."""

    def __init__(self, outcome: str = "connect") -> None:
        self.outcome = outcome
        self.transport = StringTransport()
        self.protocol: Protocol | None = None
        self.pending: Deferred[Any] | None = None
        self.cancelled = False

    def connect(self, factory: Any) -> Deferred[Any]:
        if self.outcome == "refused":
            return fail(ierror.ConnectionRefusedError("connection refused"))
        if self.outcome == "timeout":
            return fail(ierror.TimeoutError())
        self.protocol = factory.buildProtocol(None)
        if self.outcome == "wait":
            def stop(_: Deferred[Any]) -> None:
                self.cancelled = True
            self.pending = Deferred(stop)
            return self.pending
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)


def tunnel(proxy: EgressProxy | None = None, outcome: str = "connect") -> tuple[
    ProxyEndpoint, Clock, Inner, Deferred[Any], list[Any]
]:
    ep = ProxyEndpoint(outcome)
    clock = Clock()
    inner = Inner()
    endpoint = TunnelEndpoint(ep, proxy or parse_proxy_url(URL), REGISTRY, clock, 10.0)
    d = endpoint.connect(Factory.forProtocol(lambda: inner))
    results: list[Any] = []
    d.addBoth(results.append)
    return ep, clock, inner, d, results


def test_connect_then_the_inner_protocol_owns_the_same_transport() -> None:
    ep, clock, inner, _, results = tunnel()
    assert ep.transport.value() == connect_request(parse_proxy_url(URL), REGISTRY)
    assert inner.made == 0 and results == []
    ep.transport.clear()
    assert ep.protocol is not None
    ep.protocol.dataReceived(b"HTTP/1.1 200 Connection established\r\nProxy-Agent: x\r\n\r\n\x16\x03")
    assert results == [inner] and inner.made == 1
    assert inner.transport is ep.transport  # flow control and abort act on the socket itself
    assert inner.received == b"\x16\x03"  # bytes after the answer are the origin's
    ep.protocol.dataReceived(b"more")
    assert inner.received == b"\x16\x03more"
    assert clock.getDelayedCalls() == []  # the answer's deadline is gone
    ep.protocol.connectionLost(Failure(ierror.ConnectionDone()))
    assert inner.lost is not None and inner.lost.check(ierror.ConnectionDone)
    assert not ep.transport.disconnecting


def test_answer_a_byte_at_a_time() -> None:
    ep, _, inner, _, results = tunnel()
    assert ep.protocol is not None
    for b in b"HTTP/1.0 200 OK\r\n\r\n":
        ep.protocol.dataReceived(bytes([b]))
    assert results == [inner] and inner.received == b""


def _failure(results: list[Any]) -> UpstreamError:
    assert len(results) == 1 and isinstance(results[0], Failure), results
    err = results[0].value
    assert isinstance(err, UpstreamError)
    return err


@pytest.mark.parametrize("credentials", [False, True])
def test_407_says_the_proxy_wants_credentials(credentials: bool) -> None:
    proxy = parse_proxy_url(URL if credentials else "http://proxy.corp.example:3128")
    ep, clock, inner, _, results = tunnel(proxy)
    assert ep.protocol is not None
    ep.protocol.dataReceived(
        b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=x\r\n\r\n<html>"
    )
    err = _failure(results)
    assert err.kind == "unreachable"
    text = str(err)
    assert "egress proxy http://proxy.corp.example:3128 answered 407 to CONNECT https://123456789012." in text
    assert ("refused the credentials" if credentials else "wants credentials") in text
    assert_no_credentials(text)
    assert ep.transport.disconnecting
    assert inner.made == 0 and clock.getDelayedCalls() == []


def test_other_refusals_name_the_status() -> None:
    ep, _, _, _, results = tunnel()
    assert ep.protocol is not None
    ep.protocol.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert "answered 403 to CONNECT" in str(_failure(results))


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 200 OK\nbare LF\n\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    ],
)
def test_garbage_answers_fail_the_attempt(answer: bytes) -> None:
    ep, _, inner, _, results = tunnel()
    assert ep.protocol is not None
    ep.protocol.dataReceived(answer)
    err = _failure(results)
    assert err.kind == "unreachable" and "invalid answer to CONNECT" in str(err)
    assert ep.transport.disconnecting and inner.made == 0


def test_an_oversize_answer_head_is_refused() -> None:
    ep, _, _, _, results = tunnel()
    assert ep.protocol is not None
    ep.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
    for _ in range(MAX_CONNECT_HEAD // 1000 + 1):
        ep.protocol.dataReceived(b"X-Filler: " + b"a" * 988 + b"\r\n")
        if results:
            break
    assert "too large" in str(_failure(results))


def test_no_answer_in_time() -> None:
    ep, clock, _, _, results = tunnel()
    clock.advance(9.9)
    assert results == []
    clock.advance(0.2)
    err = _failure(results)
    assert err.kind == "timeout" and "did not answer CONNECT in 10s" in str(err)
    assert ep.transport.disconnecting


def test_proxy_closes_before_answering() -> None:
    ep, clock, _, _, results = tunnel()
    assert ep.protocol is not None
    ep.protocol.dataReceived(b"HTTP/1.1 2")
    ep.protocol.connectionLost(Failure(ierror.ConnectionDone()))
    assert "closed before answering CONNECT" in str(_failure(results))
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("outcome,kind,says", [
    ("refused", "unreachable", "egress proxy http://proxy.corp.example:3128: Connection was refused"),
    ("timeout", "timeout", "connect to egress proxy http://proxy.corp.example:3128 timed out"),
])
def test_the_proxy_itself_unreachable(outcome: str, kind: str, says: str) -> None:
    _, _, _, _, results = tunnel(outcome=outcome)
    err = _failure(results)
    assert err.kind == kind and says in str(err), str(err)


def test_cancel_while_connecting_to_the_proxy() -> None:
    ep, _, _, d, results = tunnel(outcome="wait")
    d.cancel()
    assert ep.cancelled
    assert len(results) == 1 and results[0].check(CancelledError)


def test_cancel_while_waiting_for_the_answer() -> None:
    ep, clock, inner, d, results = tunnel()
    d.cancel()
    assert ep.transport.disconnecting and clock.getDelayedCalls() == []
    assert len(results) == 1 and results[0].check(CancelledError)
    assert ep.protocol is not None
    ep.protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")  # too late: nobody gets the connection
    assert inner.made == 0 and len(results) == 1


# ---------------------------------------------------------------- TLS through the tunnel, in memory
class FakeProxy(Protocol):
    """A forward proxy that answers CONNECT with 200, then is the origin itself: a TLS server
    with a certificate for localhost/127.0.0.1 (SNI and verification see the origin's name)."""

    def __init__(self, tls_server: Any) -> None:
        self.head = b""
        self.tls: Protocol | None = None
        self.tls_server = tls_server

    def dataReceived(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.dataReceived(data)
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            head, rest = self.head.split(b"\r\n\r\n", 1)
            self.head = head + b"\r\n\r\n"
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")  # type: ignore[union-attr]
            self.tls = self.tls_server.buildProtocol(None)
            self.tls.makeConnection(self.transport)
            if rest:
                self.tls.dataReceived(rest)

    def connectionLost(self, reason: Any = None) -> None:
        if self.tls is not None:
            self.tls.connectionLost(reason)


class Pumped:
    """A proxy endpoint whose connections are in-memory pairs with a FakeProxy (iosim)."""

    def __init__(self, tls_server: Any) -> None:
        self.server = FakeProxy(tls_server)
        self.pump: Any = None

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(None)
        st = FakeTransport(self.server, isServer=True)
        ct = FakeTransport(client, isServer=False)
        self.pump = connect(self.server, st, client, ct, greet=False)
        return succeed(client)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    return _make_tls_files(tmp_path_factory.mktemp("tls"))


class Speaker(Inner):
    pass


def _tls_through_tunnel(tls_files: Any, host: str) -> tuple[Speaker, Speaker, FakeProxy, Any]:
    ca, cert, key = tls_files
    clock = Clock()  # TLS transports gather small writes until the next reactor turn
    origin_app = Speaker()
    tls_server = TLSMemoryBIOFactory(server_options(str(cert), str(key)), False,
                                     Factory.forProtocol(lambda: origin_app), clock)
    pumped = Pumped(tls_server)
    origin = Origin("https", host, 8443)
    creator = client_creator_factory(str(ca), False)(origin)  # exactly what a direct connection uses
    client_app = Speaker()
    client = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(lambda: client_app), clock)
    endpoint = TunnelEndpoint(pumped, parse_proxy_url(URL), origin, clock, 10.0)
    results: list[Any] = []
    endpoint.connect(client).addBoth(results.append)
    for _ in range(4):
        clock.advance(0)
        pumped.pump.flush()
    if results and not isinstance(results[0], Failure):
        results[0].write(b"GET /v2/ HTTP/1.1\r\n\r\n")
        for _ in range(4):
            clock.advance(0)
            pumped.pump.flush()
    return client_app, origin_app, pumped.server, results


def test_tls_through_the_tunnel_verifies_the_origin(tls_files: Any) -> None:
    client_app, origin_app, proxy, results = _tls_through_tunnel(tls_files, "localhost")
    assert proxy.head.startswith(b"CONNECT localhost:8443 HTTP/1.1\r\nHost: localhost:8443\r\nProxy-Authorization: ")
    assert len(results) == 1 and not isinstance(results[0], Failure)
    assert origin_app.received == b"GET /v2/ HTTP/1.1\r\n\r\n"  # decrypted by the origin, not seen by the proxy
    assert client_app.lost is None


def test_tls_through_the_tunnel_refuses_a_certificate_for_another_name(tls_files: Any) -> None:
    client_app, origin_app, _, results = _tls_through_tunnel(tls_files, "registry.example")
    assert origin_app.received == b""
    assert client_app.lost is not None  # the handshake failed: the name is not on the certificate


# ---------------------------------------------------------------- the pool
def _pool(egress: EgressRules | None) -> tuple[UpstreamPool, list[tuple[Origin, UpstreamConnection]]]:
    seen: list[tuple[Origin, UpstreamConnection]] = []

    def connector(origin: Origin, conn: UpstreamConnection) -> Deferred[Any]:
        seen.append((origin, conn))
        conn.makeConnection(StringTransport())
        return succeed(conn)

    return UpstreamPool(MemoryReactorClock(), connector=connector, egress=egress), seen


def test_pool_picks_the_connection_kind_once_per_connection() -> None:
    rules = EgressRules.from_settings(URL, (("NO_PROXY", "direct.internal"),))
    pool, seen = _pool(rules)
    for origin in (REGISTRY, PLAIN, Origin("http", "direct.internal"), Origin("https", "direct.internal")):
        pool.acquire(origin)
    kinds = [(type(c), c.via) for _, c in seen]
    proxy = parse_proxy_url(URL)
    assert kinds == [
        (UpstreamConnection, proxy),  # https: tunnelled, requests as on a direct connection
        (ForwardedConnection, proxy),  # http: absolute form
        (UpstreamConnection, None),
        (UpstreamConnection, None),
    ]


def test_no_rules_no_lookup() -> None:
    pool, seen = _pool(EgressRules())
    assert pool.egress is None
    pool.acquire(PLAIN)
    assert type(seen[0][1]) is UpstreamConnection and seen[0][1].via is None


def test_pool_connects_to_the_proxy_not_the_origin() -> None:
    reactor = MemoryReactorClock()
    pool = UpstreamPool(reactor, tls_for=lambda o: ssl.CertificateOptions(), egress=EgressRules.from_settings(
        "http://10.9.8.7:3128", ()), connect_timeout=7.0)
    pool.acquire(PLAIN)
    pool.acquire(REGISTRY)
    reactor.advance(0)
    # HostnameEndpoint connects to the proxy for both origins (MemoryReactor resolves every name to
    # 127.0.0.1: the port tells the proxy from the origins, 5000 and 443), with the connect timeout
    assert [(port, timeout) for _, port, _, timeout, _ in reactor.tcpClients] == [(3128, 7.0), (3128, 7.0)]


def test_forwarded_requests_through_the_whole_proxy() -> None:
    """A request for an http upstream, through the handler, goes out in absolute form with the
    proxy's credentials; a 407 from the proxy is never relayed: the client gets the registry's
    502 and the proxy named."""
    h = Harness(ProxyConfig(upstream=PLAIN))
    upstream = h.config.upstream
    assert upstream is not None and upstream.scheme == "http", upstream
    h.pool.egress = EgressRules.from_settings(URL, ())
    proto, transport = h.client()
    proto.dataReceived(b"GET /v2/app/manifests/1.0 HTTP/1.1\r\nHost: proxy.example\r\n\r\n")
    origin, up, up_transport = h.upstreams.connections[-1]
    assert isinstance(up, ForwardedConnection)
    sent = up_transport.value()
    assert sent.startswith(b"GET " + upstream.base + b"/v2/app/manifests/1.0 HTTP/1.1\r\nProxy-Authorization: " + BASIC)
    up.dataReceived(b"HTTP/1.0 407 Proxy Authentication Required\r\nContent-Length: 5\r\n\r\n<html")
    h.reactor.advance(0)
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 502 "), out[:200]
    assert b"UNAVAILABLE" in out and b"<html" not in out and b"407" not in out
    assert_no_credentials(out.decode("latin-1"))


def test_build_proxy_wires_the_rules_and_logs_them_once(tmp_path: pathlib.Path) -> None:
    o = Options(environ={})
    o.parseOptions(["--anonymous", "--region", "eu-west-1", "--registry-id", "123456789012"])
    settings = replace(o.settings, egress_proxy=URL, proxy_env=(("NO_PROXY", "169.254.169.254"),))
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        proxy = build_proxy(settings, MemoryReactorClock())
        worker = build_proxy(settings, MemoryReactorClock(), worker=True)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert proxy.pool.egress is not None and proxy.pool.egress.proxy_for(REGISTRY) == parse_proxy_url(URL)
    assert worker.pool.egress is not None
    lines = [formatEvent(e) for e in events]
    egress_lines = [line for line in lines if line.startswith("egress proxy:")]
    assert egress_lines == [
        "egress proxy: https origins via http://proxy.corp.example:3128 (with credentials), "
        "http origins via http://proxy.corp.example:3128 (with credentials), NO_PROXY with 1 entries"
    ]
    for line in lines:
        assert_no_credentials(line)


def test_build_proxy_without_a_proxy_logs_nothing_and_looks_nothing_up() -> None:
    o = Options(environ={})
    o.parseOptions(["--anonymous", "--region", "eu-west-1", "--registry-id", "123456789012"])
    settings = replace(o.settings, egress_proxy=None, proxy_env=(("NO_PROXY", "x"),))
    assert build_proxy(settings, MemoryReactorClock()).pool.egress is None


def test_tunnelled_requests_are_sent_as_on_a_direct_connection() -> None:
    h = Harness()
    assert h.config.upstream is not None and h.config.upstream.scheme == "https"
    h.pool.egress = EgressRules.from_settings(URL, ())
    proto, transport = h.client()
    proto.dataReceived(b"GET /v2/app/manifests/1.0 HTTP/1.1\r\nHost: proxy.example\r\n\r\n")
    _, up, up_transport = h.upstreams.connections[-1]
    assert type(up) is UpstreamConnection and up.via == parse_proxy_url(URL)
    sent = up_transport.value()
    assert sent.startswith(b"GET /v2/app/manifests/1.0 HTTP/1.1\r\n") and b"Proxy-Authorization" not in sent
    up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    h.reactor.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("said,kept", [(b"", 0), (b"Connection: keep-alive\r\n", 1)])
def test_a_forwarded_connection_is_reused_only_when_the_proxy_says_so(said: bytes, kept: int) -> None:
    h = Harness(ProxyConfig(upstream=PLAIN))
    h.pool.egress = EgressRules.from_settings(URL, ())
    proto, transport = h.client()
    proto.dataReceived(b"GET /v2/app/manifests/1.0 HTTP/1.1\r\nHost: proxy.example\r\n\r\n")
    _, up, _ = h.upstreams.connections[-1]
    up.dataReceived(b"HTTP/1.1 200 OK\r\n" + said + b"Content-Length: 2\r\n\r\n{}")
    h.reactor.advance(0)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert h.pool.counts(PLAIN)[1] == kept


def test_the_ecr_api_child_gets_the_egress_proxy_under_every_name() -> None:
    """--egress-proxy reaches the botocore children (token, DescribeRepositories) through the
    composition root, under every spelling botocore reads; NO_PROXY stays."""
    from ecr_twisted.app.build import build_keeper
    from ecr_twisted.app.config import ProxySettings
    from ecr_twisted.ecr.child import child_env
    from ecr_twisted.observe.metrics import Metrics
    from prometheus_client import CollectorRegistry
    from twisted.internet.testing import MemoryReactorClock

    settings = ProxySettings(auth="none", region="eu-west-1", egress_proxy=URL)
    keeper = build_keeper(settings, MemoryReactorClock(), Metrics(CollectorRegistry()))
    environ = {"HTTPS_PROXY": "http://env:1", "https_proxy": "http://env:2", "NO_PROXY": "x", "PATH": "/bin"}
    env = child_env(environ, keeper._fetcher.child.proxy_env)  # type: ignore[union-attr]
    assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == URL and "https_proxy" not in env  # no other spelling wins
    assert env["NO_PROXY"] == "x" and env["PATH"] == "/bin"
    assert environ["HTTPS_PROXY"] == "http://env:1"  # a copy

