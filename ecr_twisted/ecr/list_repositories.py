"""`python -m ecr_twisted.ecr.list_repositories`: every repository name of one registry, as JSON on stdout.

ECR answers 405 to `GET /v2/_catalog`; the proxy serves it from DescribeRepositories instead,
called here in a short-lived child for the reasons `fetch_token` gives, with the same options
and credentials. All pages are read (botocore's paginator); the answer is the sorted list of
`repositoryName`. Errors as in `fetch_token`: exit status 1, one line on stderr and
`{"error": code, "message": ...}` on stdout, the code telling a denied caller from a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

from ecr_twisted.ecr.aws import AwsAccess, ClientMaker, add_arguments, fail, make_client_maker

__all__ = ["main", "repository_names"]


def repository_names(maker: ClientMaker, page_size: int | None = None) -> list[str]:
    """Every repository's name in the registry (all pages), sorted."""
    client = maker.ecr()
    call: dict[str, Any] = {}
    if maker.access.registry_id:
        call["registryId"] = maker.access.registry_id
    if page_size:
        call["PaginationConfig"] = {"PageSize": page_size}
    names: list[str] = []
    for page in client.get_paginator("describe_repositories").paginate(**call):
        names.extend(str(r["repositoryName"]) for r in page.get("repositories") or ())
    return sorted(set(names))


def main(argv: list[str] | None = None, session_factory: Callable[[str | None], Any] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ecr_twisted.ecr.list_repositories")
    add_arguments(parser)
    parser.add_argument("--page-size", type=int, help="repositories per DescribeRepositories call (max 1000)")
    args = parser.parse_args(argv)
    try:
        names = repository_names(make_client_maker(AwsAccess.from_args(args, os.environ), session_factory),
                                 args.page_size)
    except Exception as e:
        return fail(e)
    json.dump(names, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
