"""`--workers N`: N processes serve the same listening addresses; one /metrics sees them all.

The main process binds each listener itself (so a port in use is one clear error before
anything starts) and starts N-1 children (`python -m ecr_twisted.app.worker`). On a TCP
listener every child then binds a socket of its own to the same address with `SO_REUSEPORT`,
once it is ready to serve: the kernel hashes each new connection to one of the listening
sockets, so connections spread evenly over the processes. A single socket shared by all
(what unix-socket listeners still do: children inherit and adopt the main process's one) lets
whichever process wakes first take every waiting connection: measured, one process held all
64 of a benchmark's connections while the other idled. Each child keeps its metrics in its
own in-memory registry (nothing shared on the hot path) and serves them on a private unix
socket; the main process scrapes and sums them at scrape time. Children watch their stdin
pipe and exit when the main process goes away; the main process restarts a child that dies.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass, replace
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ecr_twisted.app.listeners import DescriptionError, parse_description
from ecr_twisted.http.http11 import CHUNKED, UNTIL_CLOSE, BadMessage, BodyReader, parse_response_head, split_head
from ecr_twisted.http.listening import somaxconn
from ecr_twisted.timers import cancel

__all__ = [
    "AdoptedPort",
    "ChildListener",
    "ListenerError",
    "WorkerProcesses",
    "bind_listener",
    "child_listener",
    "decode_listeners",
    "encode_listeners",
    "fetch_unix_metrics",
    "join_listener",
    "metrics_body",
]

log = Logger()


class ListenerError(ValueError):
    pass


def bind_listener(spec: str, share: bool = False) -> socket.socket:
    """Bind a listening socket for `spec`: a port number, or tcp:/tcp6:/unix: endpoint strings. The
    backlog is the description's, else the kernel's most (`somaxconn`).

    The bind itself is exclusive, so a port another process listens on is refused even if that
    one allows `SO_REUSEPORT` (another proxy group). With `share`, a TCP socket then allows it,
    before it listens, for this group's children to bind their own (`join_listener`); if the
    kernel will not let a sibling bind, it stays exclusive and children inherit it instead."""
    try:
        described = parse_description(spec)
    except DescriptionError as e:
        raise ListenerError(str(e)) from None
    kind, positional, kw = described.kind, described.args, described.kwargs
    backlog = _backlog(spec, kw)
    if kind in ("tcp", "tcp6", "ssl"):  # ssl: the factory is TLS-wrapped by the caller
        port = int(kw.get("port", positional[0] if positional else "0"))
        family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
        host = kw.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        address: Any = (host, port)
    elif kind == "unix":
        path = kw.get("address", positional[0] if positional else "")
        if not path:
            raise ListenerError(f"{spec!r}: no socket path")
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = path
    else:
        raise ListenerError(f"{spec!r}: --workers needs tcp:, tcp6:, ssl: or unix: listeners")
    try:
        sock.bind(address)
        if share and sock.family != socket.AF_UNIX:
            _allow_siblings(sock)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ListenerError(f"{spec!r}: cannot listen: {e}") from None
    sock.setblocking(False)
    # passed to children only if they cannot bind their own; a shared socket open in a process
    # that does not accept on it would leave its share of connections waiting for nobody
    sock.set_inheritable(not _shares_port(sock))
    return sock


def _shares_port(sock: socket.socket) -> bool:
    return sock.family != socket.AF_UNIX and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def _backlog(spec: str, kw: dict[str, str]) -> int:
    try:
        return int(kw.get("backlog", somaxconn()))
    except ValueError:
        raise ListenerError(f"{spec!r}: backlog is not a number") from None


def _allow_siblings(sock: socket.socket) -> None:
    """Let this group's children bind `sock`'s address too (SO_REUSEPORT), if a trial sibling can
    (bound, never listening: no connection is ever hashed to it); else leave `sock` exclusive."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with socket.socket(sock.family, socket.SOCK_STREAM) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            trial.bind(sock.getsockname())
    except OSError as e:
        log.info("SO_REUSEPORT refused on {address} ({e}): the workers share one socket", address=sock.getsockname(),
                 e=e)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        except OSError:
            pass  # it was never set


@dataclass(frozen=True)
class ChildListener:
    """How a --workers child gets one listener: the main process's socket inherited as descriptor
    `fd` (unix sockets; kernels without SO_REUSEPORT), else a socket of its own bound to `address`
    with SO_REUSEPORT (`join_listener`), made only when the child is ready to serve."""

    fd: int | None = None
    family: int = 0
    address: tuple[Any, ...] = ()
    backlog: int = 0

    def encode(self) -> dict[str, Any]:
        return {"fd": self.fd} if self.fd is not None else {
            "family": int(self.family), "address": list(self.address), "backlog": self.backlog
        }

    @classmethod
    def decode(cls, value: dict[str, Any]) -> "ChildListener":
        if value.get("fd") is not None:
            return cls(fd=int(value["fd"]))
        return cls(family=int(value["family"]), address=tuple(value["address"]), backlog=int(value["backlog"]))


def encode_listeners(listeners: list[ChildListener]) -> str:
    return json.dumps([listener.encode() for listener in listeners])


def decode_listeners(text: str) -> tuple[ChildListener, ...]:
    return tuple(ChildListener.decode(value) for value in json.loads(text))


def child_listener(spec: str, sock: socket.socket) -> ChildListener:
    """What a child is told about `sock` (made by `bind_listener` for `spec`)."""
    if not _shares_port(sock):
        return ChildListener(fd=sock.fileno())
    return ChildListener(
        family=sock.family, address=tuple(sock.getsockname()), backlog=_backlog(spec, parse_description(spec).kwargs)
    )


def join_listener(listener: ChildListener) -> socket.socket:
    """A child's own listening socket at the main process's address (SO_REUSEPORT): from the
    moment it listens, the kernel hashes a share of the new connections to it."""
    sock = socket.socket(listener.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(listener.address)
        sock.listen(listener.backlog)
    except OSError as e:
        sock.close()
        raise ListenerError(f"cannot listen on {listener.address}: {e}") from None
    sock.setblocking(False)
    return sock


class AdoptedPort(service.Service):
    """Serve `factory` on an already-bound listening socket; holding it keeps it open for children."""

    def __init__(self, reactor: Any, sock: socket.socket, factory: Any) -> None:
        self.reactor = reactor
        self.sock = sock
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.sock.fileno(), self.sock.family, self.factory)

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        d = defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)

        def close(result: Any) -> Any:
            # this process's copy of the socket too: once every process has closed its own,
            # new connections are refused instead of waiting in a backlog nobody reads
            self.sock.close()
            return result

        return d.addBoth(close)


class _Child(protocol.ProcessProtocol):
    def __init__(self, pool: "WorkerProcesses", index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.pool._ended(self, reason)


class WorkerProcesses(service.Service):
    """Runs and restarts the N-1 child processes; scrapes their metrics."""

    def __init__(
        self,
        reactor: Any,
        count: int,
        argv: list[str],
        listeners: list[ChildListener],
        socket_dir: str,
        restart_delay: float = 1.0,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.argv = argv
        self.listeners = listeners  # one per --port, in order
        self.socket_dir = socket_dir
        self.restart_delay = restart_delay
        self.children: dict[int, _Child] = {}
        self._restarts: dict[int, IDelayedCall] = {}  # index -> the pending restart of a child that died
        self._draining = False

    def metrics_socket(self, index: int) -> str:
        return os.path.join(self.socket_dir, f"worker-{index}.sock")

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        passed = []
        for listener in self.listeners:
            if listener.fd is not None:  # inherited: renumbered from 3 on in the child
                child_fd = 3 + sum(1 for fd in child_fds if fd >= 3)
                child_fds[child_fd] = listener.fd
                listener = replace(listener, fd=child_fd)
            passed.append(listener)
        args = [
            sys.executable, "-m", "ecr_twisted.app.worker",
            "--listeners", encode_listeners(passed), "--metrics-socket", self.metrics_socket(index), "--",
            *self.argv,
        ]
        child = _Child(self, index)
        self.reactor.spawnProcess(child, sys.executable, args, env=os.environ.copy(), childFDs=child_fds)
        self.children[index] = child

    def _ended(self, child: _Child, reason: Any) -> None:
        if self.children.get(child.index) is child:
            del self.children[child.index]
        if self.running and not self._draining:
            log.warn("worker {index} exited ({reason}); restarting it", index=child.index, reason=reason.value)
            cancel(self._restarts.get(child.index))
            self._restarts[child.index] = self.reactor.callLater(self.restart_delay, self._restart, child.index)

    def _restart(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self.running and index not in self.children:
            self._spawn(index)

    def drain(self) -> defer.Deferred[Any] | None:
        """The process is draining: SIGTERM every child (each drains as this process does) and
        answer when all have exited; none is restarted any more."""
        self._draining = True
        for call in self._restarts.values():
            cancel(call)
        self._restarts.clear()
        waits = [child.ended for child in self.children.values()]
        self.abort()
        return defer.DeferredList(waits) if waits else None

    def abort(self) -> None:
        """SIGTERM every child: the first one starts its drain, a second one ends it at once."""
        for child in list(self.children.values()):
            if child.transport is not None:
                try:
                    child.transport.signalProcess("TERM")
                except Exception:
                    pass  # it is already on its way out

    def stopService(self) -> Any:
        super().stopService()
        for call in self._restarts.values():
            cancel(call)
        self._restarts.clear()
        waits = []
        for child in list(self.children.values()):
            waits.append(child.ended)
            if child.transport is None:
                continue
            try:
                child.transport.closeStdin()
                child.transport.signalProcess("TERM")
            except Exception:
                pass  # it is already on its way out
        return defer.DeferredList(waits) if waits else None

    def signal_all(self, name: str) -> None:
        """Send every running child a signal (SIGHUP: reload)."""
        for child in list(self.children.values()):
            if child.transport is not None:
                try:
                    child.transport.signalProcess(name)
                except Exception:
                    pass  # it is on its way out; it will be restarted with fresh files

    def scrape(self) -> defer.Deferred[list[bytes]]:
        """Every child's /metrics text; a child that does not answer in 2 s is left out."""
        ds = [fetch_unix_metrics(self.reactor, self.metrics_socket(i)) for i in sorted(self.children)]
        d = defer.DeferredList(ds, consumeErrors=True)
        return d.addCallback(lambda results: [body for ok, body in results if ok])


def metrics_body(raw: bytes) -> bytes:
    """The body of a whole `200` answer to `GET /metrics`, read with the proxy's own strict
    HTTP/1.1 parser; ValueError for anything else (another status, a truncated body)."""
    try:
        found = split_head(raw)
        if found is None:
            raise BadMessage("no complete response head")
        head_bytes, used = found
        head = parse_response_head(head_bytes, b"GET")
        if head.status != 200:
            raise BadMessage(f"status {head.status}")
        reader = BodyReader(head.framing, head.length, dechunk=True)
        taken = reader.feed(raw, used)
        if not reader.done and head.framing != UNTIL_CLOSE:
            raise BadMessage("truncated body")
    except BadMessage as e:
        raise ValueError(f"bad worker metrics answer: {e.reason}") from None
    return b"".join(reader.payload) if head.framing == CHUNKED else raw[used : used + taken]


class _Fetch(protocol.Protocol):
    """One `GET /metrics` over HTTP/1.0: the answer ends when the connection does."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET /metrics HTTP/1.0\r\nHost: worker\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            body = metrics_body(b"".join(self.chunks))
        except ValueError as e:
            self.done.errback(e)
        else:
            self.done.callback(body)


def fetch_unix_metrics(reactor: Any, path: str, timeout: float = 2.0) -> defer.Deferred[bytes]:
    fetch = _Fetch()
    d = UNIXClientEndpoint(reactor, path, timeout=timeout).connect(_OneShot(fetch))
    d.addCallback(lambda _: fetch.done)
    return d.addTimeout(timeout, reactor)


class _OneShot(protocol.Factory):
    noisy = False

    def __init__(self, proto: protocol.Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self.proto


