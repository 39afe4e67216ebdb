"""Entry point of a `--workers` child.

`python -m ecr_twisted.app.worker --listeners JSON --metrics-socket PATH -- ARGS`:
ARGS are the main process's ecrproxy options, read by the same `Options` and built by the
same `build.build`, so a child runs exactly the same proxy. JSON says, per `--port`, how the
child listens (`supervisor.ChildListener`: a SO_REUSEPORT socket of its own at the main
process's address, or an inherited descriptor); it serves its metrics on PATH, and exits
when its stdin (a pipe from the main process) closes.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet import protocol, stdio
from twisted.internet.error import ReactorNotRunning
from twisted.logger import globalLogBeginner, textFileLogObserver

__all__ = ["main"]


class _ParentWatch(protocol.Protocol):
    """Stops the reactor when the main process goes away (its end of our stdin closes)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Any = None) -> None:
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # already stopping (draining after a SIGTERM)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--")
    own, rest = args[:split], args[split + 1 :]
    metrics_socket = own[own.index("--metrics-socket") + 1]

    from twisted.internet import reactor

    from ecr_twisted.app.build import ChildSockets, build
    from ecr_twisted.app.options import Options
    from ecr_twisted.app.supervisor import decode_listeners

    listeners = decode_listeners(own[own.index("--listeners") + 1])

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    options = Options()
    options.parseOptions(rest)
    built = build(options.settings, reactor, child=ChildSockets(listeners, metrics_socket))
    # (mypy reads Windows' StandardIO, which has no descriptors to choose)
    stdio.StandardIO(_ParentWatch(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))  # type: ignore[call-arg]
    reactor.callWhenRunning(built.top.startService)
    # a terminal's Ctrl-C reaches the whole process group; the main process passes it on as
    # SIGTERM, so a child taking it as well would count it twice (a second signal aborts)
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.addSystemEventTrigger("before", "shutdown", built.top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
