"""The layer cache's store: atomic commit, verification, eviction order, restarts, Range arithmetic."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Callable

import pytest

from ecr_twisted.cache import store as store_mod
from ecr_twisted.cache.ranges import UNSATISFIABLE, parse_range
from ecr_twisted.cache.store import MIN_FREE, BlobStore, SharedLog, free_margin

MIB = 1 << 20


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fill(store: BlobStore, data: bytes, repo: str = "app", chunks: int = 3) -> str:
    digest = digest_of(data)
    f = store.begin(digest, len(data))
    assert f is not None
    step = max(1, len(data) // chunks)
    for i in range(0, len(data), step):
        f.write(data[i : i + step])
    assert f.finish()
    store.confirm(repo, digest)
    return digest


def test_a_blob_is_visible_only_after_it_is_verified(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), 1 << 20)
    data = os.urandom(5000)
    digest = digest_of(data)
    f = store.begin(digest, len(data))
    assert f is not None and store.begin(digest) is None and store.filling(digest) is f
    f.write(data[:100])
    store.confirm("app", digest)
    assert store.get("app", digest) is None and not os.path.exists(store.path_of(digest))
    f.write(data[100:])
    assert f.finish() and f.state == "done"
    path, size = store.get("app", digest)  # type: ignore[misc]
    assert size == 5000 and Path(path).read_bytes() == data
    assert store.filling(digest) is None and list((tmp_path / "tmp").iterdir()) == []


def test_a_mismatch_or_an_interruption_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), 1 << 20)
    data = os.urandom(1000)
    digest = digest_of(data)
    f = store.begin(digest)
    assert f is not None
    f.write(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert not f.finish() and f.state == "failed" and f.failed_reason == "digest mismatch"
    assert store.mismatches == 1 and not store.has(digest)
    f = store.begin(digest)
    assert f is not None
    f.write(data[:500])
    f.abort("upstream closed mid-body")
    assert not store.has(digest) and list((tmp_path / "tmp").iterdir()) == []
    assert store.begin(digest) is not None  # and it can be tried again


def test_blobs_are_shared_but_served_only_to_confirmed_repositories(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), 1 << 20)
    digest = fill(store, b"layer shared by two repositories", repo="team-a/app")
    assert store.get("team-a/app", digest) is not None
    assert store.get("team-b/app", digest) is None  # the upstream never said team-b holds it
    store.confirm("team-b/app", digest)
    assert store.get("team-b/app", digest) is not None
    assert store.size == len(b"layer shared by two repositories")  # stored once


def test_least_recently_used_blobs_are_evicted_first(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), 3000)
    a, b, c = (fill(store, bytes([i]) * 1000) for i in range(3))
    assert store.get("app", a) is not None  # a is now the most recent
    d = fill(store, b"\x09" * 1000)
    assert not store.has(b) and store.has(a) and store.has(c) and store.has(d)
    assert store.evictions == 1 and store.size == 3000
    assert store.begin(digest_of(b"x" * 4000), 4000) is None  # bigger than the whole cache


def test_the_store_survives_a_restart_and_drops_partial_files(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), 1 << 20)
    kept = fill(store, b"kept across restarts", repo="team-a/app")
    partial = store.begin(digest_of(b"never finished"))
    assert partial is not None
    partial.write(b"never")
    # the process dies here: no close(), the partial file stays behind
    again = BlobStore(str(tmp_path), 1 << 20)
    assert again.get("team-a/app", kept) is not None and again.size == len(b"kept across restarts")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert again.get("team-b/app", kept) is None


def test_a_full_disk_stops_caching_but_not_the_transfer(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), 1 << 20)
    data = b"y" * 100
    f = store.begin(digest_of(data))
    assert f is not None

    class Full:
        def write(self, b: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    f._file = Full()
    seen: list[str] = []
    f.on_progress(lambda fl: seen.append(fl.state))
    f.write(data)  # no exception reaches the data path
    assert f.state == "failed" and f.failed_reason == "disk full" and seen == ["failed"]
    assert not f.finish() and not store.has(digest_of(data))


def test_followers_hear_of_progress_and_the_end(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), 1 << 20)
    data = os.urandom(3000)
    f = store.begin(digest_of(data))
    assert f is not None
    seen: list[tuple[str, int]] = []
    f.on_progress(lambda fl: seen.append((fl.state, fl.written)))
    f.write(data[:1000])
    f.write(data[1000:])
    f.finish()
    assert seen == [("filling", 1000), ("filling", 3000), ("done", 3000)]


class FakeDisk:
    """A file system of `capacity` bytes holding the cache directory (and `other` bytes of someone
    else's): statvfs reports what the files under `root` really take, and fallocate fails with
    ENOSPC past the capacity, as on a real disk, without mounting anything."""

    def __init__(self, root: Path, capacity: int, other: int = 0) -> None:
        self.root = root
        self.capacity = capacity
        self.other = other
        self.lowest_free = capacity

    def used(self) -> int:
        return self.other + sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def free(self) -> int:
        return max(0, self.capacity - self.used())

    def statvfs(self, path: str) -> os.statvfs_result:
        assert path.startswith(str(self.root))
        free = self.free()
        return os.statvfs_result((4096, 1, self.capacity, free, free, 1 << 20, 1 << 20, 1 << 20, 0, 255))

    def allocate(self, fd: int, offset: int, length: int) -> None:
        if offset + length - os.fstat(fd).st_size > self.free():
            raise OSError(errno.ENOSPC, "No space left on device")
        os.posix_fallocate(fd, offset, length)
        self.lowest_free = min(self.lowest_free, self.free())

    def store(self, max_bytes: int = 1 << 40, compact: bool = True) -> BlobStore:
        return BlobStore(str(self.root), max_bytes, allocate=self.allocate, compact=compact, statvfs=self.statvfs)


def test_the_margin_left_free_is_one_percent_of_the_file_system_and_at_least_64_mib() -> None:
    assert MIN_FREE == 64 * MIB
    assert free_margin(1 << 30) == 64 * MIB
    assert free_margin(6400 * MIB) == 64 * MIB
    assert free_margin(1 << 40) == (1 << 40) // 100


def test_a_cache_size_larger_than_the_disk_evicts_to_keep_caching(tmp_path: Path) -> None:
    # the fault: with --cache-size above the disk, nothing was evicted; once the disk had filled,
    # every new blob failed its reservation and streamed uncached, forever
    disk = FakeDisk(tmp_path, 64 * MIB + 13 * MIB)  # 13 MiB usable beside the 64 MiB margin
    store = disk.store()  # --cache-size 1 TiB
    digests, uncached = [], []
    for i in range(22):  # 88 MiB of blobs go through a 77 MiB disk
        data = bytes([i]) * (4 * MIB)
        digests.append(digest_of(data))
        f = store.begin(digests[-1], len(data))
        if f is None:
            uncached.append(i)
            continue
        f.write(data)
        assert f.finish()
    assert uncached == [] and store.disk_full == 0
    assert disk.free() >= 64 * MIB and disk.lowest_free >= 64 * MIB  # the margin was kept all along
    assert [d for d in digests if store.has(d)] == digests[-3:]  # three fit, the oldest went first
    assert store.evictions == 19 and store.size == 12 * MIB
    assert sorted(p.name for p in (tmp_path / "blobs" / "sha256").iterdir()) == sorted(d[7:] for d in digests[-3:])


def test_a_blob_the_disk_cannot_hold_is_streamed_uncached_and_nothing_is_evicted_for_it(tmp_path: Path) -> None:
    disk = FakeDisk(tmp_path, 64 * MIB + 10 * MIB)
    store = disk.store()
    kept = [fill(store, bytes([i]) * (3 * MIB)) for i in range(3)]
    for size in (11 * MIB, 80 * MIB):  # more than the disk holds beside its margin; more than the disk
        assert store.begin(digest_of(b"big" + bytes(size)), size) is None
    assert store.disk_full == 2 and store.evictions == 0 and all(store.has(d) for d in kept)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert fill(store, b"small") and store.evictions == 0  # what fits still goes in


def test_space_taken_by_something_else_is_not_evicted_for(tmp_path: Path) -> None:
    disk = FakeDisk(tmp_path, 64 * MIB + 8 * MIB)
    store = disk.store()
    a = fill(store, b"a" * (2 * MIB))
    disk.other = 7 * MIB  # another program fills the disk: evicting a (2 MiB) would not free 4 MiB
    assert store.begin(digest_of(b"b" * (4 * MIB)), 4 * MIB) is None
    assert store.disk_full == 1 and store.has(a)
    disk.other = 3 * MIB  # now evicting a is enough
    b = fill(store, b"b" * (4 * MIB))
    assert store.has(b) and not store.has(a) and store.evictions == 1 and disk.free() >= 64 * MIB


def test_a_worker_short_of_space_evicts_what_another_worker_stored(tmp_path: Path) -> None:
    disk = FakeDisk(tmp_path, 64 * MIB + 10 * MIB)
    one = disk.store()
    two = disk.store(compact=False)  # a --workers child, started before one stored anything
    olds = [fill(one, bytes([i]) * (3 * MIB)) for i in range(3)]
    for age, digest in enumerate(reversed(olds), 1):  # stored a while ago, olds[0] first (mtime order)
        os.utime(one.path_of(digest), (1e9 - age, 1e9 - age))
    assert two.size == 0  # not rescanned yet: two does not know of them
    new = fill(two, b"n" * (3 * MIB))  # two adopts them (rescan) and evicts the oldest
    assert not os.path.exists(one.path_of(olds[0])) and two.evictions == 1 and disk.free() >= 64 * MIB
    assert one.open(olds[0]) is None and not one.has(olds[0])  # one notices as it would any eviction
    one.rescan()
    assert one.has(new) and one.has(olds[2])


@pytest.mark.parametrize(
    "header,size,expected",
    [
        (None, 100, None),
        (b"bytes=0-99", 100, (0, 99)),
        (b"bytes=10-", 100, (10, 99)),
        (b"bytes=10-1000", 100, (10, 99)),
        (b"bytes=-10", 100, (90, 99)),
        (b"bytes=-1000", 100, (0, 99)),
        (b"bytes=100-", 100, UNSATISFIABLE),
        (b"bytes=-0", 100, UNSATISFIABLE),
        (b"bytes=0-0", 100, (0, 0)),
        (b"bytes=5-4", 100, None),
        (b"bytes=0-1,5-6", 100, None),  # several ranges: the whole blob (allowed by RFC 9110)
        (b"items=0-1", 100, None),
        (b"bytes=-", 100, None),
        (b"bytes=0-", 0, UNSATISFIABLE),
    ],
)
def test_range_arithmetic(header: bytes | None, size: int, expected: object) -> None:
    assert parse_range(header, size) == expected


# -- confirmations taken back, and what other processes on the directory see


def test_a_revocation_is_replayed_in_order_after_a_restart(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path), 1 << 20)
    a = fill(store, b"deleted for good", repo="app")
    b = fill(store, b"deleted, then pushed again", repo="app")
    store.confirm("other", a)
    store.revoke("app", a)
    store.revoke("app", b)
    store.confirm("app", b)  # confirmed again after the delete: the later line wins
    assert not store.knows("app", a) and store.knows("other", a) and store.knows("app", b)
    again = BlobStore(str(tmp_path), 1 << 20)
    assert not again.knows("app", a) and again.knows("other", a) and again.knows("app", b)
    assert again.has(a)  # the blob stays: another repository holds it
    compacted = (tmp_path / "known").read_text("ascii").splitlines()
    assert sorted(compacted) == sorted([f"other {a}", f"app {b}"])


def test_another_process_sees_a_revocation_once_the_generation_grew(tmp_path: Path) -> None:
    one = BlobStore(str(tmp_path), 1 << 20)
    digest = fill(one, b"a layer both processes serve")
    two = BlobStore(str(tmp_path), 1 << 20, compact=False)  # a --workers child
    seen = two.generation()
    assert two.knows("app", digest) and seen == two.loaded_generation
    one.revoke("app", digest)
    assert two.generation() == seen and two.knows("app", digest)  # not announced yet
    one.bump()
    assert two.generation() != seen
    two.catch_up()
    assert not two.knows("app", digest)
    one.confirm("app", digest)
    two.catch_up()
    assert two.knows("app", digest)


def test_a_log_replaced_by_a_newer_start_is_followed(tmp_path: Path) -> None:
    old = BlobStore(str(tmp_path), 1 << 20)
    digest = fill(old, b"a layer")
    newer = BlobStore(str(tmp_path), 1 << 20)  # compacts: a new "known" file under the old one's feet
    old.revoke("app", digest)  # appended to the new file, not lost in the replaced one
    old.bump()
    newer.catch_up()
    assert not newer.knows("app", digest)
    assert (tmp_path / "known").read_text("ascii").splitlines()[-1] == f"-app {digest}"


def test_a_half_written_line_is_read_once_complete(tmp_path: Path) -> None:
    log = SharedLog(str(tmp_path / "log"))
    log.append(["one", "two"])
    assert log.new_lines() == (True, ["one", "two"])
    with open(tmp_path / "log", "ab") as f:
        f.write(b"thr")
    assert log.new_lines() == (False, [])
    with open(tmp_path / "log", "ab") as f:
        f.write(b"ee\n")
    assert log.new_lines() == (False, ["three"]) and log.new_lines() == (False, [])


def test_a_compacted_log_replaces_what_a_running_process_knew(tmp_path: Path) -> None:
    one = BlobStore(str(tmp_path), 1 << 20)
    digest = fill(one, b"a layer")
    other = BlobStore(str(tmp_path), 1 << 20, compact=False)
    one.revoke("app", digest)
    one.bump()
    assert other.knows("app", digest)  # not caught up yet
    BlobStore(str(tmp_path), 1 << 20)  # a newer start compacts: the revocation is in no line any more
    other.catch_up()
    assert not other.knows("app", digest)


class PumpThreads:
    """`store.Threads` with real threads whose results wait for the test's thread, which plays the reactor (`pump`)."""

    def __init__(self) -> None:
        self.calls: SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]]] = SimpleQueue()
        self.threads: list[threading.Thread] = []

    def start(self, work: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=work, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def back(self, call: Callable[..., None], *args: Any) -> None:
        self.calls.put((call, args))

    def pump(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            call, args = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            call(*args)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(5.0)
            assert not thread.is_alive()


def test_a_fill_in_its_own_thread_writes_hashes_and_commits_in_order(tmp_path: Path) -> None:
    threads = PumpThreads()
    store = BlobStore(str(tmp_path), 64 * MIB, threads=threads)
    data = os.urandom(3 * MIB + 5)
    digest = digest_of(data)
    f = store.begin(digest, len(data))
    assert f is not None
    seen: list[tuple[str, int]] = []
    f.on_progress(lambda fl: seen.append((fl.state, fl.written)))
    for i in range(0, len(data), 100_000):
        f.write(data[i : i + 100_000])
        assert f._queued - f._done <= store_mod.MAX_BACKLOG + 100_000  # bounded: write waited for the disk
    assert not f.finish()  # decided later, on this thread
    threads.pump(lambda: f.state != "filling")
    threads.join()
    assert f.state == "done" and store.has(digest) and Path(store.path_of(digest)).read_bytes() == data
    assert seen[-1] == ("done", len(data)) and [w for _, w in seen] == sorted(w for _, w in seen)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_threaded_fill_that_fails_leaves_nothing(tmp_path: Path) -> None:
    threads = PumpThreads()
    store = BlobStore(str(tmp_path), 64 * MIB, threads=threads)
    data = os.urandom(MIB)
    bad = store.begin(digest_of(data))  # a mismatch, found by the thread's hash
    assert bad is not None
    bad.write(data[:-1] + bytes([data[-1] ^ 1]))
    bad.finish()
    threads.pump(lambda: bad.state != "filling")
    assert bad.failed_reason == "digest mismatch" and store.mismatches == 1
    cut = store.begin(digest_of(data))  # aborted while its thread holds the file
    assert cut is not None
    cut.write(data[:1000])
    cut.abort("client gone")
    assert cut.state == "failed" and store.filling(digest_of(data)) is None
    threads.join()
    assert list((tmp_path / "tmp").iterdir()) == [] and not store.has(digest_of(data))


def test_a_full_disk_in_the_fill_thread_fails_the_fill_not_the_transfer(tmp_path: Path) -> None:
    threads = PumpThreads()
    store = BlobStore(str(tmp_path), 64 * MIB, threads=threads)
    data = b"z" * 1000
    f = store.begin(digest_of(data))
    assert f is not None
    real = f._file

    class Full:
        def write(self, b: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            real.close()

    f._file = Full()
    f.write(data)
    threads.pump(lambda: f.state != "filling")
    assert f.failed_reason == "disk full" and not f.finish()
    threads.join()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_disk_behind_pauses_the_upstream_then_resumes_it(tmp_path: Path) -> None:
    threads = PumpThreads()
    store = BlobStore(str(tmp_path), 64 * MIB, threads=threads)
    data = os.urandom(4 * MIB)
    f = store.begin(digest_of(data), len(data))
    assert f is not None
    gate = threading.Event()
    real = f._file

    class Slow:
        def write(self, b: Any) -> int:
            gate.wait(10.0)
            return int(real.write(b))

        def close(self) -> None:
            real.close()

        def fileno(self) -> int:
            return int(real.fileno())

    f._file = Slow()
    events: list[str] = []

    class Producer:
        def pauseProducing(self) -> None:
            events.append("pause")

        def resumeProducing(self) -> None:
            events.append("resume")

    f.attach(Producer())
    step = 256 << 10
    for i in range(0, len(data), step):
        f.write(data[i : i + step])  # never blocks: the upstream is paused instead
    assert events == ["pause"]
    gate.set()
    threads.pump(lambda: f.written == len(data))
    assert events == ["pause", "resume"]
    f.finish()
    threads.pump(lambda: f.state != "filling")
    threads.join()
    assert f.state == "done" and store.has(digest_of(data))
