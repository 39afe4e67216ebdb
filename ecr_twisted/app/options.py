"""`twistd ecrproxy`: the command line over ECRPROXY_* over the --config file, checked into `ProxySettings`.

This is the module the twistd plugin names, so it provides `Options` and `makeService`.
`Options` only reads and validates: every bad value is a `UsageError` naming its option,
raised before anything listens, and a successful parse leaves `Options.settings` (plain
values) without having bound a socket, created a file or directory, or touched a reactor.
Files named by options (TLS, htpasswd, policy, an existing token key) are read to check
them and let go; `build.build` opens them for use and does every side effect.

Precedence, per option: the command line, then ECRPROXY_*, then the `--config` file (itself
named on the command line or by ECRPROXY_CONFIG), then the defaults. A file's values go
through the same checks as the command line's; an error about one of them is reported at
its line (`configfile`).
"""

from __future__ import annotations

import difflib
import getopt
import os
import re
import sys
from typing import Any, Callable, Mapping

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from ecr_twisted.access.htpasswd import Htpasswd
from ecr_twisted.access.gate import MODES
from ecr_twisted.access.policy import PRESETS, PolicyError, PolicyFile
from ecr_twisted.app import configfile
from ecr_twisted.app.config import ProxySettings
from ecr_twisted.app.listeners import DescriptionError, check_description, listener_spec, load_server_tls
from ecr_twisted.registry.redirects import parse_patterns
from ecr_twisted.upstreams.spec import ECR, UpstreamSpec

__all__ = ["ENV_PREFIX", "Options", "makeService", "parse_size"]

ENV_PREFIX = "ECRPROXY_"
_log = Logger()
_REGION = configfile.REGION
_ACCOUNT = configfile.ACCOUNT
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_name(option: str) -> str:
    return ENV_PREFIX + option.upper().replace("-", "_")


_FLAGS: list[list[Any]] = [
    ["anonymous", None, "Same as --auth none: anyone who reaches the proxy may pull "
     "and push (unless --policy says less)."],
    ["read-only", None, "No push or delete for anyone, whatever the policy says."],
    ["upstream-insecure", None, "Do not verify the upstream's TLS certificate (tests only)."],
    ["trust-forwarded", None, "Derive the public URL from X-Forwarded-Proto/-Host (behind a trusted load balancer)."],
]
_PARAMETERS: list[list[Any]] = [
    ["tls-cert", None, None, "PEM certificate (chain) for client-facing TLS."],
    ["tls-key", None, None, "PEM private key for client-facing TLS."],
    ["registry-id", None, None, "AWS account ID of the ECR registry (default: the credentials' own)."],
    ["region", None, None, "AWS region of the registry (default: AWS_REGION, AWS_DEFAULT_REGION or "
     "botocore's configured region)."],
    ["upstream", None, None, "Registry URL overriding the token's proxyEndpoint (VPC endpoints, tests)."],
    ["ecr-endpoint-url", None, None, "Endpoint URL of the ECR API (tests; AWS_ENDPOINT_URL_ECR works too)."],
    ["upstream-ca", None, None, "Extra CA (PEM) trusted for upstream TLS, besides the system's."],
    ["public-url", None, None, "scheme://host[:port] clients use; default: taken from each request."],
    ["blob-mode", None, "stream", "stream: follow ECR's redirects to S3 and pipe blobs; "
     "redirect: pass them to clients."],
    ["storage-hosts", None, "default", "Where blob redirects may be followed: [http://]host[:port|:*] "
     "patterns (*.domain allowed), 'default' for the region's https S3 hosts; plus the registry itself."],
    ["metrics-port", None, None, "Endpoint for /metrics, /healthz and /readyz (e.g. tcp:9100)."],
    ["log-format", None, "text", "The access log's lines: text or json (one object a line)."],
    ["upstream-connections", None, 64, "Most connections kept per upstream host (a quarter kept for "
     "short exchanges: API check, manifests, HEADs, listings).", int],
    ["upstream-wait", None, 5.0, "Seconds a request waits for a free upstream connection before "
     "503 with Retry-After.", float],
    ["upstream-timeout", None, 60.0, "Seconds to wait for an upstream response head.", float],
    ["upload-timeout", None, 900.0, "Seconds to wait for an upstream answer to upload requests "
     "(commits are slow).", float],
    ["idle-timeout", None, 300.0, "Seconds a transfer may make no progress before it is aborted.", float],
    ["head-timeout", None, 30.0, "Seconds a client may take to send a request head, from its first byte "
     "(the first one's: from the connection).", float],
    ["keepalive-timeout", None, 120.0, "Seconds a kept-alive client connection may wait for its next request.",
     float],
    ["min-body-rate", None, 1024, "Bytes per second a request or response body must average over "
     "--min-body-rate-window, else both sides are cut (0: no minimum).", int],
    ["min-body-rate-window", None, 60.0, "Seconds over which --min-body-rate is averaged.", float],
    ["auth", None, None, "Who clients are: none, basic, token, passthrough or webhook "
     "(an explicit choice is required)."],
    ["htpasswd", None, None, "Users for --auth basic/token: an htpasswd file of bcrypt "
     "hashes (re-read when it changes)."],
    ["policy", None, None, "Access policy: a TOML file (re-read when it changes) or a preset: "
     "public-read, private, open. Default: open with --auth none, private otherwise."],
    ["namespace-pattern", None, None, "Only repositories whose whole name matches this regex exist for clients."],
    ["exclude-pattern", None, None, "Repositories whose whole name matches this regex do not exist for clients."],
    ["token-key", None, None, "--auth basic|token: file with the token signing key "
     "(created if absent; default: a new key per start)."],
    ["token-service", None, "ecr-twisted", "--auth basic|token: the service name in Bearer challenges and tokens."],
    ["token-ttl", None, 300, "--auth basic|token: seconds a token lives.", int],
    ["auth-webhook", None, None, "--auth webhook: URL the proxy POSTs each access question to."],
    ["auth-webhook-ttl", None, 60.0, "--auth webhook: seconds an answer is remembered.", float],
    ["auth-webhook-timeout", None, 5.0, "--auth webhook: seconds to wait for an answer (then deny).", float],
    ["max-connections", None, None, "Most client connections per process; past it new ones get 503 "
     "(default: what the open-file limit leaves after upstream connections and cache files).", int],
    ["drain-delay", None, 0.0, "On SIGTERM/SIGINT: seconds /readyz answers 503 before the listeners close "
     "(so load balancers notice).", float],
    ["drain-timeout", None, 30.0, "On SIGTERM/SIGINT: seconds requests in flight may take to finish; "
     "then they are aborted.", float],
    ["workers", None, 1, "Processes serving the listeners (this one and N-1 children); tcp:/unix: listeners.", int],
    ["cache-dir", None, None, "Keep pulled blobs and manifests here and serve them from disk (off without it)."],
    ["cache-size", None, "50GiB", "Most the cache may hold (e.g. 50GiB, 512MiB, 10G); least "
     "recently used blobs go first."],
    ["tag-ttl", None, 60.0, "Seconds a cached manifest by tag is served before it is revalidated upstream.", float],
    ["stale-if-error", None, 86400.0, "Seconds a manifest by tag may be served stale while the "
     "upstream cannot answer.", float],
    ["config", None, None, "TOML file: option values (same names) and [[upstream]] tables for several "
     "registries; the command line and ECRPROXY_* win over it."],
    ["egress-proxy", None, None, "http://[user:password@]host:port: every upstream connection goes through "
     "this HTTP proxy (wins over HTTPS_PROXY/HTTP_PROXY)."],
    ["catalog-ttl", None, 30.0, "Seconds a repository listing from the ECR API (_catalog) is reused.", float],
]
# the environment's outbound proxy settings, in the order curl and botocore look at them; one set
# to nothing is kept: an empty https_proxy means "no proxy" to botocore (see http.egress)
PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")


def _file_kinds() -> dict[str, str]:
    """What a --config file may set, and the TOML type each takes (config itself excluded)."""
    numbers = {int: configfile.INT, float: configfile.FLOAT}
    kinds = {f[0]: configfile.FLAG for f in _FLAGS}
    for p in _PARAMETERS:
        if p[0] != "config":
            kinds[p[0]] = numbers[p[4]] if len(p) > 4 else configfile.TEXT
    kinds.update({"port": configfile.PORTS, "metrics-port": configfile.TEXT_OR_INT,
                  "cache-size": configfile.TEXT_OR_INT})
    return kinds


_FILE_KINDS = _file_kinds()
# options naming files: a relative path in the --config file is taken from the file's directory
_PATH_OPTIONS = frozenset({"tls-cert", "tls-key", "upstream-ca", "htpasswd", "policy", "token-key", "cache-dir"})


def _numeric(option: str, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """The coercion of a numeric option: a bad value is a usage error naming the option."""

    def coerce(value: str) -> Any:
        try:
            return kind(value)
        except ValueError:
            raise usage.UsageError(f"--{option}: {_not_a_number(value, kind)}") from None

    coerce.coerceDoc = ""  # type: ignore[attr-defined]
    return coerce


def _not_a_number(value: str, kind: Callable[[str], Any]) -> str:
    return f"{value!r} is not {'a whole number' if kind is int else 'a number'}"


def _known_env() -> list[str]:
    names = [_env_name(p[0]) for p in _PARAMETERS] + [_env_name(f[0]) for f in _FLAGS]
    return names + [_env_name("port")]


def unknown_env(environ: Mapping[str, str]) -> list[str]:
    """ECRPROXY_* variables no option reads, each with the closest known name if there is one."""
    known = _known_env()
    found = []
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known):
        # compared without the prefix every name shares, which would make anything look close
        close = difflib.get_close_matches(name[len(ENV_PREFIX):], [k[len(ENV_PREFIX):] for k in known], n=1)
        found.append(f"{name} (did you mean {ENV_PREFIX}{close[0]}?)" if close else name)
    return found


def _environment_region(environ: Mapping[str, str]) -> str | None:
    """AWS_REGION (set by ECS, Lambda, EKS) or AWS_DEFAULT_REGION, as the AWS SDKs read them."""
    return environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or None


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Publish a private AWS ECR registry on your own domain: a streaming reverse proxy "
        "that holds the AWS credentials and refreshes the ECR token itself. Every option "
        "can also be set as ECRPROXY_<OPTION> (e.g. ECRPROXY_REGISTRY_ID) or by its name in the --config "
        "file: the command line wins, then the environment, then the file."
    )

    optFlags = _FLAGS
    optParameters = [p[:4] + [_numeric(p[0], p[4])] if len(p) > 4 else p for p in _PARAMETERS]

    compData = usage.Completions(
        optActions={
            "blob-mode": usage.CompleteList(["stream", "redirect"]),
            "auth": usage.CompleteList(list(MODES)),
        }
    )

    settings: ProxySettings  # set by postOptions

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        self.argv: list[str] = []
        self["port"] = []
        self._ports_from_cli = False
        self._given: set[str] = set()  # options set on the command line or by ECRPROXY_*: the file does not count
        self._from_file: set[str] = set()
        self._upstream_tables = False
        # twistd makes the Options before it can report a usage error: keep it for parseOptions
        self._env_error: usage.UsageError | None = None
        try:
            self._from_env()
        except usage.UsageError as e:
            self._env_error = e
        self.unknown_env = unknown_env(self.environ)

    def _from_env(self) -> None:
        env = self.environ
        for name, _, _, _, *coerce in _PARAMETERS:
            value = env.get(_env_name(name))
            if value is not None and value != "":
                try:
                    self[name] = coerce[0](value) if coerce else value
                except ValueError:
                    raise usage.UsageError(f"{_env_name(name)}: {_not_a_number(value, coerce[0])}") from None
                self._given.add(name)
        for name, _, _ in _FLAGS:
            value = env.get(_env_name(name))
            if value is not None:
                if value.strip().lower() in _TRUE:
                    self[name] = 1
                elif value.strip().lower() not in _FALSE:
                    raise usage.UsageError(f"{_env_name(name)}: expected true or false, got {value!r}")
                self._given.add(name)  # false too: it overrides a file's true
        ports = env.get(_env_name("port"))
        if ports:
            self["port"] = ports.replace(",", " ").split()
            self._given.add("port")

    def opt_port(self, value: str) -> None:
        """Listen here: a port number or a Twisted endpoint string (repeatable; default 5000)."""
        if not self._ports_from_cli:
            self["port"] = []
            self._ports_from_cli = True
        self["port"].append(value)

    opt_p = opt_port

    def opt_version(self) -> None:
        """Print ecr-twisted's version (and Twisted's) and exit."""
        from twisted import copyright

        import ecr_twisted

        print(f"ecr-twisted {ecr_twisted.__version__} (Twisted {copyright.version})")
        sys.exit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        # kept so --workers children can be started with exactly the same options
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            if self._env_error is not None:
                raise self._env_error
            self._given |= self._named_on_command_line(self.argv)
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:  # called directly (tests, worker children): the caller reports it
                raise
            # under twistd: one line, not twistd's whole help followed by the error
            print(f"twistd ecrproxy: {e} (see --help)", file=sys.stderr)
            sys.exit(1)

    def _named_on_command_line(self, args: list[str]) -> set[str]:
        """The options `args` sets, read as twistd's parser will read them (it reports errors itself)."""
        try:
            found, _ = getopt.getopt(args, self.shortOpt, self.longOpt)
        except getopt.error:
            return set()
        names = set()
        for opt, _ in found:
            opt = opt[2:] if opt.startswith("--") else opt[1:]
            for spelling in (opt, opt.replace("-", "_")):
                if spelling in self.synonyms:
                    names.add(self.synonyms[spelling])
                    break
        return names

    def postOptions(self) -> None:
        config = self._read_config()
        try:
            self._check(config)
        except usage.UsageError as e:
            raise self._located(e, config) from None

    def _read_config(self) -> configfile.ConfigFile | None:
        """The --config file's values, set where neither the command line nor ECRPROXY_* set one."""
        path = self["config"]
        if not path:
            return None
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise usage.UsageError(f"--config {path}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise usage.UsageError(f"--config {path}: not UTF-8 text") from None
        try:
            config = configfile.parse(text, path, _FILE_KINDS)
        except configfile.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        for name, value in config.options.items():
            if name in _PATH_OPTIONS and not (name == "policy" and value in PRESETS):
                value = configfile.beside(path, value)
            if name not in self._given:
                self[name] = (1 if value else 0) if _FILE_KINDS[name] == configfile.FLAG else value
                self._from_file.add(name)
        self._upstream_tables = bool(config.tables)
        return config

    def _located(self, error: usage.UsageError, config: configfile.ConfigFile | None) -> usage.UsageError:
        """`error` at the file line of the value it is about, if that value came from the file.

        Every message names its option (`--name ...`); the first named option whose value the
        file gave is the one the error is about.
        """
        message = str(error)
        if config is None or message.startswith("--config "):
            return error
        for name in re.findall(r"--([a-z][a-z0-9-]*)", message):
            if name in self._from_file:
                return usage.UsageError(f"{config.where(name)}: key \"{name}\": {message}")
        return error

    def _check(self, config: configfile.ConfigFile | None) -> None:
        auth = self._auth_options()
        self._tls_options()
        if self["registry-id"] and not _ACCOUNT.match(self["registry-id"]):
            raise usage.UsageError("--registry-id must be a 12-digit AWS account ID")
        if not self["region"]:
            self["region"] = _environment_region(self.environ) or _botocore_region()
        default_region = self["region"]  # for ECR upstreams without their own
        if not self["region"] and config is not None:  # ECR upstreams may all name their own region
            self["region"] = next((t["region"] for t in config.tables if isinstance(t.get("region"), str)), None)
        only_other_registries = config is not None and bool(config.tables) and not any(
            configfile.table_kind(t) == ECR for t in config.tables
        )
        if only_other_registries and not self["region"]:
            self["region"] = ""  # no ECR upstream: no region to know
        elif not self["region"] or not _REGION.match(self["region"]):
            raise usage.UsageError(
                "--region is required (e.g. eu-west-1), or set AWS_REGION or configure botocore's region"
            )
        if self["upstream"]:
            _url_option("upstream", self["upstream"])
        if self["ecr-endpoint-url"]:
            _url_option("ecr-endpoint-url", self["ecr-endpoint-url"], allow_path=True)
        if self["public-url"]:
            _url_option("public-url", self["public-url"])
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        if self["blob-mode"] not in ("stream", "redirect"):
            raise usage.UsageError("--blob-mode must be stream or redirect")
        try:
            parse_patterns(self["storage-hosts"], self["region"])
        except ValueError as e:
            raise usage.UsageError(f"--storage-hosts: {e}") from None
        if not 1 <= self["workers"] <= 64:
            raise usage.UsageError("--workers must be between 1 and 64")
        if self["max-connections"] is not None and self["max-connections"] < 1:
            raise usage.UsageError("--max-connections must be at least 1")
        if self["upstream-connections"] < 1:
            raise usage.UsageError("--upstream-connections must be at least 1")
        for name in (
            "upstream-timeout", "upload-timeout", "idle-timeout", "upstream-wait", "head-timeout",
            "keepalive-timeout", "min-body-rate-window",
        ):
            if not self[name] > 0:
                raise usage.UsageError(f"--{name} must be a positive number of seconds")
        for name in ("drain-delay", "drain-timeout"):
            if not self[name] >= 0:
                raise usage.UsageError(f"--{name} must be 0 or a positive number of seconds")
        if self["min-body-rate"] < 0:
            raise usage.UsageError("--min-body-rate must be 0 (no minimum) or a number of bytes per second")
        if not self["catalog-ttl"] >= 0:
            raise usage.UsageError("--catalog-ttl must be 0 or a positive number of seconds")
        if self["egress-proxy"]:
            problem = configfile.egress_proxy_problem(self["egress-proxy"])
            if problem:
                raise usage.UsageError(f"--egress-proxy {problem}")
        upstreams = self._upstreams(config, default_region)
        if not self["port"]:
            self["port"] = ["5000"]
        self._listener_options()
        cache_bytes = self._cache_options()
        self.settings = ProxySettings(
            auth=auth["mode"],
            region=self["region"],
            ports=tuple(self["port"]),
            tls_cert=self["tls-cert"],
            tls_key=self["tls-key"],
            metrics_port=self["metrics-port"],
            registry_id=self["registry-id"],
            upstream=self["upstream"],
            ecr_endpoint_url=self["ecr-endpoint-url"],
            upstream_ca=self["upstream-ca"],
            upstream_insecure=bool(self["upstream-insecure"]),
            public_url=self["public-url"],
            trust_forwarded=bool(self["trust-forwarded"]),
            log_format=self["log-format"],
            blob_mode=self["blob-mode"],
            storage_hosts=self["storage-hosts"],
            upstream_connections=self["upstream-connections"],
            upstream_wait=self["upstream-wait"],
            upstream_timeout=self["upstream-timeout"],
            upload_timeout=self["upload-timeout"],
            idle_timeout=self["idle-timeout"],
            head_timeout=self["head-timeout"],
            keepalive_timeout=self["keepalive-timeout"],
            min_body_rate=self["min-body-rate"],
            min_body_rate_window=self["min-body-rate-window"],
            htpasswd=self["htpasswd"],
            policy=auth["policy"],
            namespace_pattern=self["namespace-pattern"],
            exclude_pattern=self["exclude-pattern"],
            read_only=bool(self["read-only"]),
            token_key=self["token-key"],
            token_service=self["token-service"],
            token_ttl=self["token-ttl"],
            auth_webhook=self["auth-webhook"],
            auth_webhook_ttl=self["auth-webhook-ttl"],
            auth_webhook_timeout=self["auth-webhook-timeout"],
            workers=self["workers"],
            drain_delay=self["drain-delay"],
            drain_timeout=self["drain-timeout"],
            max_connections=self["max-connections"],
            cache_dir=self["cache-dir"],
            cache_bytes=cache_bytes,
            tag_ttl=self["tag-ttl"],
            stale_if_error=self["stale-if-error"],
            config_file=os.path.abspath(self["config"]) if self["config"] else None,
            upstreams=upstreams,
            catalog_ttl=self["catalog-ttl"],
            egress_proxy=self["egress-proxy"],
            proxy_env=tuple((name, self.environ[name]) for name in PROXY_ENV if name in self.environ),
            argv=tuple(self.argv),
        )

    def _upstreams(self, config: configfile.ConfigFile | None, region: str | None) -> tuple[UpstreamSpec, ...]:
        """The file's [[upstream]] tables, checked; () without any (one upstream from --registry-id etc.)."""
        if config is None or not config.tables:
            return ()
        for name in ("registry-id", "upstream", "ecr-endpoint-url"):
            if self[name]:
                raise usage.UsageError(
                    f"--{name} describes the one registry of a proxy without [[upstream]] tables: "
                    f"with them, put it in an [[upstream]] table of --config {config.path}"
                )
        try:
            return configfile.upstreams(config, region, _read_secret)
        except configfile.ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def _tls_options(self) -> None:
        if bool(self["tls-cert"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-cert and --tls-key go together")
        for name in ("tls-cert", "tls-key", "upstream-ca"):
            if self[name] and not os.path.isfile(self[name]):
                raise usage.UsageError(f"--{name}: no such file: {self[name]}")
        if self["tls-cert"]:
            _checked("--tls-cert/--tls-key", lambda: load_server_tls(self["tls-cert"], self["tls-key"]))
        if self["upstream-ca"]:
            from ecr_twisted.http.tls import PlatformPlusCA

            try:
                PlatformPlusCA(self["upstream-ca"])
            except Exception as e:
                raise usage.UsageError(f"--upstream-ca: {e}") from None

    def _listener_options(self) -> None:
        """Each --port (and --metrics-port) must describe an endpoint: checked without listening."""
        for option, specs, tls in (
            ("port", self["port"], (self["tls-cert"], self["tls-key"])),
            ("metrics-port", [self["metrics-port"]] if self["metrics-port"] else [], (None, None)),
        ):
            for spec in specs:
                try:
                    listener = listener_spec(spec, *tls)
                    check_description(listener.description)
                    if listener.cert is not None and listener.key is not None and (listener.cert, listener.key) != tls:
                        load_server_tls(listener.cert, listener.key)  # an ssl: description's own files
                except DescriptionError as e:
                    raise usage.UsageError(f"--{option}: {e}") from None
        if self["workers"] > 1:
            for spec in self["port"]:
                if not (spec.isdigit() or spec.split(":", 1)[0] in ("tcp", "tcp6", "ssl", "unix")):
                    raise usage.UsageError(f"--port {spec!r}: --workers needs tcp:, tcp6:, ssl: or unix: listeners")

    def _cache_options(self) -> int:
        try:
            size = parse_size(str(self["cache-size"]))
        except ValueError as e:
            raise usage.UsageError(f"--cache-size: {e}") from None
        for name in ("tag-ttl", "stale-if-error"):
            if not self[name] >= 0:
                raise usage.UsageError(f"--{name} must be zero or a positive number of seconds")
        where = self["cache-dir"]
        if where:
            problem = _directory_problem(where)
            if problem:
                raise usage.UsageError(f"--cache-dir {where}: {problem}")
        return size

    def _auth_options(self) -> dict[str, str]:
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
        if mode == "passthrough" and self._upstream_tables:
            raise usage.UsageError(
                "--auth passthrough cannot serve [[upstream]] tables: clients' own AWS credentials are for "
                "one registry and must never be sent to another upstream; choose --auth basic, token or "
                "webhook (the proxy then holds each upstream's credentials)"
            )
        if mode == "passthrough" and not self["upstream"]:
            if not self["registry-id"]:
                raise usage.UsageError(
                    "--auth passthrough needs --upstream URL or --registry-id (there is no token to name it)"
                )
        policy = self["policy"] or ("open" if mode == "none" else "private")
        if policy not in PRESETS:
            try:
                PolicyFile(policy, _NoClock())
            except OSError as e:
                raise usage.UsageError(f"--policy: {policy!r} is neither a preset ({', '.join(PRESETS)}) "
                                       f"nor a readable file: {e.strerror}") from None
            except PolicyError as e:
                raise usage.UsageError(f"--policy: {e}") from None
        for name in ("namespace-pattern", "exclude-pattern"):
            if self[name]:
                try:
                    re.compile(self[name])
                except re.error as e:
                    raise usage.UsageError(f"--{name}: not a regular expression: {e}") from None
        if mode in ("basic", "token"):  # basic mode offers the token flow when anonymous may pull
            if not 30 <= self["token-ttl"] <= 86400:
                raise usage.UsageError("--token-ttl must be between 30 and 86400 seconds")
            if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,128}", self["token-service"]):
                raise usage.UsageError("--token-service: letters, digits and .:_- only")
            if self["token-key"]:
                problem = _token_key_problem(self["token-key"])
                if problem:
                    raise usage.UsageError(f"--token-key: {problem}")
        if not self["auth-webhook-ttl"] >= 0 or not self["auth-webhook-timeout"] > 0:
            raise usage.UsageError("--auth-webhook-ttl must be >= 0 and --auth-webhook-timeout > 0")
        return {"mode": mode, "policy": policy}


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    """twistd's entry point: the whole service tree, from the checked options."""
    from ecr_twisted.app.build import build

    if reactor is None:
        from twisted.internet import reactor
    if options.unknown_env:
        _log.warn("unknown variables ignored: {names}", names=", ".join(options.unknown_env))
    try:
        built = build(options.settings, reactor)
    except usage.UsageError as e:  # a directory or socket build could not make: before the pidfile
        print(f"twistd ecrproxy: {e}", file=sys.stderr)
        sys.exit(1)
    top = _OneLineFailures(reactor)
    # the built tree (its root is the Drain, whose stopService waits out SIGTERM) under a top that
    # reports bind failures in one line
    built.top.setServiceParent(top)
    return top


class ListenFailed(Exception):
    """A listener could not be bound when twistd started the service tree (already logged)."""


class _OneLineFailures(service.MultiService):
    """The tree twistd runs: a port that cannot be bound (in use, no permission) is one log
    line and exit status 1, not a traceback; what the start made is cleaned up."""

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor

    def privilegedStartService(self) -> None:
        from twisted.internet.error import CannotListenError

        try:
            super().privilegedStartService()
        except CannotListenError as e:
            _log.critical("cannot start: {error}", error=e)
            # the reactor will not run: its shutdown triggers (temporary directories) run now
            self.reactor.fireSystemEvent("shutdown")
            previous = sys.excepthook

            def quiet(kind: Any, value: BaseException, tb: Any) -> None:
                if not isinstance(value, ListenFailed):
                    previous(kind, value, tb)

            sys.excepthook = quiet
            # raised through twistd, which removes its pidfile; the exit status is 1
            raise ListenFailed(str(e)) from None


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]i?b?|b?)\s*\Z", re.IGNORECASE)
_UNITS = {
    "": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40
}


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


def _checked(option: str, load: Callable[[], object]) -> None:
    try:
        load()
    except DescriptionError as e:
        raise usage.UsageError(f"{option}: {e}") from None


def _directory_problem(where: str) -> str | None:
    """Why `where` cannot be used (or made) as a writable directory; None if it can. Creates nothing."""
    path = os.path.abspath(where)
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "not a directory"
        return None if os.access(path, os.W_OK | os.X_OK) else "not writable"
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be created: {parent} is not writable"


def _token_key_problem(path: str) -> str | None:
    """Why `path` cannot serve as the token signing key; None if it can (read, or created later)."""
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                key = f.read().strip()
        except OSError as e:
            return f"{path}: {e.strerror}"
        return None if len(key) >= 32 else f"{path}: a signing key needs at least 32 bytes"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} does not exist and cannot be created in {parent}"
    return None


def _url_option(option: str, value: str, allow_path: bool = False) -> None:
    problem = configfile.url_problem(value, allow_path)
    if problem:
        raise usage.UsageError(f"--{option} {problem}")


def _read_secret(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _botocore_region() -> str | None:
    try:
        import botocore.session

        region = botocore.session.get_session().get_config_variable("region")
        return str(region) if region else None
    except Exception:
        return None


class _NoClock:
    """For reading files once at option time."""

    @staticmethod
    def seconds() -> float:
        return 0.0
