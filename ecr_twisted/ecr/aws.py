"""The child processes' side of the ECR API: which credentials, which client, how a failure is told.

Shared by `fetch_token` and `list_repositories`, which run in short-lived children (botocore
blocks and costs memory; see `tokens.ProcessTokenFetcher`). Three ways to the credentials, as an
upstream's `credentials` key says: botocore's default chain, a named profile, or an assumed role
(STS AssumeRole with the chain or the profile as base). The role is assumed afresh by every
child, so its credentials are always new when used; their expiry is reported because an ECR
token made from temporary credentials stops working when they expire.

Nothing secret comes through the command line (argv is visible in `ps`): the role's external
ID comes through the environment (`EXTERNAL_ID_ENV`), credentials from the chain or the profile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import IO, Any, Callable, Mapping

__all__ = [
    "DEFAULT_SESSION_NAME",
    "EXTERNAL_ID_ENV",
    "AwsAccess",
    "ClientMaker",
    "add_arguments",
    "child_main",
    "error_code",
    "fail",
    "make_client_maker",
    "timestamp",
]

DEFAULT_SESSION_NAME = "ecr-twisted"
EXTERNAL_ID_ENV = "ECR_TWISTED_EXTERNAL_ID"  # the role's external ID: in the environment, never in argv


@dataclass(frozen=True)
class AwsAccess:
    """How a child reaches one registry's ECR API (the command line, parsed)."""

    region: str | None = None
    registry_id: str | None = None
    profile: str | None = None
    role_arn: str | None = None
    external_id: str | None = None
    session_name: str | None = None
    ecr_endpoint_url: str | None = None
    sts_endpoint_url: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> AwsAccess:
        return cls(
            region=args.region,
            registry_id=args.registry_id,
            profile=args.profile,
            role_arn=args.role_arn,
            external_id=environ.get(EXTERNAL_ID_ENV) or None,
            session_name=args.session_name,
            ecr_endpoint_url=args.ecr_endpoint_url,
            sts_endpoint_url=args.sts_endpoint_url,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The children's common options (what `child.child_args` writes)."""
    parser.add_argument("--region")
    parser.add_argument("--registry-id")
    parser.add_argument("--profile", help="a named profile instead of the default chain (or the role's base)")
    parser.add_argument("--role-arn", help=f"assume this role first (external ID from ${EXTERNAL_ID_ENV})")
    parser.add_argument("--session-name", help=f"the role session's name (default {DEFAULT_SESSION_NAME})")
    parser.add_argument("--ecr-endpoint-url", "--endpoint-url", dest="ecr_endpoint_url")
    parser.add_argument("--sts-endpoint-url")


class ClientMaker:
    """Makes the ECR client of an `AwsAccess`, assuming its role first if it has one.

    `role_expires_at` is the expiry (epoch seconds) of the role credentials the last client was
    made with, None without a role."""

    def __init__(self, access: AwsAccess, session_factory: Callable[[str | None], Any]) -> None:
        self.access = access
        self._session_factory = session_factory
        self.role_expires_at: float | None = None

    def ecr(self) -> Any:
        access = self.access
        session = self._session_factory(access.profile)
        kwargs: dict[str, Any] = {}
        if access.region:
            kwargs["region_name"] = access.region
        if access.role_arn:
            creds = self._assume_role(session)
            kwargs["aws_access_key_id"] = creds["AccessKeyId"]
            kwargs["aws_secret_access_key"] = creds["SecretAccessKey"]
            kwargs["aws_session_token"] = creds["SessionToken"]
            self.role_expires_at = timestamp(creds["Expiration"])
        if access.ecr_endpoint_url:
            kwargs["endpoint_url"] = access.ecr_endpoint_url
        return session.create_client("ecr", **kwargs)

    def _assume_role(self, session: Any) -> dict[str, Any]:
        access = self.access
        kwargs: dict[str, Any] = {}
        if access.region:
            kwargs["region_name"] = access.region  # the regional STS endpoint, as AWS recommends
        if access.sts_endpoint_url:
            kwargs["endpoint_url"] = access.sts_endpoint_url
        sts = session.create_client("sts", **kwargs)
        call: dict[str, Any] = {
            "RoleArn": access.role_arn,
            "RoleSessionName": access.session_name or DEFAULT_SESSION_NAME,
        }
        if access.external_id:
            call["ExternalId"] = access.external_id
        creds: dict[str, Any] = sts.assume_role(**call)["Credentials"]
        return creds


def _botocore_session(profile: str | None) -> Any:
    import botocore.session

    return botocore.session.Session(profile=profile) if profile else botocore.session.get_session()


def make_client_maker(access: AwsAccess, session_factory: Callable[[str | None], Any] | None = None) -> ClientMaker:
    """The ClientMaker of `access`; `session_factory(profile)` is botocore's unless a test gives one."""
    return ClientMaker(access, session_factory or _botocore_session)


def timestamp(value: Any) -> float:
    """Epoch seconds of a botocore datetime (or a number already)."""
    return float(value.timestamp()) if hasattr(value, "timestamp") else float(value)


_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s\"']+@")


def error_code(exc: BaseException) -> str:
    """AWS's error code of a botocore ClientError (`AccessDeniedException`, ...), else the exception's type."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = (response.get("Error") or {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__


def fail(exc: BaseException, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Tell the parent why: one line on stderr (for its log) and `{"error": code, "message": ...}` on stdout.

    botocore's messages name the operation and the error, never the credentials; a URL's
    user:password (an egress proxy's) is masked all the same."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    message = _USERINFO.sub(r"\1***@", f"{type(exc).__name__}: {exc}".replace("\n", " "))[:500]
    print(message, file=err)
    json.dump({"error": error_code(exc), "message": message}, out)
    out.flush()
    return 1


def child_main(
    prog: str,
    argv: list[str] | None,
    session_factory: Callable[[str | None], Any] | None,
    answer: Callable[[ClientMaker, argparse.Namespace], Any],
    more_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None,
) -> int:
    """A child's `main`: the options of `add_arguments` (and `more_arguments`), one call of
    `answer` with the client maker they describe, its result as JSON on stdout; whatever goes
    wrong, `fail` (exit status 1, the reason on stderr and stdout)."""
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    more_arguments(parser)
    args = parser.parse_args(argv)
    try:
        result = answer(make_client_maker(AwsAccess.from_args(args, os.environ), session_factory), args)
    except Exception as e:  # one line for the parent's log, whatever went wrong
        return fail(e)
    json.dump(result, sys.stdout)
    sys.stdout.flush()
    return 0
