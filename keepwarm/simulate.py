"""`keepwarm simulate`: replay production traffic under each keepalive policy (docs/policy.md).

A trace is CSV with a header: `at` (unix seconds or RFC 3339), `expert`, `model` and optionally
`prefix_tokens`; other columns are ignored, rows may come in any order. The replay drives the very
policy objects the daemon uses (`keepwarm.policy.make_policy`) the way its scheduler does: after
each ping it asks `next_ping(now, draw)` and arms the pair's job there; a job that wakes asks
again and pings only if the answer is now (else it is re-armed later, or disarmed when the answer
is None); a production request is fed as a touch, and re-arms a disarmed pair. The cache of each
pair is modelled as the API keeps it: a request (ping or production) at t that finds it alive
reads it, one that finds it expired writes it, and either way it lives a TTL from t.

Money, per pair: a production request that reads the prefix from cache is the baseline; one that
misses pays the *write premium* (write price minus read price, the miss penalty); each ping pays
what it costs (a read of the prefix plus its tiny message, or a full write when it finds the cache
cold). The *extra caching cost* is premiums plus pings: everything above reading every production
prefix from cache. The *hindsight optimum* knows the whole trace: for each idle gap between two
production requests it either keeps the cache warm across it (one ping every TTL) or lets it lapse
(one miss penalty), whichever is cheaper; gaps are independent, so that is the least any keepalive
could have paid.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import heapq
import io
import json
import math
import multiprocessing
import os
import random
import re
import sqlite3
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

from keepwarm.adaptive import LATENCIES, SharedPrior
from keepwarm.budget import Budget
from keepwarm.classify import Result, Usage
from keepwarm.config import DEFAULT_INTERVAL, TTL_SECONDS, Config, ConfigError, Pair, load_config
from keepwarm.policy import PING_MESSAGE_TOKENS, FixedPolicy, PairPolicy, Source, Touch, cache_alive, make_policy
from keepwarm.pricing import PriceTable
from keepwarm.store import PostgresTarget, location

EX_DATAERR = 65
EX_CONFIG = 78
EX_USAGE = 2
ONLINE_POLICIES = ("none", "fixed", "adaptive")
POLICIES = (*ONLINE_POLICIES, "optimum")
# Not in the default set, reference rows: the mission's keepalive that ignores production, and
# ski rental alone (the adaptive policy's fallback, learning nothing).
EXTRA_POLICIES = ("fixed-plain", "ski-rental")
# Policies whose pairs decide alone (adaptive pairs share a prior: they replay in one timeline).
INDEPENDENT_POLICIES = ("fixed", "fixed-plain", "ski-rental")


class TraceError(Exception):
    """A trace that cannot be replayed; the message names the line."""


@dataclass(slots=True)
class Request:
    """One production request of a trace (never changed once read).

    Not a frozen dataclass: building one took 1.3 us instead of 0.26, a second and more of a
    million-row trace, read twice.
    """

    at: float
    expert: str
    model: str
    prefix_tokens: int | None = None
    line: int = 0
    # The pair, `expert/model`: built once, not at each of the replays' dozen lookups a row.
    key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.key = f"{self.expert}/{self.model}"


# --- reading traces ------------------------------------------------------------------------


# Unix seconds past this (the year 5138) are milliseconds (or worse) written as seconds: one such
# row made a trace span millennia, and the replay ping through them.
LATEST_TIME = 1e11
# The longest stretch one replay covers: a fixed pair pings every few minutes, so a trace that
# spans decades by a typo would run for hours. Two years of traffic is more than any ledger holds.
MAX_SPAN = 2 * 366 * 86400.0
# The seconds of an RFC 3339 time: `60` is a leap second.
_LEAP = re.compile(r"^(?P<head>\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:)60(?P<tail>(?:\.\d+)?(?:[Zz]|[+-]\d{2}:?\d{2}))$")


def parse_time(text: str) -> float:
    """Unix seconds, or an RFC 3339 timestamp with an offset (`Z` for UTC); raise ValueError."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return _rfc3339(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a time")
    if value >= LATEST_TIME:
        raise ValueError(f"{text!r} is after the year 5000: milliseconds? give unix seconds (divide by 1000)")
    return value


def _rfc3339(text: str) -> float:
    leap = _LEAP.match(text)
    if leap:
        # A leap second (23:59:60Z): unix time has none, and counts it as the next second,
        # as POSIX clocks do.
        return _rfc3339(f"{leap['head']}59{leap['tail']}") + 1.0
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValueError(f"{text!r} is neither unix seconds nor an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset; write it as 2026-03-02T09:00:00Z or +01:00")
    return moment.timestamp()


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause the cycle collector: reading a trace and replaying it make no cycles, but a million
    live requests made each of its passes scan them all again (half of the reading time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_trace(stream: TextIO, name: str = "trace") -> list[Request]:
    """The requests of a CSV trace, sorted by time; raise TraceError naming the bad line."""
    with _no_cycle_collection():
        return _parse_trace(stream, name)


def _parse_trace(stream: TextIO, name: str) -> list[Request]:
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        raise TraceError(f"{name}: empty; expected a header line with at,expert,model") from None
    except csv.Error as exc:
        raise TraceError(f"{name}:1: not CSV: {exc}") from None
    if header and header[0].startswith("\ufeff"):
        header[0] = header[0][1:]  # a UTF-8 byte order mark, as spreadsheets write one
    columns = {c.strip().lower(): i for i, c in enumerate(header)}
    missing = [c for c in ("at", "expert", "model") if c not in columns]
    if missing:
        raise TraceError(f"{name}:1: the header lacks {', '.join(missing)} (it has {', '.join(header) or 'nothing'})")
    tokens_col = columns.get("prefix_tokens")
    at_col, expert_col, model_col, width = columns["at"], columns["expert"], columns["model"], len(header)
    out: list[Request] = []
    append = out.append  # a million rows: every lookup saved in this loop counts
    try:
        for row in reader:
            line = reader.line_num
            if len(row) < width or not row[at_col].strip():
                # A blank row (no field, or only empty ones) is skipped; it has an empty `at`,
                # so a row with one is the only kind worth looking at field by field.
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) < width:
                    raise TraceError(f"{name}:{line}: {len(row)} fields, the header has {width}")
            try:
                at = parse_time(row[at_col])
            except ValueError as exc:
                raise TraceError(f"{name}:{line}: at: {exc}") from None
            expert, model = row[expert_col].strip(), row[model_col].strip()
            if not expert or not model:
                raise TraceError(f"{name}:{line}: expert and model must not be empty")
            tokens: int | None = None
            if tokens_col is not None and (text := row[tokens_col]) and text.strip():
                try:
                    tokens = int(text)
                    if tokens < 0:
                        raise ValueError
                except ValueError:
                    raise TraceError(f"{name}:{line}: prefix_tokens: expected a whole number >= 0, got {text!r}") from None
            append(Request(at, expert, model, tokens, line))
    except csv.Error as exc:
        raise TraceError(f"{name}:{reader.line_num}: not CSV: {exc}") from None
    out.sort(key=_at)  # stable: rows at the same time stay in line order
    return out


def _at(request: Request) -> float:
    return request.at


def read_observations(path: Path | PostgresTarget) -> list[Request]:
    """Production requests from the ledger's observations table; raise TraceError if unreadable.

    Reads the columns by name: the time (`time` or `at`), `expert`, `model`, and the prefix's
    tokens from `cache_read` + `cache_write_5m` + `cache_write_1h` when present. A PostgreSQL
    ledger (`ledger.url`) is read through the store: the whole fleet's observations.
    """
    if isinstance(path, PostgresTarget):
        from keepwarm.store import LedgerError
        from keepwarm.store import read_observations as read_stored

        try:
            stored = read_stored(path)
        except LedgerError as exc:
            raise TraceError(str(exc)) from None
        return [Request(o.time, o.expert, o.model, (o.cache_read + o.cache_write) or None, i + 1) for i, o in enumerate(stored)]
    if not path.is_file():
        raise TraceError(f"ledger {path}: no such file")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise TraceError(f"ledger {path}: cannot open it: {exc}") from None
    try:
        names = {row[1] for row in db.execute("PRAGMA table_info(observations)")}
        if not names:
            raise TraceError(f"ledger {path}: no observations table (a keepwarm that receives observations writes it)")
        when = "time" if "time" in names else "at" if "at" in names else None
        if when is None or not {"expert", "model"} <= names:
            raise TraceError(f"ledger {path}: the observations table lacks time, expert or model columns")
        parts = [c for c in ("cache_read", "cache_write_5m", "cache_write_1h") if c in names]
        tokens = " + ".join(f"COALESCE({c}, 0)" for c in parts) if parts else "NULL"
        rows = db.execute(f"SELECT {when}, expert, model, {tokens} FROM observations ORDER BY {when}").fetchall()
    except sqlite3.Error as exc:
        raise TraceError(f"ledger {path}: cannot read observations: {exc}") from None
    finally:
        db.close()
    return [Request(float(at), str(e), str(m), int(t) if t else None, i + 1) for i, (at, e, m, t) in enumerate(rows)]


def ledger_ping_latencies(path: Path | PostgresTarget) -> dict[str, list[float]]:
    """Each pair's latest ping latencies in the ledger (seconds): what the daemon measured."""
    from keepwarm.store import LedgerError, read_ledger

    try:
        rows = read_ledger(path)
    except LedgerError:
        return {}
    out: dict[str, list[float]] = {}
    for row in rows:
        if row.latency is not None and row.latency >= 0 and math.isfinite(row.latency):
            out.setdefault(f"{row.expert}/{row.model}", []).append(row.latency)
    return {key: seen[-LATENCIES:] for key, seen in out.items()}


def ledger_prefix_tokens(path: Path | PostgresTarget) -> dict[str, int]:
    """Each pair's prefix size as its latest successful ping in the ledger saw it."""
    from keepwarm.store import LedgerError, read_ledger

    try:
        rows = read_ledger(path)
    except LedgerError:
        return {}
    out: dict[str, int] = {}
    for row in rows:
        seen = (row.cache_read or 0) + (row.cache_write_5m or 0) + (row.cache_write_1h or 0)
        if seen:
            out[f"{row.expert}/{row.model}"] = seen
    return out


# --- the replay ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Costs:
    """What a pair's requests cost at one prefix size."""

    ping: float  # a ping that finds the cache warm
    cold_ping: float  # a ping that finds it cold and writes it
    penalty: float  # the write premium of a production request that misses

    @staticmethod
    def build(pair: Pair, prices: PriceTable, prefix_tokens: int) -> Costs:
        """Price one prefix size; a model without a price costs nothing here (the output says so)."""
        out_tokens = max(pair.max_tokens, 1)
        minimum = prices.get(pair.price_key).min_cacheable_tokens
        if minimum is not None and prefix_tokens < minimum:
            # It cannot cache: every ping is billed as plain input, and no ping saves production anything.
            plain = prices.cost(pair.price_key, Usage(input=prefix_tokens + PING_MESSAGE_TOKENS, output=out_tokens))
            each = math.fsum(plain.values()) if plain else 0.0
            return Costs(each, each, 0.0)
        warm = prices.warm_ping_cost(pair.price_key, prefix_tokens, PING_MESSAGE_TOKENS, out_tokens) or 0.0
        write = Usage(input=PING_MESSAGE_TOKENS, output=out_tokens, **{f"cache_write_{pair.ttl}": prefix_tokens})
        cold = prices.cost(pair.price_key, write)
        penalty = prices.miss_penalty(pair.price_key, prefix_tokens, pair.ttl) or 0.0
        return Costs(warm, math.fsum(cold.values()) if cold else 0.0, penalty)


@dataclass(frozen=True, slots=True)
class PairSetup:
    """A pair with the figures its replay needs.

    `prefix_tokens` is the size the pair starts with (and its policy is priced with, as the
    daemon prices a policy from the first size it learns). A trace row with `prefix_tokens`
    changes the pair's size from that row on: the cache holds what the latest request wrote, so
    later pings are priced at that size, and a miss at its own row's size. Online: a price at t
    depends only on the rows before t.
    """

    pair: Pair
    prefix_tokens: int
    ping_cost: float  # a ping that finds the cache warm, at `prefix_tokens`
    cold_ping_cost: float  # a ping that finds it cold and writes it
    miss_penalty: float
    prices: PriceTable | None = field(default=None, compare=False, repr=False)
    _by_size: dict[int, Costs] = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def build(pair: Pair, prices: PriceTable, prefix_tokens: int) -> PairSetup:
        """Price a pair; a model without a price costs nothing here, and says so in the output."""
        c = Costs.build(pair, prices, prefix_tokens)
        return PairSetup(pair, prefix_tokens, c.ping, c.cold_ping, c.penalty, prices, {prefix_tokens: c})

    def costs(self, tokens: int) -> Costs:
        """The pair's costs at prefix size `tokens` (computed once per size)."""
        found = self._by_size.get(tokens)
        if found is None:
            assert self.prices is not None, "PairSetup.build prices every size"
            found = self._by_size[tokens] = Costs.build(self.pair, self.prices, tokens)
        return found

    def premium(self, prices: PriceTable, tokens: int | None) -> float:
        """The write premium of one missed production request of `tokens` (default: the pair's)."""
        return self.costs(self.prefix_tokens if tokens is None else tokens).penalty


@dataclass
class Tally:
    """What one policy did for one pair (or all of them)."""

    requests: int = 0
    misses: int = 0
    pings: int = 0
    keepalive_usd: float = 0.0
    premiums_usd: float = 0.0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def extra_usd(self) -> float:
        """Everything above reading every production prefix from cache."""
        return self.keepalive_usd + self.premiums_usd

    def add(self, other: Tally) -> None:
        """Sum another tally into this one."""
        self.requests += other.requests
        self.misses += other.misses
        self.pings += other.pings
        self.keepalive_usd += other.keepalive_usd
        self.premiums_usd += other.premiums_usd
        self.skipped.update(other.skipped)


class _PlainFixed:
    """`fixed` blind to production: a ping every interval whatever happens (a reference row)."""

    def __init__(self, pair: Pair) -> None:
        self.inner = FixedPolicy(pair.interval, pair.jitter)

    def observe(self, touch: Touch) -> None:
        if touch.source is Source.PING:
            self.inner.observe(touch)

    def next_ping(self, now: float, draw: float) -> Any:
        return self.inner.next_ping(now, draw)

    def describe(self, now: float) -> str:
        return self.inner.describe(now)


def _policy_for(name: str, setup: PairSetup, prices: PriceTable, prior: SharedPrior, budget: Budget | None) -> PairPolicy:
    if name == "fixed-plain":
        return _PlainFixed(setup.pair)
    if name == "ski-rental":
        pair = replace(setup.pair, policy="adaptive")
        return make_policy(pair, prices, setup.prefix_tokens, prior=prior, budget=budget, ski_rental=True)
    pair = replace(setup.pair, policy=name)
    return make_policy(pair, prices, setup.prefix_tokens, prior=prior, budget=budget)


def replay(
    policy_name: str,
    setups: Sequence[PairSetup],
    requests: Sequence[Request],
    prices: PriceTable,
    start: float,
    until: float,
    seed: int = 0,
    budget_usd_per_day: float | None = None,
    pings: list[tuple[float, str, str, str]] | None = None,
    latencies: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Tally]:
    """Replay `requests` (sorted) under one online policy from `start` to `until`, all pairs together.

    All pairs run in one timeline because the budget is shared. Appends every ping to `pings`.
    `latencies`: per pair, ping latencies measured before the replay (the ledger's), which an
    adaptive policy spaces its pings by, as the daemon's does; without them, its default margin.
    """
    tallies = {s.pair.key: Tally() for s in setups}
    by_key = {s.pair.key: s for s in setups}
    # Per pair: when its cache was last read or written (None: never), and its prefix size now.
    refreshed: dict[str, float | None] = dict.fromkeys(by_key)
    size = {key: s.prefix_tokens for key, s in by_key.items()}
    if policy_name == "none":
        for r in requests:
            if r.at <= until and r.key in by_key:
                _production(tallies[r.key], by_key[r.key], r, None, refreshed, size)
        return tallies
    prior = SharedPrior()
    budget = Budget(budget_usd_per_day) if budget_usd_per_day else None
    policies = {s.pair.key: _policy_for(policy_name, s, prices, prior, budget) for s in setups}
    for key, seconds in (latencies or {}).items():
        observe_latency = getattr(policies[key], "observe_latency", None) if key in policies else None
        if callable(observe_latency):
            for each in seconds:
                observe_latency(each)
    if budget is None and policy_name in INDEPENDENT_POLICIES:
        # Nothing couples these pairs (no shared budget, no shared prior): each replays on its
        # own, without the timeline of every pair's events that a million rows made slow.
        mine: dict[str, list[Request]] = {key: [] for key in policies}
        for r in requests:
            if r.key in mine:
                mine[r.key].append(r)
        for key, policy in policies.items():
            _replay_alone(policy_name, policy, by_key[key], mine[key], tallies[key], start, until,
                          random.Random(f"{seed}:{key}"), pings)
        return tallies
    rngs = {key: random.Random(f"{seed}:{key}") for key in policies}
    draws = {key: rngs[key].random() for key in policies}
    armed: dict[str, float | None] = {}
    heap: list[tuple[float, int, str]] = []
    seq = 0

    def arm(key: str, now: float) -> None:
        nonlocal seq
        decision = policies[key].next_ping(now, draws[key])
        if decision.at is None:
            armed[key] = None
            if decision.reason:
                tallies[key].skipped[decision.reason] += 1
            return
        at = max(decision.at, now)
        armed[key] = at
        seq += 1
        heapq.heappush(heap, (at, seq, key))

    for key in policies:
        arm(key, start)
    i, n = 0, len(requests)
    while True:
        next_wake = heap[0][0] if heap else math.inf
        # The requests up to the next wake, in one go: the heap is looked at again only when a
        # request arms a pair (a million rows, most of them between two wakes).
        while i < n:
            r = requests[i]
            if r.at > next_wake or r.at > until:
                break
            i += 1
            setup = by_key.get(r.key)
            if setup is None:
                continue
            key = r.key
            _production(tallies[key], setup, r, policies[key], refreshed, size)
            draws[key] = rngs[key].random()
            if armed.get(key) is None:
                arm(key, r.at)
                next_wake = heap[0][0] if heap else math.inf
        if next_wake > until:
            break
        at, _, key = heapq.heappop(heap)
        if armed.get(key) != at:
            continue  # superseded
        decision = policies[key].next_ping(at, draws[key])
        if decision.at is None or decision.at > at + 1e-9:
            if decision.reason:
                tallies[key].skipped[decision.reason] += 1
            armed[key] = None
            if decision.at is not None:
                armed[key] = decision.at
                seq += 1
                heapq.heappush(heap, (decision.at, seq, key))
            continue
        setup, tally = by_key[key], tallies[key]
        warm = cache_alive(refreshed[key], setup.pair.ttl_seconds, at)
        costs = setup.costs(size[key])
        cost = costs.ping if warm else costs.cold_ping
        tally.pings += 1
        tally.keepalive_usd += cost
        if budget is not None:
            budget.record(at, cost)
        refreshed[key] = at
        policies[key].observe(Touch(at, Source.PING, Result.WARM if warm else Result.REWARMED))
        if pings is not None:
            pings.append((at, setup.pair.expert, setup.pair.model, policy_name))
        draws[key] = rngs[key].random()
        arm(key, at)
    return tallies


def _replay_alone(
    policy_name: str,
    policy: PairPolicy,
    setup: PairSetup,
    requests: Sequence[Request],
    tally: Tally,
    start: float,
    until: float,
    rng: random.Random,
    pings: list[tuple[float, str, str, str]] | None,
) -> None:
    """`replay` for one pair whose policy depends on nothing of the others: the same events,
    in the same order, with the same draws (tests/test_simulate.py compares the two)."""
    key = setup.pair.key
    refreshed: dict[str, float | None] = {key: None}
    size = {key: setup.prefix_tokens}
    ttl = setup.pair.ttl_seconds
    expert, model = setup.pair.expert, setup.pair.model
    draw = rng.random()
    wake: float | None = None

    def arm(now: float) -> float | None:
        decision = policy.next_ping(now, draw)
        if decision.at is None:
            if decision.reason:
                tally.skipped[decision.reason] += 1
            return None
        return max(decision.at, now)

    wake = arm(start)
    i, n = 0, len(requests)
    while True:
        next_request = requests[i].at if i < n else math.inf
        next_wake = math.inf if wake is None else wake
        if next_request <= next_wake:
            if next_request > until:
                return
            r = requests[i]
            i += 1
            _production(tally, setup, r, policy, refreshed, size)
            draw = rng.random()
            if wake is None:
                wake = arm(r.at)
            continue
        if next_wake > until:
            return
        at = next_wake
        decision = policy.next_ping(at, draw)
        if decision.at is None or decision.at > at + 1e-9:
            if decision.reason:
                tally.skipped[decision.reason] += 1
            wake = decision.at
            continue
        warm = cache_alive(refreshed[key], ttl, at)
        costs = setup.costs(size[key])
        tally.pings += 1
        tally.keepalive_usd += costs.ping if warm else costs.cold_ping
        refreshed[key] = at
        policy.observe(Touch(at, Source.PING, Result.WARM if warm else Result.REWARMED))
        if pings is not None:
            pings.append((at, expert, model, policy_name))
        draw = rng.random()
        wake = arm(at)


def _production(
    tally: Tally,
    setup: PairSetup,
    r: Request,
    policy: PairPolicy | None,
    refreshed: dict[str, float | None],
    size: dict[str, int],
) -> None:
    key = r.key
    if r.prefix_tokens is not None:
        size[key] = r.prefix_tokens  # the cache now holds this request's prefix
    tally.requests += 1
    warm = cache_alive(refreshed[key], setup.pair.ttl_seconds, r.at)
    if not warm:
        tally.misses += 1
        tally.premiums_usd += setup.costs(size[key]).penalty
    refreshed[key] = r.at
    if policy is not None:
        policy.observe(Touch(r.at, Source.PRODUCTION, Result.WARM if warm else Result.REWARMED))


def optimum(
    setup: PairSetup,
    requests: Sequence[Request],
    prices: PriceTable,
    pings: list[tuple[float, str, str, str]] | None = None,
) -> Tally:
    """The hindsight optimum of one pair: per idle gap, pings at the TTL or one miss, the cheaper.

    Priced as the replay prices: a ping at the size of the request before it (what the cache
    holds), a miss at its own request's size. Within a gap the size cannot change, so any
    keepalive pays at least this for the gap: a true lower bound. A gap of g seconds needs
    floor(g / ttl) pings to keep the cache alive at its end (`cache_alive`: a request at expiry
    is a miss), each a hair before the expiry it prevents; the pings written out are placed at
    the expiries themselves, the limit of that hair.
    """
    tally = Tally()
    ttl = setup.pair.ttl_seconds
    previous: float | None = None
    tokens = setup.prefix_tokens
    for r in requests:
        tally.requests += 1
        ping = setup.costs(tokens).ping  # the size in effect across the gap
        if r.prefix_tokens is not None:
            tokens = r.prefix_tokens
        premium = setup.costs(tokens).penalty
        if previous is None:
            tally.misses += 1  # the first request writes, whoever makes the write
            tally.premiums_usd += premium
        elif not cache_alive(previous, ttl, r.at):
            needed = math.floor((r.at - previous) / ttl)  # a ping every TTL until the request
            if needed * ping < premium:
                tally.pings += needed
                tally.keepalive_usd += needed * ping
                if pings is not None:
                    pings += [(previous + j * ttl, setup.pair.expert, setup.pair.model, "optimum") for j in range(1, needed + 1)]
            else:
                tally.misses += 1
                tally.premiums_usd += premium
        previous = r.at
    return tally


# --- the whole simulation ----------------------------------------------------------------


@dataclass
class Simulation:
    """Per policy, per pair and in total, plus the same under the other TTL."""

    until: float
    start: float
    setups: list[PairSetup]
    results: dict[str, dict[str, Tally]]
    ttl_alternative: dict[str, dict[str, Any]] = field(default_factory=dict)
    ignored: Counter[str] = field(default_factory=Counter)

    def total(self, policy: str) -> Tally:
        """The policy's tally over all pairs."""
        out = Tally()
        for tally in self.results[policy].values():
            out.add(tally)
        return out


def run(
    setups: Sequence[PairSetup],
    requests: Sequence[Request],
    prices: PriceTable,
    policies: Sequence[str] = POLICIES,
    until: float | None = None,
    seed: int = 0,
    budget_usd_per_day: float | None = None,
    pings: list[tuple[float, str, str, str]] | None = None,
    alternative_ttl: bool = True,
    latencies: Mapping[str, Sequence[float]] | None = None,
    parallel: bool = True,
) -> Simulation:
    """Replay a trace under each policy (and the other TTL under the best one).

    `latencies`: per pair, measured ping latencies (see `replay`). `parallel`: on a large trace,
    replay part of it in a child process (the answer is the same either way).
    """
    with _no_cycle_collection():
        return _run(setups, requests, prices, policies, until, seed, budget_usd_per_day, pings, alternative_ttl,
                    latencies, parallel)


def _run(
    setups: Sequence[PairSetup],
    requests: Sequence[Request],
    prices: PriceTable,
    policies: Sequence[str],
    until: float | None,
    seed: int,
    budget_usd_per_day: float | None,
    pings: list[tuple[float, str, str, str]] | None,
    alternative_ttl: bool,
    latencies: Mapping[str, Sequence[float]] | None,
    parallel: bool,
) -> Simulation:
    keys = {s.pair.key for s in setups}
    ignored = Counter(r.key for r in requests if r.key not in keys)
    requests = [r for r in requests if r.key in keys]
    start = requests[0].at if requests else 0.0
    end = until if until is not None else (requests[-1].at if requests else 0.0)
    requests = [r for r in requests if r.at <= end]
    by_pair: dict[str, list[Request]] = defaultdict(list)
    for r in requests:
        by_pair[r.key].append(r)
    large = parallel and len(requests) >= PARALLEL_ROWS
    # Each policy's replay needs nothing of another's, nor do the other TTL's: on a large trace a
    # child process runs all of them but this TTL's adaptive replay (the slowest; its pairs share
    # a prior, so it cannot be split) and the optimum, beside those.
    beside = [n for n in policies if n not in ("adaptive", "optimum")] if large else []
    other_setups = _other_ttl_setups(setups, prices) if alternative_ttl and setups else None
    Pings = list[tuple[float, str, str, str]]

    def elsewhere() -> tuple[dict[str, dict[str, Tally]], Pings, dict[str, dict[str, Tally]] | None]:
        theirs: Pings = []
        done = {n: replay(n, setups, requests, prices, start, end, seed, budget_usd_per_day,
                          theirs if pings is not None else None, latencies) for n in beside}
        other = None if other_setups is None else run(
            other_setups, requests, prices, ONLINE_POLICIES, end, seed, budget_usd_per_day,
            alternative_ttl=False, latencies=latencies, parallel=False).results
        return done, theirs, other

    waiting = _beside(elsewhere) if large and (beside or other_setups is not None) else elsewhere
    mine: dict[str, dict[str, Tally]] = {}
    for name in policies:
        if name == "optimum":
            mine[name] = {s.pair.key: optimum(s, by_pair[s.pair.key], prices, pings) for s in setups}
        elif name not in beside:
            mine[name] = replay(name, setups, requests, prices, start, end, seed, budget_usd_per_day, pings, latencies)
    done, theirs, other = waiting()
    if pings is not None:
        pings += theirs
    results = {name: done[name] if name in done else mine[name] for name in policies}
    sim = Simulation(end, start, list(setups), results, ignored=ignored)
    if other is not None:
        sim.ttl_alternative = _other_ttl(sim, setups, requests, prices, end, seed, budget_usd_per_day, other, latencies)
    return sim


# Rows from which part of the replays run in a child process, beside the rest: a million rows
# took 38 s in one process. Below it a fork costs more than it saves.
PARALLEL_ROWS = 100_000

_T = TypeVar("_T")


def _beside(work: Callable[[], _T]) -> Callable[[], _T]:
    """Start `work` in a forked child now; the function returned waits for its answer.

    Without fork, or when the child fails (killed, out of memory), the work runs here instead:
    the answer is the same either way, only later.
    """
    if not hasattr(os, "fork"):
        return work
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send(work())
        finally:
            send.close()

    proc = ctx.Process(target=child, daemon=True)
    proc.start()
    send.close()

    def wait() -> _T:
        try:
            answer: _T = receive.recv()
        except (EOFError, OSError):
            proc.join()
            return work()
        proc.join()
        return answer

    return wait


def _other_ttl_setups(setups: Sequence[PairSetup], prices: PriceTable) -> list[PairSetup]:
    """The pairs with the other TTL (5m <-> 1h) and that TTL's default interval."""
    out = []
    for s in setups:
        ttl = "5m" if s.pair.ttl == "1h" else "1h"
        pair = replace(s.pair, ttl=ttl, ttl_seconds=TTL_SECONDS[ttl], interval=DEFAULT_INTERVAL[ttl])
        if pair.interval + pair.jitter >= pair.ttl_seconds:
            pair = replace(pair, jitter=0.0)
        out.append(PairSetup.build(pair, prices, s.prefix_tokens))
    return out


def _other_ttl(
    sim: Simulation,
    setups: Sequence[PairSetup],
    requests: Sequence[Request],
    prices: PriceTable,
    end: float,
    seed: int,
    budget: float | None,
    other_results: dict[str, dict[str, Tally]],
    latencies: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per pair: the best online policy's extra cost at the pair's TTL and at the other one."""
    # The best of every online policy on both sides, whichever policies the output shows.
    missing = [p for p in ONLINE_POLICIES if p not in sim.results]
    current = dict(sim.results)
    if missing:
        current.update(run(setups, requests, prices, missing, end, seed, budget, alternative_ttl=False,
                           latencies=latencies).results)
    out: dict[str, dict[str, Any]] = {}
    for s in setups:
        key = s.pair.key
        here = {p: current[p][key].extra_usd for p in ONLINE_POLICIES}
        there = {p: other_results[p][key].extra_usd for p in ONLINE_POLICIES}
        best_here, best_there = min(here, key=here.__getitem__), min(there, key=there.__getitem__)
        out[key] = {
            "ttl": s.pair.ttl,
            "best_policy": best_here,
            "extra_usd": here[best_here],
            "other_ttl": "5m" if s.pair.ttl == "1h" else "1h",
            "other_best_policy": best_there,
            "other_extra_usd": there[best_there],
        }
    return out


# --- output ---------------------------------------------------------------------------------


def _ratio(extra: float, best: float | None) -> float | None:
    if best is None:
        return None
    if best <= 0:
        return 1.0 if extra <= 0 else None
    return extra / best


def _row(tally: Tally, best: float | None) -> dict[str, Any]:
    return {
        "requests": tally.requests,
        "misses": tally.misses,
        "keepalive_pings": tally.pings,
        "keepalive_usd": tally.keepalive_usd,
        "write_premiums_usd": tally.premiums_usd,
        "extra_usd": tally.extra_usd,
        "ratio_to_optimum": _ratio(tally.extra_usd, best),
        "skipped": dict(sorted(tally.skipped.items())),
    }


def to_json(sim: Simulation) -> dict[str, Any]:
    """The simulation as a JSON-ready mapping (full precision)."""
    opt = sim.results.get("optimum")
    best_total = sim.total("optimum").extra_usd if opt is not None else None
    policies: dict[str, Any] = {}
    for name, per_pair in sim.results.items():
        policies[name] = {
            "pairs": {k: _row(t, opt[k].extra_usd if opt else None) for k, t in per_pair.items()},
            "total": _row(sim.total(name), best_total),
        }
    alt = sim.ttl_alternative
    return {
        "start": sim.start,
        "until": sim.until,
        "pairs": {
            s.pair.key: {
                "account": s.pair.account,
                "provider": s.pair.provider,
                "ttl": s.pair.ttl,
                "prefix_tokens": s.prefix_tokens,
                "ping_usd": s.ping_cost,
                "miss_penalty_usd": s.miss_penalty,
            }
            for s in sim.setups
        },
        "policies": policies,
        "ttl_alternative": {
            "pairs": alt,
            "total": {
                "extra_usd": math.fsum(a["extra_usd"] for a in alt.values()),
                "other_extra_usd": math.fsum(a["other_extra_usd"] for a in alt.values()),
            },
        },
        "ignored_rows": dict(sim.ignored),
    }


def _money(value: float) -> str:
    return f"${value:.4f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def to_table(sim: Simulation, shown: Iterable[str] | None = None) -> str:
    """The simulation as a table for people (only the policies in `shown`, default all)."""
    data = to_json(sim)
    if shown is not None:
        keep = set(shown)
        data["policies"] = {k: v for k, v in data["policies"].items() if k in keep}
    headers = ["POLICY", "PAIR", "REQUESTS", "MISSES", "PINGS", "KEEPALIVE", "PREMIUMS", "EXTRA", "×OPTIMUM"]
    rows = []
    for name, block in data["policies"].items():
        for key, row in [*block["pairs"].items(), ("TOTAL", block["total"])]:
            ratio = row["ratio_to_optimum"]
            rows.append([
                name, key, str(row["requests"]), str(row["misses"]), str(row["keepalive_pings"]),
                _money(row["keepalive_usd"]), _money(row["write_premiums_usd"]), _money(row["extra_usd"]),
                "-" if ratio is None else f"{ratio:.2f}",
            ])
    lines = [_table(headers, rows)]
    alt = data["ttl_alternative"]["pairs"]
    if alt:
        lines.append("\nTTL, under the best online policy for each:")
        for key, a in alt.items():
            lines.append(
                f"  {key}: {a['ttl']} {_money(a['extra_usd'])} ({a['best_policy']}); "
                f"{a['other_ttl']} would cost {_money(a['other_extra_usd'])} ({a['other_best_policy']})"
            )
    if sim.ignored:
        lines.append(f"\nignored {sum(sim.ignored.values())} row(s) for pairs not in the config: {', '.join(sorted(sim.ignored))}")
    return "\n".join(lines)


def write_pings(path: Path, pings: Iterable[tuple[float, str, str, str]]) -> None:
    """CSV `at,expert,model,policy` of every simulated ping, in time order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["at", "expert", "model", "policy"])
    for at, expert, model, policy in sorted(pings):
        writer.writerow([f"{at:.3f}", expert, model, policy])
    path.write_text(buf.getvalue(), encoding="utf-8")


# --- the command ---------------------------------------------------------------------------


def check_replayable(pairs: Sequence[Pair], requests: Sequence[Request], until: float | None, name: str) -> str | None:
    """Why these requests cannot be replayed for these pairs (None: they can).

    Nothing to replay (a trace for another config, a ledger before any observation, `--until`
    before the first request) and a span no replay should take (a typo's decades) are refused
    with a message, never replayed into a hang.
    """
    keys = {p.key for p in pairs}
    mine = [r for r in requests if r.key in keys]
    if not mine:
        others = sorted({r.key for r in requests})
        if not others:
            return f"{name}: no requests to replay"
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        return f"{name}: no request for the config's pairs ({', '.join(sorted(keys))}); it has {shown}"
    first = mine[0]
    if until is not None and until < first.at:
        return f"{name}: --until {until:.0f} is before the first request of the config's pairs (line {first.line}, {first.at:.0f})"
    last_at = until if until is not None else mine[-1].at
    if last_at - first.at > MAX_SPAN:
        days = (last_at - first.at) / 86400.0
        where = "--until" if until is not None else f"line {mine[-1].line}"
        return (f"{name}: spans {days:,.0f} days (line {first.line} to {where}); simulate replays at most "
                f"{MAX_SPAN / 86400.0:.0f} days: check those times, or cut the trace")
    return None


def add_parser(sub: Any) -> None:
    """Add `keepwarm simulate` to the CLI's subcommands."""
    sp = sub.add_parser("simulate", help="replay a production trace under each keepalive policy; sends no ping")
    sp.add_argument("--config", type=Path, default=None, help="the YAML config (default: $KEEPWARM_CONFIG)")
    src = sp.add_mutually_exclusive_group()
    src.add_argument("--trace", type=Path, help="CSV with at,expert,model[,prefix_tokens]")
    src.add_argument("--from-ledger", action="store_true", help="replay the observations in the config's ledger")
    sp.add_argument("--format", choices=("table", "json"), default="table")
    sp.add_argument("--policy", action="append", choices=(*POLICIES, *EXTRA_POLICIES),
                    help="simulate only this policy (repeatable; default: none, fixed, adaptive, optimum)")
    sp.add_argument("--until", help="end of the replay, unix seconds or RFC 3339 (default: the last request)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the jitter draws (default 0)")
    sp.add_argument("--pings-out", type=Path, help="write every simulated ping as CSV at,expert,model,policy")
    sp.add_argument("--emulator", action="store_true",
                    help="count prefix tokens the trace and ledger do not give with the built-in emulator")


def _prefix_tokens(config: Config, requests: Sequence[Request], emulator: bool) -> dict[str, int]:
    """Per pair: the first prefix_tokens of the trace, else the ledger's pings, else count_tokens.

    The first, not a statistic of the whole trace: a price must not depend on rows after the
    time it is used at (a cut trace would ping differently before the cut). Later rows' sizes
    price what follows them (`PairSetup`).
    """
    out: dict[str, int] = {}
    for r in requests:
        if r.prefix_tokens is not None:
            out.setdefault(r.key, r.prefix_tokens)
    stored = location(config)
    if stored is not None and any(p.key not in out for p in config.pairs):
        for key, tokens in ledger_prefix_tokens(stored).items():
            out.setdefault(key, tokens)
    missing = [p for p in config.pairs if p.key not in out]
    if missing:
        out.update(_count_tokens(config, missing, emulator))
    return out


def _count_tokens(config: Config, pairs: Sequence[Pair], emulator: bool) -> dict[str, int]:
    """Count with the free count_tokens endpoint: the emulator's, or the configured API's."""
    import contextlib

    import anthropic

    from keepwarm.config import resolve_api_key
    from keepwarm.ping import make_client
    from keepwarm.providers.base import canonical_model

    with contextlib.ExitStack() as stack:
        if emulator:
            from keepwarm.emulator import Emulator

            emu = stack.enter_context(Emulator())
            client = make_client(emu.base_url, "emulator-key", config.api.timeout)
        else:
            try:
                key, _ = resolve_api_key(config)
            except ConfigError as exc:
                names = ", ".join(p.key for p in pairs)
                raise ConfigError(
                    [f"no prefix_tokens for {names}: add a prefix_tokens column to the trace, a ledger.path "
                     "with pings, or --emulator to count with the built-in emulator; counting with the API "
                     f"needs a key: {exc.problems[0]}"],
                    exc.source, heading="keepwarm simulate: the config is valid, but prefix sizes are missing",
                ) from None
            client = make_client(config.api.base_url, key.value, config.api.timeout)
        out = {}
        for pair in pairs:
            message: Any = [{"role": "user", "content": pair.ping_message}]
            # A Bedrock or Vertex id serves a Claude model, whose tokenizer counts the same prefix.
            model = canonical_model(pair.provider, pair.model)
            try:
                total = client.messages.count_tokens(model=model, messages=message, **pair.prefix.params())
                tail = client.messages.count_tokens(model=model, messages=message)
            except anthropic.AnthropicError as exc:
                raise ConfigError([f"{pair.key}: cannot count its prefix tokens: {type(exc).__name__}"]) from None
            out[pair.key] = total.input_tokens - tail.input_tokens
        return out


def main(args: argparse.Namespace) -> int:
    """`keepwarm simulate`: exit 0, 65 for a bad trace, 78 for a bad config, 2 for bad usage."""

    config_path = args.config or (Path(os.environ["KEEPWARM_CONFIG"]) if os.environ.get("KEEPWARM_CONFIG") else None)
    if config_path is None:
        print("keepwarm simulate: --config is required (or set KEEPWARM_CONFIG)", file=sys.stderr)
        return EX_USAGE
    if args.trace is None and not args.from_ledger:
        print("keepwarm simulate: give --trace FILE or --from-ledger", file=sys.stderr)
        return EX_USAGE
    until = None
    if args.until is not None:
        try:
            until = parse_time(args.until)
        except ValueError as exc:
            print(f"keepwarm simulate: --until: {exc}", file=sys.stderr)
            return EX_USAGE
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EX_CONFIG
    try:
        if args.from_ledger:
            stored = location(config)
            if stored is None:
                print(f"keepwarm simulate: {config_path} has no ledger.path or ledger.url for --from-ledger", file=sys.stderr)
                return EX_CONFIG
            requests = read_observations(stored)
        elif getattr(args, "parsed_trace", None) is not None:
            requests = args.parsed_trace  # `keepwarm.cli` read it already, to say what it matched
        else:
            try:
                with args.trace.open(encoding="utf-8-sig", newline="") as stream:
                    requests = parse_trace(stream, str(args.trace))
            except (OSError, UnicodeDecodeError) as exc:
                raise TraceError(f"{args.trace}: cannot read it: {exc}") from None
    except TraceError as exc:
        print(f"keepwarm simulate: {exc}", file=sys.stderr)
        return EX_DATAERR
    problem = check_replayable(config.pairs, requests, until, "the ledger's observations" if args.from_ledger else str(args.trace))
    if problem is not None:
        print(f"keepwarm simulate: {problem}", file=sys.stderr)
        return EX_DATAERR
    try:
        tokens = _prefix_tokens(config, requests, args.emulator)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EX_CONFIG
    setups = [PairSetup.build(p, config.prices, tokens[p.key]) for p in config.pairs]
    html = getattr(args, "html", None)  # `--html FILE`, added by keepwarm.cli: keepwarm.simulate_html draws it
    pings: list[tuple[float, str, str, str]] | None = [] if args.pings_out or html else None
    policies = tuple(dict.fromkeys(args.policy)) if args.policy else POLICIES
    if "optimum" not in policies:
        policies = (*policies, "optimum")  # ratios need it; it is not printed when not asked for
    # The ping latencies the daemon measured, where the config's ledger has them: the adaptive
    # policy spaces its pings by their p99, as the daemon's does (else its default margin).
    stored = location(config)
    latencies = ledger_ping_latencies(stored) if stored is not None else {}
    sim = run(setups, requests, config.prices, policies, until, args.seed, config.budget_usd_per_day, pings,
              latencies=latencies)
    shown = set(args.policy or POLICIES)
    if args.pings_out is not None and pings is not None:
        write_pings(args.pings_out, [p for p in pings if p[3] in shown])
    if html is not None and pings is not None:
        from keepwarm.simulate_html import write_html

        write_html(html, sim, requests, [p for p in pings if p[3] in shown], shown)
    if args.format == "json":
        data = to_json(sim)
        data["policies"] = {k: v for k, v in data["policies"].items() if k in shown}
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(to_table(sim, shown))
    return 0
