import pytest

from ecr_twisted.registry import routes

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "method,path,kind,name",
    [
        (b"GET", b"/v2/", routes.BASE, None),
        (b"HEAD", b"/v2/", routes.BASE, None),
        (b"GET", b"/v2/_catalog", routes.CATALOG, None),
        (b"GET", b"/v2/team/app/tags/list", routes.TAGS, "team/app"),
        (b"HEAD", b"/v2/app/manifests/1.2", routes.MANIFEST, "app"),
        (b"PUT", b"/v2/app/manifests/" + D.encode(), routes.MANIFEST, "app"),
        (b"DELETE", b"/v2/a.b/manifests/latest", routes.MANIFEST, "a.b"),
        (b"GET", b"/v2/app/blobs/" + D.encode(), routes.BLOB, "app"),
        (b"POST", b"/v2/a__b/blobs/uploads/", routes.UPLOAD, "a__b"),
        (b"PATCH", b"/v2/a-b/blobs/uploads/0a1b-2c", routes.UPLOAD, "a-b"),
        (b"GET", b"/v2/app/referrers/" + D.encode(), routes.REFERRERS, "app"),
    ],
)
def test_known_routes(method: bytes, path: bytes, kind: str, name: str | None) -> None:
    m = routes.match(method, path)
    assert m.error is None and m.route is not None
    assert m.route.kind == kind and m.name == name


def test_reference_and_digest_are_captured() -> None:
    assert routes.match(b"GET", b"/v2/app/manifests/1.2").reference == "1.2"
    assert routes.match(b"GET", b"/v2/app/blobs/" + D.encode()).digest == D


@pytest.mark.parametrize(
    "method,path,error",
    [
        (b"GET", b"/", "not_found"),
        (b"GET", b"/v1/x", "not_found"),
        (b"GET", b"/v2", "not_found"),
        (b"GET", b"/v2/app/blobs/notadigest", "not_found"),
        (b"GET", b"/v2/../etc/manifests/x", "name"),
        (b"GET", b"/v2/App/manifests/x", "name"),
        (b"GET", b"/v2/a//b/manifests/x", "name"),
        (b"GET", b"/v2/a%2Fb/manifests/x", "name"),
        (b"GET", b"/v2/-a/manifests/x", "name"),
        (b"POST", b"/v2/app/manifests/x", "method"),
        (b"PUT", b"/v2/app/blobs/" + D.encode(), "method"),
        (b"GET", b"/v2/" + b"a" * 256 + b"/tags/list", "name"),
    ],
)
def test_refused_paths(method: bytes, path: bytes, error: str) -> None:
    assert routes.match(method, path).error == error
