"""The log line for prefix drift: loud the first time a pair drifts, then at most hourly.

Production requests whose prefix is not the one keepwarm warms are counted in metrics; the
log is where an operator reading it learns which pair, which two prefixes, and what to do.
One line per drifting request would drown the log (a busy pair drifts on every request).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from keepwarm.logs import event

log = logging.getLogger("keepwarm.observations")

REPEAT = 3600.0  # after the first, a pair's drift is logged again at most this often
FIX = "build production's prompt with keepwarm.prefix from the same config, or make the config match what production sends"


class DriftLog:
    """Per pair, when its drift was last logged and how many drifting requests came since
    (`drifting_requests` in the line: this one and those the rate limit kept quiet)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def judged(self, judged: Iterable[tuple[Any, Any]]) -> None:
        """Log the drifting requests among (observation, verdict) pairs, rate-limited per pair."""
        now = self.clock()
        for obs, verdict in judged:
            if verdict.drift is None:
                continue
            key = obs.pair.key
            last = self._last.get(key)
            self._since[key] = self._since.get(key, 0) + 1
            if last is not None and now - last < REPEAT:
                continue
            if verdict.drift == "fingerprint":
                why = "production's prefix has another fingerprint"
            else:
                why = "production wrote the cache while keepwarm held it warm: its prefix differs"
            event(log, logging.WARNING, "prefix drift: production sends a prefix other than the one keepwarm warms",
                  expert=obs.pair.expert, model=obs.pair.model, cause=why, warmed=obs.pair.fingerprint,
                  production=obs.fingerprint or "not sent (send the fingerprint to see it here)",
                  drifting_requests=self._since[key], fix=FIX,
                  next_log="at most hourly" if last is None else None)
            self._last[key] = now
            self._since[key] = 0
