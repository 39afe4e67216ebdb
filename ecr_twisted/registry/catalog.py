"""`GET /v2/_catalog` answered by the proxy from the ECR API, since ECR itself answers 405.

Each ECR upstream is a `Source`: its public namespace and a callable giving its private
repository names (the ECR helper's cached `DescribeRepositories`). Names are merged across
upstreams as public names (`namespace/name`, the bare name on the default upstream), sorted
(code point order, distribution's lexical order), de-duplicated, filtered by the caller's
policy filter and then paginated, so a page is always full and a cursor never names a
repository the caller may not see. Everything here is a value: `Catalog.answer` gives an
`Answer` (status, fields, body) the handler only writes.

Decisions (issue #13):
- Pagination as the distribution spec says: `n` absent means "everything", capped at
  `MAX_ENTRIES` with a `Link` to the rest; `n` larger than the cap is clamped the same way (the
  spec lets a registry return fewer); `n=0` is an empty list without a Link; `last` is an
  exclusive cursor (names after it); a `Link: </v2/_catalog?last=X&n=N>; rel="next"` is sent
  while names remain. `n` that is not a non-negative decimal integer is 400
  PAGINATION_NUMBER_INVALID. An empty `n=` counts as absent (as distribution does).
- Some upstreams fail: the others' names are answered (200) with one
  `Warning: 199 - "catalog incomplete: upstream X: why"` field per failed upstream, so tools
  keep working while an operator can see the list is partial.
- Every upstream fails: 403 DENIED when every failure is a refusal (the proxy's AWS principal
  lacks ecr:DescribeRepositories: retrying will not help and the detail says so), else 503
  UNAVAILABLE with Retry-After (a retry may help).
- Upstreams of kind "registry" (no DescribeRepositories) are not sources: their repositories
  are left out of the merged catalog. With no source at all the catalog is empty (200).

The failure contract for sources is `CatalogError` (`.upstream`, `.denied`, `.message`). The
ECR helper's exceptions cannot subclass it (`ecr` may not import `registry`): the composition
root wraps each source with `adapted`, naming the helper's classes. Any other exception of a
source counts as that upstream being unavailable and is logged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence
from urllib.parse import parse_qsl, urlencode

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ecr_twisted.registry import errors
from ecr_twisted.registry.errors import RegistryError
from ecr_twisted.registry.listings import Filter

__all__ = [
    "Catalog", "CatalogError", "Source", "Answer", "Pagination", "MAX_ENTRIES", "PAGINATION_NUMBER_INVALID",
    "public_name", "merge", "pagination", "paginate", "warning_value", "adapted",
]

MAX_ENTRIES = 10000  # names on one page at most, whatever `n` asks for
Visible = Callable[[str, str], "str | None"]  # (upstream, public name) -> the caller's name for it, or None
PAGINATION_NUMBER_INVALID = RegistryError("PAGINATION_NUMBER_INVALID", "invalid number of results requested", 400)
CATALOG_UNAVAILABLE = RegistryError("UNAVAILABLE", "the repository list could not be read from any upstream", 503)
RETRY_AFTER = b"5"
_N = re.compile(r"[0-9]+\Z")
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')  # what may not stand in a quoted Warning text


class CatalogError(Exception):
    """A source could not list its repositories. `denied`: the upstream refused (the proxy's
    principal lacks ecr:DescribeRepositories), else it was unavailable. `message` is shown to
    clients: it must never carry a secret."""

    def __init__(self, upstream: str, message: str, denied: bool = False) -> None:
        super().__init__(upstream, message)
        self.upstream = upstream
        self.message = message
        self.denied = denied


class Source(NamedTuple):
    """One ECR upstream's repositories: `(namespace, names)` with the upstream's name for messages
    (the namespace when not given)."""

    namespace: str
    names: Callable[[], "Deferred[list[str]]"]
    upstream: str = ""

    @property
    def label(self) -> str:
        return self.upstream or self.namespace or "default"


@dataclass(frozen=True, slots=True)
class Answer:
    """What to answer a `_catalog` request with; the handler writes it as is."""

    status: int
    fields: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Pagination:
    n: int  # names on this page at most (after the cap)
    last: str | None  # exclusive cursor
    asked: bool  # the client gave `n` (the Link repeats the page size either way)


def adapted(
    names: Callable[[], "Deferred[list[str]]"],
    upstream: str,
    denied: tuple[type[BaseException], ...] = (),
    unavailable: tuple[type[BaseException], ...] = (),
) -> Callable[[], "Deferred[list[str]]"]:
    """`names` whose failures of the classes `denied` / `unavailable` (the ECR helper's, passed in)
    become `CatalogError`s of `upstream`, with the exception's `message` (or its text) shown."""

    def convert(reason: Failure) -> Failure:
        err = reason.value
        if isinstance(err, CatalogError) or not isinstance(err, denied + unavailable):
            return reason
        message = getattr(err, "message", None)
        text = message if isinstance(message, str) else str(err)
        return Failure(CatalogError(upstream, text, denied=isinstance(err, denied)))

    def listed() -> "Deferred[list[str]]":
        return names().addErrback(convert)

    return listed


def public_name(namespace: str, name: str) -> str:
    return namespace + "/" + name if namespace else name


def merge(listed: Iterable[tuple[str, Iterable[str]]]) -> list[str]:
    """Public names of every (namespace, private names), sorted and de-duplicated (a default
    upstream's `p/x` and prefix p's `x` are one public name: the router sends it to p)."""
    return sorted({public_name(ns, name) for ns, names in listed for name in names})


def pagination(query: bytes, cap: int = MAX_ENTRIES) -> Pagination | None:
    """`n` and `last` of a `_catalog` query string; None: `n` is invalid."""
    n: str | None = None
    last: str | None = None
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == "n" and n is None:
            n = value
        elif key == "last" and last is None:
            last = value
    if not n:
        return Pagination(cap, last or None, False)
    if not _N.match(n):
        return None
    return Pagination(min(int(n), cap), last or None, True)


def paginate(names: Sequence[str], page: Pagination) -> tuple[list[str], bytes | None]:
    """The page of sorted `names` after `page.last`, and the Link field's value if more remain."""
    if page.n == 0:
        return [], None
    start = 0
    if page.last is not None:
        start = _after(names, page.last)
    shown = list(names[start : start + page.n])
    if start + page.n >= len(names):
        return shown, None
    query = urlencode([("last", shown[-1]), ("n", str(page.n))])
    return shown, b'</v2/_catalog?' + query.encode("ascii") + b'>; rel="next"'


def _after(names: Sequence[str], last: str) -> int:
    lo, hi = 0, len(names)
    while lo < hi:
        mid = (lo + hi) // 2
        if names[mid] <= last:
            lo = mid + 1
        else:
            hi = mid
    return lo


def warning_value(upstream: str, why: str) -> bytes:
    """A `Warning` field value (RFC 7234 code 199) saying the list misses one upstream."""
    text = _UNSAFE.sub("?", f"catalog incomplete: upstream {upstream}: {why}")[:300]
    return b'199 - "' + text.encode("ascii") + b'"'


class Catalog:
    """The merged catalog of the ECR upstreams (`sources`), filtered per caller."""

    log = Logger()

    def __init__(self, sources: Sequence[Source | tuple[str, Callable[[], "Deferred[list[str]]"]]],
                 cap: int = MAX_ENTRIES) -> None:
        self.sources = [s if isinstance(s, Source) else Source(*s) for s in sources]
        self.cap = cap

    def answer(self, target: bytes, keep: Filter | None = None, visible: Visible | None = None) -> "Deferred[Answer]":
        """The answer to `GET <target>` (path and query) for a caller who may see `keep(names)`
        (None: everything) of the public names, each shown as `visible(upstream, public)` names it
        where the caller asked (None: as is; a name it maps to None cannot be reached from there)."""
        return Deferred.fromCoroutine(self._answer(target, keep, visible))

    async def _answer(self, target: bytes, keep: Filter | None, visible: Visible | None) -> Answer:
        page = pagination(target.partition(b"?")[2], self.cap)
        if page is None:
            return _error(PAGINATION_NUMBER_INVALID, "n must be a non-negative integer")
        listed, failed = await self._gather()
        if self.sources and len(failed) == len(self.sources):
            return self._all_failed(failed)
        if visible is None:
            names = merge((ns, names) for ns, _, names in listed)
        else:  # what each repository is called on the caller's host, when it can be reached from there
            upstream_of = {public_name(ns, n): up for ns, up, names in listed for n in names}
            names = sorted(upstream_of)
        if keep is not None:
            kept = keep(names)
            if isinstance(kept, Deferred):
                kept = await kept
            names = sorted(kept)  # a filter keeps order; sorted again so pagination never depends on it
        if visible is not None:
            shown_as = (visible(upstream_of[public], public) for public in names)
            names = sorted({name for name in shown_as if name is not None})
        shown, link = paginate(names, page)
        fields = [(b"Content-Type", b"application/json"), (b"Docker-Distribution-API-Version", b"registry/2.0")]
        if link is not None:
            fields.append((b"Link", link))
        fields.extend((b"Warning", warning_value(e.upstream, _shown(e))) for e in failed)
        body = json.dumps({"repositories": shown}, separators=(",", ":")).encode("utf-8")
        return Answer(200, fields, body)

    async def _gather(self) -> tuple[list[tuple[str, str, list[str]]], list[CatalogError]]:
        """Every source asked at once; (namespace, upstream, names) of those that answered, and the failures."""
        started: list[tuple[Source, Deferred[list[str]] | CatalogError]] = []
        for source in self.sources:
            try:
                started.append((source, source.names()))
            except Exception as e:
                started.append((source, self._as_error(source, Failure(e))))
        listed: list[tuple[str, str, list[str]]] = []
        failed: list[CatalogError] = []
        for source, pending in started:
            if isinstance(pending, CatalogError):
                failed.append(pending)
                continue
            try:
                listed.append((source.namespace, source.label, list(await pending)))
            except Exception as e:
                failed.append(self._as_error(source, Failure(e)))
        return listed, failed

    def _as_error(self, source: Source, reason: Failure) -> CatalogError:
        err = reason.value
        if isinstance(err, CatalogError):
            return err
        self.log.failure("listing the repositories of upstream {upstream} failed", reason, upstream=source.label)
        return CatalogError(source.label, "listing failed")

    def _all_failed(self, failed: list[CatalogError]) -> Answer:
        if all(e.denied for e in failed):
            names = ", ".join(e.upstream for e in failed)
            detail = f"the proxy's AWS principal lacks ecr:DescribeRepositories on upstream {names}"
            return _error(errors.DENIED, detail)
        detail = "; ".join(f"upstream {e.upstream}: {_shown(e)}" for e in failed)
        return _error(CATALOG_UNAVAILABLE, detail, [(b"Retry-After", RETRY_AFTER)])


def _shown(err: CatalogError) -> str:
    """What a client is told of a failed listing: never AWS's own text, which names the proxy's
    principal (its ARN and account); that is for the operator's log (the ECR helper logs it)."""
    return "ecr:DescribeRepositories denied" if err.denied else "listing unavailable"


def _error(err: RegistryError, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> Answer:
    fields = list(errors.JSON_FIELDS)
    if extra:
        fields.extend(extra)
    return Answer(err.status, fields, errors.envelope(err, detail))
