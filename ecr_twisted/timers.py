"""One small thing every timer owner needs."""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall

__all__ = ["cancel"]


def cancel(call: IDelayedCall | None) -> None:
    """Cancel a `callLater` handle unless it already ran or was cancelled (safe on None)."""
    if call is not None and call.active():
        call.cancel()
