"""The proxy's own registry tokens (JWTs) for the token flow of `--auth token` and `--auth basic`.

Not ECR's tokens (those are `ecr_twisted.ecr.tokens`): these are what `/token` hands to clients
and what their `Bearer` headers carry back. Its own module because it owns the signing key and
the claim format; which scopes go into a token is the gate's (policy) business.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from typing import Iterable

import jwt
from twisted.logger import Logger

__all__ = ["Grant", "TokenIssuer", "load_or_create_key"]

log = Logger()


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
        """A signed token for `user` (None: anonymous) with these repository scopes, and its lifetime."""
        iat = int(now)
        claims = {
            "iss": self.ISSUER,
            "aud": self.service,
            "sub": user or "",
            "iat": iat,
            "nbf": iat - 1,
            "exp": iat + self.ttl,
            "jti": secrets.token_urlsafe(12),
            "access": [
                {"type": "repository", "name": name, "actions": sorted(set(actions))} for name, actions in access
            ],
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
