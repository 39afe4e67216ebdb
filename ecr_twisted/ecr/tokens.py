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
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "READY_MARGIN",
    "NoTokens",
    "ProcessTokenFetcher",
    "Token",
    "TokenFetchError",
    "TokenFetcher",
    "TokenKeeper",
    "backoff",
    "parse_authorization_data",
    "refresh_due",
]

READY_MARGIN = 300.0  # /readyz wants a token valid for at least this long


@dataclass(frozen=True)
class Token:
    """One GetAuthorizationToken answer. Never printed: `repr` hides the secret."""

    authorization: str = field(repr=False)  # base64("AWS:<password>"), as ECR returns it
    expires_at: float
    endpoint: str
    fetched_at: float
    header: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header", b"Basic " + self.authorization.encode("ascii"))

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


class TokenFetchError(Exception):
    """GetAuthorizationToken failed; the message is the child's one-line reason."""


class _FetchProcess(ProcessProtocol):
    def __init__(self, d: Deferred[bytes]) -> None:
        self.d = d
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        if self.d.called:
            return
        if reason.check(ProcessDone):
            self.d.callback(b"".join(self.out))
        else:
            lines = b"".join(self.err).decode("utf-8", "replace").strip().splitlines()
            self.d.errback(TokenFetchError(lines[-1] if lines else f"token fetcher failed: {reason.value}"))


class ProcessTokenFetcher:
    """Calls ecr:GetAuthorizationToken in a short-lived child process.

    botocore blocks, so it must not run on the reactor; in a child it also costs the
    long-lived proxy no memory between calls (about 15 MiB otherwise), and no threads.
    Credentials come from botocore's own chain through the inherited environment.
    """

    def __init__(
        self,
        reactor: Any,
        region: str | None,
        registry_id: str | None = None,
        endpoint_url: str | None = None,
        timeout: float = 60.0,
        python: str = sys.executable,
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._python = python
        self._args = [python, "-m", "ecr_twisted.ecr.fetch_token"]
        if region:
            self._args += ["--region", region]
        if registry_id:
            self._args += ["--registry-id", registry_id]
        if endpoint_url:
            self._args += ["--endpoint-url", endpoint_url]

    def fetch(self) -> Deferred[Token]:
        d: Deferred[bytes] = Deferred()
        proto = _FetchProcess(d)
        process = self._reactor.spawnProcess(proto, self._python, self._args, env=dict(os.environ))

        def timed_out(result: Any, timeout: float) -> Failure:
            try:
                process.signalProcess("KILL")
            except Exception:
                pass
            return Failure(TokenFetchError(f"token fetcher gave no answer in {timeout:.0f} s"))

        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=timed_out)
        return d.addCallback(self._parse)

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
    ) -> None:
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
            self.log.failure("token refresh check failed")

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
            "ECR token refreshed; expires in {hours:.1f} h, next refresh in {next:.0f} s",
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
            "ECR token refresh failed ({kind}: {msg}); attempt {n}, retrying in {delay:.1f} s",
            kind=reason.type.__name__ if reason.type is not None else "Error",
            msg=reason.getErrorMessage(),
            n=self.failures,
            delay=delay,
        )
        return None

    def _bug(self, reason: Failure) -> None:
        self.log.failure("token bookkeeping failed", reason)
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
