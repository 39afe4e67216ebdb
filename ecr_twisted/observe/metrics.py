"""Prometheus metrics on one injected registry, with label children cached for the hot path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from ecr_twisted.upstreams.spec import DEFAULT_NAME as DEFAULT_UPSTREAM  # the label without an upstream list

if TYPE_CHECKING:
    from ecr_twisted.http.upstream import PoolStats

__all__ = ["Metrics", "PoolCollector", "merge_expositions", "register_runtime", "DEFAULT_UPSTREAM"]


_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Metrics:
    """Everything the proxy counts. Label values are route kinds, methods and the configured upstream
    names (`upstreams`; "default" without an upstream list), never paths or secrets."""

    def __init__(self, registry: CollectorRegistry, upstreams: Iterable[str] = (DEFAULT_UPSTREAM,)) -> None:
        self.registry = registry
        # the `upstream` label's values: the configured upstream names only (bounded series)
        self.upstreams = frozenset(upstreams)
        self.requests = Counter(
            "ecrproxy_requests", "Client requests answered", ["method", "route", "status"], registry=registry
        )
        self.duration = Histogram(
            "ecrproxy_request_duration_seconds",
            "Time from request head to the end of the response",
            ["route"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.bytes_in = Counter(
            "ecrproxy_request_body_bytes", "Request body bytes received from clients", ["route"], registry=registry
        )
        self.bytes_out = Counter(
            "ecrproxy_response_body_bytes", "Response body bytes sent to clients", ["route"], registry=registry
        )
        self.in_flight = Gauge("ecrproxy_requests_in_flight", "Requests being handled", registry=registry)
        self.upstream_latency = Histogram(
            "ecrproxy_upstream_response_seconds",
            "Time from sending a request upstream to its response head, by target (registry, storage) and upstream",
            ["target", "upstream"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = _PerUpstream(
            Counter(
                "ecrproxy_upstream_errors", "Upstream failures by kind and upstream", ["kind", "upstream"],
                registry=registry,
            ),
            self.upstreams,
        )
        self.token_expiry = Gauge(
            "ecrproxy_token_expiry_timestamp_seconds", "Unix time the current ECR token of each upstream expires",
            ["upstream"], registry=registry,
        )
        self.token_refresh = Counter(
            "ecrproxy_token_refresh", "ECR token refresh attempts by result and upstream", ["result", "upstream"],
            registry=registry,
        )
        # every configured upstream shows its expiry from the start (0 until a token comes, as before
        # the label existed: alerts leave 0 out, and passthrough holds no token)
        self._expiry = {name: self.token_expiry.labels(name) for name in sorted(self.upstreams)}
        for child in self._expiry.values():
            child.set(0)
        self.bad_requests = Counter(
            "ecrproxy_bad_requests", "Requests refused by the HTTP parser", ["status"], registry=registry
        )
        self.auth_attempts = Counter(
            "ecrproxy_auth_attempts", "Client credential checks by auth mode and result", ["mode", "result"],
            registry=registry,
        )
        self.access_denied = Counter(
            "ecrproxy_access_denied", "Requests refused by the access policy, by action", ["action"], registry=registry
        )
        self.webhook_errors = Counter(
            "ecrproxy_auth_webhook_errors", "Authorization webhook calls that failed (each one a deny)",
            registry=registry,
        )
        self.connections = Gauge(
            "ecrproxy_client_connections", "Open client connections (registry listeners)", registry=registry
        )
        self.connections_max = Gauge(
            "ecrproxy_client_connections_max", "Most client connections taken (--max-connections)", registry=registry
        )
        self.connections_refused = Counter(
            "ecrproxy_client_connections_refused", "Client connections refused past --max-connections, by how "
            "(503: answered, closed: closed at once)", ["how"], registry=registry,
        )
        self.accept_errors = Counter(
            "ecrproxy_accept_errors", "accept() failures for want of descriptors or memory, by errno (EMFILE, ...)",
            ["error"], registry=registry,
        )
        self._requests: dict[tuple[bytes, str, int], Counter] = {}
        self._per_route: dict[str, tuple[Histogram, Counter, Counter]] = {}
        self._upstream: dict[tuple[str, str], Histogram] = {}
        self._refresh: dict[tuple[str, str], Counter] = {}

    def observe_request(
        self, method: bytes, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        key = (method, route, status)
        child = self._requests.get(key)
        if child is None:
            m = method.decode("ascii") if method in _KNOWN_METHODS else "other"
            child = self._requests[key] = self.requests.labels(m, route, str(status))
        child.inc()
        per = self._per_route.get(route)
        if per is None:
            per = self._per_route[route] = (
                self.duration.labels(route),
                self.bytes_in.labels(route),
                self.bytes_out.labels(route),
            )
        per[0].observe(seconds)
        if bytes_in:
            per[1].inc(bytes_in)
        if bytes_out:
            per[2].inc(bytes_out)

    def observe_upstream(self, target: str, seconds: float, upstream: str = DEFAULT_UPSTREAM) -> None:
        key = (target, upstream)
        child = self._upstream.get(key)
        if child is None:
            _check(upstream, self.upstreams)
            child = self._upstream[key] = self.upstream_latency.labels(target, upstream)
        child.observe(seconds)

    def token_result(self, result: str, expires_at: float | None, upstream: str = DEFAULT_UPSTREAM) -> None:
        key = (result, upstream)
        child = self._refresh.get(key)
        if child is None:
            _check(upstream, self.upstreams)
            child = self._refresh[key] = self.token_refresh.labels(result, upstream)
        child.inc()
        if expires_at is not None:
            self._expiry[upstream].set(expires_at)


def _check(upstream: str, known: frozenset[str]) -> None:
    if upstream not in known:
        # a wiring bug (Metrics built without this upstream's name): series stay bounded
        raise ValueError(f"metrics: upstream {upstream!r} is not configured ({', '.join(sorted(known))})")


class _PerUpstream:
    """`upstream_errors`: `.labels(kind, upstream)` gives the counter's child, cached; the upstream
    is always named (the one implicit upstream's is "default"), so no count lands under a guess."""

    __slots__ = ("counter", "_known", "_children")

    def __init__(self, counter: Counter, known: frozenset[str]) -> None:
        self.counter = counter
        self._known = known
        self._children: dict[tuple[str, str], Counter] = {}

    def labels(self, kind: str, upstream: str) -> Counter:
        key = (kind, upstream)
        child = self._children.get(key)
        if child is None:
            _check(upstream, self._known)
            child = self._children[key] = self.counter.labels(kind, upstream)
        return child


def register_runtime(registry: CollectorRegistry, version: str) -> None:
    """`process_*` (CPU, memory, descriptors, start time), `python_*` (version, GC) and
    `ecrproxy_build_info{version}` in `registry`. Across --workers the merge sums the additive
    ones (CPU seconds, memory, open descriptors, GC counts: the group's total) and keeps the
    smallest `process_max_fds` and start time and the largest info gauge (see `_combine`)."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    info = Gauge("ecrproxy_build_info", "The running ecr-twisted build (value 1)", ["version"], registry=registry)
    info.labels(version).set(1)


class PoolCollector:
    """The upstream pool's places, read at scrape time: nothing on the request path touches Prometheus."""

    def __init__(self, stats: Callable[[], "PoolStats"]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self.stats()
        in_use = GaugeMetricFamily(
            "ecrproxy_upstream_connections_in_use",
            "Upstream connections connecting or serving a request, by pool class (short: API check, manifests, "
            "HEADs, listings; long: blob bodies, uploads)",
            labels=["class"],
        )
        waiting = GaugeMetricFamily(
            "ecrproxy_upstream_waiting", "Requests queued for an upstream connection, by pool class", labels=["class"]
        )
        refused = CounterMetricFamily(
            "ecrproxy_upstream_refused",
            "Requests answered 503 because no upstream connection came free within --upstream-wait, by pool class",
            labels=["class"],
        )
        for cls in sorted(s.in_use):
            in_use.add_metric([cls], s.in_use[cls])
            waiting.add_metric([cls], s.waiting[cls])
            refused.add_metric([cls], s.refused[cls])
        yield in_use
        yield waiting
        yield refused
        yield GaugeMetricFamily(
            "ecrproxy_upstream_connections_idle", "Upstream connections kept alive for the next request", value=s.idle
        )


# one per process, not additive: the group's tightest descriptor limit, its oldest process
_SMALLEST = frozenset({"process_max_fds", "process_start_time_seconds"})
_KNOWN_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})


def _combine(name: str, mtype: str) -> Callable[[float, float], float]:
    if name.endswith("_created") or name in _SMALLEST:
        return min
    if name.endswith("_info"):
        return max  # info gauges are 1 in every process
    if mtype == "gauge" and (name.endswith("_timestamp_seconds") or name == "ecrproxy_cache_size_bytes"):
        return max  # the latest expiry; every worker's view of the one shared cache directory
    return lambda a, b: a + b


class _Merged:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(texts: Iterable[bytes]) -> bytes:
    """Sum the samples of several processes' expositions (counters, histograms, in-flight
    gauges); timestamps keep the latest, `_created` the earliest."""
    order: list[str] = []
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text.decode("utf-8")):
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
                order.append(fam.name)
            bucket = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                if key in bucket:
                    bucket[key] = _combine(s.name, fam.type)(bucket[key], s.value)
                else:
                    bucket[key] = s.value
    out = []
    for name in order:
        fam = families[name]
        for (sample_name, labels), value in values[name].items():
            fam.add_sample(sample_name, dict(labels), value)
        out.append(fam)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(out))
    return generate_latest(registry)
