"""Several registries behind one proxy (#13), with real processes: two emulated ECR accounts on one moto.

Upstreams of the proxy under test (one ``--config`` file):

* ``prod``: account A (``ecr_prod``, us-east-1), default credentials, prefix ``prod``;
* ``shared``: account B (``ecr_shared``, eu-west-1), ``credentials = "role"``: the proxy assumes a role of
  account B through moto's STS; B's registry accepts only the token moto gives to B's credentials, so every
  pull or push through ``shared/`` proves the role's credentials were used;
* ``mirror``: account A again, reached by host name only (``mirror.localhost``, namespace ``mirror``).

No default upstream: a name matching no prefix on another host is 404 NAME_UNKNOWN.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import subprocess
import time
import tomllib
import urllib.parse
from collections.abc import Mapping
from typing import Any

import pytest
from clients import Skopeo
from proxy_harness import (
    MANIFEST_ACCEPT,
    REPO_ROOT,
    TEST_STORAGE_HOSTS,
    TEST_WORKERS,
    TWISTD,
    Proxy,
    ProxyFactory,
    assert_layout_matches,
    assert_no_secret,
    ecr_upstream,
    ensure_repositories,
    free_port,
    http_request,
    label_values,
    metric_sum,
    pull_via,
    push_direct,
    push_via,
    wait_for,
    write_config,
)

from ecr_twisted.testing.doubles import write_htpasswd
from ecr_twisted.testing.emulator import EmulatedECR, random_password
from ecr_twisted.testing.images import ImageInfo, make_oci_layout, make_tar_layer, skopeo_copy

UPSTREAMS = ("prod", "shared", "mirror")
MIRROR_HOST = "mirror.localhost"
TWELVE_HOURS = 12 * 3600
#: repositories created in moto (what DescribeRepositories lists), per account
PROD_REPOS = ("app", "team/api", "zeta")
SHARED_REPOS = ("lib/base", "lib/tools")
#: the whole merged catalog, as the proxy must show it (sorted, prefixed, host-only upstream by its name)
CATALOG = sorted(
    [f"prod/{r}" for r in PROD_REPOS] + [f"mirror/{r}" for r in PROD_REPOS] + [f"shared/{r}" for r in SHARED_REPOS]
)

USERS = {"alice": "alice-pw-Q7", "bob": "bob-pw-R4"}
#: alice: the prod upstream only (pull and push); bob: pull on shared and mirror
POLICY = """
[[rule]]
principals = ["user:alice"]
actions = ["pull", "push"]
repositories = ["prod/*"]

[[rule]]
principals = ["user:bob"]
actions = ["pull"]
repositories = ["shared/*", "mirror/*"]
"""


# ---------------------------------------------------------------- helpers
def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()}


def direct(ecr: EmulatedECR, path: str, method: str = "GET", **kw: Any) -> Any:
    """A request straight to an emulated registry, with its current password (private names)."""
    return http_request(ecr.upstream_url + path, method, password=ecr.password, **kw)


def registry_has_blob(ecr: EmulatedECR, repo: str, digest: str) -> bool:
    return direct(ecr, f"/v2/{repo}/blobs/{digest}", "HEAD").status in (200, 307)


def registry_tags(ecr: EmulatedECR, repo: str) -> list[str]:
    r = direct(ecr, f"/v2/{repo}/tags/list")
    if r.status == 404:
        return []
    assert r.status == 200, (r.status, r.body)
    return list(r.json().get("tags") or [])


@dataclasses.dataclass
class Curl:
    status: int
    headers: dict[str, str]  # lower-case names, last value wins
    body: bytes


def curl(proxy: Proxy, path: str, *, host: str | None = None, method: str = "GET",
         headers: Mapping[str, str] | None = None, timeout: float = 60) -> Curl:
    """Real curl to the proxy; ``host``: reach it under that name (``--connect-to``: the Host header names it)."""
    name = host or "127.0.0.1"
    url = f"http://{name}:{proxy.port}{path}"
    argv = ["curl", "-sS", "-X", method, "-D", "-", "--max-time", str(timeout)]
    if host:
        argv += ["--connect-to", f"{host}:{proxy.port}:127.0.0.1:{proxy.port}"]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    proc = subprocess.run(argv, capture_output=True, timeout=timeout + 10, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (argv, proc.stderr)
    head, _, body = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    return Curl(status, hdrs, body)


def error_code(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["code"])


def upload_location(proxy: Proxy, location: str) -> str:
    """An upload's Location (absolute or a path) as a URL on the proxy; it must stay on the proxy's side."""
    url = urllib.parse.urljoin(proxy.url + "/", location)
    assert url.startswith(proxy.url + "/v2/"), location
    return url


def put_blob(location_url: str, data: bytes, digest: str, headers: Mapping[str, str] | None = None) -> Any:
    sep = "&" if "?" in location_url else "?"
    return http_request(f"{location_url}{sep}digest={urllib.parse.quote(digest)}", "PUT", body=data,
                        headers={"Content-Type": "application/octet-stream", **(headers or {})})


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def wait_upstream_tokens(p: Proxy, upstream: str, at_least: float, timeout: float = 30) -> None:
    wait_for(lambda: metric_sum(p.metrics(), "ecrproxy_token_refresh_total", result="success",
                                upstream=upstream) >= at_least, timeout, f"{upstream}'s token")


def twistd_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECRPROXY_", "AWS_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def moto_repos(ecr_prod: EmulatedECR, ecr_shared: EmulatedECR) -> None:
    """Repositories in each account's ECR API (not in the registries): what _catalog must come from."""
    ensure_repositories(ecr_prod, *PROD_REPOS)
    ensure_repositories(ecr_shared, *SHARED_REPOS)


def multi_upstreams(ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, **shared_keys: Any) -> list[dict[str, Any]]:
    return [
        ecr_upstream(ecr_prod, "prod", prefix="prod"),
        ecr_upstream(ecr_shared, "shared", prefix="shared", credentials="role", role_arn=ecr_shared.role_arn(),
                     session_name="ecr-twisted-itest", sts_endpoint_url=ecr_shared.sts_endpoint_url,
                     **shared_keys),
        ecr_upstream(ecr_prod, "mirror", hosts=[MIRROR_HOST]),
    ]


@pytest.fixture(scope="module")
def config_file(ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, moto_repos: None,
                tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    # options from the file too (same names as on the command line): the blob storage hosts, the catalog TTL
    settings = {"storage-hosts": TEST_STORAGE_HOSTS, "catalog-ttl": 2}
    return write_config(tmp_path_factory.mktemp("multi-config") / "ecrproxy.toml", settings,
                        multi_upstreams(ecr_prod, ecr_shared))


@pytest.fixture(scope="module")
def mproxy(ecr_prod: EmulatedECR, config_file: pathlib.Path, module_proxy_factory: ProxyFactory) -> Proxy:
    """Anonymous proxy on the three upstreams; the AWS environment is account A's keys and nothing else."""
    # prod and mirror may share one keeper (same account, region and credentials): at least two per process
    return module_proxy_factory.from_config(ecr_prod, config_file, token_keepers=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ImageInfo]:
    base = tmp_path_factory.mktemp("multi-images")
    out = {}
    for name, tag in (("prod", "1.0"), ("shared", "2.0")):
        layers = [make_tar_layer({f"{name}.txt": f"{name}\n".encode(), "data": os.urandom(150_000)}),
                  os.urandom(300_000)]
        out[name] = make_oci_layout(base / name, layers, tag, labels={"upstream": name})
    return out


@pytest.fixture(scope="module")
def pushed(mproxy: Proxy, images: dict[str, ImageInfo]) -> dict[str, ImageInfo]:
    """Both images pushed through the proxy, each through its upstream's prefix (skopeo)."""
    push_via(mproxy, images["prod"], "prod/app")
    push_via(mproxy, images["shared"], "shared/lib/base")
    return images


@pytest.fixture(scope="module")
def auth_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("multi-auth")
    htpasswd, policy = d / "htpasswd", d / "policy.toml"
    write_htpasswd(str(htpasswd), USERS)
    policy.write_text(POLICY, encoding="utf-8")
    return {"htpasswd": htpasswd, "policy": policy}


@pytest.fixture(scope="module")
def policy_proxy(ecr_prod: EmulatedECR, config_file: pathlib.Path, module_proxy_factory: ProxyFactory,
                 auth_files: dict[str, pathlib.Path]) -> Proxy:
    return module_proxy_factory.from_config(
        ecr_prod, config_file, "--auth", "basic", "--htpasswd", str(auth_files["htpasswd"]),
        "--policy", str(auth_files["policy"]), anonymous=False, token_keepers=2)


# ---------------------------------------------------------------- the emulators themselves
def test_two_accounts_one_moto_each_registry_takes_only_its_token(
    ecr_prod: EmulatedECR, ecr_shared: EmulatedECR
) -> None:
    """The premise of the role tests: only credentials of account B get the token B's registry accepts."""
    import botocore.session

    assert ecr_prod.password != ecr_shared.password
    assert ecr_prod.client("sts").get_caller_identity()["Account"] == ecr_prod.registry_id
    assert ecr_shared.client("sts").get_caller_identity()["Account"] == ecr_shared.registry_id

    def token(client: Any, registry_id: str) -> tuple[str, str]:
        data = client.get_authorization_token(registryIds=[registry_id])["authorizationData"][0]
        return base64.b64decode(data["authorizationToken"]).decode(), data["proxyEndpoint"]

    # account A's keys asking for B's registry get A's token: B's registry refuses it
    a_for_b, endpoint = token(ecr_prod.client("ecr", region_name=ecr_shared.region), ecr_shared.registry_id)
    assert a_for_b == f"AWS:{ecr_prod.password}"
    assert endpoint == f"https://{ecr_shared.registry_id}.dkr.ecr.{ecr_shared.region}.amazonaws.com"
    assert http_request(ecr_shared.upstream_url + "/v2/", password=ecr_prod.password).status == 401
    # a role of account B, assumed with A's keys, gets B's token: B's registry takes it, A's refuses it
    creds = ecr_prod.client("sts").assume_role(RoleArn=ecr_shared.role_arn(), RoleSessionName="itest")["Credentials"]
    as_b = botocore.session.get_session().create_client(
        "ecr", region_name=ecr_shared.region, endpoint_url=ecr_shared.ecr_endpoint_url,
        aws_access_key_id=creds["AccessKeyId"], aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"])
    assert token(as_b, ecr_shared.registry_id)[0] == f"AWS:{ecr_shared.password}"
    assert http_request(ecr_shared.upstream_url + "/v2/", password=ecr_shared.password).status == 200
    assert http_request(ecr_prod.upstream_url + "/v2/", password=ecr_shared.password).status == 401
    # rotating B's token in the shared token file leaves A's alone
    password, expires = ecr_shared.moto_password, ecr_shared.moto_expires_at
    ecr_shared.set_moto_token("rotated-b", expires)
    try:
        assert token(as_b, ecr_shared.registry_id)[0] == "AWS:rotated-b"
        assert token(ecr_prod.client("ecr"), ecr_prod.registry_id)[0] == f"AWS:{ecr_prod.password}"
    finally:
        ecr_shared.set_moto_token(password, expires)
    # each account's ECR API lists its own repositories only
    ecr_shared.client("ecr").create_repository(repositoryName="probe/only-b")
    try:
        names = [r["repositoryName"] for r in as_b.describe_repositories()["repositories"]]
        assert "probe/only-b" in names
        names = [r["repositoryName"] for r in ecr_prod.client("ecr").describe_repositories()["repositories"]]
        assert "probe/only-b" not in names
    finally:
        ecr_shared.client("ecr").delete_repository(repositoryName="probe/only-b")


# ---------------------------------------------------------------- push, pull, host routing, names
def test_push_through_a_prefix_lands_in_that_account_only(
    ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo]
) -> None:
    prod, shared = pushed["prod"], pushed["shared"]
    # private names upstream: the prefix is gone, and each image is in its own account's registry only
    assert registry_tags(ecr_prod, "app") == ["1.0"]
    assert registry_tags(ecr_shared, "lib/base") == ["2.0"]
    assert registry_tags(ecr_shared, "app") == [] and registry_tags(ecr_prod, "lib/base") == []
    assert registry_tags(ecr_prod, "prod/app") == [] and registry_tags(ecr_shared, "shared/lib/base") == []
    r = direct(ecr_shared, "/v2/lib/base/manifests/2.0", headers={"Accept": MANIFEST_ACCEPT})
    assert r.status == 200 and r.body == shared.manifest
    for d in prod.blob_digests:
        assert registry_has_blob(ecr_prod, "app", d) and not registry_has_blob(ecr_shared, "app", d)


def test_pull_from_both_upstreams(mproxy: Proxy, pushed: dict[str, ImageInfo], tmp_path: pathlib.Path) -> None:
    """skopeo pulls through both prefixes; digests and bytes are the pushed ones (the role upstream included)."""
    for repo, info in (("prod/app", pushed["prod"]), ("shared/lib/base", pushed["shared"])):
        dest = tmp_path / repo.replace("/", "_")
        pull_via(mproxy, repo, info.tag, dest)
        assert_layout_matches(dest, info.tag, info)
    # tags/list through each prefix: skopeo (the repository it names is the public one) and the name field
    skopeo = Skopeo(tmp_path / "skopeo")
    out = skopeo.run("list-tags", "--tls-verify=false", "--no-creds", f"docker://{mproxy.host}/shared/lib/base")
    assert json.loads(out.stdout)["Tags"] == ["2.0"]
    r = mproxy.request("/v2/shared/lib/base/tags/list")
    assert r.status == 200 and r.json() == {"name": "shared/lib/base", "tags": ["2.0"]}
    r = mproxy.request("/v2/prod/app/tags/list")
    assert r.status == 200 and r.json() == {"name": "prod/app", "tags": ["1.0"]}
    # a blob of one upstream is not served for a repository of the other (the layer cache, if any, is per upstream)
    layer = pushed["shared"].layer_digests[0]
    assert mproxy.request(f"/v2/prod/app/blobs/{layer}").status == 404
    # metrics carry an upstream label bounded to the configured names
    values = label_values(mproxy.metrics(), "upstream")
    assert values == set(UPSTREAMS), values


def test_tags_list_pagination_link_keeps_the_public_name(
    mproxy: Proxy, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo]
) -> None:
    info = pushed["shared"]
    for tag in ("2.1", "2.2"):
        r = direct(ecr_shared, f"/v2/lib/base/manifests/{tag}", "PUT", body=info.manifest,
                   headers={"Content-Type": info.media_type})
        assert r.status == 201, (r.status, r.body)
    seen: list[str] = []
    path = "/v2/shared/lib/base/tags/list?n=2"
    for _ in range(5):
        r = mproxy.request(path)
        assert r.status == 200, (r.status, r.body)
        assert r.json()["name"] == "shared/lib/base"
        seen += r.json()["tags"]
        link = r.header("Link")
        if link is None:
            break
        m = re.fullmatch(r'<([^>]+)>;\s*rel="next"', link)
        assert m, link
        assert m.group(1).startswith("/v2/shared/lib/base/tags/list?"), link
        path = m.group(1)
    assert seen == ["2.0", "2.1", "2.2"]


def test_host_routed_upstream_with_curl(
    mproxy: Proxy, pushed: dict[str, ImageInfo]
) -> None:
    """mirror.localhost/<repo> is account A's <repo>, also reached as mirror/<repo> on the proxy's other names;
    <repo> alone there names no upstream (no default)."""
    info = pushed["prod"]
    c = curl(mproxy, "/v2/app/manifests/1.0", host=MIRROR_HOST, headers={"Accept": MANIFEST_ACCEPT})
    assert c.status == 200, (c.status, c.body[:300])
    assert c.body == info.manifest and c.headers.get("docker-content-digest") == info.manifest_digest
    for d in info.blob_digests:
        c = curl(mproxy, f"/v2/app/blobs/{d}", host=MIRROR_HOST)
        assert c.status == 200, (d, c.status, c.body[:300])
        assert c.body == info.blob_path(d).read_bytes() and sha256(c.body) == d
    c = curl(mproxy, "/v2/app/tags/list", host=MIRROR_HOST)
    assert c.status == 200 and json.loads(c.body) == {"name": "app", "tags": ["1.0"]}
    # the access log shows the public name, whatever way the client named the repository
    wait_for(lambda: 'repo="mirror/app"' in mproxy.log_text(), 10, "the host-routed request in the access log")
    # no default upstream: a first component that is no prefix is unknown on the proxy's own name
    c = curl(mproxy, "/v2/app/manifests/1.0", headers={"Accept": MANIFEST_ACCEPT})
    assert c.status == 404 and error_code(c.body) == "NAME_UNKNOWN", (c.status, c.body)
    # on another host the host-only upstream is reached under its name: its public name, one repository
    c = curl(mproxy, "/v2/mirror/app/manifests/1.0", headers={"Accept": MANIFEST_ACCEPT})
    assert c.status == 200 and c.body == info.manifest, (c.status, c.body)
    c = curl(mproxy, "/v2/mirror/app/tags/list")
    assert c.status == 200 and json.loads(c.body) == {"name": "mirror/app", "tags": ["1.0"]}
    # _catalog names repositories as the host it is asked on calls them: there, only mirror's, bare
    c = curl(mproxy, "/v2/_catalog", host=MIRROR_HOST)
    assert c.status == 200 and json.loads(c.body) == {"repositories": sorted(PROD_REPOS)}, c.body


def test_without_the_role_account_b_refuses(
    ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo], proxy_factory: ProxyFactory,
    tmp_path: pathlib.Path,
) -> None:
    """The control of the role tests: the same upstream with the default chain (account A's keys) gets
    account A's token, which B's registry refuses; so a pull through the role upstream used the role."""
    upstreams = [ecr_upstream(ecr_prod, "prod", prefix="prod"), ecr_upstream(ecr_shared, "shared", prefix="shared")]
    config = write_config(tmp_path / "no-role.toml", {"storage-hosts": TEST_STORAGE_HOSTS}, upstreams)
    p = proxy_factory.from_config(ecr_prod, config, token_keepers=2)
    r = p.request("/v2/shared/lib/base/manifests/2.0", headers={"Accept": MANIFEST_ACCEPT})
    assert r.status >= 400 and r.body != pushed["shared"].manifest, (r.status, r.body)
    r = p.request("/v2/prod/app/manifests/1.0", headers={"Accept": MANIFEST_ACCEPT})
    assert r.status == 200 and r.body == pushed["prod"].manifest


def test_layer_cache_stores_once_and_serves_only_what_each_upstream_confirms(
    ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, config_file: pathlib.Path, proxy_factory: ProxyFactory,
    tmp_path: pathlib.Path,
) -> None:
    common = make_tar_layer({"common.txt": b"a layer both accounts hold\n", "data": os.urandom(200_000)})
    a = make_oci_layout(tmp_path / "a", [common, os.urandom(50_000)], "1.0")
    b = make_oci_layout(tmp_path / "b", [common, os.urandom(60_000)], "1.0")
    push_direct(ecr_prod, a, "base/one")
    push_direct(ecr_shared, b, "lib/common")
    layer = a.layer_digests[0]
    assert layer == b.layer_digests[0]
    data = a.blob_path(layer).read_bytes()
    cache = tmp_path / "cache"
    # one process: what it fetched, it holds (X-Cache says so)
    p = proxy_factory.from_config(ecr_prod, config_file, "--cache-dir", str(cache), "--workers", "1",
                                  env_drop=("AWS_ENDPOINT_URL_ECR", "ECRPROXY_WORKERS"), wait="token")
    wait_for(lambda: p.ops("/readyz").status == 200, 15, f"{p.name} to be ready")
    r = p.request(f"/v2/shared/lib/common/blobs/{layer}")
    assert r.status == 200 and r.body == data
    stored = cache / "blobs" / "sha256" / layer.split(":", 1)[1]
    wait_for(lambda: stored.is_file() and stored.read_bytes() == data, 10, "the layer in the cache")
    # account A's app does not hold it: never served from the cache, by prefix or by host
    for method in ("GET", "HEAD"):
        r = p.request(f"/v2/prod/app/blobs/{layer}", method)
        assert r.status == 404 and r.header("X-Cache") != "HIT", (method, r.status, r.body)
    c = curl(p, f"/v2/app/blobs/{layer}", host=MIRROR_HOST)
    assert c.status == 404 and b"both accounts" not in c.body, (c.status, c.body)
    # account A's base/one holds it: A confirms, and the one stored copy is served
    r = p.request(f"/v2/prod/base/one/blobs/{layer}")
    assert r.status == 200 and r.body == data and r.header("X-Cache") == "HIT", (r.status, r.header("X-Cache"))
    copies = [q for q in cache.rglob("*") if q.is_file() and q.stat().st_size == len(data) and q.read_bytes() == data]
    assert copies == [stored], copies
    # what each repository was confirmed for is kept under public names
    known = set((cache / "known").read_text("ascii").splitlines())
    assert {f"shared/lib/common {layer}", f"prod/base/one {layer}"} <= known, known
    assert not any(line.endswith(layer) and line.split()[0] in ("lib/common", "base/one", "app", "prod/app",
                                                                 "mirror/app") for line in known), known


def test_default_upstream_never_shadows_a_prefix(
    ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo], proxy_factory: ProxyFactory,
    tmp_path: pathlib.Path,
) -> None:
    """With a default upstream, bare names go there; a default-upstream repository whose name starts with
    another upstream's prefix is out of reach, so no public name means two repositories (nor in _catalog)."""
    hidden = make_oci_layout(tmp_path / "hidden", [os.urandom(40_000)], "9.9")
    push_direct(ecr_prod, hidden, "shared/lib/base")  # account A's "shared/lib/base": shadowed by the prefix
    ensure_repositories(ecr_prod, "shared/lib/base")
    try:
        upstreams = multi_upstreams(ecr_prod, ecr_shared)[:2]
        upstreams[0] = ecr_upstream(ecr_prod, "prod", default=True)
        config = write_config(tmp_path / "default.toml", {"storage-hosts": TEST_STORAGE_HOSTS}, upstreams)
        p = proxy_factory.from_config(ecr_prod, config, token_keepers=2)
        r = p.request("/v2/app/manifests/1.0", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status == 200 and r.body == pushed["prod"].manifest, (r.status, r.body)
        # shared/lib/base is account B's lib/base, never account A's repository of that name
        r = p.request("/v2/shared/lib/base/tags/list")
        assert r.status == 200 and "9.9" not in r.json()["tags"] and "2.0" in r.json()["tags"], r.body
        r = p.request("/v2/shared/lib/base/manifests/9.9", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status == 404 and r.body != hidden.manifest, (r.status, r.body)
        r = p.request("/v2/_catalog")
        assert r.status == 200
        names = r.json()["repositories"]
        assert names.count("shared/lib/base") == 1 and "app" in names and "prod/app" not in names, names
    finally:
        ecr_prod.client("ecr").delete_repository(repositoryName="shared/lib/base", force=True)


# ---------------------------------------------------------------- mounts
def test_mount_across_upstreams_becomes_a_plain_upload(
    mproxy: Proxy, ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo]
) -> None:
    layer = pushed["shared"].layer_digests[1]
    data = pushed["shared"].blob_path(layer).read_bytes()
    assert registry_has_blob(ecr_shared, "lib/base", layer) and not registry_has_blob(ecr_prod, "app", layer)
    r = mproxy.request(f"/v2/prod/app/blobs/uploads/?mount={layer}&from=shared/lib/base", "POST", body=b"")
    assert r.status == 202, (r.status, r.body)
    assert r.header("Docker-Content-Digest") is None
    location = upload_location(mproxy, r.header("Location") or "")
    assert urllib.parse.urlsplit(location).path.startswith("/v2/prod/app/blobs/uploads/"), location
    assert not registry_has_blob(ecr_prod, "app", layer)  # nothing was mounted in account A
    # the client then uploads the blob: it lands in account A under the private name
    r = put_blob(location, data, layer)
    assert r.status == 201, (r.status, r.body)
    assert urllib.parse.urlsplit(r.header("Location") or "").path == f"/v2/prod/app/blobs/{layer}"
    assert registry_has_blob(ecr_prod, "app", layer)
    r = mproxy.request(f"/v2/prod/app/blobs/{layer}")
    assert r.status == 200 and r.body == data


def test_mount_within_one_upstream_is_a_mount(
    mproxy: Proxy, ecr_prod: EmulatedECR, pushed: dict[str, ImageInfo]
) -> None:
    layer = pushed["prod"].layer_digests[0]
    assert not registry_has_blob(ecr_prod, "team/copy", layer)
    r = mproxy.request(f"/v2/prod/team/copy/blobs/uploads/?mount={layer}&from=prod/app", "POST", body=b"")
    # distribution mounts within one registry: 201 with the blob's Location under the public name
    assert r.status == 201, (r.status, r.body)
    assert r.header("Docker-Content-Digest") == layer
    assert urllib.parse.urlsplit(r.header("Location") or "").path == f"/v2/prod/team/copy/blobs/{layer}"
    assert registry_has_blob(ecr_prod, "team/copy", layer)


# ---------------------------------------------------------------- the access policy over all upstreams
def test_policy_allows_a_user_one_upstream_only(
    policy_proxy: Proxy, ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo],
    tmp_path: pathlib.Path,
) -> None:
    p = policy_proxy
    alice, bob = basic("alice"), basic("bob")
    shared, prod = pushed["shared"], pushed["prod"]
    layer = shared.layer_digests[0]

    # alice: everything on prod works
    r = p.request("/v2/prod/app/manifests/1.0", headers={**alice, "Accept": MANIFEST_ACCEPT})
    assert r.status == 200 and r.body == prod.manifest
    assert p.request(f"/v2/prod/app/blobs/{prod.layer_digests[0]}", headers=alice).status == 200
    assert p.request("/v2/prod/app/tags/list", headers=alice).json()["tags"] == ["1.0"]

    # alice on shared: manifest, blob, tags/list, upload all denied
    denied = [
        ("GET", "/v2/shared/lib/base/manifests/2.0"),
        ("GET", f"/v2/shared/lib/base/manifests/{shared.manifest_digest}"),
        ("GET", f"/v2/shared/lib/base/blobs/{layer}"),
        ("HEAD", f"/v2/shared/lib/base/blobs/{layer}"),
        ("GET", "/v2/shared/lib/base/tags/list"),
        ("POST", "/v2/shared/lib/base/blobs/uploads/"),
    ]
    for method, path in denied:
        body = b"" if method == "POST" else None
        r = p.request(path, method, headers={**alice, "Accept": MANIFEST_ACCEPT}, body=body)
        assert r.status == 403, (method, path, r.status, r.body)
        if method != "HEAD":
            assert error_code(r.body) == "DENIED", (path, r.body)
    # ... and on the host-routed upstream (public names mirror/*), reached by curl under its host name
    c = curl(p, "/v2/app/manifests/1.0", host=MIRROR_HOST, headers={**alice, "Accept": MANIFEST_ACCEPT})
    assert c.status == 403 and error_code(c.body) == "DENIED", (c.status, c.body)
    # a mount from shared into prod: from= is not readable for alice, so it becomes a plain upload
    r = p.request(f"/v2/prod/app/blobs/uploads/?mount={layer}&from=shared/lib/base", "POST", headers=alice, body=b"")
    assert r.status == 202, (r.status, r.body)
    assert not registry_has_blob(ecr_prod, "app", layer)
    # a push to shared with skopeo: refused, nothing reaches account B
    with pytest.raises(RuntimeError) as e:
        skopeo_copy(f"oci:{prod.layout_dir}:{prod.tag}", f"docker://{p.host}/shared/evil:{prod.tag}",
                    dest_creds=f"alice:{USERS['alice']}")
    assert "denied" in str(e.value).lower() or "403 (forbidden)" in str(e.value).lower(), e.value
    assert registry_tags(ecr_shared, "evil") == []

    # _catalog: alice sees prod only, bob shared and mirror only; the pages (n=2) never show the others
    r = p.request("/v2/_catalog", headers=alice)
    assert r.status == 200 and r.json()["repositories"] == [n for n in CATALOG if n.startswith("prod/")]
    r = p.request("/v2/_catalog", headers=bob)
    assert r.status == 200
    assert r.json()["repositories"] == [n for n in CATALOG if n.startswith(("shared/", "mirror/"))]
    assert collect_catalog(p, 2, headers=alice) == [n for n in CATALOG if n.startswith("prod/")]
    # bob pulls shared with skopeo, but not prod
    pull_dest = tmp_path / "bob"
    skopeo_copy(f"docker://{p.host}/shared/lib/base:2.0", f"oci:{pull_dest}:2.0", src_creds=f"bob:{USERS['bob']}")
    assert_layout_matches(pull_dest, "2.0", shared)
    assert p.request("/v2/prod/app/manifests/1.0", headers={**bob, "Accept": MANIFEST_ACCEPT}).status == 403
    # anonymous may pull nothing here: an empty catalog
    r = p.request("/v2/_catalog")
    assert r.status == 200 and r.json()["repositories"] == [], (r.status, r.body)


# ---------------------------------------------------------------- _catalog from DescribeRepositories
def collect_catalog(p: Proxy, n: int, headers: Mapping[str, str] | None = None) -> list[str]:
    """Follow the Link headers of _catalog?n=N to the end; every page holds at most N names."""
    names: list[str] = []
    path = f"/v2/_catalog?n={n}"
    for _ in range(50):
        r = p.request(path, headers=dict(headers or {}))
        assert r.status == 200, (path, r.status, r.body)
        page = r.json()["repositories"]
        assert len(page) <= n, page
        names += page
        link = r.header("Link")
        if link is None:
            return names
        m = re.fullmatch(r'<([^>]+)>;\s*rel="next"', link)
        assert m, link
        target = urllib.parse.urlsplit(m.group(1))
        assert target.path == "/v2/_catalog", link
        query = urllib.parse.parse_qs(target.query)
        assert query["n"] == [str(n)] and query["last"] == [page[-1]], link
        path = m.group(1)
    raise AssertionError("_catalog pages never ended")


def test_catalog_comes_from_describe_repositories(
    mproxy: Proxy, ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo],
    tmp_path: pathlib.Path,
) -> None:
    # a repository only in the registry (pushed straight to it, never created in the ECR API)
    push_direct(ecr_prod, pushed["prod"], "only-in-registry")
    own = direct(ecr_prod, "/v2/_catalog")
    assert own.status == 200 and "only-in-registry" in own.json()["repositories"]

    c = curl(mproxy, "/v2/_catalog")
    assert c.status == 200, (c.status, c.body)
    names = json.loads(c.body)["repositories"]
    assert names == CATALOG, names
    # not the registry's own answer: its names, with or without a prefix, are not what the proxy lists
    assert not any(n.endswith("only-in-registry") for n in names)
    assert "prod/team/api" in names and "prod/team/api" not in own.json()["repositories"]
    assert "team/api" not in own.json()["repositories"]  # never pushed: only DescribeRepositories knows it

    # paginated: n/last and Link, as the distribution spec says
    assert collect_catalog(mproxy, 3) == CATALOG
    assert collect_catalog(mproxy, 1) == CATALOG
    r = mproxy.request("/v2/_catalog?n=2&last=prod/app")
    assert r.status == 200
    assert r.json()["repositories"] == [n for n in CATALOG if n > "prod/app"][:2]
    r = mproxy.request(f"/v2/_catalog?n=100&last={CATALOG[-1]}")
    assert r.status == 200 and r.json()["repositories"] == [] and r.header("Link") is None

    # the listing is reused for a short TTL (catalog-ttl = 2 in the file), then asked again
    ensure_repositories(ecr_shared, "lib/late")
    try:
        wait_for(lambda: "shared/lib/late" in mproxy.request("/v2/_catalog").json()["repositories"], 20,
                 "a new repository in _catalog after the TTL")
    finally:
        ecr_shared.client("ecr").delete_repository(repositoryName="lib/late")


# ---------------------------------------------------------------- failures and rotation
def test_one_upstream_down_the_other_keeps_serving(
    mproxy: Proxy, ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo],
    tmp_path: pathlib.Path,
) -> None:
    ecr_shared.kill_registry()
    try:
        t0 = time.monotonic()
        r = mproxy.request("/v2/shared/lib/base/manifests/2.0", headers={"Accept": MANIFEST_ACCEPT}, timeout=60)
        assert r.status in (502, 503, 504), (r.status, r.body)
        assert time.monotonic() - t0 < 30
        pull_via(mproxy, "prod/app", "1.0", tmp_path / "prod")
        assert_layout_matches(tmp_path / "prod", "1.0", pushed["prod"])
        c = curl(mproxy, "/v2/app/manifests/1.0", host=MIRROR_HOST, headers={"Accept": MANIFEST_ACCEPT})
        assert c.status == 200 and c.body == pushed["prod"].manifest
        # its token is still good: /readyz reports each upstream, the dead registry's included
        ready = mproxy.ops("/readyz")
        assert b"shared" in ready.body and b"prod" in ready.body and b"mirror" in ready.body, ready.body
    finally:
        ecr_shared.start_registry()
    wait_for(lambda: mproxy.request("/v2/shared/lib/base/manifests/2.0",
                                    headers={"Accept": MANIFEST_ACCEPT}).status == 200, 30, "shared back")
    pull_via(mproxy, "shared/lib/base", "2.0", tmp_path / "shared")
    assert_layout_matches(tmp_path / "shared", "2.0", pushed["shared"])


@pytest.mark.parametrize("optional", [False, True], ids=["required", "optional"])
def test_readyz_per_upstream_when_one_cannot_get_a_token(
    optional: bool, ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo],
    proxy_factory: ProxyFactory, tmp_path: pathlib.Path,
) -> None:
    """shared's STS endpoint is a closed port: no role credentials, no token; prod serves all the same."""
    dead = f"http://127.0.0.1:{free_port()}"
    upstreams = multi_upstreams(ecr_prod, ecr_shared)[:2]
    upstreams[1]["sts-endpoint-url"] = dead
    upstreams[1]["optional"] = optional
    config = write_config(tmp_path / "down.toml", {"storage-hosts": TEST_STORAGE_HOSTS}, upstreams)
    p = proxy_factory.from_config(ecr_prod, config, wait="healthz")
    wait_upstream_tokens(p, "prod", TEST_WORKERS)
    wait_for(lambda: metric_sum(p.metrics(), "ecrproxy_token_refresh_total", result="failure",
                                upstream="shared") >= 1, 30, "shared's failed token fetch")
    ready = p.ops("/readyz")
    assert ready.status == (200 if optional else 503), (ready.status, ready.body)
    assert b"shared" in ready.body and b"prod" in ready.body, ready.body  # reported per upstream
    r = p.request("/v2/prod/app/manifests/1.0", headers={"Accept": MANIFEST_ACCEPT})
    assert r.status == 200 and r.body == pushed["prod"].manifest
    t0 = time.monotonic()
    r = p.request("/v2/shared/lib/base/manifests/2.0", headers={"Accept": MANIFEST_ACCEPT}, timeout=60)
    assert r.status in (502, 503), (r.status, r.body)
    assert time.monotonic() - t0 < 30
    assert_no_secret(p.log_text(), [ecr_prod.password, ecr_shared.password, ecr_prod.secret_access_key],
                     "proxy log")


def test_tokens_of_both_upstreams_rotate(
    mproxy: Proxy, ecr_prod: EmulatedECR, ecr_shared: EmulatedECR, pushed: dict[str, ImageInfo],
    tmp_path: pathlib.Path,
) -> None:
    before = mproxy.metrics()
    ok = {u: metric_sum(before, "ecrproxy_token_refresh_total", result="success", upstream=u) for u in UPSTREAMS}
    old = [ecr_prod.password, ecr_shared.password]
    new_prod, new_shared = random_password(), random_password()
    ecr_prod.set_token(new_prod, time.time() + TWELVE_HOURS)
    ecr_shared.set_token(new_shared, time.time() + TWELVE_HOURS)
    assert http_request(ecr_shared.upstream_url + "/v2/", password=old[1]).status == 401
    # bodyless requests meet the 401 and the forced refresh in every process first (--workers N)
    def all_ok(path: str) -> bool:
        return all(mproxy.request(path).status == 200 for _ in range(2 * TEST_WORKERS))

    for path in ("/v2/prod/app/tags/list", "/v2/shared/lib/base/tags/list"):
        wait_for(functools.partial(all_ok, path), 30, f"{path} after the rotation")
    pull_via(mproxy, "prod/app", "1.0", tmp_path / "prod")
    assert_layout_matches(tmp_path / "prod", "1.0", pushed["prod"])
    pull_via(mproxy, "shared/lib/base", "2.0", tmp_path / "shared")
    assert_layout_matches(tmp_path / "shared", "2.0", pushed["shared"])
    c = curl(mproxy, "/v2/app/manifests/1.0", host=MIRROR_HOST, headers={"Accept": MANIFEST_ACCEPT})
    assert c.status == 200 and c.body == pushed["prod"].manifest
    after = mproxy.metrics()
    for u in ("prod", "shared"):
        assert metric_sum(after, "ecrproxy_token_refresh_total", result="success", upstream=u) > ok[u], u
    assert metric_sum(after, "ecrproxy_token_refresh_total", result="failure") == metric_sum(
        before, "ecrproxy_token_refresh_total", result="failure")
    # a push still works on the rotated role upstream
    extra = make_oci_layout(tmp_path / "extra", [os.urandom(50_000)], "2.9")
    push_via(mproxy, extra, "shared/lib/base")
    assert "2.9" in registry_tags(ecr_shared, "lib/base")
    assert_no_secret(mproxy.log_text(), [*old, new_prod, new_shared], "proxy log")


# ---------------------------------------------------------------- the config file itself
def readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text("utf-8")
    m = re.search(r"<!-- example-config -->\n```toml\n(.*?)```\n<!-- /example-config -->", text, re.DOTALL)
    assert m, "README.md must hold its example config between <!-- example-config --> and <!-- /example-config -->"
    return m.group(1)


def test_readme_example_config_loads_and_starts(
    ecr_prod: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    """The annotated example, as is, beside the files it names: twistd accepts it and the proxy listens."""
    example = readme_example()
    data = tomllib.loads(example)
    assert len(data.get("upstream", [])) >= 2, data
    etc = tmp_path / "etc"
    etc.mkdir()
    path = etc / "ecrproxy.toml"
    path.write_text(example, encoding="utf-8")
    # the files it names beside itself (relative paths are from the file's directory)
    write_htpasswd(str(etc / "htpasswd"), USERS)
    (etc / "policy.toml").write_text(POLICY, encoding="utf-8")
    (etc / "mirror-password").write_text("robot-secret\n", encoding="utf-8")
    # the command line wins over the file: local ports, a cache directory here, and an egress proxy on
    # 127.0.0.1 (nothing leaves the machine; the example's AWS accounts are not reachable anyway)
    extra = ["--cache-dir", str(tmp_path / "cache"), "--egress-proxy", f"http://127.0.0.1:{free_port()}"]
    env = {"AWS_ENDPOINT_URL_ECR": ecr_prod.ecr_endpoint_url, "AWS_ENDPOINT_URL_STS": ecr_prod.sts_endpoint_url}
    # who may use the proxy is the example's choice when it makes one; else anonymous (the proxy insists on one)
    anonymous = "auth" not in data and "anonymous" not in data
    p = proxy_factory.from_config(ecr_prod, path, *extra, wait="healthz", anonymous=anonymous, env_extra=env,
                                  env_drop=())
    assert p.alive()
    r = p.request("/v2/")
    assert r.status in (200, 401), (r.status, r.body)
    assert p.stop() == 0


BAD_CONFIGS = {
    # name: (file text, the lines the message may name (one of them), words it must hold)
    "toml-syntax": ('port = "tcp:5000"\n[[upstream]]\nname = "prod\n', (3,), []),
    "unknown-option": ('port = "tcp:5000"\nno-such-option = 1\n', (2,), ["no-such-option"]),
    "bad-option-type": ('workers = "two"\n', (1,), ["workers"]),
    "unknown-upstream-key": (
        '[[upstream]]\nname = "prod"\nregistry-id = "111111111111"\nregion = "us-east-1"\nprefix = "prod"\n'
        'rgion = "eu-west-1"\n', (6,), ["rgion"]),
    "bad-credentials": (
        '[[upstream]]\nname = "prod"\nregistry-id = "111111111111"\nregion = "us-east-1"\nprefix = "prod"\n'
        'credentials = "magic"\n', (6,), ["credentials"]),
    "bad-upstream-name": (
        '[[upstream]]\nname = "Prod Account"\nregistry-id = "111111111111"\nregion = "us-east-1"\n', (2,), ["name"]),
    "role-without-arn": (
        '[[upstream]]\nname = "prod"\nregistry-id = "111111111111"\nregion = "us-east-1"\nprefix = "prod"\n'
        'credentials = "role"\n', (1, 2, 6), ["role-arn"]),
    "two-defaults": (
        '[[upstream]]\nname = "a"\nregistry-id = "111111111111"\nregion = "us-east-1"\ndefault = true\n\n'
        '[[upstream]]\nname = "b"\nregistry-id = "222222222222"\nregion = "us-east-1"\ndefault = true\n',
        (7, 8, 11), ["default"]),
    "duplicate-prefix": (
        '[[upstream]]\nname = "a"\nregistry-id = "111111111111"\nregion = "us-east-1"\nprefix = "x"\n\n'
        '[[upstream]]\nname = "b"\nregistry-id = "222222222222"\nregion = "us-east-1"\nprefix = "x"\n',
        (7, 8, 11), ["prefix"]),
    "passthrough-with-upstreams": (
        'auth = "passthrough"\n\n[[upstream]]\nname = "a"\nregistry-id = "111111111111"\nregion = "us-east-1"\n'
        'prefix = "a"\n', (1,), ["passthrough"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_file_one_clear_message(case: str, tmp_path: pathlib.Path) -> None:
    text, lines, words = BAD_CONFIGS[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text, encoding="utf-8")
    port = free_port()
    argv = [str(TWISTD), "-n", "--pidfile=", "ecrproxy", "--config", str(path), "--port",
            f"tcp:{port}:interface=127.0.0.1"]
    if "auth =" not in text:
        argv.append("--anonymous")  # the file is what is wrong, not a missing --auth choice
    proc = subprocess.run(
        argv,
        env=twistd_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert str(path) in proc.stderr or str(path) in proc.stdout, out
    if lines:
        named = "|".join(str(n) for n in lines)
        assert re.search(rf"(\bline ({named})\b|{re.escape(str(path))}:({named})\b)", out), out
    for w in words:
        assert w in out, (w, out)
    assert "Traceback" not in out, out
    # one message: the file is named once, not in a cascade of errors
    assert out.count(str(path)) == 1, out

