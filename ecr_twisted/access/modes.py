"""One object per `--auth` mode: how callers are identified, and what differs in deciding for them.

The gate (gate.py) does what every mode shares: names hidden by --namespace-pattern and
--exclude-pattern, --read-only, the route -> action table, the policy checks, mount rewriting and
listing filters. It picks one `AuthMode` when it is built and asks it only what differs:

- `identify(creds, peer)`: who is asking (an `Identity`; a Deferred only while bcrypt runs)
- `base(ident)`: the answer to `/v2/`, which is how clients log in
- `catalog(ident)`: `_catalog` (a listing filter, or a challenge)
- `decide(ident, question)`: a repository request, once its name and action are known
- `refuse(ident, action, name)`: what "not allowed" looks like (a login challenge, or 403)
- `bearer_challenge()`: challenge with the token flow's Bearer rather than Basic
- `issue_token(query, creds, peer)`: what `/token` answers (where `issues_tokens`)

The modes:
- none: everyone is anonymous; the policy says what anonymous may do.
- basic: htpasswd users with Basic credentials on every request. With a token issuer it also
  runs the token flow: `/token` is served, our Bearer tokens are accepted besides Basic, and
  while the policy gives anonymous callers anything the challenge is Bearer: docker refuses a
  Basic challenge it holds no credentials for, and containers/image clients answer one with
  empty credentials, so only the token flow lets every client pull anonymously.
- token: Docker's token flow; `/token` trades Basic credentials for a short-lived JWT whose
  scopes are what the policy allows, and each request needs a token with its scope.
- passthrough: the client's own ECR credentials go upstream; ECR decides who they are.
- webhook: an operator's service answers each (credentials, action, repository, tag).

The per-request fast paths (a remembered Basic login, a valid Bearer token) answer at once;
only bcrypt and webhook questions make a Deferred.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

from ecr_twisted.access.credentials import NO_CREDENTIALS, Credentials
from ecr_twisted.access.decision import (
    ANONYMOUS_IDENTITY,
    GO,
    PULL,
    PUSH,
    Decision,
    Identity,
    Peer,
    Question,
    challenge,
)
from ecr_twisted.access.htpasswd import Htpasswd
from ecr_twisted.access.policy import ANONYMOUS, FixedPolicy, Principal
from ecr_twisted.access.targets import NO_MOUNT, mount_source, plain_upload
from ecr_twisted.access.tokens import TokenIssuer
from ecr_twisted.access.webhook import (
    ALLOW,
    UNAUTHENTICATED,
    UNAVAILABLE,
    WebhookAuthorizer,
)
from ecr_twisted.registry import errors, routes

if TYPE_CHECKING:
    from ecr_twisted.access.gate import Gate

__all__ = [
    "AUTH_MODES", "AuthMode", "BasicAuth", "NoAuth", "PassthroughAuth", "TokenAnswer", "TokenAuth", "WebhookAuth",
]

TokenAnswer = Decision | bytes  # `/token`: a refusal, or the JSON body of a token


class AuthMode:
    """The interface every mode implements, with the defaults most of them share.

    A mode is built once by the gate, with the parts its `--auth` needs (it refuses to be built
    without them), and keeps a reference to the gate for what is common (policy, clock, throttle,
    metrics, name filters)."""

    name: ClassVar[str]
    malformed_error: ClassVar[str | None] = None  # the Bearer `error=` for an unreadable Authorization
    issues_tokens: bool = False  # `/token` is served

    def __init__(
        self, gate: Gate, htpasswd: Htpasswd | None, issuer: TokenIssuer | None, webhook: WebhookAuthorizer | None
    ) -> None:
        if issuer is not None:
            raise ValueError(f"--auth {self.name} issues no tokens")
        self.gate = gate

    def always_allows(self, policy: Any) -> bool:
        """Every request may go ahead unread (the gate adds: no name filters, not read-only)."""
        return False

    def identify(self, creds: Credentials, peer: Peer) -> Identity | Deferred[Identity]:
        """Who is asking. No credentials: anonymous; unreadable ones: a failed login; the rest is the mode's."""
        if creds.scheme == "none":
            return ANONYMOUS_IDENTITY
        if creds.scheme == "invalid":
            self.gate.count("failure")
            return Identity(ANONYMOUS, creds, failed=challenge(error=self.malformed_error))
        return self.identify_credentials(creds, peer)

    def identify_credentials(self, creds: Credentials, peer: Peer) -> Identity | Deferred[Identity]:
        """Basic or Bearer credentials, as this mode checks them."""
        raise NotImplementedError

    def base(self, ident: Identity) -> Decision | Deferred[Decision]:
        """`/v2/`: clients log in here (modes with credentials answer 401 until they are sent)."""
        raise NotImplementedError

    def catalog(self, ident: Identity) -> Decision | Deferred[Decision]:
        """`_catalog`: only repositories the caller may pull."""
        raise NotImplementedError

    def decide(self, ident: Identity, q: Question) -> Decision | Deferred[Decision]:
        """A request on a (visible) repository, with its action."""
        raise NotImplementedError

    def refuse(self, ident: Identity, action: str, name: str) -> Decision:
        """Not allowed: anonymous callers are asked to log in, known ones are denied."""
        if ident.who.anonymous:
            self.gate.denied(action)
            return challenge(name, action)
        return self.gate.deny(action)

    def bearer_challenge(self) -> bool:
        """Challenge with the token flow (Bearer) rather than Basic?"""
        return False

    def issue_token(self, query: bytes, creds: Credentials, peer: Peer) -> TokenAnswer | Deferred[TokenAnswer]:
        """`GET /token?service=..&scope=..` (only where `issues_tokens`)."""
        raise RuntimeError(f"--auth {self.name} serves no /token")


class NoAuth(AuthMode):
    """`--auth none`: nobody logs in (the Authorization header is not read); the policy decides."""

    name = "none"

    def always_allows(self, policy: Any) -> bool:
        # `--auth none` with the open policy (what --anonymous means)
        return isinstance(policy, FixedPolicy) and policy.policy.allows_everything()

    def identify(self, creds: Credentials, peer: Peer) -> Identity:
        return ANONYMOUS_IDENTITY

    def base(self, ident: Identity) -> Decision:
        return GO

    def catalog(self, ident: Identity) -> Decision:
        return self.gate.catalog_by_policy(ident)

    def decide(self, ident: Identity, q: Question) -> Decision:
        gate = self.gate
        policy = gate.policy.current()
        assert q.action is not None and q.name is not None
        if gate.allowed(ident, q, policy) is None:
            return self.refuse(ident, q.action, q.name)
        return gate.admit(ident, q, policy)

    def refuse(self, ident: Identity, action: str, name: str) -> Decision:
        return self.gate.deny(action)  # there is no login to ask for


class _PasswordMode(AuthMode):
    """What basic and token modes share: htpasswd logins (throttled), our tokens, `/token`."""

    def __init__(
        self, gate: Gate, htpasswd: Htpasswd | None, issuer: TokenIssuer | None, webhook: WebhookAuthorizer | None
    ) -> None:
        if htpasswd is None:
            raise ValueError(f"--auth {self.name} needs an htpasswd file")
        self.gate = gate
        self.htpasswd = htpasswd
        self.issuer = issuer
        self.issues_tokens = issuer is not None
        self._principals: dict[str, Principal] = {}  # per user: a frozen dataclass is costly to build per request

    def _principal(self, user: str) -> Principal:
        who = self._principals.get(user)
        if who is None:
            if len(self._principals) >= 4096:
                self._principals.clear()
            who = self._principals[user] = Principal(user)
        return who

    # -- logging in
    def login(self, creds: Credentials, peer: Peer) -> Identity | Deferred[Identity]:
        """Check Basic credentials against the htpasswd file, throttled per client address.

        The throttle comes first, even for credentials verified before: otherwise a throttled
        guesser would learn which guesses match a remembered password. Credentials verified
        before are answered at once: Basic clients send them with every request."""
        assert creds.user is not None and creds.secret is not None
        gate = self.gate
        now = gate.clock.seconds()
        addr = peer()
        wait = gate.throttle.wait(addr, now)
        if wait > 0:
            return Identity(ANONYMOUS, creds, failed=gate.throttled(wait))
        if self.htpasswd.known(creds.user, creds.secret):
            gate.count("success")
            return Identity(self._principal(creds.user), creds)
        return Deferred.fromCoroutine(self._check_password(creds, addr, now))

    async def _check_password(self, creds: Credentials, addr: str, now: float) -> Identity:
        """bcrypt (in a thread). The check counts as a failed login from the start, so guesses sent
        in parallel are counted before bcrypt runs; a success takes back only its own count."""
        assert creds.user is not None and creds.secret is not None
        gate, throttle = self.gate, self.gate.throttle
        counted = not self.htpasswd.pending(creds.user, creds.secret)  # else it joins a check already counted
        if counted:
            throttle.attempt(addr, now)
        result = self.htpasswd.verify(creds.user, creds.secret)
        ok = await result if isinstance(result, Deferred) else result
        if ok:
            gate.count("success")
            if counted:
                throttle.forgive(addr)
            return Identity(Principal(creds.user), creds)
        gate.count("failure")
        if counted:
            throttle.confirm(addr, gate.clock.seconds())
        return Identity(ANONYMOUS, creds, failed=challenge(detail="invalid username or password"))

    def bearer(self, creds: Credentials) -> Identity:
        """A token of ours: who it names and what it allows (a signature check, no Deferred)."""
        assert self.issuer is not None and creds.secret is not None
        gate = self.gate
        grant = self.issuer.verify(creds.secret, gate.clock.seconds())
        if grant is None:
            gate.count("failure")
            return Identity(ANONYMOUS, creds, failed=challenge(error="invalid_token"))
        gate.count("success")
        return Identity(Principal(grant.user) if grant.user else ANONYMOUS, creds, grant)

    # -- a request, once the policy allowed it
    def _scope_refusal(self, ident: Identity, q: Question, action: str) -> Decision | None:
        """A token must carry the request's scope as well (the policy was asked already)."""
        assert q.name is not None
        if ident.grant is None:
            return None
        if ident.grant.permits(q.name, action) or (q.blob_head and ident.grant.permits(q.name, PUSH)):
            return None
        return challenge(q.name, action, "insufficient_scope")

    def catalog(self, ident: Identity) -> Decision:
        return self.gate.catalog_by_policy(ident)

    # -- /token
    def issue_token(self, query: bytes, creds: Credentials, peer: Peer) -> TokenAnswer | Deferred[TokenAnswer]:
        """A token with what the policy grants of the asked scopes: anonymous without credentials,
        the user's after a Basic login (refused and counted like any failed login)."""
        if creds.scheme == "none":
            return self._token(Identity(ANONYMOUS, creds), query)
        if creds.scheme != "basic":
            self.gate.count("failure")
            return _token_refused()
        ident = self.login(creds, peer)
        if isinstance(ident, Deferred):
            return ident.addCallback(self._token, query)
        return self._token(ident, query)

    def _token(self, ident: Identity, query: bytes) -> TokenAnswer:
        if ident.failed is not None:
            return _token_refused(ident.failed)
        assert self.issuer is not None
        granted = self.gate.grantable(ident.who, query)
        now = self.gate.clock.seconds()
        token, ttl = self.issuer.issue(ident.who.user, sorted(granted.items()), now)
        issued = datetime.fromtimestamp(int(now), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"token": token, "access_token": token, "expires_in": ttl, "issued_at": issued}
        return json.dumps(body, separators=(",", ":")).encode("ascii")


def _token_refused(failed: Decision | None = None) -> Decision:
    """`/token` asks for the password again (Basic, realm `/token`), unless the caller is throttled."""
    if failed is not None and failed.error is errors.TOO_MANY_REQUESTS:
        return failed
    return Decision(errors.UNAUTHORIZED, "invalid username or password", challenge="basic-token")


class BasicAuth(_PasswordMode):
    """`--auth basic`: Basic credentials on every request (bcrypt once, then remembered); with an
    issuer, our Bearer tokens too and `/token` (the token flow, for clients without credentials)."""

    name = "basic"

    def identify_credentials(self, creds: Credentials, peer: Peer) -> Identity | Deferred[Identity]:
        if creds.scheme == "basic":
            return self.login(creds, peer)
        if creds.scheme == "bearer" and self.issuer is not None:
            return self.bearer(creds)
        return Identity(ANONYMOUS, NO_CREDENTIALS, failed=challenge())

    def base(self, ident: Identity) -> Decision:
        if ident.grant is not None or not ident.who.anonymous:
            return GO
        return challenge()

    def decide(self, ident: Identity, q: Question) -> Decision:
        gate = self.gate
        policy = gate.policy.current()
        assert q.action is not None and q.name is not None
        action = gate.allowed(ident, q, policy)
        if action is None:
            return self.refuse(ident, q.action, q.name)
        return self._scope_refusal(ident, q, action) or gate.admit(ident, q, policy)

    def bearer_challenge(self) -> bool:
        # while the policy lets anonymous callers do something; asked per challenge: the policy file may change
        return self.issuer is not None and self.gate.policy.current().anonymous_may_act


class TokenAuth(_PasswordMode):
    """`--auth token`: every request carries a token of ours with its scope; `/token` takes passwords."""

    name = "token"
    malformed_error = "invalid_token"

    def __init__(
        self, gate: Gate, htpasswd: Htpasswd | None, issuer: TokenIssuer | None, webhook: WebhookAuthorizer | None
    ) -> None:
        super().__init__(gate, htpasswd, issuer, webhook)
        if issuer is None:
            raise ValueError("--auth token needs a token issuer")

    def identify_credentials(self, creds: Credentials, peer: Peer) -> Identity:
        if creds.scheme == "bearer":
            return self.bearer(creds)
        return Identity(ANONYMOUS, NO_CREDENTIALS, failed=challenge())  # passwords go to /token only

    def base(self, ident: Identity) -> Decision:
        return GO if ident.grant is not None else challenge()

    def catalog(self, ident: Identity) -> Decision:
        if ident.creds.scheme == "none":
            return challenge()
        return self.gate.catalog_by_policy(ident)

    def decide(self, ident: Identity, q: Question) -> Decision:
        gate = self.gate
        policy = gate.policy.current()
        assert q.action is not None and q.name is not None
        action = gate.allowed(ident, q, policy)
        if action is None:
            return self.refuse(ident, q.action, q.name)
        if ident.grant is None:
            return challenge(q.name, action)  # the policy allows it: fetch a token for it
        return self._scope_refusal(ident, q, action) or gate.admit(ident, q, policy)

    def bearer_challenge(self) -> bool:
        return True


_AWS = Principal("AWS")  # every passthrough caller: ECR's only user name


class PassthroughAuth(AuthMode):
    """`--auth passthrough`: the client's own ECR credentials are forwarded; ECR checks them, the
    policy's repository rules still apply (to user `AWS`, authenticated)."""

    name = "passthrough"

    def identify_credentials(self, creds: Credentials, peer: Peer) -> Identity:
        return Identity(_AWS, creds)  # a claimed user name would mean nothing here

    def base(self, ident: Identity) -> Decision:
        if ident.creds.scheme == "none":
            return challenge()
        return self._forwarding(GO, ident)

    def catalog(self, ident: Identity) -> Decision:
        if ident.creds.scheme == "none":
            return challenge()
        return self._forwarding(self.gate.catalog_by_policy(ident), ident)

    def decide(self, ident: Identity, q: Question) -> Decision:
        if ident.creds.scheme == "none":
            return challenge()
        gate = self.gate
        policy = gate.policy.current()
        assert q.action is not None and q.name is not None
        if gate.allowed(ident, q, policy) is None:
            return self.refuse(ident, q.action, q.name)
        return self._forwarding(gate.admit(ident, q, policy), ident)

    @staticmethod
    def _forwarding(decision: Decision, ident: Identity) -> Decision:
        """The decision, carrying the client's Authorization for the upstream request."""
        if decision is GO:
            decision = Decision()
        decision.forward_auth = ident.creds.raw
        return decision


class WebhookAuth(AuthMode):
    """`--auth webhook`: the operator's service is the policy; each question is asked (or remembered)
    and an address whose credentials it keeps calling wrong is throttled like a failed login."""

    name = "webhook"
    _UNAVAILABLE = "the authorization service is unavailable"

    def __init__(
        self, gate: Gate, htpasswd: Htpasswd | None, issuer: TokenIssuer | None, webhook: WebhookAuthorizer | None
    ) -> None:
        super().__init__(gate, htpasswd, issuer, webhook)
        if webhook is None:
            raise ValueError("--auth webhook needs a webhook")
        self.webhook = webhook

    def identify_credentials(self, creds: Credentials, peer: Peer) -> Identity:
        gate = self.gate
        addr = peer()
        wait = gate.throttle.wait(addr, gate.clock.seconds())
        if wait > 0:  # wrong credentials are answered by the webhook; guessing is slowed here
            return Identity(ANONYMOUS, creds, failed=gate.throttled(wait))
        return Identity(Principal(creds.user) if creds.user else ANONYMOUS, creds, addr=addr)

    async def _ask(self, creds: Credentials, action: str, name: str, tag: str | None) -> str:
        verdict = self.webhook.decide(creds, action, name, tag)
        return await verdict if isinstance(verdict, Deferred) else verdict

    def _failed_login(self, ident: Identity) -> None:
        gate = self.gate
        gate.count("failure")
        if ident.addr is not None:
            gate.throttle.failed(ident.addr, gate.clock.seconds())

    def base(self, ident: Identity) -> Decision | Deferred[Decision]:
        if ident.creds.scheme == "none":
            return challenge()
        return Deferred.fromCoroutine(self._login(ident))

    async def _login(self, ident: Identity) -> Decision:
        """`/v2/` asks the webhook about action `login` (what `docker login` checks)."""
        verdict = await self._ask(ident.creds, "login", "", None)
        if verdict == ALLOW:
            self.gate.count("success")
            return GO
        if verdict == UNAVAILABLE:
            return Decision(errors.DENIED, self._UNAVAILABLE)
        self._failed_login(ident)
        return challenge()

    def catalog(self, ident: Identity) -> Decision:
        if ident.creds.scheme == "none":
            return challenge()
        decision = Decision()
        visible = self.gate.visible
        decision.listing = lambda names: Deferred.fromCoroutine(
            self._pullable(ident.creds, [n for n in names if visible(n)])
        )
        return decision

    async def _pullable(self, creds: Credentials, names: list[str]) -> list[str]:
        """The names the webhook lets these credentials pull: one (remembered) question each."""
        limit = DeferredSemaphore(8)  # a catalog page must not become a burst of POSTs
        verdicts = await gatherResults([limit.run(self.webhook.decide, creds, PULL, n, None) for n in names])
        return [n for n, v in zip(names, verdicts) if v == ALLOW]

    def decide(self, ident: Identity, q: Question) -> Deferred[Decision]:
        return Deferred.fromCoroutine(self._decide(ident, q))

    async def _decide(self, ident: Identity, q: Question) -> Decision:
        assert q.action is not None and q.name is not None
        gate = self.gate
        verdict = await self._ask(ident.creds, q.action, q.name, q.tag)
        if verdict == UNAVAILABLE:
            return gate.deny(q.action, self._UNAVAILABLE)
        if verdict == UNAUTHENTICATED:
            gate.denied(q.action)
            self._failed_login(ident)
            return challenge(detail="invalid username or password")
        if verdict != ALLOW:
            return self.refuse(ident, q.action, q.name)
        if q.kind != routes.UPLOAD or b"?" not in q.target:
            return GO
        # a mount reads `from=`: the webhook must let the caller pull that too, or it becomes a plain upload
        source = mount_source(q.target)
        if source is NO_MOUNT:
            return GO
        if source is None or not gate.visible(source):
            return plain_upload(q.target)
        return GO if await self._ask(ident.creds, PULL, source, None) == ALLOW else plain_upload(q.target)


AUTH_MODES: dict[str, type[AuthMode]] = {
    mode.name: mode for mode in (NoAuth, BasicAuth, TokenAuth, PassthroughAuth, WebhookAuth)
}
"""`--auth` name -> mode, in the order `--help` lists them."""
