"""What the layer cache answers about a request, as values the handler carries out.

The cache never sends anything upstream and never writes to a client: `LayerCache.lookup`
says what should happen to a request (a `Plan`), the handler does it, and hands what the
upstream answered back to the cache, which answers with the next plan. So the cache can be
read, and tested, without the handler, and the handler alone talks to the upstream.

    Serve    answer from this file (possibly still being filled), with these fields
    Fail     answer with this registry error
    Forward  send the request upstream (perhaps as a HEAD); `op` says what its answer means
    Wait     the answer comes later (a fill to join, a stored file being verified)
    DONE     nothing more to do: the client left while the cache waited

and for an upstream answer to a `Forward` (`LayerCache.answered`), besides any plan:

    RELAY    pass the answer to the client as it is
    Read     read the body whole and give it to `LayerCache.store_manifest`
    Tee      send the body into this fill, then `LayerCache.filling` says how the client reads it

Plans are immutable; the handler keeps the current one in its own per-request state, and the
cache reads back from a plan (the repository, digest, tag and tries it was made for) what it
needs to go on. `source` ("cache", "upstream" or None) says where a cacheable request's bytes
came from: the `X-Cache` header, the bytes counters and the access log's `cache=`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final

from ecr_twisted.registry.errors import RegistryError
from ecr_twisted.registry.routes import Match

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from ecr_twisted.cache.store import Fill
    from ecr_twisted.cache.tags import TagKey

__all__ = [
    "Fields", "HIT", "MISS", "CACHE", "UPSTREAM",
    "PLAIN", "FILL", "PROBE", "MANIFEST", "REVALIDATE", "WRITE",
    "Forward", "Serve", "Fail", "Wait", "Done", "DONE", "Plan",
    "Relay", "RELAY", "Read", "Tee", "Next",
]

Fields = list[tuple[bytes, bytes]]

HIT: Final = (b"X-Cache", b"HIT")
MISS: Final = (b"X-Cache", b"MISS")

# sources
CACHE: Final = "cache"
UPSTREAM: Final = "upstream"

# what an upstream answer to a Forward means to the cache
PLAIN: Final = "plain"  # nothing: the answer goes to the client as it is
FILL: Final = "fill"  # blob GET miss: store the body while serving it
PROBE: Final = "probe"  # HEAD upstream: does this repository hold a digest we have?
MANIFEST: Final = "manifest"  # manifest GET miss: read it, store it, answer it
REVALIDATE: Final = "revalidate"  # HEAD upstream: is this tag still that digest?
WRITE: Final = "write"  # manifest PUT/DELETE, blob DELETE: once accepted, take back what it changed


@dataclass(frozen=True, slots=True, eq=False)
class Forward:
    """Send the client's request upstream (`method` instead of its own, if set)."""

    op: str
    match: Match
    source: str | None = UPSTREAM
    method: bytes | None = None
    tries: int = 0  # looks at the store so far (a file found gone or corrupt is looked for again)
    digest: str | None = None  # what is probed, filled or stored
    kind: str = "blob"  # the counters' label: "blob" or "manifest"
    tag: TagKey | None = None  # a manifest by tag


@dataclass(frozen=True, slots=True, eq=False)
class Serve:
    """Answer with `length` bytes of the open file `fd` from `first` (the handler takes `fd` over)."""

    op: ClassVar[str] = "serve"
    method: ClassVar[None] = None  # (every plan has op, method and source)
    status: int
    fields: Fields
    fd: int
    first: int
    length: int
    size: int
    fill: Fill | None = None  # the file is still being written
    source: str = CACHE


@dataclass(frozen=True, slots=True, eq=False)
class Fail:
    """Answer with a registry error; `reason` goes to the access log."""

    op: ClassVar[str] = "fail"
    method: ClassVar[None] = None
    error: RegistryError
    extra: Fields | None = None
    source: str | None = CACHE
    reason: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Wait:
    """The plan comes later: `ready` fires with it (perhaps another Wait, or DONE)."""

    op: ClassVar[str] = "wait"
    method: ClassVar[None] = None
    source: ClassVar[str] = UPSTREAM
    ready: Deferred[Any]


class Done:
    """Nothing more to do for this request (its client left)."""

    __slots__ = ()
    op: ClassVar[str] = "done"
    method: ClassVar[None] = None
    source: ClassVar[None] = None


DONE: Final = Done()

Plan = Forward | Serve | Fail | Wait | Done


class Relay:
    """Pass the upstream's answer on to the client as it is."""

    __slots__ = ()


RELAY: Final = Relay()


@dataclass(frozen=True, slots=True)
class Read:
    """Read the body whole (at most `limit` bytes), give it to `LayerCache.store_manifest` and answer it."""

    limit: int


@dataclass(frozen=True, slots=True, eq=False)
class Tee:
    """Send the upstream body into `fill` (`UpstreamResponse.into`), then ask `LayerCache.filling`."""

    plan: Forward
    fill: Fill
    fd: int  # opened before any byte arrived: the file may be complete at once


Next = Plan | Relay | Read | Tee
