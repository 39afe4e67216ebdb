"""The access log of a real `twistd -n ecrproxy --log-format json` process, read from its log file:
who did what for anonymous, logged-in, denied and failed-login requests, X-Request-Id, bad
requests; no secret in the log of any proxy this module started; process_* and build info in
/metrics (also under ECRTEST_WORKERS=2)."""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from proxy_harness import Proxy, ProxyFactory, assert_no_secret, http_request, wait_for

from ecr_twisted.testing.doubles import write_htpasswd
from ecr_twisted.testing.emulator import EmulatedECR

PASSWORDS = {"alice": "alice-Secret-pw-0123456789", "bob": "bob-Secret-pw-9876543210"}
WRONG = "Wrong-guess-pw-5555"
POLICY = """
[[rule]]
principals = ["anonymous"]
actions = ["pull"]
repositories = ["public/*"]

[[rule]]
principals = ["user:alice"]
actions = ["pull", "push"]
repositories = ["team-a/*"]
"""


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyFactory]:
    f = ProxyFactory(tmp_path_factory.mktemp("log-proxies"))
    try:
        yield f
    finally:
        f.close()


@pytest.fixture(scope="module")
def json_proxy(ecr: EmulatedECR, factory: ProxyFactory, tmp_path_factory: pytest.TempPathFactory) -> Proxy:
    d = tmp_path_factory.mktemp("log-auth")
    write_htpasswd(str(d / "htpasswd"), PASSWORDS)
    (d / "policy.toml").write_text(POLICY, encoding="utf-8")
    return factory(
        ecr, "--auth", "basic", "--htpasswd", str(d / "htpasswd"), "--policy", str(d / "policy.toml"),
        "--log-format", "json", "--trust-forwarded", anonymous=False,
    )


def access_lines(p: Proxy) -> list[dict[str, Any]]:
    out = []
    for line in p.log_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def wait_line(p: Proxy, request_id: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = []

    def there() -> bool:
        found[:] = [e for e in access_lines(p) if e.get("request_id") == request_id]
        return bool(found)

    wait_for(there, 10, f"the access line of {request_id}")
    assert len(found) == 1
    return found[0]


def test_json_access_lines_say_who_did_what(json_proxy: Proxy) -> None:
    p = json_proxy
    cases = [
        ("anon", "GET", "/v2/team-a/app/manifests/1.0", {}, 401, "anonymous"),
        ("alice", "GET", "/v2/", {"Authorization": basic("alice", PASSWORDS["alice"])}, 200, "alice"),
        ("denied", "PUT", "/v2/team-b/app/manifests/1.0", {"Authorization": basic("bob", PASSWORDS["bob"])}, 403,
         "bob"),
        ("failed", "GET", "/v2/", {"Authorization": basic("alice", WRONG)}, 401, "alice"),
    ]
    for rid, method, path, headers, status, user in cases:
        r = http_request(
            p.url + path, method, body=b"{}" if method == "PUT" else None,
            headers={**headers, "X-Request-Id": f"it-{rid}", "User-Agent": "it-agent/1.0",
                     "X-Forwarded-For": "203.0.113.7"},
        )
        assert r.status == status, (rid, r.status, r.body)
        assert r.header("X-Request-Id") == f"it-{rid}"  # trusted (--trust-forwarded): taken as sent
        e = wait_line(p, f"it-{rid}")
        assert (e["user"], e["status"], e["method"], e["client"]) == (user, status, method, "203.0.113.7"), e
        assert e["user_agent"] == "it-agent/1.0" and e["time"].endswith("Z") and e["duration"] >= 0
        if status >= 400:
            assert e["reason"], e
    denied = wait_line(p, "it-denied")
    assert (denied["route"], denied["repository"], denied["reference"]) == ("manifest", "team-b/app", "1.0")
    assert wait_line(p, "it-failed")["reason"].startswith("login failed")
    assert wait_line(p, "it-alice").get("upstream_status") == 200


def test_a_token_login_and_its_use_are_logged_without_the_token(json_proxy: Proxy) -> None:
    p = json_proxy
    r = http_request(p.url + "/token?service=ecr-twisted&scope=repository:team-a/app:pull,push",
                     headers={"Authorization": basic("alice", PASSWORDS["alice"]), "X-Request-Id": "it-token"})
    assert r.status == 200
    token = r.json()["token"]
    r = http_request(p.url + "/v2/team-a/app/tags/list",
                     headers={"Authorization": "Bearer " + token, "X-Request-Id": "it-bearer"})
    assert r.status in (200, 404)
    assert wait_line(p, "it-token")["user"] == "alice"
    assert wait_line(p, "it-bearer")["user"] == "alice"
    assert token not in p.log_text() and token.split(".")[2] not in p.log_text()


def test_bad_requests_are_logged_with_their_reason(json_proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", json_proxy.port), timeout=5) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: h\r\nno colon here\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    wait_for(lambda: "bad request refused: 400" in json_proxy.log_text(), 10, "the bad request's log line")


def test_untrusted_proxies_make_their_own_request_ids(ecr: EmulatedECR, factory: ProxyFactory) -> None:
    p = factory(ecr, "--log-format", "json")
    r = http_request(p.url + "/v2/", headers={"X-Request-Id": "client-made", "X-Forwarded-For": "203.0.113.7"})
    assert r.status == 200
    rid = r.header("X-Request-Id")
    assert rid and rid != "client-made"
    e = wait_line(p, rid)
    assert e["client"] == "127.0.0.1" and e["user"] == "anonymous"


def test_metrics_have_process_series_and_build_info(json_proxy: Proxy) -> None:
    text = json_proxy.metrics_text()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_max_fds", "python_info", "ecrproxy_build_info{version="):
        assert name in text, name
    assert (json_proxy.metric("process_resident_memory_bytes") or 0) > 10 << 20


def test_no_secret_in_the_logs_of_these_proxies(ecr: EmulatedECR, factory: ProxyFactory, json_proxy: Proxy) -> None:
    """Runs last in this module: every proxy it started, every password, the ECR token's password."""
    secrets = [*PASSWORDS.values(), WRONG, ecr.password]
    assert factory.proxies
    for p in factory.proxies:
        text = p.log_text()
        assert text, p.name
        assert_no_secret(text, secrets, f"{p.name} log")
        assert "X-Amz-Signature=" not in text.replace("X-Amz-Signature=REDACTED", "")


