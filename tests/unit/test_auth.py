"""auth.py: credential parsing, htpasswd, login throttling, our own JWTs and the webhook, on a task.Clock."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import jwt
import pytest
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ecr_twisted.access.auth import (
    Credentials, Grant, Htpasswd, HtpasswdError, LoginThrottle, TokenIssuer, WebhookAuthorizer,
    load_or_create_key, parse_authorization, parse_htpasswd,
)
from ecr_twisted.testing.doubles import synchronous_bcrypt, write_htpasswd

KEY = b"k" * 64


def basic(text: bytes) -> bytes:
    return b"Basic " + base64.b64encode(text)


def result_of(value: Any) -> Any:
    """The outcome of a value-or-Deferred that has already fired (fails the test if it has not)."""
    out: list[Any] = []
    maybeDeferred(lambda: value).addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


# -- parse_authorization
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


# -- parse_htpasswd
def test_parse_htpasswd_skips_comments_and_blank_lines() -> None:
    text = "# users\n\n  alice:$2y$05$abc  \nbob:$2b$05$def\n   # indented comment\n"
    assert parse_htpasswd(text) == {"alice": b"$2y$05$abc", "bob": b"$2b$05$def"}


def test_non_bcrypt_hash_is_refused_without_echoing_it() -> None:
    with pytest.raises(HtpasswdError) as e:
        parse_htpasswd("alice:$2b$05$abc\nbob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "users.htpasswd")
    message = str(e.value)
    assert "users.htpasswd" in message and "line 2" in message and "'bob'" in message
    assert "W6ph5Mm5" not in message and "{SHA}" not in message


@pytest.mark.parametrize("line", ["no colon here", ":$2b$05$abc"])
def test_malformed_htpasswd_line_is_refused(line: str) -> None:
    with pytest.raises(HtpasswdError, match="line 1: expected user:hash"):
        parse_htpasswd(line)


# -- Htpasswd
class CountingCheck:
    """A real bcrypt check that records which hashes it was asked about."""

    def __init__(self) -> None:
        self.hashes: list[bytes] = []

    def __call__(self, password: bytes, hashed: bytes) -> Deferred[bool]:
        self.hashes.append(hashed)
        return synchronous_bcrypt(password, hashed)


def replace(path: Path, users: dict[str, str], mtime: int) -> None:
    """Rewrite the file with a distinct mtime, so the change is seen whatever the fs granularity."""
    write_htpasswd(str(path), users)
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    replace(path, {"alice": "right", "bob": "bobpw"}, 1_000_000)
    return path


def test_verify_right_wrong_and_unknown(users_file: Path) -> None:
    check = CountingCheck()
    users = Htpasswd(str(users_file), Clock(), check=check)
    assert result_of(users.verify("alice", "right")) is True
    assert result_of(users.verify("alice", "wrong")) is False
    assert result_of(users.verify("nobody", "right")) is False
    assert len(check.hashes) == 3  # unknown users are checked too, so timing does not tell them apart
    assert check.hashes[2].startswith(b"$2") and check.hashes[2] not in parse_htpasswd(users_file.read_text()).values()
    assert "alice" in users and "nobody" not in users


def test_unknown_user_fails_even_if_the_check_says_yes(users_file: Path) -> None:
    users = Htpasswd(str(users_file), Clock(), check=lambda pw, h: succeed(True))
    assert result_of(users.verify("nobody", "anything")) is False


def test_success_is_cached_but_failure_is_not(users_file: Path) -> None:
    check = CountingCheck()
    users = Htpasswd(str(users_file), Clock(), check=check)
    assert result_of(users.verify("alice", "right")) is True
    assert users.verify("alice", "right") is True  # plain bool: no bcrypt, no thread
    assert len(check.hashes) == 1
    result_of(users.verify("alice", "wrong"))
    result_of(users.verify("alice", "wrong"))
    assert len(check.hashes) == 3


def test_apache_2y_hashes_verify(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    write_htpasswd(str(path), {"carol": "pw"})
    path.write_text(path.read_text().replace("$2b$", "$2y$"))
    assert path.read_text().startswith("carol:$2y$")
    users = Htpasswd(str(path), Clock(), check=synchronous_bcrypt)
    assert result_of(users.verify("carol", "pw")) is True
    assert result_of(users.verify("carol", "nope")) is False


def test_long_passwords_count_up_to_72_bytes_like_htpasswd(tmp_path: Path) -> None:
    """htpasswd -B and distribution look at 72 bytes; bcrypt 5 raises on more, which must not lock users out."""
    path = tmp_path / "htpasswd"
    long = "x" * 72
    write_htpasswd(str(path), {"dave": long[:72]})
    users = Htpasswd(str(path), Clock(), check=synchronous_bcrypt)
    assert result_of(users.verify("dave", long + "-anything-after-72")) is True
    assert result_of(users.verify("dave", "x" * 71)) is False


def test_unknown_users_cost_what_the_file_costs(tmp_path: Path) -> None:
    """The dummy hash checked for unknown users has the file's bcrypt cost (timing hides who exists)."""
    path = tmp_path / "htpasswd"
    write_htpasswd(str(path), {"erin": "pw"}, cost=6)
    check = CountingCheck()
    users = Htpasswd(str(path), Clock(), check=check)
    result_of(users.verify("nobody", "pw"))
    assert check.hashes[0].startswith(b"$2b$06$")


def test_file_is_reread_at_most_once_a_second(users_file: Path) -> None:
    clock = Clock()
    users = Htpasswd(str(users_file), clock, check=synchronous_bcrypt)
    assert "dave" not in users  # this look stats the file at t=0
    replace(users_file, {"alice": "right", "bob": "bobpw", "dave": "new"}, 1_000_100)
    clock.advance(0.999)
    assert "dave" not in users
    clock.advance(0.001)
    assert "dave" in users
    assert result_of(users.verify("dave", "new")) is True


def test_removing_a_user_revokes_a_cached_success(users_file: Path) -> None:
    clock = Clock()
    check = CountingCheck()
    users = Htpasswd(str(users_file), clock, check=check)
    assert result_of(users.verify("bob", "bobpw")) is True
    assert users.verify("bob", "bobpw") is True
    replace(users_file, {"alice": "right"}, 1_000_100)
    clock.advance(1)
    assert result_of(users.verify("bob", "bobpw")) is False


def test_success_from_before_a_reload_is_not_cached(users_file: Path) -> None:
    clock = Clock()
    pending: list[Deferred[bool]] = []

    def held(password: bytes, hashed: bytes) -> Deferred[bool]:
        pending.append(Deferred())
        return pending[-1]

    users = Htpasswd(str(users_file), clock, check=held)
    answer = users.verify("alice", "right")
    replace(users_file, {"alice": "changed"}, 1_000_100)
    clock.advance(1)
    assert "alice" in users  # reloads
    pending[0].callback(True)
    assert result_of(answer) is True
    assert isinstance(users.verify("alice", "right"), Deferred)  # checked again against the new hash


def test_broken_or_missing_file_keeps_the_previous_users(users_file: Path) -> None:
    clock = Clock()
    users = Htpasswd(str(users_file), clock, check=synchronous_bcrypt)
    users_file.write_text("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    os.utime(users_file, ns=(2 * 10**18, 2 * 10**18))
    clock.advance(1)
    assert "bob" in users and result_of(users.verify("alice", "right")) is True
    users_file.unlink()
    clock.advance(1)
    assert result_of(users.verify("bob", "bobpw")) is True
    replace(users_file, {"erin": "pw"}, 1_000_200)  # fixed: picked up on the next look
    clock.advance(1)
    assert "erin" in users and "bob" not in users


def test_unreadable_file_at_startup_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Htpasswd(str(tmp_path / "absent"), Clock(), check=synchronous_bcrypt)
    (tmp_path / "bad").write_text("alice:plaintext\n")
    with pytest.raises(HtpasswdError):
        Htpasswd(str(tmp_path / "bad"), Clock(), check=synchronous_bcrypt)


# -- LoginThrottle
def test_free_failures_then_doubling_penalty_capped() -> None:
    t = LoginThrottle(free=3, window=100, max_penalty=8)
    for _ in range(2):
        t.failed("1.2.3.4", 10)
    assert t.wait("1.2.3.4", 10) == 0
    t.failed("1.2.3.4", 10)
    assert t.wait("1.2.3.4", 10) == 1 and t.wait("1.2.3.4", 10.25) == 0.75 and t.wait("1.2.3.4", 11) == 0
    penalties = []
    for _ in range(5):
        t.failed("1.2.3.4", 20)
        penalties.append(t.wait("1.2.3.4", 20))
    assert penalties == [2, 4, 8, 8, 8]
    assert t.wait("5.6.7.8", 20) == 0  # other addresses are unaffected


def test_penalty_stays_capped_however_many_failures() -> None:
    # a patient guesser gets one try per max_penalty and never lets the window lapse
    t = LoginThrottle(free=5, window=900, max_penalty=60)
    for _ in range(1100):
        t.failed("1.2.3.4", 0)
    assert t.wait("1.2.3.4", 0) == 60


def test_failures_decay_after_the_window_and_a_success_takes_back_one() -> None:
    t = LoginThrottle(free=1, window=100, max_penalty=60)
    t.failed("a", 0)
    t.failed("a", 0)
    assert t.wait("a", 100) == 0 and t.wait("a", 1) == 1  # expired penalty, record still there
    assert t.wait("a", 100.5) == 0
    t.failed("a", 100.5)
    assert t.wait("a", 100.5) == 1  # counted from one again, not three
    t.failed("b", 0)
    t.failed("b", 50)
    t.failed("b", 151)  # more than `window` after the last failure: starts over
    assert t.wait("b", 151) == 1
    t.forgive("b")
    assert t.wait("b", 151) == 0  # one failure left: under `free` again
    t.failed("c", 0)
    t.failed("c", 0)
    t.failed("c", 0)
    t.forgive("c")  # logging in with one's own account does not wipe guesses at another's
    assert t.wait("c", 0) == 2


def test_size_bound_evicts_the_least_recent_failure() -> None:
    t = LoginThrottle(free=1, window=100, max_penalty=60, size=2)
    t.failed("a", 0)
    t.failed("b", 0)
    t.failed("a", 0)  # a is now the most recent
    t.failed("c", 0)
    assert (t.wait("a", 0), t.wait("b", 0), t.wait("c", 0)) == (2, 0, 1)


# -- TokenIssuer
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


# -- WebhookAuthorizer
class FakePost:
    """The webhook transport: records bodies, hands out Deferreds the test fires."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.calls: list[Deferred[tuple[int, bytes]]] = []

    def __call__(self, body: bytes) -> Deferred[tuple[int, bytes]]:
        self.bodies.append(json.loads(body))
        self.calls.append(Deferred())
        return self.calls[-1]


def webhook(clock: Clock, ttl: float = 60) -> tuple[WebhookAuthorizer, FakePost, list[str]]:
    post, errors = FakePost(), []
    return WebhookAuthorizer(post, clock, ttl=ttl, on_error=errors.append), post, errors


ALICE = Credentials("basic", "alice", "pw1")


@pytest.mark.parametrize("answer, verdict", [
    ({"allow": True}, "allow"), ({"allow": False}, "deny"),
    ({"allow": False, "authenticated": False}, "unauthenticated"), ({"allow": True, "authenticated": False}, "allow"),
])
def test_verdicts(answer: dict[str, Any], verdict: str) -> None:
    authz, post, errors = webhook(Clock())
    d = authz.decide(ALICE, "pull", "team/app", "v1")
    post.calls[0].callback((200, json.dumps(answer).encode()))
    assert result_of(d) == verdict and errors == []


@pytest.mark.parametrize("outcome", [(500, b'{"allow": true}'), (200, b"not json"), (200, b'{"deny": true}'),
                                     (200, b'{"allow": "yes"}'), (200, b"[true]"), Failure(ConnectionRefusedError("webhook.local"))])
def test_unusable_answers_are_unavailable_and_not_cached(outcome: Any) -> None:
    authz, post, errors = webhook(Clock())
    d = authz.decide(ALICE, "pull", "team/app", None)
    post.calls[0].callback(outcome) if isinstance(outcome, tuple) else post.calls[0].errback(outcome)
    assert result_of(d) == "unavailable" and len(errors) == 1
    again = authz.decide(ALICE, "pull", "team/app", None)
    assert isinstance(again, Deferred) and len(post.calls) == 2  # asked again, not remembered


def test_deeply_nested_answer_is_unavailable_not_stuck() -> None:
    """A webhook answering 64 KiB of "[" (http_post's bound) must not wedge the question forever."""
    authz, post, errors = webhook(Clock())
    d = authz.decide(ALICE, "pull", "team/app", None)
    post.calls[0].callback((200, b"[" * 65536))
    assert result_of(d) == "unavailable" and len(errors) == 1
    authz.decide(ALICE, "pull", "team/app", None)
    assert len(post.calls) == 2  # not left waiting on the dead call


def test_answers_are_cached_for_ttl() -> None:
    clock = Clock()
    authz, post, _ = webhook(clock, ttl=30)
    d = authz.decide(ALICE, "push", "team/app", "v1")
    clock.advance(5)
    post.calls[0].callback((200, b'{"allow": true}'))
    assert result_of(d) == "allow"
    clock.advance(29.9)
    assert authz.decide(ALICE, "push", "team/app", "v1") == "allow" and len(post.calls) == 1
    clock.advance(0.1)  # ttl counts from the answer, not the question
    assert isinstance(authz.decide(ALICE, "push", "team/app", "v1"), Deferred) and len(post.calls) == 2


def test_concurrent_identical_questions_share_one_post() -> None:
    authz, post, _ = webhook(Clock())
    first, second = authz.decide(ALICE, "pull", "r", "t"), authz.decide(ALICE, "pull", "r", "t")
    other = authz.decide(ALICE, "pull", "r", "other-tag")
    assert len(post.calls) == 2
    post.calls[0].callback((200, b'{"allow": false}'))
    assert (result_of(first), result_of(second)) == ("deny", "deny")
    assert not other.called


def test_question_body_and_cache_key_cover_the_secret() -> None:
    authz, post, _ = webhook(Clock())
    authz.decide(ALICE, "pull", "team/app", "v1")
    authz.decide(Credentials("basic", "alice", "pw2"), "pull", "team/app", "v1")
    authz.decide(parse_authorization(b"Bearer tok.en"), "delete", "team/app", None)
    assert post.bodies == [
        {"user": "alice", "password": "pw1", "action": "pull", "repository": "team/app", "tag": "v1"},
        {"user": "alice", "password": "pw2", "action": "pull", "repository": "team/app", "tag": "v1"},
        {"user": None, "token": "tok.en", "action": "delete", "repository": "team/app", "tag": None},
    ]
    post.calls[0].callback((200, b'{"allow": true}'))
    post.calls[1].callback((200, b'{"allow": false}'))
    assert authz.decide(Credentials("basic", "alice", "pw2"), "pull", "team/app", "v1") == "deny"
    assert authz.decide(ALICE, "pull", "team/app", "v1") == "allow"
