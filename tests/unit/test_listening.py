"""Listeners under pressure (http/listening.py): the connection cap, EMFILE, the backlog; on a
MemoryReactorClock with stand-in sockets and ports."""

from __future__ import annotations

import errno
import pathlib
import socket
from typing import Any, cast

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, Logger

from ecr_twisted.app.listeners import with_backlog
from ecr_twisted.http import listening
from ecr_twisted.http.listening import ConnectionGuard, default_max_connections, somaxconn

BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class Sock:
    """accept() hands out the queued results (a socket or an OSError), then EAGAIN."""

    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.closed = 0

    def accept(self) -> tuple[Any, tuple[str, int]]:
        if not self.results:
            raise BlockingIOError(errno.EAGAIN, "again")
        result = self.results.pop(0)
        if isinstance(result, OSError):
            raise result
        return result, ("127.0.0.1", 40000)


class Client:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Transport(StringTransport):
    def __init__(self, skt: Any, protocol: Any, addr: Any, port: Any, session: int, reactor: Any) -> None:
        super().__init__()
        self.skt, self.protocol, self.port = skt, protocol, port

    def connectionLost(self, reason: Any) -> None:
        self.skt.close()
        self.protocol.connectionLost(reason)


class Counted(Transport):
    def lose(self) -> None:
        self.port.guard.closed()


class Port:
    """What `listening._accept` uses of a tcp.Port."""

    def __init__(self, guard: ConnectionGuard, sock: Sock, tls: bool = False) -> None:
        self.guard, self.socket, self.tls = guard, sock, tls
        self.numberAccepts = 100
        self.sessionno = 0
        self.addressFamily = socket.AF_INET
        self.reactor = guard.reactor
        self.transport = Counted
        self.plain_transport = Transport
        self.reading = True
        self.connected, self.disconnecting = True, False
        self.built: list[Any] = []
        port = self

        class Factory:
            def buildProtocol(self, addr: Any) -> Any:
                from twisted.internet.protocol import Protocol

                proto = Protocol()
                port.built.append(proto)
                return proto

        self.factory = Factory()

    def _buildAddr(self, addr: Any) -> Any:
        return addr

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def doRead(self) -> None:
        listening._accept(self)


def guard(limit: int | None, **kw: Any) -> tuple[ConnectionGuard, list[str], list[str]]:
    refused: list[str] = []
    errors: list[str] = []
    g = ConnectionGuard(MemoryReactorClock(), limit, busy_response=BUSY, on_refused=refused.append,
                        on_accept_error=errors.append, **kw)
    return g, refused, errors


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(listening, "log", Logger(observer=cast(ILogObserver, events.append)))
    return events


def test_connections_are_counted_up_to_the_limit_then_answered_503(logged: list[dict[str, Any]]) -> None:
    g, refused, _ = guard(3)
    clients = [Client() for _ in range(5)]
    port = Port(g, Sock(list(clients)))
    port.doRead()
    assert g.open == 3 and len(port.built) == 3 and refused == ["503", "503"]
    assert g.turning_away == 2
    # a turned-away client gets the 503 once its request head is in, then the connection closes
    proto = next(iter(g._turning_away))
    transport = cast(Transport, proto.transport)
    proto.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n")
    assert transport.value() == b""
    proto.dataReceived(b"\r\n")
    assert transport.value() == BUSY and transport.disconnecting
    assert g.turning_away == 1 and not any(c.closed for c in clients)
    assert len(logged) == 1 and "--max-connections 3 reached" in logged[0]["log_format"].format(**logged[0])
    # a connection that closes makes room
    port.built[0].transport.lose()
    assert not g.full


def test_silent_connections_past_the_limit_make_room_for_newer_ones() -> None:
    g, refused, _ = guard(1)
    assert g.turn_away_limit == 8
    clients = [Client() for _ in range(1 + 20)]
    Port(g, Sock(list(clients))).doRead()
    assert g.open == 1 and g.turning_away == 8 and refused == ["503"] * 20
    # the oldest silent ones were closed at once, the newest wait for their heads
    assert [c.closed for c in clients[1:]] == [True] * 12 + [False] * 8
    g.reactor.advance(g.TURN_AWAY_WAIT)  # no head in time: closed without a word
    assert g.turning_away == 0 and all(c.closed for c in clients[1:])


def test_tls_listeners_close_what_is_past_the_limit() -> None:
    g, refused, _ = guard(1)
    clients = [Client(), Client()]
    Port(g, Sock(list(clients)), tls=True).doRead()
    assert refused == ["closed"] and clients[1].closed and g.turning_away == 0


def test_out_of_descriptors_the_port_pauses_and_resumes_when_one_closes(logged: list[dict[str, Any]]) -> None:
    g, _, errors = guard(None)
    emfile = OSError(errno.EMFILE, "Too many open files")
    first = Client()
    sock = Sock([first, emfile])
    port = Port(g, sock)
    port.doRead()
    assert g.open == 1 and errors == ["EMFILE"] and not port.reading
    port.built[0].transport.lose()  # a descriptor is free: accept again at once
    assert port.reading
    for _ in range(100):  # it keeps failing: counted every time, logged once a minute
        sock.results.append(emfile)
        port.doRead()
        g.reactor.advance(g.RETRY)
        assert port.reading  # tried again after RETRY seconds, without anything closing
    assert len(errors) == 101
    messages = [e["log_format"].format(**e) for e in logged]
    assert len(messages) == 1 and "EMFILE" in messages[0] and "out of file descriptors" in messages[0]
    g.reactor.advance(g.log_interval)
    sock.results.append(emfile)
    port.doRead()
    messages = [e["log_format"].format(**e) for e in logged]
    assert len(messages) == 2 and "101 times" in messages[1]


def test_a_stopped_port_is_not_restarted() -> None:
    g, _, _ = guard(None)
    port = Port(g, Sock([OSError(errno.ENFILE, "table full")]))
    port.doRead()
    port.disconnecting = True
    g.reactor.advance(g.RETRY)
    assert not port.reading


def test_the_default_cap_leaves_room_for_upstreams_and_cache_files() -> None:
    assert default_max_connections(1024, 64, cache=False) == 1024 - 320
    assert default_max_connections(1024, 64, cache=True) == (1024 - 320) // 2
    assert default_max_connections(256, 64, cache=False) == 128  # at most half is set aside
    assert default_max_connections(1 << 20, 64, cache=False) == (1 << 20) - 320
    assert default_max_connections(2, 64, cache=True) == 1


def test_the_backlog_is_the_kernels(tmp_path: pathlib.Path) -> None:
    (tmp_path / "somaxconn").write_text("4096\n")
    assert somaxconn(str(tmp_path / "somaxconn")) == 4096
    assert somaxconn(str(tmp_path / "missing")) == socket.SOMAXCONN
    assert with_backlog("tcp:5000", 4096) == "tcp:5000:backlog=4096"
    assert with_backlog("tcp:5000:interface=127.0.0.1", 4096) == "tcp:5000:interface=127.0.0.1:backlog=4096"
    assert with_backlog("unix:/run/x.sock", 4096) == "unix:/run/x.sock:backlog=4096"
    assert with_backlog("tcp:5000:backlog=10", 4096) == "tcp:5000:backlog=10"  # an explicit one stays
    assert with_backlog("tcp:5000:0.0.0.0:10", 4096) == "tcp:5000:0.0.0.0:10"
    assert with_backlog("systemd:domain=INET:index=0", 4096) == "systemd:domain=INET:index=0"


def test_bind_listener_asks_for_the_kernels_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    from ecr_twisted.app import supervisor

    asked: list[int] = []

    class Recording(socket.socket):
        def listen(self, backlog: int = 0) -> None:
            asked.append(backlog)
            super().listen(backlog)

    monkeypatch.setattr(supervisor.socket, "socket", Recording)
    monkeypatch.setattr(supervisor, "somaxconn", lambda: 4096)
    for spec, expected in (("tcp:0:interface=127.0.0.1", 4096), ("tcp:0:interface=127.0.0.1:backlog=7", 7)):
        supervisor.bind_listener(spec).close()
        assert asked.pop() == expected


def test_max_connections_is_an_option() -> None:
    from twisted.python.usage import UsageError

    from ecr_twisted.app.build import build
    from ecr_twisted.app.options import Options

    def parse(*args: str) -> Options:
        o = Options(environ={})
        o.parseOptions(["--anonymous", "--region", "eu-west-1", *args])
        return o

    built = build(parse("--max-connections", "50").settings, MemoryReactorClock())
    assert built.registry.get_sample_value("ecrproxy_client_connections_max") == 50
    assert built.registry.get_sample_value("ecrproxy_client_connections") == 0
    assert parse().settings.max_connections is None  # derived when the process starts
    with pytest.raises(UsageError, match="--max-connections"):
        parse("--max-connections", "0")
