"""Run moto's server (ECR API + S3 on one port) with a controllable ECR token.

moto's GetAuthorizationToken hands out a fixed ``AWS:<account>-auth-token`` that
"expired" in 2015, which makes token refresh and rotation untestable.  This
wrapper patches it to return the token described by a JSON file that is re-read
on every call, so a test fixture can rotate the token (and its expiry) while the
server keeps running::

    {"password": "...", "expires_at": 1700000000.0,
     "accounts": {"222222222222": {"password": "...", "expires_at": 1700000000.0}}}

``accounts`` (optional) gives another token to the callers moto counts as that account: moto
derives the account from the request's access key unless MOTO_ACCOUNT_ID is set, so the
credentials STS's AssumeRole hands out for a role in account B get account B's token, and a
test registry accepting only that token proves the role's credentials were used.

Usage: ``python -m ecr_twisted.testing._motoserver --port N --token-file F [--host H]``
"""

from __future__ import annotations

import argparse
import json
import pathlib
from base64 import b64encode
from datetime import datetime, timezone
from typing import Any

__all__ = ["DEFAULT_ACCOUNT", "install_token_patch", "main", "read_token_file"]

DEFAULT_ACCOUNT = "123456789012"


def read_token_file(path: pathlib.Path, account: str | None = None) -> tuple[str, float]:
    """Return (password, expires_at) for ``account`` (its own entry, else the top-level one).

    Re-read on each call so rotation is live.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    entry = (data.get("accounts") or {}).get(account) if account is not None else None
    if entry is None:
        entry = data
    return str(entry["password"]), float(entry["expires_at"])


def install_token_patch(token_file: pathlib.Path) -> None:
    """Replace moto's ECR GetAuthorizationToken with one driven by ``token_file``."""
    from moto.core.responses import ActionResult
    from moto.ecr.responses import ECRResponse

    def get_authorization_token(self: Any) -> Any:
        registry_ids = self._get_param("registryIds") or [self.current_account or DEFAULT_ACCOUNT]
        # the caller's account (from its access key), not the registryIds it asks for: ECR answers
        # with the caller's own token whatever registry it names
        password, expires_at = read_token_file(token_file, self.current_account)
        token = b64encode(f"AWS:{password}".encode("utf-8")).decode("ascii")
        expires = datetime.fromtimestamp(expires_at, tz=timezone.utc)
        auth_data = [
            {
                "authorizationToken": token,
                "expiresAt": expires,
                "proxyEndpoint": f"https://{registry_id}.dkr.ecr.{self.region}.amazonaws.com",
            }
            for registry_id in registry_ids
        ]
        return ActionResult({"authorizationData": auth_data})

    ECRResponse.get_authorization_token = get_authorization_token  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, patch moto, then hand over to moto's own (threaded) server main."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-file", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)

    install_token_patch(args.token_file.resolve())

    from moto.server import main as moto_main

    moto_main(["-H", args.host, "-p", str(args.port)])


if __name__ == "__main__":
    main()
