"""Graceful drain on SIGTERM/SIGINT: the root service of a process, whose `stopService` finishes
what is in flight before anything else stops.

twistd (and `worker.main`) call the root's `stopService` on the reactor's "before shutdown"
trigger and wait for its Deferred. The drain then: marks the process not ready (`/readyz`
503) at once; after `delay` stops the listeners; tells every client connection to close once
idle (idle ones close now); runs `on_drain` hooks (the `--workers` main process passes the
signal on to its children and waits for them); when every connection is gone, or at
`timeout`, aborts what is left (a cut connection, never a body that looks whole) and only
then stops the other services (token refreshes, the upstream pool, the cache). A second
SIGTERM/SIGINT during the drain skips to the abort.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ecr_twisted.http.server import RelayFactory
from ecr_twisted.timers import cancel

__all__ = ["Drain"]

log = Logger()


class Drain(service.MultiService):
    """A `MultiService` that drains its client connections before its children stop."""

    def __init__(self, reactor: Any, delay: float = 0.0, timeout: float = 30.0) -> None:
        super().__init__()
        self.reactor = reactor
        self.delay = delay
        self.timeout = timeout
        self.draining = False
        self.factories: list[RelayFactory] = []
        self.listeners: list[service.Service] = []
        self.on_drain: list[Callable[[], Any]] = []  # each may return a Deferred the drain waits for
        self.on_abort: list[Callable[[], Any]] = []  # told when the deadline (or a second signal) comes
        self._deadline: IDelayedCall | None = None
        self._delayed: IDelayedCall | None = None
        self._done: defer.Deferred[None] | None = None

    def add_listener(self, svc: service.Service) -> None:
        """A service accepting client connections: stopped first (after `delay`) on drain."""
        self.listeners.append(svc)
        svc.setServiceParent(self)

    def ready(self) -> bool:
        return not self.draining

    def stopService(self) -> defer.Deferred[Any]:
        service.Service.stopService(self)
        self.draining = True
        started = self.reactor.seconds()
        open_now = sum(len(f.connections) for f in self.factories)
        log.info(
            "draining: {open} client connections open; listeners close in {delay} s, "
            "what is left is aborted in {timeout} s",
            open=open_now, delay=self.delay, timeout=self.timeout,
        )
        self._install_second_signal()
        self._deadline = self.reactor.callLater(self.timeout, self._abort)
        for f in self.factories:
            f.draining = True  # from now on every response says Connection: close; idle ones close after the delay
        hooks = [defer.maybeDeferred(hook) for hook in self.on_drain]
        d: defer.Deferred[Any] = defer.Deferred()
        self._done = d
        if self.delay > 0:
            self._delayed = self.reactor.callLater(self.delay, d.callback, None)
        else:
            d.callback(None)

        def close_listeners(_: Any) -> Any:
            waits = [defer.maybeDeferred(s.stopService) for s in self.listeners if s.running]
            for f in self.factories:
                f.drain()
            return defer.DeferredList(waits)

        def connections_gone(_: Any) -> Any:
            return defer.DeferredList([f.emptied() for f in self.factories] + hooks)

        def rest(_: Any) -> Any:
            cancel(self._deadline)
            self._deadline = None
            log.info("drained in {s:.1f} s", s=self.reactor.seconds() - started)
            if hasattr(self.reactor, "_exitSignal"):
                # twistd would otherwise kill itself with the signal once the reactor stops
                # (exit status -15); a drained process stopped cleanly: exit 0
                self.reactor._exitSignal = None
            others = [defer.maybeDeferred(s.stopService) for s in reversed(list(self)) if s.running]
            return defer.DeferredList(others)

        return d.addCallback(close_listeners).addCallback(connections_gone).addCallback(rest)

    def _abort(self) -> None:
        """The deadline (or a second signal): cut what is still open."""
        cancel(self._deadline)
        self._deadline = None
        left = sum(len(f.connections) for f in self.factories)
        if left:
            log.warn("drain: aborting {left} client connections still open", left=left)
        for f in self.factories:
            f.drain()
            f.abort_all()
        cancel(self._delayed)
        self._delayed = None
        if self._done is not None and not self._done.called:
            self._done.callback(None)  # no more waiting for the listeners' delay
        for hook in self.on_abort:
            hook()

    def _install_second_signal(self) -> None:
        """In a real process, a second SIGTERM/SIGINT aborts at once (twisted's handler would only
        call `reactor.stop` again, which raises)."""
        if sys.modules.get("twisted.internet.reactor") is not self.reactor:
            return

        def again(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self._abort)

        try:
            signal.signal(signal.SIGTERM, again)
            signal.signal(signal.SIGINT, again)
        except ValueError:  # not the main thread
            pass
