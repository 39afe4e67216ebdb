"""`twistd ecrproxy`: options (command line over ECRPROXY_* environment) and the service tree."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from ecr_twisted.access.gate import MODES, AccessConfig, AccessMetrics, Gate
from ecr_twisted.cache.store import BlobStore, hash_file
from ecr_twisted.cache.layer import CacheCollector, LayerCache
from ecr_twisted.access.htpasswd import Htpasswd
from ecr_twisted.access.throttle import LoginThrottle
from ecr_twisted.access.tokens import TokenIssuer, load_or_create_key
from ecr_twisted.access.webhook import WebhookAuthorizer, http_post
from ecr_twisted.observe.metrics import Metrics
from ecr_twisted.access.policy import PRESETS, FixedPolicy, Policy, PolicyError, PolicyFile
from ecr_twisted.observe.health import ops_site
from ecr_twisted.registry.handler import ProxyConfig, RegistryProxy
from ecr_twisted.http.streaming import Limits, Origin, RelayFactory, UpstreamPool
from ecr_twisted.http.tls import client_creator_factory
from ecr_twisted.ecr.tokens import NoTokens, ProcessTokenFetcher, TokenKeeper

ENV_PREFIX = "ECRPROXY_"
_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]+\Z")
_ACCOUNT = re.compile(r"[0-9]{12}\Z")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_name(option: str) -> str:
    return ENV_PREFIX + option.upper().replace("-", "_")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Publish a private AWS ECR registry on your own domain: a streaming reverse proxy "
        "that holds the AWS credentials and refreshes the ECR token itself. Every option "
        "can also be set as ECRPROXY_<OPTION> (e.g. ECRPROXY_REGISTRY_ID); the command line wins."
    )

    optFlags = [
        ["anonymous", None, "Same as --auth none: anyone who reaches the proxy may pull and push (unless --policy says less)."],
        ["read-only", None, "No push or delete for anyone, whatever the policy says."],
        ["upstream-insecure", None, "Do not verify the upstream's TLS certificate (tests only)."],
        ["trust-forwarded", None, "Derive the public URL from X-Forwarded-Proto/-Host (behind a trusted load balancer)."],
    ]
    optParameters = [
        ["tls-cert", None, None, "PEM certificate (chain) for client-facing TLS."],
        ["tls-key", None, None, "PEM private key for client-facing TLS."],
        ["registry-id", None, None, "AWS account ID of the ECR registry (default: the credentials' own)."],
        ["region", None, None, "AWS region of the registry (default: botocore's configured region)."],
        ["upstream", None, None, "Registry URL overriding the token's proxyEndpoint (VPC endpoints, tests)."],
        ["ecr-endpoint-url", None, None, "Endpoint URL of the ECR API (tests; AWS_ENDPOINT_URL_ECR works too)."],
        ["upstream-ca", None, None, "Extra CA (PEM) trusted for upstream TLS, besides the system's."],
        ["public-url", None, None, "scheme://host[:port] clients use; default: taken from each request."],
        ["blob-mode", None, "stream", "stream: follow ECR's redirects to S3 and pipe blobs; redirect: pass them to clients."],
        ["metrics-port", None, None, "Endpoint for /metrics, /healthz and /readyz (e.g. tcp:9100)."],
        ["upstream-connections", None, 64, "Most connections kept per upstream host.", int],
        ["upstream-timeout", None, 60.0, "Seconds to wait for an upstream response head.", float],
        ["upload-timeout", None, 900.0, "Seconds to wait for an upstream answer to upload requests (commits are slow).", float],
        ["idle-timeout", None, 300.0, "Seconds a transfer may make no progress before it is aborted.", float],
        ["auth", None, None, "Who clients are: none, basic, token, passthrough or webhook (an explicit choice is required)."],
        ["htpasswd", None, None, "Users for --auth basic/token: an htpasswd file of bcrypt hashes (re-read when it changes)."],
        ["policy", None, None, "Access policy: a TOML file (re-read when it changes) or a preset: "
         "public-read, private, open. Default: open with --auth none, private otherwise."],
        ["namespace-pattern", None, None, "Only repositories whose whole name matches this regex exist for clients."],
        ["exclude-pattern", None, None, "Repositories whose whole name matches this regex do not exist for clients."],
        ["token-key", None, None, "--auth basic|token: file with the token signing key (created if absent; default: a new key per start)."],
        ["token-service", None, "ecr-twisted", "--auth basic|token: the service name in Bearer challenges and tokens."],
        ["token-ttl", None, 300, "--auth basic|token: seconds a token lives.", int],
        ["auth-webhook", None, None, "--auth webhook: URL the proxy POSTs each access question to."],
        ["auth-webhook-ttl", None, 60.0, "--auth webhook: seconds an answer is remembered.", float],
        ["auth-webhook-timeout", None, 5.0, "--auth webhook: seconds to wait for an answer (then deny).", float],
        ["workers", None, 1, "Processes serving the listeners (this one and N-1 children); tcp:/unix: listeners.", int],
        ["cache-dir", None, None, "Keep pulled blobs and manifests here and serve them from disk (off without it)."],
        ["cache-size", None, "50GiB", "Most the cache may hold (e.g. 50GiB, 512MiB, 10G); least recently used blobs go first."],
        ["tag-ttl", None, 60.0, "Seconds a cached manifest by tag is served before it is revalidated upstream.", float],
        ["stale-if-error", None, 86400.0, "Seconds a manifest by tag may be served stale while the upstream cannot answer.", float],
    ]

    compData = usage.Completions(
        optActions={
            "blob-mode": usage.CompleteList(["stream", "redirect"]),
            "auth": usage.CompleteList(list(MODES)),
        }
    )

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self["port"] = []
        self._ports_from_cli = False
        self._from_env()

    def _from_env(self) -> None:
        env = self.environ
        for name, _, default, _, *coerce in self.optParameters:
            value = env.get(_env_name(name))
            if value is not None and value != "":
                try:
                    self[name] = coerce[0](value) if coerce else value
                except ValueError:
                    raise usage.UsageError(f"{_env_name(name)}: invalid value {value!r}") from None
        for name, _, _ in self.optFlags:
            value = env.get(_env_name(name))
            if value is not None:
                if value.strip().lower() in _TRUE:
                    self[name] = 1
                elif value.strip().lower() not in _FALSE:
                    raise usage.UsageError(f"{_env_name(name)}: expected true or false, got {value!r}")
        ports = env.get(_env_name("port"))
        if ports:
            self["port"] = ports.replace(",", " ").split()

    def opt_port(self, value: str) -> None:
        """Listen here: a port number or a Twisted endpoint string (repeatable; default 5000)."""
        if not self._ports_from_cli:
            self["port"] = []
            self._ports_from_cli = True
        self["port"].append(value)

    opt_p = opt_port

    def parseOptions(self, options: list[str] | None = None) -> None:
        # kept so --workers children can be started with exactly the same options
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self) -> None:
        self._auth_options()
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        for name in ("tls-cert", "tls-key", "upstream-ca"):
            if self[name] and not os.path.isfile(self[name]):
                raise usage.UsageError(f"--{name}: no such file: {self[name]}")
        if self["tls-cert"]:
            from ecr_twisted.http.tls import server_options

            try:
                self["tls-options"] = server_options(self["tls-cert"], self["tls-key"])
            except Exception as e:
                raise usage.UsageError(f"--tls-cert/--tls-key: cannot load: {e}") from None
        if self["upstream-ca"]:
            from ecr_twisted.http.tls import PlatformPlusCA

            try:
                PlatformPlusCA(self["upstream-ca"])
            except Exception as e:
                raise usage.UsageError(f"--upstream-ca: {e}") from None
        if self["registry-id"] and not _ACCOUNT.match(self["registry-id"]):
            raise usage.UsageError("--registry-id must be a 12-digit AWS account ID")
        if not self["region"]:
            self["region"] = _botocore_region()
        if not self["region"] or not _REGION.match(self["region"]):
            raise usage.UsageError("--region is required (e.g. eu-west-1), or configure botocore's region")
        self["upstream-origin"] = _url_option("upstream", self["upstream"]) if self["upstream"] else None
        if self["ecr-endpoint-url"]:
            _url_option("ecr-endpoint-url", self["ecr-endpoint-url"], allow_path=True)
        public = None
        if self["public-url"]:
            public = _url_option("public-url", self["public-url"]).base
        self["public-base"] = public
        if self["blob-mode"] not in ("stream", "redirect"):
            raise usage.UsageError("--blob-mode must be stream or redirect")
        if not 1 <= self["workers"] <= 64:
            raise usage.UsageError("--workers must be between 1 and 64")
        if self["upstream-connections"] < 1:
            raise usage.UsageError("--upstream-connections must be at least 1")
        for name in ("upstream-timeout", "upload-timeout", "idle-timeout"):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        if not self["port"]:
            self["port"] = ["5000"]
        from twisted.internet import reactor

        self["listeners"] = [self._listener(reactor, p) for p in self["port"]]
        if self["workers"] > 1:
            for spec in self["port"]:
                if not (spec.isdigit() or spec.split(":", 1)[0] in ("tcp", "tcp6", "ssl", "unix")):
                    raise usage.UsageError(f"--port {spec!r}: --workers needs tcp:, tcp6:, ssl: or unix: listeners")
        self["metrics-endpoint"] = _endpoint(reactor, "metrics-port", self["metrics-port"]) if self["metrics-port"] else None
        self._cache_options()

    def _cache_options(self) -> None:
        try:
            self["cache-bytes"] = parse_size(str(self["cache-size"]))
        except ValueError as e:
            raise usage.UsageError(f"--cache-size: {e}") from None
        for name in ("tag-ttl", "stale-if-error"):
            if not self[name] >= 0:
                raise usage.UsageError(f"--{name} must be zero or a positive number of seconds")
        where = self["cache-dir"]
        if not where:
            return
        try:
            os.makedirs(where, exist_ok=True)
        except OSError as e:
            raise usage.UsageError(f"--cache-dir {where}: {e.strerror}") from None
        if not os.access(where, os.W_OK | os.X_OK):
            raise usage.UsageError(f"--cache-dir {where}: not writable")

    def _auth_options(self) -> None:
        mode = self["auth"]
        if self["anonymous"]:
            if mode not in (None, "none"):
                raise usage.UsageError(f"--anonymous means --auth none; it cannot go with --auth {mode}")
            mode = "none"
        if mode is None:
            raise usage.UsageError(
                "choose who may use the proxy: --auth none|basic|token|passthrough|webhook "
                "(--anonymous: anyone who can reach it may pull and push). "
                "The proxy will not publish a private registry by accident."
            )
        if mode not in MODES:
            raise usage.UsageError(f"--auth must be one of {', '.join(MODES)}, got {mode!r}")
        self["auth"] = mode
        if mode in ("basic", "token"):
            if not self["htpasswd"]:
                raise usage.UsageError(f"--auth {mode} needs --htpasswd FILE (bcrypt hashes: htpasswd -B)")
            try:
                Htpasswd(self["htpasswd"], _NoClock())
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--htpasswd: {e}") from None
        elif self["htpasswd"]:
            raise usage.UsageError(f"--htpasswd is for --auth basic or token, not {mode}")
        if mode == "webhook":
            if not self["auth-webhook"]:
                raise usage.UsageError("--auth webhook needs --auth-webhook URL")
            _url_option("auth-webhook", self["auth-webhook"], allow_path=True)
            if self["policy"]:
                raise usage.UsageError("--policy does not apply with --auth webhook: the webhook decides")
        elif self["auth-webhook"]:
            raise usage.UsageError("--auth-webhook is for --auth webhook")
        if mode == "passthrough" and not self["upstream"]:
            if not self["registry-id"]:
                raise usage.UsageError("--auth passthrough needs --upstream URL or --registry-id (there is no token to name it)")
        policy = self["policy"] or ("open" if mode == "none" else "private")
        if policy in PRESETS:
            self["policy-source"] = ("preset", policy)
        else:
            try:
                PolicyFile(policy, _NoClock())
            except OSError as e:
                raise usage.UsageError(f"--policy: {policy!r} is neither a preset ({', '.join(PRESETS)}) "
                                       f"nor a readable file: {e.strerror}") from None
            except PolicyError as e:
                raise usage.UsageError(f"--policy: {e}") from None
            self["policy-source"] = ("file", policy)
        for name in ("namespace-pattern", "exclude-pattern"):
            if self[name]:
                try:
                    self[name + "-re"] = re.compile(self[name])
                except re.error as e:
                    raise usage.UsageError(f"--{name}: not a regular expression: {e}") from None
            else:
                self[name + "-re"] = None
        if mode in ("basic", "token"):  # basic mode offers the token flow when anonymous may pull
            if not 30 <= self["token-ttl"] <= 86400:
                raise usage.UsageError("--token-ttl must be between 30 and 86400 seconds")
            if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,128}", self["token-service"]):
                raise usage.UsageError("--token-service: letters, digits and .:_- only")
            if not self["token-key"]:
                # one key for this start, shared with --workers children through their arguments
                keydir = tempfile.mkdtemp(prefix="ecrproxy-key-")
                self["token-key"] = os.path.join(keydir, "token.key")
                self["token-key-dir"] = keydir
                self.argv += ["--token-key", self["token-key"]]
            try:
                load_or_create_key(self["token-key"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--token-key: {e}") from None
        if not self["auth-webhook-ttl"] >= 0 or not self["auth-webhook-timeout"] > 0:
            raise usage.UsageError("--auth-webhook-ttl must be >= 0 and --auth-webhook-timeout > 0")

    def _listener(self, reactor: Any, spec: str) -> tuple[Any, bool]:
        """(endpoint, TLS applied by the proxy?). With --tls-cert/--tls-key every listener
        speaks TLS, whatever its endpoint type; `ssl:` strings carry their own certificate."""
        if spec.isdigit() and not 0 < int(spec) < 65536:
            raise usage.UsageError(f"--port: {spec} is not a port number")
        endpoint = _endpoint(reactor, "port", spec)
        if spec.split(":", 1)[0] == "ssl":
            return endpoint, False
        return endpoint, self.get("tls-options") is not None


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b?)\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(value: str) -> int:
    """Bytes in '50GiB', '512MiB', '10G', '1.5T' or '1048576' (K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024)."""
    m = _SIZE.match(value)
    if m is None:
        raise ValueError(f"not a size: {value!r} (e.g. 50GiB, 512MiB, 10G)")
    unit = m.group(2).lower().rstrip("b")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1 << 20:
        raise ValueError(f"{value!r} is under 1 MiB: too small to cache layers")
    return size


def _endpoint(reactor: Any, option: str, spec: str) -> Any:
    if spec.isdigit():
        spec = "tcp:" + spec
    try:
        endpoint = endpoints.serverFromString(reactor, spec)
    except Exception as e:
        raise usage.UsageError(f"--{option}: invalid endpoint {spec!r}: {e}") from None
    if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
        from ecr_twisted.http.tls import serve_http11

        serve_http11(endpoint._sslContextFactory)  # Twisted's ssl: endpoints refuse ALPN clients otherwise
    return endpoint


def _url_option(option: str, value: str, allow_path: bool = False) -> Origin:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise usage.UsageError(f"--{option} must look like https://host[:port], got {value!r}")
    if not allow_path and (parts.path not in ("", "/") or parts.query or parts.fragment):
        raise usage.UsageError(f"--{option} takes no path or query, got {value!r}")
    try:
        return Origin(parts.scheme, parts.hostname, parts.port)
    except ValueError as e:
        raise usage.UsageError(f"--{option}: {e}") from None


def _botocore_region() -> str | None:
    try:
        import botocore.session

        return botocore.session.get_session().get_config_variable("region")
    except Exception:
        return None


class _NoClock:
    """For reading files once at option time."""

    @staticmethod
    def seconds() -> float:
        return 0.0


def build_gate(options: Options, reactor: Any, metrics: Metrics) -> Gate:
    mode = options["auth"]
    kind, where = options["policy-source"]
    policy: Any = FixedPolicy(Policy.preset(where)) if kind == "preset" else PolicyFile(where, reactor)
    config = AccessConfig(
        mode=mode,
        namespace=options["namespace-pattern-re"],
        exclude=options["exclude-pattern-re"],
        read_only=bool(options["read-only"]),
        service=options["token-service"],
    )
    htpasswd = Htpasswd(options["htpasswd"], reactor) if mode in ("basic", "token") else None
    issuer = None
    if mode in ("basic", "token"):
        issuer = TokenIssuer(load_or_create_key(options["token-key"]), options["token-service"], options["token-ttl"])
    webhook = None
    if mode == "webhook":
        from twisted.web.client import Agent, HTTPConnectionPool

        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=True))
        post = http_post(agent, reactor, options["auth-webhook"], options["auth-webhook-timeout"])
        webhook = WebhookAuthorizer(
            post, reactor, options["auth-webhook-ttl"], on_error=lambda problem: metrics.webhook_errors.inc()
        )
    gate_metrics = AccessMetrics(metrics.auth_attempts, metrics.access_denied, metrics.webhook_errors)
    return Gate(config, policy, reactor, gate_metrics, htpasswd, issuer, webhook, LoginThrottle())


class _CacheService(service.Service):
    """Keeps one process's view of a cache directory shared with other workers current."""

    log = Logger()
    RESCAN = 30.0

    def __init__(self, cache: LayerCache, reactor: Any) -> None:
        self.cache = cache
        self.loop = LoopingCall(self._rescan)
        self.loop.clock = reactor

    def _rescan(self) -> None:
        try:
            self.cache.store.rescan()
        except Exception:
            self.log.failure("cache rescan failed (will try again)")

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.RESCAN, now=False)

    def stopService(self) -> Any:
        if self.loop.running:
            self.loop.stop()
        self.cache.close()
        return super().stopService()


def build_cache(options: Options, reactor: Any) -> LayerCache | None:
    if not options["cache-dir"]:
        return None
    # --workers children share the main process's directory and leave its logs as they are
    store = BlobStore(options["cache-dir"], options["cache-bytes"], compact=not options.get("worker-child"))

    def verify(fd: int, size: int) -> Any:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), hash_file, fd, size)

    return LayerCache(
        store,
        reactor,
        verify,
        tag_ttl=options["tag-ttl"],
        stale_if_error=options["stale-if-error"],
        every_time=options["auth"] == "passthrough",
    )


class _TokenService(service.Service):
    log = Logger()

    def __init__(self, keeper: TokenKeeper | NoTokens, pool: UpstreamPool) -> None:
        self.keeper = keeper
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.keeper.start().addErrback(lambda f: self.log.failure("token loop stopped", f))

    def stopService(self) -> Any:
        self.keeper.stop()
        self.pool.close()
        return super().stopService()


@dataclass
class Built:
    """One process's proxy, without its listeners: what the main process and workers share."""

    top: service.MultiService
    registry: CollectorRegistry
    keeper: TokenKeeper | NoTokens
    factories: list[Any]  # one per --port, TLS-wrapped where it applies


def build(options: Options, reactor: Any) -> Built:
    top = service.MultiService()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    passthrough = options["auth"] == "passthrough"
    keeper: TokenKeeper | NoTokens
    if passthrough:
        keeper = NoTokens()
    else:
        fetcher = ProcessTokenFetcher(
            reactor,
            region=options["region"],
            registry_id=options["registry-id"],
            endpoint_url=options["ecr-endpoint-url"],
        )

        def on_result(result: str, token: Any) -> None:
            metrics.token_result(result, token.expires_at if token is not None else None)

        keeper = TokenKeeper(reactor, fetcher, on_result=on_result)
    upstream = options["upstream-origin"]
    if passthrough and upstream is None:
        upstream = Origin("https", f"{options['registry-id']}.dkr.ecr.{options['region']}.amazonaws.com")
    tls_for = client_creator_factory(options["upstream-ca"], bool(options["upstream-insecure"]))
    pool = UpstreamPool(reactor, tls_for, max_per_origin=options["upstream-connections"])
    _TokenService(keeper, pool).setServiceParent(top)
    config = ProxyConfig(
        upstream=upstream,
        public_base=options["public-base"],
        trust_forwarded=bool(options["trust-forwarded"]),
        blob_mode=options["blob-mode"],
        request_timeout=options["upstream-timeout"],
        upload_timeout=options["upload-timeout"],
        passthrough=passthrough,
    )
    gate = build_gate(options, reactor, metrics)
    cache = build_cache(options, reactor)
    if cache is not None:
        registry.register(CacheCollector(cache))  # type: ignore[arg-type]
        _CacheService(cache, reactor).setServiceParent(top)
    handler = RegistryProxy(
        config, None if passthrough else keeper, metrics, reactor, gate, cache  # type: ignore[arg-type]
    )
    limits = Limits(idle_timeout=options["idle-timeout"])

    def bad_request(e: Any) -> None:
        metrics.bad_requests.labels(str(e.status)).inc()

    factories = []
    adopting = options["workers"] > 1  # sockets bound by us: ssl: endpoints' TLS moves to the factory
    for endpoint, wrap_tls in options["listeners"]:
        is_ssl_endpoint = isinstance(endpoint, endpoints.SSL4ServerEndpoint)
        factory: Any = RelayFactory(
            handler, reactor, pool, is_tls=wrap_tls or is_ssl_endpoint, limits=limits, on_bad_request=bad_request
        )
        if wrap_tls:
            factory = TLSMemoryBIOFactory(options["tls-options"], False, factory)
        elif is_ssl_endpoint and adopting:
            factory = TLSMemoryBIOFactory(endpoint._sslContextFactory, False, factory)
        factories.append(factory)
    return Built(top, registry, keeper, factories)


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor  # type: ignore[no-redef]

    built = build(options, reactor)
    top = built.top
    if options.get("token-key-dir"):
        reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, options["token-key-dir"], True)
    others = None
    if options["workers"] == 1:
        for (endpoint, _), factory in zip(options["listeners"], built.factories):
            _listen(endpoint, factory).setServiceParent(top)
    else:
        from ecr_twisted.app.supervisor import AdoptedPort, ListenerError, WorkerProcesses, bind_listener

        try:
            sockets = [bind_listener(spec) for spec in options["port"]]
        except ListenerError as e:
            raise usage.UsageError(f"--port {e}") from None
        for sock, factory in zip(sockets, built.factories):
            AdoptedPort(reactor, sock, factory).setServiceParent(top)
        socket_dir = tempfile.mkdtemp(prefix="ecrproxy-workers-")
        reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, socket_dir, True)
        children = WorkerProcesses(reactor, options["workers"], options.argv, [s.fileno() for s in sockets], socket_dir)
        children.setServiceParent(top)
        others = children.scrape
    if options["metrics-endpoint"] is not None:
        _listen(options["metrics-endpoint"], ops_site(built.registry, built.keeper.ready, others)).setServiceParent(top)
    return top


def _listen(endpoint: Any, factory: Any) -> StreamServerEndpointService:
    svc = StreamServerEndpointService(endpoint, factory)
    # a port that cannot be bound must stop twistd, not leave a process that serves nothing
    svc._raiseSynchronously = True
    return svc

