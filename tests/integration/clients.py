"""The registry clients people run, as wrappers with private state, for the integration tests.

* :class:`Dockerd` / :class:`Containerd`: one daemon each per session (fixtures in ``conftest.py``),
  with their own config, root, state and socket under a short directory in /tmp (unix socket
  paths are limited to ~100 characters), stopped at the end;
* :class:`Docker`, :class:`Ctr`, :class:`Buildah`, :class:`Skopeo`, :class:`PodmanClient`: one per
  test, each with its own credentials store (docker ``--config DIR``, a private auth file for the
  containers tools, a containerd namespace for ctr) and otherwise the clients' default settings.

Every command returns a :class:`Result`; ``check=True`` (the default) raises :class:`ClientError`
on a non-zero exit, with the command and its output in the message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from proxy_harness import Podman, wait_for

from ecr_twisted.testing.emulator import _parent_death_preexec

DOCKER = "/usr/bin/docker"  # the Debian client (/usr/local/bin/docker is another version)
DOCKERD = "/usr/sbin/dockerd"
CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
COMMAND_TIMEOUT = 180.0
DAEMON_START_TIMEOUT = 60.0
DAEMON_STOP_TIMEOUT = 20.0

#: Daemons started and not stopped yet; failing tests attach their log tails.
LIVE_DAEMONS: list[Daemon] = []
#: Names of the daemon fixtures a test asked for at run time (see :func:`use_daemon`).
DAEMONS_USED = pytest.StashKey[set[str]]()


def use_daemon(request: pytest.FixtureRequest, name: str) -> Any:
    """``request.getfixturevalue(name)`` for a daemon fixture, remembered on the test item so that
    a failure report carries that daemon's log (fixtures asked for at run time are not in
    ``item.fixturenames``)."""
    request.node.stash.setdefault(DAEMONS_USED, set()).add(name)
    return request.getfixturevalue(name)


class ClientError(RuntimeError):
    """A client command exited non-zero."""

    def __init__(self, result: Result) -> None:
        self.result = result
        super().__init__(f"{result.command_line} failed ({result.returncode})\n{result.output}")


@dataclasses.dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def command_line(self) -> str:
        return " ".join(self.argv)

    @property
    def output(self) -> str:
        return f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, input: str | None = None,
        check: bool = True, timeout: float = COMMAND_TIMEOUT, cwd: str | os.PathLike[str] | None = None) -> Result:
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout,
        env=dict(env) if env is not None else None, cwd=cwd,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    result = Result(list(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise ClientError(result)
    return result


def _short_dir(prefix: str) -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# ---------------------------------------------------------------- daemons
class Daemon:
    """A long-running daemon process with its log file, under one private directory."""

    name = "daemon"

    def __init__(self, prefix: str) -> None:
        self.dir = _short_dir(prefix)
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: object | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self._log = log
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
            preexec_fn=_parent_death_preexec(),
        )
        LIVE_DAEMONS.append(self)

        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode if self.proc else '?'}):\n"
                                   f"{self.log_tail()}")
            return self.ready()

        try:
            wait_for(up, DAEMON_START_TIMEOUT, f"{self.name} to answer", interval=0.2)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(timeout=DAEMON_STOP_TIMEOUT)
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()  # type: ignore[attr-defined]
            self._log = None
        if self in LIVE_DAEMONS:
            LIVE_DAEMONS.remove(self)

    def remove(self) -> None:
        """Delete the private directory (after :meth:`stop`)."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")[-n:]
        except OSError:
            return ""


def _unix_http_ok(path: pathlib.Path, target: str) -> bool:
    """GET ``target`` over a unix socket; True on a 200."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(path))
        s.sendall(f"GET {target} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        head = s.recv(4096)
    return head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))


class Dockerd(Daemon):
    """``dockerd`` as root: vfs storage, no networking, its own data/exec root, config and socket.

    127.0.0.0/8 is an insecure registry range by default, so http://127.0.0.1:PORT needs no config.
    dockerd starts (and stops) its own containerd below ``exec-root``."""

    name = "dockerd"

    def __init__(self) -> None:
        super().__init__("ecrdk-")
        self.socket = self.dir / "sock"
        self.data_root = self.dir / "data"
        self.exec_root = self.dir / "exec"
        self.config_file = self.dir / "daemon.json"
        self.config_file.write_text("{}\n", encoding="utf-8")  # not /etc/docker/daemon.json

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def command(self) -> list[str]:
        return [
            DOCKERD,
            "--config-file", str(self.config_file),
            "--iptables=false", "--ip6tables=false", "--bridge=none",
            "--storage-driver=vfs",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.dir / "dockerd.pid"),
            "-H", self.host,
        ]

    def ready(self) -> bool:
        return _unix_http_ok(self.socket, "/_ping")


class Containerd(Daemon):
    """``containerd`` with its own config, root, state and sockets (the CRI plugin off)."""

    name = "containerd"

    def __init__(self) -> None:
        super().__init__("ecrct-")
        self.socket = self.dir / "sock"
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.config_file = self.dir / "config.toml"
        self.config_file.write_text(
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            "[ttrpc]\n"
            f'  address = "{self.dir / "ttrpc.sock"}"\n'
            "[debug]\n"
            '  address = ""\n'
            "[metrics]\n"
            '  address = ""\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.root / "opt"}"\n',
            encoding="utf-8",
        )

    def command(self) -> list[str]:
        return [CONTAINERD, "--config", str(self.config_file)]

    def ready(self) -> bool:
        if not self.socket.exists():
            return False
        return run([CTR, "--address", str(self.socket), "version"], check=False, timeout=10).returncode == 0


# ---------------------------------------------------------------- clients
_DIGEST = r"sha256:[0-9a-f]{64}"


class Docker:
    """The docker CLI against the session's dockerd, with credentials in its own ``--config`` dir."""

    def __init__(self, daemon: Dockerd, base: pathlib.Path) -> None:
        self.daemon = daemon
        self.config_dir = base / "docker-config"
        self.config_dir.mkdir(parents=True, exist_ok=True)

    def run(self, *args: str, input: str | None = None, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> Result:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        return run([DOCKER, "--config", str(self.config_dir), "-H", self.daemon.host, *args], env=env, input=input,
                   check=check, timeout=timeout)

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        return self.run("login", "--username", user, "--password-stdin", host, input=password + "\n", check=check)

    def stored_auths(self) -> dict[str, object]:
        path = self.config_dir / "config.json"
        if not path.exists():
            return {}
        return dict(json.loads(path.read_text("utf-8")).get("auths") or {})

    def pull(self, ref: str, *, check: bool = True) -> Result:
        return self.run("pull", ref, check=check)

    def repo_digests(self, ref: str) -> list[str]:
        out = self.run("image", "inspect", "--format", "{{json .RepoDigests}}", ref).stdout
        return list(json.loads(out))

    def image_id(self, ref: str) -> str:
        return self.run("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()

    def load(self, archive: pathlib.Path) -> Result:
        return self.run("load", "--input", str(archive))

    def tag(self, src: str, dest: str) -> None:
        self.run("tag", src, dest)

    def push(self, ref: str, *, check: bool = True) -> Result:
        return self.run("push", ref, check=check)

    @staticmethod
    def pushed_digest(result: Result) -> str:
        """``TAG: digest: sha256:... size: N`` from ``docker push``."""
        m = re.search(rf"digest: ({_DIGEST}) size:", result.stdout)
        assert m, result.output
        return m.group(1)

    def remove_images(self, *refs: str) -> None:
        if refs:
            self.run("image", "rm", "--force", *refs, check=False)


class Ctr:
    """``ctr`` against the session's containerd, in a namespace of its own (credentials only by --user)."""

    def __init__(self, daemon: Containerd, namespace: str) -> None:
        self.daemon = daemon
        self.namespace = namespace

    def run(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> Result:
        return run([CTR, "--address", str(self.daemon.socket), "--namespace", self.namespace, *args],
                   check=check, timeout=timeout)

    def pull(self, ref: str, *, user: str | None = None, check: bool = True) -> Result:
        return self.run("images", "pull", "--plain-http", *(["--user", user] if user else []), ref, check=check)

    def push(self, ref: str, *, user: str | None = None, check: bool = True) -> Result:
        return self.run("images", "push", "--plain-http", *(["--user", user] if user else []), ref, check=check)

    def import_archive(self, archive: pathlib.Path) -> Result:
        return self.run("images", "import", str(archive))

    def image_digest(self, ref: str) -> str:
        """The target digest containerd stored for ``ref`` (``ctr images ls``)."""
        out = self.run("images", "ls", f"name=={ref}").stdout
        for line in out.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise AssertionError(f"{ref} not in ctr images ls:\n{out}")

    def content_digests(self) -> set[str]:
        out = self.run("content", "ls", "--quiet").stdout
        return set(out.split())

    def cleanup(self) -> None:
        out = self.run("images", "ls", "--quiet", check=False).stdout.split()
        if out:
            self.run("images", "rm", *out, check=False)


class _ContainersTool:
    """Shared by buildah and skopeo: a private auth file, registries.conf and signature policy."""

    def __init__(self, base: pathlib.Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.auth_file = base / "auth.json"
        self.auth_file.write_text('{"auths": {}}', encoding="utf-8")
        self.registries_conf = base / "registries.conf"
        self.registries_conf.write_text("unqualified-search-registries = []\n", encoding="utf-8")
        self.policy = base / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}), encoding="utf-8")
        self.tmpdir = base / "tmp"
        self.tmpdir.mkdir(exist_ok=True)
        self.env = dict(os.environ)
        self.env.update({
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "REGISTRY_AUTH_FILE": str(self.auth_file),
            "TMPDIR": str(self.tmpdir),
        })

    def stored_auths(self) -> dict[str, object]:
        return dict(json.loads(self.auth_file.read_text("utf-8")).get("auths") or {})


class Buildah(_ContainersTool):
    """buildah with private storage (vfs, root) and a private auth file."""

    def __init__(self, base: pathlib.Path) -> None:
        super().__init__(base)
        self.root = base / "root"
        self.root.mkdir(exist_ok=True)
        self.runroot = _short_dir("ecrbh-")  # keep the runroot path short, as for podman
        self.storage_conf = base / "storage.conf"
        self.storage_conf.write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{self.root}"\nrunroot = "{self.runroot}"\n', encoding="utf-8")
        self.env["CONTAINERS_STORAGE_CONF"] = str(self.storage_conf)

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = COMMAND_TIMEOUT) -> Result:
        return run(["buildah", "--root", str(self.root), "--runroot", str(self.runroot), "--storage-driver", "vfs",
                    *args], env=self.env, input=input, check=check, timeout=timeout)

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        return self.run("login", "--authfile", str(self.auth_file), "--tls-verify=false", "--username", user,
                        "--password-stdin", host, input=password + "\n", check=check)

    def pull(self, ref: str, *, check: bool = True) -> Result:
        return self.run("pull", "--signature-policy", str(self.policy), "--authfile", str(self.auth_file),
                        "--tls-verify=false", ref, check=check)

    def image_digest(self, ref: str) -> str:
        return self.run("inspect", "--type", "image", "--format", "{{.FromImageDigest}}", ref).stdout.strip()

    def image_id(self, ref: str) -> str:
        return self.run("inspect", "--type", "image", "--format", "{{.FromImageID}}", ref).stdout.strip()

    def tag(self, src: str, dest: str) -> None:
        self.run("tag", src, dest)

    def push(self, ref: str, dest: str | None = None, *, check: bool = True) -> tuple[Result, str | None]:
        digest_file = self.tmpdir / f"digest-{time.monotonic_ns()}"
        result = self.run("push", "--signature-policy", str(self.policy), "--authfile", str(self.auth_file),
                          "--tls-verify=false", "--digestfile", str(digest_file), ref, *([dest] if dest else []),
                          check=check)
        digest = digest_file.read_text("utf-8").strip() if digest_file.exists() else None
        return result, digest

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.run("rmi", "--all", "--force", check=False, timeout=60)
        shutil.rmtree(self.runroot, ignore_errors=True)


class Skopeo(_ContainersTool):
    """skopeo with a private auth file (so ``skopeo login`` stores credentials there)."""

    def run(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = COMMAND_TIMEOUT) -> Result:
        return run(["skopeo", "--policy", str(self.policy), *args], env=self.env, input=input, check=check,
                   timeout=timeout)

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        return self.run("login", "--authfile", str(self.auth_file), "--tls-verify=false", "--username", user,
                        "--password-stdin", host, input=password + "\n", check=check)

    def copy(self, src: str, dest: str, *extra: str, check: bool = True) -> tuple[Result, str | None]:
        """``skopeo copy`` with the private auth file and TLS verification off for docker:// ends."""
        digest_file = self.tmpdir / f"digest-{time.monotonic_ns()}"
        args = ["copy", "--retry-times", "0", "--authfile", str(self.auth_file), "--digestfile", str(digest_file)]
        if src.startswith("docker://"):
            args.append("--src-tls-verify=false")
        if dest.startswith("docker://"):
            args.append("--dest-tls-verify=false")
        result = self.run(*args, *extra, src, dest, check=check)
        digest = digest_file.read_text("utf-8").strip() if digest_file.exists() else None
        return result, digest


class PodmanClient(Podman):
    """proxy_harness.Podman (private storage and auth file) with non-raising commands for refusals."""

    def try_run(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> Result:
        try:
            proc = self.run(*args, timeout=timeout)
        except RuntimeError as e:
            return Result(["podman", *args], 1, "", str(e))
        return Result(["podman", *args], 0, proc.stdout, proc.stderr)

    def login(self, host: str, user: str, password: str, *, check: bool = True) -> Result:
        # --password-stdin needs stdin; Podman.run closes it, so the password goes on the command line
        result = self.try_run("login", "--authfile", str(self.auth_file), "--tls-verify=false", "--username", user,
                              "--password", password, host)
        if check and result.returncode != 0:
            raise ClientError(result)
        return result

    def stored_auths(self) -> dict[str, object]:
        return dict(json.loads(self.auth_file.read_text("utf-8")).get("auths") or {})

    def image_digest(self, ref: str) -> str:
        return self.run("image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()

    def image_id(self, ref: str) -> str:
        return self.run("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()

    def push_image(self, ref: str, *, check: bool = True) -> tuple[Result, str | None]:
        digest_file = self.tmpdir / f"digest-{time.monotonic_ns()}"
        result = self.try_run("push", "--authfile", str(self.auth_file), "--tls-verify=false", "--digestfile",
                              str(digest_file), ref)
        if check and result.returncode != 0:
            raise ClientError(result)
        digest = digest_file.read_text("utf-8").strip() if digest_file.exists() else None
        return result, digest
