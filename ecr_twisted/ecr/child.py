"""The proxy's side of the ECR API children: their command line, their environment, one run.

The command line carries only what is not secret (region, account, profile name, role ARN,
endpoints); the environment carries the rest: the role's external ID and the egress proxy
(`proxy_env`: HTTPS_PROXY/HTTP_PROXY/NO_PROXY, which botocore honours, so the ECR API and STS
calls go through it), over the proxy's own environment.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from ecr_twisted.ecr.aws import EXTERNAL_ID_ENV
from ecr_twisted.upstreams.spec import ECR, UpstreamSpec

__all__ = ["ChildFailed", "EcrChild", "child_args", "child_env", "run_child"]


class ChildFailed(Exception):
    """A child failed: `message` is its one-line reason, `code` AWS's error code when it had one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def child_args(spec: UpstreamSpec) -> list[str]:
    """The options of `aws.add_arguments` for one ECR upstream (nothing secret)."""
    if spec.kind != ECR:
        raise ValueError(f"upstream {spec.name}: not an ECR registry, it has no ECR API")
    args: list[str] = []
    if spec.region:
        args += ["--region", spec.region]
    if spec.registry_id:
        args += ["--registry-id", spec.registry_id]
    if spec.credentials == "profile" and not spec.profile:
        raise ValueError(f"upstream {spec.name}: credentials = profile without profile")
    if spec.credentials in ("profile", "role") and spec.profile:
        args += ["--profile", spec.profile]
    if spec.credentials == "role":
        if not spec.role_arn:
            raise ValueError(f"upstream {spec.name}: credentials = role without role-arn")
        args += ["--role-arn", spec.role_arn]
        if spec.session_name:
            args += ["--session-name", spec.session_name]
    if spec.ecr_endpoint_url:
        args += ["--ecr-endpoint-url", spec.ecr_endpoint_url]
    if spec.sts_endpoint_url:
        args += ["--sts-endpoint-url", spec.sts_endpoint_url]
    return args


def child_env(base: Mapping[str, str], proxy_env: Mapping[str, str], external_id: str | None = None) -> dict[str, str]:
    """`base` (the proxy's environment) with `proxy_env` over it, and the role's external ID.

    A name of `proxy_env` replaces every spelling of it in `base` (`https_proxy` as well as
    `HTTPS_PROXY`): Python's proxy lookup prefers the lower-case one, and --egress-proxy must win."""
    env = {k: v for k, v in base.items() if k != EXTERNAL_ID_ENV}
    given = {k.lower() for k in proxy_env}
    env = {k: v for k, v in env.items() if k.lower() not in given}
    env.update(proxy_env)
    if external_id:
        env[EXTERNAL_ID_ENV] = external_id
    return env


class _ChildProcess(ProcessProtocol):
    def __init__(self, d: Deferred[bytes], error: Callable[[str, str | None], ChildFailed], what: str) -> None:
        self.d = d
        self.error = error
        self.what = what
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def outReceived(self, data: bytes) -> None:
        self.out.append(data)

    def errReceived(self, data: bytes) -> None:
        self.err.append(data)

    def processEnded(self, reason: Failure) -> None:
        if self.d.called:
            return
        if reason.check(ProcessDone):
            self.d.callback(b"".join(self.out))
            return
        code: str | None = None
        try:
            told = json.loads(b"".join(self.out))
            if isinstance(told, dict) and told.get("error"):
                code = str(told["error"])
        except ValueError:
            pass
        lines = b"".join(self.err).decode("utf-8", "replace").strip().splitlines()
        self.d.errback(self.error(lines[-1] if lines else f"{self.what} failed: {reason.value}", code))


def run_child(
    reactor: Any,
    python: str,
    args: list[str],
    env: dict[str, str],
    timeout: float,
    error: Callable[[str, str | None], ChildFailed],
    what: str,
) -> Deferred[bytes]:
    """Run one child: its stdout when it exits 0, else `error(reason, code)`; killed after `timeout`."""
    d: Deferred[bytes] = Deferred()
    process = reactor.spawnProcess(_ChildProcess(d, error, what), python, args, env=env)

    def timed_out(result: Any, timeout: float) -> Failure:
        try:
            process.signalProcess("KILL")
        except Exception:
            pass
        return Failure(error(f"{what} gave no answer in {timeout:.0f} s", None))

    d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)
    return d


class EcrChild:
    """One ECR API child of one upstream, run anew at each `run()`: `python -m <module>` with the
    upstream's options (`child_args`) and `extra`; its environment made at each run from the
    proxy's own (`child_env`: `proxy_env` over it, the role's external ID); killed after
    `timeout`. A failure is `error(reason, code)`, its messages naming the child as `what`."""

    def __init__(
        self,
        reactor: Any,
        module: str,
        spec: UpstreamSpec,
        error: Callable[[str, str | None], ChildFailed],
        what: str,
        *,
        extra: Sequence[str] = (),
        proxy_env: Mapping[str, str] = {},  # noqa: B006 (read only)
        timeout: float = 60.0,
        python: str = sys.executable,
    ) -> None:
        self.reactor = reactor
        self.python = python
        self.args = [python, "-m", module, *child_args(spec), *extra]
        self.proxy_env = dict(proxy_env)
        self.external_id = spec.external_id if spec.credentials == "role" else None
        self.timeout = timeout
        self.error = error
        self.what = what

    def __repr__(self) -> str:  # the external ID stays out
        return f"<EcrChild {' '.join(self.args[1:])}>"

    def run(self) -> Deferred[bytes]:
        """The child's stdout when it exits 0, else a failure with `error`."""
        env = child_env(os.environ, self.proxy_env, self.external_id)
        return run_child(self.reactor, self.python, self.args, env, self.timeout, self.error, self.what)
