"""The TLS front door completes the handshake with clients that offer ALPN (curl, urllib3, Go do by default).

Twisted installs an ALPN selection callback on every server context; with no protocols declared it
answered with nothing, which OpenSSL turns into an `internal error` alert. These tests run Twisted's
real TLS protocol on both sides over an in-memory connection (no sockets, no clock).
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from ecr_twisted.app.listeners import listener_spec, load_server_tls
from ecr_twisted.http.tls import server_options
from ecr_twisted.testing.emulator import _make_tls_files


class _Speaker(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    return _make_tls_files(tmp_path_factory.mktemp("tls"))


def _handshake(server_options_: Any, ca: pathlib.Path, offered: list[bytes] | None) -> tuple[Any, Any, _Speaker]:
    """Connect a TLS client offering `offered` over ALPN; send a request line; return both TLS protocols."""
    clock = Clock()  # Twisted's TLS transport gathers small writes until the next reactor turn
    server_app = _Speaker()
    server = TLSMemoryBIOFactory(server_options_, False, Factory.forProtocol(lambda: server_app), clock)
    trust = ssl.Certificate.loadPEM(ca.read_bytes())
    client_options = ssl.optionsForClientTLS("127.0.0.1", trustRoot=trust, acceptableProtocols=offered)
    client = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(_Speaker), clock)
    client_proto, server_proto, pump = connectedServerAndClient(
        lambda: server.buildProtocol(None), lambda: client.buildProtocol(None)
    )
    client_proto.write(b"GET /v2/ HTTP/1.1\r\n")
    clock.advance(0)
    pump.flush()
    return server_proto, client_proto, server_app


@pytest.mark.parametrize(
    "offered,expected",
    [
        ([b"http/1.1"], b"http/1.1"),  # python ssl with set_alpn_protocols(["http/1.1"])
        ([b"h2", b"http/1.1"], b"http/1.1"),  # curl's and urllib3's default offer
        ([b"h2"], None),  # only protocols we do not speak: go on without ALPN, as a server without ALPN would
        (None, None),  # skopeo, podman: no ALPN at all
    ],
)
def test_handshake_completes_and_selects_http11(tls_files: Any, offered: list[bytes] | None, expected: Any) -> None:
    ca, cert, key = tls_files
    server_proto, client_proto, app = _handshake(server_options(str(cert), str(key)), ca, offered)
    assert app.received == b"GET /v2/ HTTP/1.1\r\n", "the handshake did not complete"
    assert not app.lost
    assert server_proto.negotiatedProtocol == expected
    assert client_proto.negotiatedProtocol == expected


def test_ssl_endpoint_strings_negotiate_alpn_too(tls_files: Any) -> None:
    """`--port ssl:...` is served with the TLS options its description names: the same selection."""
    ca, cert, key = tls_files
    spec = listener_spec(f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}")
    assert spec.cert is not None and spec.key is not None
    server_proto, _, app = _handshake(load_server_tls(spec.cert, spec.key), ca, [b"h2", b"http/1.1"])
    assert app.received == b"GET /v2/ HTTP/1.1\r\n"
    assert server_proto.negotiatedProtocol == b"http/1.1"
