"""A fleet of three cached replicas behind nginx: hashing digests by path keeps one copy per blob.

nginx runs ``deploy/nginx/ecr-twisted-fleet.conf`` itself (replica addresses and the listen port
swapped for test ones), once as shipped (``hash $request_uri consistent`` for blobs and manifests
by digest) and once with the hash line removed (plain round robin). Every blob of a small image is
pulled ``PULLS`` times through nginx; a CountingRelay between the replicas and the registry counts
upstream blob GETs per digest. With hashing: one per digest (one per worker process of the one
replica under ECRTEST_WORKERS=N) and one copy on disk; with round robin, one per replica.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import re
import subprocess
import time
from collections.abc import Iterator

import pytest
from proxy_harness import (
    REPO_ROOT,
    TEST_WORKERS,
    CountingRelay,
    ProxyFactory,
    free_port,
    http_request,
    port_open,
    push_direct,
    sha256_file,
    wait_for,
)

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.images import ImageInfo, make_oci_layout, make_tar_layer

FLEET_CONF = REPO_ROOT / "deploy" / "nginx" / "ecr-twisted-fleet.conf"
NGINX = "/usr/sbin/nginx"
REPLICAS = 3
PULLS = 6
HASH_LINE = re.compile(r"^\s*hash \$request_uri consistent;\n", re.MULTILINE)
SERVER_LINE = re.compile(r"server 10\.0\.0\.1(\d):5000")


def fleet_conf(ports: list[int], listen: int, *, hashing: bool) -> str:
    """The shipped config with test addresses; without its hash line when not ``hashing``."""
    text = FLEET_CONF.read_text()
    assert len(HASH_LINE.findall(text)) == 1, "the example config hashes exactly one upstream"
    assert len(SERVER_LINE.findall(text)) == 2 * REPLICAS
    text = SERVER_LINE.sub(lambda m: f"server 127.0.0.1:{ports[int(m.group(1)) - 1]}", text)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    if not hashing:
        text = HASH_LINE.sub("", text)
    return text


class Nginx:
    def __init__(self, site: str, work: pathlib.Path) -> None:
        work.mkdir(parents=True)
        (work / "fleet.conf").write_text(site)
        self.port = int(re.findall(r"listen 127\.0\.0\.1:(\d+);", site)[0])
        self.work = work
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the 0700 tmp dir
        kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        temps = "".join(f"    {k}_temp_path {work / k};\n" for k in kinds)
        (work / "nginx.conf").write_text(
            f"{user}worker_processes 1;\npid {work / 'nginx.pid'};\nerror_log {work / 'error.log'} info;\n"
            "events { worker_connections 256; }\n"
            f"http {{\n    access_log {work / 'access.log'};\n{temps}    include {work / 'fleet.conf'};\n}}\n"
        )
        self.log = open(work / "stderr.log", "wb")
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(work), "-c", str(work / "nginx.conf"), "-e", str(work / "error.log"),
             "-g", "daemon off;"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: self.proc.poll() is not None or port_open(self.port), 10, "nginx to listen")
            assert self.proc.poll() is None, f"nginx exited: {self.logs()}"
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.work / "stderr.log", self.work / "error.log")
                       if p.exists())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


@pytest.fixture
def relay(ecr: EmulatedECR) -> Iterator[CountingRelay]:
    r = CountingRelay(int(ecr.upstream_url.rsplit(":", 1)[1]))
    yield r
    r.close()


def copies(caches: list[pathlib.Path], digest: str) -> int:
    """How many replicas hold a correct copy of ``digest``."""
    n = 0
    for cache in caches:
        path = cache / "blobs" / "sha256" / digest.split(":", 1)[1]
        n += path.is_file() and sha256_file(path) == digest
    return n


def pull_through_fleet(
    ecr: EmulatedECR, relay: CountingRelay, factory: ProxyFactory, tmp: pathlib.Path, info: ImageInfo, repo: str,
    *, hashing: bool,
) -> tuple[dict[str, int], dict[str, int]]:
    """Upstream blob GETs per digest and copies per digest after PULLS GETs of every blob through nginx."""
    mode = "hash" if hashing else "round-robin"
    caches = [tmp / mode / f"cache{i}" for i in range(REPLICAS)]
    proxies = [factory(ecr, "--cache-dir", str(c), upstream=relay.url) for c in caches]
    nginx = Nginx(fleet_conf([p.port for p in proxies if p.port], free_port(), hashing=hashing), tmp / mode / "nginx")
    try:
        mark = relay.mark()
        for _ in range(PULLS):
            for digest in info.blob_digests:
                r = http_request(f"{nginx.url}/v2/{repo}/blobs/{digest}", timeout=15)
                assert r.status == 200, (r.status, r.body[:300], nginx.logs())
                assert "sha256:" + hashlib.sha256(r.body).hexdigest() == digest
                # the copy is on disk before the next GET (a write still in flight is no second copy)
                wait_for(functools.partial(copies, caches, digest), 10, f"{digest} stored by a replica")
        fetches = {d: relay.count("GET", f"/v2/{repo}/blobs/{d}", mark) for d in info.blob_digests}
        stored = {d: copies(caches, d) for d in info.blob_digests}
        return fetches, stored
    finally:
        nginx.stop()
        factory.close()


def test_hashing_blob_paths_fetches_each_blob_once_across_the_fleet(
    ecr: EmulatedECR, relay: CountingRelay, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    started = time.monotonic()
    info = make_oci_layout(
        tmp_path / "image",
        [make_tar_layer({"a.txt": os.urandom(40_000)}), os.urandom(30_000), os.urandom(20_000)],
        "1.0",
        labels={"seed": "fleet"},
    )
    repo = "fleet/hashed"
    push_direct(ecr, info, repo)

    hashed, hashed_copies = pull_through_fleet(ecr, relay, proxy_factory, tmp_path, info, repo, hashing=True)
    rr, rr_copies = pull_through_fleet(ecr, relay, proxy_factory, tmp_path, info, repo, hashing=False)
    print(f"\n{len(info.blob_digests)} blobs x {PULLS} GETs through nginx, {REPLICAS} replicas, "
          f"--workers {TEST_WORKERS}; upstream GETs (copies on disk) per blob:")
    for d in info.blob_digests:
        print(f"  {d[:19]}  hash $request_uri: {hashed[d]} ({hashed_copies[d]})   "
              f"round robin: {rr[d]} ({rr_copies[d]})")

    for d in info.blob_digests:
        # one replica owns the digest: one fetch (one per worker process of that replica), one copy
        assert 1 <= hashed[d] <= TEST_WORKERS, hashed
        if TEST_WORKERS == 1:
            assert hashed[d] == 1
        assert hashed_copies[d] == 1, hashed_copies
        # round robin: every replica meets a miss of its own and keeps a copy of its own
        assert 1 < rr[d] <= REPLICAS * TEST_WORKERS, rr
        assert rr_copies[d] > 1, rr_copies
    assert time.monotonic() - started < 60
