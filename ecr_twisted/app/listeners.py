"""Where the proxy listens, worked out from `--port` values without a reactor.

Twisted's `serverFromString` turns a description straight into a reactor-bound endpoint,
but the proxy needs the description itself: a `--workers` group binds its sockets with
`supervisor.bind_listener`, and its `ssl:` listeners must negotiate ALPN http/1.1, which
Twisted's own `ssl:` endpoint gives no public way to set up. So a description is split here
(with Twisted's escaping rules); an `ssl:` one becomes a `tcp:` description plus the
certificate and key the proxy wraps its factory in (`http.tls.server_options`), exactly
like a `--tls-cert`/`--tls-key` listener; any other description goes to `serverFromString`
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import endpoints, ssl
from twisted.internet.testing import MemoryReactor

__all__ = [
    "Description",
    "DescriptionError",
    "ListenerSpec",
    "check_description",
    "listener_address",
    "listener_spec",
    "load_server_tls",
    "parse_description",
    "with_backlog",
]


class DescriptionError(ValueError):
    """A listener description the proxy cannot use; the message says why."""


@dataclass(frozen=True)
class Description:
    """A server endpoint description split into its type, positional and keyword parameters."""

    kind: str
    args: tuple[str, ...] = ()
    kwargs: dict[str, str] = field(default_factory=dict)


def parse_description(spec: str) -> Description:
    """Split `spec` as `serverFromString` does: `:` separates parameters, the first `=` of a
    parameter names it, a backslash takes the next character literally. A bare port number
    means `tcp:PORT`."""
    if spec.isdigit():
        return Description("tcp", (spec,))
    parts: list[list[str]] = []
    part: list[str] = []
    current = ""
    ops = ":="
    chars = iter(spec)
    for c in chars:
        if c in ops:
            part.append(current)
            current = ""
            if c == ":":
                parts.append(part)
                part, ops = [], ":="
            else:
                ops = ":"  # a value may hold '='
        elif c == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise DescriptionError(f"{spec!r} ends with a lone backslash")
            current += escaped
        else:
            current += c
    part.append(current)
    parts.append(part)
    args = [p[0] for p in parts if len(p) == 1]
    kwargs = {p[0]: p[1] for p in parts if len(p) == 2}
    if not args or not args[0]:
        raise DescriptionError(f"{spec!r} names no endpoint type")
    return Description(args[0], tuple(args[1:]), kwargs)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


@dataclass(frozen=True)
class ListenerSpec:
    """One listener as plain values: what to listen on and, for TLS, the PEM files to speak it with."""

    description: str  # for serverFromString or bind_listener; an ssl: description is rewritten as tcp:
    cert: str | None = None  # the proxy wraps the listener's factory in TLS with these
    key: str | None = None

    @property
    def tls(self) -> bool:
        return self.cert is not None


# Twisted's ssl: parameters, in their positional order
_SSL_PARAMETERS = (
    "port", "privateKey", "certKey", "sslmethod", "interface", "backlog", "extraCertChain", "dhParameters"
)
_SSL_UNSUPPORTED = {
    "sslmethod": "TLS 1.2 or later is always used",
    "extraCertChain": "put the intermediate certificates after the certificate in the certKey file",
    "dhParameters": "the proxy offers ECDHE key exchange only",
}


def listener_spec(spec: str, tls_cert: str | None = None, tls_key: str | None = None) -> ListenerSpec:
    """The listener for one `--port` value. With `tls_cert`/`tls_key` (`--tls-cert`/`--tls-key`)
    every listener speaks TLS, whatever its type; an `ssl:` description keeps its own files."""
    if spec.isdigit() and not 0 < int(spec) < 65536:
        raise DescriptionError(f"{spec} is not a port number")
    described = parse_description(spec)
    if described.kind != "ssl":
        description = "tcp:" + spec if spec.isdigit() else spec
        return ListenerSpec(description, tls_cert, tls_key) if tls_cert else ListenerSpec(description)
    if len(described.args) > len(_SSL_PARAMETERS):
        raise DescriptionError(f"{spec!r}: too many ssl: parameters")
    values = dict(zip(_SSL_PARAMETERS, described.args))
    for name, value in described.kwargs.items():
        if name not in _SSL_PARAMETERS:
            raise DescriptionError(f"{spec!r}: ssl: has no parameter {name!r}")
        values[name] = value
    for name, instead in _SSL_UNSUPPORTED.items():
        if name in values:
            raise DescriptionError(f"{spec!r}: ssl: {name} is not supported ({instead})")
    if not values.get("port"):
        raise DescriptionError(f"{spec!r}: ssl: needs a port")
    key = values.get("privateKey", "server.pem")  # Twisted's defaults
    cert = values.get("certKey", key)
    tcp = "tcp:" + _escape(values["port"])
    for name in ("interface", "backlog"):
        if name in values:
            tcp += f":{name}={_escape(values[name])}"
    return ListenerSpec(tcp, cert, key)


def listener_address(description: str) -> tuple[str, int] | None:
    """(interface, port) a `tcp:`/`tcp6:` description listens on, interface "" for all of them;
    None for other kinds and for port 0 (any free port). Blob redirects to these are refused."""
    try:
        described = parse_description(description)
    except DescriptionError:
        return None
    if described.kind not in ("tcp", "tcp6"):
        return None
    positional = dict(zip(("port", "interface"), described.args))
    port = described.kwargs.get("port", positional.get("port", ""))
    interface = described.kwargs.get("interface", positional.get("interface", ""))
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return interface.strip("[]").lower(), int(port)


def with_backlog(description: str, backlog: int) -> str:
    """`description` asking for a listen backlog of `backlog` if it is a tcp:, tcp6: or unix:
    listener that names none (Twisted's default is 50: a burst of connections beyond it is
    dropped by the kernel, and the clients retry a second later)."""
    described = parse_description(description)
    # the backlog is the third positional parameter of all three (port/address, interface/mode, backlog)
    if described.kind in ("tcp", "tcp6", "unix") and "backlog" not in described.kwargs and len(described.args) < 3:
        return f"{description}:backlog={backlog}"
    return description


def check_description(description: str) -> None:
    """Raise DescriptionError unless `serverFromString` accepts `description`.

    Parsed against a throwaway MemoryReactor: nothing listens and nothing is kept."""
    try:
        endpoints.serverFromString(MemoryReactor(), description)
    except Exception as e:
        raise DescriptionError(f"invalid endpoint {description!r}: {e}") from None


def load_server_tls(cert: str, key: str) -> ssl.CertificateOptions:
    """Client-facing TLS from PEM files (TLS 1.2+, ALPN http/1.1); DescriptionError if they do not load."""
    from ecr_twisted.http.tls import server_options

    try:
        return server_options(cert, key)
    except Exception as e:
        raise DescriptionError(f"cannot load {cert} / {key}: {e}") from None
