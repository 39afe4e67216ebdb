"""The tags the layer cache has seen: which manifest each (repository, tag, Accept) named, and when.

Tags move, so unlike digests they are remembered with the time the upstream last said so.
They survive restarts (a restart while ECR is down still serves) and are shared with the other
`--workers` processes through one append-only log (`store.SharedLog`): a line records a tag
seen, or forgotten. Each process replays the others' lines in order when the store's
generation file says something changed (`LayerCache.sync`). Nothing here speaks HTTP or
decides anything; `layer.LayerCache` does.
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

from twisted.logger import Logger

from ecr_twisted.cache.store import SharedLog

__all__ = ["TagKey", "TagEntry", "Tags"]

log = Logger()

TagKey = tuple[str, str, bytes]  # (repository, tag, the client's Accept): a list and one platform's differ


class TagEntry:
    """What the upstream last said a tag is."""

    __slots__ = ("digest", "checked")

    def __init__(self, digest: str, checked: float) -> None:
        self.digest = digest
        self.checked = checked  # when the upstream last said the tag is this digest


def _line(key: TagKey, digest: str | None, checked: float) -> str:
    """A log line; digest None: forgotten."""
    return json.dumps([key[0], key[1], key[2].decode("latin-1"), digest, checked])


class Tags:
    """The tag entries of one process, and the log shared with the others.

    `stored(digest)` says whether the manifest a replayed line names is in the store: a tag is
    only worth remembering while its manifest can be served."""

    def __init__(self, path: str, stored: Callable[[str], bool], compact: bool) -> None:
        self._entries: dict[TagKey, TagEntry] = {}
        self._stored = stored
        self._log = SharedLog(path)
        self._apply(*self._log.new_lines())
        if compact:  # the first process of a group rewrites the log to what it holds
            self._log.rewrite(_line(key, e.digest, e.checked) for key, e in self._entries.items())

    def get(self, key: TagKey) -> TagEntry | None:
        return self._entries.get(key)

    def pointing_at(self, repo: str, digest: str) -> set[str]:
        """The tags of `repo` known to name `digest` (any Accept)."""
        return {t for (r, t, _), e in self._entries.items() if r == repo and e.digest == digest}

    def remember(self, key: TagKey, digest: str, now: float) -> None:
        """The upstream said `key` is `digest` just now."""
        entry = self._entries.get(key)
        if entry is not None and entry.digest == digest:
            entry.checked = now
            return
        self._entries[key] = TagEntry(digest, now)
        try:
            self._log.append([_line(key, digest, now)])
        except OSError as e:
            log.warn("cannot record a tag in the cache: {error}", error=e.strerror)

    def forget(self, key: TagKey) -> None:
        """The upstream said `key` is gone (404): never to be served again, stale or not."""
        if self._entries.pop(key, None) is None:
            return
        try:
            self._log.append([_line(key, None, 0)])
        except OSError as e:
            log.warn("cannot record a tag in the cache: {error}", error=e.strerror)

    def drop(self, repo: str, tags: Iterable[str]) -> dict[TagKey, str]:
        """Forget every Accept variant of `tags` in `repo`, in this process only; returns what was
        dropped (key: the digest it named), for `log_dropped`."""
        wanted = set(tags)
        dropped = [key for key in self._entries if key[0] == repo and key[1] in wanted]
        return {key: self._entries.pop(key).digest for key in dropped}

    def log_dropped(self, dropped: Iterable[TagKey]) -> None:
        """Tell the other processes (one record). Raises OSError."""
        self._log.append([_line(key, None, 0) for key in dropped])

    def catch_up(self) -> None:
        """Replay what any process appended since we last read. Raises OSError."""
        self._apply(*self._log.new_lines())

    def _apply(self, from_start: bool, lines: list[str]) -> None:
        """Replay log lines in order. A forget always applies; an entry only if it is not older
        than the one held (this process may have revalidated since) and its manifest is stored.
        Lines from the start of a file are all there is (a newer start compacted it)."""
        if from_start:
            self._entries = {}
        entries = self._entries
        for line in lines:
            try:
                repo, tag, accept, digest, checked = json.loads(line)
                key = (repo, tag, accept.encode("latin-1"))
                checked = float(checked)
            except (ValueError, TypeError, AttributeError):
                continue  # a torn line
            entry = entries.get(key)
            if digest is None:
                entries.pop(key, None)
            elif entry is not None and entry.checked > checked:
                continue
            elif self._stored(digest):
                entries[key] = TagEntry(digest, checked)
            else:
                entries.pop(key, None)  # moved to a manifest we do not hold (evicted, or not adopted yet)

    def close(self) -> None:
        self._log.close()
