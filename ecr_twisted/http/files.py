"""Response bodies from open files (the layer cache), with backpressure.

A push producer on the client transport: it reads and sends as fast as the client takes
the bytes, follows a file that is still being written, and yields the reactor every few
MiB so one big blob cannot starve other connections. It talks to its exchange only
through `Exchange.file_started`, `file_done` and `file_failed`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from zope.interface import implementer

from ecr_twisted.http.sockets import READ_SIZE
from ecr_twisted.timers import cancel

if TYPE_CHECKING:
    from ecr_twisted.http.exchange import Exchange, Source

__all__ = ["FileSender"]

_FILE_TURN = 8 << 20  # bytes sent from a file before letting other connections have the reactor


@implementer(IPushProducer)
class FileSender:
    """Sends bytes [pos, end) of an open file to an exchange's client as fast as it reads them.

    With a `source` (a file still being written) it sends what is there and waits for more;
    the blob's last byte waits until the source is done (verified), so a body that fails
    verification never reaches a client whole."""

    __slots__ = ("ex", "fd", "pos", "end", "size", "source", "paused", "busy", "later")

    def __init__(self, ex: "Exchange", fd: int, pos: int, end: int, size: int, source: "Source | None") -> None:
        self.ex: Exchange | None = ex
        self.fd = fd
        self.pos = pos
        self.end = end
        self.size = size
        self.source = source
        self.paused = False
        self.busy = False
        self.later: IDelayedCall | None = None

    def start(self) -> None:
        ex = self.ex
        assert ex is not None
        ex.file_started(self)
        if self.source is not None:
            self.source.on_progress(self._progress)
        self.pump()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.pump()

    def stopProducing(self) -> None:
        self.close()

    def _progress(self, source: Any) -> None:
        if not self.paused:
            self.pump()

    def _again(self) -> None:
        self.later = None
        self.pump()

    def pump(self) -> None:
        if self.busy or self.later is not None:
            return
        self.busy = True
        try:
            self._pump()
        finally:
            self.busy = False

    def _pump(self) -> None:
        budget = _FILE_TURN
        while not self.paused:
            ex = self.ex
            if ex is None:
                return
            limit = self.end
            source = self.source
            if source is not None:
                if source.state == "done":
                    source.off_progress(self._progress)
                    self.source = source = None
                elif source.state == "failed":
                    return self._abort("cache fill failed")
                else:
                    limit = min(limit, source.written, self.size - 1)
            if self.pos >= limit:
                if self.pos >= self.end:
                    return self._done()
                ex.flush_head()  # nothing to send with the head yet: the client gets it now
                return  # wait for the source
            try:
                data = os.pread(self.fd, min(READ_SIZE, limit - self.pos), self.pos)
            except OSError:
                data = b""
            if not data:
                return self._abort("cached file shorter than expected")
            self.pos += len(data)
            ex.send(data)
            budget -= len(data)
            if budget <= 0:
                self.later = ex.conn.reactor.callLater(0, self._again)
                return

    def _done(self) -> None:
        ex = self.ex
        self.close()
        if ex is not None:
            ex.file_done()

    def _abort(self, reason: str) -> None:
        ex = self.ex
        self.close()
        if ex is not None:
            ex.file_failed(reason)

    def close(self) -> None:
        """Stop for good and close the file; the exchange is not told."""
        ex, self.ex = self.ex, None
        if ex is None:
            return
        cancel(self.later)
        self.later = None
        if self.source is not None:
            self.source.off_progress(self._progress)
            self.source = None
        try:
            os.close(self.fd)
        except OSError:
            pass
