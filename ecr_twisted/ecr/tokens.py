"""The ECR token: fetched through botocore in a short-lived child process, refreshed long before it expires.

The proxy cannot forward a request upstream without a valid token, and the token lives 12
hours: the keeper refreshes it half-way, backs off on failures, and lets requests that hit
a refused token share one forced refresh. The schedule is plain arithmetic on `now`
(testable without a reactor); the keeper runs it from a `LoopingCall` whose tick catches
everything, so one failure never stops refreshing.
"""

from __future__ import annotations

import base64
import json
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ecr_twisted.ecr.child import ChildFailed, EcrChild
from ecr_twisted.upstreams.spec import DEFAULT_NAME, ECR, UpstreamSpec, implicit

__all__ = [
    "READY_MARGIN",
    "NoTokens",
    "ProcessTokenFetcher",
    "StaticTokens",
    "Token",
    "TokenFetchError",
    "TokenFetcher",
    "TokenKeeper",
    "backoff",
    "keeper_for",
    "parse_authorization_data",
    "refresh_due",
]

READY_MARGIN = 300.0  # /readyz wants a token valid for at least this long


@dataclass(frozen=True)
class Token:
    """One GetAuthorizationToken answer (or a registry's static credentials). Never printed:
    `repr` hides the secret.

    `header` is the Authorization value to send upstream; b"" (from an empty `authorization`)
    means send no Authorization at all: an anonymous registry (see `StaticTokens`)."""

    authorization: str = field(repr=False)  # base64("AWS:<password>"), as ECR returns it; "": none
    expires_at: float
    endpoint: str
    fetched_at: float
    header: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        header = b"Basic " + self.authorization.encode("ascii") if self.authorization else b""
        object.__setattr__(self, "header", header)

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.fetched_at

    def usable(self, now: float) -> bool:
        # A token whose expiry was already past when it arrived (clock skew, or moto's
        # fixed 2015 date) is used until replaced: the upstream is the judge of it.
        return now < self.expires_at or self.lifetime <= 0


def refresh_due(token: Token, fraction: float, min_interval: float) -> float:
    """When to fetch the next token: after `fraction` of its lifetime, never sooner than `min_interval`."""
    return token.fetched_at + max(min_interval, token.lifetime * fraction)


def backoff(failures: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Capped exponential backoff with jitter (half fixed, half random) after `failures` failures."""
    step = min(cap, base * (2 ** max(0, failures - 1)))
    return step / 2 + rand() * step / 2


def parse_authorization_data(data: dict[str, Any], now: float) -> Token:
    """Turn one `authorizationData` entry into a Token, checking what it holds."""
    raw = str(data["authorizationToken"]).strip()
    try:
        user, _, password = base64.b64decode(raw, validate=True).decode("utf-8").partition(":")
    except Exception:
        raise ValueError("authorizationToken is not base64 of user:password") from None
    if not user or not password:
        raise ValueError("authorizationToken is not base64 of user:password")
    expires: Any = data.get("expiresAt")
    expires_at = expires.timestamp() if hasattr(expires, "timestamp") else float(expires)
    endpoint = str(data.get("proxyEndpoint") or "").strip()
    return Token(authorization=raw, expires_at=expires_at, endpoint=endpoint, fetched_at=now)


class TokenFetcher(Protocol):
    """Where tokens come from: ProcessTokenFetcher, or a test's fake."""

    def fetch(self) -> Deferred[Token]: ...


class TokenFetchError(ChildFailed):
    """GetAuthorizationToken failed; the message is the child's one-line reason, `code` AWS's error code."""


class ProcessTokenFetcher:
    """Calls ecr:GetAuthorizationToken in a short-lived child process (`python -m ecr_twisted.ecr.fetch_token`).

    botocore blocks, so it must not run on the reactor; in a child it also costs the
    long-lived proxy no memory between calls (about 15 MiB otherwise), and no threads.
    Credentials come from botocore's own chain through the inherited environment, a named
    profile or an assumed role (`for_upstream`); never from the command line.
    """

    def __init__(
        self,
        reactor: Any,
        region: str | None,
        registry_id: str | None = None,
        endpoint_url: str | None = None,
        timeout: float = 60.0,
        python: str = sys.executable,
        *,
        spec: UpstreamSpec | None = None,
        proxy_env: Mapping[str, str] = {},  # noqa: B006 (read only)
    ) -> None:
        """`region`, `registry_id`, `endpoint_url`: the one implicit upstream's, when no `spec` is given."""
        if spec is None:
            spec = implicit(registry_id, region, None, endpoint_url)
        self._reactor = reactor
        self.child = EcrChild(reactor, "ecr_twisted.ecr.fetch_token", spec, TokenFetchError, "token fetcher",
                              proxy_env=proxy_env, timeout=timeout, python=python)

    @classmethod
    def for_upstream(
        cls,
        reactor: Any,
        spec: UpstreamSpec,
        proxy_env: Mapping[str, str] = {},  # noqa: B006 (read only)
        timeout: float = 60.0,
        python: str = sys.executable,
    ) -> ProcessTokenFetcher:
        """The fetcher of one ECR upstream: its account, region, credentials (default chain, profile
        or role) and endpoints; `proxy_env` (HTTPS_PROXY, ...) goes into the child's environment."""
        return cls(reactor, None, timeout=timeout, python=python, spec=spec, proxy_env=proxy_env)

    def fetch(self) -> Deferred[Token]:
        return self.child.run().addCallback(self._parse)

    def _parse(self, out: bytes) -> Token:
        try:
            data = json.loads(out)
        except ValueError:
            raise TokenFetchError("token fetcher printed no JSON") from None
        return parse_authorization_data(data, self._reactor.seconds())


class TokenKeeper:
    """Holds the current token and keeps it fresh (see the module docstring)."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        fetcher: TokenFetcher,
        *,
        on_result: Callable[[str, Token | None], None] = lambda result, token: None,
        fraction: float = 0.5,
        min_interval: float = 60.0,
        backoff_base: float = 2.0,
        backoff_cap: float = 300.0,
        tick: float = 1.0,
        forced_interval: float = 10.0,
        rand: Callable[[], float] = random.random,
        name: str = DEFAULT_NAME,
    ) -> None:
        self.name = name  # the upstream's, in log lines (those of the one implicit upstream stay as they were)
        self._where = "" if name == DEFAULT_NAME else f" (upstream {name})"
        self._clock = clock
        self._fetcher = fetcher
        self._on_result = on_result
        self._fraction = fraction
        self._min_interval = min_interval
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._tick = tick
        self._forced_interval = forced_interval
        self._last_forced = float("-inf")
        self._rand = rand
        self.current: Token | None = None
        self.failures = 0
        self.next_attempt = 0.0
        self._inflight: Deferred[Token | None] | None = None
        self._waiters: list[Deferred[Token | None]] = []
        self._first: list[Deferred[Token]] = []
        self._loop = LoopingCall(self._check)
        self._loop.clock = clock

    # -- lifecycle
    def start(self) -> Deferred[Any]:
        return self._loop.start(self._tick, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    # -- queries
    def token_for_request(self) -> Token | None:
        token = self.current
        if token is not None and token.usable(self._clock.seconds()):
            return token
        return None

    def expired(self) -> bool:
        """A token was held and has expired (no fresh one could be fetched in time): not the
        same as holding none yet, and clients and operators are told which."""
        token = self.current
        return token is not None and not token.usable(self._clock.seconds())

    def wait_for_token(self, timeout: float) -> Deferred[Token | None] | None:
        """A request found no usable token: if a fetch is under way (the first one, at start-up),
        a Deferred that fires with the token it brings, or None when it fails or `timeout`
        passes first. None when nothing is being fetched: the caller answers 503 at once.

        Clients started together with the proxy (a CI job, a pod and its sidecar) would
        otherwise be refused for the half second the first fetch takes."""
        if self._inflight is None:
            return None
        waiters = self._waiters

        def gone(d: Deferred[Token | None]) -> None:
            # cancelled (the timeout below): it must not be fired again by _settle
            if d in waiters:
                waiters.remove(d)

        d: Deferred[Token | None] = Deferred(gone)
        waiters.append(d)
        d.addTimeout(timeout, self._clock, onTimeoutCancel=lambda result, timeout: None)
        return d

    def ready(self, now: float | None = None) -> bool:
        token = self.current
        if token is None:
            return False
        now = self._clock.seconds() if now is None else now
        return token.expires_at - now >= READY_MARGIN

    # -- refreshing
    def _check(self) -> None:
        try:
            if self._inflight is None and self._clock.seconds() >= self.next_attempt:
                self._refresh()
        except Exception:
            self.log.failure("token refresh check failed{where}", where=self._where, upstream=self.name)

    def force_refresh(self, stale: Token | None) -> Deferred[Token | None]:
        """Refresh now because `stale` was refused upstream; concurrent callers share one call.

        Answers the token to retry with: another one than `stale` if there is one, else
        `stale` itself or None, meaning "no fresher token; do not retry". A 403 that has
        nothing to do with the token (an IAM deny) must not turn every request into an
        API call: forced fetches happen at most once per `forced_interval` and never
        while backing off from failures.
        """
        if self.current is not None and self.current is not stale:
            return succeed(self.current)
        d: Deferred[Token | None] = Deferred()
        if self._inflight is not None:
            self._waiters.append(d)
            return d
        now = self._clock.seconds()
        if now - self._last_forced < self._forced_interval or (self.failures and now < self.next_attempt):
            return succeed(self.current)
        self._last_forced = now
        self._waiters.append(d)
        self._refresh()
        return d

    def _refresh(self) -> None:
        d = self._inflight = Deferred()
        try:
            fetched = self._fetcher.fetch()
        except Exception:
            fetched = Deferred()
            fetched.errback(Failure())
        fetched.addCallbacks(self._fetched, self._failed)
        fetched.addErrback(self._bug)
        fetched.addBoth(self._settle, d)

    def first_token(self) -> Deferred[Token]:
        """Fires once a token is held (at once if one is): a worker listens only then."""
        if self.current is not None:
            return succeed(self.current)
        d: Deferred[Token] = Deferred()
        self._first.append(d)
        return d

    def _fetched(self, token: Token) -> Token:
        self.current = token
        first, self._first = self._first, []
        for d in first:
            d.callback(token)
        self.failures = 0
        self.next_attempt = refresh_due(token, self._fraction, self._min_interval)
        self._on_result("success", token)
        self.log.info(
            "ECR token refreshed{where}; expires in {hours:.1f} h, next refresh in {next:.0f} s",
            where=self._where,
            upstream=self.name,
            hours=token.lifetime / 3600,
            next=self.next_attempt - self._clock.seconds(),
        )
        return token

    def _failed(self, reason: Failure) -> None:
        self.failures += 1
        delay = backoff(self.failures, self._backoff_base, self._backoff_cap, self._rand)
        self.next_attempt = self._clock.seconds() + delay
        self._on_result("failure", None)
        # the message of a botocore error names the operation, never the credentials
        self.log.warn(
            "ECR token refresh failed{where} ({kind}: {msg}); attempt {n}, retrying in {delay:.1f} s",
            where=self._where,
            upstream=self.name,
            kind=reason.type.__name__ if reason.type is not None else "Error",
            msg=reason.getErrorMessage(),
            n=self.failures,
            delay=delay,
        )
        return None

    def _bug(self, reason: Failure) -> None:
        self.log.failure("token bookkeeping failed{where}", reason, where=self._where, upstream=self.name)
        return None

    def _settle(self, result: Any, d: Deferred[Token | None]) -> None:
        self._inflight = None
        waiters, self._waiters = self._waiters, []
        current = self.current
        for w in waiters:
            w.callback(current if isinstance(result, Token) else None)
        d.callback(None)


class NoTokens:
    """The keeper of `--auth passthrough`: clients bring their own ECR credentials, so there
    is no token to fetch and nothing to wait for."""

    def start(self) -> Deferred[Any]:
        return succeed(None)

    def stop(self) -> None:
        pass

    def ready(self, now: float | None = None) -> bool:
        return True

    def first_token(self) -> Deferred[Any]:
        return succeed(None)


class StaticTokens(NoTokens):  # start, stop, ready: nothing to fetch, as NoTokens
    """The keeper of a registry that is not ECR (`kind = "registry"`): the same interface the
    handler uses on TokenKeeper, with one token that never changes and never expires.

    `credentials = "static"`: the token's header is `Basic base64(username:password)`.
    `credentials = "none"`: the token's `header` is b"" and means *send no Authorization*; the
    handler must test `token.header`, not only `token is not None` (None still means "no token
    yet", answered 503). `credentials = "default"` (the field's default) means static with a
    username, else none. The endpoint is the upstream's `url`. Always ready: there is nothing
    to wait for; a refused token is not refreshed (`force_refresh` answers the same one, so the
    handler does not retry). `repr`/`str` never show the password.
    """

    def __init__(self, spec: UpstreamSpec) -> None:
        if not spec.url:
            raise ValueError(f"upstream {spec.name}: a registry upstream needs a url")
        authorization = ""
        credentials = spec.credentials
        if credentials == "default":  # the field's default: a registry's is its username, if any
            credentials = "static" if spec.username else "none"
        if credentials == "static":
            if not spec.username or spec.password is None:
                raise ValueError(f"upstream {spec.name}: credentials = static needs a username and a password")
            if ":" in spec.username:
                raise ValueError(f"upstream {spec.name}: a username must not contain ':'")
            authorization = base64.b64encode(f"{spec.username}:{spec.password}".encode("utf-8")).decode("ascii")
        elif credentials != "none":
            raise ValueError(f"upstream {spec.name}: credentials = {spec.credentials} is for ECR registries")
        self.name = spec.name
        self.username = spec.username if authorization else None
        self.current = Token(authorization=authorization, expires_at=float("inf"), endpoint=spec.url, fetched_at=0.0)

    def __repr__(self) -> str:
        who = f"user {self.username!r}" if self.username else "anonymous"
        return f"<StaticTokens {self.name!r} {self.current.endpoint} {who}>"

    __str__ = __repr__

    def first_token(self) -> Deferred[Token]:
        return succeed(self.current)

    def token_for_request(self) -> Token:
        return self.current

    def wait_for_token(self, timeout: float) -> Deferred[Token | None] | None:
        return None  # never asked: there always is a token

    def expired(self) -> bool:
        return False

    def force_refresh(self, stale: Token | None) -> Deferred[Token | None]:
        return succeed(self.current)  # no other credentials to try: the refusal stands


def keeper_for(
    reactor: Any,
    spec: UpstreamSpec,
    *,
    proxy_env: Mapping[str, str] = {},  # noqa: B006 (read only)
    on_result: Callable[[str, Token | None], None] = lambda result, token: None,
    fetcher: TokenFetcher | None = None,
) -> TokenKeeper | StaticTokens:
    """The keeper of one upstream: a TokenKeeper named after it for ECR (`fetcher` for tests),
    StaticTokens for any other registry."""
    if spec.kind != ECR:
        return StaticTokens(spec)
    if fetcher is None:
        fetcher = ProcessTokenFetcher.for_upstream(reactor, spec, proxy_env)
    return TokenKeeper(reactor, fetcher, on_result=on_result, name=spec.name)
