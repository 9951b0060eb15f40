"""One gate in front of the API, shared by every pair.

When the API says "slow down" (a 429 or 529 with `retry-after`, or the monthly spend cap),
every pair shares the same key and the same limits, so every pair should wait, not just the
one that was told. And an optional requests-per-minute cap spaces request starts so that many
pairs never cause their own 429s. Time here is monotonic: a wall-clock step must not open or
shut the gate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# The spend cap does not clear until the month resets or someone raises it: retry rarely.
SPEND_CAP_FIRST_BACKOFF = 60.0
SPEND_CAP_MAX_BACKOFF = 3600.0


class Gate:
    """A shared "not before" plus request spacing; thread-safe."""

    def __init__(self, requests_per_minute: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.spacing = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._lock = threading.Lock()
        self._closed_until = 0.0
        self._next_slot = 0.0
        self._spend_cap_backoff = 0.0
        self.reason = ""

    def close_for(self, seconds: float, reason: str) -> None:
        """Hold every pair back for `seconds` (never shortens an existing hold)."""
        with self._lock:
            until = self.clock() + seconds
            if until > self._closed_until:
                self._closed_until, self.reason = until, reason

    def spend_cap_hit(self) -> float:
        """Back off for the spend cap, longer each time it is hit again; returns the wait."""
        with self._lock:
            self._spend_cap_backoff = min(
                max(self._spend_cap_backoff * 2, SPEND_CAP_FIRST_BACKOFF), SPEND_CAP_MAX_BACKOFF
            )
            wait = self._spend_cap_backoff
        self.close_for(wait, "spend cap")
        return wait

    def succeeded(self) -> None:
        """A request got through: the spend-cap backoff starts small again next time."""
        self._spend_cap_backoff = 0.0

    def open_in(self) -> float:
        """Seconds until the gate opens (0 when open)."""
        return max(self._closed_until - self.clock(), 0.0)

    def reserve(self, latest: float, max_wait: float = float("inf")) -> float | None:
        """Reserve a start no later than `latest` (monotonic) and within `max_wait`; return the wait.

        None means the gate will not let a request through in time: the caller should not
        send one, and no slot is taken from the others.
        """
        with self._lock:
            now = self.clock()
            start = max(now, self._closed_until, self._next_slot)
            if start > latest or start - now > max_wait:
                return None
            self._next_slot = start + self.spacing
            return start - now
