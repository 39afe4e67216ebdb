"""access/htpasswd.py: the htpasswd file, its bcrypt checks and what it remembers, on a task.Clock."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from ecr_twisted.access.htpasswd import Htpasswd, HtpasswdError, parse_htpasswd
from ecr_twisted.testing.doubles import synchronous_bcrypt, write_htpasswd


def result_of(value: Any) -> Any:
    """The outcome of a value-or-Deferred that has already fired (fails the test if it has not)."""
    out: list[Any] = []
    maybeDeferred(lambda: value).addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


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
