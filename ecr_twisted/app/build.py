"""The composition root: every object of a running proxy is made here, from `ProxySettings` and a reactor.

Three callers, one graph: `options.makeService` (twistd, one process or the main process
of a `--workers` group), `worker.main` (a `--workers` child, `child=ChildSockets(...)`) and
`testing.doubles.Harness` (a `MemoryReactorClock` and test doubles passed as `Parts`). So
tests drive the object graph production runs, and the two cannot drift apart.

Nothing is looked up globally: the reactor is passed in, and so is every collaborator a
test replaces (token fetcher, upstream connector, gate, file check, blob store). The side
effects options must not have happen here: the cache directory and a token key are created,
TLS files loaded, endpoints made and, for `--workers`, sockets bound and children started.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

from prometheus_client import CollectorRegistry
from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet import threads
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IProtocolFactory, IReactorCore
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.usage import UsageError

from ecr_twisted import VERSION
from ecr_twisted.access.htpasswd import Htpasswd
from ecr_twisted.access.throttle import LoginThrottle
from ecr_twisted.access.tokens import TokenIssuer, load_or_create_key
from ecr_twisted.access.webhook import WebhookAuthorizer, http_post
from ecr_twisted.access.gate import AccessConfig, AccessMetrics, Gate
from ecr_twisted.access.policy import PRESETS, FixedPolicy, Policy, PolicyFile
from ecr_twisted.app.config import ProxySettings
from ecr_twisted.app.drain import Drain
from ecr_twisted.app.listeners import (
    DescriptionError,
    ListenerSpec,
    listener_address,
    listener_spec,
    with_backlog,
)
from ecr_twisted.cache.layer import CacheCollector, LayerCache
from ecr_twisted.cache.store import BlobStore, hash_file
from ecr_twisted.ecr.repositories import CatalogDenied, CatalogUnavailable, RepositoryCache, RepositoryLister
from ecr_twisted.ecr.tokens import NoTokens, StaticTokens, TokenFetcher, TokenKeeper, keeper_for
from ecr_twisted.http.http11 import serialize_head, status_line
from ecr_twisted.http.listening import (
    ConnectionGuard,
    GuardedListening,
    default_max_connections,
    open_file_limit,
    somaxconn,
)
from ecr_twisted.http.egress import EgressRules
from ecr_twisted.http.origin import Origin
from ecr_twisted.http.server import Limits, RelayFactory
from ecr_twisted.http.upstream import UpstreamConnection, UpstreamPool
from ecr_twisted.http.tls import ReloadingServerTLS, client_creator_factory
from ecr_twisted.observe.health import ops_site, token_detail
from ecr_twisted.observe.accesslog import RateLimitedLog
from ecr_twisted.observe.metrics import Metrics, PoolCollector, register_runtime
from ecr_twisted.registry.handler import Leg, ProxyConfig, RegistryProxy
from ecr_twisted.registry.catalog import Catalog, Source, adapted
from ecr_twisted.registry.errors import bad_request_body
from ecr_twisted.registry.redirects import RedirectRules, parse_patterns
from ecr_twisted.timers import cancel
from ecr_twisted.upstreams.routing import Router
from ecr_twisted.upstreams.spec import ECR, UpstreamSpec, implicit

if TYPE_CHECKING:
    from ecr_twisted.app.supervisor import ChildListener

__all__ = [
    "Built",
    "ChildSockets",
    "Keepers",
    "Parts",
    "Proxy",
    "access_metrics",
    "build",
    "build_cache",
    "build_gate",
    "build_keeper",
    "build_proxy",
    "describe",
    "client_guard",
    "proxy_config",
    "redirect_rules",
]

Verify = Callable[[int, int], Deferred[str]]

log = Logger()


@dataclass(frozen=True)
class Parts:
    """Collaborators a caller may stand in for (tests do); None means the production one."""

    fetcher: TokenFetcher | None = None  # ProcessTokenFetcher: GetAuthorizationToken in a child process
    connector: Callable[[Origin, UpstreamConnection], Deferred[Any]] | None = None  # the pool's TCP/TLS connect
    gate: Callable[[Metrics], Gate] | None = None  # build_gate(settings, reactor, metrics)
    verify: Verify | None = None  # hash_file in the reactor's thread pool
    blob_store: Callable[[str, int], BlobStore] | None = None  # BlobStore (logs compacted unless a worker child)
    fetchers: dict[str, TokenFetcher] | None = None  # per upstream name; else `fetcher` for every upstream
    # an ECR upstream's repository names for _catalog; None: DescribeRepositories in a child, cached
    repositories: Callable[[UpstreamSpec], Callable[[], Deferred[list[str]]]] | None = None


class Keepers:
    """The token keepers of several upstreams, as one keeper for the process: started and stopped
    together, ready (and holding a first token) when every required (not optional) one is."""

    FIRST_TOKEN_WAIT = 30.0  # seconds a --workers child waits for every required upstream's first token

    def __init__(
        self, keepers: dict[str, Any], optional: frozenset[str] = frozenset(), clock: Any = None
    ) -> None:
        self.keepers = keepers  # upstream name -> TokenKeeper (or another keeper)
        self.optional = optional
        self.clock = clock  # for first_token's bound (None: no bound)
        self._waits: list[Any] = []  # first_token's timers, cancelled by stop

    def _required(self) -> list[Any]:
        return [k for name, k in self.keepers.items() if name not in self.optional]

    def start(self) -> Deferred[Any]:
        return gatherResults([k.start() for k in self.keepers.values()], consumeErrors=True)

    def stop(self) -> None:
        for k in self.keepers.values():
            k.stop()
        for call in self._waits:
            cancel(call)
        self._waits.clear()

    def ready(self, now: float | None = None) -> bool:
        return all(k.ready(now) for k in self._required())

    def first_token(self) -> Deferred[Any]:
        """Fires when every required upstream holds a token, or after FIRST_TOKEN_WAIT seconds
        anyway: one upstream with broken credentials must not keep a worker from serving the
        others (its requests get 503 and /readyz names it)."""
        every = gatherResults([k.first_token() for k in self._required()], consumeErrors=True)
        if self.clock is None:
            return every
        d: Deferred[Any] = Deferred()

        def waited() -> None:
            if not d.called:
                d.callback(None)

        call = self.clock.callLater(self.FIRST_TOKEN_WAIT, waited)
        self._waits.append(call)

        def done(result: Any) -> None:
            cancel(call)
            if not d.called:
                d.callback(None)

        every.addBoth(done)
        return d


@dataclass(frozen=True)
class ChildSockets:
    """What a `--workers` child serves: one listener per `--port`, in order (a SO_REUSEPORT socket
    of its own at the main process's address, or an inherited descriptor), and the unix socket
    its metrics are scraped from."""

    listeners: tuple[ChildListener, ...]
    metrics_socket: str


@dataclass
class Proxy:
    """One process's proxy without its listeners."""

    config: ProxyConfig
    registry: CollectorRegistry
    metrics: Metrics
    keeper: TokenKeeper | StaticTokens | NoTokens | Keepers  # Keepers with an upstream list
    pool: UpstreamPool
    gate: Gate
    cache: LayerCache | None
    handler: RegistryProxy
    limits: Limits
    services: list[service.Service]  # token refreshes, cache rescans: started and stopped with the process
    bad_request_log: Callable[[str], None] = lambda message: None  # rate-limited: see build_proxy

    def relay(self, reactor: Any, tls: bool) -> RelayFactory:
        """The protocol factory of one registry listener (`tls`: the proxy speaks TLS on it)."""

        def bad_request(e: Any) -> None:
            self.metrics.bad_requests.labels(str(e.status)).inc()
            self.bad_request_log(f"{e.status} {e.reason}")

        return RelayFactory(
            self.handler, reactor, self.pool, is_tls=tls, limits=self.limits, on_bad_request=bad_request,
            error_body=lambda e: bad_request_body(e.status, e.reason),
        )


@dataclass
class Built:
    """The whole service tree of one process, and the parts callers look at."""

    top: Drain
    proxy: Proxy
    listeners: list[ListenerSpec]  # one per --port, in order
    factories: list[IProtocolFactory]  # the same, TLS-wrapped where the listener speaks TLS
    settings: ProxySettings  # as used: with the token key this start made, if it made one
    child_argv: tuple[str, ...] = field(default=())  # the options --workers children are started with

    @property
    def registry(self) -> CollectorRegistry:
        return self.proxy.registry

    @property
    def keeper(self) -> TokenKeeper | StaticTokens | NoTokens | Keepers:
        return self.proxy.keeper


def build(settings: ProxySettings, reactor: Any, parts: Parts = Parts(), child: ChildSockets | None = None) -> Built:
    """Everything one process runs: the proxy, its listeners (bound by `reactor` when the tree
    starts), the ops listener and, with `--workers`, the children. `child`: build a worker
    child's tree instead, serving inherited sockets once it holds a token."""
    argv = settings.argv
    if settings.issues_tokens and settings.token_key is None:
        # one key for this start, shared with --workers children through their arguments;
        # its directory goes at shutdown, or now if the start fails
        keydir = tempfile.mkdtemp(prefix="ecrproxy-key-")
        try:
            settings = replace(settings, token_key=_temporary_token_key(keydir))
            built = _build(settings, argv + ("--token-key", str(settings.token_key)), reactor, parts, child)
        except BaseException:
            shutil.rmtree(keydir, True)
            raise
        reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, keydir, True)
        return built
    return _build(settings, argv, reactor, parts, child)


def describe(settings: ProxySettings) -> str:
    """The startup line: what this process serves, and how. File paths, never secrets."""
    import ecr_twisted

    fields = [
        ("auth", settings.auth),
        ("policy", settings.policy if settings.auth != "webhook" else "webhook"),
        ("htpasswd", settings.htpasswd),
        ("webhook", settings.auth_webhook),
        ("read-only", "yes" if settings.read_only else None),
        ("region", settings.region),
        ("registry-id", settings.registry_id),
        ("upstream", settings.upstream or "token's proxyEndpoint") if not settings.upstreams else
        ("upstreams", ",".join(spec.name for spec in settings.upstreams)),
        ("blob-mode", settings.blob_mode),
        ("cache", f"{settings.cache_dir} ({settings.cache_bytes} bytes)" if settings.cache_dir else "off"),
        ("ports", ",".join(settings.ports)),
        ("tls", f"{settings.tls_cert} {settings.tls_key}" if settings.tls_cert else None),
        ("metrics-port", settings.metrics_port),
        ("public-url", settings.public_url),
        ("workers", str(settings.workers)),
    ]
    return f"ecr-twisted {ecr_twisted.__version__}: " + " ".join(f"{k}={v}" for k, v in fields if v is not None)


def _build(
    settings: ProxySettings, argv: tuple[str, ...], reactor: Any, parts: Parts, child: ChildSockets | None
) -> Built:
    if child is None:
        log.info("{line}", line=describe(settings))
    top = Drain(reactor, settings.drain_delay, settings.drain_timeout)
    proxy = build_proxy(settings, reactor, parts, worker=child is not None)
    for svc in proxy.services:
        svc.setServiceParent(top)
    listeners = [_listener("port", spec, settings.tls_cert, settings.tls_key) for spec in settings.ports]
    tls = _TLSFiles(reactor)
    relays = [proxy.relay(reactor, spec.tls) for spec in listeners]
    top.factories.extend(relays)
    factories = [tls.wrap(spec, relay) for spec, relay in zip(listeners, relays)]
    # every registry listener's connections count against one cap; the ops listener has none
    # (cast: a GuardedListening is a reactor as far as endpoints go; the rest it passes on)
    listening = cast(IReactorCore, GuardedListening(reactor, client_guard(settings, reactor, proxy.metrics)))
    backlog = somaxconn()
    others = None
    workers: Any = None
    if child is not None:
        _serve_child(reactor, listening, top, proxy, child, factories)
    elif settings.workers == 1:
        for spec, factory in zip(listeners, factories):
            top.add_listener(strports.service(with_backlog(spec.description, backlog), factory, listening))
    else:
        workers = _start_workers(reactor, listening, top, settings, listeners, factories, argv)
        others = workers.scrape
    if child is None and settings.metrics_port:
        spec = _listener("metrics-port", settings.metrics_port)
        keeper = proxy.keeper
        states = _upstream_states(keeper, settings.upstreams, reactor) if isinstance(keeper, Keepers) else None
        site = ops_site(
            proxy.registry, lambda: top.ready() and keeper.ready(), others, draining=lambda: top.draining,
            upstreams=states,
        )
        ops_guard = client_guard(settings, reactor, proxy.metrics, capped=False)
        ops = cast(IReactorCore, GuardedListening(reactor, ops_guard))
        strports.service(with_backlog(spec.description, backlog), tls.wrap(spec, site), ops).setServiceParent(top)
    _Reloader(reactor, tls.pairs, proxy.gate, workers).setServiceParent(top)
    return Built(top, proxy, listeners, factories, settings, argv)


def _upstream_states(
    keepers: Keepers, specs: Sequence[UpstreamSpec], clock: Any
) -> Callable[[], list[tuple[str, bool, bool, str]]]:
    """Each upstream's line of /readyz: its keeper's readiness and how its token looks."""

    def states() -> list[tuple[str, bool, bool, str]]:
        now = clock.seconds()
        out = []
        for spec in specs:
            keeper = keepers.keepers[spec.name]
            if isinstance(keeper, StaticTokens):
                detail = "no token to refresh"
            else:
                token = getattr(keeper, "current", None)
                detail = token_detail(token.expires_at if token is not None else None, now)
            out.append((spec.name, keeper.ready(now), spec.optional, detail))
        return out

    return states


def client_guard(settings: ProxySettings, reactor: Any, metrics: Metrics, *, capped: bool = True) -> ConnectionGuard:
    """What a process's listeners do when clients or descriptors run out (`http.listening`):
    `--max-connections`, or as many as the open-file limit leaves room for, then `503`."""
    limit = None
    if capped:
        open_files = open_file_limit()
        limit = settings.max_connections or default_max_connections(
            open_files, settings.upstream_connections, settings.cache_dir is not None
        )
        log.info(
            "at most {limit} client connections per process (open-file limit {open_files}; --max-connections)",
            limit=limit, open_files=open_files,
        )
        metrics.connections_max.set(limit)
    content_type, body = bad_request_body(503, "the proxy has too many client connections; retry shortly")
    busy = serialize_head(status_line(503), [
        (b"Content-Type", content_type),
        (b"Content-Length", b"%d" % len(body)),
        (b"Retry-After", b"1"),
        (b"Connection", b"close"),
    ]) + body
    guard = ConnectionGuard(
        reactor, limit, busy_response=busy,
        on_refused=lambda how: metrics.connections_refused.labels(how).inc(),
        on_accept_error=lambda name: metrics.accept_errors.labels(name).inc(),
    )
    if capped:
        metrics.connections.set_function(lambda: guard.open)
    return guard


def build_proxy(settings: ProxySettings, reactor: Any, parts: Parts = Parts(), *, worker: bool = False) -> Proxy:
    """The request path of one process: token keeper, upstream pool, gate, cache and handler."""
    registry = CollectorRegistry()
    specs = settings.upstreams or (
        implicit(settings.registry_id, settings.region, settings.upstream, settings.ecr_endpoint_url),
    )
    metrics = Metrics(registry, upstreams=tuple(spec.name for spec in specs))
    register_runtime(registry, VERSION)
    router: Router | None = None
    legs: dict[str, Leg] | None = None
    keeper: TokenKeeper | StaticTokens | NoTokens | Keepers
    if settings.upstreams:
        # several upstreams: one keeper each, one router; the pool is shared (it is keyed by origin)
        router = Router(settings.upstreams)
        fetchers = parts.fetchers or {}
        keepers = {
            spec.name: build_keeper(settings, reactor, metrics, fetchers.get(spec.name, parts.fetcher), spec)
            for spec in settings.upstreams
        }
        keeper = Keepers(keepers, frozenset(spec.name for spec in settings.upstreams if spec.optional), reactor)
        passthrough = settings.auth == "passthrough"  # refused with an upstream list by the options
        legs = {
            spec.name: Leg(
                spec, None if passthrough else keepers[spec.name],  # type: ignore[arg-type]  # NoTokens: passthrough
                Origin.from_url(spec.url) if spec.url else None,
            )
            for spec in settings.upstreams
        }
    else:
        keeper = build_keeper(settings, reactor, metrics, parts.fetcher)
    tls_for = client_creator_factory(settings.upstream_ca, settings.upstream_insecure)
    egress = EgressRules.from_settings(settings.egress_proxy, settings.proxy_env)
    if egress and not worker:
        log.info("{line}", line=egress.describe())
    pool = UpstreamPool(
        reactor, tls_for, max_per_origin=settings.upstream_connections, connector=parts.connector,
        wait=settings.upstream_wait, egress=egress,
    )
    services: list[service.Service] = [_TokenService(keeper, pool)]
    registry.register(PoolCollector(pool.stats))
    config = proxy_config(settings)
    gate = parts.gate(metrics) if parts.gate is not None else build_gate(settings, reactor, metrics)
    cache = build_cache(settings, reactor, parts.verify, parts.blob_store, worker=worker)
    if cache is not None:
        registry.register(CacheCollector(cache))
        services.append(_CacheRescan(cache, reactor))
    tokens = None if config.passthrough or legs is not None else keeper
    handler = RegistryProxy(
        config, tokens, metrics, reactor, gate, cache, redirect_rules(settings),  # type: ignore[arg-type]
        router=router, legs=legs,
        catalog=build_catalog(settings, reactor, specs, parts),
    )
    limits = Limits(
        head_timeout=settings.head_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        idle_timeout=settings.idle_timeout,
        min_rate=settings.min_body_rate,
        rate_window=settings.min_body_rate_window,
    )
    bad_requests = RateLimitedLog(_log_bad_request, reactor, BAD_REQUEST_LOG_INTERVAL)
    return Proxy(config, registry, metrics, keeper, pool, gate, cache, handler, limits, services, bad_requests)


BAD_REQUEST_LOG_INTERVAL = 10.0  # seconds: at most one line about refused (malformed) requests


def _log_bad_request(message: str, suppressed: int) -> None:
    more = f" ({suppressed} more since the last such line)" if suppressed else ""
    log.warn("bad request refused: {message}{more}", message=message, more=more)


def proxy_config(settings: ProxySettings) -> ProxyConfig:
    """The handler's view of the settings."""
    passthrough = settings.auth == "passthrough"
    upstream = Origin.from_url(settings.upstream) if settings.upstream else None
    if passthrough and upstream is None:  # no token to name the registry: the options ensure an account
        upstream = Origin("https", f"{settings.registry_id}.dkr.ecr.{settings.region}.amazonaws.com")
    return ProxyConfig(
        upstream=upstream,
        public_base=Origin.from_url(settings.public_url).base if settings.public_url else None,
        trust_forwarded=settings.trust_forwarded,
        blob_mode=settings.blob_mode,
        request_timeout=settings.upstream_timeout,
        upload_timeout=settings.upload_timeout,
        passthrough=passthrough,
        log_format=settings.log_format,
    )


def redirect_rules(settings: ProxySettings) -> RedirectRules:
    """Where blob redirects may lead: --storage-hosts, never the proxy's own listeners."""
    specs = list(settings.ports) + ([settings.metrics_port] if settings.metrics_port else [])
    own = []
    for spec in specs:
        address = listener_address(_listener("port", spec).description)
        if address is not None:
            own.append(address)
    regions = [spec.region or settings.region for spec in settings.upstreams if spec.kind == ECR]
    if settings.upstreams:  # only the ECR upstreams' regions have S3 names to follow redirects to
        return RedirectRules(parse_patterns(settings.storage_hosts, "", *regions), tuple(own))
    return RedirectRules(parse_patterns(settings.storage_hosts, settings.region), tuple(own))


def build_keeper(
    settings: ProxySettings, reactor: Any, metrics: Metrics, fetcher: TokenFetcher | None = None,
    spec: UpstreamSpec | None = None,
) -> TokenKeeper | StaticTokens | NoTokens:
    """The token keeper of one upstream (`spec`; None: the one of --registry-id/--region);
    passthrough clients bring their own credentials, so it has none."""
    if settings.auth == "passthrough":
        return NoTokens()
    if spec is None:
        spec = implicit(settings.registry_id, settings.region, settings.upstream, settings.ecr_endpoint_url)
    elif not spec.region:
        spec = replace(spec, region=settings.region)  # --region is every ECR upstream's default
    name = spec.name

    def on_result(result: str, token: Any) -> None:
        metrics.token_result(result, token.expires_at if token is not None else None, name)

    return keeper_for(reactor, spec, proxy_env=_child_proxy_env(settings), on_result=on_result, fetcher=fetcher)


def _child_proxy_env(settings: ProxySettings) -> dict[str, str]:
    """What the ECR API children (botocore honours these) get besides the inherited environment:
    --egress-proxy wins over HTTPS_PROXY/HTTP_PROXY for them as for the data path."""
    if settings.egress_proxy:
        return {"HTTPS_PROXY": settings.egress_proxy, "HTTP_PROXY": settings.egress_proxy}
    return {}


def build_catalog(
    settings: ProxySettings, reactor: Any, specs: Sequence[UpstreamSpec], parts: Parts = Parts()
) -> Catalog | None:
    """`_catalog` from DescribeRepositories of every ECR upstream (ECR answers 405 to the registry
    API's own); never in passthrough, where the proxy's AWS principal must not list for clients."""
    if settings.auth == "passthrough":
        return None
    sources = []
    for spec in specs:
        if spec.kind != ECR:
            continue
        if not spec.region:
            spec = replace(spec, region=settings.region)
        if parts.repositories is not None:
            names = parts.repositories(spec)
        else:
            lister = RepositoryLister(reactor, spec, _child_proxy_env(settings))
            names = RepositoryCache(lister, reactor, settings.catalog_ttl).names
        sources.append(Source(spec.namespace, adapted(
            names, spec.name, denied=(CatalogDenied,), unavailable=(CatalogUnavailable,)), spec.name))
    return Catalog(sources)


def access_metrics(metrics: Metrics) -> AccessMetrics:
    """The gate's counters in the process's metrics."""
    return AccessMetrics(metrics.auth_attempts, metrics.access_denied, metrics.webhook_errors)


def build_gate(settings: ProxySettings, reactor: Any, metrics: Metrics) -> Gate:
    """Who may do what: the --auth mode with its htpasswd, token issuer or webhook, and the policy."""
    mode = settings.auth
    policy: Any = FixedPolicy(Policy.preset(settings.policy)) if settings.policy in PRESETS else PolicyFile(
        settings.policy, reactor
    )
    config = AccessConfig(
        mode=mode,
        namespace=re.compile(settings.namespace_pattern) if settings.namespace_pattern else None,
        exclude=re.compile(settings.exclude_pattern) if settings.exclude_pattern else None,
        read_only=settings.read_only,
        service=settings.token_service,
    )
    htpasswd = Htpasswd(settings.htpasswd, reactor) if mode in ("basic", "token") and settings.htpasswd else None
    issuer = None
    if settings.issues_tokens:
        issuer = TokenIssuer(_token_key(settings), settings.token_service, settings.token_ttl)
    webhook = None
    if mode == "webhook" and settings.auth_webhook:
        from twisted.web.client import Agent, HTTPConnectionPool

        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))
        post = http_post(agent, reactor, settings.auth_webhook, settings.auth_webhook_timeout)
        webhook = WebhookAuthorizer(
            post, reactor, settings.auth_webhook_ttl, on_error=lambda problem: metrics.webhook_errors.inc()
        )
    return Gate(config, policy, reactor, access_metrics(metrics), htpasswd, issuer, webhook, LoginThrottle())


def build_cache(
    settings: ProxySettings,
    reactor: Any,
    verify: Verify | None = None,
    store: Callable[[str, int], BlobStore] | None = None,
    *,
    worker: bool = False,
) -> LayerCache | None:
    """The layer cache on --cache-dir (created if needed), or None without one."""
    where = settings.cache_dir
    if not where:
        return None
    try:
        os.makedirs(where, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--cache-dir {where}: {e.strerror}") from None
    # --workers children share the main process's directory and leave its logs as they are
    make_store = store if store is not None else functools.partial(BlobStore, compact=not worker)
    if verify is None:

        def verify(fd: int, size: int) -> Deferred[str]:
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(), hash_file, fd, size)

    return LayerCache(
        make_store(where, settings.cache_bytes),
        reactor,
        verify,
        tag_ttl=settings.tag_ttl,
        stale_if_error=settings.stale_if_error,
        every_time=settings.auth == "passthrough",
    )


class _TokenService(service.Service):
    """Refreshes the token while the process runs; closes upstream connections when it stops."""

    log = Logger()

    def __init__(self, keeper: TokenKeeper | StaticTokens | NoTokens | Keepers, pool: UpstreamPool) -> None:
        self.keeper = keeper
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.keeper.start().addErrback(lambda f: self.log.failure("token loop stopped", f))

    def stopService(self) -> Deferred[None] | None:
        self.keeper.stop()
        self.pool.close()
        return super().stopService()


class _CacheRescan(TimerService):
    """Keeps this process's view of a cache directory shared with other workers current;
    closes the cache's files when the process stops."""

    log = Logger()
    RESCAN = 30.0

    def __init__(self, cache: LayerCache, clock: Any) -> None:
        super().__init__(self.RESCAN, self._rescan)
        self.clock = clock
        self.cache = cache

    def _rescan(self) -> None:
        # TimerService stops calling after an exception: this step must never raise
        try:
            self.cache.store.rescan()
        except Exception:
            self.log.failure("cache rescan failed (will try again)")

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = super().stopService()
        return d.addCallback(lambda _: self.cache.close())


class _TLSFiles:
    """Loads each certificate and key pair once, however many listeners use it; each pair
    follows its files (`ReloadingServerTLS`)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._loaded: dict[tuple[str, str], ReloadingServerTLS] = {}

    @property
    def pairs(self) -> list[ReloadingServerTLS]:
        return list(self._loaded.values())

    def wrap(self, spec: ListenerSpec, factory: Any) -> Any:
        if spec.cert is None or spec.key is None:
            return factory
        pair = (spec.cert, spec.key)
        if pair not in self._loaded:
            try:
                self._loaded[pair] = ReloadingServerTLS(*pair, self.reactor)
            except Exception as e:
                raise UsageError(f"--port {spec.description}: cannot load {spec.cert} / {spec.key}: {e}") from None
        return TLSMemoryBIOFactory(self._loaded[pair], False, factory)


class _Reloader(service.Service):
    """SIGHUP: re-read at once everything that follows its files (TLS pairs, htpasswd, policy
    file), rather than when the next connection or request looks; each logs what changed."""

    log = Logger()

    def __init__(self, reactor: Any, tls: list[ReloadingServerTLS], gate: Gate, workers: Any = None) -> None:
        self.reactor = reactor
        self.tls = tls
        self.gate = gate
        self.workers = workers  # the main process of a --workers group passes SIGHUP on to its children
        self._previous: Any = None

    def reload(self) -> None:
        self.log.info("SIGHUP: re-reading TLS files, htpasswd and policy")
        if self.workers is not None:
            self.workers.signal_all("HUP")
        changed = [pair.cert_file for pair in self.tls if pair.check()]
        htpasswd = getattr(self.gate, "htpasswd", None)
        if isinstance(htpasswd, Htpasswd):
            changed += [htpasswd.path] if htpasswd.check_now() else []
        if isinstance(self.gate.policy, PolicyFile):
            changed += [self.gate.policy.path] if self.gate.policy.check_now() else []
        self.log.info("SIGHUP: {what}", what="re-read " + ", ".join(changed) if changed else "nothing changed")

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGHUP"):
            # the handler only hands the work to the reactor: it may run between any two bytecodes
            self._previous = signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def stopService(self) -> Deferred[None] | None:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()


def _listener(option: str, spec: str, tls_cert: str | None = None, tls_key: str | None = None) -> ListenerSpec:
    try:
        return listener_spec(spec, tls_cert, tls_key)
    except DescriptionError as e:  # checked by Options already; settings made by hand may be wrong
        raise UsageError(f"--{option}: {e}") from None


def _token_key(settings: ProxySettings) -> bytes:
    try:
        return load_or_create_key(str(settings.token_key))
    except (OSError, ValueError) as e:
        raise UsageError(f"--token-key: {e}") from None


def _temporary_token_key(keydir: str) -> str:
    path = os.path.join(keydir, "token.key")
    load_or_create_key(path)
    return path


def _start_workers(
    reactor: Any,
    listening: Any,  # a GuardedListening
    top: Drain,
    settings: ProxySettings,
    listeners: list[ListenerSpec],
    factories: list[Any],
    argv: tuple[str, ...],
) -> Any:  # a WorkerProcesses
    """The main process of a --workers group binds the sockets (a port in use fails the start
    here), serves them and starts the children, which bind their own to the same addresses
    with SO_REUSEPORT (returned: they are scraped for metrics and passed SIGHUP)."""
    from ecr_twisted.app.supervisor import AdoptedPort, ListenerError, WorkerProcesses, bind_listener, child_listener

    try:
        sockets = [bind_listener(spec.description, share=True) for spec in listeners]
    except ListenerError as e:
        raise UsageError(f"--port {e}") from None
    for sock, factory in zip(sockets, factories):
        top.add_listener(AdoptedPort(listening, sock, factory))
    socket_dir = tempfile.mkdtemp(prefix="ecrproxy-workers-")
    reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, socket_dir, True)
    shared = [child_listener(spec.description, sock) for spec, sock in zip(listeners, sockets)]
    children = WorkerProcesses(reactor, settings.workers, list(argv), shared, socket_dir)
    children.setServiceParent(top)
    # on SIGTERM the children drain too (each with the same options); this process waits for them
    top.on_drain.append(children.drain)
    top.on_abort.append(children.abort)
    return children


def _serve_child(
    reactor: Any, listening: Any, top: Drain, proxy: Proxy, child: ChildSockets,
    factories: list[Any],
) -> None:
    """A --workers child listens once it holds a token; its SO_REUSEPORT sockets are made only
    then, so the kernel never hashes a connection to a process that is not ready to serve."""
    from ecr_twisted.app.supervisor import AdoptedPort, ListenerError, join_listener

    inherited = {n: socket.socket(fileno=s.fd) for n, s in enumerate(child.listeners) if s.fd is not None}

    def listen(_: Any) -> None:
        # a child that answered before holding a token would turn its share of requests
        # into 503s while its first GetAuthorizationToken call is under way
        if top.draining:
            return
        made: list[socket.socket] = []
        try:
            for n, shared in enumerate(child.listeners):
                if n not in inherited:
                    made.append(join_listener(shared))
        except ListenerError as e:
            for sock in made:
                sock.close()
            log.error("worker: {e}; exiting (the main process starts another)", e=e)
            reactor.stop()
            return
        own = iter(made)
        for n, factory in enumerate(factories):
            top.add_listener(AdoptedPort(listening, inherited[n] if n in inherited else next(own), factory))

    proxy.keeper.first_token().addCallback(listen)
    StreamServerEndpointService(
        UNIXServerEndpoint(reactor, child.metrics_socket, mode=0o600), ops_site(proxy.registry, proxy.keeper.ready)
    ).setServiceParent(top)
