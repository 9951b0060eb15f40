"""Every Prometheus metric keepwarm exports, defined in one place.

Metrics are built against an injectable registry so each test gets a fresh one.

The series budget (`metrics.per_pair`). In `standard` mode (the default) a pair exposes at
most 20 series in a healthy steady state, 29 once production observations arrive:

- dense from start-up, at 0: `keepwarm_pings_total` (each result), `keepwarm_cost_usd_total`
  (each kind the pair's TTL allows: a 5m pair never writes a 1h entry), the four per-pair
  gauges, `keepwarm_pair_info` and `keepwarm_pair_state`;
- sparse, each series at its first non-zero value: errors, cache misses, tokens, unpriced and
  missed pings, skipped pings, and the production families (`keepwarm_production_*`,
  `keepwarm_saved_usd_total`, `keepwarm_prefix_drift_total`);
- `keepwarm_ping_duration_seconds` carries `model` only.

In `full` mode every per-pair series exists from start-up (the production ones from a pair's
first observation, all their label values at once), the duration histogram is per pair, and
`keepwarm_ping_interval_seconds` is exported.

prometheus_client keeps one object, with its own lock, per series: far too heavy at 10,000
pairs (docs/performance.md). So the per-pair values live here in one flat array per pair,
behind handles with prometheus_client's `labels(...).inc()` face, and are read by a collector
(for `generate_latest` and `get_sample_value`) or streamed by `exposition()`, which writes the
same bytes as `generate_latest` in a tenth of the time.
"""

from __future__ import annotations

import bisect
import enum
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_go_float

from keepwarm import __version__
from keepwarm.classify import MISS_CAUSES, RESULTS, Result
from keepwarm.config import Pair
from keepwarm.ping import ERROR_TYPES
from keepwarm.policy import SKIP_REASONS
from keepwarm.pricing import COST_KINDS

PerPair = Literal["standard", "full"]
PER_PAIR_MODES: tuple[PerPair, ...] = ("standard", "full")
# What a production request can be: an error never reaches the observations.
PRODUCTION_RESULTS = tuple(r for r in RESULTS if r != Result.ERROR.value)
REJECT_REASONS = ("malformed", "unknown_pair", "unauthorized", "too_large", "misdirected")
_WRITE_KIND = {"5m": "cache_write_5m", "1h": "cache_write_1h"}
_PAIR = ("expert", "model")
# Pings take tens of milliseconds to many seconds (retries, slow API).
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# prometheus_client's own float formatting, so `exposition()` matches `generate_latest` byte for byte.
_go_float = cast(Callable[[float], str], _untyped_go_float)
# Big enough that a scrape of 10,000 pairs is a few hundred writes, small enough to stay cheap.
_CHUNK_CHARS = 256 * 1024


class PairStateValue(enum.IntEnum):
    """The values of `keepwarm_pair_state`: what an alert reads of one pair, at scrape time.

    When several hold, the first in this order wins: parked, failing, uncached, cold,
    rewarmed, warm; pending only before the first ping.
    """

    PENDING = 0  # not pinged yet, and configured for less than one TTL
    WARM = 1  # the cache entry is alive and the last ping found it so
    COLD = 2  # the entry expired: nothing pinged it within its TTL (or ever, for a whole TTL)
    FAILING = 3  # the last ping failed after its retries
    UNCACHED = 4  # the last ping found nothing cacheable
    PARKED = 5  # the API rejected the request as invalid; not pinged until the config changes
    REWARMED = 6  # alive again, but the last ping found it gone: it expired between pings


# Misses that are no sign of trouble: the first write, and the write after a prompt change.
_EXPECTED_MISSES = frozenset({"cold_start", "prefix_changed"})


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


# How a family's series appear: from start-up, at the value's first non-zero value, or at the
# pair's first production observation; "ttl" is dense except the write kind of the other TTL,
# which stays sparse; "never" is not exported in that mode.
_Presence = Literal["dense", "sparse", "observed", "ttl", "never"]


@dataclass(frozen=True)
class _Family:
    """One per-pair metric family and where its values sit in a pair's array."""

    name: str  # as exposed; counters end in _total, histograms are the base name
    kind: str  # counter | gauge | histogram
    documentation: str
    offset: int
    label: str | None  # the third label, if any
    values: tuple[str, ...]  # its values; one unnamed slot when there is none
    standard: _Presence
    full: _Presence

    @property
    def width(self) -> int:
        """How many array slots the family uses for one pair."""
        if self.kind == "histogram":
            return len(_DURATION_BUCKETS) + 2  # a count per bucket, +Inf included, then the sum
        return len(self.values)

    @cached_property
    def slots(self) -> tuple[int, ...]:
        """Every slot index of the family's values."""
        return tuple(range(len(self.values)))

    def presence(self, mode: PerPair) -> _Presence:
        """How the family appears in `mode`."""
        return self.standard if mode == "standard" else self.full


_NONE = ("",)
_SPECS: list[tuple[str, str, str, str | None, tuple[str, ...], _Presence, _Presence]] = [
    ("keepwarm_pings_total", "counter", "Pings by final result.", "result", RESULTS, "dense", "dense"),
    ("keepwarm_cache_misses_total", "counter", "Pings that found the cache cold, by cause.", "cause", MISS_CAUSES,
     "sparse", "dense"),
    ("keepwarm_ping_errors_total", "counter", "Failed ping attempts by kind, retried ones included.",
     "error_type", ERROR_TYPES, "sparse", "dense"),
    ("keepwarm_tokens_total", "counter", "Tokens billed to pings, by kind.", "kind", COST_KINDS, "sparse", "dense"),
    ("keepwarm_cost_usd_total", "counter", "What pings cost, in USD, by kind.", "kind", COST_KINDS, "ttl", "dense"),
    ("keepwarm_unpriced_pings_total", "counter",
     "Pings whose cost is unknown because the model has no price in the table.", None, _NONE, "sparse", "dense"),
    ("keepwarm_missed_pings_total", "counter",
     "Scheduled ping slots skipped because the process fell more than an interval behind.", None, _NONE,
     "sparse", "dense"),
    ("keepwarm_pings_skipped_total", "counter", "Pings the policy chose not to send, by reason.", "reason",
     SKIP_REASONS, "sparse", "dense"),
    ("keepwarm_ping_duration_seconds", "histogram", "Time from a ping's first attempt to its final answer.",
     None, _NONE, "never", "dense"),
    ("keepwarm_last_ping_timestamp_seconds", "gauge", "When the pair was last pinged (0: never).", None, _NONE,
     "dense", "dense"),
    ("keepwarm_cache_expires_timestamp_seconds", "gauge",
     "When the pair's cache entry expires if nothing touches it again (0: unknown).", None, _NONE, "dense", "dense"),
    ("keepwarm_prefix_tokens", "gauge", "Tokens in the pair's cacheable prefix (0: not yet known).", None, _NONE,
     "dense", "dense"),
    ("keepwarm_miss_penalty_usd", "gauge",
     "Extra USD one production request pays when it finds this cache cold (NaN: no price).", None, _NONE,
     "dense", "dense"),
    ("keepwarm_ping_interval_seconds", "gauge", "The pair's configured ping interval.", None, _NONE,
     "never", "dense"),
    ("keepwarm_production_requests_total", "counter", "Observed production requests, by how they found the cache.",
     "result", PRODUCTION_RESULTS, "sparse", "observed"),
    ("keepwarm_production_tokens_total", "counter", "Tokens billed to observed production requests, by kind.",
     "kind", COST_KINDS, "sparse", "observed"),
    ("keepwarm_production_cost_usd_total", "counter", "What observed production requests cost, in USD, by kind.",
     "kind", COST_KINDS, "sparse", "observed"),
    ("keepwarm_saved_usd_total", "counter",
     "Miss penalties production requests did not pay because the keepalive kept the cache warm.", None, _NONE,
     "sparse", "observed"),
    ("keepwarm_prefix_drift_total", "counter",
     "Observed production requests whose prefix is not the one keepwarm warms.", None, _NONE, "sparse", "observed"),
]


def _group(family: _Family) -> int:
    """Where a family's slots sit in a pair's array: 0 what every mode keeps from the start,
    1 the production families (added at the pair's first observation), 2 what only `full` exports."""
    return 1 if family.full == "observed" else 2 if family.standard == "never" else 0


def _layout() -> tuple[_Family, ...]:
    """The families in exposition order, their slots laid out group by group (`_group`)."""
    families = [_Family(name, kind, doc, 0, label, values, standard, full)
                for name, kind, doc, label, values, standard, full in _SPECS]
    offsets, offset = {}, 0
    for family in sorted(families, key=_group):  # a stable sort: spec order within a group
        offsets[family.name] = offset
        offset += family.width
    return tuple(replace(family, offset=offsets[family.name]) for family in families)


_FAMILIES = _layout()
_BY_NAME = {f.name: f for f in _FAMILIES}
# A pair's array is as long as its mode needs: at 10,000 pairs every slot is 80 kB. Standard mode
# starts with the first group and adds the production slots at the pair's first observation;
# full mode has every slot from the start (it is meant for a few hundred pairs).
_CORE_WIDTH = sum(f.width for f in _FAMILIES if _group(f) == 0)
_OBSERVED_WIDTH = _CORE_WIDTH + sum(f.width for f in _FAMILIES if _group(f) == 1)
_WIDTH = sum(f.width for f in _FAMILIES)
_INTERVAL = _BY_NAME["keepwarm_ping_interval_seconds"]
_EXPIRES = _BY_NAME["keepwarm_cache_expires_timestamp_seconds"]
_DURATION = _BY_NAME["keepwarm_ping_duration_seconds"]
_LE = tuple(_go_float(b) for b in _DURATION_BUCKETS) + ("+Inf",)
_HIST_WIDTH = len(_DURATION_BUCKETS) + 2
_PRODUCTION = frozenset(f.name for f in _FAMILIES if f.full == "observed")
_PROD_REQUESTS = _BY_NAME["keepwarm_production_requests_total"]
_PROD_TOKENS = _BY_NAME["keepwarm_production_tokens_total"]
_PROD_COST = _BY_NAME["keepwarm_production_cost_usd_total"]
_SAVED = _BY_NAME["keepwarm_saved_usd_total"]
_DRIFT = _BY_NAME["keepwarm_prefix_drift_total"]
_SLOT = {f.name: {value: i for i, value in enumerate(f.values)} for f in _FAMILIES}
_STATE_HELP = (
    "What the pair's cache is now: 0 pending, 1 warm, 2 cold (expired unpinged), 3 failing (last ping failed),"
    " 4 uncached, 5 parked, 6 rewarmed (expired between pings)."
)
_INFO_HELP = "Configured pairs (=1), with where each cache lives: account and provider."
_MODEL_HELP = "Time from a ping's first attempt to its final answer, all pairs of a model together."


class _Series:
    """One pair's values. `configured` is False for a pair the runner touched without
    `add_pair` (`keepwarm once`): it gets no info or state series."""

    __slots__ = (
        "configured", "created", "expert", "info", "labels", "last_error", "last_miss", "last_result", "model",
        "observed",
        "ttl_seconds", "values", "write_kind",
    )

    def __init__(self, expert: str, model: str, created: float, width: int) -> None:
        self.labels = (expert, model)
        # Rendered once, used in every line, and one string for all pairs of an expert or a
        # model (interned strings go when their last user does).
        self.expert = sys.intern(f'expert="{_escape(expert)}"')
        self.model = sys.intern(f'model="{_escape(model)}"')
        self.values = array("d", bytes(8 * width))  # _CORE_WIDTH, _OBSERVED_WIDTH or _WIDTH slots
        self.info: tuple[str, str, str, str] | None = None  # (ttl, fingerprint, account, provider)
        self.configured = False
        self.observed = False  # a production observation arrived
        self.created = created
        self.ttl_seconds = 0.0
        self.write_kind: str | None = None  # the one cache-write kind the pair's TTL allows
        self.last_result: str | None = None
        self.last_error: str | None = None  # error_type of the last failed attempt
        self.last_miss: str | None = None  # cause of the last miss


class _Store:
    """The per-pair arrays; one lock serialises writers, readers take snapshots."""

    def __init__(self, mode: PerPair, clock: Callable[[], float]) -> None:
        self.lock = threading.Lock()
        self.mode = mode
        self.clock = clock
        self.pairs: dict[tuple[str, str], _Series] = {}
        self.models: dict[str, array[float]] = {}  # standard mode's per-model duration histogram

    def series(self, expert: str, model: str) -> _Series:
        found = self.pairs.get((expert, model))  # one dict read: safe without the lock
        if found is not None:
            return found
        with self.lock:
            width = _WIDTH if self.mode == "full" else _CORE_WIDTH
            return self.pairs.setdefault((expert, model), _Series(expert, model, self.clock(), width))

    def observed_slots(self, series: _Series) -> _Series:
        """`series`, its array extended with the production slots if it lacks them (in place:
        the cells already handed out keep pointing at it)."""
        if len(series.values) < _OBSERVED_WIDTH:
            with self.lock:
                missing = _OBSERVED_WIDTH - len(series.values)
                if missing > 0:
                    series.values.extend(array("d", bytes(8 * missing)))
        return series

    def model_histogram(self, model: str) -> array[float]:
        found = self.models.get(model)
        if found is not None:
            return found
        with self.lock:
            return self.models.setdefault(model, array("d", bytes(8 * _HIST_WIDTH)))

    def snapshot(self) -> tuple[list[_Series], list[tuple[str, array[float]]]]:
        with self.lock:
            return list(self.pairs.values()), sorted(self.models.items())


class _Cell:
    """One series of one pair: what `labels(...)` returns."""

    __slots__ = ("_index", "_kind", "_on_inc", "_store", "_values")

    def __init__(
        self,
        store: _Store,
        values: array[float],
        index: int,
        kind: str,
        on_inc: Callable[[], None] | None = None,
    ) -> None:
        self._store, self._values, self._index, self._kind, self._on_inc = store, values, index, kind, on_inc

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (counters refuse a negative one, as prometheus_client does)."""
        if self._kind == "counter" and amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._store.lock:
            self._values[self._index] += amount
            if self._on_inc is not None:
                self._on_inc()

    def set(self, value: float) -> None:
        """Set a gauge."""
        if self._kind != "gauge":
            raise AttributeError(f"a {self._kind} cannot be set")
        self._values[self._index] = float(value)

    def observe(self, amount: float) -> None:
        """Count one observation into a histogram."""
        if self._kind != "histogram":
            raise AttributeError(f"a {self._kind} cannot observe")
        bucket = bisect.bisect_left(_DURATION_BUCKETS, amount)
        with self._store.lock:
            self._values[self._index + bucket] += 1
            self._values[self._index + len(_DURATION_BUCKETS) + 1] += amount


class ProductionSeries:
    """One pair's production families as one handle (`Metrics.production`).

    A request of observations adds a handful of values to each pair it names; one `add` writes
    them all under one acquisition of the store's lock, instead of one `labels(...).inc()` each
    (a batch of 1,000 names hundreds of pairs). The values and what the exposition shows are
    those the `inc`s would have left.
    """

    __slots__ = ("_series", "_store")

    def __init__(self, store: _Store, series: _Series) -> None:
        self._store, self._series = store, series

    def add(
        self,
        requests: Mapping[str, int],
        tokens: Mapping[str, int],
        cost: Mapping[str, float],
        saved: float,
        drift: int,
    ) -> None:
        """Add to `keepwarm_production_requests_total` by result, `_tokens_total` and
        `_cost_usd_total` by kind, `keepwarm_saved_usd_total` and `keepwarm_prefix_drift_total`."""
        if min(saved, drift, *requests.values(), *tokens.values(), *cost.values(), 0) < 0:
            # As `_Cell.inc` (and prometheus_client) refuse it.
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        values = self._series.values
        with self._store.lock:
            for family, amounts in ((_PROD_REQUESTS, requests), (_PROD_TOKENS, tokens), (_PROD_COST, cost)):
                offset, slot = family.offset, _SLOT[family.name]
                for value, amount in amounts.items():
                    if amount:
                        values[offset + slot[value]] += amount
            values[_SAVED.offset] += saved
            values[_DRIFT.offset] += drift
            self._series.observed = True


class PairMetric:
    """A per-pair family with prometheus_client's `labels(expert, model[, extra])` face."""

    def __init__(self, store: _Store, family: _Family) -> None:
        self._store = store
        self._family = family
        self._slot = {value: i for i, value in enumerate(family.values)}

    def labels(self, expert: str, model: str, *extra: str) -> _Cell:
        """The series of one pair (created if the pair is new), as prometheus_client does."""
        family = self._family
        if len(extra) != (family.label is not None):
            raise ValueError(f"{family.name} takes labels expert, model{', ' + family.label if family.label else ''}")
        slot = self._slot.get(extra[0] if extra else "")
        if slot is None:
            raise ValueError(f"{family.name}: unknown {family.label} {extra[0]!r}; expected one of {family.values}")
        series = self._store.series(expert, model)
        if family.name in _PRODUCTION:
            self._store.observed_slots(series)
        if family is _DURATION and self._store.mode == "standard":
            return _Cell(self._store, self._store.model_histogram(model), 0, family.kind)
        return _Cell(self._store, series.values, family.offset + slot, family.kind, self._hook(series, extra))

    def _hook(self, series: _Series, extra: tuple[str, ...]) -> Callable[[], None] | None:
        """What an increment also records about the pair, for `keepwarm_pair_state`."""
        name = self._family.name
        if name == "keepwarm_pings_total":
            def result() -> None:
                series.last_result = extra[0]
            return result
        if name == "keepwarm_ping_errors_total":
            def error() -> None:
                series.last_error = extra[0]
            return error
        if name == "keepwarm_cache_misses_total":
            def miss() -> None:
                series.last_miss = extra[0]
            return miss
        if name in _PRODUCTION:
            def observed() -> None:
                series.observed = True
            return observed
        return None


def _state(series: _Series, now: float) -> PairStateValue:
    """`keepwarm_pair_state` of one pair: the runner parks a pair whose ping the API rejected
    as invalid, until its config changes (which replaces the series)."""
    last = series.last_result
    if last is None:
        return PairStateValue.PENDING if now - series.created < series.ttl_seconds else PairStateValue.COLD
    if last == Result.ERROR.value:
        return PairStateValue.PARKED if series.last_error == "invalid_request" else PairStateValue.FAILING
    if last == Result.UNCACHED.value:
        return PairStateValue.UNCACHED
    if series.values[_EXPIRES.offset] <= now:
        return PairStateValue.COLD
    if last in _REWRITES and series.last_miss not in _EXPECTED_MISSES:
        return PairStateValue.REWARMED
    return PairStateValue.WARM


_REWRITES = frozenset({Result.REWARMED.value, Result.PARTIAL.value})


def _visible(family: _Family, presence: _Presence, series: _Series) -> Iterable[int]:
    """The slots of `family` this pair exposes now (indexes into `family.values`)."""
    if family.offset >= len(series.values):  # a family the pair has no slots for yet: all zero
        return ()
    if presence == "dense":
        return () if family is _INTERVAL and not series.configured else family.slots
    if presence == "never":
        return ()
    if presence == "observed":
        return family.slots if series.observed else ()
    values, offset = series.values, family.offset
    if presence == "ttl":
        write = series.write_kind
        return [
            i for i, kind in enumerate(family.values)
            if kind == write or not kind.startswith("cache_write_") or values[offset + i] != 0
        ]
    if len(family.values) == 1:
        return family.slots if values[offset] != 0 else ()
    return [i for i in family.slots if values[offset + i] != 0]


class _PairCollector(Collector):
    """Exposes the per-pair arrays to a prometheus_client registry."""

    def __init__(self, store: _Store) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        """The family names, so the registry can refuse a duplicate."""
        return [_empty_family(f) for f in _FAMILIES] + [_empty_info(), _empty_state()]

    def collect(self) -> Iterable[Metric]:
        """Every per-pair family, each pair's values read once."""
        store = self._store
        pairs, models = store.snapshot()
        for family in _FAMILIES:
            if family is _DURATION and store.mode == "standard":
                hist = HistogramMetricFamily(family.name, _MODEL_HELP, labels=["model"])
                for model, values in models:
                    hist.add_metric([model], _buckets(values, 0), values[len(_LE)])
                yield hist
                continue
            out, presence = _empty_family(family), family.presence(store.mode)
            for series in pairs:
                for i in _visible(family, presence, series):
                    if isinstance(out, HistogramMetricFamily):
                        out.add_metric(list(series.labels), _buckets(series.values, family.offset),
                                       series.values[family.offset + len(_LE)])
                    else:
                        extra = family.values[i]
                        labels = [*series.labels, extra] if family.label else list(series.labels)
                        out.add_metric(labels, series.values[family.offset + i])
            yield out
        info, state, now = _empty_info(), _empty_state(), store.clock()
        for series in pairs:
            if series.info is not None:
                info.add_metric([*series.labels, *series.info], 1.0)
                state.add_metric(list(series.labels), float(_state(series, now)))
        yield info
        yield state


def _buckets(values: array[float], offset: int) -> list[tuple[str, float]]:
    counts, running = [], 0.0
    for i, le in enumerate(_LE):
        running += values[offset + i]
        counts.append((le, running))
    return counts


def _empty_family(family: _Family) -> CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily:
    labels = [*_PAIR, family.label] if family.label else list(_PAIR)
    if family.kind == "counter":
        return CounterMetricFamily(family.name, family.documentation, labels=labels)
    if family.kind == "histogram":
        return HistogramMetricFamily(family.name, family.documentation, labels=labels)
    return GaugeMetricFamily(family.name, family.documentation, labels=labels)


def _empty_info() -> GaugeMetricFamily:
    # account and provider: where the pair's cache lives; no other family carries them.
    return GaugeMetricFamily("keepwarm_pair_info", _INFO_HELP, labels=[*_PAIR, "ttl", "fingerprint", "account", "provider"])


def _empty_state() -> GaugeMetricFamily:
    return GaugeMetricFamily("keepwarm_pair_state", _STATE_HELP, labels=list(_PAIR))


class Metrics:
    """The metric objects, plus helpers that keep per-pair series complete."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        per_pair: PerPair = "standard",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if per_pair not in PER_PAIR_MODES:
            raise ValueError(f"metrics.per_pair must be one of {PER_PAIR_MODES}, not {per_pair!r}")
        self.per_pair = per_pair
        self.registry = registry if registry is not None else CollectorRegistry()
        self._store = _Store(per_pair, clock)
        self.registry.register(_PairCollector(self._store))
        pair = {f.name: PairMetric(self._store, f) for f in _FAMILIES}
        self.pings = pair["keepwarm_pings_total"]
        self.misses = pair["keepwarm_cache_misses_total"]
        self.errors = pair["keepwarm_ping_errors_total"]
        self.tokens = pair["keepwarm_tokens_total"]
        self.cost = pair["keepwarm_cost_usd_total"]
        self.unpriced = pair["keepwarm_unpriced_pings_total"]
        self.missed = pair["keepwarm_missed_pings_total"]
        self.skipped = pair["keepwarm_pings_skipped_total"]
        self.duration = pair["keepwarm_ping_duration_seconds"]
        self.last_ping = pair["keepwarm_last_ping_timestamp_seconds"]
        self.expires = pair["keepwarm_cache_expires_timestamp_seconds"]
        self.prefix_tokens = pair["keepwarm_prefix_tokens"]
        self.miss_penalty = pair["keepwarm_miss_penalty_usd"]
        self.interval = pair["keepwarm_ping_interval_seconds"]
        # Production observations (fed by the observations endpoint).
        self.production_requests = pair["keepwarm_production_requests_total"]
        self.production_tokens = pair["keepwarm_production_tokens_total"]
        self.production_cost = pair["keepwarm_production_cost_usd_total"]
        self.saved = pair["keepwarm_saved_usd_total"]
        self.drift = pair["keepwarm_prefix_drift_total"]

        # The few unlabelled metrics stay prometheus_client's own; they also sit in a registry
        # of their own, which `exposition()` renders after the per-pair families.
        self._plain = CollectorRegistry()
        self._budget_gauges: tuple[Gauge, Gauge] | None = None  # created by set_budget
        self._fleet: tuple[Gauge, Gauge, Counter, Counter, Gauge] | None = None  # created by set_fleet
        self._fleet_seen = [0, 0]  # the totals the fleet counters were last brought to
        self.lateness = Histogram(
            "keepwarm_ping_lateness_seconds",
            "How late each ping started against its scheduled time.",
            buckets=_LATENESS_BUCKETS,
            registry=None,
        )
        self.reload_ok = Gauge(
            "keepwarm_config_last_reload_successful", "1 if the last config (re)load succeeded.", registry=None
        )
        self.build_info = Gauge("keepwarm_build_info", "keepwarm's version (=1).", ["version"], registry=None)
        self.deferred = Counter(
            "keepwarm_pings_deferred",
            "Pings not sent because the API asked every pair to wait (429/529 retry-after, spend cap, bad key).",
            registry=None,
        )
        self.ledger_errors = Counter(
            "keepwarm_ledger_errors", "Ledger writes or opens that failed; pinging went on.", registry=None
        )
        self.observations_rejected = Counter(
            "keepwarm_observations_rejected",
            "Production observations refused, by reason.",
            ["reason"],
            registry=None,
        )
        # process_start_time_seconds and friends: how long the process has been up.
        process = ProcessCollector(registry=None)
        for metric in (self.lateness, self.reload_ok, self.build_info, self.deferred, self.ledger_errors,
                       self.observations_rejected, process):
            self.registry.register(metric)
            self._plain.register(metric)
        self.build_info.labels(__version__).set(1)
        self.reload_ok.set(1)
        for reason in REJECT_REASONS:  # five series in all, not per pair: there from the start
            self.observations_rejected.labels(reason)

    def set_fleet(self, members: int, owned: int, handovers: int, lease_failures: int, min_members: int = 1) -> None:
        """Export a fleet member's view (only a daemon in a fleet has these): live members, the
        pairs it owns, its counts of membership changes and failed lease renewals, and
        `fleet.min_members` (what KeepwarmFleetDegraded compares the members with)."""
        if self._fleet is None:
            self._fleet = (
                Gauge("keepwarm_fleet_members", "Live members of the fleet, as this member last saw them.", registry=None),
                Gauge("keepwarm_fleet_owned_pairs", "Pairs this member keeps warm (and exports).", registry=None),
                Counter("keepwarm_fleet_handovers", "Membership changes this member saw; each moves pairs.", registry=None),
                Counter("keepwarm_fleet_lease_failures", "Lease renewals that could not reach the store.", registry=None),
                Gauge("keepwarm_fleet_min_members", "The fewest live members the fleet should have (fleet.min_members).",
                      registry=None),
            )
            for metric in self._fleet:
                self.registry.register(metric)
                self._plain.register(metric)
        members_gauge, owned_gauge, handover_counter, failure_counter, minimum_gauge = self._fleet
        members_gauge.set(members)
        owned_gauge.set(owned)
        minimum_gauge.set(min_members)
        # The counters follow the membership's own totals.
        for i, (counter, total) in enumerate(((handover_counter, handovers), (failure_counter, lease_failures))):
            if total > self._fleet_seen[i]:
                counter.inc(total - self._fleet_seen[i])
                self._fleet_seen[i] = total

    def set_budget(self, cap: float, spent: float) -> None:
        """Export `budget.usd_per_day` and the trailing-24 h spend; only a daemon with a budget has them."""
        gauges = self._budget_gauges
        if gauges is None:
            gauges = (
                Gauge("keepwarm_budget_usd_per_day", "The cap on the keepalive's own spend over the"
                      " trailing 24 h (budget.usd_per_day).", registry=None),
                Gauge("keepwarm_budget_spent_usd", "What the keepalive's pings cost over the trailing 24 h,"
                      " all pairs.", registry=None),
            )
            for gauge in gauges:
                self.registry.register(gauge)
                self._plain.register(gauge)
            self._budget_gauges = gauges
        gauges[0].set(cap)
        gauges[1].set(spent)

    def drop_budget(self) -> None:
        """Remove the budget gauges (a reload removed `budget.usd_per_day`)."""
        gauges, self._budget_gauges = self._budget_gauges, None
        for gauge in gauges or ():
            self.registry.unregister(gauge)
            self._plain.unregister(gauge)

    def production(self, expert: str, model: str) -> ProductionSeries:
        """A pair's production families as one handle, for the observations' per-request sums."""
        store = self._store
        return ProductionSeries(store, store.observed_slots(store.series(expert, model)))

    def kept_production(self, expert: str, model: str) -> ProductionSeries | None:
        """A configured pair's production families (`production`), or None for a pair this
        daemon does not export now: a fleet member counts only the pairs it keeps, and must
        not bring back the series of one it has just lost."""
        store = self._store
        series = store.pairs.get((expert, model))
        if series is None or not series.configured:
            return None
        return ProductionSeries(store, store.observed_slots(series))

    def add_pair(self, pair: Pair) -> None:
        """Create a configured pair's series, or update its info and interval in place."""
        series = self._store.series(pair.expert, pair.model)
        with self._store.lock:
            if len(series.values) > _INTERVAL.offset:  # exported (and given a slot) in full mode only
                series.values[_INTERVAL.offset] = pair.interval
            series.info = (pair.ttl, pair.fingerprint, pair.account, pair.provider)
            series.ttl_seconds = pair.ttl_seconds
            series.write_kind = _WRITE_KIND.get(pair.ttl)
            series.configured = True

    def remove_pair(self, pair: Pair) -> None:
        """Drop every series of a pair (after a reload removed or changed it)."""
        store = self._store
        with store.lock:
            store.pairs.pop((pair.expert, pair.model), None)
            if all(model != pair.model for _, model in store.pairs):
                store.models.pop(pair.model, None)

    def exposition(self) -> Iterator[bytes]:
        """The Prometheus text format (what `generate_latest` gives), in chunks.

        Written straight from the arrays, a scrape of 10,000 pairs takes a fraction of a second
        and never holds the whole page in memory, if the caller writes chunks as they come.
        """
        store = self._store
        mode = store.mode
        pairs, models = store.snapshot()
        parts: list[str] = []
        size = 0
        for family in _FAMILIES:
            if family is _DURATION and mode == "standard":
                parts.append(_model_histogram_lines(models))
                continue
            parts.append(f"# HELP {family.name} {family.documentation}\n# TYPE {family.name} {family.kind}\n")
            presence = family.presence(mode)
            if presence == "never":
                continue
            for series in pairs:
                text = _pair_lines(family, series, _visible(family, presence, series))
                parts.append(text)
                size += len(text)
                if size >= _CHUNK_CHARS:
                    yield "".join(parts).encode("utf-8")
                    parts, size = [], 0
        now = store.clock()
        # Written pair by pair into the same chunks: a whole family of 10,000 lines joined at
        # once would lift the scrape's peak memory by a few copies of it.
        for head, line in ((_INFO_HEAD, _info_line), (_STATE_HEAD, _state_line)):
            parts.append(head)
            for series in pairs:
                if series.info is None:
                    continue
                text = line(series, now)
                parts.append(text)
                size += len(text)
                if size >= _CHUNK_CHARS:
                    yield "".join(parts).encode("utf-8")
                    parts, size = [], 0
        yield "".join(parts).encode("utf-8")
        yield generate_latest(self._plain)


def _fmt(value: float) -> str:
    return "0.0" if value == 0.0 and str(value) == "0.0" else _go_float(value)


def _labels(series: _Series, name: str | None = None, value: str = "") -> str:
    """The label set in the sorted order prometheus_client writes, so the bytes match.

    `value` comes from keepwarm's own constants (results, kinds, bucket bounds): no escaping.
    """
    if name is None:
        return f"{series.expert},{series.model}"
    if name < "expert":
        return f'{name}="{value}",{series.expert},{series.model}'
    if name < "model":
        return f'{series.expert},{name}="{value}",{series.model}'
    return f'{series.expert},{series.model},{name}="{value}"'


def _pair_lines(family: _Family, series: _Series, slots: Iterable[int]) -> str:
    if not slots:
        return ""
    values, offset, name = series.values, family.offset, family.name
    if family.kind == "histogram":
        lines, running = [], 0.0
        for i, le in enumerate(_LE):
            running += values[offset + i]
            lines.append(f"{name}_bucket{{{_labels(series, 'le', le)}}} {_fmt(running)}\n")
        plain = _labels(series)
        lines.append(f"{name}_count{{{plain}}} {_fmt(running)}\n")
        lines.append(f"{name}_sum{{{plain}}} {_fmt(values[offset + len(_LE)])}\n")
        return "".join(lines)
    if family.label is None:
        return f"{name}{{{_labels(series)}}} {_fmt(values[offset])}\n"
    label, extras = family.label, family.values
    return "".join(f"{name}{{{_labels(series, label, extras[i])}}} {_fmt(values[offset + i])}\n" for i in slots)


def _model_histogram_lines(models: list[tuple[str, array[float]]]) -> str:
    name = _DURATION.name
    lines = [f"# HELP {name} {_MODEL_HELP}\n# TYPE {name} histogram\n"]
    for model, values in models:
        label = f'model="{_escape(model)}"'
        running = 0.0
        for i, le in enumerate(_LE):
            running += values[i]
            lines.append(f'{name}_bucket{{le="{le}",{label}}} {_fmt(running)}\n')
        lines.append(f"{name}_count{{{label}}} {_fmt(running)}\n")
        lines.append(f"{name}_sum{{{label}}} {_fmt(values[len(_LE)])}\n")
    return "".join(lines)


_INFO_HEAD = f"# HELP keepwarm_pair_info {_INFO_HELP}\n# TYPE keepwarm_pair_info gauge\n"
_STATE_HEAD = f"# HELP keepwarm_pair_state {_STATE_HELP}\n# TYPE keepwarm_pair_state gauge\n"


def _info_line(series: _Series, now: float) -> str:
    assert series.info is not None
    ttl, fingerprint, account, provider = series.info
    labels = (
        f'account="{_escape(account)}",{series.expert},fingerprint="{_escape(fingerprint)}",{series.model},'
        f'provider="{_escape(provider)}",ttl="{_escape(ttl)}"'
    )
    return f"keepwarm_pair_info{{{labels}}} 1.0\n"


def _state_line(series: _Series, now: float) -> str:
    return f"keepwarm_pair_state{{{series.expert},{series.model}}} {_fmt(float(_state(series, now)))}\n"
