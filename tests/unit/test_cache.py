"""The layer cache end to end (--cache-dir): what the client gets, what the upstream was asked, what is on disk.

Every test drives a whole proxy (`testing.Harness` with `cache_dir=`) on a MemoryReactorClock with
in-memory transports: "served from the cache" means the fake upstream received no request, and
"never complete-looking" means the client's transport was aborted with fewer body bytes than its
Content-Length. Time only moves with `h.reactor.advance`.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from ecr_twisted.cache import store as blobstore
from ecr_twisted.testing import doubles as testing
from ecr_twisted.access.gate import AccessConfig, Gate
from ecr_twisted.access.htpasswd import Htpasswd
from ecr_twisted.access.policy import FixedPolicy, Policy
from ecr_twisted.registry.handler import ProxyConfig
from ecr_twisted.http.upstream import UpstreamConnection
from ecr_twisted.testing.doubles import UPSTREAM, Harness, make_token, synchronous_bcrypt, write_htpasswd

from .test_access import (
    _REQUEST_LINE,
    OPEN,
    SERVICE,
    Call,
    Reply,
    Sent,
    answer,
    basic,
    basic_challenge,
    call,
    ok,
    request,
    send,
    upstream_requests,
)

SIZE = 600_000  # more than two of the file sender's 256 KiB reads
STORAGE = b"https://prod-eu-west-1-starport-layer-bucket.s3.eu-west-1.amazonaws.com/blob?X-Amz-Signature=abc"
REDIRECT = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + STORAGE + b"\r\nContent-Length: 0\r\n\r\n"
OCI_MANIFEST = b"application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = b"application/vnd.docker.distribution.manifest.v2+json"


# -- data
def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(size: int = SIZE, seed: int = 1) -> tuple[bytes, str]:
    data = random.Random(seed).randbytes(size)
    return data, digest_of(data)


def manifest(n: int = 1) -> tuple[bytes, str]:
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST.decode(), "config": {"digest": "sha256:" + "%064x" % n}},
        separators=(",", ":"),
    ).encode()
    return body, digest_of(body)


# -- playing the upstream
def storage_ok(length: int) -> bytes:
    """The head of blob storage's 200 (the body follows separately)."""
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % length


def manifest_ok(body: bytes, digest: str, media_type: bytes = OCI_MANIFEST, head_only: bool = False) -> bytes:
    extra = b"Content-Type: " + media_type + b"\r\nDocker-Content-Digest: " + digest.encode() + b"\r\n"
    raw = ok(body, extra=extra)
    return raw[: len(raw) - len(body)] if head_only else raw


def newest_upstream(h: Harness) -> UpstreamConnection:
    return h.upstreams.connections[-1][1]


def lines(h: Harness) -> list[bytes]:
    """Every request line the upstreams received, connection by connection (not in time order)."""
    return [s.line for s in upstream_requests(h)]


def _last_head(t: Any) -> bytes:
    """The last request head an upstream transport received."""
    data = t.value()
    start = [m.start() for m in _REQUEST_LINE.finditer(data)][-1]
    return data[start:].split(b"\r\n\r\n", 1)[0]


def waiting(h: Harness) -> Sent:
    """The request the one upstream connection still waiting for a response head received last."""
    conns = [t for _, conn, t in h.upstreams.connections if conn._attempt is not None]
    assert len(conns) == 1, f"{len(conns)} upstream requests are waiting"
    head = _last_head(conns[0]).split(b"\r\n")
    sent = Sent(head[0])
    for line in head[1:]:
        name, _, value = line.partition(b": ")
        sent.fields.setdefault(name.lower(), []).append(value)
    return sent


def answer_to(h: Harness, line: bytes, raw: bytes, containing: bytes = b"") -> None:
    """Answer the oldest waiting upstream request with request line `line` (and `containing` in its head)."""
    for _, conn, t in h.upstreams.connections:
        if conn._attempt is not None:
            head = _last_head(t)
            if head.startswith(line + b"\r\n") and containing in head:
                conn.dataReceived(raw)
                return
    raise AssertionError(f"no waiting request is {line!r}")


def blob_line(method: str, repo: str, digest: str) -> bytes:
    return f"{method} /v2/{repo}/blobs/{digest} HTTP/1.1".encode()


STORAGE_GET = b"GET /blob?X-Amz-Signature=abc HTTP/1.1"
PARTIAL = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/5000\r\nContent-Length: 10\r\n\r\n"


def fill(h: Harness, data: bytes, digest: str, repo: str = "app") -> Reply:
    """A complete miss: registry 307, storage 200 in one piece. Returns the client's reply."""
    before = Counter(lines(h))
    c = call(h, "GET", f"/v2/{repo}/blobs/{digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(len(data)) + data)
    assert Counter(lines(h)) - before == Counter([blob_line("GET", repo, digest), STORAGE_GET])
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    return r


# -- playing the client
def so_far(c: Call) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """A response that may still be arriving: status, fields and the body bytes received so far."""
    head, sep, body = c.transport.value().partition(b"\r\n\r\n")
    assert sep, f"no response head yet: {c.transport.value()[:200]!r}"
    head_lines = head.split(b"\r\n")
    fields: dict[bytes, list[bytes]] = {}
    for line in head_lines[1:]:
        name, _, value = line.partition(b": ")
        fields.setdefault(name.lower(), []).append(value)
    return int(head_lines[0].split(b" ")[1]), fields, body


def aborted(c: Call) -> bool:
    """abortConnection on a StringTransport sets `disconnected`; a clean close only `disconnecting`."""
    return bool(c.transport.disconnected)


def assert_cut_short(c: Call, data: bytes) -> None:
    """The client got a head promising all of `data`, a strict prefix of it, then an abort."""
    status, fields, body = so_far(c)
    assert status == 200 and fields[b"content-length"] == [b"%d" % len(data)]
    assert len(body) < len(data) and data.startswith(body)
    assert aborted(c)


# -- the store
def blob_files(h: Harness) -> list[str]:
    assert h.cache is not None
    return sorted(os.listdir(os.path.join(h.cache.store.root, "blobs", "sha256")))


def tmp_files(h: Harness) -> list[str]:
    assert h.cache is not None
    return os.listdir(os.path.join(h.cache.store.root, "tmp"))


def stored_path(h: Harness, digest: str) -> Path:
    assert h.cache is not None
    return Path(h.cache.store.path_of(digest))


def metric(h: Harness, name: str, **labels: str) -> float:
    value = h.sample(f"ecrproxy_cache_{name}_total", labels)
    assert value is not None, name
    return value


def cached(tmp_path: Path, **kwargs: Any) -> Harness:
    return Harness(cache_dir=str(tmp_path / "cache"), **kwargs)


def drop_idle_upstreams(h: Harness) -> None:
    """Close the pool's keep-alive connections, so the next request must connect (and can be refused)."""
    h.pool.close()
    h.reactor.advance(0)


# ---------------------------------------------------------------------------
# 1. miss, then hit


def test_a_blob_miss_is_fetched_once_then_served_from_disk(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    assert lines(h) == [blob_line("GET", "app", digest)]
    answer(h, REDIRECT)
    assert lines(h)[1] == STORAGE_GET
    assert upstream_requests(h)[1].header(b"authorization") is None  # storage never sees the ECR token
    answer(h, storage_ok(len(data)) + data)
    r = c.reply()
    assert r.status == 200 and r.body == data
    assert r.header(b"x-cache") == b"MISS"
    assert r.header(b"content-length") == b"%d" % len(data)
    assert r.header(b"docker-content-digest") == digest.encode()
    assert not c.transport.disconnecting  # a complete response keeps the connection
    assert blob_files(h) == [digest[7:]] and stored_path(h, digest).read_bytes() == data
    assert tmp_files(h) == []

    c2 = call(h, "GET", f"/v2/app/blobs/{digest}")
    r2 = c2.reply()
    assert r2.status == 200 and r2.body == data
    assert r2.header(b"x-cache") == b"HIT"
    assert r2.header(b"content-length") == b"%d" % len(data)
    assert r2.header(b"docker-content-digest") == digest.encode()
    assert r2.header(b"accept-ranges") == b"bytes"
    assert len(upstream_requests(h)) == 2  # nothing more went upstream
    assert not c2.transport.disconnecting

    assert metric(h, "misses", kind="blob") == 1
    assert metric(h, "hits", kind="blob") == 1
    assert metric(h, "bytes", source="upstream") == len(data)
    assert metric(h, "bytes", source="cache") == len(data)
    assert h.sample("ecrproxy_cache_size_bytes") == len(data)


def test_a_head_hit_has_the_length_and_no_body(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest)
    c = call(h, "HEAD", f"/v2/app/blobs/{digest}")
    raw = c.transport.value()
    assert raw.endswith(b"\r\n\r\n")  # the head and nothing after it
    r = c.reply()
    assert r.status == 200 and r.body == b""
    assert r.header(b"content-length") == b"%d" % len(data)
    assert r.header(b"docker-content-digest") == digest.encode()
    assert r.header(b"x-cache") == b"HIT"
    assert len(upstream_requests(h)) == 2
    assert metric(h, "hits", kind="blob") == 1
    assert metric(h, "bytes", source="cache") == 0


def test_a_blob_the_registry_answers_itself_is_cached_too(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob(70_000)
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    answer(h, storage_ok(len(data)) + data)  # a 200 from the registry, no redirect
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    assert lines(h) == [blob_line("GET", "app", digest)]
    r2 = call(h, "GET", f"/v2/app/blobs/{digest}").reply()
    assert (r2.status, r2.body, r2.header(b"x-cache")) == (200, data, b"HIT")
    assert len(upstream_requests(h)) == 1


def test_a_head_or_range_miss_goes_straight_upstream_and_stores_nothing(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob(5000)
    c = call(h, "HEAD", f"/v2/app/blobs/{digest}")
    assert lines(h) == [blob_line("HEAD", "app", digest)]
    answer(h, storage_ok(len(data)))
    r = c.reply()
    assert (r.status, r.header(b"content-length"), r.header(b"x-cache")) == (200, b"5000", b"MISS")
    c = send(h, request("GET", f"/v2/app/blobs/{digest}", headers=[(b"Range", b"bytes=0-9")]))
    assert waiting(h).line == blob_line("GET", "app", digest)
    assert waiting(h).header(b"range") == b"bytes=0-9"
    answer(h, PARTIAL + data[:10])
    r = c.reply()
    assert (r.status, r.body, r.header(b"content-range")) == (206, data[:10], b"bytes 0-9/5000")
    assert blob_files(h) == [] and tmp_files(h) == []
    assert metric(h, "misses", kind="blob") == 2


def test_a_range_miss_in_flight_does_not_hold_back_a_whole_get(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob(5000)
    ranged = send(h, request("GET", f"/v2/app/blobs/{digest}", headers=[(b"Range", b"bytes=0-9")]))
    whole = call(h, "GET", f"/v2/app/blobs/{digest}")  # not a follower of a partial body: its own fetch
    assert lines(h) == [blob_line("GET", "app", digest)] * 2
    answer_to(h, blob_line("GET", "app", digest), PARTIAL + data[:10], containing=b"\r\nRange: bytes=0-9")
    assert ranged.reply().body == data[:10]
    answer(h, REDIRECT)
    answer(h, storage_ok(len(data)) + data)
    r = whole.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    assert blob_files(h) == [digest[7:]]


# ---------------------------------------------------------------------------
# 2. ranges on a hit


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        (b"bytes=10-19", 10, 19),
        (b"bytes=0-0", 0, 0),
        (b"bytes=-100", SIZE - 100, SIZE - 1),  # suffix
        (b"bytes=300000-", 300000, SIZE - 1),  # open
        (b"bytes=599990-700000", 599990, SIZE - 1),  # past the end: cut to the end
        (b"bytes=-9999999", 0, SIZE - 1),  # a suffix longer than the blob: all of it
    ],
)
def test_a_range_on_a_hit_is_a_206(tmp_path: Path, header: bytes, first: int, last: int) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest)
    c = send(h, request("GET", f"/v2/app/blobs/{digest}", headers=[(b"Range", header)]))
    r = c.reply()
    assert r.status == 206
    assert r.header(b"content-range") == b"bytes %d-%d/%d" % (first, last, SIZE)
    assert r.header(b"content-length") == b"%d" % (last - first + 1)
    assert r.body == data[first : last + 1]
    assert r.header(b"x-cache") == b"HIT"
    assert r.header(b"docker-content-digest") == digest.encode()
    assert len(upstream_requests(h)) == 2


@pytest.mark.parametrize("header", [b"bytes=%d-" % SIZE, b"bytes=700000-700010", b"bytes=-0"])
def test_an_unsatisfiable_range_on_a_hit_is_a_416(tmp_path: Path, header: bytes) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest)
    r = send(h, request("GET", f"/v2/app/blobs/{digest}", headers=[(b"Range", header)])).reply()
    assert r.status == 416
    assert r.header(b"content-range") == b"bytes */%d" % SIZE
    assert r.header(b"content-type") == b"application/json; charset=utf-8"
    assert r.code == "RANGE_INVALID"
    assert data[:64] not in r.body
    assert len(upstream_requests(h)) == 2


def test_a_range_that_is_not_one_byte_range_gets_the_whole_blob(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest)
    for header in (b"bytes=0-1,5-6", b"items=0-1", b"bytes=20-10"):
        r = send(h, request("GET", f"/v2/app/blobs/{digest}", headers=[(b"Range", header)])).reply()
        assert (r.status, r.body, r.header(b"content-range")) == (200, data, None)
    assert len(upstream_requests(h)) == 2


# ---------------------------------------------------------------------------
# 3. single flight: one upstream fetch, everyone reads the growing file


def test_concurrent_misses_share_one_upstream_fetch_streamed_in_pieces(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    target = f"/v2/app/blobs/{digest}"
    clients = [call(h, "GET", target) for _ in range(3)]
    assert lines(h) == [blob_line("GET", "app", digest)]  # one request for three clients
    answer(h, REDIRECT)
    assert lines(h) == [blob_line("GET", "app", digest), STORAGE_GET]
    assert not any(c.answered for c in clients)

    answer(h, storage_ok(SIZE) + data[:100_000])
    up = newest_upstream(h)
    for c in clients:
        status, fields, body = so_far(c)
        assert status == 200 and fields[b"content-length"] == [b"%d" % SIZE]
        assert fields[b"docker-content-digest"] == [digest.encode()]
        assert body == data[:100_000]
    assert so_far(clients[0])[1][b"x-cache"] == [b"MISS"]
    assert [so_far(c)[1][b"x-cache"] for c in clients[1:]] == [[b"HIT"], [b"HIT"]]

    up.dataReceived(data[100_000:350_000])
    assert all(so_far(c)[2] == data[:350_000] for c in clients)

    late = call(h, "GET", target)  # joins mid-transfer: what is there at once, then the rest
    status, fields, body = so_far(late)
    assert (status, body, fields[b"x-cache"]) == (200, data[:350_000], [b"HIT"])

    up.dataReceived(data[350_000:-1])
    # everything but the last byte is on disk: nobody has the last byte before verification
    assert all(so_far(c)[2] == data[:-1] for c in clients + [late])
    up.dataReceived(data[-1:])
    for c in clients + [late]:
        r = c.reply()
        assert r.status == 200 and r.body == data
        assert not aborted(c)
    assert lines(h) == [blob_line("GET", "app", digest), STORAGE_GET]
    assert stored_path(h, digest).read_bytes() == data and tmp_files(h) == []
    assert metric(h, "misses", kind="blob") == 1
    assert metric(h, "hits", kind="blob") == 3
    assert metric(h, "bytes", source="upstream") == SIZE
    assert metric(h, "bytes", source="cache") == 3 * SIZE


def test_the_last_byte_waits_for_the_digest_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    clients = [call(h, "GET", f"/v2/app/blobs/{digest}") for _ in range(2)]
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data[:200_000])
    seen: list[tuple[int, list[bytes]]] = []
    real_finish = blobstore.Fill.finish

    def finish(fill: blobstore.Fill) -> bool:
        # every byte is written and on disk, the sha256 not yet compared
        seen.append((fill.written, [so_far(c)[2] for c in clients]))
        return real_finish(fill)

    monkeypatch.setattr(blobstore.Fill, "finish", finish)
    newest_upstream(h).dataReceived(data[200_000:])
    assert seen == [(SIZE, [data[:-1], data[:-1]])]
    assert [c.reply().body for c in clients] == [data, data]


def test_a_different_repository_during_a_fill_is_probed_then_follows_it(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    leader = call(h, "GET", f"/v2/a/app/blobs/{digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data[:100_000])
    up = newest_upstream(h)
    other = call(h, "GET", f"/v2/b/app/blobs/{digest}")
    assert waiting(h).line == blob_line("HEAD", "b/app", digest)
    assert not other.answered
    answer(h, storage_ok(SIZE))  # the registry's answer to that HEAD
    assert so_far(other)[2] == data[:100_000]
    up.dataReceived(data[100_000:])
    assert leader.reply().body == data and other.reply().body == data
    assert other.reply().header(b"x-cache") == b"HIT"
    assert Counter(lines(h)) == Counter(
        [blob_line("GET", "a/app", digest), STORAGE_GET, blob_line("HEAD", "b/app", digest)]
    )


def test_a_slow_client_is_paused_and_resumed_while_the_fill_goes_on(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    slow, fast = call(h, "GET", f"/v2/app/blobs/{digest}"), call(h, "GET", f"/v2/app/blobs/{digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data[:100_000])
    slow.transport.producer.pauseProducing()  # the client's socket buffer is full
    up = newest_upstream(h)
    up.dataReceived(data[100_000:300_000])
    assert so_far(slow)[2] == data[:100_000] and so_far(fast)[2] == data[:300_000]
    up.dataReceived(data[300_000:])
    assert fast.reply().body == data and stored_path(h, digest).read_bytes() == data
    assert so_far(slow)[2] == data[:100_000]
    slow.transport.producer.resumeProducing()
    assert slow.reply().body == data and not aborted(slow)


def test_a_big_hit_lets_other_connections_have_the_reactor_and_stops_when_its_client_leaves(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob(9 << 20)  # more than one turn of the file sender (8 MiB)
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(len(data)) + data)
    h.reactor.advance(0)
    assert c.reply().body == data
    proto, transport = h.client()
    proto.dataReceived(request("GET", f"/v2/app/blobs/{digest}"))
    first_turn = so_far(Call(transport))[2]
    assert first_turn == data[: 8 << 20]  # the rest waits for the next reactor turn
    proto.connectionLost(Failure(ConnectionDone()))
    h.reactor.advance(0)
    assert so_far(Call(transport))[2] == first_turn
    r = call(h, "GET", f"/v2/app/blobs/{digest}")
    h.reactor.advance(0)
    assert (r.reply().body, r.reply().header(b"x-cache")) == (data, b"HIT")
    assert len(lines(h)) == 2


def test_pipelined_hits_on_one_connection_are_answered_in_order(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest)
    c = send(h, request("GET", f"/v2/app/blobs/{digest}")
             + request("GET", f"/v2/app/blobs/{digest}", headers=[(b"Range", b"bytes=5-9")]))
    raw = c.transport.value()
    first_head, _, rest = raw.partition(b"\r\n\r\n")
    assert first_head.startswith(b"HTTP/1.1 200 ") and rest[:SIZE] == data
    second_head, _, second_body = rest[SIZE:].partition(b"\r\n\r\n")
    assert second_head.startswith(b"HTTP/1.1 206 ") and b"Content-Range: bytes 5-9/%d" % SIZE in second_head
    assert second_body == data[5:10]
    assert not c.transport.disconnecting and len(lines(h)) == 2


def test_clients_waiting_for_a_fill_that_fails_upstream_are_answered_too(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    leader, *waiters = [call(h, "GET", f"/v2/app/blobs/{digest}") for _ in range(3)]
    answer(h, REDIRECT)
    answer(h, ok(b"<Error><Code>AccessDenied</Code></Error>", b"403 Forbidden"))
    r = leader.reply()
    assert r.status == 502 and b"AccessDenied" not in r.body
    # the waiters were let go: each asks the registry (one of them as the new fill)
    assert lines(h).count(blob_line("GET", "app", digest)) == 3
    for _ in waiters:
        answer_to(h, blob_line("GET", "app", digest), REDIRECT)
    while any(conn._attempt is not None for _, conn, _ in h.upstreams.connections):
        answer_to(h, STORAGE_GET, storage_ok(SIZE) + data)
    assert [c.reply().body for c in waiters] == [data, data]
    assert blob_files(h) == [digest[7:]] and tmp_files(h) == []


# ---------------------------------------------------------------------------
# 4., 5., 6. fills that fail, and a leader that leaves


def test_a_body_that_fails_its_digest_is_never_stored_nor_served_whole(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    bad = data[:-1] + bytes([data[-1] ^ 0xFF])  # right length, wrong last byte
    clients = [call(h, "GET", f"/v2/app/blobs/{digest}") for _ in range(2)]
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + bad[:300_000])
    newest_upstream(h).dataReceived(bad[300_000:])
    for c in clients:
        assert_cut_short(c, data)
        assert so_far(c)[2] == data[:-1]  # the withheld last byte is the one that was wrong
    assert blob_files(h) == [] and tmp_files(h) == []
    assert metric(h, "digest_mismatches") == 1
    assert h.cache is not None and not h.cache.store.has(digest) and h.cache.store.filling(digest) is None

    again = call(h, "GET", f"/v2/app/blobs/{digest}")  # nothing cached: the upstream again
    assert waiting(h).line == blob_line("GET", "app", digest) and len(lines(h)) == 3
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    r = again.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    assert blob_files(h) == [digest[7:]]


@pytest.mark.parametrize("how", ["lost", "closed"])
def test_an_upstream_that_dies_mid_body_aborts_the_clients_and_leaves_nothing(tmp_path: Path, how: str) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    clients = [call(h, "GET", f"/v2/app/blobs/{digest}") for _ in range(2)]
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data[:250_000])
    assert len(tmp_files(h)) == 1  # the fill's file
    up = newest_upstream(h)
    if how == "lost":
        up.connectionLost(Failure(ConnectionLost()))
    else:  # a clean FIN before Content-Length bytes is just as incomplete
        up.transport.loseConnection()
        h.reactor.advance(0)
    for c in clients:
        assert_cut_short(c, data)
        assert so_far(c)[2] == data[:250_000]
    assert tmp_files(h) == [] and blob_files(h) == []
    assert metric(h, "digest_mismatches") == 0
    again = call(h, "GET", f"/v2/app/blobs/{digest}")
    assert len(lines(h)) == 3 and waiting(h).line == blob_line("GET", "app", digest)
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    assert again.reply().body == data


def test_a_stalled_fill_is_cut(tmp_path: Path) -> None:
    h = cached(tmp_path)
    h.factory.limits.min_rate = 0  # 1,000 bytes a minute is too slow for a client (tests/unit/test_client_side.py)
    data, digest = blob()
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data[:1000])
    up, up_transport = h.upstreams.last()
    h.reactor.advance(59)
    up.dataReceived(data[1000:2000])  # progress: the watch starts over
    h.reactor.advance(59)
    assert not aborted(c) and len(tmp_files(h)) == 1
    h.reactor.advance(62)
    assert_cut_short(c, data)
    assert so_far(c)[2] == data[:2000]
    assert up_transport.disconnected  # the upstream transfer was cut, not left hanging
    assert tmp_files(h) == [] and blob_files(h) == []


def test_the_fill_goes_on_when_the_client_that_started_it_leaves(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    leader_proto, leader_transport = h.client()
    leader_proto.dataReceived(request("GET", f"/v2/app/blobs/{digest}"))
    follower = call(h, "GET", f"/v2/app/blobs/{digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data[:100_000])
    up, up_transport = h.upstreams.last()
    assert len(leader_transport.value()) > 100_000
    leader_proto.connectionLost(Failure(ConnectionDone()))
    left_with = leader_transport.value()
    assert not up_transport.disconnecting  # the upstream transfer is not cut
    up.dataReceived(data[100_000:400_000])
    assert so_far(follower)[2] == data[:400_000]
    assert leader_transport.value() == left_with  # nothing more is written for a client that left
    up.dataReceived(data[400_000:])
    r = follower.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"HIT")
    assert stored_path(h, digest).read_bytes() == data
    later = call(h, "GET", f"/v2/app/blobs/{digest}").reply()
    assert (later.body, later.header(b"x-cache")) == (data, b"HIT")
    assert lines(h) == [blob_line("GET", "app", digest), STORAGE_GET]


def test_a_client_that_leaves_before_the_upstream_answers_hands_the_fetch_to_a_waiting_one(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    leader_proto, _ = h.client()
    leader_proto.dataReceived(request("GET", f"/v2/app/blobs/{digest}"))
    second = call(h, "GET", f"/v2/app/blobs/{digest}")
    assert len(lines(h)) == 1
    leader_proto.connectionLost(Failure(ConnectionDone()))
    h.reactor.advance(0)
    # the leader's request was cancelled; the waiting client now fetches it itself
    assert waiting(h).line == blob_line("GET", "app", digest) and len(lines(h)) == 2
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    r = second.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    assert blob_files(h) == [digest[7:]]


# ---------------------------------------------------------------------------
# 7. across repositories


def test_a_blob_stored_for_one_repository_is_served_to_another_once_the_upstream_confirms(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest, repo="a/app")
    c = call(h, "GET", f"/v2/b/app/blobs/{digest}")
    probe = waiting(h)
    assert probe.line == blob_line("HEAD", "b/app", digest)
    assert h.keeper.current is not None
    assert probe.header(b"authorization") == h.keeper.current.header  # asked with the proxy's token
    assert not c.answered
    answer(h, b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + STORAGE + b"\r\nContent-Length: 0\r\n\r\n")
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"HIT")
    assert r.header(b"docker-content-digest") == digest.encode()
    assert len(lines(h)) == 3  # the HEAD only: no GET, no storage
    r = call(h, "GET", f"/v2/b/app/blobs/{digest}").reply()  # confirmed: no more probes
    assert (r.body, r.header(b"x-cache")) == (data, b"HIT")
    assert len(lines(h)) == 3


def test_a_repository_the_upstream_denies_holding_the_blob_gets_the_upstreams_answer(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest, repo="a/app")
    c = call(h, "GET", f"/v2/b/app/blobs/{digest}")
    assert waiting(h).line == blob_line("HEAD", "b/app", digest)
    answer(h, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    # the client's own GET goes upstream, and its answer is what the client gets
    assert waiting(h).line == blob_line("GET", "b/app", digest) and len(lines(h)) == 4
    unknown = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}'
    answer(h, ok(unknown, b"404 Not Found", b"Content-Type: application/json\r\n"))
    r = c.reply()
    assert (r.status, r.body) == (404, unknown)
    assert data[:64] not in c.transport.value()
    assert r.header(b"x-cache") == b"MISS"
    # not confirmed: the next request asks again
    c = call(h, "HEAD", f"/v2/b/app/blobs/{digest}")
    assert waiting(h).line == blob_line("HEAD", "b/app", digest) and len(lines(h)) == 5
    answer(h, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert waiting(h).line == blob_line("HEAD", "b/app", digest) and len(lines(h)) == 6
    answer(h, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert c.reply().status == 404
    assert metric(h, "hits", kind="blob") == 0


# ---------------------------------------------------------------------------
# 8. a stored file that changed is checked again


def corrupt(h: Harness, digest: str) -> None:
    path = stored_path(h, digest)
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(raw))
    # the check is keyed on (size, mtime, inode): make sure the mtime moved even on a coarse clock
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def test_a_corrupted_stored_blob_is_detected_removed_and_fetched_again(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest)
    corrupt(h, digest)
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    assert not c.answered  # nothing of the corrupt file went out
    assert waiting(h).line == blob_line("GET", "app", digest) and len(lines(h)) == 3
    assert not stored_path(h, digest).exists()
    assert metric(h, "digest_mismatches") == 1
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    assert stored_path(h, digest).read_bytes() == data
    r = call(h, "GET", f"/v2/app/blobs/{digest}").reply()
    assert (r.body, r.header(b"x-cache")) == (data, b"HIT") and len(lines(h)) == 4


def test_after_a_restart_a_stored_blob_is_verified_then_served(tmp_path: Path) -> None:
    first = cached(tmp_path)
    data, digest = blob()
    fill(first, data, digest)
    h = cached(tmp_path)  # a new process on the same directory
    r = call(h, "GET", f"/v2/app/blobs/{digest}").reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"HIT")
    assert upstream_requests(h) == []
    corrupt(h, digest)
    h2 = cached(tmp_path)
    c = call(h2, "GET", f"/v2/app/blobs/{digest}")
    assert not c.answered and lines(h2) == [blob_line("GET", "app", digest)]
    assert metric(h2, "digest_mismatches") == 1 and blob_files(h2) == []


def test_a_client_that_leaves_during_verification_gets_nothing_and_costs_nothing(tmp_path: Path) -> None:
    first = cached(tmp_path)
    data, digest = blob()
    fill(first, data, digest)
    h = cached(tmp_path)
    assert h.cache is not None
    checks: list[tuple[int, int, Deferred[str]]] = []

    def verify(fd: int, size: int) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        checks.append((fd, size, d))
        return d

    h.cache.verify = verify
    proto, transport = h.client()
    proto.dataReceived(request("GET", f"/v2/app/blobs/{digest}"))
    assert len(checks) == 1 and checks[0][1] == SIZE and transport.value() == b""
    proto.connectionLost(Failure(ConnectionDone()))
    fd, size, d = checks[0]
    d.callback(blobstore.hash_file(fd, size))
    assert transport.value() == b"" and upstream_requests(h) == []
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor was closed
    # the check's outcome is kept though its client left: the next request is served at once
    r = call(h, "GET", f"/v2/app/blobs/{digest}").reply()
    assert (r.body, r.header(b"x-cache")) == (data, b"HIT")
    assert len(checks) == 1 and upstream_requests(h) == []


def test_a_verification_that_fails_to_run_sends_the_request_upstream(tmp_path: Path) -> None:
    first = cached(tmp_path)
    data, digest = blob()
    fill(first, data, digest)
    h = cached(tmp_path)
    assert h.cache is not None
    h.cache.verify = lambda fd, size: fail(OSError(errno.EIO, "I/O error"))
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    assert lines(h) == [blob_line("GET", "app", digest)]
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    assert stored_path(h, digest).read_bytes() == data  # not thrown away for an unreadable check
    assert h.sample("ecrproxy_cache_digest_mismatches_total") == 0


# ---------------------------------------------------------------------------
# eviction


def test_the_least_recently_used_blob_is_evicted_to_stay_under_cache_size(tmp_path: Path) -> None:
    h = cached(tmp_path, cache_size=1_000_000)
    a, a_digest = blob(seed=1)
    b, b_digest = blob(seed=2)
    fill(h, a, a_digest)
    fill(h, b, b_digest)
    assert blob_files(h) == [b_digest[7:]]
    assert metric(h, "evictions") == 1 and h.sample("ecrproxy_cache_size_bytes") == SIZE
    fill(h, a, a_digest)  # gone from the cache: the upstream again
    assert len(lines(h)) == 6 and blob_files(h) == [a_digest[7:]]


def test_a_hit_makes_a_blob_recently_used(tmp_path: Path) -> None:
    """Eviction is least recently *used*: a blob served from disk moves to the back of the queue."""
    h = cached(tmp_path, cache_size=2 * SIZE + SIZE // 2)
    a, a_digest = blob(seed=1)
    b, b_digest = blob(seed=2)
    c, c_digest = blob(seed=3)
    fill(h, a, a_digest)
    fill(h, b, b_digest)
    r = call(h, "GET", f"/v2/app/blobs/{a_digest}").reply()  # a is now more recent than b
    assert (r.body, r.header(b"x-cache")) == (a, b"HIT")
    fill(h, c, c_digest)  # room for two: b goes, not a
    assert sorted(blob_files(h)) == sorted([a_digest[7:], c_digest[7:]])


def test_a_blob_bigger_than_the_cache_is_relayed_and_not_stored(tmp_path: Path) -> None:
    h = cached(tmp_path, cache_size=100_000)
    data, digest = blob()
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    assert r.header(b"docker-content-digest") == digest.encode()
    assert blob_files(h) == [] and tmp_files(h) == []
    assert metric(h, "disk_full") == 0


# ---------------------------------------------------------------------------
# 9. manifests


def test_a_manifest_by_digest_is_stored_with_its_media_type(tmp_path: Path) -> None:
    h = cached(tmp_path)
    body, digest = manifest()
    c = call(h, "GET", f"/v2/app/manifests/{digest}")
    assert lines(h) == [f"GET /v2/app/manifests/{digest} HTTP/1.1".encode()]
    answer(h, manifest_ok(body, digest))
    r = c.reply()
    assert (r.status, r.body, r.header(b"content-type"), r.header(b"x-cache")) == (200, body, OCI_MANIFEST, b"MISS")
    assert stored_path(h, digest).read_bytes() == body
    for method in ("GET", "HEAD"):
        r = call(h, method, f"/v2/app/manifests/{digest}").reply()
        assert r.status == 200 and r.body == (body if method == "GET" else b"")
        assert r.header(b"content-type") == OCI_MANIFEST
        assert r.header(b"content-length") == b"%d" % len(body)
        assert r.header(b"docker-content-digest") == digest.encode()
        assert r.header(b"x-cache") == b"HIT"
    assert len(lines(h)) == 1
    assert metric(h, "misses", kind="manifest") == 1 and metric(h, "hits", kind="manifest") == 2


def test_a_manifest_whose_body_is_not_its_digest_is_not_stored(tmp_path: Path) -> None:
    h = cached(tmp_path)
    body, _ = manifest(1)
    _, digest = manifest(2)
    c = call(h, "GET", f"/v2/app/manifests/{digest}")
    answer(h, manifest_ok(body, digest))
    assert c.reply().status == 200  # relayed as the upstream said (the client checks digests itself)
    assert blob_files(h) == [] and metric(h, "digest_mismatches") == 1
    call(h, "GET", f"/v2/app/manifests/{digest}")
    assert len(lines(h)) == 2


TAG = "/v2/app/manifests/latest"
TAG_LINE = b"GET /v2/app/manifests/latest HTTP/1.1"
TAG_HEAD = b"HEAD /v2/app/manifests/latest HTTP/1.1"


def tagged(h: Harness, body: bytes, digest: str) -> None:
    """First GET of the tag: a miss that stores the manifest and remembers the tag."""
    c = call(h, "GET", TAG)
    assert waiting(h).line == TAG_LINE
    answer(h, manifest_ok(body, digest))
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, body, b"MISS")


def hit(h: Harness, body: bytes, digest: str, target: str = TAG) -> Reply:
    r = call(h, "GET", target).reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, body, b"HIT")
    assert r.header(b"content-type") == OCI_MANIFEST
    assert r.header(b"docker-content-digest") == digest.encode()
    return r


def test_a_tag_is_trusted_for_tag_ttl_then_revalidated_with_a_head(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60)
    body, digest = manifest()
    tagged(h, body, digest)
    h.reactor.advance(59)
    hit(h, body, digest)
    assert len(lines(h)) == 1
    h.reactor.advance(2)
    c = call(h, "GET", TAG)
    assert waiting(h).line == TAG_HEAD and len(lines(h)) == 2
    answer(h, manifest_ok(body, digest, head_only=True))
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, body, b"HIT")
    assert r.header(b"warning") is None
    assert len(lines(h)) == 2  # the HEAD was enough
    h.reactor.advance(59)  # the revalidation restarted the clock
    hit(h, body, digest)
    assert len(lines(h)) == 2
    assert metric(h, "hits", kind="manifest") == 3 and metric(h, "misses", kind="manifest") == 1


def test_a_tag_that_moved_is_fetched_again(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60)
    old, old_digest = manifest(1)
    new, new_digest = manifest(2)
    tagged(h, old, old_digest)
    h.reactor.advance(61)
    c = call(h, "GET", TAG)
    assert waiting(h).line == TAG_HEAD
    answer(h, manifest_ok(new, new_digest, head_only=True))
    assert waiting(h).line == TAG_LINE and len(lines(h)) == 3
    answer(h, manifest_ok(new, new_digest))
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, new, b"MISS")
    assert r.header(b"docker-content-digest") == new_digest.encode()
    hit(h, new, new_digest)
    assert len(lines(h)) == 3
    assert sorted(blob_files(h)) == sorted(
        [old_digest[7:], old_digest[7:] + ".type", new_digest[7:], new_digest[7:] + ".type"]
    )


def test_a_tag_is_per_accept_header(tmp_path: Path) -> None:
    h = cached(tmp_path)
    body, digest = manifest()
    tagged(h, body, digest)
    c = send(h, request("GET", TAG, headers=[(b"Accept", DOCKER_MANIFEST)]))
    assert len(lines(h)) == 2 and waiting(h).header(b"accept") == DOCKER_MANIFEST
    answer(h, manifest_ok(body, digest))
    assert c.reply().body == body


@pytest.mark.parametrize("failure", ["503", "refused", "timeout", "no token"])
def test_an_unavailable_upstream_gets_the_stale_manifest_with_a_warning(tmp_path: Path, failure: str) -> None:
    h = cached(tmp_path, tag_ttl=60, stale_if_error=3600)
    body, digest = manifest()
    tagged(h, body, digest)
    h.reactor.advance(600)
    if failure == "timeout":
        c = call(h, "GET", TAG)
        assert waiting(h).line == TAG_HEAD
        assert not c.answered
        h.reactor.advance(61)  # --request-timeout
        assert len(lines(h)) == 2
    elif failure == "no token":
        h.keeper.current = make_token(now=h.reactor.seconds() - 13 * 3600)  # expired
        c = call(h, "GET", TAG)
        assert len(lines(h)) == 1
    elif failure == "refused":
        drop_idle_upstreams(h)
        h.upstreams.refuse = ConnectionRefusedError()
        c = call(h, "GET", TAG)
        assert len(lines(h)) == 1  # nothing could be sent
    else:
        c = call(h, "GET", TAG)
        assert waiting(h).line == TAG_HEAD
        answer(h, ok(b"upstream trouble", b"503 Service Unavailable"))
        assert len(lines(h)) == 2
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, body, b"HIT")
    assert r.header(b"warning") == b'110 - "Response is Stale"'
    assert r.header(b"content-type") == OCI_MANIFEST
    assert r.header(b"docker-content-digest") == digest.encode()
    assert metric(h, "stale") == 1


@pytest.mark.parametrize("failure", ["503", "refused"])
def test_past_stale_if_error_the_client_gets_the_error(tmp_path: Path, failure: str) -> None:
    h = cached(tmp_path, tag_ttl=60, stale_if_error=3600)
    body, digest = manifest()
    tagged(h, body, digest)
    h.reactor.advance(3601)
    if failure == "refused":
        drop_idle_upstreams(h)
        h.upstreams.refuse = ConnectionRefusedError()
        r = call(h, "GET", TAG).reply()
        assert (r.status, r.code) == (502, "UNAVAILABLE")
        assert len(lines(h)) == 1
    else:
        c = call(h, "GET", TAG)
        assert waiting(h).line == TAG_HEAD
        answer(h, ok(b"", b"503 Service Unavailable"))
        # the client's own GET then goes upstream, and gets the upstream's answer
        assert waiting(h).line == TAG_LINE and len(lines(h)) == 3
        answer(h, ok(b'{"errors":[{"code":"UNAVAILABLE"}]}', b"503 Service Unavailable"))
        r = c.reply()
        assert (r.status, r.body) == (503, b'{"errors":[{"code":"UNAVAILABLE"}]}')
    assert r.header(b"warning") is None
    assert body not in r.body
    assert h.sample("ecrproxy_cache_stale_total") == 0


def test_a_tag_the_upstream_says_is_gone_is_not_served_stale(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60, stale_if_error=3600)
    body, digest = manifest()
    tagged(h, body, digest)
    h.reactor.advance(61)
    c = call(h, "GET", TAG)
    answer(h, ok(b"", b"404 Not Found"))  # the HEAD: the tag was deleted
    unknown = b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
    answer(h, ok(unknown, b"404 Not Found"))  # the client's own GET
    assert (c.reply().status, c.reply().body) == (404, unknown)
    h.reactor.advance(10)
    c = call(h, "GET", TAG)
    answer(h, ok(b"", b"503 Service Unavailable"))  # then the registry has an outage
    if any(conn._attempt is not None for _, conn, _ in h.upstreams.connections):
        answer(h, ok(b"", b"503 Service Unavailable"))
    r = c.reply()
    assert r.status == 503 and body not in r.body
    assert h.sample("ecrproxy_cache_stale_total") == 0


def test_tags_and_blobs_survive_a_restart(tmp_path: Path) -> None:
    first = cached(tmp_path, tag_ttl=60)
    body, digest = manifest()
    tagged(first, body, digest)
    h = cached(tmp_path, tag_ttl=60)  # same clock start: still within tag_ttl
    hit(h, body, digest)
    hit(h, body, digest, f"/v2/app/manifests/{digest}")
    assert upstream_requests(h) == []


def test_a_second_tag_of_a_stored_manifest_is_cached_too(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60)
    body, digest = manifest()
    tagged(h, body, digest)
    c = call(h, "GET", "/v2/app/manifests/v1.0")  # the same manifest under a second tag
    assert waiting(h).line == b"GET /v2/app/manifests/v1.0 HTTP/1.1"
    answer(h, manifest_ok(body, digest))
    assert c.reply().body == body
    hit(h, body, digest, "/v2/app/manifests/v1.0")
    assert len(lines(h)) == 2


def test_a_tag_of_a_manifest_first_fetched_by_digest_is_cached(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60)
    body, digest = manifest()
    c = call(h, "GET", f"/v2/app/manifests/{digest}")
    answer(h, manifest_ok(body, digest))
    assert c.reply().body == body
    tagged(h, body, digest)
    hit(h, body, digest)
    assert len(lines(h)) == 2


def test_a_manifest_over_ecrs_size_limit_passes_straight_through(tmp_path: Path) -> None:
    h = cached(tmp_path)
    body = b"{" + b" " * (4 << 20) + b"}"
    digest = digest_of(body)
    c = call(h, "GET", f"/v2/app/manifests/{digest}")
    answer(h, manifest_ok(body, digest))
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, body, b"MISS")
    assert blob_files(h) == []
    call(h, "GET", f"/v2/app/manifests/{digest}")
    assert len(lines(h)) == 2


# ---------------------------------------------------------------------------
# pulling what is stored while the upstream is down


def pull_offline(h: Harness, body: bytes, data: bytes, blob_digest: str) -> None:
    """The requests of a pull of a stored image: the API check, the tag (stale), the layer."""
    r = call(h, "GET", "/v2/").reply()
    assert (r.status, r.body) == (200, b"{}")
    r = call(h, "GET", TAG).reply()
    assert (r.status, r.body, r.header(b"warning")) == (200, body, b'110 - "Response is Stale"')
    r = call(h, "GET", f"/v2/app/blobs/{blob_digest}").reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"HIT")


def stored_image(tmp_path: Path) -> tuple[Harness, bytes, str, bytes, str]:
    h = cached(tmp_path, tag_ttl=60, stale_if_error=3600)
    body, digest = manifest()
    data, blob_digest = blob()
    tagged(h, body, digest)
    fill(h, data, blob_digest)
    h.reactor.advance(600)
    return h, body, digest, data, blob_digest


@pytest.mark.parametrize("failure", ["503", "refused"])
def test_a_stored_image_can_be_pulled_while_the_upstream_is_down(tmp_path: Path, failure: str) -> None:
    h, body, digest, data, blob_digest = stored_image(tmp_path)
    before = len(lines(h))
    if failure == "refused":
        drop_idle_upstreams(h)
        h.upstreams.refuse = ConnectionRefusedError()
        pull_offline(h, body, data, blob_digest)
        assert len(lines(h)) == before
    else:
        c = call(h, "GET", "/v2/")
        answer(h, ok(b"", b"503 Service Unavailable"))
        r = c.reply()
        assert (r.status, r.body) == (200, b"{}")
        c = call(h, "GET", TAG)
        answer(h, ok(b"", b"503 Service Unavailable"))
        r = c.reply()
        assert (r.body, r.header(b"warning")) == (body, b'110 - "Response is Stale"')
        assert call(h, "GET", f"/v2/app/blobs/{blob_digest}").reply().body == data
        assert len(lines(h)) == before + 2


def test_a_stored_image_can_be_pulled_without_an_ecr_token(tmp_path: Path) -> None:
    h, body, digest, data, blob_digest = stored_image(tmp_path)
    before = len(lines(h))
    h.keeper.current = make_token(now=h.reactor.seconds() - 13 * 3600)  # expired; no fresh one to be had
    pull_offline(h, body, data, blob_digest)
    assert len(lines(h)) == before


def test_a_passthrough_proxy_never_answers_the_api_check_itself(tmp_path: Path) -> None:
    h = passthrough(tmp_path)
    c = call(h, "GET", "/v2/", AWS)
    answer(h, ok(b"", b"503 Service Unavailable"))
    assert c.reply().status == 503


# ---------------------------------------------------------------------------
# 10. a full disk


def no_space(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_relays_the_blob_without_caching(tmp_path: Path) -> None:
    h = cached(tmp_path)
    assert h.cache is not None
    h.cache.store._allocate = no_space
    data, digest = blob()
    clients = [call(h, "GET", f"/v2/app/blobs/{digest}") for _ in range(2)]
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    r = clients[0].reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"MISS")
    assert r.header(b"docker-content-digest") == digest.encode()
    assert metric(h, "disk_full") == 1
    assert blob_files(h) == [] and tmp_files(h) == []
    # the client that waited for the fill that never was fetches on its own
    assert waiting(h).line == blob_line("GET", "app", digest) and len(lines(h)) == 3
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    assert clients[1].reply().body == data
    assert metric(h, "disk_full") == 2


def small_disk(h: Harness, usable: int) -> None:
    """Put the cache on a file system with `usable` bytes beside the margin it keeps free (a fake
    statvfs counting the files under the cache directory; --cache-size stays much larger)."""
    assert h.cache is not None
    root = Path(h.cache.store.root)
    capacity = blobstore.MIN_FREE + usable

    def statvfs(path: str) -> os.statvfs_result:
        free = capacity - sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        return os.statvfs_result((4096, 1, capacity, free, free, 1000, 1000, 1000, 0, 255))

    h.cache.store._statvfs = statvfs


def test_a_disk_smaller_than_the_cache_size_evicts_to_cache_the_next_blob(tmp_path: Path) -> None:
    h = cached(tmp_path)  # --cache-size 1 GiB
    small_disk(h, SIZE * 3 // 2)
    a, a_digest = blob(seed=1)
    b, b_digest = blob(seed=2)
    fill(h, a, a_digest)
    fill(h, b, b_digest)  # the disk holds one: a goes
    assert blob_files(h) == [b_digest[7:]]
    assert metric(h, "evictions") == 1 and metric(h, "disk_full") == 0
    big, big_digest = blob(SIZE * 2, seed=3)  # more than the disk can hold: relayed, b kept
    c = call(h, "GET", f"/v2/app/blobs/{big_digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(len(big)) + big)
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, big, b"MISS")
    assert blob_files(h) == [b_digest[7:]] and tmp_files(h) == []
    assert metric(h, "evictions") == 1 and metric(h, "disk_full") == 1


@pytest.mark.xfail(
    strict=True,
    reason="KNOWN LIMITATION (README, Layer cache): on a file system without fallocate, a disk filled by "
    "someone else during the transfer fails the fill, and the clients reading it are cut (they retry); "
    "space is reserved up front wherever fallocate works, and checked with statvfs where it does not",
)
def test_a_disk_that_fills_up_mid_blob_does_not_break_the_pull(tmp_path: Path) -> None:
    h = cached(tmp_path)
    assert h.cache is not None

    def unsupported(fd: int, offset: int, length: int) -> None:  # e.g. a file system without fallocate
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    h.cache.store._allocate = unsupported
    data, digest = blob()
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data[:100_000])
    fill_ = h.cache.store.filling(digest)
    assert fill_ is not None

    class Full:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            self.f.close()

    fill_._file = Full(fill_._file)
    newest_upstream(h).dataReceived(data[100_000:])
    assert not aborted(c)
    assert c.reply().body == data


# ---------------------------------------------------------------------------
# 11. the gate comes first


POLICY = """
[[rule]]
principals = ["user:alice"]
actions = ["pull"]
repositories = ["team-a/*"]
"""


def gated(
    tmp_path: Path, mode: str, policy: str, htpasswd: str | None = None, config: ProxyConfig | None = None
) -> Harness:
    def build(h: Harness) -> Gate:
        return Gate(
            AccessConfig(mode=mode, service=SERVICE),
            FixedPolicy(Policy.from_toml(policy)),
            h.reactor,
            metrics=h.access,
            htpasswd=Htpasswd(htpasswd, h.reactor, check=synchronous_bcrypt) if htpasswd is not None else None,
        )

    return Harness(config, gate=build, cache_dir=str(tmp_path / "cache"))


def test_a_cached_blob_is_never_served_to_a_client_the_policy_refuses(tmp_path: Path) -> None:
    htpasswd = str(tmp_path / "htpasswd")
    write_htpasswd(htpasswd, {"alice": "alice-pw", "bob": "bob-pw"})
    h = gated(tmp_path, "basic", POLICY, htpasswd)
    data, digest = blob()
    alice, bob = basic("alice", "alice-pw"), basic("bob", "bob-pw")
    c = call(h, "GET", f"/v2/team-a/app/blobs/{digest}", alice)
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    assert c.reply().body == data and blob_files(h) == [digest[7:]]
    refused = ((bob, 403, "DENIED"), (None, 401, "UNAUTHORIZED"), (basic("bob", "x"), 401, "UNAUTHORIZED"))
    for auth, status, code in refused:
        for method in ("GET", "HEAD"):
            c = call(h, method, f"/v2/team-a/app/blobs/{digest}", auth)
            r = c.reply()
            assert r.status == status
            if method == "GET":
                assert r.code == code
            assert r.header(b"x-cache") is None
            assert data[:64] not in c.transport.value()
    assert len(lines(h)) == 2  # refusals are local
    r = call(h, "GET", f"/v2/team-a/app/blobs/{digest}", alice).reply()
    assert (r.body, r.header(b"x-cache")) == (data, b"HIT")
    assert metric(h, "hits", kind="blob") == 1


# ---------------------------------------------------------------------------
# 12. --auth passthrough: the upstream sees each client's credentials every time


AWS = basic("AWS", "ecr-password-of-the-client")
OTHER = basic("AWS", "someone-elses-expired-password")


def passthrough(tmp_path: Path) -> Harness:
    return gated(tmp_path, "passthrough", OPEN, config=ProxyConfig(upstream=UPSTREAM, passthrough=True))


def test_passthrough_serves_a_stored_blob_only_after_the_upstream_accepts_the_clients_credentials(
    tmp_path: Path,
) -> None:
    h = passthrough(tmp_path)
    data, digest = blob()
    c = call(h, "GET", f"/v2/app/blobs/{digest}", AWS)
    assert upstream_requests(h)[0].header(b"authorization") == AWS
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    assert c.reply().body == data
    for _ in range(2):  # every request, same repository or not
        c = call(h, "GET", f"/v2/app/blobs/{digest}", AWS)
        probe = waiting(h)
        assert probe.line == blob_line("HEAD", "app", digest) and probe.header(b"authorization") == AWS
        assert not c.answered
        answer(h, storage_ok(SIZE))
        r = c.reply()
        assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"HIT")
    assert Counter(lines(h)) == Counter(
        [blob_line("GET", "app", digest), STORAGE_GET] + [blob_line("HEAD", "app", digest)] * 2
    )
    assert h.keeper.current is not None
    assert h.keeper.current.header not in b"".join(t.value() for _, _, t in h.upstreams.connections)


def test_passthrough_a_refused_probe_is_a_refusal_and_shows_nothing(tmp_path: Path) -> None:
    h = passthrough(tmp_path)
    data, digest = blob()
    c = call(h, "GET", f"/v2/app/blobs/{digest}", AWS)
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    assert c.reply().body == data
    c = call(h, "GET", f"/v2/app/blobs/{digest}", OTHER)
    assert waiting(h).header(b"authorization") == OTHER
    answer(h, b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="x"\r\nContent-Length: 0\r\n\r\n')
    r = c.reply()
    assert (r.status, r.code) == (401, "UNAUTHORIZED")
    assert r.fields[b"www-authenticate"] == [basic_challenge()]
    assert data[:64] not in c.transport.value()
    c = call(h, "GET", f"/v2/app/blobs/{digest}", OTHER)
    answer(h, ok(b'{"errors":[{"code":"DENIED"}]}', b"403 Forbidden"))
    r = c.reply()
    assert (r.status, r.code) == (403, "DENIED") and data[:64] not in c.transport.value()
    r = call(h, "GET", f"/v2/app/blobs/{digest}").reply()  # no credentials at all: refused locally
    assert r.status == 401
    assert len(lines(h)) == 4 and metric(h, "hits", kind="blob") == 0


def test_passthrough_a_client_waiting_for_a_fill_is_checked_with_its_own_credentials(tmp_path: Path) -> None:
    h = passthrough(tmp_path)
    data, digest = blob()
    leader = call(h, "GET", f"/v2/app/blobs/{digest}", AWS)
    intruder = call(h, "GET", f"/v2/app/blobs/{digest}", OTHER)  # waits for the same fill
    assert len(lines(h)) == 1
    answer(h, REDIRECT)
    answer_to(h, STORAGE_GET, storage_ok(SIZE) + data[:100_000])
    probe = waiting(h)  # the waiting client is not let into the fill without asking
    assert probe.line == blob_line("HEAD", "app", digest) and probe.header(b"authorization") == OTHER
    assert not intruder.answered
    answer(h, b'HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n')
    r = intruder.reply()
    assert (r.status, r.code) == (401, "UNAUTHORIZED") and data[:64] not in intruder.transport.value()
    newest_upstream(h).dataReceived(data[100_000:])
    assert leader.reply().body == data


def test_passthrough_never_trusts_a_tag_or_serves_it_stale(tmp_path: Path) -> None:
    h = passthrough(tmp_path)
    body, digest = manifest()
    c = call(h, "GET", TAG, AWS)
    answer(h, manifest_ok(body, digest))
    assert c.reply().body == body
    c = call(h, "GET", TAG, AWS)  # within tag_ttl, still asked
    assert waiting(h).line == TAG_HEAD and waiting(h).header(b"authorization") == AWS
    answer(h, manifest_ok(body, digest, head_only=True))
    r = c.reply()
    assert (r.body, r.header(b"x-cache")) == (body, b"HIT")
    c = call(h, "GET", TAG, AWS)
    answer(h, ok(b"", b"503 Service Unavailable"))
    assert waiting(h).line == TAG_LINE  # no stale answer: the client's own request goes up
    answer(h, ok(b"down", b"503 Service Unavailable"))
    r = c.reply()
    assert r.status == 503 and r.header(b"warning") is None and body not in r.body


def test_without_fallocate_a_blob_the_free_space_cannot_hold_is_streamed_uncached(tmp_path: Path) -> None:
    h = cached(tmp_path)
    assert h.cache is not None

    def unsupported(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    h.cache.store._allocate = unsupported
    h.cache.store._statvfs = lambda path: os.statvfs_result((4096, 4096, 1 << 20, 10, 10, 1000, 1000, 1000, 0, 255))
    data, digest = blob()
    c = call(h, "GET", f"/v2/app/blobs/{digest}")
    answer(h, REDIRECT)
    answer(h, storage_ok(SIZE) + data)
    assert c.reply().body == data and not aborted(c)
    assert h.cache.store.filling(digest) is None and not h.cache.store.has(digest)
    assert metric(h, "disk_full") == 1


# ---------------------------------------------------------------------------
# 13. writes through the proxy: what a later read through the proxy gets


CREATED = b"HTTP/1.1 201 Created\r\nDocker-Content-Digest: %s\r\nContent-Length: 0\r\n\r\n"
ACCEPTED = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
MANIFEST_UNKNOWN = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
BLOB_UNKNOWN = b'{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}'
JSON = b"Content-Type: application/json\r\n"


def write(h: Harness, method: str, target: str, raw: bytes, body: bytes | None = None) -> Reply:
    """A write through the proxy: it goes upstream as it is, and the client gets the upstream's answer.

    A body is sent with a newline at its end, so that the next request on the same upstream
    connection starts a line (what `waiting` and `upstream_requests` look for)."""
    c = call(h, method, target, body=None if body is None else body + b"\n")
    assert waiting(h).line == f"{method} {target} HTTP/1.1".encode()
    answer(h, raw)
    r = c.reply()
    assert r.header(b"x-cache") is None
    return r


def asks_first(h: Harness, method: str, target: str, unknown: bytes) -> Reply:
    """A read of something the upstream no longer has: the upstream is asked (a HEAD probe first when
    the cache holds the digest, then the client's own request) and the client gets its 404."""
    c = call(h, method, target)
    while not c.answered:
        sent = waiting(h)
        assert sent.target == target.encode(), sent.line
        answer(h, ok(unknown if sent.line.startswith(b"GET ") else b"", b"404 Not Found", JSON))
    r = c.reply()
    assert r.status == 404 and r.header(b"x-cache") != b"HIT"
    if method == "GET":
        assert r.body == unknown
    return r


def worker(tmp_path: Path, **kwargs: Any) -> Harness:
    """Another --workers process on the same directory: like tap's children, it leaves the logs as they are."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(testing, "BlobStore", functools.partial(blobstore.BlobStore, compact=False))
        return cached(tmp_path, **kwargs)


def test_a_blob_deleted_through_the_proxy_is_no_longer_served_from_the_cache(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest)
    r = write(h, "DELETE", f"/v2/app/blobs/{digest}", ACCEPTED)
    assert r.status == 202
    for method in ("HEAD", "GET"):
        asks_first(h, method, f"/v2/app/blobs/{digest}", BLOB_UNKNOWN)
    assert metric(h, "hits", kind="blob") == 0


def test_a_tag_pushed_through_the_proxy_is_what_the_next_read_gets(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60)
    old, old_digest = manifest(1)
    new, new_digest = manifest(2)
    tagged(h, old, old_digest)
    hit(h, old, old_digest)
    r = write(h, "PUT", TAG, CREATED % new_digest.encode(), body=new)
    assert r.status == 201
    c = call(h, "GET", TAG)  # within --tag-ttl of the old answer: asked all the same
    assert waiting(h).line == TAG_LINE
    answer(h, manifest_ok(new, new_digest))
    r = c.reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, new, b"MISS")
    assert r.header(b"docker-content-digest") == new_digest.encode()
    head = send(h, request("HEAD", TAG)).reply()
    assert (head.status, head.header(b"x-cache")) == (200, b"HIT")
    assert head.header(b"docker-content-digest") == new_digest.encode()
    assert head.header(b"content-length") == b"%d" % len(new)
    hit(h, new, new_digest)
    assert len(lines(h)) == 3


def test_a_head_by_tag_first_after_a_push_gets_the_new_manifest(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60)
    old, old_digest = manifest(1)
    new, new_digest = manifest(2)
    tagged(h, old, old_digest)
    write(h, "PUT", TAG, CREATED % new_digest.encode(), body=new)
    c = send(h, request("HEAD", TAG))
    assert waiting(h).line == TAG_HEAD
    answer(h, manifest_ok(new, new_digest, head_only=True))
    r = c.reply()
    assert r.status == 200 and r.header(b"docker-content-digest") == new_digest.encode()
    assert r.header(b"content-length") == b"%d" % len(new)


def test_a_push_by_digest_with_tag_parameters_drops_those_tags(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60)
    old, old_digest = manifest(1)
    new, new_digest = manifest(2)
    tagged(h, old, old_digest)
    c = call(h, "GET", "/v2/app/manifests/stable")
    answer(h, manifest_ok(old, old_digest))
    assert c.reply().body == old
    hit(h, old, old_digest, "/v2/app/manifests/stable")
    before = len(lines(h))
    write(h, "PUT", f"/v2/app/manifests/{new_digest}?tag=latest&tag=v2", CREATED % new_digest.encode(), body=new)
    c = call(h, "GET", TAG)
    assert waiting(h).line == TAG_LINE
    answer(h, manifest_ok(new, new_digest))
    assert c.reply().body == new
    hit(h, old, old_digest, "/v2/app/manifests/stable")  # a tag it did not name is left alone
    assert len(lines(h)) == before + 2


def test_a_manifest_deleted_by_digest_is_gone_with_the_tags_that_pointed_at_it(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60, stale_if_error=3600)
    body, digest = manifest(1)
    other, other_digest = manifest(2)
    tagged(h, body, digest)
    c = call(h, "GET", "/v2/app/manifests/other")
    answer(h, manifest_ok(other, other_digest))
    assert c.reply().body == other
    hit(h, body, digest, f"/v2/app/manifests/{digest}")
    r = write(h, "DELETE", f"/v2/app/manifests/{digest}", ACCEPTED)
    assert r.status == 202
    for method in ("GET", "HEAD"):
        asks_first(h, method, f"/v2/app/manifests/{digest}", MANIFEST_UNKNOWN)
    c = call(h, "GET", TAG)  # the tag went with the manifest: asked, never served stale
    assert waiting(h).line == TAG_LINE
    answer(h, ok(b"", b"503 Service Unavailable"))
    r = c.reply()
    assert r.status == 503 and body not in r.body
    hit(h, other, other_digest, "/v2/app/manifests/other")  # another tag of another manifest stays
    assert h.cache is not None and not h.cache.store.knows("app", digest)
    assert h.cache.store.knows("app", other_digest)


def test_a_tag_deleted_through_the_proxy_is_forgotten_its_manifest_by_digest_is_not(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60, stale_if_error=3600)
    body, digest = manifest()
    tagged(h, body, digest)
    r = write(h, "DELETE", TAG, ACCEPTED)
    assert r.status == 202
    c = call(h, "GET", TAG)
    assert waiting(h).line == TAG_LINE
    answer(h, ok(MANIFEST_UNKNOWN, b"404 Not Found", JSON))
    assert (c.reply().status, c.reply().body) == (404, MANIFEST_UNKNOWN)
    before = len(lines(h))
    hit(h, body, digest, f"/v2/app/manifests/{digest}")  # untagged, the manifest itself is still there
    assert len(lines(h)) == before


def test_a_write_in_one_repository_leaves_another_repositorys_cache_alone(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest, repo="a/app")
    c = call(h, "GET", f"/v2/b/app/blobs/{digest}")
    answer(h, storage_ok(SIZE))  # the probe: b/app holds it too
    assert c.reply().body == data
    write(h, "DELETE", f"/v2/a/app/blobs/{digest}", ACCEPTED)
    before = len(lines(h))
    r = call(h, "GET", f"/v2/b/app/blobs/{digest}").reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"HIT")
    assert len(lines(h)) == before and blob_files(h) == [digest[7:]]


REFUSED = [
    b"400 Bad Request",
    b"404 Not Found",
    b"405 Method Not Allowed",
    b"500 Internal Server Error",
    b"503 Service Unavailable",
]


@pytest.mark.parametrize("status", REFUSED)
def test_a_write_the_upstream_refuses_changes_nothing(tmp_path: Path, status: bytes) -> None:
    h = cached(tmp_path, tag_ttl=60)
    body, digest = manifest(1)
    new, new_digest = manifest(2)
    data, blob_digest = blob()
    tagged(h, body, digest)
    fill(h, data, blob_digest)
    refusal = ok(b'{"errors":[{"code":"UNSUPPORTED","message":"nope"}]}', status, JSON)
    for method, target, payload in (
        ("PUT", TAG, new),
        ("PUT", f"/v2/app/manifests/{new_digest}?tag=latest", new),
        ("DELETE", TAG, None),
        ("DELETE", f"/v2/app/manifests/{digest}", None),
        ("DELETE", f"/v2/app/blobs/{blob_digest}", None),
    ):
        r = write(h, method, target, refusal, body=payload)
        assert r.status == int(status[:3])
    before = len(lines(h))
    hit(h, body, digest)
    hit(h, body, digest, f"/v2/app/manifests/{digest}")
    r = call(h, "GET", f"/v2/app/blobs/{blob_digest}").reply()
    assert (r.status, r.body, r.header(b"x-cache")) == (200, data, b"HIT")
    assert len(lines(h)) == before


def test_a_write_that_times_out_may_have_happened_so_its_tag_is_asked_again(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=600)
    old, old_digest = manifest(1)
    new, new_digest = manifest(2)
    tagged(h, old, old_digest)
    c = call(h, "PUT", TAG, body=new + b"\n")
    assert waiting(h).line == b"PUT /v2/app/manifests/latest HTTP/1.1"
    h.reactor.advance(61)  # --request-timeout: the registry may well have taken it
    assert c.reply().status == 504
    c = call(h, "GET", TAG)
    assert waiting(h).line == TAG_LINE
    answer(h, manifest_ok(new, new_digest))
    assert c.reply().body == new


def test_a_write_sent_nowhere_for_lack_of_a_token_changes_nothing(tmp_path: Path) -> None:
    h = cached(tmp_path, tag_ttl=60)
    body, digest = manifest()
    tagged(h, body, digest)
    h.keeper.current = make_token(now=h.reactor.seconds() - 13 * 3600)  # expired; no fresh one to be had
    r = call(h, "DELETE", TAG).reply()
    assert r.status == 503
    h.keeper.current = make_token(now=h.reactor.seconds())
    hit(h, body, digest)
    assert len(lines(h)) == 1


@pytest.mark.parametrize("accept", [None, DOCKER_MANIFEST])
def test_a_head_by_tag_from_the_cache_has_the_same_headers_as_a_get(tmp_path: Path, accept: bytes | None) -> None:
    h = cached(tmp_path, tag_ttl=60)
    body, digest = manifest()
    headers = [(b"Accept", accept)] if accept is not None else []
    c = send(h, request("GET", TAG, headers=headers))
    answer(h, manifest_ok(body, digest, media_type=accept or OCI_MANIFEST))
    miss = c.reply()
    get = send(h, request("GET", TAG, headers=headers)).reply()
    head = send(h, request("HEAD", TAG, headers=headers)).reply()
    assert (get.header(b"x-cache"), head.header(b"x-cache")) == (b"HIT", b"HIT")
    assert len(lines(h)) == 1
    for name in (b"content-length", b"content-type", b"docker-content-digest"):
        assert head.header(name) == get.header(name) == miss.header(name), name
    assert get.header(b"content-length") == b"%d" % len(body) and head.body == b""


def test_a_write_through_one_worker_is_seen_at_once_by_another(tmp_path: Path) -> None:
    one = cached(tmp_path, tag_ttl=600)
    old, old_digest = manifest(1)
    new, new_digest = manifest(2)
    data, blob_digest = blob()
    tagged(one, old, old_digest)
    c = call(one, "GET", "/v2/app/manifests/v1")
    answer(one, manifest_ok(old, old_digest))
    assert c.reply().body == old
    fill(one, data, blob_digest)
    two = worker(tmp_path, tag_ttl=600)  # started after: knows all that from the directory
    hit(two, old, old_digest)
    hit(two, old, old_digest, "/v2/app/manifests/v1")
    hit(two, old, old_digest, f"/v2/app/manifests/{old_digest}")
    r = call(two, "GET", f"/v2/app/blobs/{blob_digest}").reply()
    assert (r.body, r.header(b"x-cache")) == (data, b"HIT")
    assert upstream_requests(two) == []

    # a push through one: two asks for the tag at once (no rescan in between)
    write(one, "PUT", TAG, CREATED % new_digest.encode(), body=new)
    c = call(two, "GET", TAG)
    assert waiting(two).line == TAG_LINE
    answer(two, manifest_ok(new, new_digest))
    assert c.reply().body == new

    # a blob deleted through one is not served by two
    write(one, "DELETE", f"/v2/app/blobs/{blob_digest}", ACCEPTED)
    for method in ("HEAD", "GET"):
        asks_first(two, method, f"/v2/app/blobs/{blob_digest}", BLOB_UNKNOWN)

    # a manifest deleted through two is gone from one, with the tag one had for it
    write(two, "DELETE", f"/v2/app/manifests/{old_digest}", ACCEPTED)
    for method in ("HEAD", "GET"):
        asks_first(one, method, f"/v2/app/manifests/{old_digest}", MANIFEST_UNKNOWN)
    asks_first(one, "GET", "/v2/app/manifests/v1", MANIFEST_UNKNOWN)
    assert metric(one, "hits", kind="manifest") == 0 and metric(one, "hits", kind="blob") == 0


def test_a_write_is_still_seen_after_a_restart(tmp_path: Path) -> None:
    first = cached(tmp_path, tag_ttl=600)
    body, digest = manifest(1)
    other, other_digest = manifest(2)
    data, blob_digest = blob()
    tagged(first, body, digest)
    c = call(first, "GET", "/v2/app/manifests/other")
    answer(first, manifest_ok(other, other_digest))
    assert c.reply().body == other
    fill(first, data, blob_digest)
    write(first, "DELETE", f"/v2/app/blobs/{blob_digest}", ACCEPTED)
    write(first, "DELETE", f"/v2/app/manifests/{digest}", ACCEPTED)
    write(first, "PUT", "/v2/app/manifests/other", CREATED % digest.encode(), body=body)
    for h in (cached(tmp_path, tag_ttl=600), worker(tmp_path, tag_ttl=600)):  # a restart; and a child of it
        for target in (TAG, "/v2/app/manifests/other"):
            c = call(h, "GET", target)
            assert waiting(h).line == f"GET {target} HTTP/1.1".encode()
            answer(h, ok(MANIFEST_UNKNOWN, b"404 Not Found", JSON))
            assert c.reply().status == 404
        asks_first(h, "GET", f"/v2/app/blobs/{blob_digest}", BLOB_UNKNOWN)
        asks_first(h, "GET", f"/v2/app/manifests/{digest}", MANIFEST_UNKNOWN)


def test_a_write_whose_client_left_before_the_answer_may_have_happened_too(tmp_path: Path) -> None:
    h = cached(tmp_path)
    data, digest = blob()
    fill(h, data, digest)
    proto, _ = h.client()
    proto.dataReceived(request("DELETE", f"/v2/app/blobs/{digest}"))
    assert waiting(h).line == blob_line("DELETE", "app", digest)  # sent: the registry may well apply it
    proto.connectionLost(Failure(ConnectionDone()))
    h.reactor.advance(0)
    asks_first(h, "GET", f"/v2/app/blobs/{digest}", BLOB_UNKNOWN)
