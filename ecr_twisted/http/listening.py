"""Listening sockets that stay cheap and quiet when clients or file descriptors run out.

Three things Twisted's own ports do not do:

- A cap on client connections (`ConnectionGuard.limit`, per process): past it a new connection
  is answered `503` with `Retry-After` once its request head is in (plain listeners; a few wait
  at a time, the longest-waiting silent one gives way to the next) or closed at once (TLS
  listeners), so clients learn fast and the descriptors the proxy needs for upstream
  connections and cache files are left.
- Out of descriptors (`EMFILE`, `ENFILE`, ...) a listener stops accepting until a client
  connection of the process closes, or a short pause has passed; Twisted's `Port` closes every
  waiting connection and logs each one, which under load is a log flood at full CPU. Here each
  failure is counted (`on_accept_error`) and logged at most once per `log_interval`.
- The listen backlog follows the kernel's `somaxconn` (`somaxconn()`), not Twisted's 50.

`GuardedListening` wraps a reactor so that `endpoints.serverFromString` and
`reactor.adoptStreamPort` make guarded ports. The ports' accept loop follows Twisted's
`tcp.Port.doRead` (Twisted 26.10): its documented `transport` override point is how each
connection is counted, `_fromListeningDescriptor` is how the reactor adopts sockets, and a
silent turned-away connection is closed with its transport's `connectionLost`, as the reactor
does on a socket error. Those are the only Twisted internals used here.
"""

from __future__ import annotations

import errno
import resource
import socket
from typing import Any, Callable

from twisted.internet import tcp, unix
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from ecr_twisted.timers import cancel

__all__ = [
    "ConnectionGuard",
    "GuardedListening",
    "default_max_connections",
    "open_file_limit",
    "somaxconn",
]

log = Logger()

_SOMAXCONN = "/proc/sys/net/core/somaxconn"
_TRY_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK)
_SKIP = (errno.EPERM, errno.ECONNABORTED)  # netfilter said no / the client gave up: next one
_STARVED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def somaxconn(path: str = _SOMAXCONN) -> int:
    """The most a listen backlog can hold on this host (its network namespace): what every
    listener asks for, so a burst of connections waits in the kernel instead of being dropped."""
    try:
        with open(path) as f:
            return max(1, int(f.read().strip()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


def open_file_limit() -> int:
    """This process's soft limit on open files."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections(open_files: int, upstream_connections: int, cache: bool) -> int:
    """Client connections one process takes by default, out of `open_files` descriptors.

    Set aside first: 64 for the process itself (listeners, logs, pipes, the reactor, threads)
    and 4 x `upstream_connections` for upstream connections (the registry, storage and
    redirect targets each get their own pool), at most half of all. With a cache each client
    may also hold a cache file open, so two descriptors count per client."""
    reserve = min(64 + 4 * upstream_connections, open_files // 2)
    return max(1, (open_files - reserve) // (2 if cache else 1))


class ConnectionGuard:
    """The client connections of one process, against `limit` (None: no cap), for every
    listener made with it. Events go to the injected counters; logs are rate-limited."""

    RETRY = 0.25  # seconds before a listener out of descriptors tries again by itself
    TURN_AWAY_WAIT = 2.0  # seconds a connection turned away may take to send its request head

    def __init__(
        self,
        reactor: Any,
        limit: int | None,
        *,
        busy_response: bytes = b"",
        on_refused: Callable[[str], None] = lambda how: None,
        on_accept_error: Callable[[str], None] = lambda name: None,
        log_interval: float = 60.0,
    ) -> None:
        self.reactor = reactor
        self.limit = limit
        self.busy_response = busy_response  # a whole HTTP response: 503 with Retry-After
        self.on_refused = on_refused  # "503" (answered) or "closed"
        self.on_accept_error = on_accept_error  # errno name
        self.log_interval = log_interval
        self.open = 0
        self.turn_away_limit = 0 if limit is None else max(8, min(64, limit // 8))
        self._turning_away: dict[_TurnAway, None] = {}  # oldest first; those that said nothing yet
        self._paused: list[Any] = []
        self._retry: IDelayedCall | None = None
        self._logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    @property
    def full(self) -> bool:
        return self.limit is not None and self.open >= self.limit

    # -- called by the ports
    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open -= 1
        if self._paused:  # a descriptor is free again
            self._resume()

    @property
    def turning_away(self) -> int:
        """Connections past the limit waiting for their request head, to be answered 503."""
        return len(self._turning_away)

    def turn_away(self, port: Any, skt: socket.socket, addr: Any) -> None:
        """A connection past the limit: answer it 503 (plain listeners), else close it.

        At most `turn_away_limit` wait for their request head at once; past that, the one that
        has waited longest makes room (a flood of silent connections only churns through them,
        while a client that sends its request at once is answered)."""
        if self.busy_response and not port.tls:
            if len(self._turning_away) >= self.turn_away_limit:
                oldest = next(iter(self._turning_away))
                self.unheard(oldest)
                oldest.give_up()
            self.on_refused("503")
            proto = _TurnAway(self)
            self._turning_away[proto] = None
            proto.makeConnection(port.plain_transport(skt, proto, addr, port, port.sessionno, port.reactor))
        else:
            self.on_refused("closed")
            skt.close()
        self._note("refused", "refusing client connections: --max-connections {limit} reached ({count} refused)")

    def unheard(self, proto: _TurnAway) -> None:
        """`proto` no longer waits for a request head."""
        self._turning_away.pop(proto, None)

    def starved(self, port: Any, code: int) -> None:
        """accept() failed for want of memory or descriptors: stop accepting on `port` for now."""
        name = errno.errorcode.get(code, str(code))
        self.on_accept_error(name)
        self._note(name, "cannot accept client connections: " + name + " (" + (
            "out of file descriptors" if code in (errno.EMFILE, errno.ENFILE) else "out of memory"
        ) + ", {count} times); {open} open, --max-connections {limit}; waiting for descriptors to free up")
        port.stopReading()
        if port not in self._paused:
            self._paused.append(port)
        if self._retry is None or not self._retry.active():
            self._retry = self.reactor.callLater(self.RETRY, self._resume)

    def _resume(self) -> None:
        cancel(self._retry)
        self._retry = None
        ports, self._paused = self._paused, []
        for port in ports:
            if port.connected and not port.disconnecting:
                port.startReading()

    def _note(self, kind: str, message: str) -> None:
        count = self._unlogged.get(kind, 0) + 1
        now = self.reactor.seconds()
        last = self._logged.get(kind)
        if last is not None and now - last < self.log_interval:
            self._unlogged[kind] = count
            return
        self._logged[kind] = now
        self._unlogged[kind] = 0
        log.warn(message, count=count, open=self.open, limit=self.limit)


class _TurnAway(Protocol):
    """Reads a request head (briefly), answers the guard's 503, closes."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        self.seen = b""
        self.timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.timer = self.guard.reactor.callLater(self.guard.TURN_AWAY_WAIT, self.give_up)

    def give_up(self) -> None:
        """Close without an answer (it sent no head in time, or another needs its place).

        At once, as the reactor does on a socket error: loseConnection would keep the
        descriptor until the next reactor turn, and a burst of silent connections evicting
        each other would hold one each meanwhile."""
        self.guard.unheard(self)
        cancel(self.timer)
        self.timer = None
        transport: Any = self.transport  # the port's plain_transport: a FileDescriptor
        if transport is not None:
            transport.connectionLost(Failure(ConnectionAborted()))

    def dataReceived(self, data: bytes) -> None:
        if self.timer is None:
            return
        self.seen += data
        # answer once the head is in: closing on unread request bytes would reset the connection
        # and could destroy the answer before the client reads it
        if b"\r\n\r\n" in self.seen or len(self.seen) > 8192:
            self.guard.unheard(self)
            cancel(self.timer)
            self.timer = None
            assert self.transport is not None
            self.transport.write(self.guard.busy_response)
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.guard.unheard(self)
        cancel(self.timer)
        self.timer = None


def _accept(port: Any) -> None:
    """A guarded port's doRead: accept what is waiting, as `tcp.Port.doRead` does, but count each
    connection, turn away those past the limit, and pause when descriptors run out."""
    guard: ConnectionGuard = port.guard
    accepted = 0
    try:
        for _ in range(port.numberAccepts):
            try:
                skt, addr = port.socket.accept()
            except OSError as e:
                if e.errno in _TRY_AGAIN:
                    break
                if e.errno in _SKIP:
                    continue
                if e.errno in _STARVED:
                    guard.starved(port, e.errno)
                    break
                raise
            accepted += 1
            if guard.full:
                guard.turn_away(port, skt, addr)
                continue
            if port.addressFamily == socket.AF_INET6:
                # with its scope ID, as tcp.Port.doRead does
                host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                addr = (host[0], *addr[1:])
            protocol = port.factory.buildProtocol(port._buildAddr(addr))
            if protocol is None:
                skt.close()
                continue
            session = port.sessionno
            port.sessionno = session + 1
            transport = port.transport(skt, protocol, addr, port, session, port.reactor)
            guard.opened()
            protocol.makeConnection(transport)
    except BaseException:
        log.failure("accepting a client connection failed")
    # as tcp.Port: more accepts per reactor turn while connections keep coming
    if accepted == port.numberAccepts:
        port.numberAccepts += 20
    else:
        port.numberAccepts = max(1, accepted)


class _CountedTCP(tcp.Server):
    """A client connection that tells its port's guard when it is gone."""

    server: GuardedTCPPort

    def connectionLost(self, reason: Failure) -> None:
        if not hasattr(self, "socket"):  # tcp.Connection ignores a second call the same way
            return
        guard = self.server.guard
        try:
            super().connectionLost(reason)
        finally:
            guard.closed()


class _CountedUNIX(unix.Server):
    server: GuardedUNIXPort

    def connectionLost(self, reason: Failure) -> None:
        if not hasattr(self, "socket"):
            return
        guard = self.server.guard
        try:
            super().connectionLost(reason)
        finally:
            guard.closed()


class GuardedTCPPort(tcp.Port):
    transport = _CountedTCP
    plain_transport = tcp.Server  # for connections turned away: not counted
    guard: ConnectionGuard

    @property
    def tls(self) -> bool:
        return isinstance(self.factory, TLSMemoryBIOFactory)

    def doRead(self) -> None:
        _accept(self)


class GuardedUNIXPort(unix.Port):
    transport = _CountedUNIX
    plain_transport = unix.Server
    guard: ConnectionGuard

    @property
    def tls(self) -> bool:
        return isinstance(self.factory, TLSMemoryBIOFactory)

    def doRead(self) -> None:
        _accept(self)


class GuardedListening:
    """A reactor whose TCP and UNIX listeners (made by `endpoints.serverFromString` or adopted)
    are guarded by `guard`; everything else is the reactor's. On a reactor that is not a real
    one (a MemoryReactor in tests) listening is left to it."""

    def __init__(self, reactor: Any, guard: ConnectionGuard) -> None:
        self._reactor = reactor
        self.guard = guard
        self._real = isinstance(reactor, PosixReactorBase)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if not self._real:
            return self._reactor.listenTCP(port, factory, backlog, interface)
        p = GuardedTCPPort(port, factory, backlog, interface, self._reactor)
        p.guard = self.guard
        p.startListening()
        return p

    def listenUNIX(self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0) -> Any:
        if not self._real:
            return self._reactor.listenUNIX(address, factory, backlog, mode, wantPID)
        p = GuardedUNIXPort(address, factory, backlog, mode, self._reactor, wantPID)  # type: ignore[arg-type]
        p.guard = self.guard
        p.startListening()
        return p

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> Any:
        if not self._real:
            return self._reactor.adoptStreamPort(fd, family, factory)
        p: GuardedTCPPort | GuardedUNIXPort
        if family == socket.AF_UNIX:
            p = GuardedUNIXPort._fromListeningDescriptor(self._reactor, fd, factory)
        else:
            p = GuardedTCPPort._fromListeningDescriptor(self._reactor, fd, family, factory)
        p.guard = self.guard
        p.startListening()
        return p
