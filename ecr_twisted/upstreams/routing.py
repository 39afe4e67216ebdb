"""Which upstream a repository name goes to, and what it is called there and in the policy.

Pure: values in, values out, no Twisted. The handler asks `resolve` once per named request
(only when there is something to route: `Router.identity` tells it when every name is its own
answer), and the inverse `client_name` when it names a repository back to a client (challenge
scopes of host-routed requests).

Rules (issue #13): a host listed in an upstream's `hosts` sends the whole name to that upstream;
on any other host, the longest prefix (whole path components) picks an upstream and the rest of
the name is its repository (a name that is just the prefix names nothing); else the default
upstream takes the whole name; else the name is not routable (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ecr_twisted.upstreams.spec import UpstreamSpec

__all__ = ["Place", "Router", "bare_host"]


@dataclass(frozen=True, slots=True)
class Place:
    """Where a client's repository name leads."""

    upstream: str  # the upstream's name
    private: str  # the repository's name on the upstream
    public: str  # the name the policy, cache, logs and metrics see: `<namespace>/<private>` or `private`
    client_prefix: str  # what the client's name has before `private`: "prod/" by prefix, "" by host or default

    @property
    def client(self) -> str:
        """The name as the client wrote it."""
        return self.client_prefix + self.private


def bare_host(host: str | None) -> str | None:
    """A Host header's name: lowercased, without its port (IPv6 literals keep their brackets)."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0]


class Router:
    """Routes repository names to upstreams; see the module docstring."""

    def __init__(self, upstreams: Sequence[UpstreamSpec]) -> None:
        self.upstreams = tuple(upstreams)
        self._hosts: dict[str, UpstreamSpec] = {}
        self._prefixes: dict[str, UpstreamSpec] = {}
        self.default: UpstreamSpec | None = None
        for u in self.upstreams:
            for h in u.hosts:
                self._hosts.setdefault(h.lower(), u)
            if u.prefix:
                self._prefixes.setdefault(u.prefix.strip("/"), u)
            if u.default and self.default is None:
                self.default = u
        # prefix lengths in path components, longest first (longest match wins)
        self._depths = sorted({p.count("/") + 1 for p in self._prefixes}, reverse=True)
        # every name goes to one upstream under its own name: the caller need not ask at all
        self.identity = (
            len(self.upstreams) == 1 and self.default is not None and not self._hosts and not self._prefixes
        )

    def _host_upstream(self, host: str | None) -> UpstreamSpec | None:
        if not self._hosts or not host:
            return None
        return self._hosts.get(bare_host(host) or "")

    def resolve(self, host: str | None, name: str) -> Place | None:
        """Where `name`, asked for on `host` (a Host header, port allowed), leads; None: nowhere."""
        up = self._host_upstream(host)
        if up is not None:
            return Place(up.name, name, _join(up.namespace, name), "")
        if self._depths:
            parts = name.split("/")
            for depth in self._depths:
                if len(parts) < depth:
                    continue
                found = self._prefixes.get("/".join(parts[:depth]))
                if found is None:
                    continue
                if len(parts) == depth:
                    return None  # just the prefix: no repository in it
                private = "/".join(parts[depth:])
                return Place(found.name, private, _join(found.namespace, private), "/".join(parts[:depth]) + "/")
        default = self.default
        if default is None:
            return None
        return Place(default.name, name, _join(default.namespace, name), "")

    def canonical(self, host: str | None, name: str) -> str:
        """The public name of `name` on `host` (the name itself when it leads nowhere)."""
        place = self.resolve(host, name)
        return place.public if place is not None else name

    def client_name(self, host: str | None, public: str) -> str | None:
        """What a client on `host` calls the repository with public name `public` (None: it cannot
        reach it from there). The inverse of `canonical`, checked by routing the answer again."""
        up = self._host_upstream(host)
        candidates: list[str] = []
        if up is not None:
            ns = up.namespace
            if not ns:
                candidates.append(public)
            elif public.startswith(ns + "/"):
                candidates.append(public[len(ns) + 1 :])
        else:
            for u in self.upstreams:
                ns = u.namespace
                if ns and u.prefix and public.startswith(ns + "/"):
                    candidates.append(u.prefix.strip("/") + public[len(ns) :])
            if self.default is not None:
                candidates.append(public)
                if self.default.prefix:
                    candidates.append(self.default.prefix.strip("/") + "/" + public)
        for name in candidates:
            place = self.resolve(host, name)
            if place is not None and place.public == public:
                return name
        return None


def _join(namespace: str, private: str) -> str:
    return namespace + "/" + private if namespace else private
