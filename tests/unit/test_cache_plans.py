"""The layer cache on its own: it answers as values and never reaches into the handler.

`test_cache.py` drives the whole proxy; here `LayerCache` is asked directly, with a stand-in
for the exchange (the cache reads only its request and whether its client is gone), to show
that its decisions are plain values anyone can read and test, and that the package does not
depend on the handler (imports, private names, back-references).
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

from twisted.internet.defer import succeed
from twisted.internet.task import Clock

import ecr_twisted
from ecr_twisted.cache import plans
from ecr_twisted.cache.layer import LayerCache
from ecr_twisted.cache.store import BlobStore, hash_file
from ecr_twisted.http.http11 import Head, parse_request_head, parse_response_head
from ecr_twisted.registry import routes

if TYPE_CHECKING:
    from ecr_twisted.http.exchange import Exchange

PACKAGE = Path(ecr_twisted.__file__).parent


class Ex:
    """What the cache may see of an exchange."""

    def __init__(self, method: str, target: str, *headers: bytes) -> None:
        raw = b"\r\n".join([f"{method} {target} HTTP/1.1".encode(), b"Host: h", *headers])
        self.request = parse_request_head(raw)
        self.gone = False


def exchange(ex: Ex) -> Exchange:
    """The stand-in, typed as what the cache takes: it reads no more of an exchange than `Ex` has."""
    return cast("Exchange", ex)


def ask(cache: LayerCache, ex: Ex) -> plans.Plan:
    path = ex.request.target.split(b"?", 1)[0]
    return cache.lookup(exchange(ex), routes.match(ex.request.method, path))


def answer(status: int, *headers: bytes, method: bytes = b"GET") -> Head:
    raw = b"\r\n".join([b"HTTP/1.1 %d X" % status, *headers])
    return parse_response_head(raw, method)


def new_cache(tmp_path: Path) -> LayerCache:
    return LayerCache(BlobStore(str(tmp_path), 1 << 30), Clock(), lambda fd, size: succeed(hash_file(fd, size)))


def test_a_miss_is_a_fill_others_wait_for_and_then_read_along(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    data = random.Random(3).randbytes(5000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    first, second = Ex("GET", f"/v2/app/blobs/{digest}"), Ex("GET", f"/v2/app/blobs/{digest}")

    fetch = ask(cache, first)
    assert isinstance(fetch, plans.Forward) and (fetch.op, fetch.method, fetch.source) == (plans.FILL, None, "upstream")
    waiting = ask(cache, second)
    assert isinstance(waiting, plans.Wait) and not waiting.ready.called
    later: list[plans.Plan] = []
    waiting.ready.addCallback(later.append)

    tee = cache.answered(exchange(first), fetch, answer(200, b"Content-Length: %d" % len(data)))
    assert isinstance(tee, plans.Tee) and tee.plan is fetch
    cuts: list[bool] = []
    leader = cache.filling(tee, lambda: cuts.append(True))
    assert isinstance(leader, plans.Serve) and leader.fill is tee.fill
    assert (leader.status, leader.size, leader.source, leader.fields[-1]) == (200, len(data), "upstream", plans.MISS)
    follower = later[0]
    assert isinstance(follower, plans.Serve) and follower.fill is tee.fill
    assert (follower.source, follower.fields[-1]) == ("cache", plans.HIT)

    tee.fill.write(data)
    assert tee.fill.finish()
    for plan in (leader, follower):
        assert isinstance(plan, plans.Serve)
        assert os.pread(plan.fd, len(data) + 1, 0) == data
        os.close(plan.fd)
        cache.finished(plan, len(data))
    cache.finished(fetch, 0)  # already released: a no-op
    assert cache.bytes == {"cache": len(data), "upstream": len(data)} and cuts == []

    hit = ask(cache, Ex("GET", f"/v2/app/blobs/{digest}", b"Range: bytes=10-19"))
    assert isinstance(hit, plans.Serve) and (hit.status, hit.first, hit.length) == (206, 10, 10)
    os.close(hit.fd)
    elsewhere = ask(cache, Ex("GET", f"/v2/other/blobs/{digest}"))
    assert isinstance(elsewhere, plans.Forward) and (elsewhere.op, elsewhere.method) == (plans.PROBE, b"HEAD")
    assert cache.hits == {"blob": 2, "manifest": 0} and cache.misses == {"blob": 1, "manifest": 0}


def test_a_fetch_that_ends_releases_only_its_own_waiters(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    digest = "sha256:" + "ab" * 32
    one = ask(cache, Ex("GET", f"/v2/app/blobs/{digest}"))
    waiter = ask(cache, Ex("GET", f"/v2/app/blobs/{digest}"))
    assert isinstance(one, plans.Forward) and isinstance(waiter, plans.Wait)
    assert cache.answered(exchange(Ex("GET", "/")), one, answer(404, b"Content-Length: 0")) is plans.RELAY
    again: list[plans.Plan] = []
    waiter.ready.addCallback(again.append)
    assert isinstance(again[0], plans.Forward) and again[0].op == plans.FILL  # the waiter fetches now
    third = ask(cache, Ex("GET", f"/v2/app/blobs/{digest}"))
    assert isinstance(third, plans.Wait)
    cache.finished(one, 0)  # the first fetch's request ends late: the second fetch's waiter stays
    assert not third.ready.called
    cache.finished(again[0], 0)
    assert third.ready.called


def test_writes_tags_and_stale_answers_are_values_too(tmp_path: Path) -> None:
    cache = new_cache(tmp_path)
    body = b'{"schemaVersion":2}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    ex = Ex("GET", "/v2/app/manifests/latest")
    miss = ask(cache, ex)
    assert isinstance(miss, plans.Forward) and miss.op == plans.MANIFEST and miss.tag == ("app", "latest", b"")
    ok = answer(200, b"Content-Type: application/json", b"Docker-Content-Digest: " + digest.encode(),
                b"Content-Length: %d" % len(body))
    assert cache.answered(exchange(ex), miss, ok) == plans.Read(4 << 20)
    cache.store_manifest(miss, ok, body)
    hit = ask(cache, Ex("GET", "/v2/app/manifests/latest"))
    assert isinstance(hit, plans.Serve) and os.pread(hit.fd, 100, 0) == body
    os.close(hit.fd)

    cache.clock.advance(61)  # past --tag-ttl: revalidate with a HEAD, and when the upstream cannot answer, stale
    ex = Ex("GET", "/v2/app/manifests/latest")
    check = ask(cache, ex)
    assert isinstance(check, plans.Forward) and (check.op, check.method) == (plans.REVALIDATE, b"HEAD")
    stale = cache.failed(exchange(ex), check, sent=True)
    assert isinstance(stale, plans.Serve) and (b"Warning", b'110 - "Response is Stale"') in stale.fields
    os.close(stale.fd)

    push = Ex("PUT", "/v2/app/manifests/latest")
    write = ask(cache, push)
    assert isinstance(write, plans.Forward) and (write.op, write.source) == (plans.WRITE, None)
    assert cache.answered(exchange(push), write, answer(201, b"Content-Length: 0")) is plans.RELAY
    after = ask(cache, Ex("GET", "/v2/app/manifests/latest"))
    assert isinstance(after, plans.Forward) and after.op == plans.MANIFEST  # the tag was taken back


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_the_cache_does_not_import_the_handler() -> None:
    for path in sorted((PACKAGE / "cache").glob("*.py")):
        assert not any(name.startswith("ecr_twisted.registry.handler") for name in _imports(path)), path.name
    loaded = subprocess.run(
        [sys.executable, "-c",
         "import sys, ecr_twisted.cache.layer, ecr_twisted.cache.plans, ecr_twisted.cache.store, "
         "ecr_twisted.cache.tags, ecr_twisted.cache.ranges; "
         "print(sorted(m for m in sys.modules if m.startswith('ecr_twisted.registry')))"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "ecr_twisted.registry.handler" not in loaded, loaded


def _private_names(tree: ast.AST) -> set[str]:
    """The `_names` a module defines: functions, methods, attributes it assigns, slots it declares."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("_"):
            names.add(node.value)
    return {n for n in names if n.startswith("_")}


def test_the_cache_and_the_handler_use_only_each_others_public_names() -> None:
    """`x._name` on anything but self is only allowed for a name the same module defines (a class
    and its helper in one module); nothing private of another module is touched."""
    for package in ("cache", "registry"):
        for path in sorted((PACKAGE / package).glob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            own = _private_names(tree)
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                ):
                    assert node.attr in own, f"{package}/{path.name}:{node.lineno} uses {node.attr}"


def test_the_cache_holds_no_reference_to_the_handler(tmp_path: Path) -> None:
    from ecr_twisted.testing.doubles import Harness

    h = Harness(cache_dir=str(tmp_path / "cache"))
    assert h.cache is not None
    assert not any(v is h.handler for v in vars(h.cache).values())
