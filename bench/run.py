#!/usr/bin/env python3
"""Benchmark: ecr-twisted against nginx and against direct access to the registry.

``make bench`` (or ``.venv/bin/python bench/run.py [--quick]``) starts the local emulated
ECR (moto for tokens + CNCF distribution with the ``filesystem`` storage driver and ``silly``
auth), an nginx reverse proxy configured like the nginx-based ECR proxies
(``bench/nginx.conf.tmpl``) and ``twistd -n ecrproxy``, then measures all three in the same run,
alternating them round-robin (direct, nginx, ecr-twisted, direct, ...) so machine noise hits all
alike:

* pull of one big blob (curl, MB/s = 10^6 bytes/s, median of the runs);
* the same pull with a slow client (curl --limit-rate 100M) and each contender's peak RSS;
* push of the same blob as one streamed PATCH + PUT ?digest= (new repository each run);
* small requests: manifest GET with wrk (req/s, p50/p99), 1 and 2 workers (wrk 4.1 cannot do HEAD);
* the layer cache (``--cache-dir``): the same pull from a fresh, empty cache (miss: streamed from the
  registry while written to disk) and again from disk (hit), against direct and nginx pulls;
* pull and small requests again with TLS on the upstream leg;
* pull and small requests again in front of a fast stub upstream (``bench/stub.conf.tmpl``,
  nginx answering like the registry), since distribution itself caps small requests at ~1k/s.

Peak RSS is the sum over each contender's processes (nginx master + workers, twistd main +
workers), sampled from /proc every 0.1 s; the per-process high-water mark (VmHWM, reset via
/proc/PID/clear_refs before each measurement) catches spikes between samples.

Results: a table on stdout, and bench/results/{results.json,results.png,results.md}
(``--quick`` writes to .work/bench/quick-results/ unless --results is given).
See bench/README.md for the design decisions.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime
import functools
import gzip
import hashlib
import http.client
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
NGINX_TEMPLATE = BENCH_DIR / "nginx.conf.tmpl"
STUB_TEMPLATE = BENCH_DIR / "stub.conf.tmpl"
STATIC_TEMPLATE = BENCH_DIR / "static.conf.tmpl"
SMALL_LUA = BENCH_DIR / "small.lua"
TWISTD = pathlib.Path(sys.executable).parent / "twistd"

if "--source" in sys.argv[1:]:
    # (before the imports below) the working tree's ecr_twisted, for run.py as for twistd; see --source
    sys.path.insert(0, str(REPO))

from ecr_twisted.testing.emulator import EmulatedECR, _parent_death_preexec  # noqa: E402  (installed in .venv)
from ecr_twisted.testing import doubles as testing  # noqa: E402

MIB = 1 << 20
MB = 1_000_000
CONTENDERS = ("direct", "nginx", "ecr-twisted")
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
SLOW_RATE = "100M"  # curl --limit-rate: 100 MiB/s
RSS_INTERVAL = 0.1
TREE_REFRESH = 1.0  # seconds between re-reading a contender's process tree
WRK_THREADS = 2
WRK_CONNECTIONS = 64
WRK_WARMUP_S = 1
NGINX_BUFFER = "256k"
#: wrk 4.1 cannot count HEAD responses (it waits for the Content-Length body), so the small
#: request is a GET of the same manifest (bench/small.lua; see bench/README.md).
SMALL_METHOD = "GET"
SCENARIOS = ("pull", "slow", "push", "small", "small-full", "cache", "cache-digest", "conns", "tls", "stub")
#: the conns scenario: this many concurrent keep-alive connections (wrk -c)
CONNS_CONNECTIONS = 1000
#: the small-full scenario's client login (htpasswd with a bcrypt hash; the client repeats it every request)
FULL_USER = "bench"
FULL_PASSWORD = "bench-password-0123456789"
#: --cache-size for the cache scenario: far above the blob, so nothing is evicted
CACHE_SIZE = "50GiB"
#: how long the cache scenario waits after the miss for the fill to be committed (tmp/ -> blobs/)
CACHE_COMMIT_WAIT = 10.0

#: Targets (ecr-twisted against nginx, and absolute limits).
PULL_PLAIN_VS_NGINX = 0.9
PULL_TLS_VS_NGINX = 0.6
PUSH_VS_NGINX = 0.9
SMALL_VS_NGINX = 0.5
SMALL_FULL_VS_NGINX = 0.4
CACHE_DIGEST_VS_NGINX = 0.5
CACHE_HIT_VS_DISK = 0.9
CACHE_MISS_VS_NGINX = 0.9
RSS_CONNS_LIMIT_MIB = 128.0
P99_LIMIT_MS = 20.0
P99_VS_NGINX = 2.0
RSS_PER_WORKER_LIMIT_MIB = 64.0


# ---------------------------------------------------------------- output
def say(msg: str = "") -> None:
    print(msg, flush=True)


def progress(msg: str) -> None:
    say(f"[{time.strftime('%H:%M:%S')}] {msg}")


# ---------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return data.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: starttime


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pids: Sequence[int]) -> dict[int, tuple[int, int, int]]:
    """pid -> (start time, utime, stime) in clock ticks, from /proc/PID/stat (gone pids left out)."""
    out = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            out[pid] = (int(fields[19]), int(fields[11]), int(fields[12]))  # stat fields 22, 14, 15
    return out


class CpuMeter:
    """user+sys CPU of a contender's process tree (all its processes) between entry and exit.

    A process that started in between counts from zero; one that ended in between is lost (its
    ticks cannot be read any more): none do in a steady wrk run."""

    def __init__(self, roots: Sequence[int]) -> None:
        self.roots = list(roots)
        self.before: dict[int, tuple[int, int, int]] = {}
        self.used: dict[int, tuple[float, float]] = {}  # pid -> (user s, sys s)

    def __enter__(self) -> CpuMeter:
        self.before = cpu_ticks(process_tree(self.roots))
        return self

    def __exit__(self, *exc: object) -> None:
        for pid, (started, user, system) in cpu_ticks(process_tree(self.roots)).items():
            b = self.before.get(pid)
            if b is not None and b[0] == started:
                user, system = user - b[1], system - b[2]
            self.used[pid] = (user / CLK_TCK, system / CLK_TCK)

    def as_json(self, requests: int | None) -> dict[str, Any]:
        """Totals, µs per request, and each process's share (the spread across workers)."""
        user = sum(u for u, _ in self.used.values())
        system = sum(s for _, s in self.used.values())
        total = user + system
        per = [{"pid": pid, "role": "main" if pid in self.roots else "child", "cpu_s": round(u + s, 2),
                "share": round((u + s) / total, 3) if total else None}
               for pid, (u, s) in sorted(self.used.items(), key=lambda kv: (kv[0] not in self.roots, kv[0]))]
        n = requests or 0
        return {
            "user_s": round(user, 2), "sys_s": round(system, 2), "requests": n,
            "us_per_request": round(total * 1e6 / n, 1) if n else None,
            "user_us_per_request": round(user * 1e6 / n, 1) if n else None,
            "sys_us_per_request": round(system * 1e6 / n, 1) if n else None,
            "clock_ticks_per_s": CLK_TCK, "processes": per,
        }


def spread_text(cpu: dict[str, Any]) -> str:
    """'main 52%, child 48%': each process's share of the contender's CPU."""
    return ", ".join(f"{p['role']} {100 * p['share']:.0f}%" for p in cpu.get("processes", [])
                     if p["share"] is not None)


def process_tree(roots: Sequence[int]) -> list[int]:
    """``roots`` and all their descendants that are alive now (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [r for r in roots if os.path.exists(f"/proc/{r}")]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def proc_status(pid: int) -> dict[str, int]:
    """Memory sizes of a process; {} once it is gone (sampling races with process exits)."""
    try:
        return testing.proc_status(pid)
    except OSError:
        return {}


class Processes:
    """Every long-running process the benchmark starts; ``stop_all()`` ends them (and their children)."""

    def __init__(self) -> None:
        self.live: list[tuple[str, subprocess.Popen[bytes], Any]] = []

    def spawn(self, name: str, argv: Sequence[str], *, log_path: pathlib.Path,
              env: dict[str, str] | None = None, cwd: pathlib.Path | None = None) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=cwd, start_new_session=True, preexec_fn=_parent_death_preexec(),
            )
        except BaseException:
            log.close()
            raise
        self.live.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Signal ``proc``, wait (then SIGKILL); then SIGKILL any of its children still alive."""
        kids = [(pid, start_time(pid)) for pid in process_tree([proc.pid]) if pid != proc.pid]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        deadline = time.monotonic() + STOP_TIMEOUT
        for pid, started in kids:
            # same pid and same start time: still the child we saw, not a reused pid
            while started is not None and start_time(pid) == started and time.monotonic() < deadline:
                time.sleep(0.05)
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for i, (_, p, log) in enumerate(self.live):
            if p is proc:
                with contextlib.suppress(OSError):
                    log.close()
                del self.live[i]
                break

    def stop_all(self) -> None:
        for _, proc, _ in list(reversed(self.live)):
            with contextlib.suppress(Exception):
                self.stop(proc)


PROCS = Processes()


# ---------------------------------------------------------------- RSS
class RssSampler:
    """Peak of the summed VmRSS of a process tree, sampled every 0.1 s, plus per-process peaks.

    Each process's VmHWM is reset (``echo 5 > /proc/PID/clear_refs``) on entry and read on
    exit, so a spike between two samples still counts for the per-process peak.
    """

    def __init__(self, roots: Sequence[int], interval: float = RSS_INTERVAL) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak_total = 0
        self.per_process: dict[int, int] = {}
        self.samples = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _reset_hwm(self, pids: Sequence[int]) -> bool:
        ok = bool(pids)
        for pid in pids:
            try:
                with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
                    f.write("5")
            except OSError:
                ok = False
        return ok

    def _sample(self, pids: Sequence[int]) -> None:
        total = 0
        for pid in pids:
            rss = proc_status(pid).get("VmRSS", 0)
            total += rss
            if rss > self.per_process.get(pid, 0):
                self.per_process[pid] = rss
        self.samples += 1
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        pids: list[int] = []
        refreshed = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - refreshed >= TREE_REFRESH:
                pids, refreshed = process_tree(self.roots), now
            self._sample(pids)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        if self.roots:
            self.hwm_reset = self._reset_hwm(process_tree(self.roots))
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.roots:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        pids = process_tree(self.roots)
        self._sample(pids)
        if self.hwm_reset:
            for pid in pids:
                hwm = proc_status(pid).get("VmHWM", 0)
                if hwm > self.per_process.get(pid, 0):
                    self.per_process[pid] = hwm

    @property
    def peak_process(self) -> int:
        return max(self.per_process.values(), default=0)


@dataclasses.dataclass
class RssPeak:
    """Peaks over every measurement of one contender in one scenario."""

    total: int = 0
    process: int = 0
    processes: int = 0
    samples: int = 0
    hwm_reset: bool = True

    def add(self, s: RssSampler) -> None:
        self.total = max(self.total, s.peak_total)
        self.process = max(self.process, s.peak_process)
        self.processes = max(self.processes, len(s.per_process))
        self.samples += s.samples
        self.hwm_reset = self.hwm_reset and s.hwm_reset

    def as_json(self) -> dict[str, Any]:
        return {
            "peak_total_mib": round(self.total / MIB, 1),
            "peak_per_process_mib": round(self.process / MIB, 1),
            "processes": self.processes,
            "samples": self.samples,
            "vmhwm_reset": self.hwm_reset,
        }


# ---------------------------------------------------------------- contenders
@dataclasses.dataclass
class Endpoint:
    """What a client talks to: the registry itself, or one of the proxies in front of it."""

    name: str
    base_url: str
    basic_user: str | None = None  # "AWS:<password>": only direct access authenticates itself
    cacert: str | None = None  # only direct access over TLS talks TLS to the client
    roots: list[int] = dataclasses.field(default_factory=list)  # pids whose trees are sampled
    proc: subprocess.Popen[bytes] | None = None
    log_path: pathlib.Path | None = None
    start_error: str = ""  # set when the contender could not be started: every measurement fails

    def rss_now(self) -> tuple[int, int]:
        """(sum of VmRSS, number of processes) of the contender's process tree now."""
        pids = process_tree(self.roots)
        return sum(proc_status(pid).get("VmRSS", 0) for pid in pids), len(pids)

    def url(self, path: str) -> str:
        return self.base_url + path

    def curl_auth(self) -> list[str]:
        out: list[str] = []
        if self.basic_user:
            out += ["-u", self.basic_user]
        if self.cacert:
            out += ["--cacert", self.cacert]
        return out

    def authorization(self) -> str:
        if not self.basic_user:
            return ""
        return "Basic " + base64.b64encode(self.basic_user.encode()).decode()

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""


def http_call(url: str, method: str = "GET", *, headers: dict[str, str] | None = None,
              body: bytes | None = None, cafile: str | None = None,
              timeout: float = 30) -> tuple[int, http.client.HTTPMessage, bytes]:
    u = urllib.parse.urlsplit(url)
    assert u.hostname and u.port, url
    conn: http.client.HTTPConnection
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=cafile)
        conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    target = (u.path or "/") + (f"?{u.query}" if u.query else "")
    try:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def wait_ready(ep: Endpoint, *, consecutive: int = 1) -> None:
    """Until ``GET /v2/`` answers 200 ``consecutive`` times in a row (fresh connections)."""
    deadline = time.monotonic() + READY_TIMEOUT
    streak, last = 0, ""
    headers = {"Authorization": ep.authorization()} if ep.basic_user else {}
    while streak < consecutive:
        if not ep.alive():
            raise RuntimeError(f"{ep.name} exited ({ep.proc.returncode if ep.proc else '?'}):\n{ep.log_tail()}")
        try:
            status, _, _ = http_call(ep.url("/v2/"), headers=headers, cafile=ep.cacert, timeout=5)
            last = str(status)
            streak = streak + 1 if status == 200 else 0
        except (OSError, http.client.HTTPException) as e:
            streak, last = 0, repr(e)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ep.name} not ready after {READY_TIMEOUT}s (last: {last}):\n{ep.log_tail()}")
        if streak < consecutive:
            time.sleep(0.05 if streak else 0.2)


@dataclasses.dataclass
class Upstream:
    """What the proxies forward to: the emulated registry itself, or the fast stub standing in for it."""

    kind: str  # "registry" or "stub"
    url: str
    ecr: EmulatedECR  # tokens (moto) and the password come from the emulator in both cases
    ca_file: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def split(self) -> urllib.parse.SplitResult:
        return urllib.parse.urlsplit(self.url)

    @property
    def tls(self) -> bool:
        return self.split.scheme == "https"


def render(template: pathlib.Path, values: dict[str, str]) -> str:
    text = template.read_text("utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{[A-Z_]+\}\}", text)
    if left:
        raise RuntimeError(f"{template.name}: unreplaced {left}")
    return text


def render_nginx_conf(*, port: int, workers: int, up: Upstream, directory: pathlib.Path) -> str:
    tls = ""
    if up.tls:
        assert up.ca_file is not None
        tls = "\n".join([
            f"        proxy_ssl_trusted_certificate {up.ca_file};",
            "        proxy_ssl_verify on;",
            "        proxy_ssl_verify_depth 2;",
            # the emulator's certificate names 127.0.0.1 (IP SAN) and localhost; nginx checks DNS names
            "        proxy_ssl_name localhost;",
            "        proxy_ssl_server_name on;",
            "        proxy_ssl_session_reuse on;",
            "        proxy_ssl_protocols TLSv1.2 TLSv1.3;",
            "",
        ])
    return render(NGINX_TEMPLATE, {
        "WORKERS": str(workers),
        "DIR": str(directory),
        "PORT": str(port),
        "UPSTREAM_HOSTPORT": up.split.netloc,
        "UPSTREAM_URL": up.url,
        "UPSTREAM_SCHEME": up.split.scheme,
        "UPSTREAM_TLS": tls,
        "TOKEN": up.ecr.authorization_token,
        "BUFFER": NGINX_BUFFER,
    })


def spawn_nginx(name: str, directory: pathlib.Path, conf_text: str) -> subprocess.Popen[bytes]:
    conf = directory / "nginx.conf"
    conf.write_text(conf_text, "utf-8")
    conf.chmod(0o600)  # it may hold the token
    base = ["nginx", "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    test = subprocess.run([*base, "-t", "-q"], capture_output=True, text=True, timeout=30)
    if test.returncode != 0:
        raise RuntimeError(f"nginx -t failed for {conf}:\n{test.stdout}{test.stderr}")
    return PROCS.spawn(name, base, log_path=directory / "stderr.log", cwd=directory)


def fresh_dir(path: pathlib.Path) -> pathlib.Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def start_nginx(up: Upstream, workers: int, workdir: pathlib.Path, label: str) -> Endpoint:
    directory = fresh_dir(workdir / f"nginx-{label}")
    port = free_port()
    proc = spawn_nginx(f"nginx-{label}", directory,
                       render_nginx_conf(port=port, workers=workers, up=up, directory=directory))
    ep = Endpoint("nginx", f"http://127.0.0.1:{port}", roots=[proc.pid], proc=proc, log_path=directory / "error.log")
    try:
        wait_ready(ep, consecutive=4 * workers)
    except BaseException:
        PROCS.stop(proc)
        raise
    return ep


def start_stub(ecr: EmulatedECR, workdir: pathlib.Path, label: str, *, blob: pathlib.Path, blob_digest: str,
               manifest: bytes, manifest_digest: str) -> Upstream:
    """nginx serving the benchmark's blob and manifest like the registry does (see bench/stub.conf.tmpl)."""
    directory = fresh_dir(workdir / f"stub-{label}")
    manifest_file = directory / "manifest.json"
    manifest_file.write_bytes(manifest)
    port = free_port()
    tls = ""
    if ecr.tls:
        assert ecr._cert_file is not None and ecr._key_file is not None
        tls = (f"        ssl_certificate {ecr._cert_file};\n        ssl_certificate_key {ecr._key_file};\n"
               "        ssl_protocols TLSv1.2 TLSv1.3;\n        ssl_session_cache shared:stub:1m;\n")
    text = render(STUB_TEMPLATE, {
        "DIR": str(directory), "PORT": str(port), "SSL": " ssl" if ecr.tls else "", "TLS": tls,
        "MANIFEST_DIGEST": manifest_digest, "MANIFEST_FILE": str(manifest_file),
        "BLOB_DIGEST": blob_digest, "BLOB_FILE": str(blob.resolve()),
    })
    proc = spawn_nginx(f"stub-{label}", directory, text)
    scheme = "https" if ecr.tls else "http"
    up = Upstream("stub", f"{scheme}://127.0.0.1:{port}", ecr, str(ecr.ca_file) if ecr.ca_file else None, proc)
    try:
        wait_ready(direct_endpoint(up))
    except BaseException:
        PROCS.stop(proc)
        raise
    return up


def start_static(workdir: pathlib.Path, label: str, *, blob: pathlib.Path, blob_digest: str,
                 manifest: bytes, manifest_digest: str) -> Endpoint:
    """nginx (1 worker, sendfile) serving the manifest and the blob from disk by digest, as a contender:
    what a cache hit is compared with (bench/static.conf.tmpl)."""
    directory = fresh_dir(workdir / f"static-{label}")
    manifest_file = directory / "manifest.json"
    manifest_file.write_bytes(manifest)
    port = free_port()
    text = render(STATIC_TEMPLATE, {
        "DIR": str(directory), "PORT": str(port),
        "MANIFEST_DIGEST": manifest_digest, "MANIFEST_FILE": str(manifest_file),
        "BLOB_DIGEST": blob_digest, "BLOB_FILE": str(blob.resolve()),
    })
    proc = spawn_nginx(f"static-{label}", directory, text)
    ep = Endpoint("nginx", f"http://127.0.0.1:{port}", roots=[proc.pid], proc=proc, log_path=directory / "error.log")
    try:
        wait_ready(ep)
    except BaseException:
        PROCS.stop(proc)
        raise
    return ep


def proxy_env(ecr: EmulatedECR | None, source: pathlib.Path | None = None) -> dict[str, str]:
    """twistd's environment: the emulator's AWS variables; ``source``: PYTHONPATH=<repo> (--source)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ECRPROXY_", "AWS_")) and k not in ("PYTHONPATH", "HTTP_PROXY", "HTTPS_PROXY",
                                                                       "http_proxy", "https_proxy")}
    if ecr is not None:
        env.update(ecr.env())
    if source is not None:
        env["PYTHONPATH"] = str(source)  # the tree's ecr_twisted and twisted/plugins, like the integration tests
    env["PYTHONUNBUFFERED"] = "1"
    return env


def twistd_command(up: Upstream, port: int, workers: int, extra: Sequence[str] = (),
                   auth: Sequence[str] = ("--anonymous",)) -> list[str]:
    argv = [str(TWISTD), "-n", "--pidfile=", "ecrproxy", *auth,
            "--port", f"tcp:{port}:interface=127.0.0.1",
            "--region", up.ecr.region, "--registry-id", up.ecr.registry_id,
            "--upstream", up.url, "--ecr-endpoint-url", up.ecr.ecr_endpoint_url,
            # the emulator's blob storage: moto's S3 on localhost (the registry itself is always allowed)
            "--storage-hosts", "http://localhost:*"]
    if up.ca_file is not None:
        argv += ["--upstream-ca", up.ca_file]
    if workers > 1:
        argv += ["--workers", str(workers)]
    return argv + list(extra)


def start_ecr_twisted(up: Upstream, workers: int, workdir: pathlib.Path, label: str,
                      extra: Sequence[str] = (), *, auth: Sequence[str] = ("--anonymous",),
                      basic_user: str | None = None, source: pathlib.Path | None = None) -> Endpoint:
    """twistd ecrproxy; its stdout (the access log among the rest) goes to a file, as in production.
    ``basic_user`` ("user:password"): the login the readiness check and wrk send (--auth basic)."""
    directory = fresh_dir(workdir / f"ecr-twisted-{label}")
    port = free_port()
    log = directory / "twistd.log"
    proc = PROCS.spawn(f"ecr-twisted-{label}", twistd_command(up, port, workers, extra, auth), log_path=log,
                       env=proxy_env(up.ecr, source), cwd=directory)
    ep = Endpoint("ecr-twisted", f"http://127.0.0.1:{port}", basic_user=basic_user, roots=[proc.pid], proc=proc,
                  log_path=log)
    try:
        wait_ready(ep, consecutive=4 * workers)
    except BaseException:
        PROCS.stop(proc)
        raise
    return ep


def direct_endpoint(up: Upstream) -> Endpoint:
    return Endpoint("direct", up.url, basic_user=f"AWS:{up.ecr.password}", cacert=up.ca_file)


def twistd_has_workers(source: pathlib.Path | None) -> tuple[bool, str]:
    try:
        out = subprocess.run([str(TWISTD), "ecrproxy", "--help"], capture_output=True, text=True, timeout=120,
                             cwd=BENCH_DIR, env=proxy_env(None, source))
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"twistd ecrproxy --help failed: {e!r}"
    text = out.stdout + out.stderr
    return "--workers" in text, text


def stale_install() -> list[str]:
    """Modules of the working tree's ecr_twisted/ that the imported (installed) package lacks or differs in.

    twistd runs the package installed in .venv (not editable; ``make bench`` refreshes it through
    scripts/venv.sh), so a working tree changed since would otherwise be measured as it was."""
    import ecr_twisted

    installed = pathlib.Path(ecr_twisted.__file__).resolve().parent
    source = REPO / "ecr_twisted"
    if installed == source.resolve():
        return []
    out = []
    for f in sorted(source.rglob("*.py")):
        name = str(f.relative_to(source))
        other = installed / name
        if not other.exists() or other.read_bytes() != f.read_bytes():
            out.append(name)
    return out


# ---------------------------------------------------------------- clients
class CurlError(RuntimeError):
    pass


W_MARK = "=W="  # (a -w format starting with @ would name a file)


def curl(argv: Sequence[str], *, timeout: float = 900) -> tuple[str, dict[str, str], list[str]]:
    """Run curl with ``-D -`` and a ``-w`` line; returns (status line code, last headers, -w fields)."""
    cmd = ["curl", "-sS", "-D", "-", "-o", "/dev/null", "--max-time", str(int(timeout)), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise CurlError(f"curl exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    head_text, _, w = proc.stdout.rpartition(W_MARK)
    blocks = [b for b in re.split(r"\r?\n\r?\n", head_text.strip()) if b.strip()]
    headers: dict[str, str] = {}
    if blocks:
        for line in blocks[-1].splitlines()[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    fields = w.split()
    return fields[0] if fields else "", headers, fields


def curl_pull(ep: Endpoint, path: str, size: int, limit_rate: str | None = None,
              x_cache: str | None = None) -> float:
    """GET a blob to /dev/null; returns curl's speed_download in bytes/s (checks status and size, and
    with ``x_cache`` that the response's ``X-Cache`` header says so: HIT or MISS)."""
    argv = [*ep.curl_auth(), "-w", f"{W_MARK} %{{http_code}} %{{size_download}} %{{speed_download}}"]
    if limit_rate:
        argv += ["--limit-rate", limit_rate]
    code, headers, f = curl([*argv, ep.url(path)])
    if code != "200" or int(f[1]) != size:
        raise CurlError(f"GET {path}: HTTP {code}, {f[1] if len(f) > 1 else '?'} of {size} bytes")
    if x_cache is not None and headers.get("x-cache") != x_cache:
        raise CurlError(f"GET {path}: X-Cache {headers.get('x-cache', '(none)')!r}, expected {x_cache!r}")
    return float(f[2])


def dir_usage(root: pathlib.Path) -> dict[str, int]:
    """Bytes under a cache directory: apparent sizes (``du -sb``) by top-level part, and allocated (``du -s``)."""
    out = {"total_bytes": 0, "allocated_bytes": 0, "blob_bytes": 0, "blob_files": 0, "tmp_bytes": 0,
           "tmp_files": 0, "other_bytes": 0}
    for dirpath, _, files in os.walk(root):
        rel = pathlib.Path(dirpath).relative_to(root).parts
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            out["total_bytes"] += st.st_size
            out["allocated_bytes"] += st.st_blocks * 512
            if rel[:1] == ("blobs",) and not name.endswith(".type"):
                out["blob_bytes"] += st.st_size
                out["blob_files"] += 1
            elif rel[:1] == ("tmp",):
                out["tmp_bytes"] += st.st_size
                out["tmp_files"] += 1
            else:
                out["other_bytes"] += st.st_size
    return out


def resolve(ep: Endpoint, location: str) -> str:
    return urllib.parse.urljoin(ep.base_url + "/", location)


def start_upload(ep: Endpoint, repo: str) -> str:
    code, headers, _ = curl([*ep.curl_auth(), "-X", "POST", "-H", "Content-Length: 0",
                             "-w", f"{W_MARK} %{{http_code}}", ep.url(f"/v2/{repo}/blobs/uploads/")], timeout=60)
    if code != "202" or "location" not in headers:
        raise CurlError(f"POST upload: HTTP {code}")
    return resolve(ep, headers["location"])


def with_query(url: str, **params: str) -> str:
    sep = "&" if urllib.parse.urlsplit(url).query else "?"
    return url + sep + urllib.parse.urlencode(params)


def curl_push(ep: Endpoint, repo: str, blob: pathlib.Path, digest: str, size: int) -> float:
    """POST, one streamed PATCH of the whole file, PUT ?digest=; returns bytes/s over PATCH+PUT."""
    location = start_upload(ep, repo)
    code, headers, f = curl([*ep.curl_auth(), "-X", "PATCH", "-T", str(blob),
                             "-H", "Content-Type: application/octet-stream", "-H", "Expect:",
                             "-w", f"{W_MARK} %{{http_code}} %{{size_upload}} %{{time_total}}", location])
    if code != "202" or int(f[1]) != size or "location" not in headers:
        raise CurlError(f"PATCH: HTTP {code}, sent {f[1] if len(f) > 1 else '?'} of {size} bytes")
    patch_s = float(f[2])
    code, headers, f = curl([*ep.curl_auth(), "-X", "PUT", "-H", "Content-Length: 0",
                             "-w", f"{W_MARK} %{{http_code}} %{{time_total}}",
                             with_query(resolve(ep, headers["location"]), digest=digest)])
    if code != "201" or headers.get("docker-content-digest") != digest:
        raise CurlError(f"PUT ?digest=: HTTP {code}, digest {headers.get('docker-content-digest')}")
    return size / (patch_s + float(f[1]))


WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(text: str) -> dict[str, Any]:
    def latency(pct: str) -> float | None:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        return round(float(m.group(1)) * WRK_UNITS[m.group(2)], 3) if m else None

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(\w+)", text, re.M)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "rps": float(rps.group(1)) if rps else None,
        "requests": int(total.group(1)) if total else None,
        "p50_ms": latency("50"),
        "p75_ms": latency("75"),
        "p90_ms": latency("90"),
        "p99_ms": latency("99"),
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
        "socket_errors_detail": dict(zip(("connect", "read", "write", "timeout"),
                                         (int(x) for x in sock.groups()))) if sock else {},
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def _more_files() -> None:
    """wrk's process: open-file soft limit up to the hard one (the conns scenario keeps 1,000 sockets)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def run_wrk(ep: Endpoint, path: str, duration: int, *, connections: int = WRK_CONNECTIONS,
            allow_errors: bool = False) -> dict[str, Any]:
    """wrk against ``ep``; with ``allow_errors`` non-2xx answers and socket errors are counted, not failures."""
    env = dict(os.environ, BENCH_AUTHORIZATION=ep.authorization(), BENCH_METHOD=SMALL_METHOD)
    cmd = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s",
           "-s", str(SMALL_LUA), ep.url(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, env=env,
                          stdin=subprocess.DEVNULL, preexec_fn=_more_files)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exit {proc.returncode}: {proc.stderr.strip()[:300]}")
    res = parse_wrk(proc.stdout)
    if not res["rps"] or not res["requests"]:
        raise RuntimeError(f"wrk output not understood:\n{proc.stdout[-800:]}")
    if (res["non_2xx"] or res["socket_errors"]) and not allow_errors:
        # a benchmark of error responses is no benchmark: report it as a failure
        raise RuntimeError(f"wrk: {res['non_2xx']} non-2xx responses, {res['socket_errors']} socket errors "
                           f"of {res['requests']} requests")
    return res


# ---------------------------------------------------------------- fixtures in the registry
def make_blob(path: pathlib.Path, size: int) -> str:
    """A random file of ``size`` bytes, made once and reused (its digest cached beside it)."""
    digest_file = path.with_suffix(".sha256")
    if path.exists() and path.stat().st_size == size and digest_file.exists():
        return digest_file.read_text("ascii").strip()
    progress(f"writing {size // MIB} MiB of random bytes to {path}")
    h = hashlib.sha256()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 8 * MIB))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    digest = "sha256:" + h.hexdigest()
    os.replace(tmp, path)
    digest_file.write_text(digest + "\n", "ascii")
    return digest


def put_small_blob(ep: Endpoint, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    location = start_upload(ep, repo)
    headers = {"Content-Type": "application/octet-stream", "Authorization": ep.authorization()}
    status, _, body = http_call(with_query(location, digest=digest), "PUT", headers=headers, body=data,
                                cafile=ep.cacert)
    if status != 201:
        raise RuntimeError(f"small blob upload: HTTP {status} {body[:200]!r}")
    return digest


def push_manifest(ep: Endpoint, repo: str, tag: str) -> tuple[bytes, str]:
    """A small image (config + one small layer + schema2 manifest) straight into the registry."""
    layer = gzip.compress(b"ecr-twisted benchmark layer\n" * 64, mtime=0)
    layer_digest = put_small_blob(ep, repo, layer)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()]},
        "config": {},
    }).encode()
    config_digest = put_small_blob(ep, repo, config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": len(config),
                   "digest": config_digest},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": len(layer),
                    "digest": layer_digest}],
    }).encode()
    status, headers, body = http_call(ep.url(f"/v2/{repo}/manifests/{tag}"), "PUT", body=manifest,
                                      headers={"Content-Type": DOCKER_MANIFEST, "Authorization": ep.authorization()},
                                      cafile=ep.cacert)
    if status != 201:
        raise RuntimeError(f"manifest PUT: HTTP {status} {body[:200]!r}")
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    if headers.get("Docker-Content-Digest") != digest:
        raise RuntimeError(f"manifest PUT: registry says {headers.get('Docker-Content-Digest')}, not {digest}")
    return manifest, digest


# ---------------------------------------------------------------- results
@dataclasses.dataclass
class Row:
    """One line of the table: a metric of one scenario for the three contenders."""

    id: str
    scenario: str
    metric: str
    unit: str
    higher_is_better: bool = True
    values: dict[str, float | None] = dataclasses.field(default_factory=dict)
    runs: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    rss: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    targets: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    wrk: dict[str, Any] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # scenario-specific raw figures
    note: str = ""
    short: str = ""  # label in the chart

    def ratio(self, other: str) -> float | None:
        a, b = self.values.get("ecr-twisted"), self.values.get(other)
        if a is None or not b:
            return None
        return a / b

    def as_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ratio_vs_nginx"] = _round(self.ratio("nginx"), 3)
        d["ratio_vs_direct"] = _round(self.ratio("direct"), 3)
        return d


def _round(x: float | None, n: int) -> float | None:
    return None if x is None else round(x, n)


def target_ratio(row: Row, minimum: float) -> None:
    r = row.ratio("nginx")
    row.targets.append({"target": f">= {minimum}x nginx", "met": None if r is None else r >= minimum})


def target_max(row: Row, limit: float, what: str, value: float | None, ceiling: float | None = None) -> None:
    """``value < limit``; ``ceiling`` (direct access's own figure) tells when the upstream alone misses it."""
    t: dict[str, Any] = {"target": f"{what} < {limit:g}", "met": None if value is None else value < limit}
    if ceiling is not None and ceiling >= limit:
        t["direct_misses_too"] = True
    row.targets.append(t)


def row_status(row: Row) -> str:
    if not row.targets:
        return ""
    mets = [t["met"] for t in row.targets]
    if any(m is None for m in mets):
        return "n/a (failed)"
    if all(mets):
        return "met"
    if any(t.get("direct_misses_too") for t in row.targets if not t["met"]):
        return "MISSED (direct too)"
    return "MISSED"


def fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "FAILED"
    if unit in ("MB/s", "req/s", "bytes", "count"):
        return f"{x:,.0f}"
    if unit == "ms":
        return f"{x:.2f}"
    return f"{x:.1f}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


TABLE_HEAD = ["scenario", "metric", "direct", "nginx", "ecr-twisted", "ecr/nginx", "ecr/direct", "target", "result"]


def table_cells(row: Row) -> list[str]:
    cells = [row.scenario, f"{row.metric} ({row.unit})"]
    for c in CONTENDERS:
        if c not in row.values and c not in row.errors:
            cells.append("—")
            continue
        cell = fmt(row.values.get(c), row.unit)
        runs = row.runs.get(c) or []
        if len(runs) > 1 and row.values.get(c) is not None:
            cell += f" [{fmt(min(runs), row.unit)}–{fmt(max(runs), row.unit)}]"  # spread of the runs
        cells.append(cell)
    cells.append(fmt_ratio(row.ratio("nginx")))
    cells.append(fmt_ratio(row.ratio("direct")))
    cells.append("; ".join(t["target"] for t in row.targets) or "")
    cells.append(row_status(row))
    return cells


def text_table(rows: Sequence[Row]) -> str:
    data = [TABLE_HEAD] + [table_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in data) for i in range(len(TABLE_HEAD))]
    out = []
    for n, line in enumerate(data):
        cells = [c.ljust(w) if i < 2 or i >= 7 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: Sequence[Row]) -> str:
    out = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "|".join(["---", "---"] + ["---:"] * 5 + ["---", "---"]) + "|"]
    for r in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in table_cells(r)) + " |")
    return "\n".join(out)


def write_chart(rows: Sequence[Row], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("Throughput (MB/s, higher is better)", "MB/s"),
        ("Small requests (req/s, higher is better)", "req/s"),
        ("p99 latency of small requests (ms, lower is better)", "ms"),
        ("CPU per small request, user+sys of all the contender's processes (µs, lower is better)", "µs"),
        ("Peak RSS of the proxy (MiB, lower is better)", "MiB"),
    ]
    colors = {"direct": "#9e9e9e", "nginx": "#2e7d32", "ecr-twisted": "#1565c0"}
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 5 * len(panels)))
    for ax, (ptitle, unit) in zip(axes.flat, panels):
        sel = [r for r in rows if r.unit == unit and (unit != "ms" or r.metric.startswith("p99"))]
        ax.set_title(ptitle, fontsize=10)
        if not sel:
            ax.set_axis_off()
            continue
        contenders = [c for c in CONTENDERS if any(c in r.values or c in r.errors for r in sel)]
        width = 0.8 / len(contenders)
        for i, c in enumerate(contenders):
            xs = [j + (i - (len(contenders) - 1) / 2) * width for j in range(len(sel))]
            ys = [r.values.get(c) or 0 for r in sel]
            bars = ax.bar(xs, ys, width, label=c, color=colors[c])
            for b, r in zip(bars, sel):
                v = r.values.get(c)
                label = "FAILED" if v is None and c in r.errors else ("" if v is None else fmt(v, unit))
                ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                            fontsize=6, rotation=90, xytext=(0, 2),
                            textcoords="offset points")
        if unit == "MiB":
            ax.axhline(RSS_PER_WORKER_LIMIT_MIB, color="#c62828", linestyle="--", linewidth=0.8)
            ax.annotate(f"target: < {RSS_PER_WORKER_LIMIT_MIB:g} MiB per worker (1-worker rows)",
                        (len(sel) - 0.5, RSS_PER_WORKER_LIMIT_MIB), xytext=(0, 2), textcoords="offset points",
                        fontsize=7, color="#c62828", ha="right")
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels([r.short or r.scenario for r in sel], fontsize=7)
        ax.margins(y=0.25)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tool_version(argv: Sequence[str]) -> str:
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "?"


def environment() -> dict[str, Any]:
    import twisted

    import ecr_twisted

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "ecr_twisted": getattr(ecr_twisted, "__version__", "?"),
        "git": (git.stdout.strip() or "?") + ("-dirty" if dirty.stdout.strip() else ""),
        "nginx": tool_version(["nginx", "-v"]),
        "curl": tool_version(["curl", "--version"]),
        "wrk": tool_version(["wrk", "--version"]),
        "registry": tool_version(["docker-registry", "--version"]),
    }


# ---------------------------------------------------------------- the benchmark
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.blob_size: int = args.blob_mib * MIB
        self.runs: int = args.runs
        self.wrk_s: int = args.wrk_seconds
        self.workdir: pathlib.Path = args.workdir
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.blob_path = self.workdir / f"blob-{args.blob_mib}MiB.bin"
        self.digest = ""
        self.push_counter = 0
        self.workers_available = False
        self.cache_available = False
        self.idle: list[dict[str, Any]] = []
        self.manifest = b""
        #: --source: twistd runs the working tree's ecr_twisted (PYTHONPATH), not the one installed in .venv
        self.source: pathlib.Path | None = REPO if args.source else None
        self.start_ecr = functools.partial(start_ecr_twisted, source=self.source)
        self.manifest_digest = ""

    # -- helpers
    def note(self, msg: str) -> None:
        self.notes.append(msg)
        say(f"NOTE: {msg}")

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def measure(self, row: Row, ep: Endpoint, fn: Callable[[], float], rss: RssPeak | None) -> None:
        """One measurement of ``ep``; a failure is recorded (and later ones of that contender go on)."""
        if ep.start_error:
            row.errors.setdefault(ep.name, ep.start_error)
            return
        try:
            if rss is not None and ep.roots:
                with RssSampler(ep.roots) as sampler:
                    value = fn()
                rss.add(sampler)
            else:
                value = fn()
            row.runs.setdefault(ep.name, []).append(value)
        except (CurlError, RuntimeError, OSError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else repr(e)
            if not ep.alive():
                msg += f" ({ep.name} process exited with {ep.proc.returncode if ep.proc else '?'})"
            row.errors.setdefault(ep.name, msg)
            progress(f"  {ep.name}: FAILED: {msg}")

    def finish_row(self, row: Row, scale: float, digits: int = 1) -> None:
        for name in CONTENDERS:
            runs = row.runs.get(name)
            if runs:
                row.runs[name] = [round(v * scale, digits) for v in runs]
                row.values[name] = round(statistics.median(runs) * scale, digits)
            elif name in row.errors:
                row.values[name] = None

    def rss_row(self, of: Row, peaks: dict[str, RssPeak], *, target: bool,
                limit: float = RSS_PER_WORKER_LIMIT_MIB) -> Row:
        row = self.add(Row(f"{of.id}_rss", of.scenario, "peak RSS, sum of processes", "MiB",
                           higher_is_better=False, short=of.short))
        for name, peak in peaks.items():
            if peak.samples:
                row.values[name] = round(peak.total / MIB, 1)
                row.rss[name] = peak.as_json()
        if target:
            per = peaks.get("ecr-twisted")
            value = per.process / MIB if per is not None and per.samples else None
            target_max(row, limit, "ecr-twisted MiB per worker", value)
            if value is not None:
                row.note = f"ecr-twisted peak per process {value:.1f} MiB"
        return row

    # -- scenarios
    @staticmethod
    def where(up: Upstream) -> str:
        return f"{up.kind}, {'TLS' if up.tls else 'plain'}"

    @staticmethod
    def brief(up: Upstream) -> str:
        return ("reg" if up.kind == "registry" else up.kind) + (" TLS" if up.tls else "")

    @staticmethod
    def tag(up: Upstream) -> str:
        return f"{up.kind}_{'tls' if up.tls else 'plain'}"

    def scenario_pull(self, eps: list[Endpoint], up: Upstream) -> None:
        row = self.add(Row(f"pull_{self.tag(up)}", f"pull {self.blob_size // MIB} MiB ({self.where(up)} upstream)",
                           f"median of {self.runs}", "MB/s", short=f"pull\n{self.brief(up)}"))
        peaks = {ep.name: RssPeak() for ep in eps if ep.roots}
        path = f"/v2/bench/blob/blobs/{self.digest}"
        for i in range(self.runs):
            for ep in eps:
                progress(f"pull ({self.where(up)}) run {i + 1}/{self.runs}: {ep.name}")
                self.measure(row, ep, functools.partial(curl_pull, ep, path, self.blob_size), peaks.get(ep.name))
        self.finish_row(row, 1 / MB)
        target_ratio(row, PULL_TLS_VS_NGINX if up.tls else PULL_PLAIN_VS_NGINX)
        self.rss_row(row, peaks, target=True)

    def scenario_slow(self, eps: list[Endpoint], up: Upstream) -> None:
        row = self.add(Row(f"pull_slow_{self.tag(up)}",
                           f"pull {self.blob_size // MIB} MiB, client --limit-rate {SLOW_RATE} ({self.where(up)})",
                           "1 run", "MB/s", note="backpressure: the proxy must not buffer what the client "
                                                 "cannot take yet", short=f"slow pull\n{self.brief(up)}"))
        peaks = {ep.name: RssPeak() for ep in eps if ep.roots}
        path = f"/v2/bench/blob/blobs/{self.digest}"
        for ep in eps:
            progress(f"slow-client pull ({self.where(up)}): {ep.name}")
            self.measure(row, ep, functools.partial(curl_pull, ep, path, self.blob_size, SLOW_RATE), peaks.get(ep.name))
        self.finish_row(row, 1 / MB)
        self.rss_row(row, peaks, target=True)

    def scenario_push(self, eps: list[Endpoint], up: Upstream) -> None:
        row = self.add(Row(f"push_{self.tag(up)}",
                           f"push {self.blob_size // MIB} MiB, PATCH + PUT ({self.where(up)} upstream)",
                           f"median of {self.runs}", "MB/s", short=f"push\n{self.brief(up)}"))
        peaks = {ep.name: RssPeak() for ep in eps if ep.roots}
        for i in range(self.runs):
            for ep in eps:
                self.push_counter += 1
                repo = f"bench/push-{ep.name}-{self.push_counter}"
                progress(f"push run {i + 1}/{self.runs}: {ep.name} -> {repo}")
                self.measure(row, ep,
                             functools.partial(curl_push, ep, repo, self.blob_path, self.digest, self.blob_size),
                             peaks.get(ep.name))
        self.finish_row(row, 1 / MB)
        target_ratio(row, PUSH_VS_NGINX)
        self.rss_row(row, peaks, target=True)

    def scenario_small(self, eps: list[Endpoint], up: Upstream, workers: int) -> None:
        scen = f"manifest {SMALL_METHOD}, {workers} worker{'s' if workers > 1 else ''} ({self.where(up)} upstream)"
        self.scenario_wrk(eps, scen, f"small_{self.tag(up)}_{workers}w", f"{SMALL_METHOD} {workers}w\n{self.brief(up)}",
                          "/v2/bench/small/manifests/v1", target=SMALL_VS_NGINX,
                          p99_limit=P99_LIMIT_MS, p99_vs_nginx=P99_VS_NGINX, spread=workers > 1)

    def scenario_wrk(self, eps: list[Endpoint], scen: str, base: str, short: str, path: str, *,
                     target: float | None, connections: int = WRK_CONNECTIONS, p99_limit: float | None = None,
                     p99_vs_nginx: float | None = None, conns: bool = False, spread: bool = False) -> Row:
        """wrk round-robin over ``eps``: rows req/s, p50, p99, CPU per request (user+sys of all the
        contender's processes over the wrk run / requests; with ``spread`` each process's share in the note:
        how evenly --workers share the load) and peak RSS.
        ``conns``: errors are counted in their own row (target 0) instead of failing the contender, and
        the RSS per worker has the conns limit."""
        rps = self.add(Row(f"{base}_rps", scen, f"wrk -t{WRK_THREADS} -c{connections} {self.wrk_s}s", "req/s",
                           short=short))
        p50 = self.add(Row(f"{base}_p50", scen, "p50 latency", "ms", higher_is_better=False, short=short))
        p99 = self.add(Row(f"{base}_p99", scen, "p99 latency", "ms", higher_is_better=False, short=short))
        cpu = self.add(Row(f"{base}_cpu", scen, "CPU per request, user+sys", "µs", higher_is_better=False,
                           short=short))
        errs = self.add(Row(f"{base}_errors", scen, "non-2xx + socket errors", "count", higher_is_better=False,
                            short=short)) if conns else None
        peaks = {ep.name: RssPeak() for ep in eps if ep.roots}
        details: dict[str, dict[str, Any]] = {}
        for ep in eps:
            progress(f"{scen}: {ep.name}")
            with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                # warm-up: connections, token, caches; not counted
                run_wrk(ep, path, WRK_WARMUP_S, connections=connections, allow_errors=conns)

            def once(ep: Endpoint = ep) -> float:
                meter = CpuMeter(ep.roots)
                with meter:
                    res = run_wrk(ep, path, self.wrk_s, connections=connections, allow_errors=conns)
                if ep.roots:
                    res["cpu"] = meter.as_json(res["requests"])
                details[ep.name] = res
                return float(res["rps"])

            self.measure(rps, ep, once, peaks.get(ep.name))
            if ep.name in rps.errors:
                for r in (p50, p99, cpu, errs):
                    if r is not None and (r is not cpu or ep.roots):
                        r.errors[ep.name] = rps.errors[ep.name]
            elif ep.name in details:
                d = details[ep.name]
                p50.runs[ep.name] = [d["p50_ms"]]
                p99.runs[ep.name] = [d["p99_ms"]]
                if d.get("cpu", {}).get("us_per_request") is not None:
                    cpu.runs[ep.name] = [d["cpu"]["us_per_request"]]
                if errs is not None:
                    errs.runs[ep.name] = [float(d["non_2xx"] + d["socket_errors"])]
        self.finish_row(rps, 1, 0)
        self.finish_row(p50, 1, 3)
        self.finish_row(p99, 1, 3)
        self.finish_row(cpu, 1, 1)
        rps.wrk = details
        cpu.details = {name: d["cpu"] for name, d in details.items() if "cpu" in d}
        splits = []
        for name, c in cpu.details.items():
            if c.get("user_us_per_request") is not None:
                split = f"{name} {c['user_us_per_request']:.0f} user + {c['sys_us_per_request']:.0f} sys"
                if spread:
                    split += f" (CPU by process: {spread_text(c)})"
                splits.append(split)
        cpu.note = "µs per request: " + "; ".join(splits) if splits else ""
        if target is not None:
            target_ratio(rps, target)
        if p99_limit is not None:
            target_max(p99, p99_limit, "ecr-twisted p99 ms", p99.values.get("ecr-twisted"), p99.values.get("direct"))
        if p99_vs_nginx is not None:
            p99_ratio = p99.ratio("nginx")
            p99.targets.append({"target": f"<= {p99_vs_nginx:g}x nginx",
                                "met": None if p99_ratio is None else p99_ratio <= p99_vs_nginx})
        if errs is not None:
            self.finish_row(errs, 1, 0)
            errs.details = {name: {"non_2xx": d["non_2xx"], **d.get("socket_errors_detail", {})}
                            for name, d in details.items()}
            n = errs.values.get("ecr-twisted")
            errs.targets.append({"target": "ecr-twisted errors = 0", "met": None if n is None else n == 0})
        if conns:
            self.rss_row(rps, peaks, target=True, limit=RSS_CONNS_LIMIT_MIB)
        else:
            self.rss_row(rps, peaks, target=False)
        return rps

    def scenario_small_full(self, up: Upstream) -> None:
        """The production feature set on ecr-twisted (--auth basic with a bcrypt htpasswd and the login
        repeated by the client, a policy file, the access log to a file, --metrics-port) against nginx
        as in ``small``, both sent the same Authorization header (nginx passes it on: no auth)."""
        where, tag = self.where(up), self.tag(up)
        import bcrypt  # the proxy's own dependency, in the .venv

        conf = fresh_dir(self.workdir / f"full-{tag}")
        htpasswd = conf / "htpasswd"
        htpasswd.write_text(f"{FULL_USER}:{bcrypt.hashpw(FULL_PASSWORD.encode(), bcrypt.gensalt(10)).decode()}\n")
        policy = conf / "policy.toml"
        policy.write_text(f'[[rule]]\nprincipals = ["user:{FULL_USER}"]\nactions = ["pull"]\n'
                          f'repositories = ["bench/small"]\n')
        metrics_port = free_port()
        login = f"{FULL_USER}:{FULL_PASSWORD}"
        started: list[Endpoint] = []
        path = "/v2/bench/small/manifests/v1"
        try:
            progress(f"small-full ({where}): starting nginx and ecr-twisted (--auth basic, --policy, --metrics-port)")
            for name in ("nginx", "ecr-twisted"):
                try:
                    if name == "nginx":
                        ep = start_nginx(up, 1, self.workdir, f"{tag}-full")
                        ep.basic_user = login  # the same header; nginx replaces it upstream with the token
                    else:
                        ep = self.start_ecr(
                            up, 1, self.workdir, f"{tag}-full",
                            ["--policy", str(policy), "--metrics-port", f"tcp:{metrics_port}:interface=127.0.0.1"],
                            auth=("--auth", "basic", "--htpasswd", str(htpasswd)), basic_user=login)
                        status, _, _ = http_call(ep.url(path), timeout=10)
                        if status != 401:
                            self.note(f"small-full: ecr-twisted answered {status} without Authorization (401 expected)")
                    started.append(ep)
                except (RuntimeError, OSError, subprocess.SubprocessError, http.client.HTTPException) as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                    self.note(f"{name} (small-full, {where}) did not start: {first}")
                    started.append(Endpoint(name, "http://127.0.0.1:9", start_error=f"did not start: {first}"))
            self.scenario_wrk([direct_endpoint(up), *started], f"manifest {SMALL_METHOD}, full feature set "
                              f"({where} upstream)", f"small_full_{tag}", f"full\n{self.brief(up)}", path,
                              target=SMALL_FULL_VS_NGINX)
            ecr = started[-1]
            if not ecr.start_error:
                with contextlib.suppress(OSError, http.client.HTTPException):
                    status, _, body = http_call(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
                    if status != 200:
                        self.note(f"small-full: --metrics-port answered {status}")
                lines = ecr.log_tail(1 << 16).count(path)
                if not lines:
                    self.note(f"small-full: no access-log line for {path} in {ecr.log_path}")
        finally:
            for ep in started:
                if ep.proc is not None:
                    PROCS.stop(ep.proc)
                    if ep.name == "ecr-twisted":
                        self.log_complaints(ep, f"ecr-twisted (small-full, {where})")

    def scenario_conns(self, up: Upstream) -> None:
        """1,000 concurrent keep-alive connections of small requests (1 worker each)."""
        where, tag = self.where(up), self.tag(up)
        scen = f"manifest {SMALL_METHOD}, {CONNS_CONNECTIONS} connections, 1 worker ({where} upstream)"
        with self.proxies(up, direct_endpoint(up), 1, label=f"{tag}-conns") as eps:
            self.scenario_wrk(eps, scen, f"conns_{tag}", f"{CONNS_CONNECTIONS} conns\n{self.brief(up)}",
                              "/v2/bench/small/manifests/v1", target=None, connections=CONNS_CONNECTIONS,
                              p99_limit=None, conns=True)

    def scenario_cache_digest(self, up: Upstream) -> None:
        """One manifest by digest, from ecr-twisted's --cache-dir (filled by a first GET, X-Cache: HIT
        checked) against nginx serving the same manifest file from disk (bench/static.conf.tmpl)."""
        where, tag = self.where(up), self.tag(up)
        path = f"/v2/bench/small/manifests/{self.manifest_digest}"
        cache_dir = fresh_dir(self.workdir / f"cache-digest-dir-{tag}")
        started: list[Endpoint] = []
        try:
            progress(f"cache-digest ({where}): starting nginx (static, sendfile) and ecr-twisted --cache-dir")
            try:
                started.append(start_static(self.workdir, f"{tag}-digest", blob=self.blob_path,
                                            blob_digest=self.digest, manifest=self.manifest,
                                            manifest_digest=self.manifest_digest))
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                self.note(f"nginx static (cache-digest) did not start: {first}")
                started.append(Endpoint("nginx", "http://127.0.0.1:9", start_error=f"did not start: {first}"))
            try:
                ecr = self.start_ecr(up, 1, self.workdir, f"{tag}-digest",
                                        ["--cache-dir", str(cache_dir), "--cache-size", CACHE_SIZE])
                started.append(ecr)
                seen = []
                for _ in range(2):  # the fill, then a hit
                    status, headers, body = http_call(ecr.url(path), headers={"Accept": DOCKER_MANIFEST})
                    seen.append(f"{status} {headers.get('X-Cache')}")
                    if status != 200 or body != self.manifest:
                        raise RuntimeError(f"GET manifest by digest: HTTP {status}, {len(body)} bytes")
                if not seen[-1].endswith("HIT"):
                    ecr.start_error = f"manifest by digest not served from the cache (X-Cache: {seen})"
                    self.note(f"cache-digest: {ecr.start_error}")
            except (RuntimeError, OSError, subprocess.SubprocessError, http.client.HTTPException) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                self.note(f"ecr-twisted --cache-dir (cache-digest) did not start: {first}")
                started.append(Endpoint("ecr-twisted", "http://127.0.0.1:9", start_error=f"did not start: {first}"))
            rps = self.scenario_wrk([direct_endpoint(up), *started],
                                    f"manifest by digest from the cache ({where} upstream)", f"cache_digest_{tag}",
                                    f"cache digest\n{self.brief(up)}", path, target=CACHE_DIGEST_VS_NGINX)
            rps.note = ("nginx: the same manifest file from disk (sendfile); ecr-twisted: --cache-dir, "
                                  "filled by a first GET (X-Cache: HIT checked); direct: the upstream")
        finally:
            for ep in started:
                if ep.proc is not None:
                    PROCS.stop(ep.proc)
                    if ep.name == "ecr-twisted":
                        self.log_complaints(ep, f"ecr-twisted --cache-dir (cache-digest, {where})")
            shutil.rmtree(cache_dir, ignore_errors=True)

    def scenario_cache(self, up: Upstream) -> None:
        """The layer cache: ``runs`` times, a fresh ecr-twisted with an empty ``--cache-dir``, then
        round-robin direct, nginx (the plain proxy: no proxy_cache), ecr-twisted's first GET (MISS:
        streamed from upstream while written to disk; the directory's size is taken after it) and the
        same GET again on the same proxy (HIT: from disk). The cache directory is removed after each run.

        Rows: cache miss and cache hit MB/s, each against the same direct and nginx runs, their peak
        RSS, and the cache directory's size after the miss (must be the blob's)."""
        where, tag, mib = self.where(up), self.tag(up), self.blob_size // MIB
        path = f"/v2/bench/blob/blobs/{self.digest}"
        shared = "direct and nginx: the same runs in both cache rows; nginx has no proxy_cache"
        miss = Row(f"cache_miss_{tag}", f"cache miss, pull {mib} MiB ({where} upstream)", f"median of {self.runs}",
                   "MB/s", note=f"first GET through an empty --cache-dir (X-Cache: MISS); {shared}",
                   short=f"cache miss\n{self.brief(up)}")
        hit = Row(f"cache_hit_{tag}", f"cache hit, pull {mib} MiB ({where} upstream)", f"median of {self.runs}",
                  "MB/s", note=f"the same GET again, served from disk (X-Cache: HIT); {shared}",
                  short=f"cache hit\n{self.brief(up)}")
        size_row = Row(f"cache_dir_{tag}", miss.scenario, "cache dir after the miss", "bytes",
                       higher_is_better=False, short=miss.short)
        disk = Row(f"cache_hit_vs_disk_{tag}", f"cache hit, pull {mib} MiB, vs nginx from disk",
                   f"median of {self.runs}", "MB/s",
                   note="nginx column: nginx serving the same blob file from disk with sendfile "
                        "(bench/static.conf.tmpl); ecr-twisted: the cache-hit runs above",
                   short=f"hit vs disk\n{self.brief(up)}")
        nginx_peak, miss_peak, hit_peak, static_peak = RssPeak(), RssPeak(), RssPeak(), RssPeak()
        static: Endpoint | None = None
        direct = direct_endpoint(up)
        cache_dir = self.workdir / f"cache-dir-{tag}"
        usages: list[dict[str, Any]] = []
        nginx: Endpoint | None = None
        try:
            progress(f"cache ({where}): starting nginx (plain proxy config, 1 worker)")
            try:
                nginx = start_nginx(up, 1, self.workdir, f"{tag}-cache")
                rss, n = nginx.rss_now()
                self.idle.append({"upstream": f"{where}, cache scenario", "workers": 1, "contender": "nginx",
                                  "idle_rss_mib": round(rss / MIB, 1), "processes": n})
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                self.note(f"nginx ({where}, cache scenario) did not start: {first}")
                nginx = Endpoint("nginx", "http://127.0.0.1:9", start_error=f"did not start: {first}")
            try:
                static = start_static(self.workdir, f"{tag}-cache", blob=self.blob_path, blob_digest=self.digest,
                                      manifest=self.manifest, manifest_digest=self.manifest_digest)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                self.note(f"nginx static ({where}, cache scenario) did not start: {first}")
                static = Endpoint("nginx", "http://127.0.0.1:9", start_error=f"did not start: {first}")
            for i in range(self.runs):
                run = f"cache ({where}) run {i + 1}/{self.runs}"
                fresh_dir(cache_dir)
                ecr: Endpoint | None = None
                try:
                    progress(f"{run}: starting ecr-twisted with an empty --cache-dir {cache_dir}")
                    try:
                        ecr = self.start_ecr(up, 1, self.workdir, f"{tag}-cache-run{i + 1}",
                                                ["--cache-dir", str(cache_dir), "--cache-size", CACHE_SIZE])
                        if i == 0:
                            rss, n = ecr.rss_now()
                            self.idle.append({"upstream": f"{where}, --cache-dir", "workers": 1,
                                              "contender": "ecr-twisted", "idle_rss_mib": round(rss / MIB, 1),
                                              "processes": n})
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                        self.note(f"ecr-twisted with --cache-dir ({where}) did not start in run {i + 1}: {first}")
                        say(str(e))
                        ecr = Endpoint("ecr-twisted", "http://127.0.0.1:9", start_error=f"did not start: {first}")
                    assert nginx is not None and static is not None
                    steps: list[tuple[str, Endpoint, Row, RssPeak | None, str | None]] = [
                        ("direct", direct, miss, None, None),
                        ("nginx", nginx, miss, nginx_peak, None),
                        ("nginx from disk (sendfile)", static, disk, static_peak, None),
                        ("ecr-twisted MISS (first GET, empty cache)", ecr, miss, miss_peak, "MISS"),
                        ("ecr-twisted HIT (same GET again)", ecr, hit, hit_peak, "HIT"),
                    ]
                    for what, ep, row, peak, expect in steps:
                        progress(f"{run}: {what}")
                        self.measure(row, ep, functools.partial(curl_pull, ep, path, self.blob_size, x_cache=expect),
                                     peak)
                        if expect == "MISS" and not ep.start_error:
                            usages.append(self.cache_dir_after_miss(cache_dir, ok=ep.name not in miss.errors))
                finally:
                    if ecr is not None and ecr.proc is not None:
                        if not ecr.alive():
                            self.note(f"ecr-twisted with --cache-dir ({where}) exited during run {i + 1} with "
                                      f"{ecr.proc.returncode}; log: {ecr.log_path}")
                        PROCS.stop(ecr.proc)
                        self.log_complaints(ecr, f"ecr-twisted with --cache-dir ({where}), run {i + 1}")
                    shutil.rmtree(cache_dir, ignore_errors=True)
        finally:
            for server in (nginx, static):
                if server is not None and server.proc is not None:
                    PROCS.stop(server.proc)
            shutil.rmtree(cache_dir, ignore_errors=True)
        # direct and nginx were measured once per run, for both rows
        for name in ("direct", "nginx"):
            if name in miss.runs:
                hit.runs[name] = list(miss.runs[name])
            if name in miss.errors:
                hit.errors[name] = miss.errors[name]
        if "ecr-twisted" in hit.runs:
            disk.runs["ecr-twisted"] = list(hit.runs["ecr-twisted"])
        if "ecr-twisted" in hit.errors:
            disk.errors["ecr-twisted"] = hit.errors["ecr-twisted"]
        for row, peak in ((miss, miss_peak), (hit, hit_peak)):
            self.add(row)
            self.finish_row(row, 1 / MB)
            self.rss_row(row, {"nginx": nginx_peak, "ecr-twisted": peak}, target=True)
            if row is miss:
                target_ratio(miss, CACHE_MISS_VS_NGINX)
                self.add(size_row)
                self.cache_size_row(size_row, usages)
        self.add(disk)
        self.finish_row(disk, 1 / MB)
        target_ratio(disk, CACHE_HIT_VS_DISK)
        disk.rss = {"nginx": static_peak.as_json()} if static_peak.samples else {}

    def cache_dir_after_miss(self, cache_dir: pathlib.Path, *, ok: bool) -> dict[str, Any]:
        """The cache directory's usage once the miss's fill is committed (waits up to CACHE_COMMIT_WAIT s
        for the temporary file to become the blob when the miss succeeded)."""
        t0 = time.monotonic()
        usage: dict[str, Any] = dir_usage(cache_dir)
        while ok and (usage["tmp_files"] or usage["blob_bytes"] != self.blob_size) \
                and time.monotonic() - t0 < CACHE_COMMIT_WAIT:
            time.sleep(0.05)
            usage = dir_usage(cache_dir)
        usage["waited_s"] = round(time.monotonic() - t0, 2)
        progress(f"  cache dir after the miss: {usage['total_bytes']:,} bytes ({usage['blob_bytes']:,} in "
                 f"{usage['blob_files']} blob file(s), {usage['tmp_bytes']:,} in {usage['tmp_files']} tmp file(s), "
                 f"{usage['other_bytes']:,} other), {usage['allocated_bytes']:,} allocated"
                 + (f"; waited {usage['waited_s']} s for the commit" if usage["waited_s"] >= 0.1 else ""))
        return usage

    def cache_size_row(self, row: Row, usages: list[dict[str, Any]]) -> None:
        if usages:
            sizes = sorted({float(u["total_bytes"]) for u in usages})  # one figure when every run agrees
            row.runs["ecr-twisted"] = sizes
        elif "ecr-twisted" not in row.errors:
            row.errors["ecr-twisted"] = "not measured (ecr-twisted did not start)"
        self.finish_row(row, 1, 0)
        row.details = {"blob_bytes": self.blob_size, "after_miss": usages}
        good = [u["blob_bytes"] == self.blob_size and u["blob_files"] == 1 and not u["tmp_files"]
                and u["other_bytes"] < 64 * 1024 for u in usages]
        row.targets.append({"target": f"= blob {self.blob_size:,} (+ index < 64 KiB)",
                            "met": all(good) if good else None})
        if usages:
            last = usages[-1]
            row.note = (f"apparent size; blob file {last['blob_bytes']:,}, tmp/ {last['tmp_bytes']:,}, index files "
                        f"{last['other_bytes']:,}; allocated on disk {last['allocated_bytes']:,}")

    def log_complaints(self, ep: Endpoint, what: str) -> None:
        """Warnings, errors and tracebacks in a contender's log become notes (first one quoted)."""
        if ep.log_path is None:
            return
        try:
            lines = ep.log_path.read_text("utf-8", "replace").splitlines()
        except OSError:
            return
        bad = [ln for ln in lines if re.search(r"#(warn|error|critical)\]|Traceback|Unhandled", ln)]
        if bad:
            self.note(f"{what}: {len(bad)} warning/error line(s) in {ep.log_path}, first: {bad[0][:300]}")

    # -- phases
    def push_fixtures(self, registry: Upstream) -> tuple[bytes, str]:
        direct = direct_endpoint(registry)
        progress(f"pre-pushing the {self.blob_size // MIB} MiB blob and a small manifest straight to the registry")
        speed = curl_push(direct, "bench/blob", self.blob_path, self.digest, self.blob_size)
        progress(f"  pre-push took {self.blob_size / speed:.1f} s")
        return push_manifest(direct, "bench/small", "v1")

    def phase(self, tls: bool) -> None:
        """One emulator (plain or TLS upstream) and its fixtures; the contenders in front of the registry,
        then in front of the fast stub.

        Plain: pull, slow, push, small, cache as asked (stub: pull and small). TLS: pull and small.
        """
        label = "TLS" if tls else "plain"
        want = set(self.args.scenarios)
        emu_dir = self.workdir / f"ecr-{label.lower()}"
        shutil.rmtree(emu_dir, ignore_errors=True)
        progress(f"starting the emulated ECR ({label} upstream, filesystem storage, "
                 f"{self.args.registry_auth} auth) in {emu_dir}")
        ecr = EmulatedECR(emu_dir, tls=tls, storage="filesystem", auth=self.args.registry_auth)
        stub: Upstream | None = None
        try:
            ecr.start()
            registry = Upstream("registry", ecr.upstream_url, ecr, str(ecr.ca_file) if ecr.ca_file else None)
            manifest, manifest_digest = self.push_fixtures(registry)
            self.manifest, self.manifest_digest = manifest, manifest_digest
            self.against(registry, pull=tls or "pull" in want, slow=not tls and "slow" in want,
                         push=not tls and "push" in want, small=tls or "small" in want)
            if not tls and "cache" in want and self.cache_available:
                self.scenario_cache(registry)
            if not tls and "cache-digest" in want and self.cache_available:
                self.scenario_cache_digest(registry)
            on_stub = not tls and bool(want & {"small-full", "conns"})
            if "stub" in want or on_stub:
                progress(f"starting the fast stub upstream ({label})")
                stub = start_stub(ecr, self.workdir, label.lower(), blob=self.blob_path, blob_digest=self.digest,
                                  manifest=manifest, manifest_digest=manifest_digest)
                if "stub" in want:
                    self.against(stub, pull=tls or "pull" in want, slow=False, push=False,
                                 small=tls or "small" in want)
                if not tls and "small-full" in want:
                    self.scenario_small_full(stub)
                if not tls and "conns" in want:
                    self.scenario_conns(stub)
        finally:
            if stub is not None and stub.proc is not None:
                PROCS.stop(stub.proc)
            ecr.stop()
            if not self.args.keep:
                shutil.rmtree(emu_dir, ignore_errors=True)

    def against(self, up: Upstream, *, pull: bool, slow: bool, push: bool, small: bool) -> None:
        """The contenders in front of ``up``: 1 worker for everything asked, then 2 workers for small requests."""
        if not (pull or slow or push or small):
            return
        direct = direct_endpoint(up)
        with self.proxies(up, direct, 1) as eps:
            if pull:
                self.scenario_pull(eps, up)
            if slow:
                self.scenario_slow(eps, up)
            if push:
                self.scenario_push(eps, up)
            if small:
                self.scenario_small(eps, up, 1)
        if small and self.workers_available:
            with self.proxies(up, direct, 2) as eps:
                self.scenario_small(eps, up, 2)

    @contextlib.contextmanager
    def proxies(self, up: Upstream, direct: Endpoint, workers: int,
                label: str | None = None) -> Iterator[list[Endpoint]]:
        """[direct, nginx, ecr-twisted] with ``workers`` workers each; both proxies stopped afterwards."""
        where = self.where(up)
        label = label or f"{self.tag(up)}-{workers}w"
        started: list[Endpoint] = []
        try:
            progress(f"starting nginx and ecr-twisted ({workers} worker(s), {where} upstream)")
            for name, start in (("nginx", start_nginx), ("ecr-twisted", self.start_ecr)):
                try:
                    started.append(start(up, workers, self.workdir, label))
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
                    self.note(f"{name} ({where}, {workers} worker(s)) did not start: {first}")
                    say(str(e))
                    started.append(Endpoint(name, "http://127.0.0.1:9", start_error=f"did not start: {first}"))
            for ep in started:
                if not ep.start_error:
                    rss, n = ep.rss_now()
                    self.idle.append({"upstream": where, "workers": workers, "contender": ep.name,
                                      "idle_rss_mib": round(rss / MIB, 1), "processes": n})
            yield [direct, *started]
            for ep in started:
                if not ep.start_error and not ep.alive():
                    self.note(f"{ep.name} ({where}, {workers} worker(s)) exited during the run "
                              f"with {ep.proc.returncode if ep.proc else '?'}; log: {ep.log_path}")
        finally:
            for ep in started:
                if ep.proc is not None:
                    PROCS.stop(ep.proc)

    def run(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        stale = stale_install()
        if stale:
            self.note(f"the ecr_twisted installed in .venv is not the working tree's ({', '.join(stale)} differ): "
                      "`bash scripts/venv.sh` (make bench does) reinstalls it, or --source runs the tree's; "
                      "this run measures the installed one")
        self.workers_available, help_text = twistd_has_workers(self.source)
        self.cache_available = "--cache-dir" in help_text
        if "cache" in self.args.scenarios and not self.cache_available:
            self.note("`twistd ecrproxy --help` does not list --cache-dir: the cache scenario is skipped")
        if not self.workers_available:
            self.note("`twistd ecrproxy --help` does not list --workers yet: only the 1-worker small-request "
                      "case is measured (the 2-worker case runs by itself once the option exists).")
        self.digest = make_blob(self.blob_path, self.blob_size)
        progress(f"blob: {self.blob_path} ({self.blob_size} bytes, {self.digest})")
        plain = {"pull", "slow", "push", "small", "small-full", "conns"} | (
            {"cache", "cache-digest"} if self.cache_available else set())
        if set(self.args.scenarios) & plain:
            self.phase(tls=False)
        if "tls" in self.args.scenarios:
            self.phase(tls=True)


# ---------------------------------------------------------------- main
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark ecr-twisted against nginx and direct registry access.")
    p.add_argument("--quick", action="store_true", help="256 MiB blob, 1 run, 3 s wrk: for iterating")
    p.add_argument("--blob-mib", type=int, help="blob size in MiB (default 1024, --quick 256)")
    p.add_argument("--runs", type=int, help="runs per contender for pull, push and cache (default 5, --quick 1)")
    p.add_argument("--wrk-seconds", type=int, help="wrk duration (default 10, --quick 3)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all)")
    p.add_argument("--workdir", type=pathlib.Path, default=REPO / ".work" / "bench")
    p.add_argument("--results", type=pathlib.Path,
                   help="where results.{json,png,md} go (default bench/results, --quick .work/bench/quick-results)")
    p.add_argument("--registry-auth", choices=("silly", "htpasswd"), default="silly",
                   help="the emulated registry's access control: silly (default: any Authorization value, no "
                        "bcrypt) or htpasswd (like the tests: a bcrypt check per request caps every contender)")
    p.add_argument("--source", action="store_true",
                   help="run twistd with PYTHONPATH=<this tree> (like the integration tests): measure the working "
                        "tree's ecr_twisted instead of the copy installed in .venv")
    p.add_argument("--keep", action="store_true", help="keep the emulators' storage after the run")
    p.add_argument("--render-from", type=pathlib.Path, metavar="RESULTS_JSON",
                   help="measure nothing: re-render results.md and results.png beside RESULTS_JSON")
    args = p.parse_args(argv)
    args.blob_mib = args.blob_mib or (256 if args.quick else 1024)
    args.runs = args.runs or (1 if args.quick else 5)
    args.wrk_seconds = args.wrk_seconds or (3 if args.quick else 10)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = set(args.scenarios) - set(SCENARIOS)
    if bad:
        p.error(f"unknown scenarios {sorted(bad)}; choose from {SCENARIOS}")
    if args.results is None:
        args.results = args.workdir / "quick-results" if args.quick else BENCH_DIR / "results"
    args.workdir = args.workdir.resolve()
    args.results = args.results.resolve()
    return args


def cpu_lines(rows: Sequence[Row]) -> list[str]:
    """'CPU per request in <scenario>: nginx 5 user + 16 sys; ecr-twisted ... (main 47%, child 53%)'."""
    return [f"CPU per request in '{r.scenario}': {r.note.removeprefix('µs per request: ')} (µs)"
            for r in rows if r.id.endswith("_cpu") and r.note]


def idle_line(idle: Sequence[dict[str, Any]]) -> str:
    parts = [f"{i['contender']} {i['idle_rss_mib']} MiB ({i['upstream']}, {i['workers']}w, {i['processes']} proc)"
             for i in idle]
    return "Idle RSS right after start: " + ("; ".join(parts) if parts else "—")


def write_results(bench: Bench, command: str, started: float, env: dict[str, Any]) -> None:
    """results.json (everything), then results.md and results.png rendered from it."""
    args = bench.args
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "quick": args.quick, "blob_bytes": bench.blob_size, "blob_digest": bench.digest, "runs": args.runs,
        "wrk": f"-t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{args.wrk_seconds}s --latency -s bench/small.lua",
        "small_request": f"{SMALL_METHOD} /v2/bench/small/manifests/v1 (docker schema2, Accept set)",
        "conns_connections": CONNS_CONNECTIONS,
        "cpu": "utime+stime from /proc/PID/stat of every process of the contender, before/after each wrk run, "
               "divided by wrk's request count",
        "slow_client_rate": SLOW_RATE, "rss_interval_s": RSS_INTERVAL, "nginx_buffers": NGINX_BUFFER,
        "scenarios": args.scenarios, "source": bool(args.source), "workers_option": bench.workers_available,
        "cache_option": bench.cache_available, "cache_size": CACHE_SIZE,
        "registry": f"distribution, filesystem storage, {args.registry_auth} auth",
        "units": {"MB/s": "10^6 bytes per second", "MiB": "2^20 bytes"},
    }
    doc = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": round(time.monotonic() - started, 1), "environment": env, "config": config,
        "notes": bench.notes, "idle_rss": bench.idle, "rows": [r.as_json() for r in bench.rows],
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n", "utf-8")
    os.replace(tmp, out / "results.json")
    render_outputs(doc, out)


def rows_of(doc: dict[str, Any]) -> list[Row]:
    names = {f.name for f in dataclasses.fields(Row)}
    return [Row(**{k: v for k, v in r.items() if k in names}) for r in doc["rows"]]


def render_outputs(doc: dict[str, Any], out: pathlib.Path) -> None:
    """results.md and results.png from a results.json document (also: ``--render-from``)."""
    rows, env, config = rows_of(doc), doc["environment"], doc["config"]
    blob_mib = config["blob_bytes"] // MIB
    md = [
        f"Benchmark run {doc['date']}: `{doc['command']}` ({doc['elapsed_s'] / 60:.1f} min; {env['cpus']} CPUs "
        f"{env['cpu_model']}, {env['nginx']}, {env['registry']}, Python {env['python']}, Twisted {env['twisted']}, "
        f"ecr-twisted {env['ecr_twisted']} at {env['git']}).",
        "",
        f"Blob {blob_mib} MiB (random), pull/push median of {config['runs']} run(s) per contender, "
        f"alternating round-robin, [min–max] of the runs in brackets; small requests: `wrk {config['wrk']}` "
        f"({SMALL_METHOD} of one manifest). MB/s = 10^6 bytes/s. Peak RSS: sum over the contender's processes, "
        "sampled every 0.1 s (per-process peak in results.json). Ratios are ecr-twisted / other. Upstream "
        "`registry`: the emulated ECR (distribution, filesystem storage, no bcrypt); `stub`: nginx answering "
        "like the registry, so that the proxies' own cost shows (bench/README.md). Cache rows: ecr-twisted with "
        "`--cache-dir` (a fresh, empty one per run): the first GET (miss, streamed from the registry while "
        "written to disk) and the same GET again (hit, from disk), against the same runs of direct and nginx "
        "(no `proxy_cache`); \"vs nginx from disk\" and \"manifest by digest from the cache\": nginx serving the "
        "same file from disk (sendfile). CPU per request: user+sys of all the contender's processes over the wrk "
        "run (/proc/PID/stat) divided by the requests; \"full feature set\": ecr-twisted with --auth basic (bcrypt "
        "htpasswd, the login repeated by the client), a policy file, the access log and --metrics-port.",
        "",
        markdown_table(rows),
        "",
        *[f"- {line}" for line in cpu_lines(rows)],
        f"- {idle_line(doc.get('idle_rss', []))}",
    ]
    for n in doc.get("notes", []):
        md.append(f"- Note: {n}")
    failed = [(r.scenario, c, e) for r in rows for c, e in r.errors.items()]
    for scen, c, e in dict.fromkeys(failed):
        md.append(f"- {c} failed in {scen}: {e}")
    (out / "results.md").write_text("\n".join(md).rstrip() + "\n", "utf-8")
    write_chart(rows, out / "results.png",
                f"ecr-twisted vs nginx vs direct — {blob_mib} MiB blob, {env['cpus']} CPUs, {doc['date']}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render_from is not None:
        doc = json.loads(args.render_from.read_text("utf-8"))
        out = args.render_from.resolve().parent
        render_outputs(doc, out)
        say(f"$ {doc['command']}  ({doc['date']})")
        say(text_table(rows_of(doc)))
        say(f"re-rendered {out}/results.md and results.png from {args.render_from} (no new measurement)")
        return 0
    command = shlex.join([os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(str(REPO))
                          else sys.executable, os.path.relpath(__file__, os.getcwd()), *argv])
    say(f"$ {command}")
    say(f"(cwd {os.getcwd()}; blob {args.blob_mib} MiB, {args.runs} run(s), wrk {args.wrk_seconds} s, "
        f"scenarios {','.join(args.scenarios)}, results -> {args.results})")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    # Ctrl-C must stop the run even when started from a shell that ignores SIGINT (background jobs)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    env = environment()
    bench = Bench(args)
    status = 0
    try:
        bench.run()
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything this benchmark started")
        status = 130
    except SystemExit as e:
        say("\nterminated: stopping everything this benchmark started")
        status = int(e.code or 1) if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - report, clean up, and still print what was measured
        say(f"\nbenchmark aborted: {type(e).__name__}: {e}")
        status = 1
    finally:
        PROCS.stop_all()
    if not bench.rows:
        return status or 1
    elapsed = time.monotonic() - started
    say("")
    say(f"$ {command}")
    say(text_table(bench.rows))
    say("")
    for r in bench.rows:
        for c, err in r.errors.items():
            say(f"FAILED: {c} in '{r.scenario}' ({r.metric}): {err}")
    for line in cpu_lines(bench.rows):
        say(line)
    say(idle_line(bench.idle))
    for n in bench.notes:
        say(f"NOTE: {n}")
    if status:
        say(f"results NOT written to {args.results}: the run did not finish (the table above is partial)")
    else:
        try:
            write_results(bench, command, started, env)
            say(f"results: {args.results}/results.json, results.png, results.md")
        except Exception as e:  # noqa: BLE001
            say(f"could not write results: {type(e).__name__}: {e}")
            status = 1
    say(f"total runtime: {elapsed:.0f} s ({elapsed / 60:.1f} min)")
    return status


if __name__ == "__main__":
    sys.exit(main())
