"""The layer cache as the proxy uses it: when to answer from disk, when to fill, when to go upstream.

Blobs and manifests named by digest are immutable, so once verified they are served from
`blobstore.BlobStore` without asking the upstream again, but only to a repository the
upstream has confirmed holds them. A miss streams from upstream into the store and every
request for that blob meanwhile reads the same growing file (one upstream fetch). Tags move,
so a manifest by tag is trusted for `tag_ttl` seconds, then revalidated with a HEAD; when
the upstream cannot answer, the last known manifest is served for `stale_if_error` seconds.

`RegistryProxy` calls `lookup` once the gate has admitted a request, and hands back
upstream answers for requests that `lookup` marked (`ctx.cache_op`).

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

All of it goes to the logs on disk (tags here, repository confirmations in the store), then
the store's generation file grows by a byte (`BlobStore.bump`). Each request first compares
that file's (inode, size) with what this process saw last (one stat, `sync`) and, when it
changed, reads the logs' new lines in order; so a write handled by one `--workers` process
is seen by the next request in any other, and after a restart (the logs are replayed). If the
logs cannot be written (a full disk), the affected files themselves are deleted instead, which
every process notices when it opens them.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import parse_qsl

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ecr_twisted.registry import errors
from ecr_twisted.registry import routes
from ecr_twisted.cache.ranges import UNSATISFIABLE, parse_range
from ecr_twisted.cache.store import BlobStore, Fill, SharedLog, Stat
from ecr_twisted.http.http11 import LENGTH
from ecr_twisted.http.streaming import Exchange, Fields, UpstreamResponse

if TYPE_CHECKING:
    from ecr_twisted.registry.handler import RegistryProxy, _Ctx

log = Logger()

HIT = (b"X-Cache", b"HIT")
MISS = (b"X-Cache", b"MISS")
STALE_WARNING = (b"Warning", b'110 - "Response is Stale"')
_BLOB_FIELDS = (
    (b"Content-Type", b"application/octet-stream"),
    (b"Accept-Ranges", b"bytes"),
    (b"Cache-Control", b"max-age=31536000"),
    (b"Docker-Distribution-API-Version", b"registry/2.0"),
)
MAX_MANIFEST = 4 << 20  # ECR's own limit on a manifest's size
FILL_STALL = 60.0  # seconds an upstream fill may make no progress before it is cut
_GET_HEAD = frozenset({b"GET", b"HEAD"})
_WRITES = frozenset({b"PUT", b"DELETE"})

# ctx.cache_op values: what an upstream answer means to the cache
FILL = "fill"  # blob GET miss: store the body while serving it
PROBE = "probe"  # HEAD upstream: does this repository hold a blob we have?
MANIFEST = "manifest"  # manifest GET miss: read it, store it, answer it
REVALIDATE = "revalidate"  # HEAD upstream: is this tag still that digest?
WRITE = "write"  # manifest PUT/DELETE, blob DELETE: once accepted, take back what it changed


class TagEntry:
    __slots__ = ("digest", "checked")

    def __init__(self, digest: str, checked: float) -> None:
        self.digest = digest
        self.checked = checked  # when the upstream last said the tag is this digest


def _accept_key(ex: Exchange) -> bytes:
    """A manifest by tag depends on what the client accepts (a list, or one platform's manifest)."""
    return b",".join(v for ln, _, v in ex.request.fields if ln == b"accept")


class LayerCache:
    """What the proxy caches and the counters it reports. One per process."""

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
        self.proxy: RegistryProxy  # set by the proxy that uses this cache
        self.clock = clock
        self.verify = verify  # hashes a stored file off the reactor thread
        self.tag_ttl = tag_ttl
        self.stale_if_error = stale_if_error
        # --auth passthrough: each client's own credentials must be seen by the upstream,
        # so every request is confirmed upstream (a HEAD) before a stored body is served
        self.every_time = every_time
        self.hits = {"blob": 0, "manifest": 0}
        self.misses = {"blob": 0, "manifest": 0}
        self.bytes = {"cache": 0, "upstream": 0}
        self.stale = 0
        self._waiting: dict[str, list[tuple[Exchange, "_Ctx"]]] = {}
        self._tags: dict[tuple[str, str, bytes], TagEntry] = {}
        self._seen = store.loaded_generation  # the generation file as this process last caught up with it
        self._tags_log = SharedLog(os.path.join(store.root, "tags"))
        self._load_tags()

    # -- entry point
    def lookup(self, ex: Exchange, ctx: "_Ctx") -> bool:
        """Answer `ex` from the cache or arrange how its upstream answer is used. True if taken over."""
        req = ex.request
        m = ctx.match
        assert m is not None and m.name is not None
        if req.method not in _GET_HEAD:
            if req.method in _WRITES:
                ctx.cache_op = WRITE  # straight upstream; its answer comes back to `answer`
            return False
        if ctx.cache_tries > 2:
            return False
        self.sync()
        ctx.cache_source = "upstream"
        if ctx.kind == routes.BLOB:
            assert m.digest is not None
            return self._blob(ex, ctx, m.name, m.digest)
        reference = m.reference or ""
        if ":" in reference:
            return self._manifest_by_digest(ex, ctx, m.name, reference)
        return self._manifest_by_tag(ex, ctx, m.name, reference)

    def _blob(self, ex: Exchange, ctx: "_Ctx", repo: str, digest: str) -> bool:
        store = self.store
        if not store.cacheable(digest):
            return False
        if store.has(digest) or store.filling(digest) is not None:
            return self._stored(ex, ctx, repo, digest, "blob")
        if ex.request.method == b"HEAD" or ex.request.get(b"range") is not None:
            self.misses["blob"] += 1
            return False  # nothing to store from these: straight through
        waiting = self._waiting.get(digest)
        if waiting is not None:
            if ctx.cache_tries == 0:
                ctx.cache_tries += 1
                waiting.append((ex, ctx))
                return True
            return False  # a second round of waiting: go alone
        self.misses["blob"] += 1
        self._waiting[digest] = []
        ctx.cache_op = FILL
        return False

    def _stored(self, ex: Exchange, ctx: "_Ctx", repo: str, digest: str, kind: str) -> bool:
        """We hold `digest`: serve it if `repo` is known to hold it too, else ask the upstream first (HEAD)."""
        if not self.every_time and self.store.knows(repo, digest):
            self._serve(ex, ctx, digest, kind)
            return True
        ctx.cache_op = PROBE
        ctx.method = b"HEAD"
        return False

    def _manifest_by_digest(self, ex: Exchange, ctx: "_Ctx", repo: str, digest: str) -> bool:
        store = self.store
        if not store.cacheable(digest):
            return False
        if store.has(digest) and store.media_type(digest) is not None:
            return self._stored(ex, ctx, repo, digest, "manifest")
        self.misses["manifest"] += 1
        if ex.request.method == b"GET":
            ctx.cache_op = MANIFEST
        return False

    def _manifest_by_tag(self, ex: Exchange, ctx: "_Ctx", repo: str, tag: str) -> bool:
        key = (repo, tag, _accept_key(ex))
        entry = self._tags.get(key)
        ctx.tag_key = key
        if entry is not None and self.store.has(entry.digest) and self.store.media_type(entry.digest) is not None:
            if (
                not self.every_time
                and self.clock.seconds() - entry.checked < self.tag_ttl
                and self.store.knows(repo, entry.digest)
            ):
                self._serve(ex, ctx, entry.digest, "manifest")
                return True
            ctx.cache_op = REVALIDATE
            ctx.method = b"HEAD"
            return False
        self.misses["manifest"] += 1
        if ex.request.method == b"GET":
            ctx.cache_op = MANIFEST
        return False

    # -- upstream answers for marked requests
    def answer(self, resp: UpstreamResponse, ex: Exchange, ctx: "_Ctx") -> bool:
        """An upstream answer (not a redirect being followed) to a marked request. True if taken over."""
        op = ctx.cache_op
        status = resp.head.status
        m = ctx.match
        assert m is not None and m.name is not None
        if op == FILL:
            assert m.digest is not None
            return self._fill(resp, ex, ctx, m.name, m.digest)
        if op == PROBE:
            digest = m.digest or m.reference or ""
            resp.discard()
            if status == 200 or status in (301, 302, 303, 307, 308):
                self.store.confirm(m.name, digest)
                self._serve(ex, ctx, digest, "blob" if ctx.kind == routes.BLOB else "manifest")
            else:
                self._plain(ex, ctx)  # let the client see the upstream's own answer
            return True
        if op == MANIFEST:
            head = resp.head
            if status != 200 or (head.framing == LENGTH and head.length > MAX_MANIFEST):
                return False  # an error, or too big to hold: straight through
            self._read_manifest(resp, ex, ctx)
            return True
        if op == REVALIDATE:
            return self._revalidated(resp, ex, ctx)
        if op == WRITE and 200 <= status < 300:
            self._written(ex, ctx)
        return False  # the upstream's answer goes to the client as it is

    def upstream_failed(self, ex: Exchange, ctx: "_Ctx") -> bool:
        """The upstream could not be asked (unreachable, timeout, no token): serve stale if allowed."""
        if ctx.cache_op == WRITE:
            if ctx.sent_at:  # sent, and no answer: it may have been applied
                self._written(ex, ctx)
            return False
        if ctx.cache_op != REVALIDATE:
            return False
        return self._stale(ex, ctx)

    # -- writes: what the cache could answer for them is taken back (see the module's docstring)
    def sync(self) -> None:
        """Catch up with the writes any process recorded since we last looked: one stat if none."""
        now = self.store.generation()
        if now == self._seen:
            return
        try:
            self.store.catch_up()
            self._apply_tag_lines(*self._tags_log.new_lines())
        except OSError as e:
            log.error("cannot read the cache's logs: {error}", error=e.strerror)
            return  # tried again by the next request
        self._seen = now

    def _written(self, ex: Exchange, ctx: "_Ctx") -> None:
        m = ctx.match
        assert m is not None and m.name is not None
        repo = m.name
        self.sync()  # every tag entry any process recorded, to forget the right ones
        revoked: str | None = None
        tags: set[str] = set()
        if ctx.kind == routes.BLOB:
            revoked = m.digest
        else:
            reference = m.reference or ""
            if ":" not in reference:
                tags.add(reference)
            else:
                if ex.request.method == b"DELETE":
                    revoked = reference  # and with it, every tag of it in this repository
                    tags.update(t for (r, t, _), e in self._tags.items() if r == repo and e.digest == reference)
                query = ex.request.target.partition(b"?")[2].decode("latin-1")
                tags.update(v for k, v in parse_qsl(query) if k == "tag")
        dropped = [key for key in self._tags if key[0] == repo and key[1] in tags]
        if not dropped and revoked is None:
            return  # a manifest pushed by digest alone: nothing the cache answered has changed
        stale = {self._tags.pop(key).digest for key in dropped}
        try:
            if dropped:
                self._tags_log.append([self._tag_line(key, None, 0) for key in dropped])
            if revoked is not None:
                self.store.revoke(repo, revoked)
            self.store.bump()
        except OSError as e:
            # the other processes cannot be told: take away the files themselves, which they notice
            log.error("cannot record a write in the cache ({error}): its files are removed", error=e.strerror)
            for digest in stale | ({revoked} if revoked else set()):
                self.store.remove(digest)

    def _plain(self, ex: Exchange, ctx: "_Ctx") -> None:
        ctx.cache_op = None
        ctx.method = None
        self.proxy._send(ex, ctx)

    # -- blobs: one fill per digest, everyone reads the growing file
    def _fill(self, resp: UpstreamResponse, ex: Exchange, ctx: "_Ctx", repo: str, digest: str) -> bool:
        head = resp.head
        length = head.length if head.status == 200 and head.framing == LENGTH else None
        fill = self.store.begin(digest, length) if length is not None else None
        if fill is None:
            self._release(digest)
            return False  # relayed as it comes (an error, a full disk, a stored copy): no caching
        try:
            fd = os.open(fill.path, os.O_RDONLY | os.O_CLOEXEC)  # before any byte: the file may be done at once
        except OSError:
            fill.abort("cannot read the cache file back")
            self._release(digest)
            return False
        self.store.confirm(repo, digest)
        cut = resp.into(fill)
        self._watch_fill(fill, cut, -1)
        self._release(digest)
        self._follow(ex, ctx, fill, digest, leader=True, fd=fd)
        return True

    def _watch_fill(self, fill: Fill, cut: Callable[[], None], seen: int) -> None:
        if fill.state != "filling":
            return
        if fill.written == seen:
            log.warn("cache fill of {digest} stalled; cut", digest=fill.digest)
            cut()
            fill.abort("upstream stalled")
            return
        self.clock.callLater(FILL_STALL, self._watch_fill, fill, cut, fill.written)

    def _follow(
        self, ex: Exchange, ctx: "_Ctx", fill: Fill, digest: str, leader: bool = False, fd: int | None = None
    ) -> None:
        if fd is None:
            try:
                fd = os.open(fill.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:  # a fill still in the store's table always has its file
                ex.error = "cache fill vanished"
                return ex.respond(502, list(errors.JSON_FIELDS), errors.envelope(errors.UPSTREAM_BROKEN))
        size = fill.size or 0
        fields = self._blob_fields(digest)
        # the request that fetches is the miss; the ones reading along cost the upstream nothing
        fields.append(MISS if leader else HIT)
        ctx.cache_source = "upstream" if leader else "cache"
        ex.respond_file(200, fields, fd, 0, size, size, fill)

    def _release(self, digest: str) -> None:
        """The leader's answer is in: requests that waited for it look again (and mostly follow the fill)."""
        waiting = self._waiting.pop(digest, None)
        for ex, ctx in waiting or ():
            if not ex.gone:
                self.proxy._resume(ex, ctx)

    def leader_finished(self, ctx: "_Ctx") -> None:
        if ctx.cache_op == FILL and ctx.match is not None and ctx.match.digest is not None:
            self._release(ctx.match.digest)

    # -- serving what is stored
    def _serve(self, ex: Exchange, ctx: "_Ctx", digest: str, kind: str) -> None:
        store = self.store
        fill = store.filling(digest)
        if fill is not None:
            self.hits[kind] += 1
            return self._follow(ex, ctx, fill, digest)
        opened = store.open(digest)
        if opened is None:
            return self._gone_from_disk(ex, ctx)
        fd, stat = opened
        if store.trusted(digest, stat):
            return self._send(ex, ctx, digest, kind, fd, stat.size)
        d = self.verify(fd, stat.size)
        d.addCallback(self._checked, ex, ctx, digest, kind, fd, stat)
        d.addErrback(self._check_failed, ex, ctx, fd)

    def _checked(self, got: str, ex: Exchange, ctx: "_Ctx", digest: str, kind: str, fd: int, stat: Stat) -> None:
        ok = got == digest
        self.store.verified(digest, stat, ok)
        if ok and not ex.gone:
            return self._send(ex, ctx, digest, kind, fd, stat.size)
        os.close(fd)
        if not ex.gone:
            self._gone_from_disk(ex, ctx)

    def _check_failed(self, reason: Any, ex: Exchange, ctx: "_Ctx", fd: int) -> None:
        log.failure("verifying a cached file failed", reason)
        os.close(fd)
        if not ex.gone:
            ctx.cache_tries = 99  # straight upstream, no more cache for this one
            self._gone_from_disk(ex, ctx)

    def _gone_from_disk(self, ex: Exchange, ctx: "_Ctx") -> None:
        """The stored copy is unusable (evicted by another worker, or corrupt): fetch it again."""
        ctx.cache_op = None
        ctx.method = None
        ctx.cache_tries += 1
        self.proxy._resume(ex, ctx)

    def _send(self, ex: Exchange, ctx: "_Ctx", digest: str, kind: str, fd: int, size: int) -> None:
        if ex.gone:
            os.close(fd)
            return
        self.hits[kind] += 1
        ctx.cache_source = "cache"
        if kind == "manifest":
            fields: Fields = [
                (b"Content-Type", (self.store.media_type(digest) or "application/octet-stream").encode("latin-1")),
                (b"Docker-Content-Digest", digest.encode("ascii")),
                (b"ETag", b'"' + digest.encode("ascii") + b'"'),
                (b"Docker-Distribution-API-Version", b"registry/2.0"),
                HIT,
            ]
            if ctx.stale:
                fields.append(STALE_WARNING)
            return ex.respond_file(200, fields, fd, 0, size, size)
        fields = self._blob_fields(digest)
        fields.append(HIT)
        wanted = parse_range(ex.request.get(b"range"), size)
        if wanted is None:
            return ex.respond_file(200, fields, fd, 0, size, size)
        if wanted == UNSATISFIABLE:
            os.close(fd)
            out = list(errors.JSON_FIELDS)
            out.append((b"Content-Range", b"bytes */%d" % size))
            out.append(HIT)
            return ex.respond(416, out, errors.envelope(errors.RANGE_INVALID))
        first, last = wanted  # type: ignore[misc]
        fields.append((b"Content-Range", b"bytes %d-%d/%d" % (first, last, size)))
        ex.respond_file(206, fields, fd, first, last - first + 1, size)

    @staticmethod
    def _blob_fields(digest: str) -> Fields:
        d = digest.encode("ascii")
        fields = list(_BLOB_FIELDS)
        fields.append((b"Docker-Content-Digest", d))
        fields.append((b"ETag", b'"' + d + b'"'))
        return fields

    # -- manifests
    def _read_manifest(self, resp: UpstreamResponse, ex: Exchange, ctx: "_Ctx") -> None:
        fields = self.proxy._response_fields(resp.head, ex, ctx)
        media_type = resp.head.get(b"content-type")
        announced = resp.head.get(b"docker-content-digest")
        m = ctx.match
        assert m is not None and m.name is not None

        def got(body: bytes) -> None:
            if m.reference and ":" in m.reference:
                digest = m.reference
            elif announced:
                digest = announced.decode("latin-1")
            else:
                digest = "sha256:" + hashlib.sha256(body).hexdigest()
            store = self.store
            if media_type is not None and (
                store.put(digest, body, media_type.decode("latin-1"))
                # stored already (another tag, another Accept, fetched by digest): the same bytes?
                or (store.has(digest) and "sha256:" + hashlib.sha256(body).hexdigest() == digest)
            ):
                self.store.confirm(m.name, digest)
                if ctx.tag_key is not None:
                    self._remember_tag(ctx.tag_key, digest)
            fields.append(MISS)
            ex.respond(200, fields, body)

        d = resp.read(MAX_MANIFEST, self.proxy.config.request_timeout)
        d.addCallback(got)
        d.addErrback(self.proxy._upstream_failed, ex, ctx)
        d.addErrback(self.proxy._bug, ex)

    def _revalidated(self, resp: UpstreamResponse, ex: Exchange, ctx: "_Ctx") -> bool:
        status = resp.head.status
        entry = self._tags.get(ctx.tag_key) if ctx.tag_key is not None else None
        resp.discard()
        if entry is not None and status >= 500:
            if self._stale(ex, ctx):
                return True
        elif entry is not None and status == 200:
            announced = resp.head.get(b"docker-content-digest")
            if announced is not None and announced.decode("latin-1") == entry.digest:
                entry.checked = self.clock.seconds()
                assert ctx.match is not None and ctx.match.name is not None
                self.store.confirm(ctx.match.name, entry.digest)
                self._serve(ex, ctx, entry.digest, "manifest")
                return True
        if status == 404 and ctx.tag_key is not None:
            self._forget_tag(ctx.tag_key)  # deleted upstream: never to be served stale
        # moved, gone or refused: the upstream's own answer to the client's own request
        self.misses["manifest"] += 1
        ctx.method = None
        ctx.cache_op = MANIFEST if ex.request.method == b"GET" and status == 200 else None
        self.proxy._send(ex, ctx)
        return True

    def _stale(self, ex: Exchange, ctx: "_Ctx") -> bool:
        self.sync()  # a write since the request came in may have taken the tag back
        entry = self._tags.get(ctx.tag_key) if ctx.tag_key is not None else None
        if entry is None or self.every_time or self.clock.seconds() - entry.checked > self.stale_if_error:
            return False
        assert ctx.tag_key is not None
        if not self.store.has(entry.digest) or not self.store.knows(ctx.tag_key[0], entry.digest):
            return False  # evicted, or deleted in that repository since
        self.stale += 1
        ctx.stale = True
        log.warn("upstream unavailable: serving a stale manifest for {repo}:{tag}",
                 repo=ctx.tag_key[0], tag=ctx.tag_key[1])
        self._serve(ex, ctx, entry.digest, "manifest")
        return True

    # -- tags survive restarts, so a restart while ECR is down still serves
    @staticmethod
    def _tag_line(key: tuple[str, str, bytes], digest: str | None, checked: float) -> str:
        """A tags log line; digest None: forgotten."""
        return json.dumps([key[0], key[1], key[2].decode("latin-1"), digest, checked])

    def _remember_tag(self, key: tuple[str, str, bytes], digest: str) -> None:
        now = self.clock.seconds()
        entry = self._tags.get(key)
        if entry is not None and entry.digest == digest:
            entry.checked = now
            return
        self._tags[key] = TagEntry(digest, now)
        try:
            self._tags_log.append([self._tag_line(key, digest, now)])
        except OSError as e:
            log.warn("cannot record a tag in the cache: {error}", error=e.strerror)

    def _forget_tag(self, key: tuple[str, str, bytes]) -> None:
        if self._tags.pop(key, None) is None:
            return
        try:
            self._tags_log.append([self._tag_line(key, None, 0)])
        except OSError as e:
            log.warn("cannot record a tag in the cache: {error}", error=e.strerror)

    def _apply_tag_lines(self, from_start: bool, lines: list[str]) -> None:
        """Replay tags log lines in order. A forget always applies; an entry only if it is not older
        than the one held (this process may have revalidated since) and its manifest is stored.
        Lines from the start of a file are all there is (a newer start compacted it)."""
        if from_start:
            self._tags = {}
        for line in lines:
            try:
                repo, tag, accept, digest, checked = json.loads(line)
                key = (repo, tag, accept.encode("latin-1"))
                checked = float(checked)
            except (ValueError, TypeError, AttributeError):
                continue  # a torn line
            entry = self._tags.get(key)
            if digest is None:
                self._tags.pop(key, None)
            elif entry is not None and entry.checked > checked:
                continue
            elif self.store.has(digest):
                self._tags[key] = TagEntry(digest, checked)
            else:
                self._tags.pop(key, None)  # moved to a manifest we do not hold (evicted, or not adopted yet)

    def _load_tags(self) -> None:
        self._apply_tag_lines(*self._tags_log.new_lines())
        if not self.store.compact:
            return
        self._tags_log.rewrite(self._tag_line(key, e.digest, e.checked) for key, e in self._tags.items())

    def count_bytes(self, source: str, n: int) -> None:
        self.bytes[source] += n

    def close(self) -> None:
        self.store.close()
        self._tags_log.close()


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
        for source in ("cache", "upstream"):
            served.add_metric([source], cache.bytes[source])
        yield hits
        yield misses
        yield served
        yield CounterMetricFamily("ecrproxy_cache_evictions", "Blobs evicted to stay under --cache-size",
                                  value=store.evictions)
        yield CounterMetricFamily("ecrproxy_cache_digest_mismatches",
                                  "Blobs from upstream or on disk that did not match their digest", value=store.mismatches)
        yield CounterMetricFamily("ecrproxy_cache_stale",
                                  "Manifests served stale because the upstream could not revalidate them",
                                  value=cache.stale)
        yield CounterMetricFamily("ecrproxy_cache_disk_full", "Blobs streamed without caching for lack of disk space",
                                  value=store.disk_full)
        yield GaugeMetricFamily("ecrproxy_cache_size_bytes", "Bytes of verified blobs in the cache", value=store.size)
