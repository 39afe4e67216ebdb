"""Who is asking: client credentials, the htpasswd file, login throttling, the proxy's own
registry tokens (JWT) and the authorization webhook.

Nothing here knows about HTTP exchanges; `access.py` puts these parts together per request.
Secrets (passwords, tokens) never leave this module in logs or reprs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import stat
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import bcrypt
import jwt
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.iweb import UNKNOWN_LENGTH

log = Logger()


# -- credentials on the wire
@dataclass(frozen=True)
class Credentials:
    """What the client's Authorization header says; `secret` is a password or a bearer token."""

    scheme: str  # "none", "basic", "bearer" or "invalid"
    user: str | None = None
    secret: str | None = field(default=None, repr=False)
    raw: bytes | None = field(default=None, repr=False)  # the header as sent (passthrough)


NO_CREDENTIALS = Credentials("none")
_INVALID = Credentials("invalid")
_MAX_AUTH = 16384  # ECR passwords reach ~5 KB; anything far beyond is not a credential


def parse_authorization(value: bytes | None) -> Credentials:
    if not value:
        return NO_CREDENTIALS
    if len(value) > _MAX_AUTH:
        return _INVALID
    scheme, _, rest = value.strip().partition(b" ")
    scheme = scheme.lower()
    rest = rest.strip()
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return _INVALID
        user, colon, password = decoded.partition(":")
        if decoded == ":":
            # `Basic Og==`: what skopeo, podman and buildah send when they hold no credentials
            # for a registry that challenged with Basic. Anonymous, not a failed login.
            return NO_CREDENTIALS
        if not colon or not user:
            return _INVALID
        return Credentials("basic", user, password, value)
    if scheme == b"bearer" and rest:
        try:
            return Credentials("bearer", None, rest.decode("ascii"), value)
        except UnicodeDecodeError:
            return _INVALID
    return _INVALID


# -- htpasswd
_BCRYPT_PREFIXES = (b"$2y$", b"$2b$", b"$2a$")
_COST = re.compile(rb"\$2[aby]\$(\d\d)\$")


def _dummy_hash(cost: int) -> bytes:
    """Checked for unknown users so that "no such user" costs as much as "wrong password"."""
    return bcrypt.hashpw(b"not a password", bcrypt.gensalt(max(4, min(cost, 16))))


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        # bcrypt uses only the first 72 bytes (htpasswd -B and distribution cut there; bcrypt 5 refuses more)
        return bcrypt.checkpw(password[:72], hashed)
    except ValueError:
        return False


def _in_thread(password: bytes, hashed: bytes) -> Deferred[bool]:
    from twisted.internet.threads import deferToThread

    return deferToThread(_checkpw, password, hashed)


class HtpasswdError(ValueError):
    pass


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

    def _maybe_reload(self) -> None:
        now = self.clock.seconds()
        if now - self._checked_at < self._stat_every:
            return
        self._checked_at = now
        try:
            st = os.stat(self.path)
            if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
                return
            self.reload()
            log.info("re-read {path}: {n} user(s)", path=self.path, n=len(self._users))
        except (OSError, HtpasswdError, UnicodeDecodeError) as e:
            # keep the last good list: a half-written file must not lock everybody out
            log.error("cannot re-read {path}, keeping the previous users: {error}", path=self.path, error=str(e))

    def __contains__(self, user: str) -> bool:
        self._maybe_reload()
        return user in self._users

    def _key(self, user: str, pw: bytes) -> tuple[str, bytes]:
        return user, hmac.new(self._mac_key, pw, hashlib.sha256).digest()

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


# -- failed-login throttle
class LoginThrottle:
    """Slows down guessing: after `free` failed logins from one address within `window` seconds,
    that address's credentials are not even checked for a penalty that doubles with each further
    failure (capped), and it is told to come back later. A check counts as a failure from the
    moment it starts (so parallel guesses count too) and is forgiven if it succeeds."""

    def __init__(self, free: int = 5, window: float = 900.0, max_penalty: float = 60.0, size: int = 65536) -> None:
        self.free = free
        self.window = window
        self.max_penalty = max_penalty
        self.size = size
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # addr -> (count, last failure)

    def wait(self, addr: str, now: float) -> float:
        """Seconds this address must still wait before its credentials are checked (0: go ahead)."""
        entry = self._failures.get(addr)
        if entry is None:
            return 0.0
        count, last = entry
        if now - last > self.window:
            del self._failures[addr]
            return 0.0
        if count < self.free:
            return 0.0
        penalty = min(self.max_penalty, 2.0 ** min(count - self.free, 63))
        return max(0.0, last + penalty - now)

    def failed(self, addr: str, now: float) -> None:
        count, last = self._failures.pop(addr, (0, now))
        if now - last > self.window:
            count = 0
        self._failures[addr] = (count + 1, now)
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)

    def attempt(self, addr: str, now: float) -> None:
        """A check starts: it counts as a failure until it turns out right (`forgive`) or
        wrong (`confirm`), so guesses sent in parallel are counted before bcrypt runs."""
        count, last = self._failures.pop(addr, (0, now))
        if now - last > self.window:
            count, last = 0, now
        self._failures[addr] = (count + 1, last)
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)

    def confirm(self, addr: str, now: float) -> None:
        """The check counted by `attempt` failed: the penalty runs from now."""
        entry = self._failures.get(addr)
        if entry is not None:
            self._failures[addr] = (entry[0], now)
        else:
            self.failed(addr, now)

    def forgive(self, addr: str) -> None:
        """Take back one failure: a check counted as failed up front turned out right. (Not a reset:
        logging in with one's own account must not wipe the count of guesses at another's.)"""
        entry = self._failures.get(addr)
        if entry is not None:
            if entry[0] <= 1:
                del self._failures[addr]
            else:
                self._failures[addr] = (entry[0] - 1, entry[1])


# -- the proxy's own registry tokens
@dataclass(frozen=True)
class Grant:
    """What a verified token allows: the subject (None: anonymous) and repository -> actions."""

    user: str | None
    access: dict[str, frozenset[str]]

    def permits(self, repository: str, action: str) -> bool:
        return action in self.access.get(repository, ())


def load_or_create_key(path: str) -> bytes:
    """The token signing key from `path`; a new random key is written there (mode 0600) if absent."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")
        log.info("wrote a new token signing key to {path}", path=path)
    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn("{path} can be read by other users; chmod 600 it", path=path)
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < 32:
        raise ValueError(f"{path}: a signing key needs at least 32 bytes")
    return key


class TokenIssuer:
    """Short-lived HS256 JWTs in the shape Docker's token spec uses (`access` claims).

    HMAC, not RSA: the proxy is the only party that verifies its tokens, so there is no
    public key to publish and a symmetric key keeps verification cheap on every request."""

    ISSUER = "ecr-twisted"

    def __init__(self, key: bytes, service: str, ttl: int = 300) -> None:
        self._key = key
        self.service = service
        self.ttl = ttl

    def issue(self, user: str | None, access: Iterable[tuple[str, Iterable[str]]], now: float) -> tuple[str, int]:
        iat = int(now)
        claims = {
            "iss": self.ISSUER,
            "aud": self.service,
            "sub": user or "",
            "iat": iat,
            "nbf": iat - 1,
            "exp": iat + self.ttl,
            "jti": secrets.token_urlsafe(12),
            "access": [{"type": "repository", "name": name, "actions": sorted(set(actions))} for name, actions in access],
        }
        return jwt.encode(claims, self._key, algorithm="HS256"), self.ttl

    def verify(self, token: str, now: float) -> Grant | None:
        """The grant of a genuine, current token of ours; None for anything else."""
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                audience=self.service,
                issuer=self.ISSUER,
                # expiry is checked below against the injected clock, not the wall clock
                options={"require": ["exp", "iat", "aud", "iss", "sub"], "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False},
            )
        except jwt.PyJWTError:
            return None
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if not isinstance(exp, int) or not isinstance(nbf, int) or now >= exp or now < nbf - 30:
            return None
        access: dict[str, frozenset[str]] = {}
        entries = claims.get("access")
        if not isinstance(entries, list):
            return None
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("type") != "repository":
                continue
            name, actions = entry.get("name"), entry.get("actions")
            if isinstance(name, str) and isinstance(actions, list):
                access[name] = access.get(name, frozenset()) | frozenset(a for a in actions if isinstance(a, str))
        sub = claims["sub"]
        return Grant(sub if isinstance(sub, str) and sub else None, access)


# -- webhook
ALLOW, DENY, UNAUTHENTICATED, UNAVAILABLE = "allow", "deny", "unauthenticated", "unavailable"


class WebhookAuthorizer:
    """Asks an operator's HTTP service, caches its answers briefly, and denies when it cannot be asked.

    `post(body)` sends the JSON body and fires with (status, response body). The cache key is an
    HMAC over the whole question, so neither passwords nor tokens are kept in memory in clear."""

    def __init__(
        self,
        post: Callable[[bytes], Deferred[tuple[int, bytes]]],
        clock: Any,
        ttl: float = 60.0,
        on_error: Callable[[str], None] | None = None,
        size: int = 16384,
    ) -> None:
        self._post = post
        self.clock = clock
        self.ttl = ttl
        self._on_error = on_error
        self._size = size
        self._mac_key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._inflight: dict[bytes, list[Deferred[str]]] = {}

    def decide(self, creds: Credentials, action: str, repository: str, tag: str | None) -> str | Deferred[str]:
        question = {
            "user": creds.user,
            "password" if creds.scheme == "basic" else "token": creds.secret,
            "action": action,
            "repository": repository,
            "tag": tag,
        }
        body = json.dumps(question, separators=(",", ":"), sort_keys=True).encode()
        key = hmac.new(self._mac_key, body, hashlib.sha256).digest()
        now = self.clock.seconds()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[1] > now:
                return hit[0]
            del self._cache[key]
        waiting = self._inflight.get(key)
        d: Deferred[str] = Deferred()
        if waiting is not None:
            waiting.append(d)  # one webhook call per question, however many ask at once
            return d
        self._inflight[key] = [d]
        call = maybeDeferred(self._post, body)
        # _failed also catches a bug in _answered: no question may be left waiting
        call.addCallback(self._answered, key).addErrback(self._failed, key)
        return d

    def _answered(self, result: tuple[int, bytes], key: bytes) -> None:
        status, body = result
        verdict: str | None = None
        if status == 200:
            try:
                answer = json.loads(body)
            except (ValueError, RecursionError):
                answer = None
            if isinstance(answer, dict) and isinstance(answer.get("allow"), bool):
                if answer["allow"]:
                    verdict = ALLOW
                elif answer.get("authenticated") is False:
                    verdict = UNAUTHENTICATED
                else:
                    verdict = DENY
        if verdict is None:
            return self._settle(key, UNAVAILABLE, f"webhook answered status {status} without a usable verdict")
        self._cache[key] = (verdict, self.clock.seconds() + self.ttl)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)
        self._settle(key, verdict, None)

    def _failed(self, reason: Any, key: bytes) -> None:
        self._settle(key, UNAVAILABLE, f"webhook unreachable: {reason.getErrorMessage()}")

    def _settle(self, key: bytes, verdict: str, problem: str | None) -> None:
        if problem is not None:
            log.error("authorization webhook failed, denying: {problem}", problem=problem)
            if self._on_error is not None:
                self._on_error(problem)
        for d in self._inflight.pop(key, []):
            d.callback(verdict)


def http_post(agent: Any, reactor: Any, url: str, timeout: float, max_body: int = 65536) -> Callable[[bytes], Deferred[tuple[int, bytes]]]:
    """A `post` for WebhookAuthorizer over a Twisted Agent, with a deadline and a bounded answer."""
    from twisted.web.client import FileBodyProducer, readBody
    from twisted.web.http_headers import Headers

    headers = Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"ecr-twisted"]})
    target = url.encode("ascii")

    def got(response: Any) -> Deferred[tuple[int, bytes]]:
        if response.length not in (None, UNKNOWN_LENGTH) and response.length > max_body:
            response.deliverBody(_Discard())
            return succeed((502, b""))
        return readBody(response).addCallback(lambda data: (response.code, data))

    def post(body: bytes) -> Deferred[tuple[int, bytes]]:
        d = agent.request(b"POST", target, headers, FileBodyProducer(io.BytesIO(body)))
        d.addCallback(got)
        d.addTimeout(timeout, reactor)
        return d

    return post


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()
