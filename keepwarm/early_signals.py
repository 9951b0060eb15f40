"""Hold SIGHUP, SIGTERM and SIGINT from the first moment of `keepwarm run` until the daemon is up.

Importing the daemon (the SDK, the scheduler, the metrics) takes a second or more; a SIGHUP in
that time would meet its default action and kill the process (exit 129). `hold()` is cheap and
imports nothing heavy: the run command calls it first, and the daemon replays what was held once
its own handlers are in place.
"""

from __future__ import annotations

import signal
from types import FrameType

HELD = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
_pending: list[int] = []


def _queue(signum: int, frame: FrameType | None) -> None:
    _pending.append(signum)


def hold() -> None:
    """Queue the daemon's signals instead of acting on them, until `take()` hands them over."""
    for signum in HELD:
        signal.signal(signum, _queue)


def take() -> list[int]:
    """The signals held so far, oldest first; they are handed over once."""
    held = list(_pending)
    del _pending[: len(held)]
    return held
