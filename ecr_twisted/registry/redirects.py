"""Which blob redirects the proxy follows itself, as one pure decision (`RedirectRules.decide`).

ECR answers a blob GET with `307` to a presigned S3 URL; in stream mode (and to fill the cache)
the proxy fetches that URL itself. Following whatever `Location` an upstream names would let
the upstream, or whoever controls a `--upstream` registry, make the proxy fetch from anywhere it
can reach: its own `/metrics`, the instance metadata service, a private network (server-side
request forgery). So a `Location` is followed only when all of these hold:

- it is ASCII without spaces, controls or backslashes, and parses (the one parse the request is
  then built from: no second parser to disagree with);
- `http` or `https`, no userinfo, a port in 1-65535, no IPv6 zone;
- at most `MAX_REDIRECTS` redirects per request;
- it is not one of the proxy's own listeners: a listener's port on a loopback or unspecified
  address, a `localhost`-like name, or the address the listener is bound to;
- it is the registry's own origin, or it matches a storage host pattern (`--storage-hosts`;
  by default `https` to the region's S3 host names). A literal IP address or a `localhost`-like
  name is followed only when a pattern names it exactly (never through `*.`), and an IP literal
  is classified also through IPv4-mapped, IPv4-compatible, 6to4, Teredo and NAT64 forms; host
  names whose last label is numeric (`2130706433`, `0x7f.1`, `127.1`) are refused, since a
  resolver may read them as IPv4 addresses.

Names are not resolved here: a name that matches a pattern is trusted to resolve where its
owner says (the default patterns are Amazon's S3 names). Checking a resolved address would only
help if the connection then used that very address (else DNS rebinding gets round it), which
the upstream pool does not do; so an operator who names hosts of their own in `--storage-hosts`
vouches for their DNS. Other addresses of this machine reached through a listener bound to all
interfaces are not known here either: they are refused unless a pattern names them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from ecr_twisted.http.origin import Origin

__all__ = [
    "MAX_REDIRECTS",
    "Follow",
    "HostPattern",
    "RedirectRules",
    "Refuse",
    "default_patterns",
    "parse_patterns",
    "special_address",
]

MAX_REDIRECTS = 3  # the registry's redirect and two more from storage

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)\Z")  # what inet_aton would read as a number
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_LOCALHOST = frozenset(
    {"localhost", "localhost.localdomain", "localhost6", "localhost6.localdomain6", "ip6-localhost", "ip6-loopback"}
)
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT: not global, not "private" either
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SHOWN = 160  # characters of a refused URL a log line shows


def _is_localhost(name: str) -> bool:
    return name in _LOCALHOST or name.endswith(".localhost")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, where packets to it may end up there."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _NAT64) or (ip in _V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def special_address(ip: IPAddress) -> str | None:
    """Why `ip` is no place to fetch a blob from (loopback, private, ...), or None for a global address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "an IPv6 address with a zone"
        v4 = _embedded_v4(ip)
        if v4 is not None:
            why = special_address(v4)
            return f"{why} (inside an IPv6 address)" if why else "an IPv6 form of an IPv4 address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "a special-purpose address"
    return None


def _host(text: str) -> tuple[str, IPAddress | None]:
    """(normalised host, its address if it is an IP literal); ValueError if it is neither a
    literal nor a plain DNS name. `text` is a URL's host: lower case, IPv6 without brackets."""
    if ":" in text:
        if "%" in text:
            raise ValueError("an IPv6 address with a zone")
        ip6 = ipaddress.IPv6Address(text)  # ValueError if it is not one
        return str(ip6), ip6
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError("not a host name")
    if _NUMERIC_LABEL.match(labels[-1]):
        try:
            ip4 = ipaddress.IPv4Address(name)
        except ValueError:
            raise ValueError("an IP address in an unusual spelling") from None
        return str(ip4), ip4
    return name, None


@dataclass(frozen=True)
class HostPattern:
    """Where blob redirects may go: `scheme://host:port` with `host` a name, `*.suffix` (any name
    under it) or an IP address, and `port` None for any port."""

    scheme: str
    host: str
    port: int | None

    def matches(self, scheme: str, host: str, port: int, literal: bool) -> bool:
        if scheme != self.scheme or (self.port is not None and port != self.port):
            return False
        if self.host.startswith("*."):
            # only ordinary names come in through a wildcard: never an address, never localhost
            return not literal and not _is_localhost(host) and host.endswith(self.host[1:])
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{'*' if self.port is None else self.port}"


def default_patterns(region: str) -> tuple[HostPattern, ...]:
    """Where ECR in `region` sends blob GETs: https to that region's S3 names (and the global one)."""
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    hosts = (
        f"*.s3.{suffix}",
        f"*.s3.{region}.{suffix}",
        f"s3.{region}.{suffix}",
        f"*.s3.dualstack.{region}.{suffix}",
        f"s3.dualstack.{region}.{suffix}",
    )
    return tuple(HostPattern("https", h, 443) for h in hosts)


def _pattern(text: str) -> HostPattern:
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "https", text
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: only http:// or https:// (the default)")
    if any(c in rest for c in "/?#@\\"):
        raise ValueError(f"{text!r}: a host and port only, no path or user")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or (port_text and not port_text.startswith(":")):
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets")
        port_text = port_text[1:] if port_text else ""
        if ":" not in host:
            raise ValueError(f"{text!r}: only an IPv6 address goes in brackets")
    else:
        host, colon, port_text = rest.partition(":")
        if colon and not port_text:
            raise ValueError(f"{text!r}: a port after ':' (a number or *)")
    host = host.lower()
    wildcard = host.startswith("*.")
    if "*" in (host[2:] if wildcard else host):
        raise ValueError(f"{text!r}: '*.' goes only at the start of a name")
    try:
        name, ip = _host(host[2:] if wildcard else host)
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from None
    if wildcard and (ip is not None or name.count(".") < 1):
        raise ValueError(f"{text!r}: '*.' needs a domain of at least two labels after it")
    port: int | None = 443 if scheme == "https" else 80
    if port_text == "*":
        port = None
    elif port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: the port must be 1-65535 or *")
        port = int(port_text)
    return HostPattern(scheme, "*." + name if wildcard else name, port)


def parse_patterns(spec: str, region: str, *more_regions: str) -> tuple[HostPattern, ...]:
    """`--storage-hosts`: patterns separated by commas or spaces, `default` for the S3 names of
    every region given (each ECR upstream's; none: no ECR at all); ValueError naming the first bad one."""
    out: list[HostPattern] = []
    for item in spec.replace(",", " ").split():
        if item.lower() == "default":
            for each in dict.fromkeys((region, *more_regions)):
                if each:
                    out.extend(default_patterns(each))
        else:
            out.append(_pattern(item))
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Follow:
    """Fetch `target` from `origin` (no Authorization); `shown` is the URL fit for logs."""

    origin: Origin
    target: bytes
    shown: str


@dataclass(frozen=True)
class Refuse:
    """Do not fetch; `reason` may go to clients and logs, `shown` (the URL without query or user) to logs."""

    reason: str
    shown: str


def _shown(location: str) -> str:
    """A URL fit for logs: no query (presigned URLs carry signatures), no userinfo, bounded."""
    cut = location.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = cut.partition("//")
    if sep:
        authority, slash, path = rest.partition("/")
        if "@" in authority:
            authority = "REDACTED@" + authority.rpartition("@")[2]
        cut = scheme + sep + authority + slash + path
    shown = cut[:_SHOWN] + ("..." if len(cut) > _SHOWN else "")
    return shown.encode("ascii", "backslashreplace").decode("ascii")


@dataclass(frozen=True)
class RedirectRules:
    """What the proxy may follow: storage host patterns, and its own listeners as (interface, port),
    interface "" for all of them."""

    patterns: tuple[HostPattern, ...] = ()
    own: tuple[tuple[str, int], ...] = ()
    max_redirects: int = MAX_REDIRECTS

    def decide(self, location: bytes, base: Origin, registry: Origin | None, followed: int) -> Follow | Refuse:
        """Follow `location` (a `Location` value received from `base`) or not? `registry`: the
        registry's origin; `followed`: how many redirects this request has followed already."""
        text = location.decode("latin-1")
        if followed >= self.max_redirects:
            return Refuse(f"more than {self.max_redirects} redirects", _shown(text))
        if not text or any(not 0x21 <= b <= 0x7E for b in location) or "\\" in text:
            return Refuse("malformed Location", _shown(text))
        try:
            url = text if _SCHEME.match(text) else urljoin(base.base.decode("ascii") + "/", text)
            parts = urlsplit(url)
            port = parts.port
            hostname = parts.hostname
        except ValueError:
            return Refuse("malformed Location", _shown(text))
        shown = _shown(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            return Refuse("not an http or https URL", shown)
        if "@" in parts.netloc:
            return Refuse("a URL with userinfo", shown)
        if not hostname or (parts.netloc.startswith("[") and parts.netloc.partition("]")[2][:1] not in ("", ":")):
            return Refuse("malformed Location", shown)
        if port == 0:
            return Refuse("malformed Location: port 0", shown)
        port = port or (443 if scheme == "https" else 80)
        try:
            host, ip = _host(hostname)
        except ValueError as e:
            return Refuse(f"malformed Location: {e}", shown)
        if self._own(host, ip, port):
            return Refuse("the proxy's own listener", shown)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        follow = Follow(Origin(scheme, host, port), target.encode("ascii"), shown)
        if registry is not None and follow.origin.key == registry.key:
            return follow  # the registry itself: where the proxy goes anyway
        literal = ip is not None
        if any(p.matches(scheme, host, port, literal) for p in self.patterns):
            return follow
        if ip is not None:
            why = special_address(ip)
            return Refuse(why if why else "an IP address no --storage-hosts pattern names", shown)
        if _is_localhost(host):
            return Refuse("a localhost name", shown)
        if scheme == "http" and any(p.matches("https", host, 443, literal) for p in self.patterns):
            return Refuse("plain http to a storage host", shown)
        return Refuse("not a storage host (--storage-hosts)", shown)

    def _own(self, host: str, ip: IPAddress | None, port: int) -> bool:
        for interface, own_port in self.own:
            if port != own_port:
                continue
            if ip is None:
                if _is_localhost(host) or host == interface:
                    return True
                continue
            plain = _embedded_v4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
            for addr in (ip, plain):
                if addr is not None and (addr.is_loopback or addr.is_unspecified or str(addr) == interface):
                    return True
        return False
