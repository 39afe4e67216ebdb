"""Who may do what: the access policy, as data, decided before any upstream request.

A policy is a list of rules, each granting (or, with `effect = "deny"`, refusing)
actions (`pull`, `push`, `delete`) to principals on repositories matched by glob,
optionally only for tags matched by glob. Nothing is allowed unless a rule allows it,
and a matching deny beats any allow. Tag-limited rules speak only about references
by tag: checks without a tag (blobs, uploads, manifests by digest) are repository
checks, for which a tag-limited allow still counts as access to the repository and a
tag-limited deny does not apply.

Policy file (TOML):

    [groups]
    ci = ["jenkins", "gha"]

    [[rule]]
    principals = ["anonymous", "authenticated"]   # also "*", "user:NAME", "group:NAME"
    actions = ["pull"]
    repositories = ["*"]

    [[rule]]
    principals = ["group:ci"]
    actions = ["push"]
    repositories = ["team-a/*"]
    tags = ["release-*"]

    [[rule]]
    effect = "deny"
    principals = ["*"]
    actions = ["push"]
    repositories = ["*"]
    tags = ["latest"]

Globs are `fnmatch` patterns matched case-sensitively: `*` also matches `/`, so
`team-a/*` covers every repository below `team-a/`.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterable, Mapping

from twisted.logger import Logger

from ecr_twisted.registry.routes import NAME, TAG

__all__ = [
    "ACTIONS",
    "ANONYMOUS",
    "PRESETS",
    "FixedPolicy",
    "Policy",
    "PolicyError",
    "PolicyFile",
    "Principal",
    "Rule",
]

_log = Logger()

ACTIONS = frozenset({"pull", "push", "delete"})
_NAME = re.compile(NAME + r"\Z")
_TAG = re.compile(TAG + r"\Z")
_PRINCIPAL = re.compile(r"(?:\*|anonymous|authenticated|(?:user|group):[^\s:]+)\Z")


class PolicyError(ValueError):
    """A policy that cannot be used; the message says where."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: `user` None is anonymous."""

    user: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.user is None


ANONYMOUS = Principal()
_ANONYMOUS_NAMES = frozenset({"*", "anonymous"})
_MAX_DECIDED = 8192  # remembered policy answers; past this the memory starts over


@dataclass(frozen=True)
class Rule:
    effect: str  # "allow" or "deny"
    principals: frozenset[str]
    actions: frozenset[str]
    repositories: tuple[str, ...]
    tags: tuple[str, ...] | None  # None: any reference

    def covers(self, names: frozenset[str], action: str, repository: str) -> bool:
        return (
            action in self.actions
            and not self.principals.isdisjoint(names)
            and any(fnmatchcase(repository, pattern) for pattern in self.repositories)
        )

    def tag_matches(self, tag: str) -> bool:
        return self.tags is None or any(fnmatchcase(tag, pattern) for pattern in self.tags)


class Policy:
    """Decides (principal, action, repository, tag) -> allowed. Default deny."""

    def __init__(self, rules: Iterable[Rule], groups: Mapping[str, Iterable[str]] | None = None) -> None:
        self.rules = tuple(rules)
        # some allow rule speaks to callers without credentials: basic mode then offers the token flow
        self.anonymous_may_act = any(
            rule.effect == "allow" and not rule.principals.isdisjoint(_ANONYMOUS_NAMES) for rule in self.rules
        )
        self._groups_of: dict[str, set[str]] = {}
        self._names_of: dict[str, frozenset[str]] = {}  # per request otherwise
        self._decided: dict[tuple[str | None, str, str, str | None, bool], bool] = {}  # allows(), remembered
        for group, members in (groups or {}).items():
            for user in members:
                self._groups_of.setdefault(user, set()).add(group)

    def _names(self, who: Principal) -> frozenset[str]:
        user = who.user
        if user is None:
            return _ANONYMOUS_NAMES
        names = self._names_of.get(user)
        if names is None:
            found = {"*", "authenticated", f"user:{user}"}
            found.update(f"group:{g}" for g in self._groups_of.get(user, ()))
            names = frozenset(found)
            if len(self._names_of) < 4096 and len(user) <= 128:
                self._names_of[user] = names
        return names

    def allows(
        self, who: Principal, action: str, repository: str, tag: str | None = None, every_tag: bool = False
    ) -> bool:
        """May `who` do `action` on `repository` (by `tag`, if given)?

        `every_tag`: the request affects whatever tags the object has (a delete by digest),
        so tag-limited allows do not count and tag-limited denies do."""
        # names and tags reach here already checked by the routes; checking again (in `_allows`)
        # keeps the policy safe on its own (no "..", encoded slashes or upper case get a match).
        # Answers are remembered per (user, action, repository, tag): a Basic client asks the same
        # question on every request, and the rules walk with fnmatch cost more than the rest of the gate.
        key = (who.user, action, repository, tag, every_tag)
        known = self._decided.get(key)
        if known is not None:
            return known
        allowed = self._allows(who, action, repository, tag, every_tag)
        if len(self._decided) >= _MAX_DECIDED:  # bounded: names and tags come from clients
            self._decided.clear()
        self._decided[key] = allowed
        return allowed

    def _allows(self, who: Principal, action: str, repository: str, tag: str | None, every_tag: bool) -> bool:
        """`allows`, worked out from the rules (a policy never changes: a reload makes a new one)."""
        if action not in ACTIONS or _NAME.match(repository) is None or len(repository) > 255:
            return False
        if tag is not None and _TAG.match(tag) is None:
            return False
        names = self._names(who)
        allowed = False
        for rule in self.rules:
            if not rule.covers(names, action, repository):
                continue
            if rule.effect == "deny":
                if tag is None and rule.tags is not None and not every_tag:
                    continue  # a tag-limited deny says nothing about repository-level access
                if tag is None or rule.tag_matches(tag):
                    return False
            elif tag is not None:
                allowed = allowed or rule.tag_matches(tag)
            elif rule.tags is None or not every_tag:
                allowed = True
        return allowed

    def allows_everything(self) -> bool:
        """Every principal may do every action everywhere (the `open` preset): nothing to decide."""
        if any(rule.effect == "deny" for rule in self.rules):
            return False
        return any(
            rule.tags is None and "*" in rule.principals and rule.actions == ACTIONS and "*" in rule.repositories
            for rule in self.rules
        )

    def tags_matter(self, who: Principal, action: str, repository: str) -> bool:
        """Whether a tag-limited rule speaks about this (principal, action, repository)."""
        names = self._names(who)
        return any(rule.tags is not None and rule.covers(names, action, repository) for rule in self.rules)

    # -- construction
    @classmethod
    def from_toml(cls, text: str, source: str = "policy") -> "Policy":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"{source}: not valid TOML: {e}") from None
        unknown = set(data) - {"groups", "rule"}
        if unknown:
            raise PolicyError(f"{source}: unknown section(s) {sorted(unknown)}; expected [groups] and [[rule]]")
        groups = data.get("groups", {})
        if not isinstance(groups, dict) or not all(
            isinstance(v, list) and all(isinstance(u, str) for u in v) for v in groups.values()
        ):
            raise PolicyError(f"{source}: [groups] maps group names to lists of user names")
        rules_data = data.get("rule", [])
        if not isinstance(rules_data, list):
            raise PolicyError(f"{source}: rules are written as [[rule]] tables")
        return cls([_rule(r, f"{source}: rule {i + 1}") for i, r in enumerate(rules_data)], groups)

    @classmethod
    def preset(cls, name: str) -> "Policy":
        """One-word policies for the common cases."""
        if name not in PRESETS:
            raise PolicyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_toml(PRESETS[name], f"preset {name}")


class PolicyFile:
    """A policy file re-read when it changes (checked at most once a second on use).

    A file that turns unreadable or invalid keeps the last good policy and logs why:
    a half-saved edit must not open or close the whole registry."""

    def __init__(self, path: str, clock: Any, stat_every: float = 1.0) -> None:
        self.path = path
        self.clock = clock
        self._stat_every = stat_every
        self._checked_at = -1e18
        self._stamp: tuple[int, int, int] | None = None
        self.policy = self._load()

    def _load(self) -> Policy:
        st = os.stat(self.path)
        with open(self.path, encoding="utf-8") as f:
            policy = Policy.from_toml(f.read(), self.path)
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return policy

    def check_now(self) -> bool:
        """Look at the file now (SIGHUP) rather than at the next request; True if it was re-read."""
        self._checked_at = -1e18
        before = self.policy
        return self.current() is not before

    def current(self) -> Policy:
        now = self.clock.seconds()
        if now - self._checked_at >= self._stat_every:
            self._checked_at = now
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
                    self.policy = self._load()
                    _log.info("re-read policy {path}: {n} rule(s)", path=self.path, n=len(self.policy.rules))
            except (OSError, PolicyError, UnicodeDecodeError) as e:
                _log.error("cannot re-read {path}, keeping the previous policy: {error}", path=self.path, error=str(e))
        return self.policy


class FixedPolicy:
    """A policy that never changes (a preset)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def current(self) -> Policy:
        return self.policy


def _strings(raw: dict[str, Any], key: str, where: str, required: bool = True) -> tuple[str, ...] | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise PolicyError(f"{where}: '{key}' is required")
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"{where}: '{key}' must be a non-empty list of strings")
    return tuple(value)


def _rule(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: a rule is a table")
    unknown = set(raw) - {"effect", "principals", "actions", "repositories", "tags"}
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}")
    effect = raw.get("effect", "allow")
    if effect not in ("allow", "deny"):
        raise PolicyError(f"{where}: effect must be 'allow' or 'deny'")
    principals = _strings(raw, "principals", where)
    actions = _strings(raw, "actions", where)
    assert principals is not None and actions is not None
    bad = [p for p in principals if _PRINCIPAL.match(p) is None]
    if bad:
        raise PolicyError(
            f"{where}: unknown principal(s) {bad}; use *, anonymous, authenticated, user:NAME, group:NAME"
        )
    bad = [a for a in actions if a not in ACTIONS]
    if bad:
        raise PolicyError(f"{where}: unknown action(s) {bad}; use pull, push, delete")
    repositories = _strings(raw, "repositories", where)
    assert repositories is not None
    return Rule(effect, frozenset(principals), frozenset(actions), repositories, _strings(raw, "tags", where, False))


PRESETS = {
    # anonymous may pull everything, users who log in may also push
    "public-read": """
[[rule]]
principals = ["*"]
actions = ["pull"]
repositories = ["*"]

[[rule]]
principals = ["authenticated"]
actions = ["push"]
repositories = ["*"]
""",
    # only users who log in, and they may pull and push
    "private": """
[[rule]]
principals = ["authenticated"]
actions = ["pull", "push"]
repositories = ["*"]
""",
    # anyone who reaches the proxy may do anything the registry allows (what --anonymous always did)
    "open": """
[[rule]]
principals = ["*"]
actions = ["pull", "push", "delete"]
repositories = ["*"]
""",
}
