"""The repositories of an ECR registry, for `_catalog`: listed by a child process, cached for a short TTL.

ECR answers 405 to `GET /v2/_catalog`, so the proxy asks the ECR API (DescribeRepositories)
instead, off the reactor in `python -m ecr_twisted.ecr.list_repositories`. A catalog is read
in bursts (a UI, `crane catalog` paging with `n`/`last`), so the listing is kept `ttl` seconds
and concurrent callers share one call. When a refresh fails the last good listing is served
(stale) for up to `STALE_FACTOR * ttl`; a caller whose principal lacks
`ecr:DescribeRepositories` is told so (`CatalogDenied`) rather than shown an old listing.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Mapping, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ecr_twisted.ecr.child import ChildFailed, EcrChild
from ecr_twisted.upstreams.spec import UpstreamSpec

__all__ = [
    "DENIED_CODES",
    "STALE_FACTOR",
    "CatalogDenied",
    "CatalogError",
    "CatalogUnavailable",
    "Lister",
    "ListingError",
    "RepositoryCache",
    "RepositoryLister",
    "catalog_error",
]

DENIED_CODES = frozenset({"AccessDeniedException", "AccessDenied", "UnauthorizedOperation"})
STALE_FACTOR = 10  # a stale listing is served for up to this many TTLs after it was fetched


class ListingError(ChildFailed):
    """DescribeRepositories failed: the child's one-line reason and AWS's error code."""


class CatalogError(Exception):
    """No listing of `upstream` to serve; `message` is safe to show (it names no credentials)."""

    def __init__(self, upstream: str, message: str) -> None:
        super().__init__(f"upstream {upstream}: {message}")
        self.upstream = upstream
        self.message = message


class CatalogDenied(CatalogError):
    """The proxy's AWS principal may not call ecr:DescribeRepositories on this registry."""


class CatalogUnavailable(CatalogError):
    """The listing failed for any other reason (network, throttling, timeout, a bad answer)."""


def catalog_error(upstream: str, reason: BaseException) -> CatalogError:
    """What a failed listing means to a caller: denied (by AWS's error code) or unavailable."""
    if isinstance(reason, CatalogError):
        return reason
    code = getattr(reason, "code", None)
    message = str(reason) or type(reason).__name__
    if code in DENIED_CODES:
        return CatalogDenied(upstream, message)
    return CatalogUnavailable(upstream, message)


class Lister(Protocol):
    """Where listings come from: RepositoryLister, or a test's fake."""

    name: str

    def fetch(self) -> Deferred[list[str]]: ...


class RepositoryLister:
    """Runs DescribeRepositories (all pages) for one ECR upstream in a short-lived child process
    (`EcrChild`: the upstream's credentials, `proxy_env`), as `ProcessTokenFetcher` runs its token's."""

    def __init__(
        self,
        reactor: Any,
        spec: UpstreamSpec,
        proxy_env: Mapping[str, str] = {},  # noqa: B006 (read only)
        timeout: float = 60.0,
        python: str = sys.executable,
        page_size: int | None = None,
    ) -> None:
        self.name = spec.name
        extra = ["--page-size", str(page_size)] if page_size else []
        self.child = EcrChild(reactor, "ecr_twisted.ecr.list_repositories", spec, ListingError, "repository lister",
                              extra=extra, proxy_env=proxy_env, timeout=timeout, python=python)

    def fetch(self) -> Deferred[list[str]]:
        return self.child.run().addCallback(self._parse)

    @staticmethod
    def _parse(out: bytes) -> list[str]:
        try:
            names = json.loads(out)
        except ValueError:
            raise ListingError("repository lister printed no JSON") from None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ListingError("repository lister printed no list of names")
        return names


class RepositoryCache:
    """One upstream's repository names, reused for `ttl` seconds, one call shared by concurrent callers.

    `names()` fires with the listing, or fails with CatalogDenied / CatalogUnavailable. After a
    failed refresh the last good listing is served while younger than `STALE_FACTOR * ttl`
    (logged once per run of failures), except when AWS denies the call: that is a
    configuration to fix, shown at once. A failure is itself reused for `retry_after` seconds
    (at most `ttl`), so a catalog read in a burst does not start a child per page.
    """

    log = Logger()

    def __init__(self, lister: Lister, clock: Any, ttl: float, retry_after: float = 5.0) -> None:
        self.lister = lister
        self.upstream = lister.name
        self._clock = clock
        self._ttl = ttl
        self._retry_after = min(retry_after, ttl)
        self._good: list[str] | None = None
        self._good_at = float("-inf")
        self._failed: CatalogError | None = None
        self._failed_at = float("-inf")
        self._serving_stale = False
        self._failing = False  # a failure has been logged and no listing has worked since
        self._waiters: list[Deferred[list[str]]] | None = None  # not None: a call is under way

    def names(self) -> Deferred[list[str]]:
        now = self._clock.seconds()
        if self._good is not None and now - self._good_at < self._ttl:
            return succeed(list(self._good))
        if self._failed is not None and now - self._failed_at < self._retry_after:
            return self._after_failure(self._failed, now)
        d: Deferred[list[str]] = Deferred()
        if self._waiters is not None:
            self._waiters.append(d)
            return d
        self._waiters = [d]
        try:
            listed = self.lister.fetch()
        except Exception:
            listed = fail(Failure())
        listed.addCallbacks(self._listed, self._not_listed)
        return d

    def _listed(self, names: list[str]) -> None:
        now = self._clock.seconds()
        self._good, self._good_at = list(names), now
        self._failed = None
        if self._serving_stale or self._failing:
            self._serving_stale = self._failing = False
            self.log.info("repository listing of upstream {upstream} works again", upstream=self.upstream)
        self._settle(lambda d: d.callback(list(names)))

    def _not_listed(self, reason: Failure) -> None:
        now = self._clock.seconds()
        error = catalog_error(self.upstream, reason.value or Exception(reason.getErrorMessage()))
        self._failed, self._failed_at = error, now
        if not self._failing and self._stale(error, now) is None:
            # once per run of failures: AWS's own words are for the operator (clients get a fixed text)
            self._failing = True
            self.log.warn(
                "repository listing of upstream {upstream} failed: {message}", upstream=self.upstream,
                message=error.message,
            )
        self._settle(lambda d: self._answer_failure(d, error, now))

    def _settle(self, fire: Any) -> None:
        waiters, self._waiters = self._waiters or [], None
        for d in waiters:
            fire(d)

    def _answer_failure(self, d: Deferred[list[str]], error: CatalogError, now: float) -> None:
        stale = self._stale(error, now)
        if stale is not None:
            d.callback(stale)
        else:
            d.errback(Failure(error))

    def _after_failure(self, error: CatalogError, now: float) -> Deferred[list[str]]:
        stale = self._stale(error, now)
        return succeed(stale) if stale is not None else fail(error)

    def _stale(self, error: CatalogError, now: float) -> list[str] | None:
        """The last good listing if it may stand in for a failed refresh (logging the first time)."""
        if isinstance(error, CatalogDenied) or self._good is None:
            return None
        if now - self._good_at > STALE_FACTOR * self._ttl:
            return None
        if not self._serving_stale:
            self._serving_stale = True
            self.log.warn(
                "repository listing of upstream {upstream} failed ({message}); serving the one of {age:.0f} s ago",
                upstream=self.upstream,
                message=error.message,
                age=now - self._good_at,
            )
        return list(self._good)
