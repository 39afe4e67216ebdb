"""What the proxy does with a registry request: route, rewrite, authenticate upstream, map errors.

It talks to the data path only through `http.exchange.Exchange`, so it does not care how
body bytes move. It alone talks to the upstream: for blobs and manifests it asks the layer
cache what to do (`cache.plans`: serve a file, fail, go upstream and hand the answer back)
and does it. A request's state (`_Ctx`) is written here only.

A request: `handle` routes it and asks the gate; `_admitted` asks the cache (blobs and
manifests) or goes on; `_go_upstream` picks token and origin; `_send` forwards;
`_registry_response` refreshes a refused token (or, for a registry that is not ECR and answers
with a Bearer challenge, fetches one from its token server: `_bearer_refused`), filters a listing,
hands a cache's request's answer back to the cache, follows a blob's redirect (`_follow_redirect`,
only where `registry.redirects` allows), or relays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ecr_twisted.access.credentials import parse_authorization
from ecr_twisted.access.gate import GO, Decision, Gate
from ecr_twisted.access.targets import NO_MOUNT, mount_source, plain_upload, renamed_scopes, with_mount_source
from ecr_twisted.cache.layer import LayerCache
from ecr_twisted.cache.plans import (
    FILL,
    MISS,
    RELAY,
    WRITE,
    Fail,
    Forward,
    Next,
    Plan,
    Read,
    Relay,
    Serve,
    Tee,
    Wait,
)
from ecr_twisted.ecr.tokens import Token, TokenKeeper
from ecr_twisted.http.http11 import Head
from ecr_twisted.http.exchange import Exchange, Fields
from ecr_twisted.http.origin import Origin, UpstreamError
from ecr_twisted.http.upstream import LONG, SHORT, UpstreamResponse
from ecr_twisted.observe.accesslog import AccessLog, RequestIds
from ecr_twisted.observe.metrics import Metrics
from ecr_twisted.registry import errors, listings, routes
from ecr_twisted.registry.catalog import Answer, Catalog
from ecr_twisted.registry.errors import RegistryError
from ecr_twisted.registry.redirects import MAX_REDIRECTS, RedirectRules, Refuse
from ecr_twisted.upstreams import bearer
from ecr_twisted.upstreams.routing import Place, Router
from ecr_twisted.upstreams.spec import REGISTRY, UpstreamSpec, implicit

__all__ = [
    "RegistryProxy", "ProxyConfig", "redact_target", "redact_url", "rewrite_location", "rewrite_link",
    "HOP_BY_HOP", "REQUEST_DROP", "RESPONSE_DROP", "STORAGE_REQUEST_KEEP", "MAX_REDIRECTS", "MAX_LISTING",
    "MAX_HIDDEN_PAGES", "BUSY_RETRY_AFTER", "pool_class", "Leg", "RequestTokens", "rename_location",
]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Framing (content-length, transfer-encoding) is re-written by the data path from the
# message itself; host and authorization are replaced; expect is answered by the proxy.
REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"host", b"authorization", b"expect"}
_LISTING_DROP = REQUEST_DROP | {b"accept-encoding"}
# x-request-id: the proxy sends its own (the access log's request id)
RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"www-authenticate", b"x-request-id"}
# Headers of the client's blob request that make sense to object storage.
STORAGE_REQUEST_KEEP = frozenset(
    {b"range", b"if-range", b"if-none-match", b"if-match", b"if-modified-since", b"user-agent", b"accept"}
)
REDIRECTS = frozenset({301, 302, 303, 307, 308})

_HOST = re.compile(rb"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")
_SECRET_PARAM = re.compile(
    rb"((?:^|[?&])(?:x-amz-[a-z-]*|signature|_state|token|access_token)=)[^&#]*", re.IGNORECASE
)


def redact_target(target: bytes) -> str:
    """A request target fit for logs: values of signature/state/token parameters removed."""
    if b"?" in target:
        target = _SECRET_PARAM.sub(rb"\1REDACTED", target)
    return target.decode("ascii", "replace")


def redact_url(url: bytes) -> str:
    """An upstream URL fit for logs: scheme, host and path only."""
    return url.split(b"?", 1)[0].decode("ascii", "replace")


@dataclass
class ProxyConfig:
    upstream: Origin | None = None  # --upstream; otherwise the token's proxyEndpoint
    public_base: bytes | None = None  # --public-url, e.g. b"https://registry.example.com"
    trust_forwarded: bool = False
    blob_mode: str = "stream"  # or "redirect"
    request_timeout: float = 60.0
    upload_timeout: float = 900.0  # ECR can take minutes to commit a large layer
    passthrough: bool = False  # --auth passthrough: clients' own ECR credentials go upstream
    log_format: str = "text"  # --log-format: the access log's lines, text or json


class RequestTokens(Protocol):
    """What the handler asks of an upstream's token keeper (`ecr.tokens.TokenKeeper`, or the static
    keeper of a registry that is not ECR, whose token's empty `header` means: no Authorization)."""

    def token_for_request(self) -> Token | None: ...
    def wait_for_token(self, timeout: float) -> Deferred[Token | None] | None: ...
    def expired(self) -> bool: ...
    def force_refresh(self, stale: Token | None) -> Deferred[Token | None]: ...


@dataclass(eq=False)
class Leg:
    """One upstream as the handler uses it: its spec, its token keeper (None in passthrough) and
    the origin requests go to (`spec.url` / --upstream; None: the token's proxyEndpoint).
    A registry that is not ECR may answer with a Bearer challenge: `bearer` keeps the tokens
    its token server gave (`bearer_tokens`, upstreams/bearer.py); ECR legs have none."""

    spec: UpstreamSpec
    tokens: RequestTokens | None
    origin: Origin | None = None
    token_origin: tuple[str, Origin] | None = field(default=None, repr=False)  # the last proxyEndpoint parsed
    bearer_tokens: bearer.TokenCache | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.bearer_tokens is None and self.spec.kind == REGISTRY and self.tokens is not None:
            self.bearer_tokens = bearer.TokenCache()


_CACHEABLE = frozenset({routes.BLOB, routes.MANIFEST})
BUSY_RETRY_AFTER = b"1"  # seconds a client refused for want of an upstream connection is asked to wait
MAX_LISTING = 8 << 20  # tags/list and _catalog bodies the policy filters are read whole: bounded
MAX_HIDDEN_PAGES = 16  # listing pages in a row with nothing to show fetched before the listing ends there
_MAX_AGENT = 256  # characters of a User-Agent the access log keeps


class _Ctx:
    """Per-request state of the handler, written by the handler only."""

    __slots__ = (
        "kind", "match", "token", "origin", "fields", "retried", "sent_at", "redirects", "pages", "timeout", "target",
        "decision", "plan", "request_id", "user", "reason", "upstream_id", "leg", "place", "up_target", "host",
        "bearer", "scope", "peer",
    )

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.match: routes.Match | None = None
        self.token: Token | None = None
        self.origin: Origin | None = None
        self.fields: Fields = []
        self.retried = False
        self.sent_at = 0.0
        self.redirects = 0
        self.pages = 0  # listing pages skipped because nothing on them may be shown
        self.timeout = 60.0
        self.target = "registry"
        self.decision: Decision | None = None
        self.plan: Plan | None = None  # the cache's current plan for a blob or manifest request
        self.request_id = ""
        self.user: str | None = None  # for the access log: None is anonymous
        self.reason: str | None = None  # for the access log: why the gate refused
        self.upstream_id: bytes | None = None  # the registry's x-amzn-requestid
        # several upstreams: where the request goes (None: the only one, or unroutable: see `place`)
        self.leg: Leg | None = None
        self.place: Place | None = None  # the routed name (None: not routed, or nowhere to go)
        self.up_target: bytes | None = None  # the target sent upstream when it is not the client's
        self.host: str | None = None  # the Host the name was routed by
        # a registry with a token server: the Bearer Authorization sent instead of the keeper's token,
        # and the scope it is kept under (upstreams/bearer.py)
        self.bearer: bytes | None = None
        self.scope: str | None = None
        self.peer: str | None = None  # the client's address (`RegistryProxy._peer`)


def _refusal_reason(decision: Decision) -> str:
    """Why the gate (or ECR, in passthrough) refused, for the access log: never a credential."""
    if decision.reason is not None:
        return decision.reason
    err = decision.error
    reason = err.code if err is not None else "refused"
    if decision.detail:
        reason += ": " + decision.detail
    spec = decision.challenge
    if spec is not None and spec != "basic-token":
        scope, _, error = spec.partition("|")
        if scope:
            reason += " (" + scope + ")"
        if error:
            reason += " " + error
    return reason


def _rewriter(upstream: Origin, public: bytes) -> tuple[tuple[bytes, ...], bytes]:
    bases = [upstream.base]
    default = 443 if upstream.scheme == "https" else 80
    if upstream.port == default:
        bases.append(upstream.base + b":%d" % default)
    return tuple(bases), public


def pool_class(kind: str, method: bytes) -> str:
    """Which share of the upstream pool a request uses: blob bodies and uploads are LONG (they last as
    long as their client takes); everything else needs the upstream briefly and is SHORT, so slow
    transfers can never starve the API check, manifests, HEADs and listings."""
    if kind == routes.UPLOAD or (kind == routes.BLOB and method == b"GET"):
        return LONG
    return SHORT


def rewrite_location(value: bytes, bases: tuple[bytes, ...], public: bytes) -> bytes:
    """Point an absolute URL on the upstream at the public URL; path and query stay byte for byte."""
    for base in bases:
        if value.startswith(base) and value[len(base) : len(base) + 1] in (b"", b"/", b"?", b"#"):
            return public + value[len(base) :]
    return value


def rewrite_link(value: bytes, bases: tuple[bytes, ...], public: bytes) -> bytes:
    for base in bases:
        value = value.replace(b"<" + base + b"/", b"<" + public + b"/")
    return value


def rename_location(value: bytes, public: bytes, private: str, client: str, every: bool = False) -> bytes:
    """A Location (or, `every`, Link) already on the public URL: `/v2/<private>/` becomes the
    client's `/v2/<client>/`, in relative URLs and URLs on `public` only (never a storage URL)."""
    old = b"/v2/" + private.encode("ascii") + b"/"
    new = b"/v2/" + client.encode("ascii") + b"/"
    if every:
        return value.replace(b"<" + old, b"<" + new).replace(b"<" + public + old, b"<" + public + new)
    if value.startswith(old):
        return new + value[len(old) :]
    if value.startswith(public + old):
        return public + new + value[len(public) + len(old) :]
    return value


def _renamed_path(target: bytes, client: str, private: str) -> bytes:
    """A target the client would send (`/v2/<client>/...`) as the upstream knows it."""
    old = b"/v2/" + client.encode("ascii") + b"/"
    if target.startswith(old):
        return b"/v2/" + private.encode("ascii") + b"/" + target[len(old) :]
    return target


def _request_fields(req: Head, drop: frozenset[bytes]) -> Fields:
    """The client's fields that go upstream: one pass when Connection says only keep-alive or
    nothing (the common case); else the fields it names are dropped too."""
    out: Fields = []
    for ln, n, v in req.fields:
        if ln in drop:
            if ln == b"connection" and v.lower() != b"keep-alive":
                skip = req.connection_tokens()
                return [(n, v) for ln, n, v in req.fields if ln not in drop and ln not in skip]
            continue
        out.append((n, v))
    return out


def _renames_listing(ctx: _Ctx) -> bool:
    """A tags/list whose `name` the client calls otherwise than the upstream does."""
    place = ctx.place
    return place is not None and ctx.kind == routes.TAGS and place.client != place.private


class RegistryProxy:
    """The `http.exchange.Handler` of the registry API."""

    log = Logger()

    def __init__(
        self,
        config: ProxyConfig,
        tokens: TokenKeeper | None,
        metrics: Metrics,
        clock: Any,
        gate: Gate,
        cache: LayerCache | None = None,
        redirects: RedirectRules | None = None,
        access_log: AccessLog | None = None,
        *,
        router: Router | None = None,
        legs: Mapping[str, Leg] | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        """`router` and `legs` (upstream name -> Leg): several upstreams; without them, the one
        upstream of `tokens` and `config.upstream`. `catalog`: `_catalog` from the ECR API (registry/catalog.py)."""
        self.config = config
        self.access_log = access_log if access_log is not None else AccessLog(config.log_format)
        self.request_ids = RequestIds(config.trust_forwarded)
        # where blob redirects may lead (--storage-hosts, the proxy's own listeners); by default
        # only back to the registry itself
        self.redirects = redirects if redirects is not None else RedirectRules()
        self.tokens = tokens
        self.gate = gate
        self.cache = cache
        self.metrics = metrics
        self.clock = clock
        self.catalog = catalog
        if legs is None:
            legs = {"default": Leg(implicit(None, None, None, None), tokens, config.upstream)}
        self.legs = dict(legs)
        # the upstream of requests that name no repository (`/v2/`, `_catalog`) and of every request
        # when names need no routing: the default upstream, else the first required one
        base = [leg for leg in self.legs.values() if leg.spec.default]
        base = base or [leg for leg in self.legs.values() if not leg.spec.optional] or list(self.legs.values())
        self._single: Leg = base[0]
        # None: every name is its own answer (one upstream, no prefix, no host): nothing to ask per request
        self.router = router if router is not None and not router.identity else None

    # -- entry points from the data path
    def handle(self, ex: Exchange) -> None:
        self.metrics.in_flight.inc()
        req = ex.request
        path = req.target.split(b"?", 1)[0]
        # the client's X-Request-Id is looked up only when it may be used (a scan of the fields)
        rid = self.request_ids.take(req.get(b"x-request-id") if self.request_ids.trust_client else None)
        ex.extra_field = (b"X-Request-Id", rid.encode("latin-1"))
        if path == b"/token" and self.gate.issues_tokens:
            ctx = ex.ctx = _Ctx("token")
            ctx.request_id = rid
            return self._token_endpoint(ex)
        m = routes.match(req.method, path)
        ctx = _Ctx(m.route.kind if m.route is not None else routes.OTHER)
        ctx.request_id = rid
        ex.ctx = ctx
        if m.error is not None:
            if m.error == "method":
                return self._fail(ex, errors.UNSUPPORTED)
            if m.error == "name":
                return self._fail(ex, errors.NAME_INVALID)
            return self._fail(ex, errors.NOT_FOUND)
        target = req.target
        if self.router is not None and m.name is not None:
            m, target = self._route(ex, ctx, m)
        ctx.match = m
        gate = self.gate
        if gate.open:
            return self._admitted(GO, ex, ctx)
        decision = gate.check(req.method, ctx.kind, m, target, req.get(b"authorization"), lambda: self._peer(ex))
        if type(decision) is Decision:
            return self._admitted(decision, ex, ctx)
        decision.addCallback(self._admitted, ex, ctx)
        decision.addErrback(self._bug, ex)

    def _route(self, ex: Exchange, ctx: _Ctx, m: routes.Match) -> tuple[routes.Match, bytes]:
        """Several upstreams: where the client's name leads (`ctx.place`, `ctx.leg`), and the match
        and target the gate decides on, written with public names (the mount's `from=` too)."""
        assert self.router is not None and m.name is not None
        req = ex.request
        host = ctx.host = self._host(ex).decode("latin-1")
        place = ctx.place = self.router.resolve(host, m.name)
        target = req.target
        if place is None:  # nowhere to go: the gate still decides first (NAME_UNKNOWN after it)
            return m, target
        ctx.leg = self.legs[place.upstream]
        if place.public != m.name:
            target = b"/v2/" + place.public.encode("ascii") + target[4 + len(m.name) :]
            m = routes.Match(m.route, place.public, m.reference, m.digest)
        if ctx.kind == routes.UPLOAD and req.method == b"POST" and b"?" in target:
            source = mount_source(target)
            if source is not None and source is not NO_MOUNT:
                public = self.router.canonical(host, source)
                if public != source:
                    target = with_mount_source(target, public)
        return m, target

    def _upstream_target(self, ex: Exchange, ctx: _Ctx, decision: Decision) -> bytes | None:
        """The target sent upstream for a routed request: the private name in the path; a mount from
        the same upstream reads its private name, one from elsewhere becomes a plain upload."""
        place, match = ctx.place, ctx.match
        assert place is not None and match is not None and match.name is not None and self.router is not None
        target = ex.request.target
        if place.client != place.private:
            target = b"/v2/" + place.private.encode("ascii") + target[4 + len(place.client) :]
        if decision.target is not None:  # the gate made it a plain upload
            return plain_upload(target).target
        if ctx.kind == routes.UPLOAD and ex.request.method == b"POST" and b"?" in target:
            source = mount_source(target)
            if source is not None and source is not NO_MOUNT:
                there = self.router.resolve(ctx.host, source)
                if there is None or there.upstream != place.upstream:
                    return plain_upload(target).target  # the blob is on another registry: upload it
                if there.private != source:
                    target = with_mount_source(target, there.private)
        return target if target is not ex.request.target else None

    def _admitted(self, decision: Decision, ex: Exchange, ctx: _Ctx) -> None:
        """The gate has decided: refuse, or pick token and origin and forward."""
        ctx.user = decision.user
        if decision.error is not None:
            return self._send_refusal(ex, decision)
        if ex.gone:
            return
        ctx.decision = decision
        if self.router is not None and ctx.match is not None and ctx.match.name is not None:
            if ctx.place is None:
                return self._fail(ex, errors.NAME_UNKNOWN)
            ctx.up_target = self._upstream_target(ex, ctx, decision)
        # never in passthrough: the proxy's own AWS principal would list repositories for the client
        elif self.catalog is not None and ctx.kind == routes.CATALOG and not self.config.passthrough:
            return self._serve_catalog(ex, ctx)
        cache = self.cache
        if cache is not None and ctx.kind in _CACHEABLE:
            assert ctx.match is not None
            return self._act(cache.lookup(ex, ctx.match), ex, ctx)
        self._go_upstream(ex, ctx)

    def _leg_name(self, ctx: _Ctx | None) -> str:
        """The metrics label of the upstream a request went to (a request answered here, such as
        `_catalog` or `/token`, counts under the upstream of `/v2/`): always a configured name."""
        leg = ctx.leg if ctx is not None else None
        return (leg if leg is not None else self._single).spec.name

    # -- _catalog: the merged, filtered, paginated catalog of registry.catalog
    def _serve_catalog(self, ex: Exchange, ctx: _Ctx) -> None:
        assert self.catalog is not None and ctx.decision is not None
        visible = None
        router = self.router
        if router is not None:  # names as the caller's host calls them (and only those it reaches)
            host = self._host(ex).decode("latin-1")
            visible = lambda upstream, public: router.client_name(host, public, upstream)  # noqa: E731
        d = self.catalog.answer(ex.request.target, ctx.decision.listing, visible)
        d.addCallback(self._catalog_answer, ex)
        d.addErrback(self._bug, ex)

    def _catalog_answer(self, answer: Answer, ex: Exchange) -> None:
        ex.respond(answer.status, answer.fields, answer.body)

    def _act(self, plan: Plan, ex: Exchange, ctx: _Ctx) -> None:
        """Carry out what the cache decided for a blob or manifest request."""
        if isinstance(plan, Serve):
            ctx.plan = plan
            return ex.respond_file(plan.status, plan.fields, plan.fd, plan.first, plan.length, plan.size, plan.fill)
        if isinstance(plan, Forward):
            ctx.plan = plan
            if ctx.origin is None:
                return self._go_upstream(ex, ctx)
            return self._send(ex, ctx)  # again, with the token and origin it went with
        if isinstance(plan, Fail):
            ctx.plan = plan
            if plan.reason is not None:
                ex.error = plan.reason
            return self._fail(ex, plan.error, None, plan.extra)
        if isinstance(plan, Wait):
            ctx.plan = plan
            plan.ready.addCallback(self._act, ex, ctx)
            plan.ready.addErrback(self._bug, ex)
        # else DONE: the client left while the cache waited

    def _go_upstream(self, ex: Exchange, ctx: _Ctx) -> None:
        decision = ctx.decision
        assert decision is not None
        leg = ctx.leg
        if leg is None:
            leg = ctx.leg = self._single
        if self.config.passthrough:
            origin = leg.origin
            assert origin is not None
        else:
            keeper = leg.tokens
            assert keeper is not None
            token = keeper.token_for_request()
            if token is None:
                waiting = keeper.wait_for_token(self.config.request_timeout)
                if waiting is not None:  # the first token is on its way: go on when it comes
                    waiting.addCallback(self._token_came, ex, ctx)
                    waiting.addErrback(self._bug, ex)
                    return
                return self._no_token(ex, ctx)
            try:
                origin = self._origin(leg, token)
            except ValueError:
                self.log.error("the ECR token names no usable proxyEndpoint; set --upstream")
                return self._fail(ex, errors.UPSTREAM_UNREACHABLE)
            ctx.token = token
            kept = leg.bearer_tokens
            if kept is not None:  # a registry's token server: a token for this scope, if one is kept
                scope = ctx.scope = self._bearer_scope(ex, ctx)
                ctx.bearer = kept.get(scope, self.clock.seconds())
        ctx.origin = origin
        ctx.timeout = self.config.upload_timeout if ctx.kind == routes.UPLOAD else self.config.request_timeout
        # a listing the proxy must read and filter (or rename) is asked for uncompressed
        drop = (
            REQUEST_DROP if decision.listing is None and (ctx.place is None or not _renames_listing(ctx))
            else _LISTING_DROP
        )
        fields = _request_fields(ex.request, drop)
        fields.append((b"Host", origin.netloc))
        ctx.fields = fields
        self._send(ex, ctx)

    def _token_came(self, token: Token | None, ex: Exchange, ctx: _Ctx) -> None:
        if ex.gone:
            return
        if token is None:  # the fetch failed or took longer than a request may wait
            return self._no_token(ex, ctx)
        self._go_upstream(ex, ctx)

    def _no_token(self, ex: Exchange, ctx: _Ctx) -> None:
        if self._offline(ex, ctx):
            return
        keeper = ctx.leg.tokens if ctx.leg is not None else self.tokens
        assert keeper is not None  # not passthrough: there is a keeper
        gone = errors.TOKEN_EXPIRED if keeper.expired() else errors.NO_TOKEN
        self._fail(ex, gone, extra=[(b"Retry-After", b"5")])

    def _send_refusal(self, ex: Exchange, decision: Decision) -> None:
        """Answer a refusal of the gate (or of ECR to passthrough credentials) with its challenge."""
        ctx = ex.ctx
        if ctx is not None:
            ctx.reason = _refusal_reason(decision)
        extra: Fields = []
        if decision.challenge is not None:
            spec = decision.challenge
            if self.router is not None and ctx is not None and spec.startswith("repository:"):
                spec = self._client_scope(spec, ctx)
            extra.append((b"WWW-Authenticate", self.gate.challenge_header(spec, self._public(ex))))
            extra.append((b"Docker-Distribution-API-Version", b"registry/2.0"))
        if decision.retry_after is not None:
            extra.append((b"Retry-After", b"%d" % decision.retry_after))
        assert decision.error is not None
        self._fail(ex, decision.error, decision.detail, extra)

    def _client_scope(self, spec: str, ctx: _Ctx) -> str:
        """A challenge's `repository:<public>:<action>` scope in the client's own name (what it asks
        `/token` for again, on the same host)."""
        assert self.router is not None
        scope, bar, error = spec.partition("|")
        _, _, rest = scope.partition(":")
        public, _, action = rest.rpartition(":")
        place = ctx.place
        if place is not None and place.public == public:
            name: str | None = place.client
        else:
            name = self.router.client_name(ctx.host, public)
        if name is None or name == public:
            return spec
        return f"repository:{name}:{action}{bar}{error}"

    def _peer(self, ex: Exchange) -> str:
        """The client's address for login throttling (the load balancer's view with --trust-forwarded),
        worked out once per request (the gate and the access log both ask; getPeer builds an address)."""
        ctx = ex.ctx
        if ctx is not None:
            peer = ctx.peer
            if peer is None:
                peer = ctx.peer = self._find_peer(ex)
            return peer
        return self._find_peer(ex)

    def _find_peer(self, ex: Exchange) -> str:
        if self.config.trust_forwarded:
            forwarded = ex.request.get(b"x-forwarded-for")
            if forwarded:
                return forwarded.rsplit(b",", 1)[-1].strip().decode("latin-1")
        transport = ex.conn.transport
        if type(transport) is tcp.Server:  # what getPeer().host says, without building an address (~1 us)
            host = str(transport.client[0])  # a str already: the cast is for the type checker
            if host:
                return host
        peer = transport.getPeer()
        return getattr(peer, "host", None) or str(peer)

    def _token_endpoint(self, ex: Exchange) -> None:
        """`GET /token`: the registry token flow's token server (token mode only)."""
        req = ex.request
        if req.method not in (b"GET", b"HEAD"):
            return self._fail(ex, errors.UNSUPPORTED)
        query = req.target.partition(b"?")[2]
        router = self.router
        if router is not None:  # the policy and our tokens know public names
            host = self._host(ex).decode("latin-1")
            query = renamed_scopes(query, lambda name: router.canonical(host, name))
        result = self.gate.issue_token(query, req.get(b"authorization"), lambda: self._peer(ex))
        if isinstance(result, Deferred):
            result.addCallback(self._token_answer, ex)
            result.addErrback(self._bug, ex)
            return
        self._token_answer(result, ex)

    def _token_answer(self, result: Decision | bytes, ex: Exchange) -> None:
        ctx = ex.ctx
        if ctx is not None:  # who asked: the Basic user (checked when the token came, claimed when refused)
            ctx.user = parse_authorization(ex.request.get(b"authorization")).user
        if isinstance(result, Decision):
            return self._send_refusal(ex, result)
        ex.respond(200, [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store")], result)

    def finished(self, ex: Exchange) -> None:
        self.metrics.in_flight.dec()
        ctx = ex.ctx
        kind = ctx.kind if ctx is not None else routes.OTHER
        status = ex.status or 499  # 499: the client left before any response
        duration = self.clock.seconds() - ex.started
        self.metrics.observe_request(ex.request.method, kind, status, duration, ex.bytes_in, ex.bytes_out)
        plan = ctx.plan if ctx is not None else None
        if plan is not None:
            assert self.cache is not None
            self.cache.finished(plan, ex.bytes_out)
        if ex.error is not None and ex.status:
            self.metrics.upstream_errors.labels("aborted", self._leg_name(ctx)).inc()
        self._log_access(ex, ctx, status, duration, plan)

    def _log_access(self, ex: Exchange, ctx: _Ctx | None, status: int, duration: float, plan: Plan | None) -> None:
        req = ex.request
        agent = req.get(b"user-agent")
        target = req.target
        if ctx is None:
            match = user = reason = upstream_id = None
            route, request_id = routes.OTHER, "-"
        else:
            match, user, reason, upstream_id = ctx.match, ctx.user, ctx.reason, ctx.upstream_id
            route, request_id = ctx.kind, ctx.request_id or "-"
        self.access_log.request(
            ex.started + duration,
            self._peer(ex),
            user or "anonymous",
            req.method.decode("latin-1"),
            _SECRET_PARAM.sub(rb"\1REDACTED", target).decode("ascii", "replace") if b"?" in target
            else target.decode("ascii", "replace"),  # redact_target, inline
            route,
            status,
            ex.bytes_in,
            ex.bytes_out,
            duration,
            request_id,
            match.name if match is not None else None,
            match.reference if match is not None else None,
            ex.upstream_status or None,
            upstream_id.decode("latin-1")[:128] if upstream_id else None,
            plan.source if plan is not None else None,
            agent[:_MAX_AGENT].decode("latin-1") if agent is not None else None,
            reason,
            ex.error,
        )

    # -- upstream round trips
    @staticmethod
    def _origin(leg: Leg, token: Token) -> Origin:
        if leg.origin is not None:
            return leg.origin
        cached = leg.token_origin
        if cached is not None and cached[0] == token.endpoint:
            return cached[1]
        origin = Origin.from_url(token.endpoint)
        leg.token_origin = (token.endpoint, origin)
        return origin

    def _send(self, ex: Exchange, ctx: _Ctx) -> None:
        assert ctx.origin is not None and ctx.decision is not None
        req = ex.request
        ctx.sent_at = self.clock.seconds()
        ctx.target = "registry"
        # a new list each time: ctx.fields stays clean for a retry with a fresh token (forward takes it over)
        token = ctx.token
        if ctx.bearer is not None:  # from a registry's token server (never on ECR legs)
            fields = [*ctx.fields, (b"Authorization", ctx.bearer)]
        elif token is not None:
            if token.header:  # an empty header: a registry that wants no credentials
                fields = [*ctx.fields, (b"Authorization", token.header)]
            else:
                fields = ctx.fields.copy()
        elif ctx.decision.forward_auth is not None:
            fields = [*ctx.fields, (b"Authorization", ctx.decision.forward_auth)]
        else:
            fields = ctx.fields.copy()
        target = ctx.up_target or ctx.decision.target or req.target
        plan = ctx.plan
        method = req.method if plan is None or plan.method is None else plan.method

        # called directly by the pool when the answer comes (no Deferred on the request path):
        # they must not raise, so a bug in the handling is answered here
        def ok(resp: UpstreamResponse) -> None:
            try:
                self._registry_response(resp, ex, ctx)
            except Exception:
                self._bug(Failure(), ex)

        def err(e: Exception) -> None:
            try:
                self._upstream_failed(Failure(e), ex, ctx)
            except Exception:
                self._bug(Failure(), ex)

        ex.forward_to(ok, err, ctx.origin, method, target, fields, ctx.timeout, pool_class(ctx.kind, method))

    def _registry_response(self, resp: UpstreamResponse, ex: Exchange, ctx: _Ctx) -> None:
        self.metrics.observe_upstream("registry", self.clock.seconds() - ctx.sent_at, self._leg_name(ctx))
        head = resp.head
        status = head.status
        ctx.upstream_id = head.get(b"x-amzn-requestid")
        if status in (401, 403):
            resp.discard()
            if self.config.passthrough:  # the client's own credentials were refused: its problem
                return self._send_refusal(ex, self.gate.upstream_refused(status))
            leg = ctx.leg
            if status == 401 and leg is not None and leg.bearer_tokens is not None:
                challenge = bearer.bearer_challenge(head.get_all(b"www-authenticate"))
                if challenge is not None:
                    return self._bearer_refused(ex, ctx, leg, challenge)
            return self._refused(ex, ctx, status)
        listing = ctx.decision.listing if ctx.decision is not None else None
        if listing is not None and status == 200:
            d = Deferred.fromCoroutine(self._filter_listing(resp, ex, ctx, listing))
            d.addErrback(self._upstream_failed, ex, ctx)
            d.addErrback(self._bug, ex)
            return
        if ctx.place is not None and status == 200 and _renames_listing(ctx):
            d = Deferred.fromCoroutine(self._rename_listing(resp, ex, ctx))
            d.addErrback(self._upstream_failed, ex, ctx)
            d.addErrback(self._bug, ex)
            return
        if status >= 500 and ctx.kind == routes.BASE and self._base_offline(ex):
            resp.discard()
            return
        plan = ctx.plan
        if plan is not None:
            assert type(plan) is Forward and self.cache is not None
            if not (plan.op is FILL and status in REDIRECTS):  # a blob to cache is fetched from storage first
                answer = self.cache.answered(ex, plan, head)
                if answer is not RELAY:
                    return self._take(answer, resp, ex, ctx)
        if (
            status in REDIRECTS
            and ctx.kind == routes.BLOB
            and (self.config.blob_mode == "stream" or (plan is not None and plan.op is FILL))
            and ex.request.method in (b"GET", b"HEAD")
        ):
            location = head.get(b"location")
            if location:
                resp.discard()
                return self._follow_redirect(ex, ctx, location, resp.origin)
        fields = self._response_fields(head, ex, ctx)
        if plan is not None and plan.source is not None:
            fields.append(MISS)
        resp.relay(status, fields)

    def _take(self, answer: Next, resp: UpstreamResponse, ex: Exchange, ctx: _Ctx) -> None:
        """What the cache made of an upstream answer: read the body for it, fill it, or drop it and go on."""
        if isinstance(answer, Read):
            d = Deferred.fromCoroutine(self._store_manifest(answer.limit, resp, ex, ctx))
            d.addErrback(self._upstream_failed, ex, ctx)
            d.addErrback(self._bug, ex)
            return
        assert self.cache is not None and not isinstance(answer, Relay)
        if isinstance(answer, Tee):
            return self._act(self.cache.filling(answer, resp.into(answer.fill)), ex, ctx)
        resp.discard()
        self._act(answer, ex, ctx)

    async def _store_manifest(self, limit: int, resp: UpstreamResponse, ex: Exchange, ctx: _Ctx) -> None:
        """A manifest the cache wants: read it whole, let the cache keep it, answer it."""
        plan = ctx.plan
        assert isinstance(plan, Forward) and self.cache is not None
        head = resp.head
        fields = self._response_fields(head, ex, ctx)
        body = await resp.read(limit, self.config.request_timeout)
        self.cache.store_manifest(plan, head, body)
        fields.append(MISS)
        ex.respond(200, fields, body)

    async def _filter_listing(self, resp: UpstreamResponse, ex: Exchange, ctx: _Ctx, keep: listings.Filter) -> None:
        """tags/list and _catalog show only what the caller may pull: read (bounded), filter, answer,
        or ask for the next page ourselves (a bounded number of times) rather than name a hidden entry."""
        fields = self._response_fields(resp.head, ex, ctx)
        body = await resp.read(MAX_LISTING, self.config.request_timeout)
        step = await listings.filtered(body, fields, listings.KEYS[ctx.kind], keep)
        if step is None:
            raise UpstreamError("closed", "upstream listing is not JSON")
        if isinstance(step, listings.NextPage):
            ctx.pages += 1
            if ctx.pages <= MAX_HIDDEN_PAGES and ctx.decision is not None:
                target = step.target
                place = ctx.place
                if place is not None and place.client != place.private:  # the Link was renamed for the client
                    target = _renamed_path(target, place.client, place.private)
                ctx.up_target = target
                return self._send(ex, ctx)
            self.log.warn("listing {path}: {n} pages in a row hold nothing the caller may see; ending it there",
                          path=redact_url(ex.request.target), n=MAX_HIDDEN_PAGES)
            step = step.last_resort
        body = step.body
        if _renames_listing(ctx):
            assert ctx.place is not None
            body = listings.renamed(body, ctx.place.client) or body
        ex.respond(200, step.fields, body)

    async def _rename_listing(self, resp: UpstreamResponse, ex: Exchange, ctx: _Ctx) -> None:
        """A tags/list of a routed name: its `name` is the client's (read whole, bounded)."""
        assert ctx.place is not None
        fields = [(n, v) for n, v in self._response_fields(resp.head, ex, ctx) if n.lower() != b"content-encoding"]
        body = await resp.read(MAX_LISTING, self.config.request_timeout)
        renamed = listings.renamed(body, ctx.place.client)
        if renamed is None:
            raise UpstreamError("closed", "upstream listing is not JSON")
        ex.respond(200, fields, renamed)

    def _refused(self, ex: Exchange, ctx: _Ctx, status: int) -> None:
        """The upstream refused our token: refresh it once (shared) and retry once when safe."""
        if not ctx.retried:
            ctx.retried = True
            keeper = ctx.leg.tokens if ctx.leg is not None else self.tokens
            assert keeper is not None  # not passthrough (checked by the caller): there is a keeper
            refreshed = keeper.force_refresh(ctx.token)  # this upstream's keeper only
            if not ex.has_body:
                refreshed.addCallback(self._retry, ex, ctx, status)
                refreshed.addErrback(self._bug, ex)
                return
        self.log.warn(
            "upstream answered {status} to {method} {target} after a token refresh",
            status=status,
            method=ex.request.method.decode("ascii"),
            target=redact_target(ex.request.target),
        )
        self._fail(ex, errors.UPSTREAM_AUTH if status == 401 else errors.DENIED)

    # -- registries with a token server (upstreams/bearer.py)
    def _bearer_scope(self, ex: Exchange, ctx: _Ctx) -> str:
        """The scope a request needs on its upstream: its private name, pull or pull,push."""
        place = ctx.place
        if place is not None:
            name: str | None = place.private
        else:
            name = ctx.match.name if ctx.match is not None else None
        return bearer.request_scope(name, ex.request.method)

    def _bearer_refused(self, ex: Exchange, ctx: _Ctx, leg: Leg, challenge: bearer.Challenge) -> None:
        """The registry wants a token from its token server: fetch one and retry once, when safe
        (as `_refused`: no body); a refused token is forgotten so the next request fetches another."""
        cache = leg.bearer_tokens
        assert cache is not None and ctx.scope is not None
        if ctx.bearer is not None:
            cache.drop(ctx.scope, ctx.bearer)
        if ctx.retried or ex.has_body:
            self.log.warn(
                "upstream {upstream} answered 401 ({error}) to {method} {target}{how}",
                upstream=leg.spec.name,
                error=challenge.error or "no error given",
                method=ex.request.method.decode("ascii"),
                target=redact_target(ex.request.target),
                how=" with a fresh token" if ctx.retried else " (a request with a body is not retried)",
            )
            return self._fail(ex, errors.UPSTREAM_AUTH, "the registry refused the proxy's token")
        ctx.retried = True
        assert ctx.origin is not None
        try:
            origin = Origin.from_url(challenge.realm)
        except ValueError:  # bearer_challenge checked the realm: should not happen
            origin = None
        if origin is None or not bearer.realm_allowed(challenge.realm, ctx.origin.host):
            self.log.warn("upstream {upstream}: its token server {realm} may not be asked",
                          upstream=leg.spec.name, realm=redact_url(challenge.realm.encode("ascii")))
            return self._fail(ex, errors.UPSTREAM_AUTH, "the registry names no usable token server")
        fields: Fields = [(b"Host", origin.netloc), (b"Accept", b"application/json")]
        token = ctx.token
        if token is not None and token.header:  # static credentials: to the realm only, as docker does
            if not bearer.credentials_allowed(challenge.realm, ctx.origin.scheme):
                self.log.warn(
                    "upstream {upstream}: its token server {realm} is plain http; credentials not sent",
                    upstream=leg.spec.name, realm=redact_url(challenge.realm.encode("ascii")),
                )
                return self._fail(ex, errors.UPSTREAM_AUTH, "the registry's token server is not https")
            fields.append((b"Authorization", token.header))
        ctx.sent_at = self.clock.seconds()
        ctx.target = "token"
        d = ex.forward(origin, b"GET", bearer.token_target(challenge), fields, self.config.request_timeout, SHORT)
        d.addCallbacks(self._token_server_response, self._upstream_failed, (ex, ctx, leg, challenge), {}, (ex, ctx))
        d.addErrback(self._bug, ex)

    def _token_server_response(
        self, resp: UpstreamResponse, ex: Exchange, ctx: _Ctx, leg: Leg, challenge: bearer.Challenge
    ) -> None:
        self.metrics.observe_upstream("token", self.clock.seconds() - ctx.sent_at, self._leg_name(ctx))
        status = resp.head.status
        if status != 200:  # its body may echo what was sent: never read, never shown
            resp.discard()
            return self._token_refused(ex, leg, challenge, f"status {status}")
        d = Deferred.fromCoroutine(self._read_token(resp, ex, ctx, leg, challenge))
        d.addErrback(self._upstream_failed, ex, ctx)
        d.addErrback(self._bug, ex)

    async def _read_token(
        self, resp: UpstreamResponse, ex: Exchange, ctx: _Ctx, leg: Leg, challenge: bearer.Challenge
    ) -> None:
        body = await resp.read(bearer.MAX_TOKEN_ANSWER, self.config.request_timeout)
        token = bearer.parse_token_answer(body, self.clock.seconds())
        if token is None:
            return self._token_refused(ex, leg, challenge, "an answer without a usable token")
        assert leg.bearer_tokens is not None and ctx.scope is not None
        leg.bearer_tokens.put(ctx.scope, challenge.service, token)  # kept even if this client has left
        if ex.gone:
            return
        ctx.bearer = token.header
        self._send(ex, ctx)

    def _token_refused(self, ex: Exchange, leg: Leg, challenge: bearer.Challenge, what: str) -> None:
        self.log.warn(
            "upstream {upstream}: its token server {realm} gave {what} for {method} {target}",
            upstream=leg.spec.name,
            realm=redact_url(challenge.realm.encode("ascii")),
            what=what,
            method=ex.request.method.decode("ascii"),
            target=redact_target(ex.request.target),
        )
        self._fail(ex, errors.UPSTREAM_AUTH, "the registry's token server refused the proxy")

    def _retry(self, token: Token | None, ex: Exchange, ctx: _Ctx, status: int) -> None:
        if token is None or token is ctx.token:
            # no fresher token to be had: the refusal stands
            return self._fail(ex, errors.UPSTREAM_AUTH if status == 401 else errors.DENIED)
        ctx.token = token
        self._send(ex, ctx)

    def _follow_redirect(self, ex: Exchange, ctx: _Ctx, location: bytes, base: Origin) -> None:
        """Fetch a redirected blob ourselves, without the registry's Authorization, if the
        redirect leads to blob storage; anything else is refused and never fetched."""
        decision = self.redirects.decide(location, base, ctx.origin, ctx.redirects)
        if isinstance(decision, Refuse):
            # once per refusal; the URL without its query (presigned URLs carry signatures)
            self.log.warn(
                "blob storage redirect refused ({reason}) for {method} {target}: {url}",
                reason=decision.reason,
                method=ex.request.method.decode("ascii"),
                target=redact_target(ex.request.target),
                url=decision.shown,
            )
            return self._fail(ex, errors.STORAGE_REDIRECT_REFUSED, decision.reason)
        origin, target = decision.origin, decision.target
        req = ex.request
        fields = [(n, v) for ln, n, v in req.fields if ln in STORAGE_REQUEST_KEEP]
        fields.append((b"Host", origin.netloc))
        ctx.redirects += 1
        ctx.sent_at = self.clock.seconds()
        ctx.target = "storage"
        d = ex.forward(
            origin, req.method, target, fields, self.config.request_timeout, pool_class(ctx.kind, req.method)
        )
        d.addCallbacks(self._storage_response, self._upstream_failed, (ex, ctx), {}, (ex, ctx))
        d.addErrback(self._bug, ex)

    def _storage_response(self, resp: UpstreamResponse, ex: Exchange, ctx: _Ctx) -> None:
        self.metrics.observe_upstream("storage", self.clock.seconds() - ctx.sent_at, self._leg_name(ctx))
        head = resp.head
        status = head.status
        if status in REDIRECTS:
            location = head.get(b"location")
            if location:
                resp.discard()
                return self._follow_redirect(ex, ctx, location, resp.origin)
        plan = ctx.plan
        if status == 200 and plan is not None and plan.op is FILL:
            assert type(plan) is Forward and self.cache is not None
            answer = self.cache.answered(ex, plan, head)
            if answer is not RELAY:
                return self._take(answer, resp, ex, ctx)
        if status in (200, 206, 304):
            fields = [
                (n, v)
                for ln, n, v in head.fields
                if ln not in RESPONSE_DROP and not ln.startswith(b"x-amz-") and ln != b"location"
            ]
            if head.get(b"docker-content-digest") is None and ctx.match is not None and ctx.match.digest:
                fields.append((b"Docker-Content-Digest", ctx.match.digest.encode("ascii")))
            if plan is not None and plan.source is not None:
                fields.append(MISS)
            return resp.relay(status, fields)
        # Storage error bodies can quote the signed request: never pass them on.
        resp.discard()
        self.log.warn("blob storage answered {status} for {url}", status=status, url=redact_url(ex.request.target))
        if status == 404:
            return self._fail(ex, errors.BLOB_UNKNOWN)
        if status == 416:
            return self._fail(ex, errors.RANGE_INVALID)
        self._fail(ex, errors.STORAGE_ERROR, f"storage status {status}")

    def _upstream_failed(self, reason: Failure, ex: Exchange, ctx: _Ctx) -> None:
        err = reason.value
        if not isinstance(err, UpstreamError):
            return self._bug(reason, ex)
        if ex.gone:
            plan = ctx.plan
            if plan is not None and plan.op is WRITE:
                assert type(plan) is Forward and self.cache is not None
                self.cache.failed(ex, plan, bool(ctx.sent_at))  # the write may have reached the registry all the same
            return  # the client left; nothing failed upstream
        self.metrics.upstream_errors.labels(err.kind, self._leg_name(ctx)).inc()
        if self._offline(ex, ctx):
            return
        if ex.error is None:
            ex.error = f"{ctx.target} {err}"
        if err.kind == "timeout":
            return self._fail(ex, errors.UPSTREAM_TIMEOUT)
        if err.kind == "busy":
            return self._fail(ex, errors.UPSTREAM_BUSY, extra=[(b"Retry-After", BUSY_RETRY_AFTER)])
        if err.kind == "unreachable":
            return self._fail(ex, errors.UPSTREAM_UNREACHABLE)
        self._fail(ex, errors.UPSTREAM_BROKEN)

    def _offline(self, ex: Exchange, ctx: _Ctx) -> bool:
        """The upstream cannot be asked (unreachable, timed out, no token): answer from the cache if it can."""
        cache = self.cache
        if cache is None:
            return False
        if ctx.kind == routes.BASE:
            return self._base_offline(ex)
        plan = ctx.plan
        if not isinstance(plan, Forward):
            return False
        instead = cache.failed(ex, plan, bool(ctx.sent_at))
        if instead is None:
            return False
        self._act(instead, ex, ctx)
        return True

    def _base_offline(self, ex: Exchange) -> bool:
        """`GET /v2/` while the upstream is down: with a cache, clients that pass the gate may still pull
        what is stored, so answer the API check here (never in passthrough: it checks the client's login)."""
        if self.cache is None or self.config.passthrough:
            return False
        ex.respond(
            200,
            [(b"Content-Type", b"application/json"), (b"Docker-Distribution-API-Version", b"registry/2.0")],
            b"{}",
        )
        return True

    def _bug(self, reason: Failure, ex: Exchange) -> None:
        self.log.failure("proxy bug while handling a request", reason)
        ex.error = ex.error or "internal error"
        self._fail(ex, errors.INTERNAL)

    # -- responses
    def _host(self, ex: Exchange) -> bytes:
        """The host the client asked for: Host, or X-Forwarded-Host with --trust-forwarded."""
        req = ex.request
        host = req.get(b"host") or b""
        if self.config.trust_forwarded:
            fhost = req.get(b"x-forwarded-host")
            if fhost:
                host = fhost.split(b",", 1)[0].strip()
        if not _HOST.match(host):
            host = b"invalid-host"
        return host

    def _public(self, ex: Exchange) -> bytes:
        if self.config.public_base is not None:
            return self.config.public_base
        req = ex.request
        scheme = b"https" if ex.is_tls else b"http"
        if self.config.trust_forwarded:
            proto = req.get(b"x-forwarded-proto")
            if proto:
                proto = proto.split(b",", 1)[0].strip().lower()
                if proto in (b"http", b"https"):
                    scheme = proto
        return scheme + b"://" + self._host(ex)

    def _response_fields(self, head: Head, ex: Exchange, ctx: _Ctx) -> Fields:
        """The upstream's fields to relay: one pass when Connection says only keep-alive (the
        common case: nothing more to drop); else the tokens it names are dropped too."""
        out: Fields = []
        for ln, n, v in head.fields:
            if ln in RESPONSE_DROP:
                if ln == b"connection" and v.lower() != b"keep-alive":
                    return self._response_fields_all(head, ex, ctx)
                continue
            if ln == b"location" or ln == b"link":
                return self._response_fields_all(head, ex, ctx)
            out.append((n, v))
        return out

    def _response_fields_all(self, head: Head, ex: Exchange, ctx: _Ctx) -> Fields:
        """`_response_fields` with the fields the Connection header names dropped too and
        Location and Link pointed at the public URL."""
        skip = head.connection_tokens() if head.get(b"connection") is not None else ()
        out: Fields = []
        rewrite: tuple[tuple[bytes, ...], bytes] | None = None
        for ln, n, v in head.fields:
            if ln in RESPONSE_DROP or ln in skip:
                continue
            if ln == b"location" or ln == b"link":
                if rewrite is None:
                    assert ctx.origin is not None
                    rewrite = _rewriter(ctx.origin, self._public(ex))
                v = (rewrite_location if ln == b"location" else rewrite_link)(v, *rewrite)
                place = ctx.place
                if place is not None and place.client != place.private:
                    v = rename_location(v, rewrite[1], place.private, place.client, every=ln == b"link")
            out.append((n, v))
        return out

    def _fail(
        self, ex: Exchange, err: RegistryError, detail: str | None = None, extra: Fields | None = None
    ) -> None:
        fields = list(errors.JSON_FIELDS)
        if extra:
            fields.extend(extra)
        ex.respond(err.status, fields, errors.envelope(err, detail))
