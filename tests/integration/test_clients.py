"""The clients people run — docker, ctr (containerd), buildah, skopeo, podman — through the proxy.

For each client and each auth mode:

* none  (``--anonymous``: ``--auth none`` with the open policy);
* basic (``--auth basic --htpasswd FILE --policy public-read``);
* token (``--auth token --htpasswd FILE --policy public-read``);

the client pulls an image pushed straight to the registry (anonymously, with no stored
credentials) and must store the manifest digest that was pushed; it logs in (basic/token) with
its own default mechanism and pushes an image to a new repository, which is then checked on the
registry itself: the manifest the client reported, every blob present with the right sha256, and
the layers holding the expected content. A wrong password is refused (login, or ctr's --user).
buildah also pushes a two-platform index with ``manifest push --all``.

public-read (ecr_twisted/policy.py): everyone may pull everything, authenticated users may push.

Proxies: per mode, one for the anonymous pulls and one for logins and pushes (module-scoped);
each wrong-password test gets a fresh proxy, since refused logins count against 127.0.0.1 in the
proxy's failed-login throttle and would otherwise lock out the logins of later tests.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from clients import (
    Buildah,
    Containerd,
    Ctr,
    Docker,
    Dockerd,
    PodmanClient,
    Result,
    Skopeo,
    use_daemon,
)
from proxy_harness import (
    DOCKER_LIST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    Proxy,
    ProxyFactory,
    Response,
    assert_layout_matches,
    http_request,
    push_direct,
)

from ecr_twisted.testing.emulator import EmulatedECR, _make_tls_files
from ecr_twisted.testing.doubles import write_htpasswd
from ecr_twisted.testing.images import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    ImageInfo,
    make_oci_layout,
    make_tar_layer,
    sha256_digest,
    skopeo_copy,
)

USER, PASSWORD = "carla", "carla-pw-R7t"
WRONG_PASSWORD = "not-carlas-password"
CLIENTS = ["docker", "ctr", "buildah", "skopeo", "podman"]
MODES = ["none", "basic", "token"]
AUTH_MODES = ["basic", "token"]
REFUSED_WORDS = ("unauthorized", "401", "authentication required", "invalid username")


# ---------------------------------------------------------------- images
def image(tmp: pathlib.Path, seed: str, tag: str = "1.0") -> ImageInfo:
    """Two small gzip layers (real tars, as docker and containerd unpack them), unique per seed."""
    layers = [
        make_tar_layer({f"{seed}.txt": f"{seed}\n".encode()}),
        make_tar_layer({"data.bin": os.urandom(150_000), "seed": seed.encode()}),
    ]
    return make_oci_layout(tmp / f"layout-{seed}", layers, tag, gzip_layers=True, labels={"seed": seed})


def diff_ids(info: ImageInfo) -> list[str]:
    return list(json.loads(info.config)["rootfs"]["diff_ids"])


def platform_layout(layout: pathlib.Path, arch: str, seed: str) -> ImageInfo:
    """An OCI layout tagged ``arch`` whose config names ``arch`` (testing_images writes amd64 only)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    raw = make_tar_layer({f"{arch}.txt": f"{seed} {arch}\n".encode(), "data.bin": os.urandom(50_000)})
    blob = gzip.compress(raw, mtime=0)
    layer = put(blob)
    config = json.dumps({
        "architecture": arch, "os": "linux", "created": "1970-01-01T00:00:00Z", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(raw)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "test_clients"}],
    }, sort_keys=True, separators=(",", ":")).encode()
    config_digest = put(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer, "size": len(blob)}],
    }, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = put(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}', encoding="utf-8")
    index_path = layout / "index.json"
    index: dict[str, Any] = json.loads(index_path.read_text("utf-8")) if index_path.exists() else {"schemaVersion": 2,
                                                                                  "manifests": []}
    index["manifests"].append({"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest),
                               "annotations": {"org.opencontainers.image.ref.name": arch}})
    index_path.write_text(json.dumps(index), encoding="utf-8")
    return ImageInfo(tag=arch, manifest_digest=manifest_digest, layer_digests=[layer], config_digest=config_digest,
                     manifest=manifest, config=config, layer_sizes=[len(blob)], layout_dir=layout)


# ---------------------------------------------------------------- the registry, read directly
def upstream_get(ecr: EmulatedECR, path: str, accept: str | None = None) -> Response:
    """GET on the emulated registry with its password; a blob's 307 to S3 is followed (no Authorization)."""
    r = http_request(f"{ecr.upstream_url}{path}", password=ecr.password,
                     headers={"Accept": accept} if accept else None)
    for _ in range(3):
        if r.status not in (301, 302, 303, 307, 308):
            break
        location = r.header("Location")
        assert location, r
        r = http_request(location)
    return r


def upstream_manifest(ecr: EmulatedECR, repo: str, reference: str) -> tuple[bytes, str, dict[str, Any]]:
    r = upstream_get(ecr, f"/v2/{repo}/manifests/{reference}", MANIFEST_ACCEPT)
    assert r.status == 200, (repo, reference, r.status, r.body[:500])
    digest = sha256_digest(r.body)
    assert r.header("Docker-Content-Digest") == digest
    return r.body, r.header("Content-Type") or "", json.loads(r.body)


def upstream_blob(ecr: EmulatedECR, repo: str, descriptor: dict[str, Any]) -> bytes:
    digest = descriptor["digest"]
    r = upstream_get(ecr, f"/v2/{repo}/blobs/{digest}")
    assert r.status == 200, (repo, digest, r.status, r.body[:300])
    assert sha256_digest(r.body) == digest, f"{repo}: blob {digest} has other bytes upstream"
    assert len(r.body) == descriptor["size"], (digest, len(r.body), descriptor["size"])
    return r.body


def upstream_tags(ecr: EmulatedECR, repo: str) -> list[str]:
    r = upstream_get(ecr, f"/v2/{repo}/tags/list")
    if r.status == 404:
        return []
    assert r.status == 200, r.body
    return r.json().get("tags") or []


def uncompressed_digest(blob: bytes) -> str:
    return sha256_digest(gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob)


def verify_pushed_image(
    ecr: EmulatedECR, repo: str, tag: str, info: ImageInfo, reported: str | None, *, exact: bool
) -> None:
    """What the push left on the registry: the manifest the client reported, every blob with the right
    sha256, the original config, and layers that are the original ones (``exact``) or, for clients that
    compress layers themselves, blobs whose content is the original layers (the config's diff_ids)."""
    body, content_type, manifest = upstream_manifest(ecr, repo, tag)
    digest = sha256_digest(body)
    if reported is not None:
        assert reported == digest, f"client reported {reported}, the registry holds {digest}"
    assert manifest.get("mediaType", content_type) == content_type
    assert manifest["config"]["digest"] == info.config_digest
    assert upstream_blob(ecr, repo, manifest["config"]) == info.config
    layers = [d["digest"] for d in manifest["layers"]]
    if exact:
        assert digest == info.manifest_digest and body == info.manifest
        assert layers == info.layer_digests
    contents = [uncompressed_digest(upstream_blob(ecr, repo, d)) for d in manifest["layers"]]
    assert contents == diff_ids(info), (layers, info.layer_digests)


def refused(result: Result) -> None:
    """A non-zero exit that says the credentials were wrong (not, e.g., 429 from the login throttle)."""
    assert result.returncode != 0, f"expected a refusal: {result.command_line}\n{result.output}"
    text = (result.stdout + result.stderr).lower()
    assert any(w in text for w in REFUSED_WORDS), result.output


# ---------------------------------------------------------------- clients behind one interface
class Client:
    """One client with private state; ``ref`` names are HOST/REPO:TAG."""

    name = ""
    exact_push = True  # the push keeps the layout's manifest and blobs byte for byte

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.creds: str | None = None

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        raise NotImplementedError

    def stored_auths(self) -> dict[str, object]:
        raise NotImplementedError

    def pull_and_check(self, host: str, repo: str, info: ImageInfo) -> None:
        raise NotImplementedError

    def push(self, info: ImageInfo, dest: str, *, check: bool = True) -> tuple[Result, str | None]:
        """Get ``info`` into the client without the proxy, then push it to ``dest``."""
        raise NotImplementedError

    def cleanup(self) -> None:
        pass


def _archive(info: ImageInfo, kind: str, path: pathlib.Path, name: str) -> pathlib.Path:
    skopeo_copy(f"oci:{info.layout_dir}:{info.tag}", f"{kind}:{path}:{name}", preserve_digests=False)
    return path


class DockerClient(Client):
    name = "docker"
    exact_push = False  # docker compresses the layers it pushes itself

    def __init__(self, tmp: pathlib.Path, daemon: Dockerd) -> None:
        super().__init__(tmp)
        self.docker = Docker(daemon, tmp)
        self.refs: list[str] = []

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        return self.docker.login(host, user, password, check=check)

    def stored_auths(self) -> dict[str, object]:
        return self.docker.stored_auths()

    def pull_and_check(self, host: str, repo: str, info: ImageInfo) -> None:
        ref = f"{host}/{repo}:{info.tag}"
        self.refs.append(ref)
        out = self.docker.pull(ref).stdout
        assert f"Digest: {info.manifest_digest}" in out, out
        assert f"{host}/{repo}@{info.manifest_digest}" in self.docker.repo_digests(ref)
        assert self.docker.image_id(ref) == info.config_digest

    def push(self, info: ImageInfo, dest: str, *, check: bool = True) -> tuple[Result, str | None]:
        local = f"ecr-twisted.test/{uuid.uuid4().hex}:{info.tag}"
        self.docker.load(_archive(info, "docker-archive", self.tmp / "docker.tar", local))
        self.docker.tag(local, dest)
        self.refs += [local, dest]
        result = self.docker.push(dest, check=check)
        return result, (Docker.pushed_digest(result) if result.returncode == 0 else None)

    def cleanup(self) -> None:
        self.docker.remove_images(*self.refs)


class CtrClient(Client):
    """ctr has no login: credentials go with each command (``--user U:P``)."""

    name = "ctr"

    def __init__(self, tmp: pathlib.Path, daemon: Containerd) -> None:
        super().__init__(tmp)
        self.ctr = Ctr(daemon, f"test-{uuid.uuid4().hex[:12]}")

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        self.creds = f"{user}:{password}"
        return Result(["ctr", "(no login)"], 0, "", "")

    def stored_auths(self) -> dict[str, object]:
        return {}

    def pull_and_check(self, host: str, repo: str, info: ImageInfo) -> None:
        ref = f"{host}/{repo}:{info.tag}"
        self.ctr.pull(ref, user=self.creds)
        assert self.ctr.image_digest(ref) == info.manifest_digest
        assert set(info.blob_digests) | {info.manifest_digest} <= self.ctr.content_digests()

    def push(self, info: ImageInfo, dest: str, *, check: bool = True) -> tuple[Result, str | None]:
        self.ctr.import_archive(_archive(info, "oci-archive", self.tmp / "ctr.tar", dest))
        assert self.ctr.image_digest(dest) == info.manifest_digest
        return self.ctr.push(dest, user=self.creds, check=check), None

    def cleanup(self) -> None:
        self.ctr.cleanup()


class BuildahClient(Client):
    name = "buildah"
    exact_push = False  # the image goes through containers-storage, which keeps layers uncompressed

    def __init__(self, tmp: pathlib.Path) -> None:
        super().__init__(tmp)
        self.buildah = Buildah(tmp / "buildah")

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        return self.buildah.login(host, user, password, check=check)

    def stored_auths(self) -> dict[str, object]:
        return self.buildah.stored_auths()

    def pull_and_check(self, host: str, repo: str, info: ImageInfo) -> None:
        ref = f"{host}/{repo}:{info.tag}"
        self.buildah.pull(ref)
        assert self.buildah.image_digest(ref) == info.manifest_digest
        assert "sha256:" + self.buildah.image_id(ref) == info.config_digest

    def push(self, info: ImageInfo, dest: str, *, check: bool = True) -> tuple[Result, str | None]:
        out = self.buildah.pull(f"oci:{info.layout_dir}:{info.tag}")
        self.buildah.tag(out.stdout.strip().splitlines()[-1], dest)
        return self.buildah.push(dest, check=check)

    def cleanup(self) -> None:
        self.buildah.cleanup()


class SkopeoClient(Client):
    name = "skopeo"

    def __init__(self, tmp: pathlib.Path) -> None:
        super().__init__(tmp)
        self.skopeo = Skopeo(tmp / "skopeo")

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        return self.skopeo.login(host, user, password, check=check)

    def stored_auths(self) -> dict[str, object]:
        return self.skopeo.stored_auths()

    def pull_and_check(self, host: str, repo: str, info: ImageInfo) -> None:
        dest = self.tmp / "pulled"
        _, digest = self.skopeo.copy(f"docker://{host}/{repo}:{info.tag}", f"oci:{dest}:{info.tag}")
        assert digest == info.manifest_digest
        assert_layout_matches(dest, info.tag, info)

    def push(self, info: ImageInfo, dest: str, *, check: bool = True) -> tuple[Result, str | None]:
        return self.skopeo.copy(f"oci:{info.layout_dir}:{info.tag}", f"docker://{dest}", check=check)


class PodmanCli(Client):
    name = "podman"
    exact_push = False  # as buildah

    def __init__(self, tmp: pathlib.Path) -> None:
        super().__init__(tmp)
        self.podman = PodmanClient(tmp / "podman")

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        return self.podman.login(host, user, password, check=check)

    def stored_auths(self) -> dict[str, object]:
        return self.podman.stored_auths()

    def pull_and_check(self, host: str, repo: str, info: ImageInfo) -> None:
        ref = f"{host}/{repo}:{info.tag}"
        out = self.podman.pull(ref, "--tls-verify=false")
        assert "sha256:" + out.stdout.strip().splitlines()[-1] == info.config_digest
        assert self.podman.image_digest(ref) == info.manifest_digest

    def push(self, info: ImageInfo, dest: str, *, check: bool = True) -> tuple[Result, str | None]:
        out = self.podman.pull(f"oci:{info.layout_dir}:{info.tag}")
        self.podman.run("tag", out.stdout.strip().splitlines()[-1], dest)
        return self.podman.push_image(dest, check=check)

    def cleanup(self) -> None:
        self.podman.cleanup()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def htpasswd(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("clients-auth") / "htpasswd"
    write_htpasswd(str(path), {USER: PASSWORD})
    return path


def start_proxy(factory: ProxyFactory, ecr: EmulatedECR, mode: str, htpasswd: pathlib.Path) -> Proxy:
    if mode == "none":
        return factory(ecr)  # --anonymous: --auth none, open policy
    return factory(ecr, "--auth", mode, "--htpasswd", str(htpasswd), "--policy", "public-read", anonymous=False)


@pytest.fixture(scope="module")
def module_proxies(
    ecr: EmulatedECR, module_proxy_factory: ProxyFactory, htpasswd: pathlib.Path
) -> Callable[[str, str], Proxy]:
    """(role, mode) -> a proxy started on first use and kept for the module."""
    started: dict[tuple[str, str], Proxy] = {}

    def get(role: str, mode: str) -> Proxy:
        if (role, mode) not in started:
            started[role, mode] = start_proxy(module_proxy_factory, ecr, mode, htpasswd)
        return started[role, mode]

    return get


@pytest.fixture
def make_client(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[Callable[[str], Client]]:
    """A fresh client wrapper; the daemons are started only for the clients that need them."""
    made: list[Client] = []

    def make(name: str) -> Client:
        tmp = tmp_path / name
        tmp.mkdir(parents=True, exist_ok=True)
        client: Client
        if name == "docker":
            client = DockerClient(tmp, use_daemon(request, "dockerd"))
        elif name == "ctr":
            client = CtrClient(tmp, use_daemon(request, "containerd"))
        elif name == "buildah":
            client = BuildahClient(tmp)
        elif name == "skopeo":
            client = SkopeoClient(tmp)
        elif name == "podman":
            client = PodmanCli(tmp)
        else:
            raise ValueError(name)
        made.append(client)
        return client

    yield make
    for client in made:
        client.cleanup()


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CLIENTS)
def test_pull(
    ecr: EmulatedECR, module_proxies: Callable[[str, str], Proxy], make_client: Callable[[str], Client],
    tmp_path: pathlib.Path, name: str, mode: str,
) -> None:
    """Anonymous pull (no stored credentials) of an image pushed to the registry directly."""
    proxy = module_proxies("pull", mode)
    info = image(tmp_path, f"pull-{name}-{mode}")
    repo = f"clients/pull-{name}-{mode}"
    push_direct(ecr, info, repo)
    client = make_client(name)
    assert client.stored_auths() == {}
    client.pull_and_check(proxy.host, repo, info)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CLIENTS)
def test_login_and_push(
    ecr: EmulatedECR, module_proxies: Callable[[str, str], Proxy], make_client: Callable[[str], Client],
    tmp_path: pathlib.Path, name: str, mode: str,
) -> None:
    """Log in (basic/token), push to a new repository, check the result on the registry itself."""
    proxy = module_proxies("push", mode)
    client = make_client(name)
    if mode != "none":
        client.login(proxy.host, USER, PASSWORD)
    info = image(tmp_path, f"push-{name}-{mode}")
    repo = f"clients/pushed-{name}-{mode}"
    assert upstream_tags(ecr, repo) == []
    _, reported = client.push(info, f"{proxy.host}/{repo}:pushed")
    assert upstream_tags(ecr, repo) == ["pushed"]
    verify_pushed_image(ecr, repo, "pushed", info, reported, exact=client.exact_push)


@pytest.mark.parametrize("mode", AUTH_MODES)
@pytest.mark.parametrize("name", CLIENTS)
def test_wrong_password_is_refused(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, htpasswd: pathlib.Path, make_client: Callable[[str], Client],
    tmp_path: pathlib.Path, name: str, mode: str,
) -> None:
    proxy = start_proxy(proxy_factory, ecr, mode, htpasswd)
    client = make_client(name)
    if name == "ctr":
        info = image(tmp_path, f"wrong-{mode}")
        repo = f"clients/wrong-ctr-{mode}"
        client.login(proxy.host, USER, WRONG_PASSWORD)
        result, _ = client.push(info, f"{proxy.host}/{repo}:1.0", check=False)
        refused(result)
        assert upstream_tags(ecr, repo) == []
    else:
        refused(client.login(proxy.host, USER, WRONG_PASSWORD, check=False))
        assert proxy.host not in client.stored_auths()


@pytest.mark.parametrize("mode", MODES)
def test_buildah_pushes_a_two_platform_index(
    ecr: EmulatedECR, module_proxies: Callable[[str, str], Proxy], make_client: Callable[[str], Client],
    tmp_path: pathlib.Path, mode: str,
) -> None:
    proxy = module_proxies("push", mode)
    client = make_client("buildah")
    assert isinstance(client, BuildahClient)
    buildah = client.buildah
    if mode != "none":
        buildah.login(proxy.host, USER, PASSWORD)
    layout = tmp_path / "multi"
    images = {arch: platform_layout(layout, arch, f"multi-{mode}") for arch in ("amd64", "arm64")}
    local = f"localhost/multi-{mode}:1.0"
    buildah.run("manifest", "create", local)
    for arch in images:
        buildah.run("manifest", "add", local, f"oci:{layout}:{arch}")
    repo = f"clients/multi-{mode}"
    digest_file = tmp_path / "digest"
    buildah.run("manifest", "push", "--all", "--authfile", str(buildah.auth_file), "--tls-verify=false",
                "--digestfile", str(digest_file), local, f"docker://{proxy.host}/{repo}:1.0")

    body, content_type, index = upstream_manifest(ecr, repo, "1.0")
    assert sha256_digest(body) == digest_file.read_text("utf-8").strip()
    assert content_type in (OCI_INDEX, DOCKER_LIST), content_type
    children = {m["platform"]["architecture"]: m for m in index["manifests"]}
    assert sorted(children) == ["amd64", "arm64"] and len(index["manifests"]) == 2, index
    for arch, info in images.items():
        entry = children[arch]
        assert entry["platform"]["os"] == "linux"
        assert entry["digest"] == info.manifest_digest, (arch, entry)
        child_body, _, child = upstream_manifest(ecr, repo, entry["digest"])
        assert child_body == info.manifest and len(child_body) == entry["size"]
        assert upstream_blob(ecr, repo, child["config"]) == info.config
        assert [d["digest"] for d in child["layers"]] == info.layer_digests
        for descriptor in child["layers"]:
            assert upstream_blob(ecr, repo, descriptor) == info.blob_path(descriptor["digest"]).read_bytes()


@pytest.mark.parametrize("mode", ["none", "basic"])
def test_docker_over_tls_with_the_test_ca_in_certs_d(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, htpasswd: pathlib.Path, make_client: Callable[[str], Client],
    tmp_path: pathlib.Path, mode: str,
) -> None:
    """docker against a TLS-only proxy port (--tls-cert/--tls-key), the test CA in dockerd's certs.d.

    dockerd reads certs.d only from /etc/docker/certs.d, so the test writes the CA there for the
    proxy's port and takes it away after. (docker treats 127.0.0.0/8 as an insecure range and does
    not verify there; what this proves is that docker's TLS handshake, login and transfers work
    against the front door: the port speaks nothing but TLS, so there is no plain-HTTP fallback.)"""
    ca, cert, key = _make_tls_files(tmp_path / "tls")
    extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
    if mode == "none":
        proxy = proxy_factory(ecr, *extra, scheme="https")
    else:
        proxy = proxy_factory(ecr, "--auth", mode, "--htpasswd", str(htpasswd), "--policy", "public-read", *extra,
                              anonymous=False, scheme="https")
    certs_d = pathlib.Path("/etc/docker/certs.d") / proxy.host
    certs_d.mkdir(parents=True, exist_ok=False)
    try:
        shutil.copy(ca, certs_d / "ca.crt")
        client = make_client("docker")
        pulled = image(tmp_path, f"tls-pull-{mode}")
        repo = f"clients/tls-{mode}"
        push_direct(ecr, pulled, repo)
        client.pull_and_check(proxy.host, repo, pulled)
        if mode != "none":
            client.login(proxy.host, USER, PASSWORD)
        pushed = image(tmp_path, f"tls-push-{mode}")
        _, reported = client.push(pushed, f"{proxy.host}/{repo}-pushed:1.0")
        verify_pushed_image(ecr, f"{repo}-pushed", "1.0", pushed, reported, exact=client.exact_push)
        assert "GET /v2/ " in proxy.log_text()  # it came through this (TLS-only) port
    finally:
        shutil.rmtree(certs_d, ignore_errors=True)
