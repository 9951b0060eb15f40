"""The vocabulary every keepalive policy shares: touches, decisions, and when a cache is alive.

It sits below `keepwarm.policy` and `keepwarm.adaptive` so neither imports the other to get it
(`keepwarm.policy` re-exports every name here, so `from keepwarm.policy import Touch` still works).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from keepwarm.classify import Result

# Label values of keepwarm_pings_skipped_total{reason}.
SKIP_REASONS = ("production_touch", "idle", "outside_hours", "budget")


def cache_alive(refreshed_at: float | None, ttl: float, t: float) -> bool:
    """Whether a cache last read or written at `refreshed_at` still holds the prefix at `t`.

    The one definition the policies' lookahead, `keepwarm simulate`'s replay and its hindsight
    optimum all use. The entry lives a TTL from the start of the request that refreshed it, and a
    request that starts exactly at expiry finds it gone (the API counts it as a write): alive is
    `t < refreshed_at + ttl`, strictly. None: never refreshed.
    """
    return refreshed_at is not None and t < refreshed_at + ttl


class Source(str, enum.Enum):
    """Who touched the cache."""

    PING = "ping"
    PRODUCTION = "production"

    def __str__(self) -> str:
        return self.value


# The results that read or wrote the cache. A module constant: looking the members up on the
# enum class at every touch (three class lookups a call) was a good part of what a touch cost.
_REFRESHING = (Result.WARM, Result.REWARMED, Result.PARTIAL)


@dataclass(frozen=True, slots=True)
class Touch:
    """One request that may have touched a pair's cache, at the time it *started*
    (the TTL runs from the start of the request that read or wrote the entry)."""

    at: float
    source: Source
    result: Result
    prefix_tokens: int = 0  # the prefix size the request reported (0: not known); prices a new policy

    @property
    def refreshed(self) -> bool:
        """True if the request read or wrote the cache, so the entry lives a TTL from `at`."""
        return self.result in _REFRESHING


@dataclass(frozen=True, slots=True)
class Decision:
    """When to ping next. `at` None: no ping until a later touch (the cache may lapse).

    `reason` says why this is later than a plain ping every interval would be (one of
    SKIP_REASONS), or is None when it is not.
    """

    at: float | None
    reason: str | None = None


def human_duration(seconds: float) -> str:
    """A duration for people on the status page: `45 s`, `12 m`, `1 h 5 m`."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{int(seconds)} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} m" if minutes else f"{hours} h"


class PairPolicy(Protocol):
    """The policy of one pair: fed touches in time order, asked when to ping next."""

    def observe(self, touch: Touch) -> None:
        """Record a touch (a ping's result or an observed production request)."""

    def next_ping(self, now: float, draw: float) -> Decision:
        """When to ping next, knowing only the touches fed so far; `draw` is uniform in [0, 1)."""

    def describe(self, now: float) -> str:
        """A few words for the status page: what the policy does with the pair now, and why."""
