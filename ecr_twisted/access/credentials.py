"""What a client's `Authorization` header says, parsed once and the same way in every mode.

Kept apart from the checks (htpasswd, tokens, webhook) because every mode reads the header
but each checks it differently. Secrets never appear in a `Credentials` repr.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

__all__ = ["NO_CREDENTIALS", "Credentials", "parse_authorization"]


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
    """The credentials in an Authorization value (`NO_CREDENTIALS` for none or empty Basic ones)."""
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
