"""Blob redirects the proxy follows itself (stream mode, cache fills): only to storage, never anywhere.

The decision alone (`registry.redirects`), then through the whole proxy on a MemoryReactorClock:
a refused or malformed `Location` is a 502 with the registry's JSON envelope, logged once
without its query, and nothing is fetched from it.
"""

from __future__ import annotations

import ipaddress
import json
from typing import cast

import pytest
from twisted.logger import ILogObserver, globalLogPublisher

from ecr_twisted.http.origin import Origin
from ecr_twisted.registry.handler import ProxyConfig
from ecr_twisted.registry.redirects import (
    MAX_REDIRECTS,
    Follow,
    HostPattern,
    RedirectRules,
    Refuse,
    default_patterns,
    parse_patterns,
    special_address,
)
from ecr_twisted.testing.doubles import UPSTREAM, Harness

DIGEST = b"sha256:" + b"cd" * 32
BLOB = b"/v2/app/blobs/" + DIGEST
S3 = b"https://prod-eu-west-1-starport-layer-bucket.s3.eu-west-1.amazonaws.com/x/y?X-Amz-Signature=abc"
REGISTRY = Origin("https", "123456789012.dkr.ecr.eu-west-1.amazonaws.com")
RULES = RedirectRules(default_patterns("eu-west-1"), own=(("", 5000), ("127.0.0.1", 9100)))
LOCAL = RedirectRules(parse_patterns("default, http://localhost:*, http://127.0.0.1:*", "eu-west-1"), RULES.own)


def decide(location: bytes, rules: RedirectRules = RULES, followed: int = 0) -> Follow | Refuse:
    return rules.decide(location, REGISTRY, REGISTRY, followed)


# -- the decision
@pytest.mark.parametrize(
    "location",
    [
        S3,
        b"https://prod-eu-west-1-starport-layer-bucket.s3.amazonaws.com/x?X-Amz-Signature=abc",
        b"https://s3.eu-west-1.amazonaws.com/bucket/x",
        b"https://bucket.s3.dualstack.eu-west-1.amazonaws.com/x",
        b"https://BUCKET.S3.EU-WEST-1.AMAZONAWS.COM/x",
        b"https://bucket.s3.eu-west-1.amazonaws.com./x",
        b"https://bucket.s3.eu-west-1.amazonaws.com:443/x",
    ],
)
def test_s3_urls_of_the_region_are_followed(location: bytes) -> None:
    d = decide(location)
    assert isinstance(d, Follow), d
    assert d.origin.scheme == "https" and d.origin.port == 443 and d.origin.host.endswith(".amazonaws.com")


def test_the_target_is_the_path_and_query_byte_for_byte_and_the_log_form_has_no_query() -> None:
    d = decide(S3 + b"&X-Amz-Credential=AKIA%2F20260101%2Feu-west-1#frag")
    assert isinstance(d, Follow)
    assert d.target == b"/x/y?X-Amz-Signature=abc&X-Amz-Credential=AKIA%2F20260101%2Feu-west-1"
    assert d.shown == "https://prod-eu-west-1-starport-layer-bucket.s3.eu-west-1.amazonaws.com/x/y"
    assert decide(b"https://bucket.s3.amazonaws.com").target == b"/"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "location",
    [b"http://[::1", b"http://[::1]x/", b"http://[zz::1]/", b"", b"https://", b"https:///x", b"http://a b/",
     b"http://host\t/", b"http://h\\@127.0.0.1/", b"https://bucket.s3.amazonaws.com:99999/", b"https://h:0/",
     b"https://h:x/", b"https://ex\xc3\xa4mple.s3.amazonaws.com/", b"https://%31%32%37.0.0.1/",
     b"https://a..s3.amazonaws.com/", b"https://-a.s3.amazonaws.com/", b"http://[fe80::1%25eth0]/"],
)
def test_malformed_locations_are_refused(location: bytes) -> None:
    d = decide(location)
    assert isinstance(d, Refuse) and "malformed" in d.reason, d


@pytest.mark.parametrize(
    "address,why",
    [
        ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
        ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("0.1.2.3", "private"),
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
        ("fc00::1", "private"), ("fd12:3456::1", "private"),
        ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
        ("100.64.0.1", "shared"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
        ("192.0.2.1", "private"), ("198.18.0.1", "private"), ("2001:db8::1", "private"),
        ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"), ("::ffff:10.0.0.1", "private"),
        ("::127.0.0.1", "loopback"), ("2002:7f00:1::", "loopback"), ("2002:a9fe:a9fe::", "link-local"),
        ("64:ff9b::7f00:1", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo: client 127.0.0.1 (inverted)
        ("::ffff:8.8.8.8", "IPv6 form"),
    ],
)
def test_every_special_address_range_is_named(address: str, why: str) -> None:
    reason = special_address(ipaddress.ip_address(address))
    assert reason is not None and why in reason, (address, reason)


@pytest.mark.parametrize("address", ["8.8.8.8", "52.95.150.1", "2a05:d018::1"])
def test_global_addresses_are_not_special(address: str) -> None:
    assert special_address(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "location",
    [
        b"http://127.0.0.1/", b"https://127.0.0.1:9100/metrics", b"http://[::1]:8080/", b"http://[::ffff:127.0.0.1]/",
        b"http://[::ffff:7f00:1]/", b"http://10.0.0.1/x", b"http://192.168.0.10/", b"http://169.254.169.254/latest/",
        b"http://[fd00:ec2::254]/latest/", b"http://0.0.0.0:5000/", b"http://[2002:a9fe:a9fe::]/",
        b"https://8.8.8.8/x",  # a global address, but no pattern names it
        b"http://2130706433/", b"http://0x7f000001/", b"http://0x7f.1/", b"http://017700000001/", b"http://127.1/",
        b"http://0177.0.0.1/", b"http://127.0.0.1./",
    ],
)
def test_ip_literals_are_refused_whatever_their_spelling(location: bytes) -> None:
    d = decide(location)
    assert isinstance(d, Refuse), d


@pytest.mark.parametrize(
    "location,why",
    [
        (b"https://s3.amazonaws.com@127.0.0.1/", "userinfo"),
        (b"https://user:pw@bucket.s3.amazonaws.com/", "userinfo"),
        (b"https://bucket.s3.amazonaws.com:pw@127.0.0.1/", "userinfo"),
        (b"https://a@b@bucket.s3.amazonaws.com/", "userinfo"),
        (b"ftp://bucket.s3.amazonaws.com/x", "http or https"),
        (b"file:///etc/passwd", "http or https"),
        (b"gopher://127.0.0.1:6379/_", "http or https"),
        (b"http://bucket.s3.eu-west-1.amazonaws.com/x", "plain http"),
        (b"https://bucket.s3.eu-west-1.amazonaws.com:8443/x", "not a storage host"),
        (b"https://bucket.s3.us-east-1.amazonaws.com/x", "not a storage host"),  # another region's
        (b"https://s3.amazonaws.com.evil.example/x", "not a storage host"),
        (b"https://evils3.amazonaws.com/x", "not a storage host"),
        (b"https://s3.amazonaws.com/x", "not a storage host"),  # "*." needs a label
        (b"https://localhost/x", "localhost"),
        (b"https://bucket.localhost/x", "localhost"),
        (b"https://LOCALHOST./x", "localhost"),
        (b"https://metadata.google.internal/x", "not a storage host"),
    ],
)
def test_other_places_are_refused(location: bytes, why: str) -> None:
    d = decide(location)
    assert isinstance(d, Refuse) and why in d.reason, d


def test_relative_locations_resolve_against_where_they_came_from() -> None:
    d = decide(b"/v2/app/blobs/other?x=1")
    assert isinstance(d, Follow) and d.origin.key == REGISTRY.key and d.target == b"/v2/app/blobs/other?x=1"
    storage = Origin("https", "bucket.s3.eu-west-1.amazonaws.com")
    d = RULES.decide(b"moved?X-Amz-Signature=s", storage, REGISTRY, 1)
    assert isinstance(d, Follow) and d.origin.key == storage.key and d.target == b"/moved?X-Amz-Signature=s"
    d = RULES.decide(b"//127.0.0.1/x", storage, REGISTRY, 1)  # scheme-relative: still a literal IP
    assert isinstance(d, Refuse)


def test_the_registry_itself_is_allowed_exactly() -> None:
    registry = Origin("http", "127.0.0.1", 5555)
    assert isinstance(RULES.decide(b"http://127.0.0.1:5555/v2/x", registry, registry, 0), Follow)
    assert isinstance(RULES.decide(b"http://127.0.0.1:5556/v2/x", registry, registry, 0), Refuse)
    assert isinstance(RULES.decide(b"https://127.0.0.1:5555/v2/x", registry, registry, 0), Refuse)


def test_explicitly_named_hosts_are_allowed_even_when_special() -> None:
    for location in (b"http://localhost:4566/bucket/x?X-Amz-Signature=1", b"http://127.0.0.1:4566/x"):
        assert isinstance(decide(location, LOCAL), Follow), location
    rules = RedirectRules(parse_patterns("[::1]:8443, 10.0.0.5, *.minio.internal:9000", "eu-west-1"))
    assert isinstance(decide(b"https://[::1]:8443/x", rules), Follow)
    assert isinstance(decide(b"https://[0:0::1]:8443/x", rules), Follow)
    assert isinstance(decide(b"https://[::1]:8444/x", rules), Refuse)
    assert isinstance(decide(b"https://10.0.0.5/x", rules), Follow)
    assert isinstance(decide(b"http://10.0.0.5/x", rules), Refuse)
    assert isinstance(decide(b"https://10.0.0.6/x", rules), Refuse)
    assert isinstance(decide(b"https://a.minio.internal:9000/x", rules), Follow)
    assert isinstance(decide(b"https://a.minio.internal/x", rules), Refuse)
    # a wildcard never lets in a localhost name or an address
    rules = RedirectRules((HostPattern("https", "*.example.com", None),))
    assert isinstance(decide(b"https://localhost.example.com/x", rules), Follow)
    assert isinstance(decide(b"https://x.localhost/x", rules), Refuse)


@pytest.mark.parametrize(
    "location",
    [b"http://localhost:9100/metrics", b"http://127.0.0.1:9100/metrics", b"http://127.0.0.1:5000/v2/",
     b"http://localhost:5000/v2/", b"http://[::1]:5000/", b"http://[::ffff:127.0.0.1]:9100/", b"http://0.0.0.0:5000/",
     b"http://localhost.:9100/", b"http://ip6-localhost:5000/"],
)
def test_the_proxys_own_listeners_are_refused_even_when_allowed(location: bytes) -> None:
    rules = RedirectRules(LOCAL.patterns + parse_patterns("http://[::1]:*, http://0.0.0.0:*, http://ip6-localhost:*",
                                                          "eu-west-1"), RULES.own)
    d = decide(location, rules)
    assert isinstance(d, Refuse) and d.reason == "the proxy's own listener", d
    # the same port on another allowed host is somebody else
    assert isinstance(decide(b"http://localhost:9101/x", rules), Follow)


def test_a_listener_on_one_interface_is_recognised_by_its_address() -> None:
    rules = RedirectRules(parse_patterns("http://10.0.0.5:*", "eu-west-1"), own=(("10.0.0.5", 9100),))
    assert isinstance(decide(b"http://10.0.0.5:9100/metrics", rules), Refuse)
    assert isinstance(decide(b"http://10.0.0.5:9000/x", rules), Follow)


def test_at_most_max_redirects_are_followed() -> None:
    for followed in range(MAX_REDIRECTS):
        assert isinstance(decide(S3, followed=followed), Follow)
    d = decide(S3, followed=MAX_REDIRECTS)
    assert isinstance(d, Refuse) and "redirects" in d.reason


def test_refusals_show_no_query_and_no_userinfo() -> None:
    d = decide(b"https://user:SECRET@evil.example/p?X-Amz-Signature=SIG&token=T#f")
    assert isinstance(d, Refuse)
    assert "SECRET" not in d.shown and "SIG" not in d.shown and "T#" not in d.shown
    assert d.shown == "https://REDACTED@evil.example/p"
    d = decide(b"http://u:SECRET@[::1?X-Amz-Signature=SIG")
    assert isinstance(d, Refuse) and "SECRET" not in d.shown and "SIG" not in d.shown
    d = decide(b"https://evil.example/" + b"a" * 5000)
    assert isinstance(d, Refuse) and len(d.shown) < 200


def test_default_patterns_follow_the_region_and_partition() -> None:
    hosts = {p.host for p in default_patterns("eu-west-1")}
    assert hosts == {"*.s3.amazonaws.com", "*.s3.eu-west-1.amazonaws.com", "s3.eu-west-1.amazonaws.com",
                     "*.s3.dualstack.eu-west-1.amazonaws.com", "s3.dualstack.eu-west-1.amazonaws.com"}
    assert all(p.scheme == "https" and p.port == 443 for p in default_patterns("eu-west-1"))
    assert "*.s3.cn-north-1.amazonaws.com.cn" in {p.host for p in default_patterns("cn-north-1")}


def test_storage_host_patterns_parse() -> None:
    assert parse_patterns("minio.example.com", "eu-west-1") == (HostPattern("https", "minio.example.com", 443),)
    assert parse_patterns("http://localhost:*", "r") == (HostPattern("http", "localhost", None),)
    assert parse_patterns("HTTP://[::1]:9000 *.Example.com:*", "r") == (
        HostPattern("http", "::1", 9000), HostPattern("https", "*.example.com", None))
    assert parse_patterns("default,default", "eu-west-1") == default_patterns("eu-west-1")
    assert parse_patterns("", "eu-west-1") == ()
    assert str(HostPattern("http", "::1", None)) == "http://[::1]:*"


@pytest.mark.parametrize(
    "spec",
    ["ftp://x.example.com", "*", "*.com", "a.*.example.com", "*.127.0.0.1", "x.example.com/path", "u@x.example.com",
     "x.example.com:0", "x.example.com:70000", "x.example.com:", "x.example.com:abc", "[::1", "[x.example.com]",
     "::1", "2130706433", "0x7f.1", "exa_mple.com", "[fe80::1%eth0]"],
)
def test_bad_storage_host_patterns_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_patterns(spec, "eu-west-1")


# -- through the proxy
@pytest.fixture
def logged():
    events: list[dict] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def _get_blob(h: Harness, location: bytes):
    proto, client = h.client()
    proto.dataReceived(b"GET " + BLOB + b" HTTP/1.1\r\nHost: h\r\n\r\n")
    conn, _ = h.upstreams.last()
    conn.dataReceived(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + location + b"\r\nContent-Length: 0\r\n\r\n")
    return client


def _refused(raw: bytes) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 "), raw[:300]
    assert b"\r\nContent-Type: application/json; charset=utf-8" in head
    err = json.loads(body)["errors"][0]
    assert (err["code"], err["message"]) == ("UNAVAILABLE", "blob storage redirect refused"), err
    return err


def _refusal_logs(events: list[dict]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if "redirect refused" in (e.get("log_format") or "")]


@pytest.mark.parametrize(
    "location",
    [
        b"http://[::1",  # malformed: was an unhandled ValueError, 500 and a traceback
        b"http://127.0.0.1:9100/metrics",
        b"http://localhost:5000/v2/",
        b"https://s3.amazonaws.com@127.0.0.1/",
        b"http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        b"http://10.0.0.1/x",
        b"http://[::ffff:10.0.0.1]/",
        b"http://2130706433/",
        b"https://evil.example.com/x",
        b"gopher://127.0.0.1:6379/_",
    ],
)
def test_a_redirect_to_a_forbidden_place_is_a_502_and_never_fetched(location: bytes, logged) -> None:
    h = Harness()
    client = _get_blob(h, location)
    _refused(client.value())
    assert [o.key for o, _, _ in h.upstreams.connections] == [UPSTREAM.key]  # only the registry was asked
    assert not [e for e in logged if e.get("log_failure") is not None], "a traceback was logged"
    assert len(_refusal_logs(logged)) == 1
    assert h.sample("ecrproxy_requests_total", {"method": "GET", "route": "blob", "status": "502"}) == 1
    h.close()


def test_a_refusal_is_logged_once_without_the_signature(logged) -> None:
    h = Harness()
    client = _get_blob(h, b"https://user:PASSWORD@evil.example.com/x?X-Amz-Signature=SIGNATURE&X-Amz-Credential=K")
    err = _refused(client.value())
    assert err["detail"] == "a URL with userinfo"
    (line,) = _refusal_logs(logged)
    assert "evil.example.com/x" in line and "/v2/app/blobs/" in line
    text = repr(logged)
    assert "SIGNATURE" not in text and "PASSWORD" not in text
    assert "SIGNATURE" not in client.value().decode() and "evil" not in client.value().decode()
    h.close()


def test_a_storage_redirect_to_a_forbidden_place_is_refused_too() -> None:
    h = Harness()
    client = _get_blob(h, S3)
    s3conn, _ = h.upstreams.last()
    s3conn.dataReceived(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9100/metrics\r\n"
                        b"Content-Length: 0\r\n\r\n")
    _refused(client.value())
    assert [o.host for o, _, _ in h.upstreams.connections] == [
        UPSTREAM.host, "prod-eu-west-1-starport-layer-bucket.s3.eu-west-1.amazonaws.com"]
    h.close()


def test_a_redirect_loop_ends_after_max_redirects() -> None:
    h = Harness()
    client = _get_blob(h, S3)
    for _ in range(MAX_REDIRECTS - 1):
        s3conn, _ = h.upstreams.last()
        s3conn.dataReceived(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + S3 + b"\r\nContent-Length: 0\r\n\r\n")
    assert client.value() == b""
    s3conn, _ = h.upstreams.last()
    s3conn.dataReceived(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + S3 + b"\r\nContent-Length: 0\r\n\r\n")
    assert _refused(client.value())["detail"] == f"more than {MAX_REDIRECTS} redirects"
    storage = [t for o, _, t in h.upstreams.connections if o.host != UPSTREAM.host]
    assert sum(t.value().count(b"GET /x/y?") for t in storage) == MAX_REDIRECTS
    h.close()


def test_storage_hosts_and_own_listeners_through_the_options() -> None:
    h = Harness(storage_hosts="http://localhost:*", metrics_port="tcp:9100:interface=127.0.0.1")
    client = _get_blob(h, b"http://localhost:9100/metrics")
    assert _refused(client.value())["detail"] == "the proxy's own listener"
    client = _get_blob(h, S3)  # the defaults are replaced
    assert _refused(client.value())["detail"] == "not a storage host (--storage-hosts)"
    client = _get_blob(h, b"http://localhost:4566/bucket/blob?X-Amz-Signature=s")
    origin, conn, transport = h.upstreams.connections[-1]
    assert origin.key == ("http", "localhost", 4566)
    assert transport.value().startswith(b"GET /bucket/blob?X-Amz-Signature=s HTTP/1.1\r\n")
    assert b"\r\nHost: localhost:4566\r\n" in transport.value()
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nblob")
    assert client.value().startswith(b"HTTP/1.1 200 OK\r\n") and client.value().endswith(b"\r\n\r\nblob")
    h.close()


def test_a_cache_fill_in_redirect_mode_follows_the_same_rules(tmp_path) -> None:
    h = Harness(ProxyConfig(upstream=UPSTREAM, blob_mode="redirect"), cache_dir=str(tmp_path / "cache"))
    client = _get_blob(h, b"http://169.254.169.254/latest/meta-data/")
    _refused(client.value())
    assert [o.key for o, _, _ in h.upstreams.connections] == [UPSTREAM.key]
    # and the next request for the blob is not stuck behind the refused fill
    client = _get_blob(h, b"http://10.0.0.1/")
    _refused(client.value())
    h.close()


def test_redirect_mode_still_hands_any_redirect_to_the_client() -> None:
    h = Harness(ProxyConfig(upstream=UPSTREAM, blob_mode="redirect"))
    client = _get_blob(h, b"http://[::1")
    assert client.value().startswith(b"HTTP/1.1 307 ")
    h.close()


# -- the option
def _options(args: list[str], env: dict[str, str] | None = None):
    from ecr_twisted.app.options import Options

    o = Options(environ=env or {})
    o.parseOptions(["--anonymous", "--region", "eu-west-1", *args])
    return o


def test_storage_hosts_option_environment_and_rules() -> None:
    from ecr_twisted.app.build import redirect_rules

    o = _options([])
    assert o.settings.storage_hosts == "default"
    assert redirect_rules(o.settings) == RedirectRules(default_patterns("eu-west-1"), (("", 5000),))
    o = _options(["--storage-hosts", "default,http://localhost:*", "--port", "tcp:5001:interface=127.0.0.1",
                  "--port", "tcp6:port=5002:interface=\\:\\:1", "--port", "unix:/tmp/x.sock",
                  "--metrics-port", "tcp:9100"])
    rules = redirect_rules(o.settings)
    assert rules.patterns == default_patterns("eu-west-1") + (HostPattern("http", "localhost", None),)
    assert rules.own == (("127.0.0.1", 5001), ("::1", 5002), ("", 9100))
    o = _options([], env={"ECRPROXY_STORAGE_HOSTS": "minio.example.com:9000"})
    assert redirect_rules(o.settings).patterns == (HostPattern("https", "minio.example.com", 9000),)


@pytest.mark.parametrize("value", ["ftp://x.example.com", "*", "localhost:abc", "http://[::1"])
def test_bad_storage_hosts_are_usage_errors(value: str) -> None:
    from twisted.python.usage import UsageError

    with pytest.raises(UsageError, match="--storage-hosts"):
        _options(["--storage-hosts", value])
