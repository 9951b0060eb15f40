"""When a pair is pinged next: the keepalive policy, one pure component (docs/policy.md).

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

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from keepwarm.adaptive import DEFAULT_MARGIN, AdaptivePolicy, SharedPrior, SkiRentalPolicy
from keepwarm.touch import SKIP_REASONS, Decision, PairPolicy, Source, Touch, cache_alive, human_duration

if TYPE_CHECKING:
    from keepwarm.budget import Budget
    from keepwarm.config import Pair
    from keepwarm.hours import ActiveHours
    from keepwarm.pricing import PriceTable

# Re-exported: the scheduler, the daemon, observations and metrics import these names from here.
__all__ = [
    "SKIP_REASONS", "AdaptivePolicy", "BudgetedPolicy", "Decision", "FixedPolicy", "HoursPolicy", "PairPolicy",
    "SharedPrior", "Source", "Touch", "cache_alive", "human_duration", "make_policy",
]


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
        # None, not 0.0, for "never": a touch at unix time 0 is a touch (0.0 as "never" made a
        # trace starting at 0 ping at once, forever, without time moving on).
        self.last_ping: float | None = None  # start of the last ping, whatever it found
        self.last_touch: float | None = None  # start of the latest request of either source that refreshed the cache

    def observe(self, touch: Touch) -> None:
        """Record a touch; touches may arrive late, so only a later time moves the anchors."""
        if touch.source is Source.PING:
            self.last_ping = touch.at if self.last_ping is None else max(self.last_ping, touch.at)
        if touch.refreshed or touch.source is Source.PING:
            # A failed ping refreshed nothing, but the next one still comes an interval after
            # it (its retries ran inside it, up to the cache's expiry).
            self.last_touch = touch.at if self.last_touch is None else max(self.last_touch, touch.at)

    def next_ping(self, now: float, draw: float) -> Decision:
        """An interval after the last touch; at once if nothing has touched the pair yet."""
        if self.last_touch is None:
            return Decision(now)
        at = self.last_touch + self.interval + self.jitter * draw
        by_production = self.last_ping is None or self.last_touch > self.last_ping
        return Decision(at, "production_touch" if by_production else None)

    def describe(self, now: float) -> str:
        """`fixed` keeps every cache warm: say how often, and whether production did it lately."""
        every = human_duration(self.interval)
        if self.last_touch is not None and (self.last_ping is None or self.last_touch > self.last_ping):
            return f"keeping warm: a ping every {every}, production touched it {human_duration(now - self.last_touch)} ago"
        return f"keeping warm: a ping every {every}"


# --- wrappers: active hours and the budget apply to any policy -----------------------------


class HoursPolicy:
    """`active_hours` around any policy: outside them no pings (`outside_hours`).

    At the start of active hours: a pair that has never seen a production request (no
    observations) resumes pinging at once, as a plain keepalive must; one that has seen
    production is never pre-warmed: it pings at the start only if its cache is still warm then,
    else it waits for production's next request, which writes the cache anyway.
    """

    def __init__(self, inner: PairPolicy, hours: ActiveHours, ttl: float) -> None:
        self.inner = inner
        self.hours = hours
        self.ttl = ttl
        self.last_refresh: float | None = None  # None: never refreshed
        self.seen_production = False

    def observe(self, touch: Touch) -> None:
        """Record a touch here and in the wrapped policy."""
        if touch.refreshed:
            self.last_refresh = touch.at if self.last_refresh is None else max(self.last_refresh, touch.at)
        self.seen_production = self.seen_production or touch.source is Source.PRODUCTION
        self.inner.observe(touch)

    def next_ping(self, now: float, draw: float) -> Decision:
        """The wrapped policy's answer, moved to the next active stretch when it falls outside."""
        decision = self.inner.next_ping(now, draw)
        if decision.at is None:
            return decision
        at = max(decision.at, now)
        if self.hours.contains(at):
            return decision
        start = self.hours.next_start(at)
        if start is None or (self.seen_production and not cache_alive(self.last_refresh, self.ttl, start)):
            return Decision(None, "outside_hours")
        return Decision(start, "outside_hours")

    def describe(self, now: float) -> str:
        """Outside active hours: until when (in the zone of the hours); else the wrapped policy's words."""
        if self.hours.contains(now):
            return self.inner.describe(now)
        start = self.hours.next_start(now)
        if start is None:
            return "outside active hours"
        zone = ZoneInfo(self.hours.ranges[0].zone)
        return f"outside active hours until {datetime.fromtimestamp(start, zone).strftime('%a %H:%M')}"

    def __getattr__(self, name: str) -> Any:
        # observe_latency, expected_saving, replay: whatever the wrapped policy offers
        return getattr(self.inner, name)


class BudgetedPolicy:
    """`budget.usd_per_day` around any policy: a due ping goes only if the shared budget allows."""

    def __init__(self, inner: PairPolicy, budget: Budget, key: str, value: Callable[[float], float]) -> None:
        self.inner = inner
        self.budget = budget
        self.key = key
        self.value = value  # the expected saving of the pair's next ping, for the ranking

    def observe(self, touch: Touch) -> None:
        """Record a touch in the wrapped policy (costs go to the budget via `Budget.record`)."""
        self.inner.observe(touch)

    def next_ping(self, now: float, draw: float) -> Decision:
        """The wrapped policy's answer; a ping due now that the budget refuses waits (`budget`)."""
        decision = self.inner.next_ping(now, draw)
        if decision.at is None:
            self.budget.forget(self.key)  # no ping until production returns: out of the ranking
            return decision
        if decision.at > now:
            return decision  # judged when it is due: spend changes until then
        if self.budget.may_ping(self.key, now, self.value(now)):
            return decision
        return Decision(max(self.budget.resume_at(now), now), "budget")

    def describe(self, now: float) -> str:
        """At the cap: `budget reached`; below it, the wrapped policy's words."""
        if self.budget.spent(now) >= self.budget.cap:
            return "budget reached"
        return self.inner.describe(now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# Tokens of the ping's own user message ("ping") and the answer, for pricing a ping before one
# has been sent; the daemon's measured usage replaces them.
PING_MESSAGE_TOKENS = 8


def make_policy(
    pair: Pair,
    prices: PriceTable,
    prefix_tokens: int,
    *,
    prior: SharedPrior | None = None,
    budget: Budget | None = None,
    time_scale: float = 1.0,
    message_tokens: int = PING_MESSAGE_TOKENS,
    ski_rental: bool = False,
) -> PairPolicy:
    """The policy the pair's config asks for, wrapped in its active hours and the shared budget.

    The scheduler calls this once per pair (with one `SharedPrior` and one `Budget` for all
    pairs), replays the ledger's touches into it (`replay`, when offered), feeds every touch
    (`observe`), every ping attempt's latency (`observe_latency`, when offered) and every ping's
    cost (`budget.record`), and asks `next_ping`. A model without a price cannot weigh a ping
    against a miss: an adaptive pair then runs as `fixed`. `ski_rental` makes an adaptive pair
    learn nothing (`SkiRentalPolicy`, a reference for `keepwarm simulate`).
    """
    ping_cost = prices.warm_ping_cost(pair.price_key, prefix_tokens, message_tokens, max(pair.max_tokens, 1))
    penalty = prices.miss_penalty(pair.price_key, prefix_tokens, pair.ttl)
    minimum = prices.get(pair.price_key).min_cacheable_tokens
    if penalty is not None and minimum is not None and prefix_tokens < minimum:
        # A prefix below the model's minimum is never cached: a ping keeps nothing warm and no
        # miss is saved, so adaptive never pings it (it pinged such a pair every few minutes).
        penalty = 0.0
    policy: PairPolicy
    value: Callable[[float], float]
    if pair.adaptive and ping_cost is not None and penalty is not None:
        adaptive = (SkiRentalPolicy if ski_rental else AdaptivePolicy)(
            pair.ttl_seconds,
            pair.interval,
            pair.jitter,
            ping_cost,
            penalty,
            prior,
            default_margin=DEFAULT_MARGIN * time_scale,
            hour=3600.0 * time_scale,
        )
        policy, value = adaptive, adaptive.expected_saving
    else:
        policy = FixedPolicy(pair.interval, pair.jitter)
        net = (penalty or 0.0) - (ping_cost or 0.0)
        value = lambda _now: net  # noqa: E731 - fixed: every ping is worth the same
    if pair.active_hours is not None:
        policy = HoursPolicy(policy, pair.active_hours, pair.ttl_seconds)
    if budget is not None:
        policy = BudgetedPolicy(policy, budget, pair.key, value)
    return policy
