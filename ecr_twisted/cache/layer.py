"""The layer cache as the proxy uses it: when to answer from disk, when to fill, when to go upstream.

Blobs and manifests named by digest are immutable, so once verified they are served from
`store.BlobStore` without asking the upstream again, but only to a repository the upstream
has confirmed holds them. A miss streams from upstream into the store and every request for
that blob meanwhile reads the same growing file (one upstream fetch). Tags move, so a
manifest by tag is trusted for `tag_ttl` seconds, then revalidated with a HEAD; when the
upstream cannot answer, the last known manifest is served for `stale_if_error` seconds.

The cache answers as values (`plans`), in the manner of CNCF distribution's proxy: once the
gate has admitted a request, `RegistryProxy` asks `lookup` what should happen to it and does
that; it hands each upstream answer to a `Forward` back to `answered` (or says that none
came: `failed`), and tells `finished` when the request is over. The cache reads the request
and whether its client is still there, never answers it, and never talks to the upstream.

Writes. The cache must stay transparent: after a write through the proxy, a read through
the proxy gets what the registry would answer. So `lookup` marks manifest PUT/DELETE and blob
DELETE as WRITE, and once the upstream has accepted one (2xx) the cache takes back what it
could answer for it, before the client sees the 2xx:
- a manifest PUT by tag, or by digest with `?tag=` parameters: those tags are forgotten (every
  Accept variant); the next read by tag asks the upstream, which alone knows what each Accept
  now resolves to;
- a manifest DELETE by digest: the digest is no longer confirmed for that repository, and the
  repository's tags that pointed at it are forgotten; a DELETE by tag forgets the tag (the
  manifest by digest stays, as in the registry);
- a blob DELETE: the digest is no longer confirmed for that repository (the file stays: other
  repositories may hold it; a read for this one asks the upstream first).
Forgetting, never guessing the new state: an invalidation can only cost an upstream request.
A write the upstream refused (4xx/5xx) changes nothing; one whose answer never came (timeout,
connection lost after sending, the client gone first) may have happened, so it counts as accepted.

All of it goes to the logs on disk (`tags.Tags`, repository confirmations in the store), then
the store's generation file grows by a byte (`BlobStore.bump`). Each request first compares
that file's (inode, size) with what this process saw last (one stat, `sync`) and, when it
changed, reads the logs' new lines in order; so a write handled by one `--workers` process
is seen by the next request in any other, and after a restart (the logs are replayed). If the
logs cannot be written (a full disk), the affected files themselves are deleted instead, which
every process notices when it opens them.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import parse_qsl

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from ecr_twisted.cache.plans import (
    CACHE,
    DONE,
    FILL,
    HIT,
    MANIFEST,
    MISS,
    PLAIN,
    PROBE,
    RELAY,
    REVALIDATE,
    UPSTREAM,
    WRITE,
    Fail,
    Fields,
    Forward,
    Next,
    Plan,
    Read,
    Serve,
    Tee,
    Wait,
)
from ecr_twisted.cache.ranges import UNSATISFIABLE, parse_range
from ecr_twisted.cache.store import BlobStore, Fill, ReactorThreads, Stat
from ecr_twisted.cache.tags import Tags
from ecr_twisted.http.http11 import LENGTH, Head
from ecr_twisted.registry import errors, routes
from ecr_twisted.registry.routes import Match

if TYPE_CHECKING:
    from ecr_twisted.http.exchange import Exchange

__all__ = ["LayerCache", "CacheCollector", "HIT", "MISS", "STALE_WARNING", "MAX_MANIFEST", "FILL_STALL"]

log = Logger()

STALE_WARNING = (b"Warning", b'110 - "Response is Stale"')
_BLOB_FIELDS = (
    (b"Content-Type", b"application/octet-stream"),
    (b"Accept-Ranges", b"bytes"),
    (b"Cache-Control", b"max-age=31536000"),
    (b"Docker-Distribution-API-Version", b"registry/2.0"),
)
MAX_MANIFEST = 4 << 20  # ECR's own limit on a manifest's size
FILL_STALL = 60.0  # seconds an upstream fill may make no progress before it is cut
MAX_TRIES = 2  # looks at the store for one request; beyond, it goes upstream as it is
_READ_MANIFEST = Read(MAX_MANIFEST)
_GET_HEAD = frozenset({b"GET", b"HEAD"})
_WRITES = frozenset({b"PUT", b"DELETE"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _accept_key(ex: Exchange) -> bytes:
    """A manifest by tag depends on what the client accepts (a list, or one platform's manifest)."""
    return b",".join(v for ln, _, v in ex.request.fields if ln == b"accept")


def _sha256(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class LayerCache:
    """What the proxy caches, decided per request, and the counters it reports. One per process."""

    def __init__(
        self,
        store: BlobStore,
        clock: Any,
        verify: Callable[[int, int], Deferred[str]],
        *,
        tag_ttl: float = 60.0,
        stale_if_error: float = 86400.0,
        every_time: bool = False,
    ) -> None:
        self.store = store
        if store.threads is None and IReactorThreads.providedBy(clock):
            # a real reactor: fills write and hash in threads of their own, off the thread that relays
            store.threads = ReactorThreads(clock)
        self.clock = clock
        self.verify = verify  # hashes a stored file off the reactor thread
        self.tag_ttl = tag_ttl
        self.stale_if_error = stale_if_error
        # --auth passthrough: each client's own credentials must be seen by the upstream,
        # so every request is confirmed upstream (a HEAD) before a stored body is served
        self.every_time = every_time
        self.hits = {"blob": 0, "manifest": 0}
        self.misses = {"blob": 0, "manifest": 0}
        self.bytes = {CACHE: 0, UPSTREAM: 0}
        self.stale = 0
        # blob digest -> (the request fetching it, requests waiting for its answer)
        self._waiting: dict[str, tuple[Forward, list[Deferred[None]]]] = {}
        self._seen = store.loaded_generation  # the generation file as this process last caught up with it
        self._tags = Tags(os.path.join(store.root, "tags"), store.has, store.compact)

    # -- what should happen to a request
    def lookup(self, ex: Exchange, m: Match) -> Plan:
        """The plan for a blob or manifest request the gate admitted."""
        return self._look(ex, m, 0)

    def _look(self, ex: Exchange, m: Match, tries: int) -> Plan:
        method = ex.request.method
        if method not in _GET_HEAD:
            # writes go straight upstream; their answer comes back to `answered`
            return Forward(WRITE if method in _WRITES else PLAIN, m, None)
        if tries > MAX_TRIES:
            return Forward(PLAIN, m, UPSTREAM, tries=tries)
        self.sync()
        assert m.route is not None and m.name is not None
        if m.route.kind == routes.BLOB:
            assert m.digest is not None
            return self._blob(ex, m, tries, m.digest)
        reference = m.reference or ""
        if ":" in reference:
            return self._manifest_by_digest(ex, m, tries, reference)
        return self._manifest_by_tag(ex, m, tries, reference)

    def _blob(self, ex: Exchange, m: Match, tries: int, digest: str) -> Plan:
        store = self.store
        if not store.cacheable(digest):
            return Forward(PLAIN, m, tries=tries)
        if store.has(digest) or store.filling(digest) is not None:
            return self._stored(ex, m, tries, digest, "blob")
        if ex.request.method == b"HEAD" or ex.request.get(b"range") is not None:
            self.misses["blob"] += 1
            return Forward(PLAIN, m, tries=tries)  # nothing to store from these: straight through
        fetching = self._waiting.get(digest)
        if fetching is not None:
            if tries == 0:  # wait for that fetch's answer, then look again
                ready: Deferred[None] = Deferred()
                fetching[1].append(ready)
                return Wait(ready.addCallback(self._again, ex, m, 1))
            return Forward(PLAIN, m, tries=tries)  # a second round of waiting: go alone
        self.misses["blob"] += 1
        plan = Forward(FILL, m, tries=tries, digest=digest)
        self._waiting[digest] = (plan, [])
        return plan

    def _again(self, _: object, ex: Exchange, m: Match, tries: int) -> Plan:
        return DONE if ex.gone else self._look(ex, m, tries)

    def _stored(self, ex: Exchange, m: Match, tries: int, digest: str, kind: str) -> Plan:
        """We hold `digest`: serve it if the repository is known to hold it too, else ask the upstream first (HEAD)."""
        assert m.name is not None
        if not self.every_time and self.store.knows(m.name, digest):
            return self._serve(ex, m, tries, digest, kind)
        return Forward(PROBE, m, method=b"HEAD", tries=tries, digest=digest, kind=kind)

    def _manifest_by_digest(self, ex: Exchange, m: Match, tries: int, digest: str) -> Plan:
        store = self.store
        if not store.cacheable(digest):
            return Forward(PLAIN, m, tries=tries, kind="manifest")
        if store.has(digest) and store.media_type(digest) is not None:
            return self._stored(ex, m, tries, digest, "manifest")
        self.misses["manifest"] += 1
        op = MANIFEST if ex.request.method == b"GET" else PLAIN
        return Forward(op, m, tries=tries, digest=digest, kind="manifest")

    def _manifest_by_tag(self, ex: Exchange, m: Match, tries: int, tag: str) -> Plan:
        assert m.name is not None
        key = (m.name, tag, _accept_key(ex))
        entry = self._tags.get(key)
        store = self.store
        if entry is not None and store.has(entry.digest) and store.media_type(entry.digest) is not None:
            if (
                not self.every_time
                and self.clock.seconds() - entry.checked < self.tag_ttl
                and store.knows(m.name, entry.digest)
            ):
                return self._serve(ex, m, tries, entry.digest, "manifest")
            return Forward(REVALIDATE, m, method=b"HEAD", tries=tries, kind="manifest", tag=key)
        self.misses["manifest"] += 1
        op = MANIFEST if ex.request.method == b"GET" else PLAIN
        return Forward(op, m, tries=tries, kind="manifest", tag=key)

    # -- what the upstream answered to a Forward
    def answered(self, ex: Exchange, plan: Forward, head: Head) -> Next:
        """The upstream's answer (not a redirect being followed) to `plan`: what to do with it."""
        op = plan.op
        if op is FILL:
            return self._fill(plan, head)
        if op is PROBE:
            assert plan.digest is not None and plan.match.name is not None
            if head.status == 200 or head.status in _REDIRECTS:
                self.store.confirm(plan.match.name, plan.digest)
                return self._serve(ex, plan.match, plan.tries, plan.digest, plan.kind)
            return Forward(PLAIN, plan.match, tries=plan.tries, kind=plan.kind)  # the upstream's own answer
        if op is MANIFEST:
            if head.status != 200 or (head.framing == LENGTH and head.length > MAX_MANIFEST):
                return RELAY  # an error, or too big to hold: straight through
            return _READ_MANIFEST
        if op is REVALIDATE:
            return self._revalidated(ex, plan, head)
        if op is WRITE and 200 <= head.status < 300:
            self._written(ex, plan)
        return RELAY

    def failed(self, ex: Exchange, plan: Forward, sent: bool) -> Plan | None:
        """The upstream could not answer `plan` (unreachable, timeout, no token; `sent`: the request
        had gone out). A plan if the cache can answer instead (a stale manifest), else None."""
        if plan.op is WRITE:
            if sent:  # no answer: it may have been applied
                self._written(ex, plan)
            return None
        if plan.op is not REVALIDATE:
            return None
        return self._stale(ex, plan)

    def finished(self, plan: Plan, bytes_out: int) -> None:
        """The request whose last plan was `plan` is over."""
        source = plan.source
        if source is not None:
            self.bytes[source] += bytes_out
        if plan.op is FILL:
            assert type(plan) is Forward
            self._release(plan)  # it ended without an answer the cache saw (or before: then a no-op)

    # -- blobs: one fill per digest, everyone reads the growing file
    def _fill(self, plan: Forward, head: Head) -> Next:
        digest = plan.digest
        assert digest is not None and plan.match.name is not None
        length = head.length if head.status == 200 and head.framing == LENGTH else None
        fill = self.store.begin(digest, length) if length is not None else None
        if fill is None:
            self._release(plan)
            return RELAY  # relayed as it comes (an error, a full disk, a stored copy): no caching
        try:
            fd = os.open(fill.path, os.O_RDONLY | os.O_CLOEXEC)  # before any byte: the file may be done at once
        except OSError:
            fill.abort("cannot read the cache file back")
            self._release(plan)
            return RELAY
        self.store.confirm(plan.match.name, digest)
        return Tee(plan, fill, fd)

    def filling(self, tee: Tee, cut: Callable[[], None]) -> Plan:
        """The body of `tee` now goes into its fill (`cut` stops that): the fetching client reads
        along, and so do those that waited for it."""
        self._watch_fill(tee.fill, cut, -1)
        self._release(tee.plan)
        assert tee.plan.digest is not None
        return self._read_along(tee.fill, tee.plan.digest, leader=True, fd=tee.fd)

    def _watch_fill(self, fill: Fill, cut: Callable[[], None], seen: int) -> None:
        if fill.state != "filling":
            return
        if fill.written == seen:
            log.warn("cache fill of {digest} stalled; cut", digest=fill.digest)
            cut()
            fill.abort("upstream stalled")
            return
        self.clock.callLater(FILL_STALL, self._watch_fill, fill, cut, fill.written)

    def _read_along(self, fill: Fill, digest: str, leader: bool = False, fd: int | None = None) -> Plan:
        """Serve the fill's file as it grows; its last byte waits for the digest check."""
        if fd is None:
            try:
                fd = os.open(fill.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:  # a fill still in the store's table always has its file
                return Fail(errors.UPSTREAM_BROKEN, source=UPSTREAM, reason="cache fill vanished")
        size = fill.size or 0
        fields = self._blob_fields(digest)
        # the request that fetches is the miss; the ones reading along cost the upstream nothing
        fields.append(MISS if leader else HIT)
        return Serve(200, fields, fd, 0, size, size, fill, UPSTREAM if leader else CACHE)

    def _release(self, plan: Forward) -> None:
        """The answer to the fetch `plan` is in: requests that waited for it look again (and mostly read along)."""
        assert plan.digest is not None
        fetching = self._waiting.get(plan.digest)
        if fetching is None or fetching[0] is not plan:
            return
        del self._waiting[plan.digest]
        for ready in fetching[1]:
            ready.callback(None)

    # -- serving what is stored
    def _serve(self, ex: Exchange, m: Match, tries: int, digest: str, kind: str, stale: bool = False) -> Plan:
        store = self.store
        fill = store.filling(digest)
        if fill is not None:
            self.hits[kind] += 1
            return self._read_along(fill, digest)
        opened = store.open(digest)
        if opened is None:  # evicted by another worker: look again
            return self._again(None, ex, m, tries + 1)
        fd, stat = opened
        if store.trusted(digest, stat):
            return self._from_disk(ex, digest, kind, fd, stat.size, stale)
        d = self.verify(fd, stat.size)
        d.addCallback(self._checked, ex, m, tries, digest, kind, fd, stat, stale)
        d.addErrback(self._check_failed, ex, m, fd)
        return Wait(d)

    def _checked(
        self, got: str, ex: Exchange, m: Match, tries: int, digest: str, kind: str, fd: int, stat: Stat, stale: bool
    ) -> Plan:
        ok = got == digest
        self.store.verified(digest, stat, ok)  # kept whether or not the client is still there
        if ok and not ex.gone:
            return self._from_disk(ex, digest, kind, fd, stat.size, stale)
        os.close(fd)
        return DONE if ex.gone else self._look(ex, m, tries + 1)  # corrupt: removed, fetch it again

    def _check_failed(self, reason: Any, ex: Exchange, m: Match, fd: int) -> Plan:
        log.failure("verifying a cached file failed", reason)
        os.close(fd)
        return DONE if ex.gone else self._look(ex, m, 100)  # straight upstream, no more cache for this one

    def _from_disk(self, ex: Exchange, digest: str, kind: str, fd: int, size: int, stale: bool) -> Plan:
        if ex.gone:
            os.close(fd)
            return DONE
        self.hits[kind] += 1
        if kind == "manifest":
            fields: Fields = [
                (b"Content-Type", (self.store.media_type(digest) or "application/octet-stream").encode("latin-1")),
                (b"Docker-Content-Digest", digest.encode("ascii")),
                (b"ETag", b'"' + digest.encode("ascii") + b'"'),
                (b"Docker-Distribution-API-Version", b"registry/2.0"),
                HIT,
            ]
            if stale:
                fields.append(STALE_WARNING)
            return Serve(200, fields, fd, 0, size, size)
        fields = self._blob_fields(digest)
        fields.append(HIT)
        wanted = parse_range(ex.request.get(b"range"), size)
        if wanted is None:
            return Serve(200, fields, fd, 0, size, size)
        if wanted == UNSATISFIABLE:
            os.close(fd)
            return Fail(errors.RANGE_INVALID, [(b"Content-Range", b"bytes */%d" % size), HIT])
        first, last = wanted
        fields.append((b"Content-Range", b"bytes %d-%d/%d" % (first, last, size)))
        return Serve(206, fields, fd, first, last - first + 1, size)

    @staticmethod
    def _blob_fields(digest: str) -> Fields:
        d = digest.encode("ascii")
        fields = list(_BLOB_FIELDS)
        fields.append((b"Docker-Content-Digest", d))
        fields.append((b"ETag", b'"' + d + b'"'))
        return fields

    # -- manifests
    def store_manifest(self, plan: Forward, head: Head, body: bytes) -> None:
        """The upstream's 200 to a MANIFEST plan, read whole: keep it if it is what it says it is."""
        m = plan.match
        assert m.name is not None
        media_type = head.get(b"content-type")
        announced = head.get(b"docker-content-digest")
        if m.reference and ":" in m.reference:
            digest = m.reference
        elif announced:
            digest = announced.decode("latin-1")
        else:
            digest = _sha256(body)
        store = self.store
        if media_type is not None and (
            store.put(digest, body, media_type.decode("latin-1"))
            # stored already (another tag, another Accept, fetched by digest): the same bytes?
            or (store.has(digest) and _sha256(body) == digest)
        ):
            store.confirm(m.name, digest)
            if plan.tag is not None:
                self._tags.remember(plan.tag, digest, self.clock.seconds())

    def _revalidated(self, ex: Exchange, plan: Forward, head: Head) -> Plan:
        status = head.status
        key = plan.tag
        entry = self._tags.get(key) if key is not None else None
        if entry is not None and status >= 500:
            stale = self._stale(ex, plan)
            if stale is not None:
                return stale
        elif entry is not None and status == 200:
            announced = head.get(b"docker-content-digest")
            if announced is not None and announced.decode("latin-1") == entry.digest:
                entry.checked = self.clock.seconds()
                assert plan.match.name is not None
                self.store.confirm(plan.match.name, entry.digest)
                return self._serve(ex, plan.match, plan.tries, entry.digest, "manifest")
        if status == 404 and key is not None:
            self._tags.forget(key)  # deleted upstream: never to be served stale
        # moved, gone or refused: the upstream's own answer to the client's own request
        self.misses["manifest"] += 1
        op = MANIFEST if ex.request.method == b"GET" and status == 200 else PLAIN
        return Forward(op, plan.match, tries=plan.tries, kind="manifest", tag=key)

    def _stale(self, ex: Exchange, plan: Forward) -> Plan | None:
        """The last known manifest of a tag the upstream cannot revalidate, if it may still be served."""
        self.sync()  # a write since the request came in may have taken the tag back
        key = plan.tag
        entry = self._tags.get(key) if key is not None else None
        if entry is None or self.every_time or self.clock.seconds() - entry.checked > self.stale_if_error:
            return None
        assert key is not None
        if not self.store.has(entry.digest) or not self.store.knows(key[0], entry.digest):
            return None  # evicted, or deleted in that repository since
        self.stale += 1
        log.warn("upstream unavailable: serving a stale manifest for {repo}:{tag}", repo=key[0], tag=key[1])
        return self._serve(ex, plan.match, plan.tries, entry.digest, "manifest", stale=True)

    # -- writes: what the cache could answer for them is taken back (see the module's docstring)
    def sync(self) -> None:
        """Catch up with the writes any process recorded since we last looked: one stat if none."""
        now = self.store.generation()
        if now == self._seen:
            return
        try:
            self.store.catch_up()
            self._tags.catch_up()
        except OSError as e:
            log.error("cannot read the cache's logs: {error}", error=e.strerror)
            return  # tried again by the next request
        self._seen = now

    def _written(self, ex: Exchange, plan: Forward) -> None:
        m = plan.match
        assert m.name is not None and m.route is not None
        repo = m.name
        self.sync()  # every tag entry any process recorded, to forget the right ones
        revoked: str | None = None
        tags: set[str] = set()
        if m.route.kind == routes.BLOB:
            revoked = m.digest
        else:
            reference = m.reference or ""
            if ":" not in reference:
                tags.add(reference)
            else:
                if ex.request.method == b"DELETE":
                    revoked = reference  # and with it, every tag of it in this repository
                    tags |= self._tags.pointing_at(repo, reference)
                query = ex.request.target.partition(b"?")[2].decode("latin-1")
                tags.update(v for k, v in parse_qsl(query) if k == "tag")
        dropped = self._tags.drop(repo, tags)
        if not dropped and revoked is None:
            return  # a manifest pushed by digest alone: nothing the cache answered has changed
        try:
            if dropped:
                self._tags.log_dropped(dropped)
            if revoked is not None:
                self.store.revoke(repo, revoked)
            self.store.bump()
        except OSError as e:
            # the other processes cannot be told: take away the files themselves, which they notice
            log.error("cannot record a write in the cache ({error}): its files are removed", error=e.strerror)
            for digest in set(dropped.values()) | ({revoked} if revoked else set()):
                self.store.remove(digest)

    def close(self) -> None:
        self.store.close()
        self._tags.close()


class CacheCollector:
    """The cache's counters, read at scrape time: nothing on the hot path touches Prometheus."""

    def __init__(self, cache: LayerCache) -> None:
        self.cache = cache

    def collect(self) -> Iterable[Any]:
        cache, store = self.cache, self.cache.store
        hits = CounterMetricFamily("ecrproxy_cache_hits", "Requests answered from the cache", labels=["kind"])
        misses = CounterMetricFamily("ecrproxy_cache_misses", "Cacheable requests that went upstream", labels=["kind"])
        for kind in ("blob", "manifest"):
            hits.add_metric([kind], cache.hits[kind])
            misses.add_metric([kind], cache.misses[kind])
        served = CounterMetricFamily(
            "ecrproxy_cache_bytes", "Blob and manifest body bytes sent to clients, by where they came from",
            labels=["source"],
        )
        for source in (CACHE, UPSTREAM):
            served.add_metric([source], cache.bytes[source])
        yield hits
        yield misses
        yield served
        yield CounterMetricFamily("ecrproxy_cache_evictions",
                                  "Blobs evicted to stay under --cache-size and within the disk's free space",
                                  value=store.evictions)
        yield CounterMetricFamily("ecrproxy_cache_digest_mismatches",
                                  "Blobs from upstream or on disk that did not match their digest",
                                  value=store.mismatches)
        yield CounterMetricFamily("ecrproxy_cache_stale",
                                  "Manifests served stale because the upstream could not revalidate them",
                                  value=cache.stale)
        yield CounterMetricFamily("ecrproxy_cache_disk_full", "Blobs streamed without caching for lack of disk space",
                                  value=store.disk_full)
        yield GaugeMetricFamily("ecrproxy_cache_size_bytes", "Bytes of verified blobs in the cache", value=store.size)
