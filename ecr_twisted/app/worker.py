"""Entry point of a `--workers` child: `python -m ecr_twisted.app.worker --fds 3,4 --metrics-socket PATH -- ARGS`.

ARGS are the main process's ecrproxy options, so a child builds exactly the same proxy;
it serves the inherited listening sockets and its metrics on PATH, and exits when its
stdin (a pipe from the main process) closes.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import protocol, stdio
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

log = Logger()


class _ParentWatch(protocol.Protocol):
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Any = None) -> None:
        if self.reactor.running:
            self.reactor.stop()


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--")
    own, rest = args[:split], args[split + 1 :]
    fds = [int(x) for x in own[own.index("--fds") + 1].split(",") if x]
    metrics_socket = own[own.index("--metrics-socket") + 1]

    from twisted.internet import reactor

    from ecr_twisted.app import options as tap
    from ecr_twisted.observe.health import ops_site
    from ecr_twisted.app.supervisor import AdoptedPort

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    options = tap.Options()
    options.parseOptions(rest)
    options["worker-child"] = True
    built = tap.build(options, reactor)
    import socket

    ports = [AdoptedPort(reactor, socket.socket(fileno=fd), factory) for fd, factory in zip(fds, built.factories)]

    def listen(_: Any) -> None:
        # a child that answered before holding a token would turn its share of requests
        # into 503s while its first GetAuthorizationToken call is under way
        for port in ports:
            port.setServiceParent(built.top)

    built.keeper.first_token().addCallback(listen)
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet.endpoints import UNIXServerEndpoint

    StreamServerEndpointService(
        UNIXServerEndpoint(reactor, metrics_socket, mode=0o600), ops_site(built.registry, built.keeper.ready)
    ).setServiceParent(built.top)
    stdio.StandardIO(_ParentWatch(reactor), stdin=0, stdout=_devnull_fd())
    reactor.callWhenRunning(built.top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", built.top.stopService)
    reactor.run()
    return 0


def _devnull_fd() -> int:
    import os

    return os.open(os.devnull, os.O_WRONLY)


if __name__ == "__main__":
    sys.exit(main())
