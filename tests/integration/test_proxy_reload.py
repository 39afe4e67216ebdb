"""Reloading a running proxy (issue #12): a certificate renewed in place is served to new
connections without a restart; a broken pair keeps the old one; SIGHUP re-reads at once."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import ssl
import time

import bcrypt
from proxy_harness import ProxyFactory, wait_for

from ecr_twisted.testing.emulator import EmulatedECR, _make_tls_files


def _served_certificate(port: int) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))


def _install(path: pathlib.Path, data: bytes) -> None:
    path.with_name(path.name + ".new").write_bytes(data)
    os.replace(path.with_name(path.name + ".new"), path)


def test_renewed_certificate_is_served_without_a_restart(
    ecr: EmulatedECR, proxy_factory: ProxyFactory, tmp_path: pathlib.Path
) -> None:
    _, first_cert, first_key = _make_tls_files(tmp_path / "first")
    _, second_cert, second_key = _make_tls_files(tmp_path / "second")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _install(cert, first_cert.read_bytes())
    _install(key, first_key.read_bytes())
    users = tmp_path / "users"
    users.write_bytes(b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) + b"\n")
    p = proxy_factory(
        ecr, "--tls-cert", str(cert), "--tls-key", str(key), "--htpasswd", str(users),
        "--auth", "basic", anonymous=False, scheme="https",
    )
    assert p.port is not None
    port, pid = p.port, p.pid
    assert _served_certificate(port) == _der(first_cert.read_bytes())

    # renewed in place (key first, as certbot's symlink switch or a cert-manager secret update may)
    _install(key, second_key.read_bytes())
    _install(cert, second_cert.read_bytes())
    # every process takes it on its own next connection (--workers N: several in a row, so each has had one)
    wait_for(lambda: all(_served_certificate(port) == _der(second_cert.read_bytes()) for _ in range(16)), 10,
             "the renewed certificate")
    assert "reloaded TLS certificate" in p.log_text()

    # a broken pair (the old certificate with the new key): the renewed one stays, and the log says why
    time.sleep(1.1)
    _install(cert, first_cert.read_bytes())
    assert "keeping the previous certificate" not in p.log_text()
    wait_for(lambda: _served_certificate(port) and "keeping the previous certificate" in p.log_text(), 10,
             "the refusal in the log")
    assert _served_certificate(port) == _der(second_cert.read_bytes())
    assert p.alive() and p.pid == pid

    # SIGHUP: everything re-readable at once, and what changed is logged
    users.write_bytes(users.read_bytes() + b"bob:" + bcrypt.hashpw(b"pw2", bcrypt.gensalt(4)) + b"\n")
    _install(key, first_key.read_bytes())
    os.kill(pid, signal.SIGHUP)
    # "SIGHUP: re-reading ..." comes first (the signal); the line naming what changed follows it
    def changed_lines() -> list[str]:
        return [ln for ln in p.log_text().splitlines() if "SIGHUP: re-read " in ln]

    wait_for(changed_lines, 10, "the SIGHUP reload line")
    line = changed_lines()[-1]
    assert str(cert) in line and str(users) in line, line
    assert _served_certificate(port) == _der(first_cert.read_bytes())
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP: nothing changed" in p.log_text(), 10, "the second SIGHUP line")
    assert p.alive()
