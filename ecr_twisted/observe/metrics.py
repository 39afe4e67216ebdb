"""Prometheus metrics on one injected registry, with label children cached for the hot path."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Metrics:
    """Everything the proxy counts. Label values are route kinds and methods, never paths or secrets."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
            "Time from sending a request upstream to its response head",
            ["target"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.upstream_errors = Counter(
            "ecrproxy_upstream_errors", "Upstream failures by kind", ["kind"], registry=registry
        )
        self.token_expiry = Gauge(
            "ecrproxy_token_expiry_timestamp_seconds", "Unix time the current ECR token expires", registry=registry
        )
        self.token_refresh = Counter(
            "ecrproxy_token_refresh", "ECR token refresh attempts", ["result"], registry=registry
        )
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
            "ecrproxy_auth_webhook_errors", "Authorization webhook calls that failed (each one a deny)", registry=registry
        )
        self._requests: dict[tuple[bytes, str, int], Counter] = {}
        self._per_route: dict[str, tuple[Histogram, Counter, Counter]] = {}
        self._upstream: dict[str, Histogram] = {}

    def observe_request(self, method: bytes, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int) -> None:
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

    def observe_upstream(self, target: str, seconds: float) -> None:
        child = self._upstream.get(target)
        if child is None:
            child = self._upstream[target] = self.upstream_latency.labels(target)
        child.observe(seconds)

    def token_result(self, result: str, expires_at: float | None) -> None:
        self.token_refresh.labels(result).inc()
        if expires_at is not None:
            self.token_expiry.set(expires_at)


_KNOWN_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
