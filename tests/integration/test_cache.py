"""The layer cache (--cache-dir): hits never reach the registry, blobs live once per digest on disk.

A CountingRelay between the proxy and the registry records every request line the proxy sends
upstream, so "served from cache" is checked where it matters. Requests that must reach one
particular worker process (with ECRTEST_WORKERS=N) share one keep-alive connection.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import os
import pathlib
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping

import pytest
from proxy_harness import (
    MANIFEST_ACCEPT,
    MIB,
    TEST_WORKERS,
    CountingRelay,
    Proxy,
    ProxyFactory,
    Response,
    assert_layout_matches,
    connection,
    http_request,
    pull_via,
    push_direct,
    sha256_file,
    wait_for,
)

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.images import ImageInfo, make_big_oci_layout, make_oci_layout, make_tar_layer

STALE_WARNING = '110 - "Response is Stale"'
HEX64 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------- helpers
class KeepAlive:
    """One keep-alive connection to the proxy: with --workers N, one process serves every request on it."""

    def __init__(self, proxy: Proxy) -> None:
        self.conn = connection(proxy.url, timeout=60)
        self._sock: socket.socket | None = None

    def request(self, path: str, method: str = "GET", headers: Mapping[str, str] | None = None) -> Response:
        self.conn.request(method, path, headers=dict(headers or {}))
        resp = self.conn.getresponse()
        body = resp.read()
        sock = self.conn.sock
        assert sock is not None, f"the proxy closed the keep-alive connection after {method} {path}"
        if self._sock is None:
            self._sock = sock
        assert sock is self._sock, "the connection was reopened: another process may have served it"
        return Response(resp.status, resp.headers, body)

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def keep_alive(proxy: Proxy) -> Iterator[KeepAlive]:
    c = KeepAlive(proxy)
    try:
        yield c
    finally:
        c.close()


def image(tmp: pathlib.Path, seed: str, *layers: bytes, tag: str = "1.0") -> ImageInfo:
    if not layers:
        layers = (make_tar_layer({f"{seed}.txt": f"{seed}\n".encode(), "data": os.urandom(300_000)}),
                  os.urandom(150_000))
    return make_oci_layout(tmp / seed, list(layers), tag, labels={"seed": seed})


def blob_path(repo: str, digest: str) -> str:
    return f"/v2/{repo}/blobs/{digest}"


def hexof(digest: str) -> str:
    return digest.split(":", 1)[1]


def cached(cache: pathlib.Path, digest: str) -> pathlib.Path:
    return cache / "blobs" / "sha256" / hexof(digest)


def data_files(cache: pathlib.Path) -> dict[str, pathlib.Path]:
    """digest -> file of every stored blob or manifest (not the .type files)."""
    d = cache / "blobs" / "sha256"
    if not d.is_dir():
        return {}
    return {"sha256:" + p.name: p for p in d.iterdir() if HEX64.fullmatch(p.name)}


def cached_correctly(cache: pathlib.Path, digest: str) -> bool:
    path = cached(cache, digest)
    return path.is_file() and sha256_file(path) == digest


def corrupt(path: pathlib.Path, *, keep_mtime: bool) -> None:
    """Flip 4 bytes in the middle of a cached file in place: same inode, same size."""
    before = path.stat()
    good = sha256_file(path)
    os.chmod(path, before.st_mode | 0o200)
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        chunk = f.read(4)
        f.seek(before.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    os.chmod(path, before.st_mode)
    if keep_mtime:  # bit rot: nothing in stat() says the file changed
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif path.stat().st_mtime_ns == before.st_mtime_ns:  # a coarse clock tick: make the write visible
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10_000_000))
    after = path.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert (after.st_mtime_ns == before.st_mtime_ns) == keep_mtime
    assert sha256_file(path) != good


def counter(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.metric(name, **labels) or 0.0


def cache_proxy(factory: ProxyFactory, ecr: EmulatedECR, cache: pathlib.Path, *extra: str,
                upstream: str | None = None, one_process: bool = False) -> Proxy:
    """A proxy with the cache on; ``one_process`` ignores ECRTEST_WORKERS (what it served, it holds)."""
    if not one_process:
        return factory(ecr, "--cache-dir", str(cache), *extra, upstream=upstream)
    p = factory(ecr, "--cache-dir", str(cache), "--workers", "1", *extra, upstream=upstream,
                env_drop=["ECRPROXY_WORKERS"], wait="token")
    wait_for(lambda: p.ops("/readyz").status == 200, 15, f"{p.name} to be ready")
    return p


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cache_ecr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedECR]:
    """An emulator of its own (ECR-like: blobs answer 307 to S3, deletes allowed); one test kills its registry."""
    with EmulatedECR(tmp_path_factory.mktemp("ecr-cache"), delete=True) as emu:
        yield emu


@pytest.fixture(scope="module")
def relay(cache_ecr: EmulatedECR) -> Iterator[CountingRelay]:
    r = CountingRelay(int(cache_ecr.upstream_url.rsplit(":", 1)[1]))
    yield r
    r.close()


# ---------------------------------------------------------------- a second pull stays local
def test_second_pull_makes_no_upstream_blob_requests(
    cache_ecr: EmulatedECR, relay: CountingRelay, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    repo = "cache/twice"
    info = image(tmp_path, "twice")
    push_direct(cache_ecr, info, repo)
    cache = tmp_path / "cache"
    p = cache_proxy(proxy_factory, cache_ecr, cache, upstream=relay.url)

    first = relay.mark()
    pull_via(p, repo, info.tag, tmp_path / "pull1")
    assert_layout_matches(tmp_path / "pull1", info.tag, info)
    for digest in info.blob_digests:
        # one client GET, one upstream GET (its 307 to S3 is followed by the proxy, not through here)
        assert relay.count("GET", blob_path(repo, digest), first) == 1, relay.touching(repo, first)
        wait_for(functools.partial(cached_correctly, cache, digest), 10, f"{digest} to be in the cache")

    second = relay.mark()
    pull_via(p, repo, info.tag, tmp_path / "pull2")
    assert_layout_matches(tmp_path / "pull2", info.tag, info)
    if TEST_WORKERS == 1:
        # blobs and the tag (within --tag-ttl, 60 s by default) come from the cache: nothing upstream
        assert relay.touching(repo, second) == []
    for digest in info.blob_digests:
        # with N processes, each fetches a blob at most once
        assert relay.count("GET", blob_path(repo, digest), first) <= TEST_WORKERS

    layer, size = info.layer_digests[0], info.layer_sizes[0]
    expected = info.blob_path(layer).read_bytes()
    with keep_alive(p) as c:
        r = c.request(blob_path(repo, layer))
        assert r.status == 200 and r.body == expected
        if TEST_WORKERS == 1:
            assert r.header("X-Cache") == "HIT"
        assert r.header("X-Cache") in ("HIT", "MISS")
        mark = relay.mark()
        r = c.request(blob_path(repo, layer))  # the same process again: it holds the blob now
        assert r.status == 200 and r.header("X-Cache") == "HIT"
        assert r.body == expected and hashlib.sha256(r.body).hexdigest() == hexof(layer)
        assert r.header("Content-Length") == str(size)
        assert r.header("Docker-Content-Digest") == layer
        assert relay.touching(repo, mark) == []

    on_disk = sum(path.stat().st_size for path in data_files(cache).values())
    blob_bytes = sum(info.layer_sizes) + len(info.config)
    assert counter(p, "ecrproxy_cache_misses_total", kind="blob") >= len(info.blob_digests)
    assert counter(p, "ecrproxy_cache_misses_total", kind="manifest") >= 1
    assert counter(p, "ecrproxy_cache_hits_total", kind="blob") >= 1
    if TEST_WORKERS == 1:
        assert counter(p, "ecrproxy_cache_hits_total", kind="blob") >= len(info.blob_digests) + 1
        assert counter(p, "ecrproxy_cache_hits_total", kind="manifest") >= 1
    assert counter(p, "ecrproxy_cache_bytes_total", source="upstream") >= blob_bytes
    assert counter(p, "ecrproxy_cache_bytes_total", source="cache") >= size
    assert on_disk >= blob_bytes  # every blob is in the shared directory
    if TEST_WORKERS == 1:
        assert blob_bytes <= counter(p, "ecrproxy_cache_size_bytes") <= on_disk
    else:
        # each process reports its own view of the shared directory (its fills, then what its 30 s rescan
        # adopts) and /metrics shows the largest: until a rescan, a part of the blobs (README, Layer cache)
        assert 0 < counter(p, "ecrproxy_cache_size_bytes") <= on_disk


# ---------------------------------------------------------------- once per digest, per repository rights
def test_layer_shared_by_two_repositories_is_stored_once(
    cache_ecr: EmulatedECR, relay: CountingRelay, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    shared = make_tar_layer({"base.txt": b"a shared base layer\n", "data": os.urandom(400_000)})
    a = image(tmp_path, "share-a", shared, os.urandom(120_000))
    b = image(tmp_path, "share-b", shared, os.urandom(130_000))
    other = image(tmp_path, "share-other")
    ra, rb, rz = "cache/share-a", "cache/share-b", "cache/share-other"
    push_direct(cache_ecr, a, ra)
    push_direct(cache_ecr, b, rb)
    push_direct(cache_ecr, other, rz)  # exists upstream, but does not hold the shared layer
    layer = a.layer_digests[0]
    assert layer == b.layer_digests[0] and layer not in other.blob_digests
    cache = tmp_path / "cache"
    p = cache_proxy(proxy_factory, cache_ecr, cache, upstream=relay.url)

    start = relay.mark()
    pull_via(p, ra, a.tag, tmp_path / "pull-a")
    assert_layout_matches(tmp_path / "pull-a", a.tag, a)
    wait_for(lambda: cached_correctly(cache, layer), 10, "the shared layer in the cache")
    mark_b = relay.mark()
    pull_via(p, rb, b.tag, tmp_path / "pull-b")
    assert_layout_matches(tmp_path / "pull-b", b.tag, b)
    # the upstream was asked whether share-b holds the layer before it was served to share-b
    asked_b = relay.count("HEAD", blob_path(rb, layer), mark_b) + relay.count("GET", blob_path(rb, layer), mark_b)
    assert asked_b >= 1, relay.touching(rb, mark_b)
    if TEST_WORKERS == 1:
        assert relay.count("HEAD", blob_path(rb, layer), mark_b) == 1
        assert relay.count("GET", blob_path(rb, layer), mark_b) == 0
    fetched = (relay.count("GET", blob_path(ra, layer), start) + relay.count("GET", blob_path(rb, layer), start))
    assert 1 <= fetched <= TEST_WORKERS

    # manifests by digest are cached like blobs
    for repo, info in ((ra, a), (rb, b)):
        r = http_request(f"{p.url}/v2/{repo}/manifests/{info.manifest_digest}", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status == 200 and r.body == info.manifest
        assert r.header("Docker-Content-Digest") == info.manifest_digest

    distinct = {a.manifest_digest, b.manifest_digest, *a.blob_digests, *b.blob_digests}
    assert len(distinct) == 7
    wait_for(lambda: set(data_files(cache)) == distinct, 10, "one data file per distinct digest")
    for digest, path in data_files(cache).items():
        assert sha256_file(path) == digest, f"{path} does not hold {digest}"
    for info in (a, b):
        type_file = cached(cache, info.manifest_digest).with_name(hexof(info.manifest_digest) + ".type")
        assert type_file.read_text("utf-8").strip() == info.media_type
    size = a.layer_sizes[0]
    copies = [q for q in cache.rglob("*") if q.is_file() and q.stat().st_size == size and sha256_file(q) == layer]
    assert copies == [cached(cache, layer)], copies

    # a repository the upstream does not vouch for gets nothing from the cache
    mark_z = relay.mark()
    for method in ("GET", "HEAD"):
        r = http_request(p.url + blob_path(rz, layer), method)
        assert r.status == 404, (method, r.status, r.body)
        assert r.header("X-Cache") != "HIT"
        if method == "GET":
            assert r.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
            assert b"a shared base layer" not in r.body
    assert relay.touching(rz, mark_z), "the proxy answered for share-other without asking the upstream"
    known = set((cache / "known").read_text("ascii").splitlines())
    assert {f"{ra} {layer}", f"{rb} {layer}"} <= known, known
    assert f"{rz} {layer}" not in known


# ---------------------------------------------------------------- HEAD, Range, manifests by digest
def test_head_range_and_manifest_hits(
    cache_ecr: EmulatedECR, relay: CountingRelay, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    repo = "cache/range"
    info = image(tmp_path, "range")
    push_direct(cache_ecr, info, repo)
    p = cache_proxy(proxy_factory, cache_ecr, tmp_path / "cache", upstream=relay.url)
    layer = info.layer_digests[0]
    data = info.blob_path(layer).read_bytes()
    size = len(data)
    path = blob_path(repo, layer)
    manifest = f"/v2/{repo}/manifests/{info.manifest_digest}"
    accept = {"Accept": MANIFEST_ACCEPT}

    with keep_alive(p) as c:
        r = c.request(path, "HEAD")
        assert r.status == 200 and r.header("X-Cache") == "MISS"
        assert r.header("Content-Length") == str(size) and r.header("Docker-Content-Digest") == layer
        r = c.request(path)
        assert r.status == 200 and r.header("X-Cache") == "MISS" and r.body == data
        r = c.request(manifest, headers=accept)
        assert r.status == 200 and r.header("X-Cache") == "MISS" and r.body == info.manifest

        mark = relay.mark()
        r = c.request(path, "HEAD")
        assert (r.status, r.header("X-Cache"), r.body) == (200, "HIT", b"")
        assert r.header("Content-Length") == str(size)
        assert r.header("Docker-Content-Digest") == layer
        for spec, first, last in (("bytes=100-199", 100, 199), ("bytes=-10", size - 10, size - 1),
                                  (f"bytes={size - 5}-", size - 5, size - 1), ("bytes=0-0", 0, 0),
                                  (f"bytes=1000-{size + 50}", 1000, size - 1)):
            r = c.request(path, headers={"Range": spec})
            assert r.status == 206 and r.header("X-Cache") == "HIT", (spec, r.status, r.body[:200])
            assert r.body == data[first:last + 1], spec
            assert r.header("Content-Range") == f"bytes {first}-{last}/{size}", spec
            assert r.header("Content-Length") == str(last - first + 1), spec
        r = c.request(manifest, headers=accept)
        assert r.status == 200 and r.header("X-Cache") == "HIT" and r.body == info.manifest
        assert r.header("Docker-Content-Digest") == info.manifest_digest
        assert r.header("Content-Type") == info.media_type
        r = c.request(manifest, "HEAD", headers=accept)
        assert r.status == 200 and r.header("X-Cache") == "HIT"
        assert r.header("Content-Length") == str(len(info.manifest))
        assert r.header("Docker-Content-Digest") == info.manifest_digest
        assert relay.touching(repo, mark) == []
        r = c.request(path, headers={"Range": f"bytes={size}-"})
        assert r.status == 416, (r.status, r.body[:200])
        assert relay.touching(repo, mark) == []


def test_tag_of_an_already_stored_manifest_is_cached(
    cache_ecr: EmulatedECR, relay: CountingRelay, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    repo = "cache/retag"
    info = image(tmp_path, "retag")
    push_direct(cache_ecr, info, repo)
    p = cache_proxy(proxy_factory, cache_ecr, tmp_path / "cache", upstream=relay.url)
    accept = {"Accept": MANIFEST_ACCEPT}
    with keep_alive(p) as c:
        # stored by digest first (as after a pull with another Accept, or through another tag)
        r = c.request(f"/v2/{repo}/manifests/{info.manifest_digest}", headers=accept)
        assert r.status == 200 and r.body == info.manifest
        r = c.request(f"/v2/{repo}/manifests/{info.tag}", headers=accept)
        assert r.status == 200 and r.body == info.manifest
        mark = relay.mark()
        r = c.request(f"/v2/{repo}/manifests/{info.tag}", headers=accept)  # within --tag-ttl (60 s)
        assert r.status == 200 and r.header("X-Cache") == "HIT" and r.body == info.manifest
        assert r.header("Docker-Content-Digest") == info.manifest_digest
        assert relay.touching(repo, mark) == []


# ---------------------------------------------------------------- corruption on disk
def test_corrupted_cache_file_is_refetched_never_served(
    cache_ecr: EmulatedECR, relay: CountingRelay, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    repo = "cache/corrupt"
    info = image(tmp_path, "corrupt")
    push_direct(cache_ecr, info, repo)
    cache = tmp_path / "cache"
    p = cache_proxy(proxy_factory, cache_ecr, cache, upstream=relay.url)
    layer = info.layer_digests[0]
    data = info.blob_path(layer).read_bytes()
    path = blob_path(repo, layer)

    with keep_alive(p) as c:
        r = c.request(path)
        assert r.status == 200 and r.body == data
        wait_for(lambda: cached_correctly(cache, layer), 10, "the layer in the cache")
        corrupt(cached(cache, layer), keep_mtime=False)
        mark = relay.mark()
        r = c.request(path)  # the process that stored it: it must notice the change
        assert r.status == 200 and r.header("X-Cache") == "MISS"
        assert hashlib.sha256(r.body).hexdigest() == hexof(layer) and r.body == data
        assert relay.count("GET", path, mark) == 1
        wait_for(lambda: cached_correctly(cache, layer), 10, "the refetched layer on disk")
        mark = relay.mark()
        r = c.request(path)
        assert r.status == 200 and r.header("X-Cache") == "HIT" and r.body == data
        assert relay.count("GET", path, mark) == 0

    # bit rot that stat() cannot see is caught after a restart: the first serve verifies
    corrupt(cached(cache, layer), keep_mtime=True)
    p.stop()
    p2 = cache_proxy(proxy_factory, cache_ecr, cache, upstream=relay.url)
    mark = relay.mark()
    r = http_request(p2.url + path)
    assert r.status == 200 and hashlib.sha256(r.body).hexdigest() == hexof(layer) and r.body == data
    assert relay.count("GET", path, mark) == 1
    wait_for(lambda: cached_correctly(cache, layer), 10, "the refetched layer on disk after the restart")


# ---------------------------------------------------------------- eviction
def test_least_recently_used_blobs_are_evicted_beyond_cache_size(
    cache_ecr: EmulatedECR, relay: CountingRelay, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    repo = "cache/evict"
    blobs = [os.urandom(1_200_000) for _ in range(3)]  # two fit in 3 MiB, three do not
    info = image(tmp_path, "evict", *blobs)
    push_direct(cache_ecr, info, repo)
    cache = tmp_path / "cache"
    p = cache_proxy(proxy_factory, cache_ecr, cache, "--cache-size", "3MiB", upstream=relay.url)
    d1, d2, d3 = info.layer_digests

    with keep_alive(p) as c:  # one process does it all
        for digest, data in zip(info.layer_digests, blobs):
            r = c.request(blob_path(repo, digest))
            assert r.status == 200 and r.header("X-Cache") == "MISS" and r.body == data
        wait_for(lambda: set(data_files(cache)) == {d2, d3}, 10, "the least recently used blob to go")
        assert all(cached_correctly(cache, d) for d in (d2, d3))
        r = c.request(blob_path(repo, d3))
        assert r.status == 200 and r.header("X-Cache") == "HIT" and r.body == blobs[2]
        mark = relay.mark()
        r = c.request(blob_path(repo, d1))  # evicted: fetched again, and now d2 is the oldest
        assert r.status == 200 and r.header("X-Cache") == "MISS" and r.body == blobs[0]
        assert relay.count("GET", blob_path(repo, d1), mark) == 1
        wait_for(lambda: set(data_files(cache)) == {d1, d3}, 10, "the next least recently used blob to go")
    assert sum(q.stat().st_size for q in data_files(cache).values()) <= 3 * MIB
    assert counter(p, "ecrproxy_cache_evictions_total") >= 2
    assert 0 < counter(p, "ecrproxy_cache_size_bytes") <= TEST_WORKERS * 3 * MIB


@pytest.fixture
def small_fs(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A real 80 MiB file system (tmpfs): the cache's free-space margin (64 MiB) leaves 16 MiB to blobs.
    Set up before the proxies (and so torn down after them): nothing holds it open at unmount."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    # the test command runs as root (it installs Debian packages): a mount that fails is a failure, not a skip
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"cannot mount a small tmpfs for this test: {done.stderr.strip()}"
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def free_bytes(path: pathlib.Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_cache_size_larger_than_the_disk_keeps_caching_by_evicting(
    cache_ecr: EmulatedECR, relay: CountingRelay, small_fs: pathlib.Path, proxy_factory: ProxyFactory,
    tmp_path: pathlib.Path,
) -> None:
    repo = "cache/small-disk"
    blobs = [os.urandom(5 * MIB) for _ in range(18)]  # 90 MiB through an 80 MiB disk, 3 at a time
    big = os.urandom(20 * MIB)  # more than the disk can hold beside its margin
    info = image(tmp_path, "small-disk", *blobs, big)
    push_direct(cache_ecr, info, repo)
    cache = small_fs / "cache"
    p = cache_proxy(proxy_factory, cache_ecr, cache, "--cache-size", "10GiB", upstream=relay.url)
    *digests, big_digest = info.layer_digests

    lowest = free_bytes(small_fs)
    with keep_alive(p) as c:  # one process does it all
        for i, (digest, data) in enumerate(zip(digests, blobs)):
            r = c.request(blob_path(repo, digest))
            assert r.status == 200 and r.header("X-Cache") == "MISS" and r.body == data
            # before: once the disk had filled (the 16th blob), nothing new was ever cached again
            wait_for(functools.partial(cached_correctly, cache, digest), 10, f"blob {i} in the cache")
            lowest = min(lowest, free_bytes(small_fs))
        assert set(data_files(cache)) == set(digests[-3:])  # the least recently used went first
        assert counter(p, "ecrproxy_cache_disk_full_total") == 0
        assert counter(p, "ecrproxy_cache_evictions_total") == len(digests) - 3
        assert lowest >= 64 * MIB  # the margin was kept

        r = c.request(blob_path(repo, big_digest))  # streamed, not cached, nothing evicted for it
        assert r.status == 200 and r.header("X-Cache") == "MISS" and r.body == big
        assert counter(p, "ecrproxy_cache_disk_full_total") == 1
        assert set(data_files(cache)) == set(digests[-3:])
        assert list((cache / "tmp").iterdir()) == []
        r = c.request(blob_path(repo, digests[-1]))
        assert r.status == 200 and r.header("X-Cache") == "HIT" and r.body == blobs[-1]


# ---------------------------------------------------------------- registry down: stale but served
def test_cached_image_pulls_while_the_registry_is_down(
    cache_ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    repo = "cache/offline"
    info = image(tmp_path, "offline")
    push_direct(cache_ecr, info, repo)
    tag_path = f"/v2/{repo}/manifests/{info.tag}"
    accept = {"Accept": MANIFEST_ACCEPT}
    # one process each: with several, the kernel picks which process (and so which cache) a
    # connection reaches, and a process can serve offline only what it saw itself
    p = cache_proxy(proxy_factory, cache_ecr, tmp_path / "cache", "--tag-ttl", "1", one_process=True)
    short = cache_proxy(proxy_factory, cache_ecr, tmp_path / "cache-short", "--tag-ttl", "1",
                        "--stale-if-error", "2", one_process=True)
    pull_via(p, repo, info.tag, tmp_path / "online")
    assert_layout_matches(tmp_path / "online", info.tag, info)
    # a tag is remembered per Accept header (its answer may depend on it): ask once with ours
    for proxy in (p, short):
        r = http_request(proxy.url + tag_path, headers=accept)
        assert r.status == 200 and r.body == info.manifest and r.header("Warning") is None
    short_fetched = time.monotonic()
    layer = info.layer_digests[0]

    cache_ecr.kill_registry()
    try:
        time.sleep(1.5)  # past --tag-ttl: the tag must be revalidated, and cannot be
        r = http_request(p.url + tag_path, headers=accept)
        assert r.status == 200, (r.status, r.body)
        assert r.body == info.manifest and r.header("Docker-Content-Digest") == info.manifest_digest
        assert r.header("Warning") == STALE_WARNING
        assert counter(p, "ecrproxy_cache_stale_total") >= 1

        pull_via(p, repo, info.tag, tmp_path / "offline")
        assert_layout_matches(tmp_path / "offline", info.tag, info)
        r = http_request(p.url + blob_path(repo, layer))
        assert r.status == 200 and r.header("X-Cache") == "HIT"
        assert r.body == info.blob_path(layer).read_bytes()
        r = http_request(f"{p.url}/v2/{repo}/manifests/{info.manifest_digest}", headers=accept)
        assert r.status == 200 and r.header("X-Cache") == "HIT" and r.body == info.manifest
        assert r.header("Warning") is None  # a digest never goes stale
        # what was never cached is an upstream error, not an invention
        r = http_request(p.url + blob_path(repo, "sha256:" + "ab" * 32))
        assert r.status >= 500, (r.status, r.body)

        # past --stale-if-error the stale manifest is no longer served
        time.sleep(max(0.0, short_fetched + 1 + 2 + 1.5 - time.monotonic()))
        r = http_request(short.url + tag_path, headers=accept)
        assert r.status >= 500, (r.status, r.body)
        assert r.body != info.manifest and r.header("Warning") is None
    finally:
        cache_ecr.start_registry()

    def fresh() -> bool:
        r = http_request(p.url + tag_path, headers=accept)
        return r.status == 200 and r.body == info.manifest and r.header("Warning") is None

    wait_for(fresh, 15, "the tag to be revalidated once the registry is back", interval=0.5)


# ---------------------------------------------------------------- one fetch for many clients
@pytest.fixture
def fs_ecr(tmp_path: pathlib.Path) -> Iterator[EmulatedECR]:
    """A filesystem-backed emulator: a 256 MiB push is quick and moto does not hold it in memory."""
    with EmulatedECR(tmp_path / "ecr", storage="filesystem") as emu:
        yield emu


def test_concurrent_gets_of_a_missing_blob_share_one_fetch(
    fs_ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    clients = 20
    repo = "cache/big"
    src, cache = tmp_path / "src", tmp_path / "cache"
    relay = CountingRelay(int(fs_ecr.upstream_url.rsplit(":", 1)[1]))
    try:
        info = make_big_oci_layout(src, [256 * MIB], "big")
        digest, size = info.layer_digests[-1], info.layer_sizes[-1]
        assert size > 256 * MIB
        push_direct(fs_ecr, info, repo, timeout=120)
        p = cache_proxy(proxy_factory, fs_ecr, cache, upstream=relay.url)
        path = blob_path(repo, digest)
        barrier = threading.Barrier(clients)

        def fetch(_: int) -> tuple[int, str | None, str | None, int, str]:
            conn = connection(p.url, timeout=120)
            try:
                barrier.wait(timeout=30)
                conn.request("GET", path)
                resp = conn.getresponse()
                h, n = hashlib.sha256(), 0
                while chunk := resp.read(MIB):  # hash as it comes: never 20 x 256 MiB in memory
                    h.update(chunk)
                    n += len(chunk)
                return resp.status, resp.getheader("Content-Length"), resp.getheader("X-Cache"), n, \
                    "sha256:" + h.hexdigest()
            finally:
                conn.close()

        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(fetch, range(clients)))
        seconds = time.monotonic() - t0
        print(f"\n{clients} clients x {size // MIB} MiB in {seconds:.1f} s; X-Cache: {[r[2] for r in results]}")

        for status, length, x_cache, n, got in results:
            assert status == 200 and length == str(size) and x_cache in ("HIT", "MISS")
            assert n == size and got == digest
        fetches = relay.count("GET", path)
        assert 1 <= fetches <= TEST_WORKERS, relay.since()
        wait_for(lambda: cached(cache, digest).is_file(), 20, "the big blob in the cache")
        assert cached(cache, digest).stat().st_size == size and sha256_file(cached(cache, digest)) == digest
        wait_for(lambda: not any((cache / "tmp").iterdir()), 20, "no partial file left")
        assert p.metric("ecrproxy_requests_in_flight") == 0
    finally:
        relay.close()
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------- writes through the proxy, then reads
# Every read after a write is compared with the registry's own answer to the same request. Reads go on
# fresh connections, several times: with ECRTEST_WORKERS=N they reach any of the processes, each of
# which may hold the old answer.
READS = 4
COMPARED = ("Content-Type", "Content-Length", "Docker-Content-Digest")
ACCEPT = {"Accept": MANIFEST_ACCEPT}


def direct(ecr: EmulatedECR, path: str, method: str = "GET", headers: Mapping[str, str] | None = None,
           body: bytes | None = None) -> Response:
    return http_request(ecr.upstream_url + path, method, headers=headers, body=body, password=ecr.password)


def as_registry(p: Proxy, ecr: EmulatedECR, path: str, method: str = "GET",
                headers: Mapping[str, str] | None = None) -> Response:
    """The proxy answers `method path` as the registry does (status, body, the headers that matter)."""
    want = direct(ecr, path, method, headers)
    for _ in range(READS):
        got = http_request(p.url + path, method, headers=headers)
        assert got.status == want.status, (method, path, got.status, want.status, got.header("X-Cache"), got.body)
        assert got.body == want.body, (method, path)
        for name in COMPARED:
            assert got.header(name) == want.header(name), (method, path, name)
        if got.status >= 400:
            assert got.header("X-Cache") != "HIT", (method, path)
    return want


def prime(p: Proxy, path: str, headers: Mapping[str, str] | None = None) -> None:
    """Reads that leave `path` in the cache of (most likely) every process, served from it at least once."""
    seen = []
    for _ in range(3 * TEST_WORKERS + 1):
        r = http_request(p.url + path, headers=headers)
        assert r.status == 200, (path, r.status, r.body)
        seen.append(r.header("X-Cache"))
    assert "HIT" in seen, seen


def test_a_tag_pushed_through_the_proxy_is_read_back_as_pushed(
    cache_ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    repo = "cache/w-push"
    old = image(tmp_path, "w-push-old", tag="1.0")
    new = image(tmp_path, "w-push-new", tag="2.0")
    push_direct(cache_ecr, old, repo)
    push_direct(cache_ecr, new, repo)  # its blobs are in the repository; its manifest goes to 1.0 below
    p = cache_proxy(proxy_factory, cache_ecr, tmp_path / "cache", "--tag-ttl", "600")
    tag = f"/v2/{repo}/manifests/1.0"
    prime(p, tag, ACCEPT)
    r = http_request(p.url + tag, "HEAD", headers=ACCEPT)
    assert (r.status, r.header("Docker-Content-Digest")) == (200, old.manifest_digest)

    r = http_request(p.url + tag, "PUT", headers={"Content-Type": new.media_type}, body=new.manifest)
    assert r.status == 201 and r.header("Docker-Content-Digest") == new.manifest_digest, (r.status, r.body)

    for method in ("HEAD", "GET"):  # HEAD first: a HEAD must not be answered from the old entry either
        want = as_registry(p, cache_ecr, tag, method, ACCEPT)
        assert want.status == 200 and want.header("Docker-Content-Digest") == new.manifest_digest
    # now cached again: a HEAD from the cache says what a GET from the cache says
    with keep_alive(p) as c:
        get = c.request(tag, headers=ACCEPT)
        head = c.request(tag, "HEAD", headers=ACCEPT)
        assert get.body == new.manifest and head.status == 200
        if TEST_WORKERS == 1:
            assert (get.header("X-Cache"), head.header("X-Cache")) == ("HIT", "HIT")
        for name in COMPARED:
            assert head.header(name) == get.header(name), name

    # a push by digest naming tags (OCI 1.1 `?tag=`): whatever the registry made of it, the proxy says the same
    r = http_request(f"{p.url}/v2/{repo}/manifests/{old.manifest_digest}?tag=1.0&tag=2.0", "PUT",
                     headers={"Content-Type": old.media_type}, body=old.manifest)
    assert r.status == 201, (r.status, r.body)
    for path in (tag, f"/v2/{repo}/manifests/2.0"):
        for method in ("HEAD", "GET"):
            as_registry(p, cache_ecr, path, method, ACCEPT)


def test_a_manifest_deleted_through_the_proxy_is_gone_from_the_cache(
    cache_ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    repo = "cache/w-delete-manifest"
    info = image(tmp_path, "w-delete-manifest")
    push_direct(cache_ecr, info, repo)
    cache = tmp_path / "cache"
    p = cache_proxy(proxy_factory, cache_ecr, cache, "--tag-ttl", "600")
    tag = f"/v2/{repo}/manifests/{info.tag}"
    by_digest = f"/v2/{repo}/manifests/{info.manifest_digest}"
    prime(p, tag, ACCEPT)
    prime(p, by_digest, ACCEPT)

    r = http_request(p.url + by_digest, "DELETE")
    assert r.status == 202, (r.status, r.body)

    def gone(proxy: Proxy) -> None:
        for path in (by_digest, tag):  # the tag went with the manifest
            for method in ("HEAD", "GET"):
                assert as_registry(proxy, cache_ecr, path, method, ACCEPT).status == 404

    gone(p)
    p.stop()
    gone(cache_proxy(proxy_factory, cache_ecr, cache, "--tag-ttl", "600"))  # and after a restart


def test_a_blob_deleted_through_the_proxy_is_gone_from_the_cache(
    cache_ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    shared = make_tar_layer({"shared.txt": b"a layer two repositories hold\n", "data": os.urandom(200_000)})
    a = image(tmp_path, "w-delete-blob-a", shared, os.urandom(100_000))
    b = image(tmp_path, "w-delete-blob-b", shared, os.urandom(110_000))
    ra, rb = "cache/w-delete-blob-a", "cache/w-delete-blob-b"
    push_direct(cache_ecr, a, ra)
    push_direct(cache_ecr, b, rb)
    layer = a.layer_digests[0]
    cache = tmp_path / "cache"
    p = cache_proxy(proxy_factory, cache_ecr, cache)
    prime(p, blob_path(ra, layer))
    prime(p, blob_path(rb, layer))

    r = http_request(p.url + blob_path(ra, layer), "DELETE")
    assert r.status == 202, (r.status, r.body)

    def gone(proxy: Proxy) -> None:
        for method in ("HEAD", "GET"):
            assert as_registry(proxy, cache_ecr, blob_path(ra, layer), method).status == 404
        # the other repository still holds it, and the stored file still serves it
        with keep_alive(proxy) as c:
            for _ in range(2):
                r = c.request(blob_path(rb, layer))
                assert r.status == 200 and r.body == a.blob_path(layer).read_bytes()
            assert r.header("X-Cache") == "HIT"

    gone(p)
    p.stop()
    gone(cache_proxy(proxy_factory, cache_ecr, cache))  # and after a restart
    assert cached_correctly(cache, layer)


def test_writes_the_registry_refuses_change_nothing_in_the_cache(
    cache_ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    repo, other = "cache/w-refused", "cache/w-refused-other"
    info = image(tmp_path, "w-refused")
    push_direct(cache_ecr, info, repo)
    push_direct(cache_ecr, image(tmp_path, "w-refused-other"), other)
    p = cache_proxy(proxy_factory, cache_ecr, tmp_path / "cache", "--tag-ttl", "600")
    tag = f"/v2/{repo}/manifests/{info.tag}"
    by_digest = f"/v2/{repo}/manifests/{info.manifest_digest}"
    layer = blob_path(repo, info.layer_digests[0])
    with keep_alive(p) as c:  # one process: what it stored, it serves
        for path, headers in ((tag, ACCEPT), (by_digest, ACCEPT), (layer, {})):
            assert c.request(path, headers=headers).status == 200
        refused: tuple[tuple[str, str, bytes | None, dict[str, str]], ...] = (
            ("DELETE", tag, None, {}),  # distribution 2.8 deletes by digest only: 400
            ("PUT", tag, b'{"not": "a manifest"}', {"Content-Type": info.media_type}),
            ("DELETE", f"/v2/{other}/manifests/{info.manifest_digest}", None, {}),  # not in that repository
            ("DELETE", blob_path(other, info.layer_digests[0]), None, {}),
        )
        for method, path, body, headers in refused:
            want = direct(cache_ecr, path, method, headers, body)
            assert want.status >= 400, (method, path, want.status)
            r = http_request(p.url + path, method, headers=headers, body=body)  # any process
            assert r.status == want.status, (method, path, r.status, r.body)
        for path, headers in ((tag, ACCEPT), (by_digest, ACCEPT), (layer, {})):
            r = c.request(path, headers=headers)  # the process that stored them still serves them
            assert r.status == 200 and r.header("X-Cache") == "HIT", (path, r.status)
    for path in (tag, by_digest):
        as_registry(p, cache_ecr, path, "GET", ACCEPT)
