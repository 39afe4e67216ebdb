"""Registry errors, declared once, and the one function that writes the error envelope.

Every refusal the proxy makes itself (routing, the gate, the cache, upstream failures) names one
of these, so a client always gets distribution's `{"errors":[...]}` shape with a stable code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = [
    "RegistryError", "JSON_FIELDS", "envelope",
    "NOT_FOUND", "UNSUPPORTED", "NAME_INVALID", "BLOB_UNKNOWN", "RANGE_INVALID", "NAME_UNKNOWN", "UNAUTHORIZED",
    "TOO_MANY_REQUESTS", "DENIED", "UPSTREAM_AUTH", "NO_TOKEN", "UPSTREAM_UNREACHABLE", "UPSTREAM_TIMEOUT",
    "UPSTREAM_BUSY", "UPSTREAM_BROKEN", "STORAGE_ERROR", "STORAGE_REDIRECT_REFUSED", "TOKEN_EXPIRED", "INTERNAL",
]


@dataclass(frozen=True)
class RegistryError:
    code: str
    message: str
    status: int


NOT_FOUND = RegistryError("NOT_FOUND", "no such registry API endpoint", 404)
UNSUPPORTED = RegistryError("UNSUPPORTED", "the operation is unsupported", 405)
NAME_INVALID = RegistryError("NAME_INVALID", "invalid repository name", 400)
BLOB_UNKNOWN = RegistryError("BLOB_UNKNOWN", "blob unknown to registry", 404)
RANGE_INVALID = RegistryError("RANGE_INVALID", "requested range not satisfiable", 416)
NAME_UNKNOWN = RegistryError("NAME_UNKNOWN", "repository name not known to registry", 404)
UNAUTHORIZED = RegistryError("UNAUTHORIZED", "authentication required", 401)
TOO_MANY_REQUESTS = RegistryError("TOOMANYREQUESTS", "too many requests", 429)
DENIED = RegistryError("DENIED", "requested access to the resource is denied", 403)
UPSTREAM_AUTH = RegistryError(
    "UNAUTHORIZED", "the upstream registry rejected the proxy's ECR credentials", 502
)
NO_TOKEN = RegistryError("UNAVAILABLE", "no valid ECR token is held yet; retry shortly", 503)
TOKEN_EXPIRED = RegistryError("UNAVAILABLE", "the ECR token expired and could not be refreshed; retry shortly", 503)
UPSTREAM_UNREACHABLE = RegistryError("UNAVAILABLE", "the upstream registry is unreachable", 502)
UPSTREAM_TIMEOUT = RegistryError("UNAVAILABLE", "the upstream registry did not answer in time", 504)
UPSTREAM_BUSY = RegistryError(
    "UNAVAILABLE", "every upstream connection is busy; retry shortly", 503
)
UPSTREAM_BROKEN = RegistryError("UNAVAILABLE", "the upstream registry closed the connection", 502)
STORAGE_ERROR = RegistryError("UNAVAILABLE", "blob storage answered with an error", 502)
# the upstream redirected a blob somewhere the proxy does not fetch from (registry.redirects)
STORAGE_REDIRECT_REFUSED = RegistryError("UNAVAILABLE", "blob storage redirect refused", 502)
INTERNAL = RegistryError("UNKNOWN", "internal proxy error", 500)

JSON_FIELDS = [(b"Content-Type", b"application/json; charset=utf-8")]


def envelope(err: RegistryError, detail: str | None = None) -> bytes:
    """The registry's `{"errors":[...]}` body; `detail` must never carry secrets."""
    entry: dict[str, object] = {"code": err.code, "message": err.message}
    if detail:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}, separators=(",", ":")).encode("utf-8")


def bad_request_body(status: int, reason: str) -> tuple[bytes, bytes]:
    """(Content-Type, body) for a request the HTTP parser refused: the data path knows nothing of
    registries, so the composition root hands it this."""
    code = "UNSUPPORTED" if status in (405, 501, 505) else "UNAVAILABLE" if status == 503 else "BAD_REQUEST"
    return JSON_FIELDS[0][1], envelope(RegistryError(code, reason, status))
