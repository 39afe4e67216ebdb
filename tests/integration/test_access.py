"""Who may do what, with real clients against a real proxy and the emulated ECR.

basic (skopeo/podman --creds), token (podman login), passthrough (the token moto issues),
webhook (a local HTTP service); denied pushes leave nothing upstream; a team-a user
cannot see team-b through mount, tags/list, _catalog or digests.
"""

from __future__ import annotations

import base64
import collections
import http.server
import json
import os
import pathlib
import threading
from collections.abc import Iterator
from typing import Any

import botocore.session
import pytest
from proxy_harness import (
    TEST_WORKERS,
    Podman,
    Proxy,
    ProxyFactory,
    assert_layout_matches,
    assert_no_secret,
    ensure_repositories,
    free_port,
    http_request,
    push_direct,
    wait_for,
)

from ecr_twisted.testing.emulator import EmulatedECR
from ecr_twisted.testing.doubles import write_htpasswd
from ecr_twisted.testing.images import ImageInfo, make_oci_layout, make_tar_layer, skopeo_copy

PASSWORDS = {"alice": "alice-pw-Zq8", "bob": "bob-pw-Xk2", "jenkins": "ci-pw-Mm4"}

POLICY = """
[groups]
team-a = ["alice"]
ci = ["jenkins"]

[[rule]]
principals = ["anonymous", "authenticated"]
actions = ["pull"]
repositories = ["public/*"]

[[rule]]
principals = ["group:team-a"]
actions = ["pull", "push"]
repositories = ["team-a/*"]

[[rule]]
principals = ["group:ci"]
actions = ["push"]
repositories = ["team-a/*"]
tags = ["release-*"]

[[rule]]
principals = ["user:bob"]
actions = ["pull", "push"]
repositories = ["team-b/*"]

[[rule]]
effect = "deny"
principals = ["*"]
actions = ["push"]
repositories = ["*"]
tags = ["latest"]
"""


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def creds(user: str) -> str:
    return f"{user}:{PASSWORDS[user]}"


def image(tmp: pathlib.Path, seed: str, tag: str = "1.0") -> ImageInfo:
    layers = [make_tar_layer({f"{seed}.txt": f"{seed}\n".encode(), "data": os.urandom(200_000)})]
    return make_oci_layout(tmp / seed, layers, tag, labels={"seed": seed})


def upstream_tags(ecr: EmulatedECR, repo: str) -> list[str]:
    """What the registry itself holds, asked directly with the ECR password."""
    r = http_request(f"{ecr.upstream_url}/v2/{repo}/tags/list", password=ecr.password)
    if r.status == 404:
        return []
    assert r.status == 200, r.body
    return r.json().get("tags") or []


def upstream_has_blob(ecr: EmulatedECR, repo: str, digest: str) -> bool:
    r = http_request(f"{ecr.upstream_url}/v2/{repo}/blobs/{digest}", "HEAD", password=ecr.password)
    return r.status in (200, 307)


def push(proxy: Proxy, info: ImageInfo, ref: str, user: str | None) -> None:
    skopeo_copy(f"oci:{info.layout_dir}:{info.tag}", f"docker://{proxy.host}/{ref}",
                dest_creds=creds(user) if user else None)


def pull(proxy: Proxy, ref: str, dest: pathlib.Path, tag: str, user: str | None) -> None:
    skopeo_copy(f"docker://{proxy.host}/{ref}", f"oci:{dest}:{tag}", src_creds=creds(user) if user else None)


def refused(fn: Any, *args: Any) -> str:
    with pytest.raises(RuntimeError) as e:
        fn(*args)
    return str(e.value)


@pytest.fixture(scope="module")
def auth_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("auth")
    htpasswd, policy = d / "htpasswd", d / "policy.toml"
    write_htpasswd(str(htpasswd), PASSWORDS)
    policy.write_text(POLICY, encoding="utf-8")
    return {"htpasswd": htpasswd, "policy": policy, "dir": d}


@pytest.fixture(scope="module")
def basic_proxy(ecr: EmulatedECR, module_proxy_factory: ProxyFactory, auth_files: dict[str, pathlib.Path]) -> Proxy:
    return module_proxy_factory(
        ecr, "--auth", "basic", "--htpasswd", str(auth_files["htpasswd"]), "--policy", str(auth_files["policy"]),
        anonymous=False,
    )


# ---------------------------------------------------------------- basic
def test_basic_mode_with_skopeo_and_podman_creds(
    ecr: EmulatedECR, basic_proxy: Proxy, tmp_path: pathlib.Path
) -> None:
    info = image(tmp_path, "basic-a")
    push(basic_proxy, info, "team-a/app:1.0", "alice")
    assert "1.0" in upstream_tags(ecr, "team-a/app")
    pull(basic_proxy, "team-a/app:1.0", tmp_path / "out", "1.0", "alice")
    assert_layout_matches(tmp_path / "out", "1.0", info)

    podman = Podman(tmp_path / "podman")
    try:
        ref = f"{basic_proxy.host}/team-a/app:1.0"
        out = podman.pull(ref, "--tls-verify=false", "--creds", creds("alice"))
        assert "sha256:" + out.stdout.strip().splitlines()[-1] == info.config_digest
        # bob may not read team-a; neither may anonymous; a wrong password is no login
        message = refused(podman.pull, f"{basic_proxy.host}/team-a/app:1.0", "--tls-verify=false", "--creds",
                          creds("bob"))
        assert "denied" in message.lower(), message
        message = refused(pull, basic_proxy, "team-a/app:1.0", tmp_path / "x", "1.0", "bob")
        assert "denied" in message.lower(), message
        message = refused(pull, basic_proxy, "team-a/app:1.0", tmp_path / "y", "1.0", None)
        assert "unauthorized" in message.lower() or "authentication required" in message.lower(), message
        with pytest.raises(RuntimeError):
            skopeo_copy(f"docker://{basic_proxy.host}/team-a/app:1.0", f"oci:{tmp_path / 'z'}:1.0",
                        src_creds="alice:wrong-password")
    finally:
        podman.cleanup()
    r = http_request(f"{basic_proxy.url}/v2/", headers={"Host": "registry.example.com"})
    assert r.status == 401
    # anonymous may pull public/*: the challenge is the token flow's, so docker can pull anonymously
    assert r.header("WWW-Authenticate") == 'Bearer realm="http://registry.example.com/token",service="ecr-twisted"'
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    log = basic_proxy.log_text()
    for pw in PASSWORDS.values():
        assert pw not in log and pw not in basic_proxy.metrics_text()
    assert (basic_proxy.metric("ecrproxy_auth_attempts_total", mode="basic", result="success") or 0) > 0
    assert (basic_proxy.metric("ecrproxy_auth_attempts_total", mode="basic", result="failure") or 0) >= 1
    assert (basic_proxy.metric("ecrproxy_access_denied_total", action="pull") or 0) >= 1


def test_denied_push_leaves_nothing_upstream(ecr: EmulatedECR, basic_proxy: Proxy, tmp_path: pathlib.Path) -> None:
    info = image(tmp_path, "evil")
    message = refused(push, basic_proxy, info, "team-a/app:evil", "bob")
    assert "denied" in message.lower(), message
    assert "evil" not in upstream_tags(ecr, "team-a/app")
    for digest in info.blob_digests:
        assert not upstream_has_blob(ecr, "team-a/app", digest), digest
    # tag rules: nobody overwrites latest; CI pushes release-* only
    message = refused(push, basic_proxy, image(tmp_path, "latest", "latest"), "team-a/app:latest", "alice")
    assert "denied" in message.lower()
    assert "latest" not in upstream_tags(ecr, "team-a/app")
    release = image(tmp_path, "release", "release-1")
    push(basic_proxy, release, "team-a/app:release-1", "jenkins")
    assert "release-1" in upstream_tags(ecr, "team-a/app")
    refused(push, basic_proxy, image(tmp_path, "feature", "feature-x"), "team-a/app:feature-x", "jenkins")
    assert "feature-x" not in upstream_tags(ecr, "team-a/app")


def test_team_a_cannot_read_team_b(ecr: EmulatedECR, basic_proxy: Proxy, tmp_path: pathlib.Path) -> None:
    secret = image(tmp_path, "secret-b")
    push_direct(ecr, secret, "team-b/secret")
    push_direct(ecr, image(tmp_path, "mine-a"), "team-a/mine")
    ensure_repositories(ecr, "team-b/secret", "team-a/mine")  # _catalog lists the ECR API's repositories
    alice = {"Authorization": basic("alice", PASSWORDS["alice"])}
    layer = secret.layer_digests[0]

    # mount from team-b: becomes a plain upload, the blob does not appear in team-a
    r = http_request(f"{basic_proxy.url}/v2/team-a/mine/blobs/uploads/?mount={layer}&from=team-b/secret",
                     "POST", headers=alice, body=b"")
    assert r.status == 202, (r.status, r.body)
    assert not upstream_has_blob(ecr, "team-a/mine", layer)
    # tags/list, manifests and blobs by digest of team-b: denied
    for path in ("/v2/team-b/secret/tags/list", f"/v2/team-b/secret/manifests/{secret.manifest_digest}",
                 f"/v2/team-b/secret/blobs/{layer}", f"/v2/team-b/secret/referrers/{secret.manifest_digest}"):
        r = http_request(basic_proxy.url + path, headers=alice)
        assert r.status == 403 and r.json()["errors"][0]["code"] == "DENIED", (path, r.status, r.body)
    # _catalog shows alice only what she may pull
    r = http_request(f"{basic_proxy.url}/v2/_catalog", headers=alice)
    assert r.status == 200
    repos = r.json()["repositories"]
    assert "team-a/mine" in repos and not any(n.startswith("team-b/") for n in repos), repos
    bob = {"Authorization": basic("bob", PASSWORDS["bob"])}
    assert "team-b/secret" in http_request(f"{basic_proxy.url}/v2/_catalog", headers=bob).json()["repositories"]
    # path tricks do not reach team-b
    for path in ("/v2/team-a/../team-b/secret/tags/list", "/v2/team-a/%2e%2e/team-b/secret/tags/list",
                 "/v2/team-a%2f..%2fteam-b/secret/tags/list", "/v2/TEAM-B/secret/tags/list"):
        r = http_request(basic_proxy.url + path, headers=alice)
        assert r.status in (400, 404), (path, r.status, r.body)
    # a mount alice may read goes through as a mount
    r = http_request(
        f"{basic_proxy.url}/v2/team-a/app/blobs/uploads/?mount={secret.layer_digests[0]}&from=team-a/mine",
        "POST", headers=alice, body=b"")
    assert r.status == 202  # the layer is not in team-a/mine: the registry starts an upload instead


def test_htpasswd_is_reread_and_failed_logins_are_slowed(
    basic_proxy: Proxy, auth_files: dict[str, pathlib.Path]
) -> None:
    carol = {"Authorization": basic("carol", "carol-pw")}
    assert http_request(f"{basic_proxy.url}/v2/", headers=carol).status == 401
    write_htpasswd(str(auth_files["htpasswd"]), {**PASSWORDS, "carol": "carol-pw"})
    # polling with carol's password before the file is re-read counts as failed logins: the throttle
    # may make her wait a few seconds more
    wait_for(lambda: http_request(f"{basic_proxy.url}/v2/", headers=carol).status == 200, 30, "carol to log in",
             interval=0.5)
    write_htpasswd(str(auth_files["htpasswd"]), PASSWORDS)
    wait_for(lambda: http_request(f"{basic_proxy.url}/v2/", headers=carol).status == 401, 30, "carol to be gone",
             interval=0.5)
    # failures are counted per address (per process with --workers): keep guessing from 127.0.0.1
    statuses = [http_request(f"{basic_proxy.url}/v2/", headers={"Authorization": basic("alice", f"guess{i}")}).status
                for i in range(12 * TEST_WORKERS)]
    # (earlier wrong logins from this address may have used up the free failures already)
    assert set(statuses) <= {401, 429} and statuses[-1] == 429, statuses
    # while the penalty lasts, even the right password is not checked
    answers = [http_request(f"{basic_proxy.url}/v2/", headers={"Authorization": basic("alice", PASSWORDS["alice"])})
               for _ in range(2 * TEST_WORKERS)]
    throttled = [r for r in answers if r.status == 429]
    assert throttled, [r.status for r in answers]
    assert int(throttled[0].header("Retry-After") or 0) >= 1
    assert throttled[0].json()["errors"][0]["code"] == "TOOMANYREQUESTS"


# ---------------------------------------------------------------- token
def test_token_mode_podman_login_push_pull(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, auth_files: dict[str, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    p = proxy_factory(ecr, "--auth", "token", "--htpasswd", str(auth_files["htpasswd"]),
                      "--policy", str(auth_files["policy"]), "--token-service", "registry.test", anonymous=False)
    r = http_request(f"{p.url}/v2/")
    assert r.status == 401
    assert r.header("WWW-Authenticate") == f'Bearer realm="{p.url}/token",service="registry.test"'

    info = image(tmp_path, "token-a")
    push_direct(ecr, info, "team-a/tok")
    podman = Podman(tmp_path / "podman")
    try:
        with pytest.raises(RuntimeError):
            podman.run("login", "--tls-verify=false", "-u", "alice", "-p", "not-her-password", p.host)
        podman.run("login", "--tls-verify=false", "-u", "alice", "-p", PASSWORDS["alice"], p.host)
        out = podman.pull(f"{p.host}/team-a/tok:1.0", "--tls-verify=false")
        assert "sha256:" + out.stdout.strip().splitlines()[-1] == info.config_digest
        podman.run("tag", f"{p.host}/team-a/tok:1.0", f"{p.host}/team-a/tok:pushed")
        podman.run("push", "--tls-verify=false", f"{p.host}/team-a/tok:pushed")
        assert "pushed" in upstream_tags(ecr, "team-a/tok")
        podman.run("tag", f"{p.host}/team-a/tok:1.0", f"{p.host}/team-b/tok:stolen")
        with pytest.raises(RuntimeError):
            podman.run("push", "--tls-verify=false", f"{p.host}/team-b/tok:stolen")
        assert "stolen" not in upstream_tags(ecr, "team-b/tok")
    finally:
        podman.cleanup()
    # skopeo follows the same flow with --creds
    pull(p, "team-a/tok:pushed", tmp_path / "out", "pushed", "alice")
    # the issued token carries only what the policy grants
    r = http_request(f"{p.url}/token?service=registry.test&scope=repository:team-a/tok:pull,push"
                     "&scope=repository:team-b/secret:pull",
                     headers={"Authorization": basic("alice", PASSWORDS["alice"])})
    assert r.status == 200
    token = r.json()["token"]
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["access"] == [{"type": "repository", "name": "team-a/tok", "actions": ["pull", "push"]}]
    bearer = {"Authorization": f"Bearer {token}"}
    assert http_request(f"{p.url}/v2/team-a/tok/tags/list", headers=bearer).status == 200
    r = http_request(f"{p.url}/v2/team-b/secret/tags/list", headers=bearer)
    assert r.status in (401, 403)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert http_request(f"{p.url}/v2/team-a/tok/tags/list", headers={"Authorization": f"Bearer {forged}"}).status == 401
    for pw in PASSWORDS.values():
        assert pw not in p.log_text()
    assert token not in p.log_text()


# ---------------------------------------------------------------- passthrough
def test_passthrough_forwards_the_clients_ecr_credentials(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    info = image(tmp_path, "passthrough")
    push_direct(ecr, info, "pt/app")
    # the proxy has no AWS credentials at all: it never asks ECR for a token
    p = proxy_factory(ecr, "--auth", "passthrough", anonymous=False,
                      env_drop=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_ECR"], wait="healthz")
    client = botocore.session.get_session().create_client(
        "ecr", region_name=ecr.region, endpoint_url=ecr.ecr_endpoint_url,
        aws_access_key_id="testing", aws_secret_access_key="testing")
    auth = client.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    user, _, password = base64.b64decode(auth).decode().partition(":")
    assert user == "AWS"
    skopeo_copy(f"docker://{p.host}/pt/app:1.0", f"oci:{tmp_path / 'out'}:1.0", src_creds=f"AWS:{password}")
    assert_layout_matches(tmp_path / "out", "1.0", info)
    with pytest.raises(RuntimeError):
        skopeo_copy(f"docker://{p.host}/pt/app:1.0", f"oci:{tmp_path / 'bad'}:1.0", src_creds="AWS:wrong")
    r = http_request(f"{p.url}/v2/pt/app/tags/list")
    assert r.status == 401 and r.header("WWW-Authenticate") == f'Basic realm="{p.url}"'
    r = http_request(f"{p.url}/v2/pt/app/tags/list", headers={"Authorization": basic("AWS", "wrong")})
    assert r.status == 401 and ecr.registry_host not in (r.header("WWW-Authenticate") or "")
    assert p.metric_sum("ecrproxy_token_refresh_total", result="success") == 0
    assert_no_secret(p.log_text(), [password], "passthrough log")


# ---------------------------------------------------------------- webhook
class Authorizer:
    """A small authorization service: `ci` / `hook-pw` may pull and push hook/*; it records questions."""

    def __init__(self) -> None:
        self.questions: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                q = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.questions.append(q)
                good = q.get("user") == "ci" and q.get("password") == "hook-pw"
                allow = good and (q["action"] == "login" or (q["repository"] or "").startswith("hook/"))
                body = json.dumps({"allow": allow, "authenticated": good}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def authorizer() -> Iterator[Authorizer]:
    a = Authorizer()
    yield a
    a.close()


def test_webhook_decides_and_down_means_deny(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, authorizer: Authorizer, tmp_path: pathlib.Path
) -> None:
    p = proxy_factory(ecr, "--auth", "webhook", "--auth-webhook", f"http://127.0.0.1:{authorizer.port}/check",
                      anonymous=False)
    info = image(tmp_path, "hook")
    skopeo_copy(f"oci:{info.layout_dir}:1.0", f"docker://{p.host}/hook/app:1.0", dest_creds="ci:hook-pw")
    skopeo_copy(f"docker://{p.host}/hook/app:1.0", f"oci:{tmp_path / 'out'}:1.0", src_creds="ci:hook-pw")
    assert_layout_matches(tmp_path / "out", "1.0", info)
    asked = len(authorizer.questions)
    assert {q["action"] for q in authorizer.questions} >= {"pull", "push"}
    assert any(q["repository"] == "hook/app" and q["tag"] == "1.0" for q in authorizer.questions)
    # answers are cached (per process): pulling again asks nothing new, or with --workers N
    # at most N times the same question in all
    skopeo_copy(f"docker://{p.host}/hook/app:1.0", f"oci:{tmp_path / 'again'}:1.0", src_creds="ci:hook-pw")
    if TEST_WORKERS == 1:
        assert len(authorizer.questions) == asked
    same = collections.Counter(json.dumps(q, sort_keys=True) for q in authorizer.questions)
    assert max(same.values()) <= TEST_WORKERS, same
    with pytest.raises(RuntimeError):
        skopeo_copy(f"oci:{info.layout_dir}:1.0", f"docker://{p.host}/other/app:1.0", dest_creds="ci:hook-pw")
    assert upstream_tags(ecr, "other/app") == []
    r = http_request(f"{p.url}/v2/hook/app/tags/list", headers={"Authorization": basic("ci", "wrong")})
    assert r.status == 401
    # the webhook goes away: a question it has not answered before is denied
    authorizer.close()
    r = http_request(f"{p.url}/v2/hook/app/manifests/2.0", headers={"Authorization": basic("ci", "hook-pw")})
    assert r.status == 403 and "unavailable" in r.json()["errors"][0]["detail"], r.body
    assert (p.metric("ecrproxy_auth_webhook_errors_total") or 0) >= 1
    assert "authorization webhook failed, denying" in p.log_text()
    assert "hook-pw" not in p.log_text()


# ---------------------------------------------------------------- namespace, read-only
def test_namespace_patterns_and_read_only(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    info = image(tmp_path, "ns")
    push_direct(ecr, info, "team-a/ns")
    push_direct(ecr, info, "team-a/internal-ns")
    ensure_repositories(ecr, "team-a/ns", "team-a/internal-ns")  # _catalog lists the ECR API's repositories
    p = proxy_factory(ecr, "--auth", "none", "--namespace-pattern", "team-a/.*", "--exclude-pattern", ".*/internal-.*",
                      "--read-only", anonymous=False)
    assert http_request(f"{p.url}/v2/team-a/ns/tags/list").status == 200
    for path in ("/v2/team-b/secret/tags/list", "/v2/team-a/internal-ns/tags/list",
                 f"/v2/team-a/internal-ns/manifests/{info.manifest_digest}"):
        r = http_request(p.url + path)
        assert r.status == 404 and r.json()["errors"][0]["code"] == "NAME_UNKNOWN", (path, r.body)
    repos = http_request(f"{p.url}/v2/_catalog").json()["repositories"]
    assert "team-a/ns" in repos and "team-a/internal-ns" not in repos and not any(
        not n.startswith("team-a/") for n in repos), repos
    message = refused(push, p, image(tmp_path, "ro"), "team-a/ns:2.0", None)
    assert "denied" in message.lower()
    assert "2.0" not in upstream_tags(ecr, "team-a/ns")
    r = http_request(f"{p.url}/v2/team-a/ns/manifests/1.0", "DELETE")
    assert r.status == 403 and r.json()["errors"][0]["code"] == "DENIED"
