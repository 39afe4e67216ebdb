"""TLS for both legs: TLS 1.2+ towards clients, verified (or explicitly not) towards upstreams."""

from __future__ import annotations

import os
from typing import Any, Callable

from OpenSSL import SSL, crypto
from twisted.internet import ssl
# IOpenSSLTrustRoot has no public import path, yet it is what optionsForClientTLS documents
# for `trustRoot` (Twisted calls its one method, _addCACertsToContext); the public
# ssl.trustRootFromCertificates replaces the platform's store instead of adding to it.
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from ecr_twisted.http.origin import Origin

__all__ = [
    "HTTP11", "PlatformPlusCA", "ReloadingServerTLS", "TLS12_SUITES", "client_creator_factory", "select_protocol",
    "serve_http11",
    "server_options",
]


def _read_pem_chain(path: str) -> list[ssl.Certificate]:
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----END CERTIFICATE-----"
    certs = []
    for block in data.split(marker)[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            certs.append(ssl.Certificate.loadPEM(block[start:] + marker + b"\n"))
    if not certs:
        raise ValueError(f"{path}: no PEM certificate found")
    return certs


HTTP11 = b"http/1.1"


def select_protocol(conn: SSL.Connection, offered: list[bytes]) -> bytes | object:
    """ALPN on the front door: HTTP/1.1 when offered, otherwise go on without ALPN.

    Twisted installs a selection callback on every server context that answers with
    nothing when no protocols were declared, which OpenSSL turns into an `internal error`
    alert: curl, urllib3 and Go clients all offer ALPN by default and were refused. A
    client that offers only protocols we do not speak (h2 alone) still gets its handshake,
    as with a server that knows no ALPN; HTTP/1.1 is then the only thing it can speak."""
    return HTTP11 if HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def serve_http11(options: Any) -> Any:
    """Make a server context factory (ours or an `ssl:` endpoint's) negotiate ALPN as above.

    `CertificateOptions.getContext` builds its context once and keeps it, so the callback
    set here is the one every connection of that listener uses."""
    options.getContext().set_alpn_select_callback(select_protocol)
    return options


# Mozilla's "intermediate" server profile (ssl-config.mozilla.org, guidelines 5.7) for TLS 1.2:
# ECDHE key exchange (forward secrecy) with AEAD ciphers only, in its order. Its DHE suites are
# left out: they need DH parameters the proxy does not take. TLS 1.3 suites are OpenSSL's own
# (all three are AEAD with forward secrecy); this list does not touch them.
TLS12_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
)


def server_options(cert_file: str, key_file: str) -> ssl.CertificateOptions:
    """Server TLS from PEM files (certificate first, then any intermediates): TLS 1.2 minimum,
    TLS 1.2 with `TLS12_SUITES` only."""
    chain = _read_pem_chain(cert_file)
    with open(key_file, "rb") as f:
        key = ssl.KeyPair.load(f.read(), crypto.FILETYPE_PEM)
    options = ssl.CertificateOptions(
        privateKey=key.original,
        certificate=chain[0].original,
        extraCertChain=[c.original for c in chain[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    # set on the context itself, which CertificateOptions builds once and keeps: Twisted's own
    # acceptableCiphers would also pass TLS 1.3 names through set_cipher_list
    options.getContext().set_cipher_list(":".join(TLS12_SUITES).encode("ascii"))
    return serve_http11(options)


_log = Logger()


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingServerTLS:
    """Server TLS from a certificate and key file pair that follows the files: each new
    connection looks at them (stat, at most once every `stat_every` seconds) and, when either
    changed, the pair is loaded again for connections from then on (cert-manager and certbot
    renew in place). A pair that does not load (half-written, mismatched) keeps the previous
    one, and says why once per change. Connections already open keep their certificate."""

    def __init__(self, cert_file: str, key_file: str, clock: Any, stat_every: float = 1.0) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.clock = clock
        self.stat_every = stat_every
        self._stamps = (_stamp(cert_file), _stamp(key_file))
        self.options = server_options(cert_file, key_file)  # raises: the caller reports a bad start
        self._checked_at = clock.seconds()

    def check(self) -> bool:
        """Look at the files now; load them if they changed. True if a new pair is in use."""
        self._checked_at = self.clock.seconds()
        stamps = (_stamp(self.cert_file), _stamp(self.key_file))
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        try:
            options = server_options(self.cert_file, self.key_file)
        except Exception as e:
            _log.error(
                "cannot reload TLS {cert} / {key}, keeping the previous certificate: {error}",
                cert=self.cert_file, key=self.key_file, error=str(e) or type(e).__name__,
            )
            return False
        self.options = options
        _log.info("reloaded TLS certificate {cert}: {subject}, valid until {until}",
                  cert=self.cert_file, subject=_subject(options), until=_not_after(options))
        return True

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        if self.clock.seconds() - self._checked_at >= self.stat_every:
            self.check()
        return SSL.Connection(self.options.getContext(), None)


def _subject(options: ssl.CertificateOptions) -> str:
    cert = options.certificate
    return cert.to_cryptography().subject.rfc4514_string() if cert is not None else "?"


def _not_after(options: ssl.CertificateOptions) -> str:
    cert = options.certificate
    return cert.to_cryptography().not_valid_after_utc.isoformat() if cert is not None else "?"


@implementer(IOpenSSLTrustRoot)
class PlatformPlusCA:
    """The system's trust store plus one extra CA file (private CAs, VPC endpoints, tests)."""

    def __init__(self, ca_file: str) -> None:
        _read_pem_chain(ca_file)  # fail early on a bad file
        self.ca_file = ca_file

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        context.set_default_verify_paths()
        context.load_verify_locations(self.ca_file)


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without certificate checks, for `--upstream-insecure` only."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname.encode("idna")
        self._ctx = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2).getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        conn.set_tlsext_host_name(self._hostname)
        conn.set_connect_state()
        return conn


def client_creator_factory(ca_file: str | None, insecure: bool) -> Callable[[Origin], Any]:
    """How the upstream pool makes TLS connections; creators are cached per host name."""
    trust: Any = PlatformPlusCA(ca_file) if ca_file else ssl.platformTrust()
    cache: dict[str, Any] = {}

    def creator(origin: Origin) -> Any:
        found = cache.get(origin.host)
        if found is None:
            if insecure:
                found = _Unverified(origin.host)
            else:
                found = ssl.optionsForClientTLS(
                    origin.host,
                    trustRoot=trust,
                    extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
                )
            cache[origin.host] = found
        return found

    return creator
