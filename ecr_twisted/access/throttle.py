"""Failed-login throttling per client address, shared by every mode that checks credentials.

Its own module because it is pure bookkeeping (addresses, counts, times): no credentials,
no I/O, and the same rules whether bcrypt (basic, token) or the webhook says "wrong".
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["LoginThrottle"]


class LoginThrottle:
    """Slows down guessing: after `free` failed logins from one address within `window` seconds,
    that address's credentials are not even checked for a penalty that doubles with each further
    failure (capped), and it is told to come back later. A check counts as a failure from the
    moment it starts (so parallel guesses count too) and is forgiven if it succeeds."""

    def __init__(self, free: int = 5, window: float = 900.0, max_penalty: float = 60.0, size: int = 65536) -> None:
        self.free = free
        self.window = window
        self.max_penalty = max_penalty
        self.size = size
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # addr -> (count, last failure)

    def wait(self, addr: str, now: float) -> float:
        """Seconds this address must still wait before its credentials are checked (0: go ahead)."""
        entry = self._failures.get(addr)
        if entry is None:
            return 0.0
        count, last = entry
        if now - last > self.window:
            del self._failures[addr]
            return 0.0
        if count < self.free:
            return 0.0
        penalty = min(self.max_penalty, 2.0 ** min(count - self.free, 63))
        return max(0.0, last + penalty - now)

    def failed(self, addr: str, now: float) -> None:
        """A login from this address failed (one not counted up front by `attempt`)."""
        count, last = self._failures.pop(addr, (0, now))
        if now - last > self.window:
            count = 0
        self._failures[addr] = (count + 1, now)
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)

    def attempt(self, addr: str, now: float) -> None:
        """A check starts: it counts as a failure until it turns out right (`forgive`) or
        wrong (`confirm`), so guesses sent in parallel are counted before bcrypt runs."""
        count, last = self._failures.pop(addr, (0, now))
        if now - last > self.window:
            count, last = 0, now
        self._failures[addr] = (count + 1, last)
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)

    def confirm(self, addr: str, now: float) -> None:
        """The check counted by `attempt` failed: the penalty runs from now."""
        entry = self._failures.get(addr)
        if entry is not None:
            self._failures[addr] = (entry[0], now)
        else:
            self.failed(addr, now)

    def forgive(self, addr: str) -> None:
        """Take back one failure: a check counted as failed up front turned out right. (Not a reset:
        logging in with one's own account must not wipe the count of guesses at another's.)"""
        entry = self._failures.get(addr)
        if entry is not None:
            if entry[0] <= 1:
                del self._failures[addr]
            else:
                self._failures[addr] = (entry[0] - 1, entry[1])
