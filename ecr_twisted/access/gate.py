"""The gate every registry request passes before anything goes upstream.

It names the action a request needs (pull, push, delete), hides repositories outside
--namespace-pattern / inside --exclude-pattern, refuses writes under --read-only, and then lets
the `--auth` mode (modes.py, chosen once here) find out who is asking and decide, with the
policy checks, mount rewriting and listing filters that all modes share kept here. Its answer
is a `Decision`: go ahead (possibly with a rewritten target or a listing filter), or the
registry error to send.

The handler's fast path stays synchronous: with `open` it does not even ask; otherwise a
remembered Basic login or a valid Bearer token gives a `Decision` at once, and only bcrypt
and webhook questions give a Deferred.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from twisted.internet.defer import Deferred

from ecr_twisted.access.credentials import parse_authorization
from ecr_twisted.access.decision import (
    DELETE,
    GO,
    PULL,
    PUSH,
    Decision,
    Identity,
    Listing,
    Peer,
    Question,
    challenge,
)
from ecr_twisted.access.htpasswd import Htpasswd
from ecr_twisted.access.modes import AUTH_MODES, AuthMode, TokenAnswer
from ecr_twisted.access.policy import Policy, Principal
from ecr_twisted.access.targets import NO_MOUNT, mount_source, plain_upload, query_tags
from ecr_twisted.access.throttle import LoginThrottle
from ecr_twisted.access.tokens import TokenIssuer
from ecr_twisted.access.webhook import WebhookAuthorizer
from ecr_twisted.registry import errors, routes

__all__ = ["GO", "MODES", "AccessConfig", "AccessMetrics", "Decision", "Gate"]

MODES = tuple(AUTH_MODES)  # the `--auth` choices

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


@dataclass
class AccessConfig:
    mode: str = "none"
    namespace: re.Pattern[str] | None = None  # --namespace-pattern
    exclude: re.Pattern[str] | None = None  # --exclude-pattern
    read_only: bool = False
    service: str = "ecr-twisted"  # token flow: the JWT audience and the challenge's service=


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
        mode = AUTH_MODES.get(config.mode)
        if mode is None:
            raise ValueError(f"unknown auth mode {config.mode!r}")
        self.config = config
        self.mode = config.mode
        self.policy = policy
        self.htpasswd = htpasswd  # followed by its file; SIGHUP has it look now
        self.clock = clock
        self.metrics = metrics
        self._attempts: dict[str, Any] = {}  # result -> the attempts counter's child
        self._denials: dict[str, Any] = {}  # action -> the denials counter's child
        self.throttle = throttle or LoginThrottle()
        self.strategy: AuthMode = mode(self, htpasswd, issuer, webhook)
        self.issues_tokens = self.strategy.issues_tokens  # `/token` is served
        self._filters_names = config.namespace is not None or config.exclude is not None
        # every request goes ahead (`--auth none` with the open policy: what --anonymous means)
        self.open = not self._filters_names and not config.read_only and self.strategy.always_allows(policy)

    # -- names
    def visible(self, name: str) -> bool:
        """A repository outside --namespace-pattern / inside --exclude-pattern does not exist for clients."""
        ns, ex = self.config.namespace, self.config.exclude
        if ns is not None and ns.fullmatch(name) is None:
            return False
        return ex is None or ex.fullmatch(name) is None

    # -- the per-request decision
    def check(
        self, method: bytes, kind: str, match: routes.Match, target: bytes, authorization: bytes | None, peer: Peer
    ) -> Decision | Deferred[Decision]:
        name = match.name
        if name is not None and self._filters_names and not self.visible(name):
            return Decision(errors.NAME_UNKNOWN)
        action = _ACTIONS.get((kind, method))
        if self.config.read_only and action in (PUSH, DELETE):
            return self.deny(action, "this registry is read-only")
        if self.open:
            return GO
        reference = match.reference
        tag = reference if reference is not None and ":" not in reference else None
        q = Question(method, kind, action, name, tag, target)
        ident = self.strategy.identify(parse_authorization(authorization), peer)
        if isinstance(ident, Deferred):
            return ident.addCallback(self._decide_named, q)
        return self._decide_named(ident, q)

    def _decide_named(self, ident: Identity, q: Question) -> Decision | Deferred[Decision]:
        """`_decide`, with who was asking written on the answer (for the access log)."""
        decision = self._decide(ident, q)
        if ident.who.anonymous and ident.failed is None:
            return decision  # the fast path: anonymous callers keep the shared GO
        if isinstance(decision, Deferred):
            return decision.addCallback(_named, ident)
        return _named(decision, ident)

    def _decide(self, ident: Identity, q: Question) -> Decision | Deferred[Decision]:
        if ident.failed is not None:
            return ident.failed
        if q.kind == routes.BASE:
            return self.strategy.base(ident)
        if q.kind == routes.CATALOG:
            return self.strategy.catalog(ident)
        assert q.action is not None and q.name is not None
        return self.strategy.decide(ident, q)

    # -- the policy, for the modes it applies to (all but webhook)
    def allowed(self, ident: Identity, q: Question, policy: Policy) -> str | None:
        """The action the policy lets this caller take here: the request's own, or push for a blob
        HEAD by someone who may push (pushers check which blobs exist before uploading; HEAD shows
        no content). None: refused."""
        who, name, action = ident.who, q.name, q.action
        assert name is not None and action is not None
        if q.kind == routes.MANIFEST and q.method == b"PUT" and q.tag is None:
            for extra in query_tags(q.target):
                if not policy.allows(who, PUSH, name, extra):
                    return None
        # deleting by digest removes every tag of that image: tag-limited rules must all agree
        if policy.allows(who, action, name, q.tag, every_tag=action == DELETE and q.tag is None):
            return action
        if q.blob_head and policy.allows(who, PUSH, name):
            return PUSH
        return None

    def admit(self, ident: Identity, q: Question, policy: Policy) -> Decision:
        """An allowed request goes ahead; a mount from what the caller cannot read becomes a plain
        upload, and a tags/list hides the tags it may not pull."""
        assert q.name is not None
        if q.kind == routes.UPLOAD and q.method == b"POST" and b"?" in q.target:
            return self._mount(ident, q.target, policy)
        if q.kind == routes.TAGS and policy.tags_matter(ident.who, PULL, q.name):
            decision = Decision()
            decision.listing = _tags_filter(ident.who, q.name, policy)
            return decision
        return GO

    def _mount(self, ident: Identity, target: bytes, policy: Policy) -> Decision:
        """`from=` must be readable by the caller too (and be in its token), or the mount becomes a normal upload."""
        source = mount_source(target)
        if source is NO_MOUNT:
            return GO
        readable = (
            source is not None
            and self.visible(source)
            and policy.allows(ident.who, PULL, source)
            and (ident.grant is None or ident.grant.permits(source, PULL))
        )
        return GO if readable else plain_upload(target)

    def catalog_by_policy(self, ident: Identity) -> Decision:
        """`_catalog`, showing only the visible repositories the caller may pull."""
        policy = self.policy.current()
        who = ident.who
        decision = Decision()
        decision.listing = lambda names: [n for n in names if self.visible(n) and policy.allows(who, PULL, n)]
        return decision

    def grantable(self, who: Principal, query: bytes) -> dict[str, set[str]]:
        """Of the `scope=` asked for at `/token`, what the policy grants `who` (never push or delete
        under --read-only, nothing on invisible or invalid names, nothing but repository scopes)."""
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
                    if policy.allows(who, action, name):
                        granted.setdefault(name, set()).add(action)
        return granted

    # -- /token
    def issue_token(self, query: bytes, authorization: bytes | None, peer: Peer) -> TokenAnswer | Deferred[TokenAnswer]:
        """Answer `GET /token?service=..&scope=..`: a refusal (Decision) or the JSON body of a token."""
        return self.strategy.issue_token(query, parse_authorization(authorization), peer)

    # -- refusals and challenges
    def deny(self, action: str | None, detail: str | None = None) -> Decision:
        """403, counted."""
        self.denied(action or "other")
        decision = Decision(errors.DENIED, detail)
        decision.reason = f"DENIED: {action or 'this request'} not allowed" + (f" ({detail})" if detail else "")
        return decision

    def throttled(self, wait: float) -> Decision:
        """429 for an address that keeps failing to log in, counted."""
        self.count("throttled")
        return Decision(errors.TOO_MANY_REQUESTS, "too many failed logins; wait", retry_after=int(wait) + 1)

    def token_flow(self) -> bool:
        """Challenge with Bearer (the token flow) rather than Basic? Always in token mode; in basic
        mode while the policy lets anonymous callers do something (decided per challenge: the
        policy file may change)."""
        return self.strategy.bearer_challenge()

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
            self.count("failure")
            return challenge(detail="the registry refused these credentials")
        self.denied("other")
        return Decision(errors.DENIED)

    # -- metrics
    def count(self, result: str) -> None:
        """A login attempt's outcome: success, failure or throttled (the counter's child kept per
        result: `labels()` takes a lock and builds a key; a remembered login counts every request)."""
        child = self._attempts.get(result)
        if child is None:
            if self.metrics is None:
                return
            child = self._attempts[result] = self.metrics.attempts.labels(self.mode, result)
        child.inc()

    def denied(self, action: str) -> None:
        child = self._denials.get(action)
        if child is None:
            if self.metrics is None:
                return
            child = self._denials[action] = self.metrics.denials.labels(action)
        child.inc()


def _named(decision: Decision, ident: Identity) -> Decision:
    """The decision with the caller's user name (the claimed one on a failed login) and, for a failed
    login, why. The shared GO is never written on: a named go-ahead is a fresh Decision."""
    if ident.failed is not None:
        decision.user = ident.creds.user
        decision.reason = "login failed: " + (decision.detail or decision.challenge_error or "bad credentials")
        return decision
    if decision is GO:
        decision = Decision()
    decision.user = ident.who.user
    return decision


def _tags_filter(who: Principal, name: str, policy: Policy) -> Listing:
    return lambda tags: [t for t in tags if policy.allows(who, PULL, name, t)]
