"""What `twistd ecrproxy` was asked to do, as plain values.

`options.Options` reads and checks the command line and the ECRPROXY_* environment and
produces one `ProxySettings`; `build.build` makes everything from it. Keeping the two
apart means reading options never binds a socket, creates a file or touches a reactor,
and the composition root can be driven by tests with values instead of argv.
"""

from __future__ import annotations

from dataclasses import dataclass

from ecr_twisted.upstreams.spec import UpstreamSpec

__all__ = ["ProxySettings"]


@dataclass(frozen=True)
class ProxySettings:
    """Every option after validation: strings, numbers and flags only (see README "Options").

    Paths name files that existed and could be read when the options were checked; the
    composition root opens them (and creates the cache directory and a token key) itself.
    """

    auth: str  # none, basic, token, passthrough or webhook
    region: str
    ports: tuple[str, ...] = ("5000",)  # --port values as given: port numbers or endpoint descriptions
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics_port: str | None = None
    registry_id: str | None = None
    upstream: str | None = None  # registry URL instead of the token's proxyEndpoint
    ecr_endpoint_url: str | None = None
    upstream_ca: str | None = None
    upstream_insecure: bool = False
    public_url: str | None = None
    trust_forwarded: bool = False
    log_format: str = "text"  # the access log: text or json
    blob_mode: str = "stream"
    storage_hosts: str = "default"  # where blob redirects may lead (registry.redirects.parse_patterns)
    upstream_connections: int = 64
    upstream_wait: float = 5.0  # seconds a request waits for a pool place before 503
    upstream_timeout: float = 60.0
    upload_timeout: float = 900.0
    idle_timeout: float = 300.0
    head_timeout: float = 30.0
    keepalive_timeout: float = 120.0
    min_body_rate: int = 1024  # bytes per second, 0: none
    min_body_rate_window: float = 60.0
    htpasswd: str | None = None
    policy: str = "open"  # a preset name (access.policy.PRESETS) or a TOML file
    namespace_pattern: str | None = None
    exclude_pattern: str | None = None
    read_only: bool = False
    token_key: str | None = None  # None in basic/token mode: a new key for this start
    token_service: str = "ecr-twisted"
    token_ttl: int = 300
    auth_webhook: str | None = None
    auth_webhook_ttl: float = 60.0
    auth_webhook_timeout: float = 5.0
    workers: int = 1
    drain_delay: float = 0.0  # seconds between SIGTERM and closing the listeners (/readyz 503 meanwhile)
    drain_timeout: float = 30.0  # seconds requests in flight may take after SIGTERM; then aborted
    max_connections: int | None = None  # per process; None: derived from the open-file limit
    cache_dir: str | None = None
    cache_bytes: int = 50 << 30
    tag_ttl: float = 60.0
    stale_if_error: float = 86400.0
    config_file: str | None = None  # --config: the TOML file the values below may come from
    upstreams: tuple[UpstreamSpec, ...] = ()  # the file's [[upstream]] tables; () = one, from --registry-id etc.
    catalog_ttl: float = 30.0  # seconds a DescribeRepositories listing (_catalog) is reused
    egress_proxy: str | None = None  # --egress-proxy URL: every upstream leg goes through it (wins over env)
    proxy_env: tuple[tuple[str, str], ...] = ()  # HTTPS_PROXY, HTTP_PROXY, NO_PROXY (either case) as found
    argv: tuple[str, ...] = ()  # the arguments as given: --workers children are started with them

    @property
    def issues_tokens(self) -> bool:
        """basic and token modes sign their own registry tokens (basic offers the token flow too)."""
        return self.auth in ("basic", "token")
