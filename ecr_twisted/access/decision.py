"""The gate's vocabulary: what it answers (`Decision`) and what it decides on (`Question`, `Identity`).

Shared by the gate (gate.py) and the auth modes (modes.py), so that neither has to import
the other for it. The handler imports `Decision` and `GO` from gate.py, which re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, final

from twisted.internet.defer import Deferred

from ecr_twisted.access.credentials import NO_CREDENTIALS, Credentials
from ecr_twisted.access.policy import ANONYMOUS, Principal
from ecr_twisted.access.tokens import Grant
from ecr_twisted.registry import errors, routes
from ecr_twisted.registry.errors import RegistryError

__all__ = [
    "ANONYMOUS_IDENTITY",
    "DELETE",
    "GO",
    "PULL",
    "PUSH",
    "Decision",
    "Identity",
    "Listing",
    "Peer",
    "Question",
    "challenge",
]

PULL, PUSH, DELETE = "pull", "push", "delete"

Listing = Callable[[list[str]], "list[str] | Deferred[list[str]]"]
"""Keeps the names of a tags/list or _catalog page the caller may see (now, or later)."""

Peer = Callable[[], str]
"""The client's address, asked for only when a login needs throttling."""


@final  # the handler tells a Decision from a Deferred by `type(x) is Decision`
class Decision:
    """The gate's answer. `error` None means: forward the request."""

    __slots__ = ("challenge", "detail", "error", "forward_auth", "listing", "reason", "retry_after", "target", "user")

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
        # for the access log (set by the gate): who was identified (or claimed to be, on a failed
        # login); None is anonymous. `reason`: why a login failed.
        self.user: str | None = None
        self.reason: str | None = None

    @property
    def challenge_error(self) -> str | None:
        """The Bearer `error=` of the challenge (`invalid_token`, ...), if any."""
        if self.challenge is None:
            return None
        return self.challenge.partition("|")[2] or None


GO = Decision()  # shared: never mutated


def challenge(name: str | None = None, action: str | None = None, error: str | None = None,
              detail: str | None = None) -> Decision:
    """401 with this mode's challenge, for `scope` (name and action) and Bearer `error=` if given."""
    scope = f"repository:{name}:{action}" if name and action else ""
    return Decision(errors.UNAUTHORIZED, detail, challenge=f"{scope}|{error or ''}")


@dataclass(slots=True)
class Question:
    """One registry request as the gate sees it (built per request: not frozen, whose __init__ sets
    each field through object.__setattr__, measured ~0.8 µs more; nothing writes to one)."""

    method: bytes
    kind: str  # the route kind (routes.MANIFEST, ...)
    action: str | None  # PULL, PUSH or DELETE; None for `/v2/` and `_catalog`
    name: str | None  # the repository
    tag: str | None  # the manifest reference when it is a tag
    target: bytes  # path and query as sent

    @property
    def blob_head(self) -> bool:
        """A blob HEAD: pushers ask it to see which layers exist (it shows no content)."""
        return self.kind == routes.BLOB and self.method == b"HEAD"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking, as far as the mode could tell."""

    who: Principal
    creds: Credentials
    grant: Grant | None = None  # a token of ours: what it allows
    failed: Decision | None = None  # credentials were presented and refused
    addr: str | None = None  # webhook mode: the client's address, for the login throttle


ANONYMOUS_IDENTITY = Identity(ANONYMOUS, NO_CREDENTIALS)  # shared: never mutated
