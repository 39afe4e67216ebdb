"""The layer cache's store: blobs on local disk, once per digest, verified before anyone sees them.

Blobs are immutable and named by their digest, so the store keys by digest alone: a layer
pulled through fifty repositories is stored once. A blob arrives through a `Fill` (bytes are
appended to a temporary file as they come from upstream and hashed on the way, by a thread of
the fill's own when the store has `Threads`, so the reactor thread only relays); it becomes
visible only after its sha256 matches, by an atomic rename. Anything else (a mismatch, an
interrupted transfer, a full disk) leaves nothing behind.

What a repository may be served from the cache is remembered separately: a blob is served
for repository R only after the upstream confirmed once that R holds it (`confirm`), so the
cache never shows across repositories what the upstream would not. A delete the upstream
accepted takes that back (`revoke`). Confirmations and revocations are appended, in the order
they happened, to one log (`SharedLog`) that survives restarts and is replayed in order.

Several `--workers` processes may share one directory: temporary files carry their
process's id (a start removes only those of dead processes), a blob committed twice is the
same bytes, a file another process evicted is noticed when opened, and `rescan` adopts
what the others stored and confirmed. What must be seen at once, a write that took
something back, is announced by appending to a generation file (`bump`): every request
compares its (inode, size) with what its process saw last (`generation`: one stat) and, if
it grew, reads the logs' new lines before trusting its memory (`catch_up`). A stat rather
than a message between processes: nothing to set up, nothing lost when a process restarts,
and the logs stay the one record of what is true.

Nothing here speaks HTTP; `layer.LayerCache` decides when to look and when to fill.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from queue import SimpleQueue
from typing import Any, Callable, Iterable, NamedTuple, Protocol

from twisted.logger import Logger

__all__ = [
    "BlobStore", "Fill", "ReactorThreads", "Threads", "SharedLog", "Stat", "free_margin",
    "hash_file", "MAX_BACKLOG", "MAX_MEDIA_TYPE", "MAX_GENERATION", "MIN_FREE",
]

log = Logger()

_SHA256 = re.compile(r"sha256:([0-9a-f]{64})\Z")
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
MAX_MEDIA_TYPE = 255
MAX_GENERATION = 1 << 20  # a start compacts the generation file once it has grown this big
MIN_FREE = 64 << 20  # free space always left on the cache's file system: this, or 1% of it if more
SPACE_RESCAN_EVERY = 5.0  # seconds: at most this often, a disk short of space makes a worker rescan


def free_margin(total: int) -> int:
    """Bytes the cache leaves free on a file system of `total` bytes: 1% of it, at least 64 MiB,
    so that its logs, the other workers' transfers and whatever else shares the disk keep room."""
    return max(total // 100, MIN_FREE)


class Stat(NamedTuple):
    """What identifies a file's contents cheaply: a change of any means it must be verified again."""

    size: int
    mtime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Stat":
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def hash_file(fd: int, size: int) -> str:
    """The sha256 digest of the first `size` bytes of an open file (run in a thread: it reads it all)."""
    h = hashlib.sha256()
    pos = 0
    while pos < size:
        data = os.pread(fd, min(1 << 20, size - pos), pos)
        if not data:
            break
        h.update(data)
        pos += len(data)
    return "sha256:" + h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedLog:
    """An append-only file of lines that several processes write, each reading it as it grows.

    A record is one `os.write` on an O_APPEND descriptor, so records of different processes
    never interleave. A reader keeps its own offset and reads only what was added since
    (`new_lines`), complete lines only. A file replaced by a newer start's compaction (another
    inode) is followed: appends go to the new file and reading starts again at its beginning,
    which `new_lines` says, since that file is the whole state, not news to add to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._ino = -1
        self._read = 0
        self._fresh = True  # nothing read from this file yet
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._ino = os.fstat(fd).st_ino
        self._read = 0
        self._fresh = True

    def _follow(self) -> None:
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            ino = -1
        if ino != self._ino:
            self._open()

    def append(self, lines: list[str]) -> None:
        """Add lines (no newlines in them) as one record. Raises OSError (a full disk...)."""
        self._follow()
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        while data:
            data = data[os.write(self._fd, data) :]

    def new_lines(self) -> tuple[bool, list[str]]:
        """(from the start, the complete lines added since the last call): from the start the
        first time, and when the file was replaced since."""
        self._follow()
        from_start, self._fresh = self._fresh, False
        chunks = []
        pos = self._read
        while True:
            chunk = os.pread(self._fd, 1 << 20, pos)
            if not chunk:
                break
            chunks.append(chunk)
            pos += len(chunk)
        data = b"".join(chunks)
        end = data.rfind(b"\n") + 1  # half a line may still be being written: left for next time
        self._read += end
        return from_start, data[:end].decode("utf-8", "replace").splitlines()

    def rewrite(self, lines: Iterable[str]) -> None:
        """Replace the file by `lines` (compaction at start, by the first process of a group only)."""
        tmp = self.path + ".new"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, self.path)
        self._open()
        self._read = os.fstat(self._fd).st_size
        self._fresh = False  # what it holds is what the caller has

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Threads(Protocol):
    """Where fills write and hash: a thread per fill (`start`), results back on the reactor thread (`back`)."""

    def start(self, work: Callable[[], None], name: str) -> threading.Thread: ...

    def back(self, call: Callable[..., None], *args: Any) -> None: ...


class ReactorThreads:
    """A thread per fill, its results through the reactor's `callFromThread`. hashlib and write(2)
    release the GIL for big buffers, so a blob's sha256 and disk write run beside the relay on
    another core instead of in the reactor's turn."""

    __slots__ = ("reactor",)

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def start(self, work: Callable[[], None], name: str) -> threading.Thread:
        # a daemon: a hung disk must not keep the process alive (`BlobStore.close` joins, with a bound)
        thread = threading.Thread(target=work, name=name, daemon=True)
        thread.start()
        return thread

    def back(self, call: Callable[..., None], *args: Any) -> None:
        self.reactor.callFromThread(call, *args)


MAX_BACKLOG = 2 << 20  # bytes of a fill not yet written and hashed: beyond, the upstream waits for the disk
RESUME_BACKLOG = 512 << 10  # a paused upstream resumes once its fill is down to this
_END = b""  # queued by `finish`: the body is complete
_STOP = None  # queued by a failure: drop everything, remove the file


class Fill:
    """One blob on its way into the store. `write` as bytes arrive, then `finish` or `abort`.

    Followers (other requests for the same blob) read what is already in the temporary
    file and are told about more with `on_progress` callbacks.

    With the store's `Threads`, the bytes are written and hashed by a thread of this fill's own,
    in order, through a queue: the reactor thread only queues them. `written`, the listeners and the
    digest check stay on the reactor thread (`back`). The file belongs to the thread until it reports
    the end (`_ended`) or removes it (a failure queues `_STOP`). The queue is bounded: past `MAX_BACKLOG`
    the producer given to `attach` is paused or, without one, the reactor waits for the disk as it did
    when it wrote itself. Without `Threads` (tests), all of it happens in `write` and `finish`."""

    __slots__ = (
        "store", "digest", "path", "size", "_file", "_hash", "written", "state", "_listeners", "failed_reason",
        "_threads", "_queue", "_thread", "_room", "_queued", "_done", "_told", "_ending", "_handed_back", "_producer",
        "_paused",
    )

    def __init__(self, store: "BlobStore", digest: str, path: str, size: int | None) -> None:
        self.store = store
        self.digest = digest
        self.path = path
        self.size = size  # what the upstream announced, if it did
        self._file: Any = open(path, "wb", buffering=0)
        self._hash = hashlib.sha256()
        self.written = 0  # bytes in the file and hashed, as the reactor thread knows it
        self.state = "filling"  # then "done", "failed"
        self._listeners: list[Callable[["Fill"], None]] = []
        self.failed_reason = ""
        self._threads: Threads | None = store.threads
        self._queue: SimpleQueue[bytes | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._room = threading.Condition()  # the thread tells a waiting reactor that the backlog shrank
        self._queued = 0  # bytes queued (the reactor thread counts)
        self._done = 0  # bytes written and hashed (the fill's thread counts)
        self._told = False  # news of `_done` is on its way to the reactor thread
        self._ending = False  # `finish` was called
        self._handed_back = False  # the thread is over and the file is the reactor thread's again
        self._producer: Any = None
        self._paused = False

    def attach(self, producer: Any) -> None:
        """What to pause when the disk falls behind (the upstream connection's transport)."""
        self._producer = producer

    def fileno(self) -> int:
        return int(self._file.fileno())

    def on_progress(self, listener: Callable[["Fill"], None]) -> None:
        self._listeners.append(listener)

    def off_progress(self, listener: Callable[["Fill"], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _tell(self) -> None:
        for listener in list(self._listeners):
            listener(self)

    # -- the reactor thread
    def write(self, data: bytes) -> None:
        if self.state != "filling" or self._ending or not data:
            return
        threads = self._threads
        if threads is None:
            try:
                self._store(data)
            except OSError as e:
                return self._fail(_failure(e))
            return self._wrote(len(data))
        self._queued += len(data)
        self._queue.put(data)
        if self._thread is None:
            self._thread = threads.start(self._work, "cache-fill")
        if self._queued - self._done > MAX_BACKLOG:
            self._hold()

    def _hold(self) -> None:
        """Too much waits for the disk: pause the upstream, or wait here if there is nothing to pause."""
        producer = self._producer
        if producer is not None:
            if not self._paused:
                self._paused = True
                producer.pauseProducing()
            return
        thread = self._thread
        with self._room:
            while self._queued - self._done > MAX_BACKLOG and thread is not None and thread.is_alive():
                self._room.wait(0.5)

    def _caught_up(self) -> None:
        """The thread's news (one call for however many batches it wrote since the last one)."""
        with self._room:
            self._told = False
            done = self._done
        self._wrote(done - self.written)

    def _wrote(self, n: int) -> None:
        if self.state != "filling" or not n:
            return
        self.written += n
        if self._paused and self._queued - self._done <= RESUME_BACKLOG:
            self._paused = False
            self._producer.resumeProducing()
        if self._listeners:
            self._tell()

    def finish(self) -> bool:
        """The upstream body ended: keep the blob if it is what its digest says. True if kept by
        now (without `Threads`, always decided by now; with them, once the queue is written)."""
        if self.state != "filling" or self._ending:
            return False
        self._ending = True
        # the connection has been handed back (to its pool or closed): it is not ours to pause or resume
        self._producer = None
        self._paused = False
        if self._thread is None:  # nothing queued: decide here
            self._handed_back = True
            self._ended("sha256:" + self._hash.hexdigest())
        else:
            self._queue.put(_END)
        return self.state == "done"

    def _ended(self, digest: str) -> None:
        self._handed_back = True
        if self._thread is not None:
            self._wrote(self._done - self.written)  # the thread is over: all it wrote is counted
        if self.state != "filling":  # failed while the thread finished: the file is ours to remove
            return self._remove()
        if (self.size is not None and self.written != self.size) or digest != self.digest:
            self.store.mismatches += 1
            log.error("blob {digest} from upstream does not match its digest; not cached", digest=self.digest)
            self._fail("digest mismatch")
            return
        try:
            self._file.close()
            os.replace(self.path, self.store.path_of(self.digest))
        except OSError as e:
            self._fail(f"commit failed: {e.strerror}")
            return
        self.state = "done"
        try:
            self.store._committed(self, Stat.of(os.stat(self.store.path_of(self.digest))))
        except OSError:
            pass  # evicted or removed at once by another process: nothing to index
        self._tell()

    def abort(self, reason: str) -> None:
        """The transfer was interrupted: leave nothing behind."""
        if self.state == "filling":
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        self.state = "failed"
        self.failed_reason = reason
        if self._thread is not None and not self._handed_back:
            self._queue.put(_STOP)  # the thread removes the file
        else:
            self._remove()
        if self._paused:
            self._paused = False
            self._producer.resumeProducing()
        self.store._fill_ended(self)
        self._tell()

    def _remove(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def join(self, timeout: float) -> None:
        """Wait for the thread (after `abort`), at shutdown."""
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the fill's thread
    def _store(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]
        self._hash.update(data)

    def _work(self) -> None:
        """Write and hash what is queued, in order, in batches (one report to the reactor per batch)."""
        assert self._threads is not None
        back = self._threads.back
        get = self._queue.get
        broken = False
        while True:
            batch = [get()]
            while not self._queue.empty() and len(batch) < 64:
                batch.append(get())
            n = 0
            for data in batch:
                if data is _STOP:
                    return self._remove()
                if broken:
                    continue  # a write failed: wait for the reactor's _STOP
                if data is _END:
                    self._report(n)
                    back(self._ended, "sha256:" + self._hash.hexdigest())
                    return  # the file is the reactor thread's again
                try:
                    self._store(data)
                except OSError as e:
                    broken = True
                    back(self._fail_from_thread, _failure(e))
                    continue
                n += len(data)
            self._report(n)

    def _report(self, n: int) -> None:
        if n:
            with self._room:
                self._done += n
                self._room.notify()
                tell, self._told = not self._told, True
            if tell:  # else the reactor has not read the last news yet: it will read this with it
                assert self._threads is not None
                self._threads.back(self._caught_up)

    def _fail_from_thread(self, reason: str) -> None:
        if self.state == "filling":
            self._fail(reason)  # the thread removes the file when it reads the _STOP this queues


def _failure(e: OSError) -> str:
    # a full disk must never break the pull: stop caching, keep streaming
    return "disk full" if e.errno == errno.ENOSPC else f"write failed: {e.strerror}"


class BlobStore:
    """Verified blobs under `root`, at most `max_bytes` of them and never more than its file system
    holds beside a margin kept free (`free_margin`), least recently used evicted first."""

    def __init__(
        self,
        root: str,
        max_bytes: int,
        allocate: Callable[[int, int, int], None] | None = os.posix_fallocate,
        compact: bool = True,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
        threads: Threads | None = None,
    ) -> None:
        self.root = root
        # where fills write and hash; None: in the caller's turn (`LayerCache` gives a reactor's threads)
        self.threads = threads
        self.max_bytes = max_bytes
        self._allocate = allocate  # reserves a blob's space up front, so a full disk shows before any byte
        self._statvfs = statvfs  # the free space of root's file system (tests fake a small disk)
        self.compact = compact  # rewrite the logs at start: only the first process of a --workers group does
        self._prefix = f"{os.getpid()}-"
        self._blobs = os.path.join(root, "blobs", "sha256")
        self._blob_prefix = os.path.join(self._blobs, "")
        self._tmp = os.path.join(root, "tmp")
        self._known_path = os.path.join(root, "known")
        self._generation_path = os.path.join(root, "generation")
        os.makedirs(self._blobs, exist_ok=True)
        os.makedirs(self._tmp, exist_ok=True)
        if compact:
            self._compact_generation()
        # taken before anything is read: a write recorded from here on is caught up with later
        self.loaded_generation = self.generation()
        self._known_log = SharedLog(self._known_path)
        self._lru: OrderedDict[str, int] = OrderedDict()  # digest -> size, least recent first
        self.size = 0
        self._known: dict[str, set[str]] = {}  # digest -> repositories confirmed to hold it
        self._fills: dict[str, Fill] = {}
        self._verified: dict[str, Stat] = {}  # digest -> the file as it was when its sha256 was last checked
        self._types: dict[str, str] = {}  # manifest digest -> media type
        self.evictions = 0
        self.mismatches = 0
        self.disk_full = 0
        self._next_space_rescan = 0.0  # when a disk short of space may make us rescan again
        self._load()

    # -- start-up: partial files go, the index is rebuilt from the files themselves
    def _load(self) -> None:
        own = os.getpid()
        for name in os.listdir(self._tmp):
            pid = name.partition("-")[0]
            if pid.isdigit() and int(pid) != own and _pid_alive(int(pid)):
                continue  # another worker's transfer in progress
            try:
                os.unlink(os.path.join(self._tmp, name))
            except OSError:
                pass
        found = []
        for name in os.listdir(self._blobs):
            if not _HEX64.match(name):
                continue
            try:
                st = os.stat(os.path.join(self._blobs, name))
            except FileNotFoundError:
                continue
            found.append((st.st_mtime, "sha256:" + name, st.st_size))
        for _, digest, size in sorted(found):
            self._lru[digest] = size
            self.size += size
        self._apply_known(self._known_log.new_lines()[1], stored_only=True)
        if not self.compact:
            return
        # compact the log to the pairs whose blobs are still here (revocations are applied)
        self._known_log.rewrite(
            f"{repo} {digest}" for digest, repos in self._known.items() for repo in sorted(repos)
        )
        self._make_room(0)

    def _apply_known(self, lines: list[str], stored_only: bool) -> None:
        """Replay lines of the pairs log in order: `repo digest` confirms, `-repo digest` revokes
        (repository names never start with `-`)."""
        for line in lines:
            revoked = line.startswith("-")
            repo, _, digest = line[1 if revoked else 0 :].strip().partition(" ")
            if not digest:
                continue
            if revoked:
                repos = self._known.get(digest)
                if repos is not None:
                    repos.discard(repo)
            elif not stored_only or digest in self._lru:
                self._known.setdefault(digest, set()).add(repo)

    def _compact_generation(self) -> None:
        try:
            if os.stat(self._generation_path).st_size < MAX_GENERATION:
                return
        except FileNotFoundError:
            pass
        # a new, empty file (a new inode): a process still watching the old one sees the change
        tmp = self._generation_path + ".new"
        open(tmp, "wb").close()
        os.replace(tmp, self._generation_path)

    @staticmethod
    def cacheable(digest: str) -> bool:
        return _SHA256.match(digest) is not None

    def path_of(self, digest: str) -> str:
        return self._blob_prefix + digest[7:]  # digest is "sha256:<hex>" (`cacheable`)

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
        if digest not in self._lru and digest not in self._fills:
            return  # nothing stored to reveal; remembering would only grow memory
        repos = self._known.setdefault(digest, set())
        if repository not in repos:
            repos.add(repository)
            try:
                self._known_log.append([f"{repository} {digest}"])
            except OSError as e:  # the others will ask the upstream themselves
                log.warn("cannot record a confirmation in the cache: {error}", error=e.strerror)

    def revoke(self, repository: str, digest: str) -> None:
        """The upstream accepted a delete of `digest` in `repository`: no longer confirmed, here and
        on disk. Raises OSError if it cannot be recorded; then call `bump` to tell the others."""
        repos = self._known.get(digest)
        if repos is not None:
            repos.discard(repository)
        self._known_log.append([f"-{repository} {digest}"])

    # -- what other processes changed
    def generation(self) -> tuple[int, int] | None:
        """(inode, size) of the generation file: it grows with every write a process recorded."""
        try:
            st = os.stat(self._generation_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size

    def bump(self) -> None:
        """Tell every process on this directory that what may be served changed (after the logs
        say how). Raises OSError."""
        fd = os.open(self._generation_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, b"\n")
        finally:
            os.close(fd)

    def catch_up(self) -> None:
        """Apply what was appended to the pairs log since we last read it, in order."""
        from_start, lines = self._known_log.new_lines()
        if from_start:  # replaced by a newer start's compaction: the whole state, revocations applied
            self._known = {}
        self._apply_known(lines, stored_only=False)

    # -- filling
    def filling(self, digest: str) -> Fill | None:
        return self._fills.get(digest)

    def begin(self, digest: str, expected_size: int | None = None) -> Fill | None:
        """Start storing `digest`; None when it is stored already, being stored, or cannot be."""
        if not self.cacheable(digest) or digest in self._lru or digest in self._fills:
            return None
        room: bool | None = None  # the file system has room beside its margin (None: cannot tell)
        if expected_size is not None:
            if expected_size > self.max_bytes:
                return None
            self._make_room(expected_size)
            room = self._make_space(expected_size)
            if room is False:
                self.disk_full += 1
                log.warn("cache disk full: {digest} is streamed without caching", digest=digest)
                return None
        path = os.path.join(self._tmp, self._prefix + secrets.token_hex(8))
        try:
            fill = Fill(self, digest, path, expected_size)
        except OSError as e:
            log.warn("cannot cache {digest}: {error}", digest=digest, error=e.strerror)
            return None
        if expected_size and self._allocate is not None:
            try:
                self._allocate(fill.fileno(), 0, expected_size)
            except OSError as e:
                unsupported = e.errno in (errno.EOPNOTSUPP, errno.EINVAL)
                # unsupported: the free space checked above is all there is; not known: never start
                if not unsupported or room is None:
                    if e.errno == errno.ENOSPC or unsupported:
                        self.disk_full += 1  # ENOSPC: another process took the space since the check
                        log.warn("cache disk full: {digest} is streamed without caching", digest=digest)
                    else:
                        log.warn("cannot cache {digest}: {error}", digest=digest, error=e.strerror)
                    fill._file.close()
                    os.unlink(path)
                    return None
        self._fills[digest] = fill
        return fill

    def put(self, digest: str, data: bytes, media_type: str | None = None) -> bool:
        """Store a small blob held whole (a manifest) with its media type, if `data` is what `digest` says."""
        if not self.cacheable(digest) or digest in self._lru or len(data) > self.max_bytes:
            return False
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            self.mismatches += 1
            log.error("manifest {digest} from upstream does not match its digest; not cached", digest=digest)
            return False
        self._make_room(len(data))
        if self._make_space(len(data)) is False:
            self.disk_full += 1
            log.warn("cache disk full: manifest {digest} is not cached", digest=digest)
            return False
        path = self.path_of(digest)
        tmp = os.path.join(self._tmp, self._prefix + secrets.token_hex(8))
        try:
            if media_type is not None:
                with open(tmp, "w", encoding="latin-1") as f:
                    f.write(media_type[:MAX_MEDIA_TYPE])
                os.replace(tmp, path + ".type")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            st = os.stat(path)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self.disk_full += 1
            log.warn("cannot cache manifest {digest}: {error}", digest=digest, error=e.strerror)
            for leftover in (tmp, path + ".type"):
                try:
                    os.unlink(leftover)
                except OSError:
                    pass
            return False
        if media_type is not None:
            self._types[digest] = media_type
        self._lru[digest] = len(data)
        self.size += len(data)
        self._verified[digest] = Stat.of(st)
        return True

    def media_type(self, digest: str) -> str | None:
        """The media type a manifest was stored with (read once from its side file)."""
        found = self._types.get(digest)
        if found is None:
            try:
                with open(self.path_of(digest) + ".type", encoding="latin-1") as f:
                    found = f.read(MAX_MEDIA_TYPE)
            except OSError:
                return None
            self._types[digest] = found
        return found

    # -- serving: a file is trusted as long as it is the file that was verified
    def open(self, digest: str) -> tuple[int, Stat] | None:
        """An open descriptor on a stored blob, or None (and forgotten) if another process evicted it.
        Opening is serving: the blob becomes the most recently used."""
        try:
            fd = os.open(self.path_of(digest), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._forget(digest)
            return None
        if digest in self._lru:
            self._lru.move_to_end(digest)
        return fd, Stat.of(os.fstat(fd))

    def trusted(self, digest: str, stat: Stat) -> bool:
        return self._verified.get(digest) == stat

    def verified(self, digest: str, stat: Stat, ok: bool) -> None:
        """The outcome of hashing a stored file (see `hash_file`): trust it, or throw it away."""
        if ok:
            self._verified[digest] = stat
            return
        self.mismatches += 1
        log.error("cached blob {digest} is corrupt on disk; removed, it will be fetched again", digest=digest)
        self.remove(digest)

    def _fill_ended(self, fill: Fill) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]

    def _committed(self, fill: Fill, stat: Stat) -> None:
        self._fill_ended(fill)
        if fill.digest not in self._lru:
            self._lru[fill.digest] = fill.written
            self.size += fill.written
        self._verified[fill.digest] = stat
        self._make_room(0)

    # -- eviction
    def _make_room(self, incoming: int) -> None:
        while self._lru and self.size + incoming > self.max_bytes:
            digest = next(iter(self._lru))
            self.evictions += 1
            # pairs of evicted blobs are dropped from memory; the log keeps growing until
            # compacted at the next start (only pairs of blobs present are read back)
            self.remove(digest)

    def _space(self) -> tuple[int, int] | None:
        """(bytes free, bytes in all) of the file system holding the cache, or None if it cannot tell."""
        try:
            st = self._statvfs(self._tmp)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def _make_space(self, incoming: int) -> bool | None:
        """Evict least recently used blobs until the file system has `incoming` bytes free beside
        its margin (`free_margin`), whatever --cache-size allows: the disk may be smaller, or shared.
        False, having evicted nothing, when evicting everything this process knows of would not do
        (after adopting what other workers stored); None when the free space cannot be known."""
        space = self._space()
        if space is None:
            return None
        free, total = space
        need = incoming + free_margin(total)
        if free >= need:
            return True
        if need > total:
            return False  # more than the file system can ever hold
        now = time.monotonic()
        if free + self.size < need and now >= self._next_space_rescan:
            # other workers' blobs may be what fills the disk: adopt them (least recently used first)
            self._next_space_rescan = now + SPACE_RESCAN_EVERY
            try:
                self.rescan()
            except OSError as e:
                log.warn("cannot rescan the cache: {error}", error=e.strerror)
            space = self._space()
            if space is None:
                return None
            free = space[0]
        if free + self.size < need:
            return False  # the space is held by something else: keep what we have
        while free < need and self._lru:
            # removed like any eviction: the other workers notice the file gone (open, rescan)
            self.evictions += 1
            self.remove(next(iter(self._lru)))
            space = self._space()
            if space is None:
                return None
            free = space[0]
        return free >= need

    def remove(self, digest: str) -> None:
        """Delete a blob (evicted, or found corrupt on disk: it will be fetched again)."""
        path = self.path_of(digest)
        for name in (path, path + ".type"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
        self._forget(digest)

    def _forget(self, digest: str) -> None:
        size = self._lru.pop(digest, None)
        if size is not None:
            self.size -= size
        self._known.pop(digest, None)
        self._verified.pop(digest, None)
        self._types.pop(digest, None)

    def rescan(self) -> None:
        """Catch up with the directory: blobs other processes stored or evicted, pairs they confirmed."""
        present: dict[str, tuple[int, int]] = {}
        for name in os.listdir(self._blobs):
            if _HEX64.match(name):
                try:
                    st = os.stat(os.path.join(self._blobs, name))
                except FileNotFoundError:
                    continue
                present["sha256:" + name] = (st.st_mtime_ns, st.st_size)
        for digest in [d for d in self._lru if d not in present]:
            self._forget(digest)
        # news to us, not recently used by us: first in line for eviction, the oldest file first
        for _, digest, size in sorted(((m, d, s) for d, (m, s) in present.items() if d not in self._lru), reverse=True):
            self._lru[digest] = size
            self._lru.move_to_end(digest, last=False)
            self.size += size
        self.catch_up()
        # pairs read (here or by a `catch_up` since the last rescan) for blobs we do not hold
        for digest in [d for d in self._known if d not in self._lru and d not in self._fills]:
            del self._known[digest]
        self._make_room(0)

    def close(self) -> None:
        fills = list(self._fills.values())
        for fill in fills:
            fill.abort("shutting down")
        for fill in fills:
            fill.join(5.0)
        self._known_log.close()
