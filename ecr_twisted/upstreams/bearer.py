"""The registry token flow, as a client of an upstream that answers `401` with a Bearer challenge.

ECR Public, Docker Hub, GHCR, Harbor and distribution's `auth: token` answer an unauthenticated
(or insufficiently scoped) request with `WWW-Authenticate: Bearer realm=..,service=..,scope=..`
and expect the client to fetch a short-lived token from the realm (with Basic credentials when it
has them) and send it as `Authorization: Bearer <token>`. The handler does the round trips; this
module decides: which challenge to follow, what to ask the realm, what its answer means, and
which token a later request of the same scope can use up front (`TokenCache`).

Pure: values in, values out; the time is always an argument (`now`), never read here.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import SplitResult, quote, urlsplit

from ecr_twisted.http.origin import ip_literal

__all__ = [
    "Challenge", "BearerToken", "TokenCache", "parse_challenges", "bearer_challenge", "token_target",
    "parse_token_answer", "request_scope", "credentials_allowed", "realm_allowed", "MAX_TOKEN_ANSWER", "MIN_LIFETIME",
    "MAX_LIFETIME", "DEFAULT_LIFETIME", "EXPIRY_MARGIN", "MAX_ENTRIES",
]

MAX_TOKEN_ANSWER = 64 << 10  # bytes of a token server's answer read at most (JWTs are a few KiB)
DEFAULT_LIFETIME = 60.0  # the spec's default when the answer has no expires_in
MIN_LIFETIME = 30.0  # a token that says it lives less would be fetched again on every request
MAX_LIFETIME = 3600.0  # a token is never kept longer, whatever it says
EXPIRY_MARGIN = 10.0  # seconds before its end a token is no longer sent (it could expire on the way)
MAX_ENTRIES = 1024  # tokens one upstream keeps (one per scope: per repository and pull/push)
MAX_TOKEN = 16 << 10  # characters of one token

_TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")  # RFC 6750 b64token: fit for a header as is
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?\[\]!$&'()*+,;=%]+\Z")  # RFC 3986, without '#' and '@'
_SCHEME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PARAM = re.compile(r"\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_UNQUOTED = re.compile(r"[^\s,\"]*")
_ESCAPE = re.compile(r"\\(.)")
_TOKEN68 = re.compile(r"[ \t]+[A-Za-z0-9\-._~+/]+=*[ \t]*(?=,|\Z)")


@dataclass(frozen=True, slots=True)
class Challenge:
    """One Bearer challenge whose realm may be asked: an http(s) URL without credentials."""

    realm: str
    service: str | None = None
    scope: str | None = None
    error: str | None = None  # e.g. insufficient_scope, invalid_token: for logs


@dataclass(frozen=True, slots=True)
class BearerToken:
    """A token server's answer: the Authorization value to send, until `expires_at`. Never printed."""

    header: bytes = field(repr=False)  # b"Bearer <token>"
    expires_at: float


def parse_challenges(value: str) -> list[tuple[str, dict[str, str]]]:
    """Every challenge of a WWW-Authenticate value (RFC 9110 11.6.1): `(scheme lowercased, params)`,
    param names lowercased, quoted values unescaped; commas inside quotes do not split. A token68
    challenge (`Negotiate abc==`) has no params. Reading stops at the first thing it cannot read:
    the challenges read before stay (a malformed tail never hides a good challenge before it)."""
    out: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i] in " \t,":
            i += 1
        m = _SCHEME.match(value, i)
        if m is None:
            break
        params: dict[str, str] = {}
        out.append((m.group(0).lower(), params))
        i = m.end()
        t = _TOKEN68.match(value, i)
        if t is not None:
            i = t.end()  # `Scheme token68`
            continue
        while True:
            p = _PARAM.match(value, i)
            if p is None:  # the next challenge's scheme (or something unreadable)
                break
            i = p.end()
            q = _QUOTED.match(value, i)
            if q is not None:
                val = _ESCAPE.sub(r"\1", q.group(1))
            else:
                q = _UNQUOTED.match(value, i)
                assert q is not None  # it matches the empty string
                val = q.group(0)
            i = q.end()
            params.setdefault(p.group(1).lower(), val)
            while i < n and value[i] in " \t":
                i += 1
            if i < n and value[i] == ",":
                i += 1
            elif i < n:
                return out  # a value followed by neither a comma nor the end: unreadable
    return out


def _realm(url: str) -> SplitResult | None:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or parts.fragment:
        return None
    if port == 0 or not _URL_CHARS.match(url):
        return None
    return parts


def bearer_challenge(values: Iterable[bytes]) -> Challenge | None:
    """The first Bearer challenge among WWW-Authenticate values whose realm the proxy may ask;
    None when there is none (the refusal stands as it is)."""
    for raw in values:
        text = raw.decode("latin-1")
        for scheme, params in parse_challenges(text):
            if scheme != "bearer":
                continue
            realm = params.get("realm")
            if not realm or _realm(realm) is None:
                continue
            return Challenge(realm, params.get("service") or None, params.get("scope") or None,
                             params.get("error") or None)
    return None


def token_target(challenge: Challenge) -> bytes:
    """The request target asked of the realm: its path and query, plus `service` and one `scope`
    parameter per space-separated scope of the challenge (as docker does)."""
    parts = _realm(challenge.realm)
    assert parts is not None  # bearer_challenge checked it
    query = [parts.query] if parts.query else []
    if challenge.service is not None:
        query.append("service=" + quote(challenge.service, safe=""))
    if challenge.scope is not None:
        query.extend("scope=" + quote(s, safe=":/,*") for s in challenge.scope.split() if s)
    target = (parts.path or "/") + ("?" + "&".join(query) if query else "")
    return target.encode("ascii")


def credentials_allowed(realm: str, upstream_scheme: str) -> bool:
    """Basic credentials go to the realm in clear only when the registry itself is plain http (tests,
    a mirror on the local network): an https registry's credentials never cross a plain connection."""
    return urlsplit(realm).scheme == "https" or upstream_scheme == "http"


_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_AWS_METADATA_V6 = ipaddress.IPv6Network("fd00:ec2::/64")  # the IPv6 instance metadata service (fd00:ec2::254)
_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F]*|[0-9]+)\Z")  # a label inet_aton reads as a number
_INET_ATON = re.compile(r"[0-9a-fA-FxX.]+\Z")  # no white space: glibc's inet_aton ignores what follows one


def _host_address(host: str) -> _Address | None:
    """The address a host stands for, as the system's resolver reads it before any DNS: a literal,
    or a number `inet_aton` takes (`127.1`, `2852039166`, `0xa9.254.169.254`), an IPv4-mapped
    IPv6 address unwrapped; None for a name. ValueError for a number that is no address
    (`1.2.3.4.5`: what a resolver makes of it is its own affair)."""
    name = host.strip("[]").rstrip(".")
    address = ip_literal(name)
    if address is None and _NUMBER.match(name.rsplit(".", 1)[-1]):  # a DNS name never ends in a number
        if not _INET_ATON.match(name):
            raise ValueError(host)
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(name))
        except OSError:
            raise ValueError(host) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address


def _this_machine(address: _Address | None, host: str) -> bool:
    if address is None:
        name = host.lower().rstrip(".")
        return name == "localhost" or name.endswith(".localhost")
    return address.is_loopback or address.is_unspecified


def realm_allowed(realm: str, registry_host: str) -> bool:
    """Whether the proxy may ask a realm a registry named: never a link-local address nor AWS's
    fd00:ec2::/64 (the cloud's metadata services are there, and no token server), nor this
    machine unless the registry is on it too. A realm is the registry's word; these are the
    places its word must not send the proxy. Every spelling of an address the resolver takes
    counts (`127.1`, `0xa9fea9fe`, `[::ffff:169.254.169.254]`); a number that is no address is refused.

    Known limit: a DNS name is not resolved here, so a name that resolves to such an address
    (a registry's own zone can say anything) is asked. What the proxy does with the answer
    bounds the harm: the body is never relayed to the client, only its `token` field is sent on
    as the upstream's Authorization header (`parse_token_answer` takes nothing else)."""
    host = urlsplit(realm).hostname or ""
    try:
        address = _host_address(host)
    except ValueError:
        return False
    if address is not None and (address.is_link_local or address in _AWS_METADATA_V6):
        return False
    if not _this_machine(address, host):
        return True
    try:
        return _this_machine(_host_address(registry_host), registry_host)
    except ValueError:
        return False


def parse_token_answer(body: bytes, now: float) -> BearerToken | None:
    """A token server's 200 answer: `token` (or `access_token`), `expires_in` seconds (default 60,
    clamped to [30 s, 1 h]); None when it is not one (too big, not JSON, no usable token)."""
    if len(body) > MAX_TOKEN_ANSWER:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or len(token) > MAX_TOKEN or not _TOKEN_CHARS.match(token):
        return None
    lifetime = data.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime != lifetime:
        lifetime = DEFAULT_LIFETIME
    lifetime = min(MAX_LIFETIME, max(MIN_LIFETIME, float(lifetime)))
    return BearerToken(b"Bearer " + token.encode("ascii"), now + lifetime)


def request_scope(name: str | None, method: bytes) -> str:
    """The scope a request needs on the upstream (its private name): what a token is kept under
    (`_catalog` never goes to a registry upstream: the proxy answers it)."""
    if name is None:
        return ""
    if method in (b"GET", b"HEAD"):
        return "repository:" + name + ":pull"
    return "repository:" + name + ":pull,push"


class TokenCache:
    """One upstream's tokens by (scope, service), at most `max_entries` (the oldest goes first).

    `service` is the one of the upstream's last challenge: a registry has one token service, and a
    request looks its token up before any challenge, by its own scope (`request_scope`)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.service: str | None = None
        self._tokens: dict[tuple[str, str | None], BearerToken] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"<TokenCache {len(self._tokens)} tokens, service {self.service!r}>"

    def get(self, scope: str, now: float) -> bytes | None:
        """The Authorization of a token for `scope` still good at `now`, else None (an expired one is dropped)."""
        key = (scope, self.service)
        token = self._tokens.get(key)
        if token is None:
            return None
        if now < token.expires_at - EXPIRY_MARGIN:
            return token.header
        del self._tokens[key]
        return None

    def put(self, scope: str, service: str | None, token: BearerToken) -> None:
        """Keep `token` for requests of `scope`; `service` becomes the one later lookups use."""
        self.service = service
        key = (scope, service)
        tokens = self._tokens
        tokens.pop(key, None)  # re-inserted last: the newest
        while len(tokens) >= self.max_entries:
            del tokens[next(iter(tokens))]
        tokens[key] = token

    def drop(self, scope: str, header: bytes) -> None:
        """Forget the token for `scope` if it is still `header` (the upstream refused it)."""
        key = (scope, self.service)
        token = self._tokens.get(key)
        if token is not None and token.header == header:
            del self._tokens[key]
