"""A `CONNECT` tunnel through an HTTP forward proxy, as a client endpoint.

`TunnelEndpoint` connects to the proxy, asks it for a tunnel to the origin, and only then
connects the caller's protocol to the same transport: wrapped by `wrapClientTLS` it gives a
TLS connection to the origin with exactly the SNI and verification of a direct one. After
the tunnel is up the transport is the proxy connection's own (flow control, abort), and
the tunnel protocol only passes received bytes and the end on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ecr_twisted.http.egress import EgressProxy, connect_request
from ecr_twisted.http.http11 import BadMessage, parse_response_head, split_head
from ecr_twisted.http.origin import Origin, UpstreamError
from ecr_twisted.timers import cancel

__all__ = ["MAX_CONNECT_HEAD", "TunnelEndpoint", "proxy_connect_error", "refused_by_proxy"]

MAX_CONNECT_HEAD = 16 * 1024  # a CONNECT answer is a status line and a few fields


def proxy_connect_error(proxy: EgressProxy, reason: Failure) -> UpstreamError:
    """Failing to reach the proxy itself, said so (the origin's name alone would mislead)."""
    if isinstance(reason.value, UpstreamError):
        return reason.value
    if reason.check(ierror.TimeoutError):
        return UpstreamError("timeout", f"connect to egress proxy {proxy.shown} timed out")
    return UpstreamError("unreachable", f"egress proxy {proxy.shown}: {reason.getErrorMessage()}")


def refused_by_proxy(proxy: EgressProxy, origin: Origin, status: int) -> UpstreamError:
    """A proxy's refusal (a non-2xx answer to CONNECT, a 407 to a forwarded request) as the attempt's failure."""
    why = " (the proxy wants credentials: put user:password in the proxy URL)" if status == 407 else ""
    if status == 407 and proxy.has_credentials:
        why = " (the proxy refused the credentials in the proxy URL)"
    base = origin.base.decode("ascii")
    what = f"CONNECT {base}" if origin.scheme == "https" else f"a request for {base}"
    return UpstreamError("unreachable", f"egress proxy {proxy.shown} answered {status} to {what}{why}")


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


class _Tunnel(Protocol):
    """The proxy connection: CONNECT, its answer, then the caller's protocol on the same transport."""

    def __init__(self, endpoint: TunnelEndpoint, factory: Any, done: Deferred[Any]) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._done: Deferred[Any] | None = done
        self._buf = b""
        self._inner: Protocol | None = None
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        ep = self._endpoint
        if self._done is None:  # given up while connecting
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._timer = ep.clock.callLater(ep.timeout, self._timed_out)
        self.transport.write(connect_request(ep.proxy, ep.origin))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        inner = self._inner
        if inner is not None:
            inner.dataReceived(data)
            return
        if self._done is None:
            return
        self._buf += data
        ep = self._endpoint
        try:
            found = split_head(self._buf)
            if found is None:
                if len(self._buf) > MAX_CONNECT_HEAD:
                    raise BadMessage("answer head too large")
                return
            raw, used = found
            if used > MAX_CONNECT_HEAD:
                raise BadMessage("answer head too large")
            head = parse_response_head(raw, b"CONNECT")
        except BadMessage as e:
            return self._fail(UpstreamError(
                "unreachable", f"egress proxy {ep.proxy.shown} gave an invalid answer to CONNECT: {e.reason}"
            ))
        if not 200 <= head.status < 300:
            return self._fail(refused_by_proxy(ep.proxy, ep.origin, head.status))
        rest, self._buf = self._buf[used:], b""
        cancel(self._timer)
        self._timer = None
        done, self._done = self._done, None
        inner = self._inner = self._factory.buildProtocol(self.transport.getPeer())  # type: ignore[union-attr]
        inner.makeConnection(self.transport)
        if rest:
            inner.dataReceived(rest)
        done.callback(inner)

    def _timed_out(self) -> None:
        self._timer = None
        ep = self._endpoint
        self._fail(UpstreamError("timeout", f"egress proxy {ep.proxy.shown} did not answer CONNECT in {ep.timeout:g}s"))

    def _fail(self, err: UpstreamError) -> None:
        cancel(self._timer)
        self._timer = None
        done, self._done = self._done, None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        if done is not None:
            done.errback(err)

    def give_up(self) -> None:
        """The caller cancelled: cut the proxy connection (the Deferred fails with CancelledError)."""
        cancel(self._timer)
        self._timer = None
        self._done = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cancel(self._timer)
        self._timer = None
        inner = self._inner
        if inner is not None:
            inner.connectionLost(reason)
            return
        done, self._done = self._done, None
        if done is not None:
            shown = self._endpoint.proxy.shown
            done.errback(UpstreamError("unreachable", f"egress proxy {shown} closed before answering CONNECT"))


@implementer(IStreamClientEndpoint)
class TunnelEndpoint:
    """Connections to `origin` through `proxy`, reached by `proxy_endpoint`; the proxy must
    answer CONNECT within `timeout` seconds of the proxy connection being made."""

    def __init__(self, proxy_endpoint: Any, proxy: EgressProxy, origin: Origin, clock: Any, timeout: float) -> None:
        self.proxy_endpoint = proxy_endpoint
        self.proxy = proxy
        self.origin = origin
        self.clock = clock
        self.timeout = timeout

    def connect(self, factory: Any) -> Deferred[Any]:
        connecting: Deferred[Any] | None = None

        def cancelled(d: Deferred[Any]) -> None:
            tunnel.give_up()
            if connecting is not None and not connecting.called:
                connecting.cancel()

        done: Deferred[Any] = Deferred(cancelled)
        tunnel = _Tunnel(self, factory, done)

        def failed(reason: Failure) -> None:
            if tunnel._done is not None:
                tunnel._done = None
                done.errback(proxy_connect_error(self.proxy, reason))

        connecting = self.proxy_endpoint.connect(_OneProtocol(tunnel))
        connecting.addErrback(failed)
        return done
