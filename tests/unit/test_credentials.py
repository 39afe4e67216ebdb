"""access/credentials.py: what an Authorization header says."""

from __future__ import annotations

import base64

import pytest

from ecr_twisted.access.credentials import parse_authorization


def basic(text: bytes) -> bytes:
    return b"Basic " + base64.b64encode(text)


def test_basic_splits_at_the_first_colon_only() -> None:
    header = basic(b"alice:pa:ss:word")
    creds = parse_authorization(header)
    assert (creds.scheme, creds.user, creds.secret, creds.raw) == ("basic", "alice", "pa:ss:word", header)
    assert parse_authorization(basic(b"bob:")).secret == ""  # an empty password is still a credential
    assert parse_authorization(b"basic " + base64.b64encode(b"u:p")).user == "u"  # scheme is case-insensitive


@pytest.mark.parametrize("header", [
    b"Basic not*base64!", b"Basic " + base64.b64encode(b"nocolon"), basic(b":password"),
    basic(b"\xff\xfe:password"), b"Bearer", b"Bearer \xc3\xa9t\xc3\xa9", b"Digest abc", b"garbage",
    basic(b"alice:" + b"p" * 16400),
])
def test_malformed_or_unknown_headers_are_invalid(header: bytes) -> None:
    assert parse_authorization(header).scheme == "invalid"


def test_header_size_limit_is_16_kib() -> None:
    at_limit = b"Bearer " + b"t" * (16384 - 7)
    assert parse_authorization(at_limit).scheme == "bearer"
    assert parse_authorization(at_limit + b"t").scheme == "invalid"


def test_bearer_keeps_the_token_and_no_header_is_none() -> None:
    creds = parse_authorization(b"Bearer abc.def.ghi")
    assert (creds.scheme, creds.user, creds.secret) == ("bearer", None, "abc.def.ghi")
    assert parse_authorization(None).scheme == parse_authorization(b"").scheme == "none"


def test_repr_never_shows_secrets() -> None:
    for creds in (parse_authorization(basic(b"alice:hunter2-secret")), parse_authorization(b"Bearer tok-SECRET")):
        text = repr(creds)
        assert "hunter2" not in text and "SECRET" not in text and "aHVudGVy" not in text
    assert "alice" in repr(parse_authorization(basic(b"alice:x")))
