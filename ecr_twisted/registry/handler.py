"""What the proxy does with a registry request: route, rewrite, authenticate upstream, map errors.

It talks to the data path only through `http.exchange.Exchange`, so it does not care how
body bytes move. It alone talks to the upstream: for blobs and manifests it asks the layer
cache what to do (`cache.plans`: serve a file, fail, go upstream and hand the answer back)
and does it. A request's state (`_Ctx`) is written here only.

A request: `handle` routes it and asks the gate; `_admitted` asks the cache (blobs and
manifests) or goes on; `_go_upstream` picks token and origin; `_send` forwards;
`_registry_response` refreshes a refused token, filters a listing, hands a cache's request's
answer back to the cache, follows a blob's redirect (`_follow_redirect`, only where
`registry.redirects` allows), or relays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ecr_twisted.access.credentials import parse_authorization
from ecr_twisted.access.gate import GO, Decision, Gate
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
from ecr_twisted.observe.accesslog import AccessLog, AccessRecord, RequestIds
from ecr_twisted.observe.metrics import Metrics
from ecr_twisted.registry import errors, listings, routes
from ecr_twisted.registry.catalog import Answer, Catalog  # _catalog hook (#13)
from ecr_twisted.registry.errors import RegistryError
from ecr_twisted.registry.redirects import MAX_REDIRECTS, RedirectRules, Refuse

__all__ = [
    "RegistryProxy", "ProxyConfig", "redact_target", "redact_url", "rewrite_location", "rewrite_link",
    "HOP_BY_HOP", "REQUEST_DROP", "RESPONSE_DROP", "STORAGE_REQUEST_KEEP", "MAX_REDIRECTS", "MAX_LISTING",
    "MAX_HIDDEN_PAGES", "BUSY_RETRY_AFTER", "pool_class",
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


_CACHEABLE = frozenset({routes.BLOB, routes.MANIFEST})
BUSY_RETRY_AFTER = b"1"  # seconds a client refused for want of an upstream connection is asked to wait
MAX_LISTING = 8 << 20  # tags/list and _catalog bodies the policy filters are read whole: bounded
MAX_HIDDEN_PAGES = 16  # listing pages in a row with nothing to show fetched before the listing ends there
_MAX_AGENT = 256  # characters of a User-Agent the access log keeps


class _Ctx:
    """Per-request state of the handler, written by the handler only."""

    __slots__ = (
        "kind", "match", "token", "origin", "fields", "retried", "sent_at", "redirects", "pages", "timeout", "target",
        "decision", "plan", "request_id", "user", "reason", "upstream_id",
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
        catalog: Catalog | None = None,  # _catalog hook (#13): answered from the ECR API, not the registry
    ) -> None:
        self.catalog = catalog
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
        self._token_origin: tuple[str, Origin] | None = None

    # -- entry points from the data path
    def handle(self, ex: Exchange) -> None:
        self.metrics.in_flight.inc()
        req = ex.request
        path = req.target.split(b"?", 1)[0]
        rid = self.request_ids.take(req.get(b"x-request-id"))
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
        ctx.match = m
        gate = self.gate
        if gate.open:
            return self._admitted(GO, ex, ctx)
        decision = gate.check(req.method, ctx.kind, m, req.target, req.get(b"authorization"), lambda: self._peer(ex))
        if type(decision) is Decision:
            return self._admitted(decision, ex, ctx)
        decision.addCallback(self._admitted, ex, ctx)
        decision.addErrback(self._bug, ex)

    def _admitted(self, decision: Decision, ex: Exchange, ctx: _Ctx) -> None:
        """The gate has decided: refuse, or pick token and origin and forward."""
        ctx.user = decision.user
        if decision.error is not None:
            return self._send_refusal(ex, decision)
        if ex.gone:
            return
        ctx.decision = decision
        # _catalog hook (#13); never in passthrough: the proxy's own AWS principal would list for the client
        if self.catalog is not None and ctx.kind == routes.CATALOG and not self.config.passthrough:
            return self._serve_catalog(ex, ctx)
        cache = self.cache
        if cache is not None and ctx.kind in _CACHEABLE:
            assert ctx.match is not None
            return self._act(cache.lookup(ex, ctx.match), ex, ctx)
        self._go_upstream(ex, ctx)

    # -- _catalog hook (#13): the merged, filtered, paginated catalog of registry.catalog
    def _serve_catalog(self, ex: Exchange, ctx: _Ctx) -> None:
        assert self.catalog is not None and ctx.decision is not None
        d = self.catalog.answer(ex.request.target, ctx.decision.listing)
        d.addCallback(self._catalog_answer, ex)
        d.addErrback(self._bug, ex)

    def _catalog_answer(self, answer: Answer, ex: Exchange) -> None:
        ex.respond(answer.status, answer.fields, answer.body)
    # -- end of the _catalog hook

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
        if self.config.passthrough:
            origin = self.config.upstream
            assert origin is not None
        else:
            assert self.tokens is not None
            token = self.tokens.token_for_request()
            if token is None:
                waiting = self.tokens.wait_for_token(self.config.request_timeout)
                if waiting is not None:  # the first token is on its way: go on when it comes
                    waiting.addCallback(self._token_came, ex, ctx)
                    waiting.addErrback(self._bug, ex)
                    return
                return self._no_token(ex, ctx)
            try:
                origin = self._origin(token)
            except ValueError:
                self.log.error("the ECR token names no usable proxyEndpoint; set --upstream")
                return self._fail(ex, errors.UPSTREAM_UNREACHABLE)
            ctx.token = token
        ctx.origin = origin
        ctx.timeout = self.config.upload_timeout if ctx.kind == routes.UPLOAD else self.config.request_timeout
        req = ex.request
        skip = req.connection_tokens() if req.get(b"connection") is not None else ()
        # a listing the proxy must read and filter is asked for uncompressed
        drop = REQUEST_DROP if decision.listing is None else _LISTING_DROP
        fields = [(n, v) for ln, n, v in req.fields if ln not in drop and ln not in skip]
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
        assert self.tokens is not None  # not passthrough: there is a keeper
        gone = errors.TOKEN_EXPIRED if self.tokens.expired() else errors.NO_TOKEN
        self._fail(ex, gone, extra=[(b"Retry-After", b"5")])

    def _send_refusal(self, ex: Exchange, decision: Decision) -> None:
        """Answer a refusal of the gate (or of ECR to passthrough credentials) with its challenge."""
        ctx = ex.ctx
        if ctx is not None:
            ctx.reason = _refusal_reason(decision)
        extra: Fields = []
        if decision.challenge is not None:
            extra.append((b"WWW-Authenticate", self.gate.challenge_header(decision.challenge, self._public(ex))))
            extra.append((b"Docker-Distribution-API-Version", b"registry/2.0"))
        if decision.retry_after is not None:
            extra.append((b"Retry-After", b"%d" % decision.retry_after))
        assert decision.error is not None
        self._fail(ex, decision.error, decision.detail, extra)

    def _peer(self, ex: Exchange) -> str:
        """The client's address for login throttling (the load balancer's view with --trust-forwarded)."""
        if self.config.trust_forwarded:
            forwarded = ex.request.get(b"x-forwarded-for")
            if forwarded:
                return forwarded.rsplit(b",", 1)[-1].strip().decode("latin-1")
        peer = ex.conn.transport.getPeer()
        return getattr(peer, "host", None) or str(peer)

    def _token_endpoint(self, ex: Exchange) -> None:
        """`GET /token`: the registry token flow's token server (token mode only)."""
        req = ex.request
        if req.method not in (b"GET", b"HEAD"):
            return self._fail(ex, errors.UNSUPPORTED)
        query = req.target.partition(b"?")[2]
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
            self.metrics.upstream_errors.labels("aborted").inc()
        self._log_access(ex, ctx, status, duration, plan)

    def _log_access(self, ex: Exchange, ctx: _Ctx | None, status: int, duration: float, plan: Plan | None) -> None:
        req = ex.request
        agent = req.get(b"user-agent")
        match = ctx.match if ctx is not None else None
        upstream_id = ctx.upstream_id if ctx is not None else None
        self.access_log.write(AccessRecord(
            time=ex.started + duration,
            client=self._peer(ex),
            user=(ctx.user if ctx is not None else None) or "anonymous",
            method=req.method.decode("latin-1"),
            target=redact_target(req.target),
            route=ctx.kind if ctx is not None else routes.OTHER,
            status=status,
            bytes_in=ex.bytes_in,
            bytes_out=ex.bytes_out,
            duration=duration,
            request_id=ctx.request_id if ctx is not None and ctx.request_id else "-",
            repository=match.name if match is not None else None,
            reference=match.reference if match is not None else None,
            upstream_status=ex.upstream_status or None,
            upstream_request_id=upstream_id.decode("latin-1")[:128] if upstream_id else None,
            cache=plan.source if plan is not None else None,
            user_agent=agent[:_MAX_AGENT].decode("latin-1") if agent is not None else None,
            reason=ctx.reason if ctx is not None else None,
            error=ex.error,
        ))

    # -- upstream round trips
    def _origin(self, token: Token) -> Origin:
        if self.config.upstream is not None:
            return self.config.upstream
        cached = self._token_origin
        if cached is not None and cached[0] == token.endpoint:
            return cached[1]
        origin = Origin.from_url(token.endpoint)
        self._token_origin = (token.endpoint, origin)
        return origin

    def _send(self, ex: Exchange, ctx: _Ctx) -> None:
        assert ctx.origin is not None and ctx.decision is not None
        req = ex.request
        ctx.sent_at = self.clock.seconds()
        ctx.target = "registry"
        fields = ctx.fields.copy()  # kept clean for a retry with a fresh token
        if ctx.token is not None:
            fields.append((b"Authorization", ctx.token.header))
        elif ctx.decision.forward_auth is not None:
            fields.append((b"Authorization", ctx.decision.forward_auth))
        target = ctx.decision.target or req.target
        plan = ctx.plan
        method = req.method if plan is None or plan.method is None else plan.method
        d = ex.forward(ctx.origin, method, target, fields, ctx.timeout, pool_class(ctx.kind, method))
        d.addCallbacks(self._registry_response, self._upstream_failed, (ex, ctx), {}, (ex, ctx))
        d.addErrback(self._bug, ex)

    def _registry_response(self, resp: UpstreamResponse, ex: Exchange, ctx: _Ctx) -> None:
        self.metrics.observe_upstream("registry", self.clock.seconds() - ctx.sent_at)
        head = resp.head
        status = head.status
        ctx.upstream_id = head.get(b"x-amzn-requestid")
        if status in (401, 403):
            resp.discard()
            if self.config.passthrough:  # the client's own credentials were refused: its problem
                return self._send_refusal(ex, self.gate.upstream_refused(status))
            return self._refused(ex, ctx, status)
        listing = ctx.decision.listing if ctx.decision is not None else None
        if listing is not None and status == 200:
            d = Deferred.fromCoroutine(self._filter_listing(resp, ex, ctx, listing))
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
                ctx.decision.target = step.target
                return self._send(ex, ctx)
            self.log.warn("listing {path}: {n} pages in a row hold nothing the caller may see; ending it there",
                          path=redact_url(ex.request.target), n=MAX_HIDDEN_PAGES)
            step = step.last_resort
        ex.respond(200, step.fields, step.body)

    def _refused(self, ex: Exchange, ctx: _Ctx, status: int) -> None:
        """The upstream refused our token: refresh it once (shared) and retry once when safe."""
        if not ctx.retried:
            ctx.retried = True
            assert self.tokens is not None  # not passthrough (checked by the caller): there is a keeper
            refreshed = self.tokens.force_refresh(ctx.token)
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
        self.metrics.observe_upstream("storage", self.clock.seconds() - ctx.sent_at)
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
        self.metrics.upstream_errors.labels(err.kind).inc()
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
    def _public(self, ex: Exchange) -> bytes:
        if self.config.public_base is not None:
            return self.config.public_base
        req = ex.request
        scheme = b"https" if ex.is_tls else b"http"
        host = req.get(b"host") or b""
        if self.config.trust_forwarded:
            proto = req.get(b"x-forwarded-proto")
            if proto:
                proto = proto.split(b",", 1)[0].strip().lower()
                if proto in (b"http", b"https"):
                    scheme = proto
            fhost = req.get(b"x-forwarded-host")
            if fhost:
                host = fhost.split(b",", 1)[0].strip()
        if not _HOST.match(host):
            host = b"invalid-host"
        return scheme + b"://" + host

    def _response_fields(self, head: Head, ex: Exchange, ctx: _Ctx) -> Fields:
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
            out.append((n, v))
        return out

    def _fail(
        self, ex: Exchange, err: RegistryError, detail: str | None = None, extra: Fields | None = None
    ) -> None:
        fields = list(errors.JSON_FIELDS)
        if extra:
            fields.extend(extra)
        ex.respond(err.status, fields, errors.envelope(err, detail))
