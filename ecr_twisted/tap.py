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
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from .metrics import Metrics
from .ops import ops_site
from .proxy import ProxyConfig, RegistryProxy
from .streaming import Limits, Origin, RelayFactory, UpstreamPool
from .tls import client_creator_factory
from .tokens import ProcessTokenFetcher, TokenKeeper

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
        ["anonymous", None, "Anyone who reaches the proxy may pull and push (an explicit choice is required)."],
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
        ["workers", None, 1, "Processes serving the listeners (this one and N-1 children); tcp:/unix: listeners.", int],
    ]

    compData = usage.Completions(optActions={"blob-mode": usage.CompleteList(["stream", "redirect"])})

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
        if not self["anonymous"]:
            raise usage.UsageError(
                "choose who may use the proxy: --anonymous (anyone who can reach it may pull and push). "
                "The proxy will not publish a private registry by accident."
            )
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        for name in ("tls-cert", "tls-key", "upstream-ca"):
            if self[name] and not os.path.isfile(self[name]):
                raise usage.UsageError(f"--{name}: no such file: {self[name]}")
        if self["tls-cert"]:
            from .tls import server_options

            try:
                self["tls-options"] = server_options(self["tls-cert"], self["tls-key"])
            except Exception as e:
                raise usage.UsageError(f"--tls-cert/--tls-key: cannot load: {e}") from None
        if self["upstream-ca"]:
            from .tls import PlatformPlusCA

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

    def _listener(self, reactor: Any, spec: str) -> tuple[Any, bool]:
        """(endpoint, TLS applied by the proxy?). With --tls-cert/--tls-key every listener
        speaks TLS, whatever its endpoint type; `ssl:` strings carry their own certificate."""
        if spec.isdigit() and not 0 < int(spec) < 65536:
            raise usage.UsageError(f"--port: {spec} is not a port number")
        endpoint = _endpoint(reactor, "port", spec)
        if spec.split(":", 1)[0] == "ssl":
            return endpoint, False
        return endpoint, self.get("tls-options") is not None


def _endpoint(reactor: Any, option: str, spec: str) -> Any:
    if spec.isdigit():
        spec = "tcp:" + spec
    try:
        return endpoints.serverFromString(reactor, spec)
    except Exception as e:
        raise usage.UsageError(f"--{option}: invalid endpoint {spec!r}: {e}") from None


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


class _TokenService(service.Service):
    log = Logger()

    def __init__(self, keeper: TokenKeeper, pool: UpstreamPool) -> None:
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
    keeper: TokenKeeper
    factories: list[Any]  # one per --port, TLS-wrapped where it applies


def build(options: Options, reactor: Any) -> Built:
    top = service.MultiService()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    fetcher = ProcessTokenFetcher(
        reactor,
        region=options["region"],
        registry_id=options["registry-id"],
        endpoint_url=options["ecr-endpoint-url"],
    )

    def on_result(result: str, token: Any) -> None:
        metrics.token_result(result, token.expires_at if token is not None else None)

    keeper = TokenKeeper(reactor, fetcher, on_result=on_result)
    tls_for = client_creator_factory(options["upstream-ca"], bool(options["upstream-insecure"]))
    pool = UpstreamPool(reactor, tls_for, max_per_origin=options["upstream-connections"])
    _TokenService(keeper, pool).setServiceParent(top)
    config = ProxyConfig(
        upstream=options["upstream-origin"],
        public_base=options["public-base"],
        trust_forwarded=bool(options["trust-forwarded"]),
        blob_mode=options["blob-mode"],
        request_timeout=options["upstream-timeout"],
        upload_timeout=options["upload-timeout"],
    )
    handler = RegistryProxy(config, keeper, metrics, reactor)
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
    others = None
    if options["workers"] == 1:
        for (endpoint, _), factory in zip(options["listeners"], built.factories):
            _listen(endpoint, factory).setServiceParent(top)
    else:
        from .workers import AdoptedPort, ListenerError, WorkerProcesses, bind_listener

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

