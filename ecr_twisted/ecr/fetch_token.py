"""`python -m ecr_twisted.ecr.fetch_token`: one GetAuthorizationToken call, answer as JSON on stdout.

The proxy runs this in a short-lived child process: botocore and its service data
cost a long-lived process about 15 MiB of memory for a call made every six hours.
Credentials come from botocore's normal chain, inherited through the environment.
Errors go to stderr as one line (botocore's messages name the operation, never
credentials) with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

__all__ = ["fetch_authorization_data", "main"]


def fetch_authorization_data(
    region: str | None,
    registry_id: str | None = None,
    endpoint_url: str | None = None,
    session_factory: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """The first `authorizationData` entry of GetAuthorizationToken, through botocore's normal chain."""
    if session_factory is None:
        import botocore.session

        session = botocore.session.get_session()
    else:
        session = session_factory()
    kwargs: dict[str, Any] = {}
    if region:
        kwargs["region_name"] = region
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    client = session.create_client("ecr", **kwargs)
    call: dict[str, Any] = {}
    if registry_id:
        # Deprecated but honoured: it makes proxyEndpoint name this registry, which
        # matters when the credentials belong to another account.
        call["registryIds"] = [registry_id]
    entries = client.get_authorization_token(**call).get("authorizationData") or []
    if not entries:
        raise ValueError("GetAuthorizationToken returned no authorizationData")
    return entries[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecr_twisted.ecr.fetch_token")
    parser.add_argument("--region")
    parser.add_argument("--registry-id")
    parser.add_argument("--endpoint-url")
    args = parser.parse_args(argv)
    try:
        data = fetch_authorization_data(args.region, args.registry_id, args.endpoint_url)
        expires: Any = data.get("expiresAt")
        answer = {
            "authorizationToken": data["authorizationToken"],
            "expiresAt": expires.timestamp() if hasattr(expires, "timestamp") else float(expires),
            "proxyEndpoint": data.get("proxyEndpoint") or "",
        }
    except Exception as e:  # one line for the parent's log, whatever went wrong
        print(f"{type(e).__name__}: {e}".replace("\n", " ")[:500], file=sys.stderr)
        return 1
    json.dump(answer, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
