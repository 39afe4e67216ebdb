"""Socket-level speed and flow control shared by both sides of the data path.

Bigger reads, writes that skip a reactor turn when the socket can take them, and a valve
that lets one transport pause another. Kept apart because `direct_writer` is the one place
the data path depends on Twisted internals (see there), and so that the connection classes
only decide what to send, not how the bytes reach the kernel.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable
from typing import Protocol as TypingProtocol

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

__all__ = ["READ_SIZE", "Transport", "Valve", "big_reads", "direct_writer", "no_delay"]


class Transport(TypingProtocol):
    """What the data path uses of a connected stream transport (TCP, TLS, unix, in-memory).

    Twisted types `Protocol.transport` as an optional `ITransport`, which has neither the
    producer/consumer half nor abortConnection; every transport the relay runs on has all of
    them once connected, and the connection classes declare theirs with this type."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Iterable[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def getPeer(self) -> Any: ...
    def getHost(self) -> Any: ...

READ_SIZE = 256 * 1024


def big_reads(transport: Any) -> None:
    """Read up to 256 KiB per recv() instead of Twisted's 64 KiB: a quarter of the syscalls
    and reactor turns per gigabyte. TLS transports wrap the socket one level down."""
    inner = getattr(transport, "transport", None)
    for t in (transport, inner):
        if t is not None and hasattr(t, "bufferSize"):
            t.bufferSize = READ_SIZE


def no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off: a response head or a request head goes out whole in one
    send, and a small second write must never wait for the peer's delayed ACK (measured: ~40 ms
    per request when a head and its body went out apart). TLS transports wrap the socket one
    level down; unix and in-memory transports have no such option."""
    inner = getattr(transport, "transport", None)
    for t in (transport, inner):
        setter = getattr(t, "setTcpNoDelay", None) if t is not None else None
        if setter is not None:
            try:
                setter(True)
            except OSError:  # not a TCP socket after all, or already closed
                pass
            return


def direct_writer(transport: Any) -> Callable[[bytes], None]:
    """A write function for one transport's body bytes.

    Twisted's write() queues every chunk for the next reactor turn: an epoll round trip
    and two epoll_ctl calls per chunk. When a plain TCP transport has nothing queued,
    send() at once and queue only what the socket did not take; the queue keeps
    Twisted's producer accounting (and so backpressure) exactly as before. TLS, unix and
    in-memory transports get plain write().

    Twisted has no public way to ask whether a transport still holds unsent bytes, so
    this reads `FileDescriptor.dataBuffer` and `_tempDataBuffer` (its two write queues,
    unchanged since Twisted 8); writing ahead of queued bytes would reorder the stream.
    This is the only use of Twisted internals in the data path.
    """
    if not isinstance(transport, (tcp.Server, tcp.Client)):
        return transport.write
    send = transport.getHandle().send
    queue = transport.write

    def write(data: bytes) -> None:
        if transport.dataBuffer or transport._tempDataBuffer or not transport.connected or transport.disconnecting:
            return queue(data)
        try:
            sent = send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return queue(data)  # let Twisted see the error and close the connection its way
        if sent < len(data):
            queue(data[sent:])

    return write


@implementer(IPushProducer)
class Valve:
    """Lets a consumer transport pause and resume the reading side of another transport.

    stopProducing is a no-op: a lost connection is handled by its own protocol's
    connectionLost, which decides what happens to the other side.
    """

    __slots__ = ("transport",)

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass
