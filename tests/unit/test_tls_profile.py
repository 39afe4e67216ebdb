"""The client-facing TLS profile: Mozilla's "intermediate" suites for TLS 1.2 (forward-secret AEAD
only), TLS 1.3 as OpenSSL ships it. Every TLS 1.2 suite OpenSSL knows is offered alone, in memory,
against an RSA and an ECDSA certificate; the server must take exactly the profile's."""

from __future__ import annotations

import datetime
import pathlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from ecr_twisted.http.tls import TLS12_SUITES, server_options

ECDSA_SUITES = {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"}
RSA_SUITES = {"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305"}


def _files(tmp: pathlib.Path, kind: str) -> tuple[str, str]:
    key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / f"{kind}.crt", tmp / f"{kind}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def _all_tls12_suites() -> list[str]:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_cipher_list(b"ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return [c for c in SSL.Connection(ctx, None).get_cipher_list() if not c.startswith("TLS_")]


def _handshake(server_ctx: SSL.Context, suite: str | None, version: int = SSL.TLS1_2_VERSION) -> str | None:
    """The suite negotiated when a client offers only `suite` at `version`, or None if refused."""
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    client_ctx.set_min_proto_version(version)
    client_ctx.set_max_proto_version(version)
    if suite is not None:
        client_ctx.set_cipher_list(suite.encode() + b":@SECLEVEL=0")
    client, server = SSL.Connection(client_ctx, None), SSL.Connection(server_ctx, None)
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(20):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return None
            try:
                b.bio_write(a.bio_read(1 << 16))
            except SSL.WantReadError:
                pass
        if client.get_cipher_name() and server.get_cipher_name():
            try:
                client.do_handshake()
                server.do_handshake()
            except SSL.Error:
                return None
            except Exception:
                pass
            return server.get_cipher_name()
    return None


@pytest.mark.parametrize("kind,expected", [("rsa", RSA_SUITES), ("ecdsa", ECDSA_SUITES)])
def test_tls12_takes_exactly_the_intermediate_suites(tmp_path: pathlib.Path, kind: str, expected: set[str]) -> None:
    server_ctx = server_options(*_files(tmp_path, kind)).getContext()
    suites = _all_tls12_suites()
    assert len(suites) > 30 and expected <= set(suites)
    accepted = {suite for suite in suites if _handshake(server_ctx, suite) == suite}
    assert accepted == expected
    assert set(TLS12_SUITES) == RSA_SUITES | ECDSA_SUITES



def test_tls13_is_as_openssl_ships_it(tmp_path: pathlib.Path) -> None:
    server_ctx = server_options(*_files(tmp_path, "ecdsa")).getContext()
    assert _handshake(server_ctx, None, SSL.TLS1_3_VERSION) in (
        "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"
    )
    assert _handshake(server_ctx, None, SSL.TLS1_1_VERSION) is None
