"""The access log: one line per request, as text or JSON, written straight to a file object.

The handler hands over an `AccessRecord` of plain values; this module only formats and writes.
Lines never go through twisted.logger's event formatting (measured: it was a visible share of
the per-request cost): each line is built once and written (and flushed) to the output file, by
default the process's standard output, which is where `twistd -n` writes its own log.

Values that could carry secrets never get here: the target is redacted by the handler, and
neither the Authorization header nor tokens are part of a record.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
import os
import re
import sys
import time
from typing import IO, Any, Callable

__all__ = ["FORMATS", "AccessLog", "AccessRecord", "RateLimitedLog", "RequestIds", "json_line", "text_line"]

FORMATS = ("text", "json")


class AccessRecord:
    """What one request's log line says (plain values; None: not known / not applicable)."""

    __slots__ = (
        "time", "client", "user", "method", "target", "route", "repository", "reference", "status",
        "bytes_in", "bytes_out", "duration", "upstream_status", "upstream_request_id", "cache",
        "user_agent", "request_id", "reason", "error",
    )

    def __init__(
        self,
        time: float,
        client: str,
        user: str,
        method: str,
        target: str,
        route: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        duration: float,
        request_id: str,
        repository: str | None = None,
        reference: str | None = None,
        upstream_status: int | None = None,
        upstream_request_id: str | None = None,
        cache: str | None = None,
        user_agent: str | None = None,
        reason: str | None = None,
        error: str | None = None,
    ) -> None:
        self.time = time
        self.client = client
        self.user = user
        self.method = method
        self.target = target
        self.route = route
        self.repository = repository
        self.reference = reference
        self.status = status
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.duration = duration
        self.upstream_status = upstream_status
        self.upstream_request_id = upstream_request_id
        self.cache = cache
        self.user_agent = user_agent
        self.request_id = request_id
        self.reason = reason
        self.error = error


_last_second = -1
_last_stamp = ""


def timestamp(t: float) -> str:
    """UTC ISO 8601 with milliseconds; the part up to the second is formatted once a second."""
    global _last_second, _last_stamp
    second = int(t)
    if second != _last_second:
        _last_stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = second
    ms = int((t - second) * 1000)
    return _last_stamp + _MILLIS[ms] if 0 <= ms < 1000 else "%s.%03dZ" % (_last_stamp, ms)


_MILLIS = tuple(".%03dZ" % ms for ms in range(1000))  # a lookup, not a format, per line


_dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


# fields written only when they apply, in this order
_OPTIONAL = ("repository", "reference", "upstream_status", "upstream_request_id", "cache", "user_agent", "reason",
             "error")


def json_line(r: AccessRecord) -> str:
    """One JSON object (no newline); fields that do not apply are left out."""
    d: dict[str, Any] = {
        "time": timestamp(r.time),
        "request_id": r.request_id,
        "client": r.client,
        "user": r.user,
        "method": r.method,
        "target": r.target,
        "route": r.route,
        "status": r.status,
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "duration": round(r.duration, 6),
    }
    for key in _OPTIONAL:
        value = getattr(r, key)
        if value is not None:
            d[key] = value
    return _dumps(d)


_quoted: Callable[[str], str] = encode_basestring_ascii  # a JSON string: quotes and control characters escaped


def text_line(r: AccessRecord) -> str:
    """`time client "user" METHOD target status in out duration key=value...`, one line (method and
    target hold no spaces or control characters: the parser refuses them)."""
    return _text(
        r.time, r.client, r.user, r.method, r.target, r.route, r.status, r.bytes_in, r.bytes_out, r.duration,
        r.request_id, r.repository, r.reference, r.upstream_status, r.upstream_request_id, r.cache, r.user_agent,
        r.reason, r.error,
    )[:-1]


def _text(
    time: float, client: str, user: str, method: str, target: str, route: str, status: int, bytes_in: int,
    bytes_out: int, duration: float, request_id: str, repository: str | None, reference: str | None,
    upstream_status: int | None, upstream_request_id: str | None, cache: str | None, user_agent: str | None,
    reason: str | None, error: str | None,
) -> str:
    """`text_line` from the values themselves, with its newline (`AccessLog.request`: no record built
    per request). One f-string: measured cheaper per request than a list of parts joined."""
    q = _quoted
    return (
        f"{timestamp(time)} {client} {q(user)} {method} {target} {status} {bytes_in} {bytes_out}"
        f" {duration:.3f}s route={route}"
        f"{'' if repository is None else ' repo=' + q(repository)}"
        f"{'' if reference is None else ' ref=' + q(reference)}"
        f" upstream={upstream_status or '-'}"
        f"{'' if upstream_request_id is None else ' upstream_id=' + q(upstream_request_id)}"
        f"{'' if cache is None else ' cache=' + cache}"
        f" id={request_id}"
        f"{'' if user_agent is None else ' agent=' + q(user_agent)}"
        f"{'' if reason is None else ' reason=' + q(reason)}"
        f"{'' if error is None else ' error=' + q(error)}\n"
    )


class AccessLog:
    """Writes each record as one line to `out` (a text file object; default: the real stdout)."""

    def __init__(self, fmt: str = "text", out: IO[str] | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown log format {fmt!r}")
        self.format = fmt
        self._line: Callable[[AccessRecord], str] = json_line if fmt == "json" else text_line
        self._out = out

    def write(self, record: AccessRecord) -> None:
        self._put(self._line(record) + "\n")

    def request(
        self, time: float, client: str, user: str, method: str, target: str, route: str, status: int,
        bytes_in: int, bytes_out: int, duration: float, request_id: str, repository: str | None,
        reference: str | None, upstream_status: int | None, upstream_request_id: str | None, cache: str | None,
        user_agent: str | None, reason: str | None, error: str | None,
    ) -> None:
        """One request's line from its values, in `AccessRecord`'s order (positional: binding 19
        keywords and building a record measured about as costly as formatting the text line)."""
        if self.format == "json":
            return self.write(AccessRecord(
                time, client, user, method, target, route, status, bytes_in, bytes_out, duration, request_id,
                repository, reference, upstream_status, upstream_request_id, cache, user_agent, reason, error,
            ))
        self._put(_text(
            time, client, user, method, target, route, status, bytes_in, bytes_out, duration, request_id,
            repository, reference, upstream_status, upstream_request_id, cache, user_agent, reason, error,
        ))

    def _put(self, line: str) -> None:
        out = self._out
        if out is None:
            out = sys.__stdout__
            if out is None:
                return
        try:
            out.write(line)
            out.flush()
        except (OSError, ValueError):  # a closed or broken log must never fail a request
            pass


_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}\Z")


class RequestIds:
    """Request ids: the client's `X-Request-Id` when it may be trusted (and looks like an id),
    else a fresh one: a random per-process prefix and a counter (unique, no syscall per request)."""

    def __init__(self, trust_client: bool) -> None:
        self.trust_client = trust_client
        self._prefix = os.urandom(6).hex()
        self._n = 0

    def take(self, given: bytes | None) -> str:
        if given is not None and self.trust_client:
            value = given.decode("latin-1").strip()
            if _ID.match(value):
                return value
        self._n += 1
        return "%s-%x" % (self._prefix, self._n)


class RateLimitedLog:
    """At most one line each `interval` seconds; the next line says how many were left out."""

    def __init__(self, emit: Callable[[str, int], None], clock: Any, interval: float = 10.0) -> None:
        self._emit = emit  # (message, how many were suppressed since the last line)
        self._clock = clock
        self.interval = interval
        self._next = 0.0
        self.suppressed = 0

    def __call__(self, message: str) -> None:
        now = self._clock.seconds()
        if now < self._next:
            self.suppressed += 1
            return
        self._next = now + self.interval
        suppressed, self.suppressed = self.suppressed, 0
        self._emit(message, suppressed)
