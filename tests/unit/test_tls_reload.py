"""The front door's certificate follows its files (issue #12): renewed in place, a new pair for new
connections; a broken pair keeps the previous one."""

from __future__ import annotations

import os
import pathlib
import shutil

from twisted.internet.task import Clock

from ecr_twisted.http.tls import ReloadingServerTLS
from ecr_twisted.testing.emulator import _make_tls_files


def _pair(where: pathlib.Path) -> tuple[bytes, bytes]:
    _, cert, key = _make_tls_files(where)
    return cert.read_bytes(), key.read_bytes()


def _install(cert: pathlib.Path, key: pathlib.Path, pair: tuple[bytes, bytes]) -> None:
    for path, data in ((cert, pair[0]), (key, pair[1])):
        path.with_suffix(".new").write_bytes(data)
        os.replace(path.with_suffix(".new"), path)


def _serial(tls: ReloadingServerTLS) -> int:
    tls.serverConnectionForTLS(None)  # what a new connection does: looks at the files
    cert = tls.options.certificate
    assert cert is not None
    return int(cert.get_serial_number())


def test_new_connections_get_the_renewed_pair_and_a_broken_one_is_refused(tmp_path: pathlib.Path) -> None:
    first, second = _pair(tmp_path / "a"), _pair(tmp_path / "b")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _install(cert, key, first)
    clock = Clock()
    tls = ReloadingServerTLS(str(cert), str(key), clock)
    original = _serial(tls)

    _install(cert, key, second)
    assert _serial(tls) == original  # looked at most once a second
    clock.advance(1)
    renewed = _serial(tls)
    assert renewed != original

    # a certificate without its key (half-way through a renewal): the previous pair stays
    cert.write_bytes(first[0])
    clock.advance(1)
    assert _serial(tls) == renewed
    assert not tls.check()  # and it is not tried again until the files change again
    key.write_bytes(first[1])
    assert tls.check() and _serial(tls) == original

    os.remove(cert)
    clock.advance(1)
    assert _serial(tls) == original  # a missing file keeps the pair too
    shutil.rmtree(tmp_path / "a")


def test_htpasswd_and_policy_files_are_looked_at_now_on_request(tmp_path: pathlib.Path) -> None:
    """What SIGHUP calls: the files are read at once, not at the next stat a second later."""
    import bcrypt

    from ecr_twisted.access.htpasswd import Htpasswd
    from ecr_twisted.access.policy import PolicyFile

    clock = Clock()
    users = tmp_path / "users"
    users.write_bytes(b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) + b"\n")
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nprincipals = ["anonymous"]\nrepositories = ["*"]\nactions = ["pull"]\n')
    h, p = Htpasswd(str(users), clock), PolicyFile(str(policy), clock)
    assert "bob" not in h and not h.check_now() and not p.check_now()  # unchanged: nothing re-read
    users.write_bytes(users.read_bytes() + b"bob:" + bcrypt.hashpw(b"pw2", bcrypt.gensalt(4)) + b"\n")
    policy.write_text('[[rule]]\nprincipals = ["anonymous"]\nrepositories = ["*"]\nactions = ["pull", "push"]\n')
    assert h.check_now() and "bob" in h
    before = p.policy
    assert p.check_now() and p.policy is not before
    policy.write_text("not toml [")
    assert not p.check_now() and p.policy is not before  # a bad file keeps the last good policy
