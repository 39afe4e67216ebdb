"""Which upstream connections go through an HTTP forward proxy, and what they say to it.

Companies with egress control reach AWS only through a forward proxy. `EgressRules` decides,
once per new upstream connection, whether an origin is reached through one (`proxy_for`);
the pool then tunnels https origins with `CONNECT` (`http.tunnel`) and sends requests for
http origins in absolute form (`absolute_form`). Pure: no I/O, no reactor.

Conventions, chosen so that the ECR API leg (botocore in a child process, which reads the
same variables through Python's `urllib.request.getproxies_environment`) and the data path
pick the same proxy:

- `--egress-proxy URL` wins over the environment, for both schemes.
- Otherwise https origins use `https_proxy`, else `HTTPS_PROXY`; http origins use
  `http_proxy`, else `HTTP_PROXY`: the lower-case name wins, as in Python and curl. Set but
  empty, the lower-case name means no proxy for that scheme whatever the upper-case one says
  (Python's second pass drops the scheme); an empty upper-case one means none when the
  lower-case name is not set. `Options` therefore keeps a variable set to nothing.
- `no_proxy`, else `NO_PROXY`, applies in both cases: comma-separated entries, matched
  case-insensitively against the origin's host name:
  `*` as an entry: every origin goes direct;
  `example.com`, `.example.com` and `*.example.com` all mean that host and every host under
  it (the leading `.`/`*.` is dropped, as Python and curl do; Go's "subdomains only" reading
  of `.example.com` is not followed);
  an IP address matches that address literally; a CIDR block (`10.0.0.0/8`, `fd00::/8`)
  every address literal inside it (as curl and Go; host names are never resolved for this);
  `host:port` or `[v6]:port` matches that host on that port only (as Go).
  Loopback addresses are NOT exempt by themselves (Go exempts them; curl and Python do not).
  NO_PROXY on the data path is a superset of Python's, not the same: Python knows no CIDR
  blocks nor the `*.` form (`proxy_bypass_environment` compares names and name suffixes as
  text), so such an entry sends the data path direct while botocore still uses the proxy.
- A proxy URL is `http://[user:password@]host[:port]` (port 80 when left out, as Go; a URL
  without a scheme is taken as http, as curl and Go do). Credentials are percent-decoded and
  sent as `Proxy-Authorization: Basic`; they appear nowhere else (`shown`, `repr`, errors).
  TLS to the proxy itself (`https://`) and SOCKS are refused.
"""

from __future__ import annotations

import base64
import ipaddress
from typing import Iterable
from urllib.parse import unquote, urlsplit

from ecr_twisted.http.http11 import Head
from ecr_twisted.http.origin import Origin, ip_literal
from ecr_twisted.http.policy import upstream_keep_alive

__all__ = [
    "EgressProxy", "EgressRules", "NoProxy", "absolute_form",
    "connect_request", "forwarded_keep_alive", "parse_proxy_url",
]

HTTPS_NAMES = ("https_proxy", "HTTPS_PROXY")
HTTP_NAMES = ("http_proxy", "HTTP_PROXY")
NO_PROXY_NAMES = ("no_proxy", "NO_PROXY")


class EgressProxy:
    """One forward proxy: where it listens, and the header that authenticates to it (if any)."""

    __slots__ = ("host", "port", "shown", "auth_line")

    def __init__(self, host: str, port: int, authorization: bytes | None = None) -> None:
        self.host = host
        self.port = port
        bracketed = f"[{host}]" if ":" in host else host
        self.shown = f"http://{bracketed}:{port}"  # for logs and errors: never the credentials
        # the whole header line, ready to be spliced into a request head
        self.auth_line = b"Proxy-Authorization: " + authorization + b"\r\n" if authorization else b""

    @property
    def has_credentials(self) -> bool:
        return bool(self.auth_line)

    def __repr__(self) -> str:
        return f"EgressProxy({self.shown}{', with credentials' if self.auth_line else ''})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, EgressProxy)
            and (self.host, self.port, self.auth_line) == (other.host, other.port, other.auth_line)
        )

    def __hash__(self) -> int:
        return hash((self.host, self.port, self.auth_line))


def parse_proxy_url(url: str, where: str = "egress proxy") -> EgressProxy:
    """`http://[user:password@]host[:port]` as an `EgressProxy`; ValueError (naming `where`,
    never the credentials) when it is not one."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise ValueError(f"{where}: not a proxy URL (expected http://[user:password@]host[:port])") from None
    if parts.scheme.lower() != "http":
        raise ValueError(f"{where}: only http:// forward proxies are supported, not {parts.scheme}://")
    if not host:
        raise ValueError(f"{where}: no host in the proxy URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{where}: a proxy URL has no path, query or fragment")
    authorization = None
    if parts.username is not None or parts.password is not None:
        user = unquote(parts.username or "")
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode("utf-8"))
        authorization = b"Basic " + token
    return EgressProxy(host, port or 80, authorization)


class _Entry:
    __slots__ = ("name", "network", "port")

    def __init__(self, name: str | None, network: ipaddress.IPv4Network | ipaddress.IPv6Network | None,
                 port: int | None) -> None:
        self.name = name  # a host name suffix (lower case, no leading dot)
        self.network = network  # an address or a block of them
        self.port = port  # None: any port


class NoProxy:
    """A parsed `NO_PROXY` list (conventions in the module docstring)."""

    __slots__ = ("everything", "entries")

    def __init__(self, value: str = "") -> None:
        self.everything = False
        self.entries: list[_Entry] = []
        for raw in value.split(","):
            item = raw.strip().lower()
            if not item:
                continue
            if item == "*":
                self.everything = True
                continue
            entry = _parse_entry(item)
            if entry is not None:
                self.entries.append(entry)

    def __bool__(self) -> bool:
        return self.everything or bool(self.entries)

    def matches(self, host: str, port: int) -> bool:
        """The origin `host` (bare, IPv6 without brackets) on `port` goes direct."""
        if self.everything:
            return True
        host = host.lower().rstrip(".")
        address = ip_literal(host)
        for e in self.entries:
            if e.port is not None and e.port != port:
                continue
            if e.network is not None:
                if address is not None and address.version == e.network.version and address in e.network:
                    return True
            elif e.name is not None and (host == e.name or host.endswith("." + e.name)):
                return True
        return False


def _parse_entry(item: str) -> _Entry | None:
    """One NO_PROXY entry; None for what cannot match anything (ignored, as curl and Go do)."""
    port: int | None = None
    if item.startswith("["):  # [v6] or [v6]:port
        close = item.find("]")
        if close < 0:
            return None
        rest = item[close + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
        item = item[1:close]
    elif item.count(":") == 1:  # name:port or v4:port (a bare v6 address has several colons)
        item, _, text = item.partition(":")
        if not text.isdigit():
            return None
        port = int(text)
    try:
        network = ipaddress.ip_network(item, strict=False)
    except ValueError:
        pass
    else:
        return _Entry(None, network, port)
    if item.startswith("*."):
        item = item[2:]
    name = item.lstrip(".").rstrip(".")
    if not name or "/" in name:
        return None
    return _Entry(name, None, port)


class EgressRules:
    """Which forward proxy (if any) each origin is reached through."""

    __slots__ = ("https", "http", "no_proxy")

    def __init__(self, https: EgressProxy | None = None, http: EgressProxy | None = None,
                 no_proxy: NoProxy | None = None) -> None:
        self.https = https
        self.http = http
        self.no_proxy = no_proxy if no_proxy is not None else NoProxy()

    @classmethod
    def from_settings(cls, egress_proxy: str | None, proxy_env: Iterable[tuple[str, str]]) -> EgressRules:
        """From `ProxySettings.egress_proxy` and `.proxy_env`; ValueError for a bad proxy URL."""
        env = dict(proxy_env)

        def first(names: tuple[str, str]) -> tuple[str, str] | None:
            """The lower-case name decides when it is set at all, even to nothing (as in Python)."""
            for name in names:
                if name in env:
                    return (name, env[name]) if env[name].strip() else None
            return None

        no_proxy = NoProxy((first(NO_PROXY_NAMES) or ("", ""))[1])
        if egress_proxy:
            both = parse_proxy_url(egress_proxy, "--egress-proxy")
            return cls(both, both, no_proxy)
        found = [first(HTTPS_NAMES), first(HTTP_NAMES)]
        https, http = (parse_proxy_url(f[1], f[0]) if f else None for f in found)
        return cls(https, http, no_proxy)

    def __bool__(self) -> bool:
        return self.https is not None or self.http is not None

    def proxy_for(self, origin: Origin) -> EgressProxy | None:
        """The proxy that connections to `origin` go through; None: connect directly."""
        proxy = self.https if origin.scheme == "https" else self.http
        if proxy is None or self.no_proxy.matches(origin.host, origin.port):
            return None
        return proxy

    def describe(self) -> str:
        """One line for the startup log, without credentials."""
        parts = []
        for scheme, proxy in (("https", self.https), ("http", self.http)):
            if proxy is not None:
                creds = " (with credentials)" if proxy.has_credentials else ""
                parts.append(f"{scheme} origins via {proxy.shown}{creds}")
        if self.no_proxy.everything:
            parts.append("NO_PROXY=* (every origin direct)")
        elif self.no_proxy.entries:
            parts.append(f"NO_PROXY with {len(self.no_proxy.entries)} entries")
        return "egress proxy: " + ", ".join(parts)

    def __repr__(self) -> str:
        return f"EgressRules({self.describe()})"


def _authority(origin: Origin) -> bytes:
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    return f"{host}:{origin.port}".encode("ascii")


def connect_request(proxy: EgressProxy, origin: Origin) -> bytes:
    """The `CONNECT` request head that opens a tunnel to `origin` (its port always given)."""
    authority = _authority(origin)
    return b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n" + proxy.auth_line + b"\r\n"


def absolute_form(head: bytes, base: bytes, auth_line: bytes) -> bytes:
    """A request head in origin form (`GET /v2/ HTTP/1.1`) rewritten for a forward proxy:
    the target in absolute form (`GET http://host:port/v2/ HTTP/1.1`), `auth_line` (a
    `Proxy-Authorization` line or nothing) after the request line."""
    sp = head.find(b" ") + 1
    eol = head.find(b"\r\n") + 2
    if sp <= 0 or eol < 2:
        return head
    if head[sp:sp + 1] == b"/":
        return head[:sp] + base + head[sp:eol] + auth_line + head[eol:]
    return head[:eol] + auth_line + head[eol:]


def forwarded_keep_alive(response: Head) -> bool:
    """Whether a forward proxy will take another plain-http request on this connection.

    Only when it says `keep-alive` in `Connection` or `Proxy-Connection`: tinyproxy answers
    HTTP/1.1 without `Connection: close` and then closes all the same, and a POST (an upload)
    sent on such a connection in that moment fails, as it must not be retried. A proxy that
    keeps connections open says so; one that does not costs a new connection to the proxy."""
    if not upstream_keep_alive(response):
        return False
    if b"keep-alive" in response.connection_tokens():
        return True
    return any(t.strip().lower() == b"keep-alive" for v in response.get_all(b"proxy-connection") for t in v.split(b","))
