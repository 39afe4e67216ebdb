"""`--auth webhook`: asking an operator's HTTP service who may do what.

Its own module because it owns an HTTP client, a cache of answers and the rule that a webhook
that cannot be asked means "deny". The question's JSON shape is documented in the README
("Who may do what"); answers are remembered under an HMAC of the whole question.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import secrets
from collections import OrderedDict
from typing import Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH

from ecr_twisted.access.credentials import Credentials

__all__ = ["ALLOW", "DENY", "UNAUTHENTICATED", "UNAVAILABLE", "WebhookAuthorizer", "http_post"]

log = Logger()

ALLOW, DENY, UNAUTHENTICATED, UNAVAILABLE = "allow", "deny", "unauthenticated", "unavailable"


class WebhookAuthorizer:
    """Asks an operator's HTTP service, caches its answers briefly, and denies when it cannot be asked.

    `post(body)` sends the JSON body and fires with (status, response body). The cache key is an
    HMAC over the whole question, so neither passwords nor tokens are kept in memory in clear."""

    def __init__(
        self,
        post: Callable[[bytes], Deferred[tuple[int, bytes]]],
        clock: Any,
        ttl: float = 60.0,
        on_error: Callable[[str], None] | None = None,
        size: int = 16384,
    ) -> None:
        self._post = post
        self.clock = clock
        self.ttl = ttl
        self._on_error = on_error
        self._size = size
        self._mac_key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._inflight: dict[bytes, list[Deferred[str]]] = {}

    def decide(self, creds: Credentials, action: str, repository: str, tag: str | None) -> str | Deferred[str]:
        """The verdict (ALLOW, DENY, UNAUTHENTICATED or UNAVAILABLE): now if remembered, else a Deferred."""
        question = {
            "user": creds.user,
            "password" if creds.scheme == "basic" else "token": creds.secret,
            "action": action,
            "repository": repository,
            "tag": tag,
        }
        body = json.dumps(question, separators=(",", ":"), sort_keys=True).encode()
        key = hmac.new(self._mac_key, body, hashlib.sha256).digest()
        now = self.clock.seconds()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[1] > now:
                return hit[0]
            del self._cache[key]
        waiting = self._inflight.get(key)
        d: Deferred[str] = Deferred()
        if waiting is not None:
            waiting.append(d)  # one webhook call per question, however many ask at once
            return d
        self._inflight[key] = [d]
        call = maybeDeferred(self._post, body)
        # _failed also catches a bug in _answered: no question may be left waiting
        call.addCallback(self._answered, key).addErrback(self._failed, key)
        return d

    def _answered(self, result: tuple[int, bytes], key: bytes) -> None:
        status, body = result
        verdict: str | None = None
        if status == 200:
            try:
                answer = json.loads(body)
            except (ValueError, RecursionError):
                answer = None
            if isinstance(answer, dict) and isinstance(answer.get("allow"), bool):
                if answer["allow"]:
                    verdict = ALLOW
                elif answer.get("authenticated") is False:
                    verdict = UNAUTHENTICATED
                else:
                    verdict = DENY
        if verdict is None:
            return self._settle(key, UNAVAILABLE, f"webhook answered status {status} without a usable verdict")
        self._cache[key] = (verdict, self.clock.seconds() + self.ttl)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        self._settle(key, verdict, None)

    def _failed(self, reason: Failure, key: bytes) -> None:
        self._settle(key, UNAVAILABLE, f"webhook unreachable: {reason.getErrorMessage()}")

    def _settle(self, key: bytes, verdict: str, problem: str | None) -> None:
        if problem is not None:
            log.error("authorization webhook failed, denying: {problem}", problem=problem)
            if self._on_error is not None:
                self._on_error(problem)
        for d in self._inflight.pop(key, []):
            d.callback(verdict)


def http_post(
    agent: Any, reactor: Any, url: str, timeout: float, max_body: int = 65536
) -> Callable[[bytes], Deferred[tuple[int, bytes]]]:
    """A `post` for WebhookAuthorizer over a Twisted Agent, with a deadline and a bounded answer."""
    from twisted.web.client import FileBodyProducer, readBody
    from twisted.web.http_headers import Headers

    headers = Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"ecr-twisted"]})
    target = url.encode("ascii")

    def got(response: Any) -> Deferred[tuple[int, bytes]]:
        if response.length not in (None, UNKNOWN_LENGTH) and response.length > max_body:
            response.deliverBody(_Discard())
            return succeed((502, b""))
        return readBody(response).addCallback(lambda data: (response.code, data))

    def post(body: bytes) -> Deferred[tuple[int, bytes]]:
        d = agent.request(b"POST", target, headers, FileBodyProducer(io.BytesIO(body)))
        d.addCallback(got)
        d.addTimeout(timeout, reactor)
        return d

    return post


class _Discard(Protocol):
    """Takes an answer too big to read: stops the transfer instead of buffering it."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.stopProducing()
