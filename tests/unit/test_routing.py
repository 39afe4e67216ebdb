"""The pure router: which upstream a name goes to, and its private, public and client names."""

from __future__ import annotations

import pytest

from ecr_twisted.access.targets import mount_source, renamed_scopes, with_mount_source
from ecr_twisted.upstreams.routing import Place, Router, bare_host
from ecr_twisted.upstreams.spec import UpstreamSpec, implicit

PROD = UpstreamSpec("prod", registry_id="111111111111", region="eu-west-1", prefix="prod")
DEEP = UpstreamSpec("deep", registry_id="222222222222", region="eu-west-1", prefix="prod/eu")
HOSTED = UpstreamSpec("mirror", "registry", url="https://mirror.example", hosts=("Mirror.Registry.Example",))
BOTH = UpstreamSpec("stage", registry_id="333333333333", region="eu-west-1", prefix="st",
                    hosts=("stage.registry.example",))
DEFAULT = UpstreamSpec("main", registry_id="444444444444", region="eu-west-1", default=True)

ROUTER = Router([PROD, DEEP, HOSTED, BOTH, DEFAULT])


@pytest.mark.parametrize(
    "host, name, expected",
    [
        # by prefix: the rest of the name is the upstream's repository
        ("registry.example", "prod/app", Place("prod", "app", "prod/app", "prod/")),
        ("registry.example", "prod/team/app", Place("prod", "team/app", "prod/team/app", "prod/")),
        # the longest prefix wins
        ("registry.example", "prod/eu/app", Place("deep", "app", "prod/eu/app", "prod/eu/")),
        # a name that is just a prefix names nothing
        ("registry.example", "prod", None),
        ("registry.example", "prod/eu", None),
        # a component is compared whole
        ("registry.example", "production/app", Place("main", "production/app", "production/app", "")),
        # by host (case and port do not matter): the whole name, public under the namespace
        ("mirror.registry.example", "library/alpine",
         Place("mirror", "library/alpine", "mirror/library/alpine", "")),
        ("MIRROR.registry.example:5000", "prod/app", Place("mirror", "prod/app", "mirror/prod/app", "")),
        ("stage.registry.example", "app", Place("stage", "app", "st/app", "")),
        ("registry.example", "st/app", Place("stage", "app", "st/app", "st/")),
        # anything else: the default upstream, whole name, public as is
        ("registry.example", "app", Place("main", "app", "app", "")),
        (None, "team/app", Place("main", "team/app", "team/app", "")),
        # a host-only upstream is reached elsewhere under its namespace (its name), as by a prefix,
        # so its public names are never also the default upstream's (review of #13: a policy for
        # mirror/* would otherwise have opened the default upstream's mirror/... repositories)
        ("registry.example", "mirror/alpine", Place("mirror", "alpine", "mirror/alpine", "mirror/")),
    ],
)
def test_resolve(host: str | None, name: str, expected: Place | None) -> None:
    assert ROUTER.resolve(host, name) == expected
    if expected is not None:
        assert expected.client == name
        assert ROUTER.canonical(host, name) == expected.public
        assert ROUTER.client_name(host, expected.public) in (name, None)


def test_no_public_name_is_two_repositories() -> None:
    """The default upstream's repositories named like another upstream's public names are out of
    reach, on its own hosts too; every public name the router gives names one (upstream, private)."""
    main_hosted = UpstreamSpec("main", registry_id="333333333333", region="us-east-1", default=True,
                               hosts=("main.registry.example",))
    r = Router([PROD, HOSTED, main_hosted])
    assert r.resolve("main.registry.example", "mirror/secret") is None
    assert r.resolve("main.registry.example", "prod/app") is None
    assert r.resolve("main.registry.example", "app") == Place("main", "app", "app", "")
    seen: dict[str, tuple[str, str]] = {}
    for host in (None, "registry.example", "mirror.registry.example", "main.registry.example"):
        for name in ("app", "x/y", "mirror/secret", "prod/app", "mirror/prod/app", "secret"):
            place = r.resolve(host, name)
            if place is not None:
                assert seen.setdefault(place.public, (place.upstream, place.private)) == (place.upstream, place.private)
    # the inverse names the upstream too
    assert r.client_name(None, "mirror/secret", "mirror") == "mirror/secret"
    assert r.client_name(None, "mirror/secret", "main") is None
    assert r.client_name("mirror.registry.example", "mirror/secret", "mirror") == "secret"


def test_without_default_unknown_names_lead_nowhere() -> None:
    r = Router([PROD, HOSTED])
    assert r.resolve("registry.example", "app") is None
    assert r.resolve("registry.example", "prod/app") == Place("prod", "app", "prod/app", "prod/")
    assert r.canonical("registry.example", "app") == "app"  # unroutable: the name itself
    assert not r.identity


def test_single_implicit_upstream_is_the_identity() -> None:
    r = Router([implicit("123456789012", "eu-west-1", None, None)])
    assert r.identity
    assert r.resolve("any.host", "prod/app") == Place("default", "prod/app", "prod/app", "")
    assert not Router([PROD]).identity
    assert not Router([HOSTED]).identity


@pytest.mark.parametrize(
    "host, public, expected",
    [
        ("registry.example", "prod/app", "prod/app"),
        ("registry.example", "prod/eu/app", "prod/eu/app"),
        ("registry.example", "app", "app"),
        ("registry.example", "st/app", "st/app"),
        ("stage.registry.example", "st/app", "app"),
        ("mirror.registry.example", "mirror/library/alpine", "library/alpine"),
        # not reachable from that host
        ("mirror.registry.example", "prod/app", None),
        # the default upstream's own repository of that name: public names collide there (a config
        # with a host-only upstream and a default one must not reuse the namespace as a repository)
        ("registry.example", "mirror/library/alpine", "mirror/library/alpine"),
    ],
)
def test_client_name(host: str, public: str, expected: str | None) -> None:
    assert ROUTER.client_name(host, public) == expected
    if expected is not None:
        assert ROUTER.canonical(host, expected) == public


def test_default_upstream_with_a_prefix() -> None:
    main = UpstreamSpec("main", prefix="main", default=True)
    r = Router([main, PROD])
    # public names of the default upstream are bare, however it was reached
    assert r.resolve("h", "main/app") == Place("main", "app", "app", "main/")
    assert r.resolve("h", "app") == Place("main", "app", "app", "")
    assert r.client_name("h", "app") == "app"
    assert r.client_name("h", "prod/app") == "prod/app"


@pytest.mark.parametrize(
    "header, host",
    [("a.example", "a.example"), ("A.Example:443", "a.example"), ("[::1]:5000", "[::1]"), ("", None), (None, None)],
)
def test_bare_host(header: str | None, host: str | None) -> None:
    assert bare_host(header) == host


# -- the request-target helpers the handler routes with (access/targets.py)


@pytest.mark.parametrize(
    "query, expected",
    [
        (b"service=s&scope=repository:lib/app:pull", b"service=s&scope=repository%3Amirror%2Flib%2Fapp%3Apull"),
        (b"scope=repository:lib/app:pull,push+repository:x:pull",
         b"scope=repository%3Amirror%2Flib%2Fapp%3Apull%2Cpush+repository%3Amirror%2Fx%3Apull"),
        (b"scope=repository:prod/app:pull", b"scope=repository:prod/app:pull"),  # unchanged: byte for byte
        (b"scope=registry:catalog:*", b"scope=registry:catalog:*"),
        (b"scope=repository:BAD:pull&service=s", b"scope=repository:BAD:pull&service=s"),
        (b"", b""),
    ],
)
def test_renamed_scopes(query: bytes, expected: bytes) -> None:
    def rename(name: str) -> str:
        return name if name.startswith("prod/") else "mirror/" + name

    assert renamed_scopes(query, rename) == expected


def test_with_mount_source_replaces_only_from() -> None:
    target = b"/v2/app/blobs/uploads/?mount=sha256:" + b"a" * 64 + b"&from=prod/base&x=1"
    out = with_mount_source(target, "base")
    assert out.startswith(b"/v2/app/blobs/uploads/?mount=sha256")
    assert mount_source(out) == "base" and out.endswith(b"&from=base&x=1")
