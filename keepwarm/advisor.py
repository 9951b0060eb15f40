"""The TTL advisor: what keeping a prefix warm costs a day at 5m and at 1h, against not at all.

Pure arithmetic over the price table. The model behind the three options, per day:

- 5m keepalive: one ping every `interval_5m`; once warm each ping reads the prefix (read
  price) and pays its tail (the short user message, plus output unless max_tokens is 0).
- 1h keepalive: one ping every `interval_1h`; its pings are reads too (a 1h read costs what a
  5m read costs), so it differs from 5m only in fewer pings and a dearer write.
- Both pay for `cold_starts_per_day` (default 1: a deploy, a prompt edit or a restart a day)
  one write instead of one read. That write is where the TTLs differ: 1.25x input for 5m,
  2x input for 1h, taken from the price table for both so neither can drift.
- No keepalive: production stays on the default 5m TTL and every request that finds the
  cache cold writes the prefix instead of reading it, paying the 5m miss penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keepwarm.pricing import MILLION, PriceTable, break_even_misses_per_day
from keepwarm.pricing import format_usd as usd

DAY = 86400.0


@dataclass(frozen=True)
class Advice:
    """Daily costs of the three options for one pair, the recommendation and its arithmetic."""

    model: str
    prefix_tokens: int
    pings_per_day_5m: float
    pings_per_day_1h: float
    cold_starts_per_day: float
    cold_requests_per_day: float | None
    ping_cost: float | None  # one warm ping, the same at both TTLs
    miss_penalty_5m: float | None  # a write at the 5m price instead of a read
    miss_penalty_1h: float | None  # a write at the 1h price instead of a read
    daily_5m: float | None
    daily_1h: float | None
    daily_none: float | None  # None also when cold_requests_per_day is not given
    # Production misses a day above which the keepalive at the pair's own TTL pays for itself;
    # None when its cost is unknown or the prefix cannot cache.
    break_even_cold_per_day: float | None
    recommended: str  # "5m", "1h", "none", or "unknown (no price for <model>)"
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PrefixDaily:
    """What production pays a day for a prefix sent with every request."""

    uncached: float
    cached: float  # every request reads the prefix from the cache

    @property
    def saving(self) -> float:
        """What caching saves a day when every request hits."""
        return self.uncached - self.cached


def _count(n: float) -> str:
    return f"{n:,.0f}" if n == round(n) else f"{n:,.1f}"


def _times(m: float) -> str:
    return f"{m:g}×"


def prefix_cost_per_day(prices: PriceTable, model: str, prefix_tokens: int, requests_per_day: float) -> PrefixDaily | None:
    """The prefix's daily input cost, uncached and read from the cache; None without a price."""
    price = prices.get(model)
    if price.input is None or price.read_multiplier is None:
        return None
    tokens = requests_per_day * prefix_tokens
    return PrefixDaily(uncached=tokens * price.input / MILLION, cached=tokens * price.input * price.read_multiplier / MILLION)


def ttl_advice(
    prices: PriceTable,
    model: str,
    prefix_tokens: int,
    tail_tokens: int,
    interval_5m: float = 240.0,
    interval_1h: float = 3300.0,
    cold_requests_per_day: float | None = None,
    *,
    output_tokens: int = 1,
    cold_starts_per_day: float = 1.0,
    ttl: str = "5m",
) -> Advice:
    """Compare a 5m keepalive, a 1h keepalive and none for one prefix on one model.

    `tail_tokens` are the ping's input tokens after the prefix; `output_tokens` is 1 with
    max_tokens 1 and 0 with max_tokens 0. Pass intervals as the mean gap between pings
    (interval + jitter / 2) for the daily figures to match the scheduler. The break-even is
    that of the keepalive at `ttl`, the pair's own.
    """
    n5, n1 = DAY / interval_5m, DAY / interval_1h
    ping = prices.warm_ping_cost(model, prefix_tokens, tail_tokens, output_tokens)
    pen5 = prices.miss_penalty(model, prefix_tokens, "5m")
    pen1 = prices.miss_penalty(model, prefix_tokens, "1h")
    price = prices.get(model)
    if ping is None or pen5 is None or pen1 is None or price.read_multiplier is None:
        return Advice(
            model=model,
            prefix_tokens=prefix_tokens,
            pings_per_day_5m=n5,
            pings_per_day_1h=n1,
            cold_starts_per_day=cold_starts_per_day,
            cold_requests_per_day=cold_requests_per_day,
            ping_cost=None,
            miss_penalty_5m=None,
            miss_penalty_1h=None,
            daily_5m=None,
            daily_1h=None,
            daily_none=None,
            break_even_cold_per_day=None,
            recommended=f"unknown (no price for {model})",
            lines=[f"{model}: no price in the table (add it with pricing_file): every cost is unknown"],
        )
    daily_5m = n5 * ping + cold_starts_per_day * pen5
    daily_1h = n1 * ping + cold_starts_per_day * pen1
    daily_none = None if cold_requests_per_day is None else cold_requests_per_day * pen5
    best, best_daily = ("1h", daily_1h) if daily_1h < daily_5m else ("5m", daily_5m)
    own_daily, own_penalty = (daily_1h, pen1) if ttl == "1h" else (daily_5m, pen5)
    minimum = price.min_cacheable_tokens
    cacheable = minimum is None or prefix_tokens >= minimum
    breakeven = break_even_misses_per_day(own_daily, own_penalty) if cacheable else None
    starts = f"{_count(cold_starts_per_day)} cold start{'s' if cold_starts_per_day != 1 else ''}/day"
    w5, w1 = prices.write_multiplier("5m"), prices.write_multiplier("1h")
    lines = [
        (f"one warm ping: {prefix_tokens:,} prefix tokens read at {_times(price.read_multiplier)} input"
         f" + {tail_tokens} tail + {output_tokens} output tokens = {usd(ping)}"),
        (f"5m keepalive: {_count(n5)} pings/day × {usd(ping)} = {usd(n5 * ping)}/day,"
         f" + {starts} × {usd(pen5)} (a write at {_times(w5)} input instead of a read) = {usd(daily_5m)}/day"),
        (f"1h keepalive: {_count(n1)} pings/day × {usd(ping)} = {usd(n1 * ping)}/day,"
         f" + {starts} × {usd(pen1)} (a write at {_times(w1)} input instead of a read) = {usd(daily_1h)}/day"),
    ]
    if daily_none is None:
        lines.append(f"no keepalive: each production request that finds the cache cold pays {usd(pen5)} more"
                     f" (a write at {_times(w5)} input instead of a read)")
    else:
        lines.append(f"no keepalive: {_count(cold_requests_per_day or 0)} cold requests/day × {usd(pen5)}"
                     f" = {usd(daily_none)}/day")
    if breakeven is not None:
        lines.append(f"break-even: the {ttl} keepalive pays for itself above {breakeven:,.1f} production cache"
                     f" misses/day ({usd(own_daily)} / {usd(own_penalty)})")
    extra_write = pen1 - pen5
    if n5 > n1 and extra_write > 0:
        # Where 1h stops winning: its saved pings no longer cover its dearer writes.
        crossover = (n5 - n1) * ping / extra_write
        lines.append(f"1h beats 5m while the cache is rewritten fewer than {crossover:,.0f} times a day"
                     f" ({_count(n5 - n1)} fewer pings × {usd(ping)} against {usd(extra_write)} more per write)")
    recommended = best
    if daily_none is not None and daily_none <= best_daily:
        recommended = "none"
    if not cacheable:
        recommended = "none"
        lines.append(f"the prefix ({prefix_tokens:,} tokens) is below {model}'s minimum of {minimum:,}: it cannot"
                     " cache, so no keepalive helps")
    if recommended == "1h":
        lines.append("1h means production sends the same marker with ttl 1h too: the marker is part of the prefix")
    lines.append(f"recommended: {recommended if recommended == 'none' else recommended + ' keepalive'}")
    return Advice(
        model=model,
        prefix_tokens=prefix_tokens,
        pings_per_day_5m=n5,
        pings_per_day_1h=n1,
        cold_starts_per_day=cold_starts_per_day,
        cold_requests_per_day=cold_requests_per_day,
        ping_cost=ping,
        miss_penalty_5m=pen5,
        miss_penalty_1h=pen1,
        daily_5m=daily_5m,
        daily_1h=daily_1h,
        daily_none=daily_none,
        break_even_cold_per_day=breakeven,
        recommended=recommended,
        lines=lines,
    )
