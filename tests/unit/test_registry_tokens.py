"""access/tokens.py: the proxy's own registry tokens (JWTs) and their signing key."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest

from ecr_twisted.access.tokens import Grant, TokenIssuer, load_or_create_key

KEY = b"k" * 64


def test_key_is_created_private_and_reused(tmp_path: Path) -> None:
    path = str(tmp_path / "signing.key")
    key = load_or_create_key(path)
    assert len(key) >= 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_key(path) == key
    (tmp_path / "short.key").write_text("too-short\n")
    with pytest.raises(ValueError, match="32 bytes"):
        load_or_create_key(str(tmp_path / "short.key"))


def test_issue_and_verify_round_trip() -> None:
    issuer = TokenIssuer(KEY, "registry.example", ttl=300)
    token, ttl = issuer.issue("alice", [("team/app", ["pull", "push", "pull"]), ("base", {"pull"})], now=1000.5)
    assert ttl == 300
    grant = issuer.verify(token, 1001)
    assert grant == Grant("alice", {"team/app": frozenset({"pull", "push"}), "base": frozenset({"pull"})})
    assert issuer.verify(issuer.issue(None, [], 1000)[0], 1000) == Grant(None, {})


def test_expiry_and_not_before_follow_the_given_time() -> None:
    issuer = TokenIssuer(KEY, "svc", ttl=300)
    token, _ = issuer.issue("alice", [], now=1000)
    assert issuer.verify(token, 1299.9) is not None
    assert issuer.verify(token, 1300) is None
    assert issuer.verify(token, 969) is not None and issuer.verify(token, 968.9) is None  # 30 s of skew


def forge(claims: dict[str, Any], key: bytes = KEY, **kw: Any) -> str:
    """A token signed with our key; a claim set to None is left out."""
    base = {"iss": "ecr-twisted", "aud": "svc", "sub": "alice", "iat": 1000, "exp": 2000, "access": []}
    return jwt.encode({k: v for k, v in {**base, **claims}.items() if v is not None}, key, **kw)


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_foreign_tampered_and_unsigned_tokens_are_refused() -> None:
    issuer = TokenIssuer(KEY, "svc")
    assert issuer.verify(forge({}), 1500) == Grant("alice", {})  # the forger itself is sound
    assert issuer.verify(TokenIssuer(b"o" * 64, "svc").issue("alice", [], 1000)[0], 1000) is None
    assert issuer.verify(TokenIssuer(KEY, "other-svc").issue("alice", [], 1000)[0], 1000) is None
    header, _, signature = forge({}).split(".")
    more = b64url({"iss": "ecr-twisted", "aud": "svc", "sub": "alice", "iat": 1000, "exp": 2000,
                   "access": [{"type": "repository", "name": "x", "actions": ["push"]}]})
    assert issuer.verify(f"{header}.{more}.{signature}", 1500) is None
    assert issuer.verify(f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{more}.", 1500) is None
    assert issuer.verify(forge({}, algorithm="HS384"), 1500) is None
    assert issuer.verify("not-a-jwt", 1500) is None


@pytest.mark.parametrize("claims", [{"exp": None}, {"iss": None}, {"sub": None}, {"iss": "someone-else"},
                                    {"aud": "other"}, {"exp": "2000"}, {"access": {"x": "pull"}}, {"access": None}])
def test_tokens_with_missing_or_wrong_claims_are_refused(claims: dict[str, Any]) -> None:
    assert TokenIssuer(KEY, "svc").verify(forge(claims), 1500) is None


def test_odd_access_entries_are_skipped_and_duplicates_merged() -> None:
    entries = [{"type": "repository", "name": "a", "actions": ["pull", 7]}, {"type": "registry", "name": "b",
               "actions": ["*"]}, "junk", {"type": "repository", "name": "a", "actions": ["push"]}]
    grant = TokenIssuer(KEY, "svc").verify(forge({"access": entries}), 1500)
    assert grant == Grant("alice", {"a": frozenset({"pull", "push"})})
    assert grant.permits("a", "push") and not grant.permits("a", "delete") and not grant.permits("b", "*")
