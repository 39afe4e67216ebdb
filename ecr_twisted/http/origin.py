"""Where upstreams live, and how failing to reach one is reported.

A value type used on both sides of the data path (the pool keys its connections by it,
the handler builds `Host` and rewrites URLs with it, TLS picks certificates by it), so it
sits apart from the connection classes and depends on nothing.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

__all__ = ["Origin", "UpstreamError", "ip_literal"]


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address `host` is written as (an IPv6 one with or without brackets), else None:
    a name, or a number only a resolver reads as an address (`127.1`: see `upstreams.bearer`)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


class UpstreamError(Exception):
    """The upstream could not give a response head. `kind`: unreachable, timeout, closed."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


class Origin:
    """Where an upstream lives; `base` is what its absolute URLs start with."""

    __slots__ = ("scheme", "host", "port", "netloc", "base", "key")

    def __init__(self, scheme: str, host: str, port: int | None = None) -> None:
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        default = 443 if scheme == "https" else 80
        self.scheme = scheme
        self.host = host
        self.port = port or default
        shown = f"[{host}]" if ":" in host else host
        netloc = shown if self.port == default else f"{shown}:{self.port}"
        self.netloc = netloc.encode("ascii")
        self.base = f"{scheme}://{netloc}".encode("ascii")
        self.key = (scheme, host, self.port)

    @classmethod
    def from_url(cls, url: str | bytes) -> "Origin":
        if isinstance(url, bytes):
            url = url.decode("ascii")
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"no host in URL {url!r}")
        return cls(parts.scheme, parts.hostname, parts.port)

    def __repr__(self) -> str:
        return f"Origin({self.base.decode()})"
