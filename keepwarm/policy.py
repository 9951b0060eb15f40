"""When a pair is pinged next: the keepalive policy, one pure component (SPEC §9).

A policy is fed *touches* in time order (keepwarm's own pings and the production requests that
observations report) and asked when to ping next, if at all. It reads no clock and does no I/O:
the caller says what time it is and hands it the random draw for jitter, so the daemon's
scheduler and `keepwarm simulate` run the very same code and a simulation shows what the daemon
would do. It is online: a decision at time t depends only on the touches fed before t.

How the scheduler uses it: after every ping it asks `next_ping(now, draw)` and arms the pair's
job at `decision.at`. Production touches are only fed, never scheduled: when the job wakes it asks
again, and if a touch since has made the ping unnecessary the answer lies later (or is None); the
ping is then skipped, counted under `decision.reason`, and the job re-armed at the new time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from keepwarm.classify import Result

# Label values of keepwarm_pings_skipped_total{reason}.
SKIP_REASONS = ("production_touch", "idle", "outside_hours", "budget")


class Source(str, enum.Enum):
    """Who touched the cache."""

    PING = "ping"
    PRODUCTION = "production"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Touch:
    """One request that may have touched a pair's cache, at the time it *started*
    (the TTL runs from the start of the request that read or wrote the entry)."""

    at: float
    source: Source
    result: Result

    @property
    def refreshed(self) -> bool:
        """True if the request read or wrote the cache, so the entry lives a TTL from `at`."""
        return self.result in (Result.WARM, Result.REWARMED, Result.PARTIAL)


@dataclass(frozen=True, slots=True)
class Decision:
    """When to ping next. `at` None: no ping until a later touch (the cache may lapse).

    `reason` says why this is later than a plain ping every interval would be (one of
    SKIP_REASONS), or is None when it is not.
    """

    at: float | None
    reason: str | None = None


class PairPolicy(Protocol):
    """The policy of one pair: fed touches in time order, asked when to ping next."""

    def observe(self, touch: Touch) -> None:
        """Record a touch (a ping's result or an observed production request)."""

    def next_ping(self, now: float, draw: float) -> Decision:
        """When to ping next, knowing only the touches fed so far; `draw` is uniform in [0, 1)."""


class FixedPolicy:
    """`policy: fixed`: ping `interval` (+ jitter, which only delays) after the last touch.

    Without observations that is exactly a ping every interval after the last ping's start.
    A production request that refreshed the cache moves the next ping to an interval after it:
    the ping it replaced is reported as skipped (`production_touch`).
    """

    __slots__ = ("interval", "jitter", "last_ping", "last_touch")

    def __init__(self, interval: float, jitter: float) -> None:
        self.interval = interval
        self.jitter = jitter
        self.last_ping = 0.0  # start of the last ping, whatever it found (0: none yet)
        self.last_touch = 0.0  # start of the latest request of either source that refreshed the cache

    def observe(self, touch: Touch) -> None:
        """Record a touch; touches may arrive late, so only a later time moves the anchors."""
        if touch.source is Source.PING:
            self.last_ping = max(self.last_ping, touch.at)
        if touch.refreshed or touch.source is Source.PING:
            # A failed ping refreshed nothing, but the next one still comes an interval after
            # it (its retries ran inside it, up to the cache's expiry).
            self.last_touch = max(self.last_touch, touch.at)

    def next_ping(self, now: float, draw: float) -> Decision:
        """An interval after the last touch; at once if nothing has touched the pair yet."""
        if not self.last_touch:
            return Decision(now)
        at = self.last_touch + self.interval + self.jitter * draw
        reason = "production_touch" if self.last_touch > self.last_ping else None
        return Decision(at, reason)
