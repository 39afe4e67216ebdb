"""The htpasswd file of `--auth basic` and `--auth token`: users and their bcrypt hashes.

Its own module because it owns a file (re-read when it changes), a thread (bcrypt is slow on
purpose) and a memory of verified passwords; none of that concerns the rest of the gate.
Passwords are kept only as HMACs under a per-process key.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from collections import OrderedDict
from typing import Any, Callable

import bcrypt
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

__all__ = ["Htpasswd", "HtpasswdError", "checkpw", "parse_htpasswd"]

log = Logger()

_BCRYPT_PREFIXES = (b"$2y$", b"$2b$", b"$2a$")
_COST = re.compile(rb"\$2[aby]\$(\d\d)\$")


def _dummy_hash(cost: int) -> bytes:
    """Checked for unknown users so that "no such user" costs as much as "wrong password"."""
    return bcrypt.hashpw(b"not a password", bcrypt.gensalt(max(4, min(cost, 16))))


def checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        # bcrypt uses only the first 72 bytes (htpasswd -B and distribution cut there; bcrypt 5 refuses more)
        return bcrypt.checkpw(password[:72], hashed)
    except ValueError:
        return False


def _in_thread(password: bytes, hashed: bytes) -> Deferred[bool]:
    from twisted.internet.threads import deferToThread

    return deferToThread(checkpw, password, hashed)


class HtpasswdError(ValueError):
    """An htpasswd file that cannot be used; the message names the line, never a hash."""


def parse_htpasswd(text: str, source: str = "htpasswd") -> dict[str, bytes]:
    """user -> bcrypt hash. Other hash kinds are refused: they are too cheap to brute-force."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            raise HtpasswdError(f"{source}: line {number}: expected user:hash")
        raw = hashed.strip().encode("ascii", "replace")
        if not raw.startswith(_BCRYPT_PREFIXES):
            raise HtpasswdError(f"{source}: line {number}: user {user!r} has no bcrypt hash (use htpasswd -B)")
        users[user] = raw
    return users


class Htpasswd:
    """Users and bcrypt hashes from a file that is re-read when it changes (checked at most once a second).

    bcrypt is slow on purpose, and Basic clients send the password with every request:
    a successful check is remembered (keyed by an HMAC of the password under a per-process
    key, never the password itself) until the file changes. Hash checks run in a thread.
    """

    CACHE_SIZE = 4096

    def __init__(
        self,
        path: str,
        clock: Any,
        check: Callable[[bytes, bytes], Deferred[bool]] = _in_thread,
        stat_every: float = 1.0,
    ) -> None:
        self.path = path
        self.clock = clock
        self._check = check
        self._stat_every = stat_every
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = -1e18
        self._mac_key = secrets.token_bytes(32)
        self._good: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._dummy_cost = 0
        self._dummy = b""
        self._inflight: dict[tuple[str, bytes], list[Deferred[bool]]] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file now; raises HtpasswdError/OSError (used at start-up)."""
        st = os.stat(self.path)
        with open(self.path, encoding="utf-8") as f:
            users = parse_htpasswd(f.read(), self.path)
        self._users = users
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._good.clear()
        costs = [int(m.group(1)) for h in users.values() if (m := _COST.match(h)) is not None]
        cost = max(set(costs), key=costs.count) if costs else 10
        if cost != self._dummy_cost:
            self._dummy_cost = cost
            self._dummy = _dummy_hash(cost)

    def check_now(self) -> bool:
        """Look at the file now (SIGHUP) rather than at the next login; True if it was re-read."""
        self._checked_at = -1e18
        return self._maybe_reload()

    def _maybe_reload(self) -> bool:
        now = self.clock.seconds()
        if now - self._checked_at < self._stat_every:
            return False
        self._checked_at = now
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
                return False
            self.reload()
            log.info("re-read {path}: {n} user(s)", path=self.path, n=len(self._users))
            return True
        except (OSError, HtpasswdError, UnicodeDecodeError) as e:
            # keep the last good list: a half-written file must not lock everybody out
            log.error("cannot re-read {path}, keeping the previous users: {error}", path=self.path, error=str(e))
            return False

    def __contains__(self, user: str) -> bool:
        self._maybe_reload()
        return user in self._users

    def _key(self, user: str, pw: bytes) -> tuple[str, bytes]:
        return user, hmac.digest(self._mac_key, pw, "sha256")  # one C call: what hmac.new(...).digest() gives

    def known(self, user: str, password: str) -> bool:
        """These exact credentials were verified since the file last changed (no bcrypt needed)."""
        self._maybe_reload()
        key = self._key(user, password.encode("utf-8"))
        if key in self._good:
            self._good.move_to_end(key)
            return True
        return False

    def pending(self, user: str, password: str) -> bool:
        """A check of these exact credentials is under way (a new one would join it)."""
        return self._key(user, password.encode("utf-8")) in self._inflight

    def verify(self, user: str, password: str) -> bool | Deferred[bool]:
        """True/False now when known, else a Deferred firing with the outcome. Identical
        checks in flight share one bcrypt run (clients send several requests at once)."""
        if self.known(user, password):
            return True
        pw = password.encode("utf-8")
        key = self._key(user, pw)
        waiting = self._inflight.get(key)
        d: Deferred[bool] = Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        self._inflight[key] = [d]
        hashed = self._users.get(user)
        stamp = self._stamp

        def done(ok: Any) -> None:
            ok = ok is True and hashed is not None
            if ok and stamp == self._stamp:
                self._good[key] = None
                if len(self._good) > self.CACHE_SIZE:
                    self._good.popitem(last=False)
            for waiter in self._inflight.pop(key, []):
                waiter.callback(ok)

        check = maybeDeferred(self._check, pw, hashed if hashed is not None else self._dummy)
        check.addBoth(done)  # a failed check is a failed login, never a stuck one
        return d
