"""`python -m ecr_twisted.ecr.list_repositories`: every repository name of one registry, as JSON on stdout.

ECR answers 405 to `GET /v2/_catalog`; the proxy serves it from DescribeRepositories instead,
called here in a short-lived child for the reasons `fetch_token` gives, with the same options
and credentials. All pages are read (botocore's paginator); the answer is the sorted list of
`repositoryName`. Errors as in `fetch_token`: exit status 1, one line on stderr and
`{"error": code, "message": ...}` on stdout, the code telling a denied caller from a failure.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from ecr_twisted.ecr.aws import ClientMaker, child_main

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
    return child_main("python -m ecr_twisted.ecr.list_repositories", argv, session_factory,
                      lambda maker, args: repository_names(maker, args.page_size), _page_size)


def _page_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--page-size", type=int, help="repositories per DescribeRepositories call (max 1000)")


if __name__ == "__main__":
    sys.exit(main())
