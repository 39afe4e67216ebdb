"""Helpers for the integration tests that drive a real ``twistd ecrproxy`` process.

Everything runs as real processes on 127.0.0.1: the proxy (``twistd -n ecrproxy``),
the emulated ECR (moto + distribution), skopeo and podman.  This module holds the
pieces the tests share; the fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ecr_twisted.testing.emulator import EmulatedECR, _parent_death_preexec
from ecr_twisted.testing.doubles import proc_status
from ecr_twisted.testing.images import ImageInfo, skopeo_copy

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TWISTD = pathlib.Path(sys.executable).parent / "twistd"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_ACCEPT = ", ".join([DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX])
MIB = 1 << 20

#: Every proxy started by the tests and not stopped yet; failing tests print their logs.
LIVE_PROXIES: list[Proxy] = []


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1, never the same one twice in a session.

    The kernel may give the same ephemeral port to two binds in a row once the first
    socket is closed, so ports handed out before are skipped. (A tiny race remains
    until the child binds the port.)
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no fresh free port found")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def sha256_file(path: os.PathLike[str] | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def secret_forms(password: str) -> list[str]:
    """Ways a password can leak: itself, base64 of ``AWS:<pw>`` (the token), base64 of the password."""
    return [
        password,
        base64.b64encode(f"AWS:{password}".encode()).decode(),
        base64.b64encode(password.encode()).decode(),
    ]


def assert_no_secret(text: str | bytes, passwords: Iterable[str], where: str) -> None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for pw in passwords:
        for i, form in enumerate(secret_forms(pw)):
            # a 40-character slice is enough to count as a leak (and to catch truncated copies)
            probe = form[:40]
            assert probe not in text, f"{where} contains a password (form {i})"


# ---------------------------------------------------------------- HTTP
@dataclasses.dataclass
class Response:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def json(self) -> Any:
        return json.loads(self.body)


def connection(url: str, *, timeout: float = 30, context: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    u = urllib.parse.urlsplit(url)
    assert u.hostname is not None and u.port is not None, url
    if u.scheme == "https":
        return http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout, context=context)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def target_of(url: str) -> str:
    u = urllib.parse.urlsplit(url)
    return (u.path or "/") + (f"?{u.query}" if u.query else "")


def http_request(
    url: str,
    method: str = "GET",
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | Iterable[bytes] | None = None,
    encode_chunked: bool = False,
    password: str | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 30,
) -> Response:
    """One request on a fresh connection; never follows redirects."""
    conn = connection(url, timeout=timeout, context=context)
    hdrs = dict(headers or {})
    if password is not None:
        hdrs["Authorization"] = "Basic " + base64.b64encode(f"AWS:{password}".encode()).decode()
    try:
        conn.request(method, target_of(url), body=body, headers=hdrs, encode_chunked=encode_chunked)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, resp.headers, data)
    finally:
        conn.close()


def raw_exchange(port: int, request: bytes, *, timeout: float = 15) -> bytes:
    """Send raw bytes, read until the server closes; for checks below http.client's level."""
    out = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            out += data
    return bytes(out)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Bounded polling: return the first truthy value of ``predicate()``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, http.client.HTTPException) as e:
            last_exc = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


# ---------------------------------------------------------------- metrics
def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus text exposition."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def metric(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    """The sample of `name` with these labels; labels not given are summed over (the `upstream`
    label of a proxy with one upstream is "default"). None: no such sample."""
    exact = samples.get((name, tuple(sorted(labels.items()))))
    if exact is not None:
        return exact
    wanted = labels.items()
    found = [v for (n, have), v in samples.items() if n == name and wanted <= dict(have).items()]
    return sum(found) if found else None


def metric_sum(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """`metric`, 0 when there is no such sample."""
    return metric(samples, name, **labels) or 0.0


def label_values(samples: Mapping[tuple[str, tuple[tuple[str, str], ...]], float], label: str) -> set[str]:
    """Every value ``label`` takes in an exposition (e.g. the ``upstream`` names of a multi-registry proxy)."""
    return {v for (_, ls) in samples for k, v in ls if k == label}


# ---------------------------------------------------------------- the proxy process
class Proxy:
    """One ``twistd -n ecrproxy`` process, its log file and its ports."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        log_path: pathlib.Path,
        *,
        port: int | None,
        metrics_port: int | None,
        scheme: str = "http",
        name: str = "proxy",
        argv0: Sequence[str] | None = None,
    ) -> None:
        self.args = list(args)
        self.env = dict(env)
        self.log_path = log_path
        self.port = port
        self.metrics_port = metrics_port
        self.scheme = scheme
        self.name = name
        self.argv0 = list(argv0) if argv0 is not None else [str(TWISTD)]
        #: how many token keepers each process has (a proxy with an upstream list: one per upstream)
        self.token_keepers = 1
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- addresses
    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as skopeo/podman references want it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def command(self) -> list[str]:
        return [*self.argv0, *self.args]

    # -- lifecycle
    def start(self, wait: str | None = "ready", timeout: float = READY_TIMEOUT) -> Proxy:
        """Start; ``wait``: "ready" (/readyz 200), "token" (a token was fetched), "healthz", or None."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.log_path.parent,
            preexec_fn=_parent_death_preexec(),
        )
        LIVE_PROXIES.append(self)
        if wait is None:
            return self
        try:
            self.wait_ready(wait, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, wait: str = "ready", timeout: float = READY_TIMEOUT) -> None:
        assert self.metrics_port is not None, "waiting needs --metrics-port"

        def probe() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode if self.proc else '?'}; log:\n{self.log_tail()}"
                )
            if wait == "ready":
                if self.ops("/readyz").status != 200:
                    return False
                # under ECRTEST_WORKERS=N a proxy is ready when every process holds a token
                # (children listen only then); tests that count refreshes start from there
                # (summed over the upstream label of a proxy with several upstreams: one token each)
                refreshed = metric_sum(self.metrics(), "ecrproxy_token_refresh_total", result="success")
                return refreshed >= TEST_WORKERS * self.token_keepers
            if wait == "healthz":
                return self.ops("/healthz").status == 200
            if wait == "token":
                return self.metric_sum("ecrproxy_token_refresh_total", result="success") >= 1
            raise ValueError(wait)

        try:
            wait_for(probe, timeout, f"{self.name} to be {wait}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nlog tail:\n{self.log_tail()}") from None

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit status."""
        proc = self.proc
        rc = None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT)
            rc = proc.returncode
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        if self in LIVE_PROXIES:
            LIVE_PROXIES.remove(self)
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- observation
    def log_text(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 6000) -> str:
        return self.log_text()[-n:]

    def proc_status(self) -> dict[str, int]:
        """VmRSS/VmHWM/... of the process, in bytes."""
        return proc_status(self.pid)

    def rss(self) -> int:
        return self.proc_status()["VmRSS"]

    def hwm(self) -> int:
        return self.proc_status()["VmHWM"]

    def ops(self, path: str, method: str = "GET") -> Response:
        return http_request(self.metrics_url + path, method, timeout=10)

    def metrics_text(self) -> str:
        r = self.ops("/metrics")
        assert r.status == 200, r
        return r.body.decode("utf-8")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_metrics(self.metrics_text())

    def metric(self, name: str, **labels: str) -> float | None:
        return metric(self.metrics(), name, **labels)

    def metric_sum(self, name: str, **labels: str) -> float:
        """Summed over the labels not given (e.g. ``upstream`` of the token and upstream series)."""
        return metric_sum(self.metrics(), name, **labels)

    def request(self, path: str, method: str = "GET", **kw: Any) -> Response:
        return http_request(self.url + path, method, **kw)


#: the emulator's blob storage is moto's S3 at http://localhost:PORT (the registry itself is always
#: allowed): every test proxy may follow blob redirects there, and to nothing else
TEST_STORAGE_HOSTS = "http://localhost:*"

#: every test proxy runs this many processes (make test runs the suite with 1 and with 2)
TEST_WORKERS = int(os.environ.get("ECRTEST_WORKERS") or 1)


def proxy_env(ecr: EmulatedECR, *, extra: Mapping[str, str] | None = None, drop: Iterable[str] = ()) -> dict[str, str]:
    """os.environ + the emulator's AWS variables + PYTHONPATH=repo root (finds twisted/plugins)."""
    env = dict(os.environ)
    # never let the user's/CI's own settings leak into a test proxy
    for k in list(env):
        if k.startswith("ECRPROXY_") or k.startswith("AWS_ENDPOINT_URL"):
            del env[k]
    env.update(ecr.env())
    # ECRTEST_WORKERS=N runs every test proxy with --workers N (make test runs the suite both ways)
    if os.environ.get("ECRTEST_WORKERS"):
        env["ECRPROXY_WORKERS"] = os.environ["ECRTEST_WORKERS"]
    # a test proxy stopped with transfers still open drains for at most 3 s, not the default 30 s,
    # so teardown (SIGTERM, then SIGKILL after STOP_TIMEOUT) stays fast; --drain-timeout wins
    env["ECRPROXY_DRAIN_TIMEOUT"] = "3"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    for k in drop:
        env.pop(k, None)
    return env


class ProxyFactory:
    """Starts proxies against an emulator; ``close()`` stops all of them."""

    def __init__(self, tmp_dir: pathlib.Path) -> None:
        self.tmp_dir = tmp_dir
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.proxies: list[Proxy] = []
        self._n = 0

    def __call__(
        self,
        ecr: EmulatedECR,
        *extra: str,
        blob_mode: str | None = None,
        upstream: str | None = None,
        anonymous: bool = True,
        port_spec: str | None = None,
        port: int | None = None,
        scheme: str = "http",
        metrics: bool = True,
        ecr_endpoint_flag: bool = False,
        env_extra: Mapping[str, str] | None = None,
        env_drop: Iterable[str] = (),
        with_region: bool = True,
        wait: str | None = "ready",
        argv0: Sequence[str] | None = None,
        start: bool = True,
        storage_hosts: str | None = TEST_STORAGE_HOSTS,
    ) -> Proxy:
        self._n += 1
        name = f"proxy{self._n}"
        if port_spec is None:
            port = port or free_port()
            port_spec = f"tcp:{port}:interface=127.0.0.1"
        metrics_port = free_port() if metrics else None
        args = ["-n", "--pidfile=", "ecrproxy"]
        if port_spec:
            args += ["--port", port_spec]
        if anonymous:
            args.append("--anonymous")
        if with_region:
            args += ["--region", ecr.region, "--registry-id", ecr.registry_id]
        args += ["--upstream", upstream or ecr.upstream_url]
        if metrics_port is not None:
            args += ["--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1"]
        if blob_mode is not None:
            args += ["--blob-mode", blob_mode]
        if storage_hosts is not None:
            args += ["--storage-hosts", storage_hosts]
        drop = list(env_drop)
        if ecr_endpoint_flag:
            args += ["--ecr-endpoint-url", ecr.ecr_endpoint_url]
            drop.append("AWS_ENDPOINT_URL_ECR")
        args += list(extra)
        log_path = self.tmp_dir / f"{name}.log"
        proxy = Proxy(
            args,
            proxy_env(ecr, extra=env_extra, drop=drop),
            log_path,
            port=port,
            metrics_port=metrics_port,
            scheme=scheme,
            name=name,
            argv0=argv0,
        )
        self.proxies.append(proxy)
        if start:
            proxy.start(wait=wait)
        return proxy

    def from_config(
        self,
        ecr: EmulatedECR,
        config: pathlib.Path,
        *extra: str,
        token_keepers: int = 1,
        anonymous: bool = True,
        wait: str | None = "ready",
        env_extra: Mapping[str, str] | None = None,
        env_drop: Iterable[str] = ("AWS_ENDPOINT_URL_ECR",),
    ) -> Proxy:
        """A proxy configured by ``--config FILE`` (its upstream list) rather than --registry-id/--upstream.

        ``ecr`` gives the environment (its account's AWS keys); its ECR endpoint variable is dropped by
        default, so the upstreams' own ``ecr-endpoint-url`` keys are what reach moto.
        """
        self._n += 1
        name = f"proxy{self._n}"
        port, metrics_port = free_port(), free_port()
        args = ["-n", "--pidfile=", "ecrproxy", "--config", str(config),
                "--port", f"tcp:{port}:interface=127.0.0.1",
                "--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1"]
        if anonymous:
            args.append("--anonymous")
        args += list(extra)
        proxy = Proxy(args, proxy_env(ecr, extra=env_extra, drop=env_drop), self.tmp_dir / f"{name}.log",
                      port=port, metrics_port=metrics_port, name=name)
        proxy.token_keepers = token_keepers
        self.proxies.append(proxy)
        proxy.start(wait=wait)
        return proxy

    def close(self) -> None:
        for p in self.proxies:
            p.stop()
        self.proxies.clear()


# ---------------------------------------------------------------- config files (--config)
def toml_value(value: Any) -> str:
    """One TOML value (strings, booleans, numbers, lists of them): enough for test config files."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def write_config(
    path: pathlib.Path, settings: Mapping[str, Any], upstreams: Sequence[Mapping[str, Any]]
) -> pathlib.Path:
    """Write a ``--config`` file: top-level options (names as on the command line), then ``[[upstream]]`` tables."""
    lines = [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    for table in upstreams:
        lines += ["", "[[upstream]]", *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def ecr_upstream(ecr: EmulatedECR, name: str, **keys: Any) -> dict[str, Any]:
    """An ``[[upstream]]`` table for an emulated ECR registry: its account, region, registry URL (the token's
    proxyEndpoint names a fake AWS host) and moto's ECR endpoint; ``keys`` (underscores for dashes) add to it."""
    table: dict[str, Any] = {
        "name": name,
        "registry-id": ecr.registry_id,
        "region": ecr.region,
        "url": ecr.upstream_url,
        "ecr-endpoint-url": ecr.ecr_endpoint_url,
    }
    table.update({k.replace("_", "-"): v for k, v in keys.items()})
    return table


def run_twistd(args: Sequence[str], env: Mapping[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion (usage errors); stdout and stderr merged."""
    return subprocess.run(
        [str(TWISTD), *args],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- RSS sampling
class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread (use as a context manager)."""

    def __init__(self, proxy: Proxy, interval: float = 0.2) -> None:
        self.proxy = proxy
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.samples.append(self.proxy.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(OSError, KeyError):
            self.samples.append(self.proxy.rss())

    @property
    def peak(self) -> int:
        return max(self.samples) if self.samples else 0


def ensure_repositories(ecr: EmulatedECR, *names: str) -> None:
    """Create repositories in the emulator's ECR API (moto): what DescribeRepositories, so _catalog, lists.

    Pushing to the emulated registry does not create them there, as a real ECR push needs them first.
    """
    client = ecr.client("ecr")
    for name in names:
        try:
            client.create_repository(repositoryName=name)
        except client.exceptions.RepositoryAlreadyExistsException:
            pass


# ---------------------------------------------------------------- images
def push_direct(ecr: EmulatedECR, info: ImageInfo, repo: str, timeout: float = 300) -> None:
    """Push straight to the emulated registry (setup for tests that only pull)."""
    skopeo_copy(
        f"oci:{info.layout_dir}:{info.tag}",
        f"docker://{ecr.registry_host}/{repo}:{info.tag}",
        dest_creds=f"AWS:{ecr.password}",
        dest_cert_dir=ecr.ca_file.parent if ecr.ca_file else None,
        timeout=timeout,
    )


def push_via(proxy: Proxy, info: ImageInfo, repo: str, *, cert_dir: pathlib.Path | None = None,
             timeout: float = 300) -> None:
    skopeo_copy(
        f"oci:{info.layout_dir}:{info.tag}",
        f"docker://{proxy.host}/{repo}:{info.tag}",
        dest_cert_dir=cert_dir,
        timeout=timeout,
    )


def pull_via(proxy: Proxy, repo: str, tag: str, dest: pathlib.Path, *, cert_dir: pathlib.Path | None = None,
             src_tls_verify: bool = False, timeout: float = 300) -> None:
    skopeo_copy(
        f"docker://{proxy.host}/{repo}:{tag}",
        f"oci:{dest}:{tag}",
        src_cert_dir=cert_dir,
        src_tls_verify=src_tls_verify,
        timeout=timeout,
    )


def assert_layout_matches(dest: pathlib.Path, tag: str, info: ImageInfo, *, compare_bytes: bool = True) -> None:
    """The pulled OCI layout holds exactly the pushed manifest and blobs (digests recomputed here)."""
    index = json.loads((dest / "index.json").read_text("utf-8"))
    refs = {
        m.get("annotations", {}).get("org.opencontainers.image.ref.name"): m for m in index["manifests"]
    }
    assert tag in refs, index
    assert refs[tag]["digest"] == info.manifest_digest
    manifest_path = dest / "blobs" / "sha256" / info.manifest_digest.split(":", 1)[1]
    assert manifest_path.read_bytes() == info.manifest
    assert sha256_file(manifest_path) == info.manifest_digest
    manifest = json.loads(info.manifest)
    assert [layer["digest"] for layer in manifest["layers"]] == info.layer_digests
    for digest in info.blob_digests:
        path = dest / "blobs" / "sha256" / digest.split(":", 1)[1]
        assert path.is_file(), f"blob {digest} missing from the pulled layout"
        assert sha256_file(path) == digest, f"blob {digest}: pulled bytes have another sha256"
        if compare_bytes:
            assert path.stat().st_size == info.blob_path(digest).stat().st_size
            assert path.read_bytes() == info.blob_path(digest).read_bytes()


# ---------------------------------------------------------------- podman
class Podman:
    """podman with private storage under one temporary directory (root, vfs driver)."""

    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        self.root = base / "root"
        # podman refuses a runroot path longer than 50 characters; pytest's tmp paths are longer
        self.runroot = pathlib.Path(tempfile.mkdtemp(prefix="ecrpm-", dir="/tmp"))
        self.tmpdir = base / "tmp"
        for d in (self.root, self.tmpdir):
            d.mkdir(parents=True, exist_ok=True)
        self.registries_conf = base / "registries.conf"
        # no search registries, no mirrors: only fully qualified references are used
        self.registries_conf.write_text('unqualified-search-registries = []\n', encoding="utf-8")
        self.policy = base / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}), encoding="utf-8")
        self.auth_file = base / "auth.json"
        self.auth_file.write_text('{"auths": {}}', encoding="utf-8")
        self.storage_conf = base / "storage.conf"
        self.storage_conf.write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{self.root}"\nrunroot = "{self.runroot}"\n',
            encoding="utf-8",
        )
        self.env = dict(os.environ)
        self.env.update(
            {
                "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
                "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
                "REGISTRY_AUTH_FILE": str(self.auth_file),
                "TMPDIR": str(self.tmpdir),  # big-image temp files, instead of /var/tmp
            }
        )

    def pull(self, reference: str, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return self.run("pull", "--signature-policy", str(self.policy), *extra, reference, timeout=timeout)

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        cmd = [
            "podman",
            "--root", str(self.root),
            "--runroot", str(self.runroot),
            "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
            "--tmpdir", str(self.tmpdir / "libpod"),
            *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(
                f"podman failed ({proc.returncode}): {' '.join(cmd)}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def cleanup(self) -> None:
        # vfs layers are plain directories; ask podman to drop them so tmp dirs stay small
        with contextlib.suppress(Exception):
            self.run("rmi", "--all", "--force", timeout=60)
        shutil.rmtree(self.runroot, ignore_errors=True)


# ---------------------------------------------------------------- TCP helpers
class RecordingRelay:
    """A plain TCP relay to 127.0.0.1:``target_port`` that records what the server sends back.

    Put between the proxy and the registry to see the registry's response heads exactly
    as the proxy received them.
    """

    def __init__(self, target_port: int, record_limit: int = 1 << 20) -> None:
        self.target_port = target_port
        self.record_limit = record_limit
        self.recorded = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _request_watcher(self) -> Callable[[bytes], None] | None:
        """Per connection: something to see the client-to-server bytes before they are forwarded."""
        return None

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        watch = None if record else self._request_watcher()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if watch is not None:
                    watch(data)
                if record:
                    with self._lock:
                        room = self.record_limit - len(self.recorded)
                        if room > 0:
                            self.recorded += data[:room]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def header_values(self, name: str) -> list[bytes]:
        with self._lock:
            data = bytes(self.recorded)
        return re.findall(rb"\r\n" + re.escape(name.encode()) + rb":[ \t]*([^\r\n]*)\r\n", data, re.IGNORECASE)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()


class _RequestHeads:
    """Request lines in one connection's client-to-server bytes (bodies skipped by Content-Length)."""

    def __init__(self) -> None:
        self.buf = b""
        self.skip = 0

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        self.buf += data
        out: list[tuple[str, str]] = []
        while True:
            if self.skip:
                n = min(self.skip, len(self.buf))
                self.buf, self.skip = self.buf[n:], self.skip - n
                if self.skip:
                    return out
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            lines = self.buf[:end].decode("latin-1").lstrip("\r\n").split("\r\n")
            self.buf = self.buf[end + 4:]
            method, target = lines[0].split(" ")[:2]
            out.append((method, urllib.parse.urlsplit(target).path))
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    self.skip = int(value.strip())


class CountingRelay(RecordingRelay):
    """A RecordingRelay that also keeps (method, path) of every request sent through it, in order."""

    def __init__(self, target_port: int) -> None:
        self.requests: list[tuple[str, str]] = []
        super().__init__(target_port, record_limit=0)

    def _request_watcher(self) -> Callable[[bytes], None]:
        heads = _RequestHeads()

        def watch(data: bytes) -> None:
            seen = heads.feed(data)
            if seen:
                with self._lock:  # recorded before forwarding: counted by the time an answer comes
                    self.requests += seen

        return watch

    def mark(self) -> int:
        with self._lock:
            return len(self.requests)

    def since(self, mark: int = 0) -> list[tuple[str, str]]:
        with self._lock:
            return self.requests[mark:]

    def count(self, method: str, path: str, since: int = 0) -> int:
        return sum(1 for r in self.since(since) if r == (method, path))

    def touching(self, repo: str, since: int = 0) -> list[tuple[str, str]]:
        """Requests about one repository's manifests or blobs."""
        return [r for r in self.since(since) if r[1].startswith(f"/v2/{repo}/")]


Handler = Callable[[socket.socket, str, str, dict[str, str]], bool]


class FakeUpstream:
    """A tiny misbehaving HTTP/1.1 server: ``routes`` maps (method, path prefix) to a handler.

    A handler gets (socket, method, target, headers) and returns whether the connection
    may serve another request.  Unknown requests get a 404 JSON error.
    """

    def __init__(self, routes: Mapping[tuple[str, str], Handler]) -> None:
        self.routes = dict(routes)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.early: dict[int, bytes] = {}
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1024)  # a registry takes bursts; a small backlog would drop SYNs (1-3 s retries)
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, name="fake-upstream", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(30)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                self.requests.append((method, target, headers))
                self.early[sock.fileno()] = buf  # body bytes read with the head, for handlers that read bodies
                path = target.split("?", 1)[0]
                handler = None
                for (m, prefix), h in self.routes.items():
                    if m == method and path.startswith(prefix):
                        handler = h
                        break
                if handler is None:
                    body = b'{"errors":[{"code":"NOT_FOUND","message":"fake"}]}'
                    sock.sendall(
                        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(body) + body
                    )
                    continue
                if not handler(sock, method, target, headers):
                    return
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()


def client_tls_context(ca_file: pathlib.Path | None = None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


@contextlib.contextmanager
def restored_moto_token(ecr: EmulatedECR) -> Iterator[None]:
    """Put back what moto hands out (password and expiry) after the block."""
    password, expires = ecr.moto_password, ecr.moto_expires_at
    try:
        yield
    finally:
        ecr.set_moto_token(password, expires)
