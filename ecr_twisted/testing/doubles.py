"""Test doubles for ecr-twisted, shipped with the package so its users can test against it too.

Everything here runs on a `MemoryReactorClock` and in-memory transports: no sockets, no
threads, no wall-clock time. `Harness` is the production object graph (`app.build`) with
these doubles at its edges, so what the unit tests drive is what twistd runs.
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any, Callable

from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from ecr_twisted.access.gate import AccessConfig, Gate
from ecr_twisted.access.policy import FixedPolicy, Policy
from ecr_twisted.app.build import Parts, access_metrics, build, proxy_config
from ecr_twisted.app.config import ProxySettings
from ecr_twisted.cache.layer import LayerCache
from ecr_twisted.cache.store import BlobStore, hash_file
from ecr_twisted.ecr.tokens import Token, TokenKeeper
from ecr_twisted.http.origin import Origin
from ecr_twisted.http.server import ClientConnection, RelayFactory
from ecr_twisted.http.upstream import UpstreamConnection, UpstreamPool
from ecr_twisted.observe.metrics import Metrics
from ecr_twisted.registry.handler import ProxyConfig, RegistryProxy
from ecr_twisted.timers import cancel

__all__ = [
    "UPSTREAM",
    "ClosingTransport",
    "FakeTokenFetcher",
    "Harness",
    "MemoryUpstreams",
    "make_token",
    "open_gate",
    "proc_status",
    "synchronous_bcrypt",
    "synchronous_verify",
    "write_htpasswd",
]

UPSTREAM = Origin("https", "123456789012.dkr.ecr.eu-west-1.amazonaws.com")


def make_token(password: str = "secret-password", *, now: float = 0.0, lifetime: float = 12 * 3600,
               endpoint: str = "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com") -> Token:
    auth = base64.b64encode(b"AWS:" + password.encode()).decode()
    return Token(authorization=auth, expires_at=now + lifetime, endpoint=endpoint, fetched_at=now)


def proc_status(pid: int) -> dict[str, int]:
    """The sizes in /proc/<pid>/status (VmRSS, VmHWM, ...) in bytes; OSError if the process is gone.

    For the tests and the benchmark, which watch the proxy's memory from outside."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


class FakeTokenFetcher:
    """A TokenFetcher whose answers the test decides: queue tokens or exceptions, or hold calls open."""

    def __init__(self) -> None:
        self.calls = 0
        self.results: list[Token | BaseException] = []
        self.pending: list[Deferred[Token]] = []
        self.hold = False

    def fetch(self) -> Deferred[Token]:
        self.calls += 1
        d: Deferred[Token] = Deferred()
        if self.hold or not self.results:
            self.pending.append(d)
            return d
        self._fire(d, self.results.pop(0))
        return d

    def answer(self, result: Token | BaseException) -> None:
        """Fire the oldest held call."""
        self._fire(self.pending.pop(0), result)

    @staticmethod
    def _fire(d: Deferred[Token], result: Token | BaseException) -> None:
        if isinstance(result, BaseException):
            d.errback(Failure(result))
        else:
            d.callback(result)


class ClosingTransport(StringTransport):
    """A StringTransport that, like a real one, tells its protocol when it is closed.

    `connectionLost` comes on the next reactor turn (`reactor.advance(0)`), as in Twisted's
    TCP transports; without a reactor it never comes, as with a plain StringTransport.
    `cancel()` takes back a `connectionLost` not delivered yet (tearing a test down).
    """

    def __init__(self, reactor: Any, protocol: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reactor = reactor
        self._protocol = protocol
        self.lost_call: IDelayedCall | None = None  # the pending connectionLost, once closed

    def _close(self, reason: BaseException) -> None:
        if self._reactor is not None and self.lost_call is None:
            self.lost_call = self._reactor.callLater(0, self._protocol.connectionLost, Failure(reason))

    def cancel(self) -> None:
        cancel(self.lost_call)

    def loseConnection(self) -> None:
        super().loseConnection()
        self._close(ConnectionDone())

    def abortConnection(self) -> None:
        super().abortConnection()
        self._close(ConnectionAborted())


class MemoryUpstreams:
    """A pool connector that connects upstream protocols to in-memory transports.

    `connections` lists (origin, protocol, transport) in connection order; a test reads
    what the proxy sent with `transport.value()` and answers with `protocol.dataReceived`.
    Set `refuse` to make the next connects fail. Set `hold` to leave the next connects under
    way (in `pending`) until the test ends each with `complete()` or `fail()`; cancelling one
    takes it out of `pending`, as cancelling a real endpoint's connect stops it, or, with
    `too_late_to_cancel`, completes it (the connection was made as the cancel came).
    """

    def __init__(self, reactor: Any = None) -> None:
        self.reactor = reactor
        self.connections: list[tuple[Origin, UpstreamConnection, ClosingTransport]] = []
        self.refuse: BaseException | None = None
        self.hold = False
        self.too_late_to_cancel = False
        self.pending: list[tuple[Origin, UpstreamConnection, Deferred[Any]]] = []

    def __call__(self, origin: Origin, conn: UpstreamConnection) -> Deferred[Any]:
        if self.refuse is not None:
            d: Deferred[Any] = Deferred()
            d.errback(Failure(self.refuse))
            return d
        if self.hold:
            entry: tuple[Origin, UpstreamConnection, Deferred[Any]]

            def stop(_: Deferred[Any]) -> None:
                if self.too_late_to_cancel:
                    self.complete(self.pending.index(entry))
                else:
                    self.pending.remove(entry)

            entry = (origin, conn, Deferred(stop))
            self.pending.append(entry)
            return entry[2]
        self._connect(origin, conn)
        return succeed(conn)

    def _connect(self, origin: Origin, conn: UpstreamConnection) -> None:
        transport = ClosingTransport(self.reactor, conn, peerAddress=IPv4Address("TCP", "10.0.0.1", origin.port))
        conn.makeConnection(transport)
        self.connections.append((origin, conn, transport))

    def complete(self, index: int = 0) -> UpstreamConnection:
        """The held connect `index` (oldest first) succeeds."""
        origin, conn, d = self.pending.pop(index)
        self._connect(origin, conn)
        d.callback(conn)
        return conn

    def fail(self, index: int = 0, reason: BaseException | None = None) -> None:
        """The held connect `index` (oldest first) fails (connection refused by default)."""
        _, _, d = self.pending.pop(index)
        d.errback(Failure(reason or ConnectionRefusedError()))

    def last(self) -> tuple[UpstreamConnection, StringTransport]:
        _, conn, transport = self.connections[-1]
        return conn, transport

    def close(self) -> None:
        """Deliver no more connectionLost calls: the test is over."""
        for _, _, transport in self.connections:
            transport.cancel()


def open_gate(clock: Any) -> Gate:
    """`--auth none` with the open policy: what `--anonymous` does."""
    return Gate(AccessConfig("none"), FixedPolicy(Policy.preset("open")), clock)


def synchronous_bcrypt(password: bytes, hashed: bytes) -> Deferred[bool]:
    """An Htpasswd `check` that runs on the test's thread (real bcrypt, no thread pool)."""
    from ecr_twisted.access.htpasswd import checkpw

    return succeed(checkpw(password, hashed))


def write_htpasswd(path: str, users: dict[str, str], cost: int = 4) -> None:
    """An htpasswd file of bcrypt hashes (cost 4: fast for tests), replaced atomically."""
    import os

    import bcrypt

    lines = "".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(cost)).decode()}\n" for u, p in users.items())
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(lines)
    os.replace(tmp, path)


def synchronous_verify(fd: int, size: int) -> Deferred[str]:
    """The cache's file check on the test's thread (the real one runs in the reactor's thread pool)."""
    return succeed(hash_file(fd, size))


class Harness:
    """A whole proxy on a MemoryReactorClock, built by the production composition root
    (`app.build.build`) with test doubles for its edges, and helpers to play both peers.

    `config` says what the handler is asked to do; it is turned into `ProxySettings`, so it
    can only say what options can. Attributes are the built graph's parts (`handler`,
    `pool`, `cache`, `gate`, `keeper`, `factory`, ...) and the doubles (`fetcher`, `upstreams`).
    """

    def __init__(
        self,
        config: ProxyConfig | None = None,
        token: Token | None = None,
        gate: Callable[["Harness"], Gate] | None = None,
        cache_dir: str | None = None,
        cache_size: int = 1 << 30,
        tag_ttl: float = 60.0,
        stale_if_error: float = 86400.0,
        storage_hosts: str = "default",
        metrics_port: str | None = None,
        repositories: dict[str, list[str]] | None = None,
    ) -> None:
        self.reactor = MemoryReactorClock()
        # what DescribeRepositories answers for _catalog, per upstream name ("default": the one upstream)
        self.repositories: dict[str, list[str]] = dict(repositories or {})
        self.reactor.advance(1_000_000)
        self.fetcher = FakeTokenFetcher()
        self.upstreams = MemoryUpstreams(self.reactor)
        wanted = config or ProxyConfig(upstream=UPSTREAM)
        settings = replace(
            _settings_for(wanted, cache_dir, cache_size, tag_ttl, stale_if_error),
            storage_hosts=storage_hosts,  # --storage-hosts: the region's S3 names by default
            metrics_port=metrics_port,  # a listener blob redirects must never lead to
        )

        def make_gate(metrics: Metrics) -> Gate:
            # the test's gate sees the process's metrics, as build_gate's does
            self.metrics = metrics
            self.access = access_metrics(metrics)
            return gate(self) if gate is not None else open_gate(self.reactor)

        parts = Parts(
            fetcher=self.fetcher,
            connector=self.upstreams,
            gate=make_gate,
            verify=synchronous_verify,
            blob_store=lambda root, max_bytes: BlobStore(root, max_bytes),  # looked up late: tests replace it
            repositories=lambda spec: lambda: succeed(list(self.repositories.get(spec.name, []))),
        )
        self.built = build(settings, self.reactor, parts)
        proxy = self.built.proxy
        self.registry: CollectorRegistry = proxy.registry
        self.metrics = proxy.metrics
        self.config: ProxyConfig = proxy.config
        self.pool: UpstreamPool = proxy.pool
        self.gate: Gate = proxy.gate
        self.cache: LayerCache | None = proxy.cache
        self.handler: RegistryProxy = proxy.handler
        factory = self.built.factories[0]  # the one --port, without TLS
        assert isinstance(factory, RelayFactory)
        self.factory: RelayFactory = factory
        # passthrough builds no keeper (clients bring credentials); tests still hold one, to
        # show that its token never goes upstream
        keeper = proxy.keeper
        self.keeper = keeper if isinstance(keeper, TokenKeeper) else TokenKeeper(self.reactor, self.fetcher)
        self.keeper.current = token or make_token(now=self.reactor.seconds())
        self.keeper.next_attempt = float("inf")

    def client(self) -> tuple[ClientConnection, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        proto.makeConnection(transport)
        return proto, transport

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.registry.get_sample_value(name, labels or {})

    def close(self) -> None:
        """Let go of what the proxy holds, as its services do when a process stops: upstream
        connections, the cache's files, and connectionLost calls not delivered yet."""
        self.pool.close()
        if self.cache is not None:
            self.cache.close()
        self.upstreams.close()


def _settings_for(
    config: ProxyConfig, cache_dir: str | None, cache_size: int, tag_ttl: float, stale_if_error: float
) -> ProxySettings:
    """The options that make the handler `config`; ValueError if no options can."""
    settings = ProxySettings(
        auth="passthrough" if config.passthrough else "none",
        region="eu-west-1",
        upstream=config.upstream.base.decode("ascii") if config.upstream is not None else None,
        public_url=config.public_base.decode("ascii") if config.public_base is not None else None,
        trust_forwarded=config.trust_forwarded,
        log_format=config.log_format,
        blob_mode=config.blob_mode,
        upstream_timeout=config.request_timeout,
        upload_timeout=config.upload_timeout,
        upstream_connections=4,
        cache_dir=cache_dir,
        cache_bytes=cache_size,
        tag_ttl=tag_ttl,
        stale_if_error=stale_if_error,
    )
    made = proxy_config(settings)
    same_upstream = (made.upstream.key if made.upstream else None) == (config.upstream.key if config.upstream else None)
    if not same_upstream or replace(made, upstream=config.upstream) != config:
        raise ValueError(f"no options make {config!r} (they make {made!r})")
    return settings
