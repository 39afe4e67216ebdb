"""Reading and rewriting request targets: the mount parameters of an upload, the `?tag=` of a manifest PUT.

Pure functions of the request target, kept out of the gate so that every mode reads these
parameters the same (hostile) way: keys percent-decoded and case-folded, as registries read them.
"""

from __future__ import annotations

import re
from typing import Callable
from urllib.parse import parse_qsl, urlencode

from ecr_twisted.access.decision import Decision
from ecr_twisted.registry import routes

__all__ = ["NO_MOUNT", "mount_source", "plain_upload", "query_tags", "renamed_scopes", "with_mount_source"]

NO_MOUNT = "-"  # not a mount request at all


def mount_source(target: bytes) -> str | None:
    """The repository a mount request reads from; None when it cannot be trusted (no `from`,
    several, odd spellings of the keys, a bad name); NO_MOUNT when nothing asks for a mount.

    Keys are compared after percent-decoding and case-folding: registries decode them, and
    `?%6Dount=` must not slip past a check that looks for the bytes `mount=`."""
    params = parse_qsl(target.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
    keys = [k.lower() for k, _ in params]
    if "mount" not in keys and "from" not in keys:
        return NO_MOUNT
    sources = [v for k, v in params if k == "from"]
    if len(sources) != 1 or keys.count("from") != 1 or keys.count("mount") != 1 or ("mount", "") in params:
        return None
    if not [k for k, _ in params if k == "mount"] or not routes.valid_name(sources[0]):
        return None
    return sources[0]


def plain_upload(target: bytes) -> Decision:
    """The same upload request without any mount: the registry starts a normal upload."""
    path, _, query = target.partition(b"?")
    params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    kept = [(k, v) for k, v in params if k.lower() not in ("mount", "from")]
    decision = Decision()
    decision.target = path + (b"?" + urlencode(kept).encode("ascii") if kept else b"")
    return decision


def query_tags(target: bytes) -> list[str]:
    """`?tag=` values of a manifest PUT (OCI: push by digest and tag it in one request)."""
    if b"?" not in target:
        return []
    return [v for k, v in parse_qsl(target.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)
            if k.lower() == "tag"]


def with_mount_source(target: bytes, source: str) -> bytes:
    """The mount request `target` reading from `source` instead (for a target whose `mount_source`
    is a name: exactly one `from`). Other parameters keep their values."""
    path, _, query = target.partition(b"?")
    params = [(k, source if k == "from" else v) for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True)]
    return path + b"?" + urlencode(params).encode("ascii")


_SCOPE = re.compile(r"repository:(?P<name>[^:]+):(?P<actions>[a-z*,]*)\Z")


def renamed_scopes(query: bytes, rename: Callable[[str], str]) -> bytes:
    """A `/token` query with the repository names of its `scope=` values passed through `rename`
    (the router's public names); other parameters and scopes as they were."""
    params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    changed = False
    out: list[tuple[str, str]] = []
    for key, value in params:
        if key == "scope":
            scopes = []
            for scope in value.split(" "):
                m = _SCOPE.match(scope)
                if m is not None and routes.valid_name(m.group("name")):
                    new = rename(m.group("name"))
                    if new != m.group("name"):
                        scope = f"repository:{new}:{m.group('actions')}"
                        changed = True
                scopes.append(scope)
            value = " ".join(scopes)
        out.append((key, value))
    return urlencode(out).encode("ascii") if changed else query
