"""The layer cache's store: blobs on local disk, once per digest, verified before anyone sees them.

Blobs are immutable and named by their digest, so the store keys by digest alone: a layer
pulled through fifty repositories is stored once. A blob arrives through a `Fill` (bytes are
appended to a temporary file as they come from upstream and hashed on the way); it becomes
visible only after its sha256 matches, by an atomic rename. Anything else (a mismatch, an
interrupted transfer, a full disk) leaves nothing behind.

What a repository may be served from the cache is remembered separately: a blob is served
for repository R only after the upstream confirmed once that R holds it (`confirm`), so the
cache never shows across repositories what the upstream would not. Those pairs are appended
to a log file and survive restarts, with the blobs.

Nothing here speaks HTTP; `proxy.py` decides when to look and when to fill.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
from collections import OrderedDict
from typing import Any, Callable

from twisted.logger import Logger

log = Logger()

_SHA256 = re.compile(r"sha256:([0-9a-f]{64})\Z")
_RANGE = re.compile(rb"bytes=(\d*)-(\d*)\Z")
UNSATISFIABLE = "unsatisfiable"


def parse_range(value: bytes | None, size: int) -> tuple[int, int] | str | None:
    """The one byte range (first, last inclusive) a `Range` header asks of `size` bytes.

    None: serve the whole blob (no header, a unit other than bytes, several ranges, or
    nonsense, all of which RFC 9110 lets a server ignore). UNSATISFIABLE: answer 416."""
    if value is None:
        return None
    m = _RANGE.match(value.strip())
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        n = int(last)  # a suffix: the last n bytes
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    return start, min(int(last), size - 1) if last else size - 1


class Fill:
    """One blob on its way into the store. `write` as bytes arrive, then `finish` or `abort`.

    Followers (other requests for the same blob) read what is already in the temporary
    file and are told about more with `on_progress` callbacks."""

    __slots__ = ("store", "digest", "path", "_file", "_hash", "written", "state", "_listeners", "failed_reason")

    def __init__(self, store: "BlobStore", digest: str, path: str) -> None:
        self.store = store
        self.digest = digest
        self.path = path
        self._file: Any = open(path, "wb", buffering=0)
        self._hash = hashlib.sha256()
        self.written = 0
        self.state = "filling"  # then "done", "failed"
        self._listeners: list[Callable[["Fill"], None]] = []
        self.failed_reason = ""

    def on_progress(self, listener: Callable[["Fill"], None]) -> None:
        self._listeners.append(listener)

    def off_progress(self, listener: Callable[["Fill"], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _tell(self) -> None:
        for listener in list(self._listeners):
            listener(self)

    def write(self, data: bytes) -> None:
        if self.state != "filling":
            return
        try:
            self._file.write(data)
        except OSError as e:
            # a full disk must never break the pull: stop caching, keep streaming
            self._fail("disk full" if e.errno == errno.ENOSPC else f"write failed: {e.strerror}")
            return
        self._hash.update(data)
        self.written += len(data)
        if self._listeners:
            self._tell()

    def finish(self) -> bool:
        """The upstream body ended: keep the blob if it is what its digest says. True if kept."""
        if self.state != "filling":
            return False
        if "sha256:" + self._hash.hexdigest() != self.digest:
            self.store.mismatches += 1
            log.error("blob {digest} from upstream does not match its digest; not cached", digest=self.digest)
            self._fail("digest mismatch")
            return False
        try:
            self._file.close()
            os.replace(self.path, self.store.path_of(self.digest))
        except OSError as e:
            self._fail(f"commit failed: {e.strerror}")
            return False
        self.state = "done"
        self.store._committed(self)
        self._tell()
        return True

    def abort(self, reason: str) -> None:
        """The transfer was interrupted: leave nothing behind."""
        if self.state == "filling":
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        self.state = "failed"
        self.failed_reason = reason
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass
        self.store._fill_ended(self)
        self._tell()


class BlobStore:
    """Verified blobs under `root`, at most `max_bytes` of them, least recently used evicted first."""

    def __init__(self, root: str, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._blobs = os.path.join(root, "blobs", "sha256")
        self._tmp = os.path.join(root, "tmp")
        self._known_path = os.path.join(root, "known")
        os.makedirs(self._blobs, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        self._lru: OrderedDict[str, int] = OrderedDict()  # digest -> size, least recent first
        self.size = 0
        self._known: dict[str, set[str]] = {}  # digest -> repositories confirmed to hold it
        self._fills: dict[str, Fill] = {}
        self.evictions = 0
        self.mismatches = 0
        self._load()
        self._known_log: Any = open(self._known_path, "a", encoding="ascii")

    # -- start-up: partial files go, the index is rebuilt from the files themselves
    def _load(self) -> None:
        for name in os.listdir(self._tmp):
            try:
                os.unlink(os.path.join(self._tmp, name))
            except OSError:
                pass
        found = []
        for name in os.listdir(self._blobs):
            path = os.path.join(self._blobs, name)
            if not re.fullmatch(r"[0-9a-f]{64}", name):
                continue
            st = os.stat(path)
            found.append((st.st_mtime, "sha256:" + name, st.st_size))
        for _, digest, size in sorted(found):
            self._lru[digest] = size
            self.size += size
        try:
            with open(self._known_path, encoding="ascii") as f:
                for line in f:
                    repo, _, digest = line.strip().partition(" ")
                    if digest in self._lru:
                        self._known.setdefault(digest, set()).add(repo)
        except FileNotFoundError:
            pass
        # compact the log to the pairs whose blobs are still here
        tmp = self._known_path + ".new"
        with open(tmp, "w", encoding="ascii") as f:
            for digest, repos in self._known.items():
                f.writelines(f"{repo} {digest}\n" for repo in sorted(repos))
        os.replace(tmp, self._known_path)
        self._make_room(0)

    @staticmethod
    def cacheable(digest: str) -> bool:
        return _SHA256.match(digest) is not None

    def path_of(self, digest: str) -> str:
        return os.path.join(self._blobs, digest[7:])

    # -- lookups
    def get(self, repository: str, digest: str) -> tuple[str, int] | None:
        """(path, size) of a verified blob that `repository` is known to hold; marks it recently used."""
        size = self._lru.get(digest)
        if size is None or repository not in self._known.get(digest, ()):
            return None
        self._lru.move_to_end(digest)
        return self.path_of(digest), size

    def has(self, digest: str) -> bool:
        return digest in self._lru

    def knows(self, repository: str, digest: str) -> bool:
        return repository in self._known.get(digest, ())

    def confirm(self, repository: str, digest: str) -> None:
        """The upstream showed that `repository` holds `digest` (it answered 200 for it)."""
        repos = self._known.setdefault(digest, set())
        if repository not in repos:
            repos.add(repository)
            self._known_log.write(f"{repository} {digest}\n")
            self._known_log.flush()

    # -- filling
    def filling(self, digest: str) -> Fill | None:
        return self._fills.get(digest)

    def begin(self, digest: str, expected_size: int | None = None) -> Fill | None:
        """Start storing `digest`; None when it is stored already, being stored, or cannot be."""
        if not self.cacheable(digest) or digest in self._lru or digest in self._fills:
            return None
        if expected_size is not None:
            if expected_size > self.max_bytes:
                return None
            self._make_room(expected_size)
        path = os.path.join(self._tmp, secrets.token_hex(8))
        try:
            fill = Fill(self, digest, path)
        except OSError as e:
            log.warn("cannot cache {digest}: {error}", digest=digest, error=e.strerror)
            return None
        self._fills[digest] = fill
        return fill

    def _fill_ended(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]

    def _committed(self, fill: Fill) -> None:
        self._fill_ended(fill)
        self._lru[fill.digest] = fill.written
        self.size += fill.written
        self._make_room(0)

    # -- eviction
    def _make_room(self, incoming: int) -> None:
        while self._lru and self.size + incoming > self.max_bytes:
            digest, size = self._lru.popitem(last=False)
            self.size -= size
            self.evictions += 1
            try:
                os.unlink(self.path_of(digest))
            except FileNotFoundError:
                pass
            # pairs of evicted blobs are dropped from memory; the log keeps growing until
            # compacted at the next start (only pairs of blobs present are read back)
            self._known.pop(digest, None)

    def remove(self, digest: str) -> None:
        """Forget a blob found corrupt on disk (it will be fetched again)."""
        size = self._lru.pop(digest, None)
        self._known.pop(digest, None)
        if size is not None:
            self.size -= size
            try:
                os.unlink(self.path_of(digest))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        for fill in list(self._fills.values()):
            fill.abort("shutting down")
        self._known_log.close()
