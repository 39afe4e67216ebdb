"""A local emulated AWS ECR made of real processes, for tests and ``make demo``.

Pieces (see shared ECR-NOTES.md, "Emulating ECR on one machine"):

* moto's server (ECR API + S3 on one port), through :mod:`ecr_twisted.testing._motoserver`
  so that GetAuthorizationToken returns a token we control (password + expiry);
* Debian's CNCF distribution 2.8 (``/usr/bin/docker-registry``) with the ``s3``
  storage driver on moto's S3 and ``redirect`` enabled, so blob GET/HEAD answer
  307 to presigned S3 URLs on ``localhost`` (a different host name than the
  registry's ``127.0.0.1``, as with ECR and S3), and htpasswd auth with user
  ``AWS`` and the token's password, so it challenges and authenticates like ECR.

Rotating the token rewrites both the moto token file and the htpasswd file by
atomic rename; distribution stats the htpasswd file on every authenticated
request and reloads it when its mtime changes, so no restart is needed.

Several accounts on one moto (``multi_account=True`` on the first emulator, ``moto_of=first`` on
the others): moto then derives the caller's account from its access key instead of
``MOTO_ACCOUNT_ID``, each emulator gets an IAM access key of its own account (``env()``,
:meth:`EmulatedECR.client`), each its own registry, bucket and password, and the shared token file
holds one token per account. STS's AssumeRole for :meth:`EmulatedECR.role_arn` hands out
credentials moto counts as that account, so only they get that account's token.

Two switches exist for benchmarks only (``bench/run.py``); tests keep the defaults,
which behave like ECR:

* ``storage="filesystem"`` swaps the s3 driver for distribution's ``filesystem``
  driver under the workdir: the registry serves blob bytes itself instead of
  redirecting to moto's S3, whose throughput would otherwise cap every client alike;
* ``auth="silly"`` swaps htpasswd for distribution's ``silly`` access controller:
  requests without ``Authorization`` still get 401, but any value is accepted, so
  no bcrypt check (about a millisecond of CPU each) caps small requests for every
  client alike.

CLI: ``python -m ecr_twisted.testing.emulator --workdir DIR [--tls] [--storage s3|filesystem]
[--auth htpasswd|silly]`` prints one JSON line
with the endpoints and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import pathlib
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import IO, Any

__all__ = ["EmulatedECR", "AUTH_MODES", "DEFAULT_ACCOUNT", "REGISTRY_BINARY", "STORAGE_DRIVERS", "random_password"]

DEFAULT_ACCOUNT = "123456789012"
REGISTRY_BINARY = "/usr/bin/docker-registry"
#: Dummy credentials: moto accepts anything, and botocore needs *some* to sign.
DUMMY_KEY = "testing"
#: distribution 2.8's s3 driver caps multipartcopythresholdsize at 5 GiB; raising it
#: to the cap makes the upload commit a single CopyObject (a 1 GiB commit otherwise
#: takes ~50 s of multipart copies inside moto).
MULTIPART_COPY_THRESHOLD = 5 << 30
#: bcrypt (Go's and python's) only looks at the first 72 bytes of a password.
BCRYPT_MAX_BYTES = 72
#: cost 4 is bcrypt's minimum: each authenticated request to the registry pays it.
BCRYPT_ROUNDS = 4
#: ``s3``: like ECR (blob GETs 307 to presigned moto S3 URLs). ``filesystem``: blobs on local
#: disk, served by the registry itself (benchmarks: moto's S3 would be the bottleneck).
STORAGE_DRIVERS = ("s3", "filesystem")
#: ``htpasswd``: only ``AWS:<current password>`` is let in (bcrypt-checked on every request).
#: ``silly``: a request without ``Authorization`` gets 401, any value is let in (benchmarks).
AUTH_MODES = ("htpasswd", "silly")
READY_TIMEOUT = 20.0
ROTATION_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_ENV_DROPPED_FOR_REGISTRY = ("AWS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")


def random_password(length: int = 3000) -> str:
    """A random ECR-like password: base64 text of ~3000 chars (real ECR tokens are 2-5 KB)."""
    raw = base64.b64encode(secrets.token_bytes((length * 3) // 4 + 3)).decode("ascii")
    return raw[:length]


def _free_port() -> int:
    """Ask the kernel for a free TCP port on 127.0.0.1 (tiny race until the child binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _atomic_write(path: pathlib.Path, data: bytes, *, mtime_ns: int | None = None, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` by rename, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _bcrypt_prefix(password: str) -> bytes:
    return password.encode("utf-8")[:BCRYPT_MAX_BYTES]


def _parent_death_preexec() -> Any:
    """Return a preexec_fn that makes the child get SIGKILL if we die (no orphans).

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, so it is
    only used when starting from the main thread.
    """
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # parent died between fork and prctl
            os._exit(1)

    return preexec


def _make_tls_files(tls_dir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """Create a self-signed CA and a server cert for 127.0.0.1/localhost.

    The CA sits alone in ``tls/ca/ca.crt`` so that directory can be given to
    skopeo/podman as ``--cert-dir`` (they choke on a ``*.key`` without ``*.cert``).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_dir = tls_dir / "ca"
    ca_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=30)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ecr-twisted emulator test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    ca_file = ca_dir / "ca.crt"
    cert_file = tls_dir / "server.crt"
    key_file = tls_dir / "server.key"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _atomic_write(
        key_file,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return ca_file, cert_file, key_file


class EmulatedECR:
    """moto (ECR API + S3) plus distribution on moto's S3: an ECR look-alike on 127.0.0.1.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.  Endpoints are
    known only after :meth:`start` (ports are picked then).
    """

    def __init__(
        self,
        workdir: pathlib.Path,
        *,
        tls: bool = False,
        region: str = "us-east-1",
        account: str = DEFAULT_ACCOUNT,
        password: str | None = None,
        token_lifetime: float = 12 * 3600,
        storage: str = "s3",
        auth: str = "htpasswd",
        delete: bool = False,
        multi_account: bool = False,
        moto_of: EmulatedECR | None = None,
    ) -> None:
        """``multi_account``: moto tells accounts apart by access key (several emulators on it);
        ``moto_of``: use that started ``multi_account`` emulator's moto instead of starting one."""
        if moto_of is not None and not moto_of.multi_account:
            raise ValueError("moto_of needs an emulator started with multi_account=True")
        if storage not in STORAGE_DRIVERS:
            raise ValueError(f"storage must be one of {STORAGE_DRIVERS}, not {storage!r}")
        if auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {AUTH_MODES}, not {auth!r}")
        self.workdir = pathlib.Path(workdir).resolve()
        self.tls = tls
        self.storage = storage
        self.auth = auth
        self.delete = delete  # distribution's storage.delete.enabled (ECR takes manifest deletes)
        self.region = region
        self.registry_id = account
        self.multi_account: bool = multi_account or moto_of is not None
        self.moto_of = moto_of
        #: Credentials moto counts as ``account`` (an IAM key of that account in multi-account mode,
        #: known after start(); else the dummy key, which MOTO_ACCOUNT_ID makes this account).
        self.access_key_id = DUMMY_KEY
        self.secret_access_key = DUMMY_KEY
        #: The owner of a shared moto: every account's (password, expiry), written as one token file.
        self._moto_tokens: dict[str, tuple[str, float]] = {}
        self._started = False
        self.token_lifetime = token_lifetime
        #: The password the registry currently accepts (htpasswd).
        self.password: str = password if password is not None else random_password()
        #: The password moto currently hands out, and its expiry (unix seconds).
        self.moto_password: str = self.password
        self.moto_expires_at: float = 0.0
        # several registries on one moto S3 must not share a bucket (nor its repositories)
        self.bucket = (
            f"prod-{region}-{account}-starport-layer-bucket" if self.multi_account
            else f"prod-{region}-starport-layer-bucket"
        )
        self.ca_file: pathlib.Path | None = None
        self._cert_file: pathlib.Path | None = None
        self._key_file: pathlib.Path | None = None
        self._moto_port: int | None = None
        self._registry_port: int | None = None
        self._moto: subprocess.Popen[bytes] | None = None
        self._registry: subprocess.Popen[bytes] | None = None
        self._logs: list[IO[bytes]] = []
        self._http_secret = secrets.token_hex(32)
        self._htpasswd_mtime_ns = 0
        self._lock = threading.RLock()
        self._atexit_registered = False

        self.token_file: pathlib.Path = moto_of.token_file if moto_of is not None else self.workdir / "moto-token.json"
        self.htpasswd_file = self.workdir / "htpasswd"
        self.registry_config = self.workdir / "registry-config.yml"
        self.registry_log = self.workdir / "registry.log"
        self.moto_log: pathlib.Path = moto_of.moto_log if moto_of is not None else self.workdir / "moto.log"
        #: Where the ``filesystem`` storage driver keeps blobs and manifests.
        self.storage_dir = self.workdir / "registry-storage"

    # ------------------------------------------------------------------ endpoints
    @property
    def ecr_endpoint_url(self) -> str:
        """ECR API endpoint (moto), for botocore's ``endpoint_url``."""
        return f"http://127.0.0.1:{self._need(self._moto_port)}"

    @property
    def sts_endpoint_url(self) -> str:
        """STS endpoint (the same moto port): AssumeRole for the multi-account tests."""
        return self.ecr_endpoint_url

    def role_arn(self, name: str = "ecr-twisted-test") -> str:
        """A role in this emulator's account; moto's STS lets anyone assume it (it need not exist)."""
        return f"arn:aws:iam::{self.registry_id}:role/{name}"

    def client(self, service: str, **kwargs: Any) -> Any:
        """A botocore client on this emulator's moto that moto counts as this emulator's account."""
        import botocore.session

        session = botocore.session.get_session()
        options: dict[str, Any] = {
            "region_name": self.region,
            "endpoint_url": self.ecr_endpoint_url,
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
            **kwargs,
        }
        return session.create_client(service, **options)

    @property
    def s3_endpoint_url(self) -> str:
        """S3 endpoint (same moto port), named ``localhost`` so presigned URLs change host."""
        return f"http://localhost:{self._need(self._moto_port)}"

    @property
    def upstream_url(self) -> str:
        """The registry (what ``https://<acct>.dkr.ecr.<region>.amazonaws.com`` is in real life)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._need(self._registry_port)}"

    @property
    def registry_host(self) -> str:
        """``127.0.0.1:PORT`` of the registry, as skopeo/podman references want it."""
        return f"127.0.0.1:{self._need(self._registry_port)}"

    @property
    def authorization_token(self) -> str:
        """base64 ``AWS:<password>`` for the registry's current password (as ECR hands out)."""
        return base64.b64encode(f"AWS:{self.password}".encode("utf-8")).decode("ascii")

    @staticmethod
    def _need(port: int | None) -> int:
        if port is None:
            raise RuntimeError("EmulatedECR is not started")
        return port

    def env(self) -> dict[str, str]:
        """Environment variables a proxy process needs to talk to this emulator's ECR API.

        Dummy static credentials (so botocore never tries instance metadata), the
        region, and botocore's per-service endpoint variable.  AWS_CA_BUNDLE is
        deliberately not included.  Meant to be overlaid on ``os.environ``.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL_ECR": self.ecr_endpoint_url,
        }

    def endpoints(self) -> dict[str, Any]:
        """The JSON-able description the CLI prints."""
        return {
            "ecr_endpoint_url": self.ecr_endpoint_url,
            "s3_endpoint_url": self.s3_endpoint_url,
            "upstream_url": self.upstream_url,
            "registry_id": self.registry_id,
            "region": self.region,
            "ca_file": str(self.ca_file) if self.ca_file else None,
            "storage": self.storage,
            "auth": self.auth,
        }

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> EmulatedECR:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start moto, create the bucket, then start the registry; wait until both answer."""
        with self._lock:
            if self._started:
                raise RuntimeError("already started")
            if self.moto_of is not None and not self.moto_of._started:
                raise RuntimeError("start the emulator named by moto_of first")
            if not os.access(REGISTRY_BINARY, os.X_OK):
                raise RuntimeError(f"{REGISTRY_BINARY} not found (apt-get install docker-registry)")
            self.workdir.mkdir(parents=True, exist_ok=True)
            if not self._atexit_registered:
                atexit.register(self.stop)
                self._atexit_registered = True
            try:
                if self.tls and self.ca_file is None:
                    self.ca_file, self._cert_file, self._key_file = _make_tls_files(self.workdir / "tls")
                # keep a token set by set_token()/set_moto_token() before start()
                expires_at = self.moto_expires_at or time.time() + self.token_lifetime
                self.set_moto_token(self.moto_password, expires_at)
                self._write_htpasswd(self.password)
                if self.moto_of is None:
                    self._start_moto()
                else:
                    self._moto_port = self.moto_of._moto_port
                self._started = True
                if self.multi_account:
                    self._create_access_key()
                if self.storage == "s3":
                    self._create_bucket()
                self._registry_port = None
                self.start_registry()
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Terminate (then kill) both processes; safe to call twice and from atexit."""
        with self._lock:
            for proc in (self._registry, self._moto):
                if proc is not None:
                    _terminate(proc)
            self._registry = None
            self._moto = None
            self._started = False
            for f in self._logs:
                with contextlib.suppress(OSError):
                    f.close()
            self._logs = []
            if self._atexit_registered:
                atexit.unregister(self.stop)
                self._atexit_registered = False

    def kill_registry(self) -> None:
        """SIGKILL the registry (for "upstream dies mid-body" tests); its port stays reserved."""
        with self._lock:
            proc = self._registry
            self._registry = None
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)

    def start_registry(self) -> None:
        """(Re)start the registry, on the same port as before if it ran already; waits for readiness."""
        with self._lock:
            if not self._started:
                raise RuntimeError("start() first")
            if self._registry is not None and self._registry.poll() is None:
                return
            fixed_port = self._registry_port is not None
            attempts = 1 if fixed_port else 3
            for attempt in range(attempts):
                if not fixed_port:
                    self._registry_port = _free_port()
                self._write_registry_config()
                log = open(self.registry_log, "ab")
                self._logs.append(log)
                env = {
                    k: v
                    for k, v in os.environ.items()
                    if k not in _ENV_DROPPED_FOR_REGISTRY and not k.startswith(("REGISTRY_", "AWS_"))
                }
                self._registry = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(self.registry_config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    cwd=self.workdir,
                    preexec_fn=_parent_death_preexec(),
                )
                try:
                    self._wait_ready(self._registry, self._registry_ready, self.registry_log, "registry")
                    return
                except _ProcessExited:
                    if attempt == attempts - 1:
                        raise

    # ------------------------------------------------------------------ tokens
    def set_token(self, password: str, expires_at: float) -> None:
        """Rotate the token everywhere: moto hands out ``password`` and the registry accepts only it.

        Returns once the running registry accepts the new password and rejects the
        old one (bounded by ROTATION_TIMEOUT).
        """
        self.set_moto_token(password, expires_at)
        self.set_registry_password(password)

    def set_moto_token(self, password: str, expires_at: float) -> None:
        """Change only what GetAuthorizationToken returns to this account (moto re-reads the file on each call)."""
        owner = self.moto_of or self
        owner._write_moto_token(self.registry_id, password, float(expires_at))
        self.moto_password = password
        self.moto_expires_at = float(expires_at)

    def _write_moto_token(self, account: str, password: str, expires_at: float) -> None:
        """One token file for every account on this moto: the owner's token on top, each account's under it."""
        with self._lock:
            self._moto_tokens[account] = (password, expires_at)
            top = self._moto_tokens.get(self.registry_id, (password, expires_at))
            data: dict[str, Any] = {"password": top[0], "expires_at": top[1]}
            if self.multi_account:
                data["accounts"] = {a: {"password": p, "expires_at": e} for a, (p, e) in self._moto_tokens.items()}
            self.workdir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.token_file, json.dumps(data).encode("utf-8"))

    def set_registry_password(self, password: str) -> None:
        """Change only the password the registry accepts; waits until the running registry applies it.

        bcrypt only looks at the first 72 bytes: a new password sharing them with
        the old one cannot make the old one fail, so that check is skipped then.
        """
        with self._lock:
            old = self.password
            self._write_htpasswd(password)
            self.password = password
            if self._registry is None or self._registry.poll() is not None or self.auth != "htpasswd":
                return
        check_old = old if _bcrypt_prefix(old) != _bcrypt_prefix(password) else None
        deadline = time.monotonic() + ROTATION_TIMEOUT
        last: tuple[int | None, int | None] = (None, None)
        while True:
            try:
                new_status = self._v2_status(password)
                old_status = self._v2_status(check_old) if check_old is not None else 401
                last = (new_status, old_status)
                if new_status == 200 and old_status == 401:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"registry did not apply the new password within {ROTATION_TIMEOUT}s "
                    f"(new/old password answered {last})"
                )
            time.sleep(0.05)

    def _write_htpasswd(self, password: str) -> None:
        """Write ``AWS:<bcrypt>``; bump mtime strictly, since distribution reloads on mtime change only."""
        import bcrypt

        hashed = bcrypt.hashpw(_bcrypt_prefix(password), bcrypt.gensalt(rounds=BCRYPT_ROUNDS))
        mtime_ns = max(time.time_ns(), self._htpasswd_mtime_ns + 1_000_000)
        self._htpasswd_mtime_ns = mtime_ns
        self.workdir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.htpasswd_file, b"AWS:" + hashed + b"\n", mtime_ns=mtime_ns, mode=0o644)

    # ------------------------------------------------------------------ internals
    def _start_moto(self) -> None:
        src_root = str(pathlib.Path(__file__).resolve().parents[2])  # the directory holding ecr_twisted/
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH", "")) if p)
        if self.multi_account:
            env.pop("MOTO_ACCOUNT_ID", None)  # the account comes from each request's access key
        else:
            env["MOTO_ACCOUNT_ID"] = self.registry_id
        env["PYTHONUNBUFFERED"] = "1"
        for attempt in range(3):
            self._moto_port = _free_port()
            log = open(self.moto_log, "ab")
            self._logs.append(log)
            self._moto = subprocess.Popen(
                [
                    sys.executable, "-m", "ecr_twisted.testing._motoserver",
                    "--host", "127.0.0.1", "--port", str(self._moto_port),
                    "--token-file", str(self.token_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.workdir,
                preexec_fn=_parent_death_preexec(),
            )
            try:
                self._wait_ready(self._moto, self._moto_ready, self.moto_log, "moto")
                return
            except _ProcessExited:
                if attempt == 2:
                    raise

    def _moto_ready(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self._need(self._moto_port), timeout=2)
        try:
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            return True
        finally:
            conn.close()

    def _create_access_key(self) -> None:
        """An IAM user and access key in this account: moto counts requests signed with it as this account."""
        import botocore.session

        iam = botocore.session.get_session().create_client(
            "iam", region_name="us-east-1", endpoint_url=self.ecr_endpoint_url,
            aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_KEY,
        )

        def in_account(request: Any, **_: Any) -> None:
            request.headers["x-moto-account-id"] = self.registry_id

        iam.meta.events.register("before-sign.iam", in_account)
        user = f"ecr-twisted-{self.registry_id}"
        try:
            iam.create_user(UserName=user)
        except iam.exceptions.EntityAlreadyExistsException:
            pass
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self.access_key_id = key["AccessKeyId"]
        self.secret_access_key = key["SecretAccessKey"]

    def _create_bucket(self) -> None:
        import botocore.config
        import botocore.session

        session = botocore.session.get_session()
        s3 = session.create_client(
            "s3",
            region_name=self.region,
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=DUMMY_KEY,
            aws_secret_access_key=DUMMY_KEY,
            config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            s3.create_bucket(**kwargs)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass

    def _write_registry_config(self) -> None:
        """distribution config as JSON (a YAML subset), regenerated on each (re)start."""
        http_cfg: dict[str, Any] = {
            "addr": f"127.0.0.1:{self._need(self._registry_port)}",
            "secret": self._http_secret,
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.tls:
            assert self._cert_file is not None and self._key_file is not None
            http_cfg["tls"] = {"certificate": str(self._cert_file), "key": str(self._key_file)}
        storage: dict[str, Any]
        if self.storage == "filesystem":
            self.storage_dir.mkdir(parents=True, exist_ok=True)
            storage = {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "redirect": {"disable": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            }
        else:
            storage = {
                "s3": {
                    "accesskey": DUMMY_KEY,
                    "secretkey": DUMMY_KEY,
                    "region": self.region,
                    "regionendpoint": self.s3_endpoint_url,
                    "bucket": self.bucket,
                    "secure": False,
                    "v4auth": True,
                    "multipartcopythresholdsize": MULTIPART_COPY_THRESHOLD,
                },
                "redirect": {"disable": False},
                "maintenance": {"uploadpurging": {"enabled": False}},
            }
        realm = f"https://{self.registry_id}.dkr.ecr.{self.region}.amazonaws.com/"
        auth: dict[str, Any]
        if self.auth == "silly":
            auth = {"silly": {"realm": realm, "service": "ecr"}}
        else:
            auth = {"htpasswd": {"realm": realm, "path": str(self.htpasswd_file)}}
        config = {
            "version": "0.1",
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {**storage, "delete": {"enabled": self.delete}},
            "auth": auth,
            "http": http_cfg,
        }
        _atomic_write(self.registry_config, json.dumps(config, indent=2).encode("utf-8"), mode=0o600)

    def _ssl_context(self) -> ssl.SSLContext:
        assert self.ca_file is not None
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _v2_status(self, password: str | None) -> int:
        """Status of ``GET /v2/`` with Basic ``AWS:password`` (no auth if None)."""
        port = self._need(self._registry_port)
        conn: http.client.HTTPConnection
        if self.tls:
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=3, context=self._ssl_context())
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        headers = {}
        if password is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"AWS:{password}".encode("utf-8")
            ).decode("ascii")
        try:
            conn.request("GET", "/v2/", headers=headers)
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()

    def _registry_ready(self) -> bool:
        return self._v2_status(None) == 401

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], probe: Any, log: pathlib.Path, what: str
    ) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise _ProcessExited(f"{what} exited with {proc.returncode}; log tail:\n{_tail(log)}")
            try:
                if probe():
                    return
            except (OSError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                _terminate(proc)
                raise TimeoutError(f"{what} not ready after {READY_TIMEOUT}s; log tail:\n{_tail(log)}")
            time.sleep(0.05)


class _ProcessExited(RuntimeError):
    """A child exited while we waited for it (e.g. its port was taken meanwhile)."""


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


def _tail(path: pathlib.Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-n:].decode("utf-8", "replace")


def main(argv: list[str] | None = None) -> int:
    """CLI: start the emulator, print its endpoints as one JSON line, run until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="Run a local emulated ECR (moto + distribution).")
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--tls", action="store_true", help="serve the registry over HTTPS with a self-signed CA")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--account", default=DEFAULT_ACCOUNT)
    parser.add_argument("--storage", choices=STORAGE_DRIVERS, default="s3",
                        help="s3 (like ECR: blob GETs redirect to moto's S3) or filesystem (benchmarks)")
    parser.add_argument("--auth", choices=AUTH_MODES, default="htpasswd",
                        help="htpasswd (like ECR: only the token's password) or silly (benchmarks: any)")
    args = parser.parse_args(argv)

    stop_event = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    emu = EmulatedECR(args.workdir, tls=args.tls, region=args.region, account=args.account, storage=args.storage,
                      auth=args.auth)
    emu.start()
    status = 0
    try:
        sys.stdout.write(json.dumps(emu.endpoints()) + "\n")
        sys.stdout.flush()
        while not stop_event.wait(1.0):
            for name, proc in (("moto", emu._moto), ("registry", emu._registry)):
                if proc is not None and proc.poll() is not None:
                    print(f"emulator: {name} exited unexpectedly ({proc.returncode})", file=sys.stderr)
                    status = 1
                    stop_event.set()
    finally:
        emu.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
