"""The registry protocol through the proxy, spoken by hand with http.client (and raw sockets).

A RecordingRelay between one proxy and the registry shows the registry's answers exactly
as the proxy got them, so rewrites can be checked byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator

import pytest
from proxy_harness import (
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    Proxy,
    ProxyFactory,
    RecordingRelay,
    Response,
    connection,
    ensure_repositories,
    http_request,
    raw_exchange,
    target_of,
)

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.images import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, sha256_digest

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"


@pytest.fixture(scope="module")
def relay(ecr: EmulatedECR) -> Iterator[RecordingRelay]:
    r = RecordingRelay(int(ecr.upstream_url.rsplit(":", 1)[1]))
    yield r
    r.close()


@pytest.fixture(scope="module")
def relay_proxy(ecr: EmulatedECR, relay: RecordingRelay, module_proxy_factory: ProxyFactory) -> Proxy:
    return module_proxy_factory(ecr, upstream=relay.url)


@pytest.fixture(scope="module")
def public_proxy(ecr: EmulatedECR, module_proxy_factory: ProxyFactory) -> Proxy:
    return module_proxy_factory(ecr, "--public-url", "https://registry.example.com")


def _no_upstream_challenge(r: Response) -> None:
    assert r.header("WWW-Authenticate") is None, r.header("WWW-Authenticate")
    assert b"dkr.ecr" not in r.body


def _start_upload(proxy: Proxy, name: str) -> Response:
    r = proxy.request(f"/v2/{name}/blobs/uploads/", "POST", headers={"Content-Length": "0"})
    assert r.status == 202, (r.status, r.body)
    _no_upstream_challenge(r)
    return r


def _upload_monolithic(proxy: Proxy, name: str, data: bytes) -> str:
    loc = _start_upload(proxy, name).header("Location")
    assert loc is not None and loc.startswith(proxy.url + "/"), loc
    digest = sha256_digest(data)
    sep = "&" if "?" in loc else "?"
    put = http_request(f"{loc}{sep}digest={urllib.parse.quote(digest)}", "PUT", body=data,
                       headers={"Content-Type": "application/octet-stream"})
    assert put.status == 201, (put.status, put.body)
    assert put.header("Docker-Content-Digest") == digest
    return digest


def test_base_endpoint_hides_upstream_challenge(proxy: Proxy, ecr: EmulatedECR) -> None:
    # the registry itself challenges like ECR ...
    direct = http_request(f"{ecr.upstream_url}/v2/")
    assert direct.status == 401 and "dkr.ecr" in (direct.header("WWW-Authenticate") or "")
    # ... the proxy answers anonymously, and no challenge of the upstream ever shows
    r = proxy.request("/v2/")
    assert r.status == 200, r.body
    assert r.header("Docker-Distribution-API-Version") == "registry/2.0"
    _no_upstream_challenge(r)
    head = proxy.request("/v2/", "HEAD")
    assert head.status == 200 and head.body == b""
    _no_upstream_challenge(head)
    for path in ("/v2/no/such/manifests/latest", "/v2/no/such/blobs/sha256:" + "0" * 64, "/v2/no/such/tags/list"):
        r = proxy.request(path)
        assert r.status == 404, (path, r.status)
        _no_upstream_challenge(r)
        assert r.json()["errors"][0]["code"] in ("MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN")


def test_upload_location_rewritten_byte_for_byte(
    relay_proxy: Proxy, relay: RecordingRelay, ecr: EmulatedECR
) -> None:
    proxy = relay_proxy
    name = "proto/upload"
    r = _start_upload(proxy, name)
    location = r.header("Location")
    uuid = r.header("Docker-Upload-UUID")
    assert location is not None and uuid
    assert r.header("Range") == "0-0"
    # what the registry sent, recorded between proxy and registry
    sent = [v.decode("latin-1") for v in relay.header_values("Location") if uuid.encode() in v]
    assert len(sent) == 1, sent
    registry_location = sent[0]
    assert registry_location.startswith(relay.url + "/")
    assert location == proxy.url + registry_location[len(relay.url):]
    loc = urllib.parse.urlsplit(location)
    assert loc.path == f"/v2/{name}/blobs/uploads/{uuid}"
    assert list(urllib.parse.parse_qs(loc.query)) == ["_state"]

    # the same request straight to the registry has the same shape, on the registry's own host
    direct = http_request(f"{ecr.upstream_url}/v2/{name}/blobs/uploads/", "POST", password=ecr.password,
                          headers={"Content-Length": "0"})
    assert direct.status == 202
    dloc = urllib.parse.urlsplit(direct.header("Location") or "")
    assert f"{dloc.scheme}://{dloc.netloc}" == ecr.upstream_url
    assert dloc.path.rsplit("/", 1)[0] == loc.path.rsplit("/", 1)[0]
    assert list(urllib.parse.parse_qs(dloc.query)) == ["_state"]

    # the registry accepts the (HMAC-protected) _state the client got: nothing was altered
    status = http_request(f"{ecr.upstream_url}{target_of(location)}", password=ecr.password)
    assert status.status == 204, (status.status, status.body)
    assert status.header("Docker-Upload-UUID") == uuid

    # monolithic PUT with ?digest= through the proxy, at the rewritten Location
    data = os.urandom(200_000)
    digest = sha256_digest(data)
    put = http_request(f"{location}&digest={urllib.parse.quote(digest)}", "PUT", body=data,
                       headers={"Content-Type": "application/octet-stream"})
    assert put.status == 201, (put.status, put.body)
    assert put.header("Docker-Content-Digest") == digest
    blob_location = put.header("Location")
    assert blob_location == f"{proxy.url}/v2/{name}/blobs/{digest}"
    got = http_request(blob_location)
    assert got.status == 200 and got.body == data
    assert got.header("Docker-Content-Digest") == digest


def test_chunked_patch_then_put(proxy: Proxy) -> None:
    name = "proto/chunked"
    location = _start_upload(proxy, name).header("Location")
    assert location is not None and location.startswith(proxy.url + "/")
    parts = [os.urandom(300_000), os.urandom(700_001), os.urandom(5)]
    data = b"".join(parts)
    conn = connection(location)
    try:
        conn.request("PATCH", target_of(location), body=iter(parts), encode_chunked=True,
                     headers={"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status in (201, 202), (resp.status, body)  # ECR says 201, distribution 202
    assert resp.headers["Range"] == f"0-{len(data) - 1}"
    next_location = resp.headers["Location"]
    assert next_location.startswith(proxy.url + "/"), next_location
    digest = sha256_digest(data)
    put = http_request(f"{next_location}&digest={urllib.parse.quote(digest)}", "PUT",
                       headers={"Content-Length": "0"})
    assert put.status == 201, (put.status, put.body)
    assert put.header("Docker-Content-Digest") == digest
    got = proxy.request(f"/v2/{name}/blobs/{digest}")
    assert got.status == 200 and got.body == data


def test_manifests_tags_and_content_types(proxy: Proxy, ecr: EmulatedECR) -> None:
    name = "proto/manifests"
    layer = os.urandom(50_000)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer)]}}).encode()
    config_digest = _upload_monolithic(proxy, name, config)
    layer_digest = _upload_monolithic(proxy, name, layer)

    oci = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": len(layer)}],
    }).encode()
    docker = json.dumps({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": DOCKER_LAYER, "digest": layer_digest, "size": len(layer)}],
    }, indent=3).encode()
    for tag, body, media_type in (("oci", oci, OCI_MANIFEST), ("oci-again", oci, OCI_MANIFEST),
                                  ("docker", docker, DOCKER_MANIFEST)):
        r = proxy.request(f"/v2/{name}/manifests/{tag}", "PUT", body=body, headers={"Content-Type": media_type})
        assert r.status == 201, (tag, r.status, r.body)
        assert r.header("Docker-Content-Digest") == sha256_digest(body)

    tags = proxy.request(f"/v2/{name}/tags/list")
    assert tags.status == 200
    assert sorted(tags.json()["tags"]) == ["docker", "oci", "oci-again"] and tags.json()["name"] == name
    direct_tags = http_request(f"{ecr.upstream_url}/v2/{name}/tags/list", password=ecr.password)
    assert tags.body == direct_tags.body  # passed on unchanged (registry order)

    for ref, body, media_type in (("oci", oci, OCI_MANIFEST), (sha256_digest(oci), oci, OCI_MANIFEST),
                                  ("docker", docker, DOCKER_MANIFEST)):
        r = proxy.request(f"/v2/{name}/manifests/{ref}", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status == 200, (ref, r.status, r.body)
        assert r.body == body
        assert r.header("Content-Type") == media_type
        assert r.header("Docker-Content-Digest") == sha256_digest(body)
        assert int(r.header("Content-Length") or -1) == len(body)
        h = proxy.request(f"/v2/{name}/manifests/{ref}", "HEAD", headers={"Accept": MANIFEST_ACCEPT})
        assert h.status == 200 and h.body == b""
        assert h.header("Content-Type") == media_type
        assert h.header("Docker-Content-Digest") == sha256_digest(body)
        assert int(h.header("Content-Length") or -1) == len(body)

    # the same through a raw socket: HEAD carries no body bytes on the wire, and a GET on the
    # same connection right after it still parses (the proxy kept the framing right)
    head_then_get = (
        f"HEAD /v2/{name}/manifests/docker HTTP/1.1\r\nHost: {proxy.host}\r\nAccept: {MANIFEST_ACCEPT}\r\n\r\n"
        f"GET /v2/ HTTP/1.1\r\nHost: {proxy.host}\r\nConnection: close\r\n\r\n"
    ).encode()
    assert proxy.port is not None
    raw = raw_exchange(proxy.port, head_then_get)
    first, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep and first.startswith(b"HTTP/1.1 200 ")
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:200]
    assert rest.endswith(b"\r\n\r\n{}"), rest[-200:]

    # an Accept list without the stored type: what the registry says, passed on unchanged
    direct = http_request(f"{ecr.upstream_url}/v2/{name}/manifests/oci", password=ecr.password,
                          headers={"Accept": OCI_INDEX})
    via = proxy.request(f"/v2/{name}/manifests/oci", headers={"Accept": OCI_INDEX})
    assert via.status == direct.status
    assert via.header("Content-Type") == direct.header("Content-Type")
    assert via.header("Docker-Content-Digest") == direct.header("Docker-Content-Digest")


@pytest.mark.parametrize(
    "method,path,status,code",
    [
        ("GET", "/nope", 404, "NOT_FOUND"),
        ("GET", "/v2/nope", 404, "NOT_FOUND"),
        ("GET", "/", 404, "NOT_FOUND"),
        ("POST", "/v2/", 405, "UNSUPPORTED"),
        ("GET", "/v2/Upper/Case/manifests/latest", 400, "NAME_INVALID"),
    ],
)
def test_local_errors_are_registry_json(proxy: Proxy, method: str, path: str, status: int, code: str) -> None:
    r = proxy.request(path, method, headers={"Content-Length": "0"} if method == "POST" else None)
    assert r.status == status, (r.status, r.body)
    assert (r.header("Content-Type") or "").startswith("application/json")
    assert r.body.startswith(b'{"errors":[{"code":'), r.body
    errors = r.json()["errors"]
    assert errors[0]["code"] == code and errors[0]["message"]


def test_public_url_option(public_proxy: Proxy) -> None:
    name = "proto/public"
    r = _start_upload(public_proxy, name)
    location = r.header("Location") or ""
    assert location.startswith(f"https://registry.example.com/v2/{name}/blobs/uploads/"), location
    assert "_state=" in location
    # the rewritten URL still works once the client's load balancer maps it back to us
    data = b"public-url blob\n"
    digest = sha256_digest(data)
    put = public_proxy.request(f"{target_of(location)}&digest={urllib.parse.quote(digest)}", "PUT", body=data)
    assert put.status == 201, put.body
    assert put.header("Location") == f"https://registry.example.com/v2/{name}/blobs/{digest}"
    got = public_proxy.request(f"/v2/{name}/blobs/{digest}")
    assert got.status == 200 and got.body == data
    assert hashlib.sha256(got.body).hexdigest() == digest.split(":", 1)[1]


def test_catalog_from_the_ecr_api_with_its_own_link(proxy: Proxy, ecr: EmulatedECR) -> None:
    """ECR answers 405 to _catalog: the proxy lists DescribeRepositories (moto), paginated with a Link of its own."""
    _upload_monolithic(proxy, "proto/only-in-registry", b"a")  # the registry's own catalog lists it, ECR's not
    assert "proto/only-in-registry" in http_request(
        f"{ecr.upstream_url}/v2/_catalog", password=ecr.password).json()["repositories"]
    ensure_repositories(ecr, "proto/catalog-a", "proto/catalog-b")
    names = sorted(r["repositoryName"] for r in ecr.client("ecr").describe_repositories()["repositories"])
    assert len(names) >= 2
    via = proxy.request("/v2/_catalog?n=1")
    assert via.status == 200 and via.json() == {"repositories": names[:1]}, via.body
    m = re.fullmatch(r'<([^>]+)>;\s*rel="next"', via.header("Link") or "")
    assert m, via.header("Link")
    link = urllib.parse.urlsplit(m.group(1))
    assert link.path == "/v2/_catalog" and not link.netloc  # relative: the client's own host
    assert urllib.parse.parse_qs(link.query) == {"last": [names[0]], "n": ["1"]}
    assert proxy.request(m.group(1)).json() == {"repositories": names[1:2]}
    full = proxy.request("/v2/_catalog")
    assert full.status == 200 and full.json()["repositories"] == names and full.header("Link") is None


def test_expect_100_continue_upload(proxy: Proxy) -> None:
    """A client that waits for ``100 Continue`` before sending a PATCH body gets it, then a normal answer."""
    name = "proto/expect"
    location = _start_upload(proxy, name).header("Location") or ""
    data = os.urandom(150_000)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as s:
        s.sendall(
            (f"PATCH {target_of(location)} HTTP/1.1\r\nHost: {proxy.host}\r\nExpect: 100-continue\r\n"
             f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n").encode()
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = s.recv(4096)
            assert chunk, interim
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        s.sendall(data)
        rest = interim.partition(b"\r\n\r\n")[2]
        while b"\r\n\r\n" not in rest:
            chunk = s.recv(4096)
            assert chunk, rest
            rest += chunk
    assert rest.split(b"\r\n", 1)[0].split()[1] in (b"201", b"202"), rest[:300]
    next_location = re.search(rb"\r\nLocation: ([^\r\n]+)", rest, re.IGNORECASE)
    assert next_location is not None
    digest = sha256_digest(data)
    put = http_request(f"{next_location.group(1).decode()}&digest={urllib.parse.quote(digest)}", "PUT",
                       headers={"Content-Length": "0"})
    assert put.status == 201, put.body
    assert proxy.request(f"/v2/{name}/blobs/{digest}").body == data


def test_cross_repository_mount(proxy: Proxy) -> None:
    data = os.urandom(40_000)
    digest = _upload_monolithic(proxy, "proto/mount-from", data)
    r = proxy.request(f"/v2/proto/mount-to/blobs/uploads/?mount={urllib.parse.quote(digest)}&from=proto/mount-from",
                      "POST", headers={"Content-Length": "0"})
    assert r.status == 201, (r.status, r.body)
    assert r.header("Location") == f"{proxy.url}/v2/proto/mount-to/blobs/{digest}"
    assert r.header("Docker-Content-Digest") == digest
    got = proxy.request(f"/v2/proto/mount-to/blobs/{digest}")
    assert got.status == 200 and got.body == data


def test_blob_range_request_stream_mode(proxy: Proxy) -> None:
    data = os.urandom(300_000)
    digest = _upload_monolithic(proxy, "proto/range", data)
    r = proxy.request(f"/v2/proto/range/blobs/{digest}", headers={"Range": "bytes=1000-1999"})
    assert r.status == 206, (r.status, r.body[:200])
    assert r.body == data[1000:2000]
    assert r.header("Content-Range") == f"bytes 1000-1999/{len(data)}"
    tail = proxy.request(f"/v2/proto/range/blobs/{digest}", headers={"Range": "bytes=299990-"})
    assert tail.status == 206 and tail.body == data[299_990:]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 32,  # a TLS ClientHello on the plain port
        b"PATCH /v2/proto/x/blobs/uploads/u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # ambiguous framing (smuggling)
        b"GET /v2/ HTTP/1.1\r\nHost: a\r\nX-A: b\r\n folded\r\n\r\n",  # obs-fold
        b"GET /v2/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"PATCH /v2/proto/x/blobs/uploads/u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ],
    ids=["tls-hello", "cl-and-te", "obs-fold", "two-content-lengths", "gzip-coding"],
)
def test_malformed_requests_are_refused(proxy: Proxy, raw: bytes) -> None:
    before = proxy.metric("ecrproxy_bad_requests_total", status="400") or 0
    assert proxy.port is not None
    answer = raw_exchange(proxy.port, raw + b"GET /v2/ HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"connection: close" in head.lower()
    assert body.startswith(b'{"errors":[{"code":"BAD_REQUEST"'), body
    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
    assert length is not None
    assert len(body) == int(length.group(1)), "the bytes after a refused request must not be served"
    assert proxy.metric("ecrproxy_bad_requests_total", status="400") == before + 1
