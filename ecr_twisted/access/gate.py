"""The gate every registry request passes before anything goes upstream.

It names the action a request needs (pull, push, delete), finds out who is asking in the
configured `--auth` mode, and asks the policy (or the webhook). Its answer is a `Decision`:
go ahead (possibly with a rewritten target or a listing filter), or the registry error to send.

Modes:
- none: everyone is anonymous; the policy says what anonymous may do.
- basic: htpasswd users with Basic credentials on every request. When the policy gives
  anonymous callers anything, the challenge is the token flow's Bearer one instead (with
  `/token` served as in token mode), and Bearer tokens are accepted besides Basic: docker
  refuses a Basic challenge it holds no credentials for, and containers/image clients answer
  one with empty credentials, so only the token flow lets every client pull anonymously.
- token: Docker's token flow; `/token` trades Basic credentials for a short-lived JWT
  whose scopes are what the policy allows, and each request needs a token with its scope.
- passthrough: the client's own ECR credentials go upstream; ECR decides who they are.
- webhook: an operator's service answers each (credentials, action, repository, tag).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode

from twisted.internet.defer import Deferred

from ecr_twisted.registry import errors
from ecr_twisted.registry import routes
from ecr_twisted.access.credentials import NO_CREDENTIALS, Credentials, parse_authorization
from ecr_twisted.access.htpasswd import Htpasswd
from ecr_twisted.access.throttle import LoginThrottle
from ecr_twisted.access.tokens import Grant, TokenIssuer
from ecr_twisted.access.webhook import ALLOW, UNAUTHENTICATED, UNAVAILABLE, WebhookAuthorizer
from ecr_twisted.registry.errors import RegistryError
from ecr_twisted.access.policy import ANONYMOUS, FixedPolicy, Policy, Principal

MODES = ("none", "basic", "token", "passthrough", "webhook")
PULL, PUSH, DELETE = "pull", "push", "delete"

# (route kind, method) -> action; the base route and _catalog need none
_ACTIONS: dict[tuple[str, bytes], str] = {
    (routes.MANIFEST, b"GET"): PULL,
    (routes.MANIFEST, b"HEAD"): PULL,
    (routes.MANIFEST, b"PUT"): PUSH,
    (routes.MANIFEST, b"DELETE"): DELETE,
    (routes.BLOB, b"GET"): PULL,
    (routes.BLOB, b"HEAD"): PULL,
    (routes.BLOB, b"DELETE"): DELETE,
    (routes.TAGS, b"GET"): PULL,
    (routes.REFERRERS, b"GET"): PULL,
    (routes.UPLOAD, b"POST"): PUSH,
    (routes.UPLOAD, b"GET"): PUSH,
    (routes.UPLOAD, b"PATCH"): PUSH,
    (routes.UPLOAD, b"PUT"): PUSH,
    (routes.UPLOAD, b"DELETE"): PUSH,
}
_SCOPE = re.compile(r"repository:(?P<name>[^:]+):(?P<actions>[a-z*,]*)\Z")

Listing = Callable[[list[str]], "list[str] | Deferred[list[str]]"]


class Decision:
    """The gate's answer. `error` None means: forward the request."""

    __slots__ = ("error", "detail", "challenge", "retry_after", "target", "listing", "forward_auth")

    def __init__(
        self,
        error: RegistryError | None = None,
        detail: str | None = None,
        challenge: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.error = error
        self.detail = detail
        self.challenge = challenge  # "scope|error" (or "basic-token" for /token); the gate writes the header
        self.retry_after = retry_after
        self.target: bytes | None = None  # a rewritten request target (mount -> plain upload)
        self.listing: Listing | None = None  # filter for tags/list and _catalog names
        self.forward_auth: bytes | None = None  # passthrough: the client's Authorization


GO = Decision()  # shared: never mutated


@dataclass
class Identity:
    """Who is asking, as far as the mode could tell."""

    who: Principal
    creds: Credentials
    grant: Grant | None = None  # token mode: what the token allows
    failed: Decision | None = None  # credentials were presented and refused
    addr: str | None = None  # webhook mode: the client's address, for the login throttle


@dataclass
class AccessConfig:
    mode: str = "none"
    namespace: re.Pattern[str] | None = None  # --namespace-pattern
    exclude: re.Pattern[str] | None = None  # --exclude-pattern
    read_only: bool = False
    service: str = "ecr-twisted"  # token mode: the JWT audience and the challenge's service=


class AccessMetrics:
    """What the gate counts (labels are modes, results and actions: never names or users)."""

    def __init__(self, attempts: Any, denials: Any, webhook_errors: Any) -> None:
        self.attempts = attempts
        self.denials = denials
        self.webhook_errors = webhook_errors


class Gate:
    """Decides each request before any upstream request; see the module docstring."""

    def __init__(
        self,
        config: AccessConfig,
        policy: Any,  # PolicyFile or FixedPolicy: .current() -> Policy
        clock: Any,
        metrics: AccessMetrics | None = None,
        htpasswd: Htpasswd | None = None,
        issuer: TokenIssuer | None = None,
        webhook: WebhookAuthorizer | None = None,
        throttle: LoginThrottle | None = None,
    ) -> None:
        if config.mode not in MODES:
            raise ValueError(f"unknown auth mode {config.mode!r}")
        if config.mode in ("basic", "token") and htpasswd is None:
            raise ValueError(f"--auth {config.mode} needs an htpasswd file")
        if config.mode == "token" and issuer is None:
            raise ValueError("--auth token needs a token issuer")
        if issuer is not None and config.mode not in ("basic", "token"):
            raise ValueError(f"--auth {config.mode} issues no tokens")
        if config.mode == "webhook" and webhook is None:
            raise ValueError("--auth webhook needs a webhook")
        self.config = config
        self.mode = config.mode
        self.policy = policy
        self.clock = clock
        self.metrics = metrics
        self.htpasswd = htpasswd
        self.issuer = issuer
        self.webhook = webhook
        self.throttle = throttle or LoginThrottle()
        self.issues_tokens = issuer is not None  # `/token` is served
        self._filters_names = config.namespace is not None or config.exclude is not None
        # `--auth none` with the open policy (what --anonymous means): every request goes ahead
        self.open = (
            config.mode == "none"
            and not self._filters_names
            and not config.read_only
            and isinstance(policy, FixedPolicy)
            and policy.policy.allows_everything()
        )

    # -- names
    def visible(self, name: str) -> bool:
        """A repository outside --namespace-pattern / inside --exclude-pattern does not exist for clients."""
        ns, ex = self.config.namespace, self.config.exclude
        if ns is not None and ns.fullmatch(name) is None:
            return False
        return ex is None or ex.fullmatch(name) is None

    # -- the per-request decision
    def check(
        self, method: bytes, kind: str, match: routes.Match, target: bytes, authorization: bytes | None, peer: Callable[[], str]
    ) -> Decision | Deferred[Decision]:
        name = match.name
        if name is not None and self._filters_names and not self.visible(name):
            return Decision(errors.NAME_UNKNOWN)
        action = _ACTIONS.get((kind, method))
        if self.config.read_only and action in (PUSH, DELETE):
            return self._deny(action, "this registry is read-only")
        if self.open:
            return GO
        creds = parse_authorization(authorization) if authorization is not None and self.mode != "none" else _NONE
        ident = self._identify(creds, peer)
        if isinstance(ident, Deferred):
            return ident.addCallback(self._decide, method, kind, match, target, action)
        return self._decide(ident, method, kind, match, target, action)

    def _decide(
        self, ident: Identity, method: bytes, kind: str, match: routes.Match, target: bytes, action: str | None
    ) -> Decision | Deferred[Decision]:
        if ident.failed is not None:
            return ident.failed
        mode = self.mode
        if kind == routes.BASE:
            return self._base(ident)
        if kind == routes.CATALOG:
            if mode in ("token", "passthrough", "webhook") and ident.creds.scheme == "none":
                return self._challenge()
            decision = Decision()
            decision.listing = self._catalog_filter(ident)
            return self._passthrough(decision, ident)
        assert action is not None and match.name is not None
        name = match.name
        reference = match.reference
        tag = reference if reference is not None and ":" not in reference else None
        if mode == "webhook":
            return self._ask_webhook(ident, action, name, tag, kind, target)
        if mode == "passthrough" and ident.creds.scheme == "none":
            return self._challenge()
        policy: Policy = self.policy.current()
        if kind == routes.MANIFEST and method == b"PUT" and tag is None:
            for extra in _query_tags(target):
                if not policy.allows(ident.who, PUSH, name, extra):
                    return self._refuse(ident, action, name)
        # deleting by digest removes every tag of that image: tag-limited rules must all agree
        if not policy.allows(ident.who, action, name, tag, every_tag=action == DELETE and tag is None):
            # pushers check which blobs exist before uploading: HEAD reveals no content
            if not (kind == routes.BLOB and method == b"HEAD" and policy.allows(ident.who, PUSH, name)):
                return self._refuse(ident, action, name)
            action = PUSH
        if mode == "token" or ident.grant is not None:  # basic mode accepts our tokens too
            if ident.grant is None:
                return self._challenge(name, action)
            if not ident.grant.permits(name, action):
                if not (kind == routes.BLOB and method == b"HEAD" and ident.grant.permits(name, PUSH)):
                    return self._challenge(name, action, "insufficient_scope")
        decision = GO
        if kind == routes.UPLOAD and method == b"POST" and b"?" in target:
            decision = self._mount(decision, ident, target, policy)
        elif kind == routes.TAGS and policy.tags_matter(ident.who, PULL, name):
            decision = Decision()
            decision.listing = self._tags_filter(ident.who, name, policy)
        return self._passthrough(decision, ident)

    def _passthrough(self, decision: Decision, ident: Identity) -> Decision:
        if self.mode == "passthrough":
            if decision is GO:
                decision = Decision()
            decision.forward_auth = ident.creds.raw
        return decision

    def _base(self, ident: Identity) -> Decision | Deferred[Decision]:
        """`/v2/`: how clients log in. Modes with credentials answer 401 until they are sent."""
        mode = self.mode
        if mode == "none":
            return GO
        if mode == "token" or ident.grant is not None:
            return GO if ident.grant is not None else self._challenge()
        if ident.creds.scheme == "none" or (mode == "basic" and ident.who.anonymous):
            return self._challenge()
        if mode == "webhook":
            d = self._webhook_decide(ident.creds, "login", "", None)
            if isinstance(d, Deferred):
                return d.addCallback(self._login_verdict, ident)
            return self._login_verdict(d, ident)
        return self._passthrough(Decision(), ident)

    def _login_verdict(self, verdict: str, ident: Identity) -> Decision:
        if verdict == ALLOW:
            self._count("success")
            return GO
        if verdict == UNAVAILABLE:
            return Decision(errors.DENIED, "the authorization service is unavailable")
        self._webhook_failed_login(ident)
        return self._challenge()

    def _webhook_failed_login(self, ident: Identity) -> None:
        self._count("failure")
        if ident.addr is not None:
            self.throttle.failed(ident.addr, self.clock.seconds())

    # -- identification per mode
    def _identify(self, creds: Credentials, peer: Callable[[], str]) -> Identity | Deferred[Identity]:
        mode = self.mode
        scheme = creds.scheme
        if mode == "none" or scheme == "none":
            return _ANONYMOUS_IDENTITY if creds is _NONE else Identity(ANONYMOUS, creds)
        if scheme == "invalid":
            self._count("failure")
            return Identity(ANONYMOUS, creds, failed=self._challenge(error="invalid_token" if mode == "token" else None))
        if mode == "passthrough":
            # ECR checks these credentials; a claimed user name would mean nothing here
            return Identity(_AWS, creds)
        if mode == "webhook":
            addr = peer()
            wait = self.throttle.wait(addr, self.clock.seconds())
            if wait > 0:  # wrong credentials are answered by the webhook; guessing is slowed here
                self._count("throttled")
                failed = Decision(errors.TOO_MANY_REQUESTS, "too many failed logins; wait", retry_after=int(wait) + 1)
                return Identity(ANONYMOUS, creds, failed=failed)
            return Identity(Principal(creds.user) if creds.user else ANONYMOUS, creds, addr=addr)
        if scheme == "bearer" and self.issuer is not None:
            return self._bearer(creds)
        if mode == "token" or scheme != "basic":
            return Identity(ANONYMOUS, _NONE, failed=self._challenge())
        return self.login(creds, peer)

    def _bearer(self, creds: Credentials) -> Identity:
        """A token of ours (token mode; basic mode when it offers the token flow)."""
        assert self.issuer is not None and creds.secret is not None
        grant = self.issuer.verify(creds.secret, self.clock.seconds())
        if grant is None:
            self._count("failure")
            return Identity(ANONYMOUS, creds, failed=self._challenge(error="invalid_token"))
        self._count("success")
        return Identity(Principal(grant.user) if grant.user else ANONYMOUS, creds, grant)

    def login(self, creds: Credentials, peer: Callable[[], str]) -> Identity | Deferred[Identity]:
        """Check Basic credentials against the htpasswd file, throttled per client address.

        The throttle comes first, even for credentials verified before: otherwise a throttled
        guesser would learn which guesses match a remembered password."""
        htpasswd = self.htpasswd
        assert htpasswd is not None and creds.user is not None and creds.secret is not None
        user, password = creds.user, creds.secret
        now = self.clock.seconds()
        addr = peer()
        wait = self.throttle.wait(addr, now)
        if wait > 0:
            self._count("throttled")
            failed = Decision(errors.TOO_MANY_REQUESTS, "too many failed logins; wait", retry_after=int(wait) + 1)
            return Identity(ANONYMOUS, creds, failed=failed)
        if htpasswd.known(user, password):
            return self._logged_in(True, creds, addr, False)
        counted = not htpasswd.pending(user, password)
        if counted:
            self.throttle.attempt(addr, now)  # a failure until proven right: parallel guesses count too
        result = htpasswd.verify(user, password)
        if isinstance(result, Deferred):
            return result.addCallback(self._logged_in, creds, addr, counted)
        return self._logged_in(result, creds, addr, counted)

    def _logged_in(self, ok: bool, creds: Credentials, addr: str, counted: bool) -> Identity:
        if ok:
            self._count("success")
            if counted:
                self.throttle.forgive(addr)
            return Identity(Principal(creds.user), creds)
        self._count("failure")
        if counted:
            self.throttle.confirm(addr, self.clock.seconds())
        return Identity(ANONYMOUS, creds, failed=self._challenge(detail="invalid username or password"))

    # -- refusals
    def _refuse(self, ident: Identity, action: str, name: str) -> Decision:
        """Not allowed: anonymous callers are asked to log in, known ones are denied."""
        if ident.who.anonymous and self.mode != "none":
            self._denied(action)
            return self._challenge(name, action)
        return self._deny(action)

    def _deny(self, action: str | None, detail: str | None = None) -> Decision:
        self._denied(action or "other")
        return Decision(errors.DENIED, detail)

    def _challenge(
        self, name: str | None = None, action: str | None = None, error: str | None = None, detail: str | None = None
    ) -> Decision:
        scope = f"repository:{name}:{action}" if name and action else ""
        return Decision(errors.UNAUTHORIZED, detail, challenge=f"{scope}|{error or ''}")

    def token_flow(self) -> bool:
        """Challenge with Bearer (the token flow) rather than Basic? Always in token mode; in basic
        mode while the policy lets anonymous callers do something (decided per challenge: the
        policy file may change)."""
        if self.mode == "token":
            return True
        return self.issuer is not None and self.policy.current().anonymous_may_act

    def challenge_header(self, spec: str, public: bytes) -> bytes:
        """The WWW-Authenticate value for a Decision's `challenge`, on the public URL."""
        if spec == "basic-token":  # /token itself asks for the user's password
            return b'Basic realm="' + public + b'/token"'
        if not self.token_flow():
            return b'Basic realm="' + public + b'"'
        scope, _, error = spec.partition("|")
        value = b'Bearer realm="' + public + b'/token",service="' + self.config.service.encode("ascii") + b'"'
        if scope:
            value += b',scope="' + scope.encode("ascii") + b'"'
        if error:
            value += b',error="' + error.encode("ascii") + b'"'
        return value

    def upstream_refused(self, status: int) -> Decision:
        """Passthrough: ECR refused the client's own credentials (401) or their permissions (403)."""
        if status == 401:
            self._count("failure")
            return self._challenge(detail="the registry refused these credentials")
        self._denied("other")
        return Decision(errors.DENIED)

    # -- listings
    def _catalog_filter(self, ident: Identity) -> Listing:
        if self.mode == "webhook":
            return lambda names: self._webhook_filter(ident, [n for n in names if self.visible(n)], None)
        policy = self.policy.current()
        who = ident.who
        return lambda names: [n for n in names if self.visible(n) and policy.allows(who, PULL, n)]

    def _tags_filter(self, who: Principal, name: str, policy: Policy) -> Listing:
        return lambda tags: [t for t in tags if policy.allows(who, PULL, name, t)]

    # -- mount
    def _mount(self, decision: Decision, ident: Identity, target: bytes, policy: Policy | None) -> Decision:
        """`from=` must be readable by the caller too, or the mount becomes a normal upload."""
        source = _mount_source(target)
        if source is _NO_MOUNT:
            return decision
        readable = (
            source is not None
            and policy is not None
            and self.visible(source)
            and policy.allows(ident.who, PULL, source)
            and (ident.grant.permits(source, PULL) if ident.grant is not None else self.mode != "token")
        )
        return decision if readable else _plain_upload(target)

    # -- webhook
    def _webhook_decide(self, creds: Credentials, action: str, name: str, tag: str | None) -> str | Deferred[str]:
        assert self.webhook is not None
        return self.webhook.decide(creds, action, name, tag)

    def _ask_webhook(
        self, ident: Identity, action: str, name: str, tag: str | None, kind: str, target: bytes
    ) -> Decision | Deferred[Decision]:
        verdict = self._webhook_decide(ident.creds, action, name, tag)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(self._webhook_verdict, ident, action, name, kind, target)
        return self._webhook_verdict(verdict, ident, action, name, kind, target)

    def _webhook_verdict(
        self, verdict: str, ident: Identity, action: str, name: str, kind: str, target: bytes
    ) -> Decision | Deferred[Decision]:
        if verdict == UNAVAILABLE:
            return self._deny(action, "the authorization service is unavailable")
        if verdict == UNAUTHENTICATED:
            self._denied(action)
            self._webhook_failed_login(ident)
            return self._challenge(detail="invalid username or password")
        if verdict != ALLOW:
            return self._refuse(ident, action, name)
        if kind == routes.UPLOAD and b"?" in target:
            return self._webhook_mount(ident, target)
        return GO

    def _webhook_mount(self, ident: Identity, target: bytes) -> Decision | Deferred[Decision]:
        source = _mount_source(target)
        if source is _NO_MOUNT:
            return GO
        if source is None or not self.visible(source):
            return _plain_upload(target)
        verdict = self._webhook_decide(ident.creds, PULL, source, None)

        def decided(v: str) -> Decision:
            return GO if v == ALLOW else _plain_upload(target)

        return verdict.addCallback(decided) if isinstance(verdict, Deferred) else decided(verdict)

    def _webhook_filter(self, ident: Identity, names: list[str], tag: str | None) -> Deferred[list[str]] | list[str]:
        from twisted.internet.defer import DeferredSemaphore, gatherResults

        # at most 8 questions in flight: a catalog page must not become a burst of POSTs
        limit = DeferredSemaphore(8)
        ds = [limit.run(self._webhook_decide, ident.creds, PULL, n, tag) for n in names]
        return gatherResults(ds).addCallback(lambda vs: [n for n, v in zip(names, vs) if v == ALLOW])

    # -- /token (token mode)
    def issue_token(self, query: bytes, authorization: bytes | None, peer: Callable[[], str]) -> Any:
        """Answer `GET /token?service=..&scope=..`: (status, Decision | JSON body)."""
        creds = parse_authorization(authorization) if authorization is not None else _NONE
        if creds.scheme == "none":
            return self._grant(Identity(ANONYMOUS, creds), query)
        if creds.scheme != "basic":
            self._count("failure")
            return self._token_refused()
        ident = self.login(creds, peer)
        if isinstance(ident, Deferred):
            return ident.addCallback(self._grant, query)
        return self._grant(ident, query)

    def _token_refused(self, failed: Decision | None = None) -> Decision:
        if failed is not None and failed.error is errors.TOO_MANY_REQUESTS:
            return failed
        return Decision(errors.UNAUTHORIZED, "invalid username or password", challenge="basic-token")

    def _grant(self, ident: Identity, query: bytes) -> Decision | bytes:
        if ident.failed is not None:
            return self._token_refused(ident.failed)
        assert self.issuer is not None
        policy: Policy = self.policy.current()
        granted: dict[str, set[str]] = {}
        for key, value in parse_qsl(query.decode("latin-1")):
            if key != "scope":
                continue
            for scope in value.split(" "):
                m = _SCOPE.match(scope)
                if m is None:
                    continue  # registry:catalog:* and unknown resource types grant nothing
                name = m.group("name")
                if not (routes.valid_name(name) and self.visible(name)):
                    continue
                wanted = set(m.group("actions").split(","))
                if "*" in wanted:
                    wanted = {PULL, PUSH, DELETE}
                for action in wanted & {PULL, PUSH, DELETE}:
                    if self.config.read_only and action != PULL:
                        continue
                    if policy.allows(ident.who, action, name):
                        granted.setdefault(name, set()).add(action)
        now = self.clock.seconds()
        token, ttl = self.issuer.issue(ident.who.user, sorted(granted.items()), now)
        issued = datetime.fromtimestamp(int(now), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"token": token, "access_token": token, "expires_in": ttl, "issued_at": issued}
        return json.dumps(body, separators=(",", ":")).encode("ascii")

    # -- metrics
    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.attempts.labels(self.mode, result).inc()

    def _denied(self, action: str) -> None:
        if self.metrics is not None:
            self.metrics.denials.labels(action).inc()


_NONE = NO_CREDENTIALS
_ANONYMOUS_IDENTITY = Identity(ANONYMOUS, _NONE)  # shared: never mutated
_AWS = Principal("AWS")  # every passthrough caller: ECR's only user name


_NO_MOUNT = "-"  # not a mount request at all


def _mount_source(target: bytes) -> str | None:
    """The repository a mount request reads from; None when it cannot be trusted (no `from`,
    several, odd spellings of the keys, a bad name); _NO_MOUNT when nothing asks for a mount.

    Keys are compared after percent-decoding and case-folding: registries decode them, and
    `?%6Dount=` must not slip past a check that looks for the bytes `mount=`."""
    params = parse_qsl(target.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
    keys = [k.lower() for k, _ in params]
    if "mount" not in keys and "from" not in keys:
        return _NO_MOUNT
    sources = [v for k, v in params if k == "from"]
    if len(sources) != 1 or keys.count("from") != 1 or keys.count("mount") != 1 or ("mount", "") in params:
        return None
    if not [k for k, _ in params if k == "mount"] or not routes.valid_name(sources[0]):
        return None
    return sources[0]


def _plain_upload(target: bytes) -> Decision:
    """The same upload request without any mount: the registry starts a normal upload."""
    path, _, query = target.partition(b"?")
    params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    kept = [(k, v) for k, v in params if k.lower() not in ("mount", "from")]
    decision = Decision()
    decision.target = path + (b"?" + urlencode(kept).encode("ascii") if kept else b"")
    return decision


def _query_tags(target: bytes) -> list[str]:
    """`?tag=` values of a manifest PUT (OCI: push by digest and tag it in one request)."""
    if b"?" not in target:
        return []
    return [v for k, v in parse_qsl(target.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
            if k.lower() == "tag"]
