"""`python -m ecr_twisted.ecr.fetch_token`: one GetAuthorizationToken call, answer as JSON on stdout.

The proxy runs this in a short-lived child process: botocore and its service data
cost a long-lived process about 15 MiB of memory for a call made every six hours.
Credentials: botocore's default chain inherited through the environment, a named profile
(`--profile`), or a role assumed afresh on every call (`--role-arn`; see `aws`).

The answer: `authorizationToken`, `proxyEndpoint`, `tokenExpiresAt` (ECR's word),
`credentialsExpireAt` (the role credentials', or null) and `expiresAt`, the earlier of the
two: a token made from temporary credentials stops working when they expire, so the keeper
must refresh before that. Errors: exit status 1, one line on stderr and
`{"error": code, "message": ...}` on stdout (see `aws.fail`).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from ecr_twisted.ecr.aws import AwsAccess, ClientMaker, child_main, make_client_maker, timestamp

__all__ = ["answer", "fetch_authorization_data", "main"]


def fetch_authorization_data(
    region: str | None,
    registry_id: str | None = None,
    endpoint_url: str | None = None,
    session_factory: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """The first `authorizationData` entry of GetAuthorizationToken, through botocore's default chain."""
    access = AwsAccess(region=region, registry_id=registry_id, ecr_endpoint_url=endpoint_url)
    factory = None if session_factory is None else (lambda profile: session_factory())
    return _authorization_data(make_client_maker(access, factory))


def _authorization_data(maker: ClientMaker) -> dict[str, Any]:
    client = maker.ecr()
    call: dict[str, Any] = {}
    if maker.access.registry_id:
        # Deprecated but honoured: it makes proxyEndpoint name this registry, which
        # matters when the credentials belong to another account.
        call["registryIds"] = [maker.access.registry_id]
    entries = client.get_authorization_token(**call).get("authorizationData") or []
    if not entries:
        raise ValueError("GetAuthorizationToken returned no authorizationData")
    data: dict[str, Any] = entries[0]
    return data


def answer(maker: ClientMaker) -> dict[str, Any]:
    """What the child prints: the token, its endpoint and the earlier of the two expiries."""
    data = _authorization_data(maker)
    token_expires = timestamp(data.get("expiresAt"))
    creds_expire = maker.role_expires_at
    return {
        "authorizationToken": data["authorizationToken"],
        "expiresAt": token_expires if creds_expire is None else min(token_expires, creds_expire),
        "tokenExpiresAt": token_expires,
        "credentialsExpireAt": creds_expire,
        "proxyEndpoint": data.get("proxyEndpoint") or "",
    }


def main(argv: list[str] | None = None, session_factory: Callable[[str | None], Any] | None = None) -> int:
    return child_main("python -m ecr_twisted.ecr.fetch_token", argv, session_factory, lambda maker, args: answer(maker))


if __name__ == "__main__":
    sys.exit(main())
