"""Every Prometheus metric keepwarm exports, defined in one place (SPEC §5).

Metrics are built against an injectable registry so each test gets a fresh one. Every
configured pair's series exist from start-up at 0, so a dashboard or alert never has to
guess whether a missing series means "zero" or "not configured".

A pair has 57 series, so 10,000 pairs have 570,000. prometheus_client keeps one object, with
its own lock, per series: at 47 series a pair it took 240 MB and 11 s to create those of
10,000 pairs, and 23 s to scrape them (docs/performance.md). So the per-pair series live here in
one flat array per pair, behind handles with prometheus_client's `labels(...).inc()` face, and
are read by a collector (for `generate_latest` and `get_sample_value`) or streamed by
`exposition()`, which writes the same bytes as `generate_latest` in a tenth of the time.
"""

from __future__ import annotations

import bisect
import threading
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import cast

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
from keepwarm.classify import MISS_CAUSES, RESULTS
from keepwarm.config import Pair
from keepwarm.ping import ERROR_TYPES
from keepwarm.pricing import COST_KINDS

_PAIR = ("expert", "model")
# Pings take tens of milliseconds to many seconds (retries, slow API).
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# prometheus_client's own float formatting, so `exposition()` matches `generate_latest` byte for byte.
_go_float = cast(Callable[[float], str], _untyped_go_float)
# Big enough that a scrape of 10,000 pairs is a few hundred writes, small enough to stay cheap.
_CHUNK_CHARS = 256 * 1024


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


@dataclass(frozen=True)
class _Family:
    """One per-pair metric family and where its values sit in a pair's array."""

    name: str  # as exposed; counters end in _total, histograms are the base name
    kind: str  # counter | gauge | histogram
    documentation: str
    offset: int
    label: str | None = None  # the third label, if any
    values: tuple[str, ...] = ("",)  # its values; one unnamed slot when there is none

    @property
    def width(self) -> int:
        """How many array slots the family uses for one pair."""
        if self.kind == "histogram":
            return len(_DURATION_BUCKETS) + 2  # a count per bucket, +Inf included, then the sum
        return len(self.values)


def _layout() -> tuple[_Family, ...]:
    specs: list[tuple[str, str, str, str | None, tuple[str, ...]]] = [
        ("keepwarm_pings_total", "counter", "Pings by final result.", "result", RESULTS),
        ("keepwarm_cache_misses_total", "counter", "Pings that found the cache cold, by cause.", "cause", MISS_CAUSES),
        ("keepwarm_ping_errors_total", "counter", "Failed ping attempts by kind, retried ones included.",
         "error_type", ERROR_TYPES),
        ("keepwarm_tokens_total", "counter", "Tokens billed to pings, by kind.", "kind", COST_KINDS),
        ("keepwarm_cost_usd_total", "counter", "What pings cost, in USD, by kind.", "kind", COST_KINDS),
        ("keepwarm_unpriced_pings_total", "counter",
         "Pings whose cost is unknown because the model has no price in the table.", None, ("",)),
        ("keepwarm_missed_pings_total", "counter",
         "Scheduled ping slots skipped because the process fell more than an interval behind.", None, ("",)),
        ("keepwarm_ping_duration_seconds", "histogram", "Time from a ping's first attempt to its final answer.",
         None, ("",)),
        ("keepwarm_last_ping_timestamp_seconds", "gauge", "When the pair was last pinged (0: never).", None, ("",)),
        ("keepwarm_cache_expires_timestamp_seconds", "gauge",
         "When the pair's cache entry expires if nothing touches it again (0: unknown).", None, ("",)),
        ("keepwarm_prefix_tokens", "gauge", "Tokens in the pair's cacheable prefix (0: not yet known).", None, ("",)),
        ("keepwarm_miss_penalty_usd", "gauge",
         "Extra USD one production request pays when it finds this cache cold (NaN: no price).", None, ("",)),
        ("keepwarm_ping_interval_seconds", "gauge", "The pair's configured ping interval.", None, ("",)),
    ]
    families, offset = [], 0
    for name, kind, documentation, label, values in specs:
        family = _Family(name, kind, documentation, offset, label, values)
        families.append(family)
        offset += family.width
    return tuple(families)


_FAMILIES = _layout()
_BY_NAME = {f.name: f for f in _FAMILIES}
_WIDTH = sum(f.width for f in _FAMILIES)
_INTERVAL = _BY_NAME["keepwarm_ping_interval_seconds"]
_LE = tuple(_go_float(b) for b in _DURATION_BUCKETS) + ("+Inf",)


class _Series:
    """One pair's values. `configured` is False for a pair the runner touched without
    `add_pair` (`keepwarm once`, or a ping that finished after a reload removed its pair):
    such a pair gets no interval or info series, as prometheus_client would not create them."""

    __slots__ = ("configured", "expert", "info", "labels", "model", "values")

    def __init__(self, expert: str, model: str) -> None:
        self.labels = (expert, model)
        self.expert = f'expert="{_escape(expert)}"'  # rendered once, used in every line
        self.model = f'model="{_escape(model)}"'
        self.values = array("d", bytes(8 * _WIDTH))
        self.info: tuple[str, str] | None = None  # (ttl, fingerprint)
        self.configured = False


class _Store:
    """The per-pair arrays; one lock serialises writers, readers take snapshots."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pairs: dict[tuple[str, str], _Series] = {}

    def series(self, expert: str, model: str) -> _Series:
        found = self.pairs.get((expert, model))  # one dict read: safe without the lock
        if found is not None:
            return found
        with self.lock:
            return self.pairs.setdefault((expert, model), _Series(expert, model))

    def snapshot(self) -> list[_Series]:
        with self.lock:
            return list(self.pairs.values())


class _Cell:
    """One series of one pair: what `labels(...)` returns."""

    __slots__ = ("_index", "_kind", "_store", "_values")

    def __init__(self, store: _Store, values: array[float], index: int, kind: str) -> None:
        self._store, self._values, self._index, self._kind = store, values, index, kind

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount` (counters refuse a negative one, as prometheus_client does)."""
        if self._kind == "counter" and amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        with self._store.lock:
            self._values[self._index] += amount

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


class PairMetric:
    """A per-pair family with prometheus_client's `labels(expert, model[, extra])` face."""

    def __init__(self, store: _Store, family: _Family) -> None:
        self._store = store
        self._family = family
        self._slot = {value: i for i, value in enumerate(family.values)}

    def labels(self, expert: str, model: str, *extra: str) -> _Cell:
        """The series of one pair (created at 0 if the pair is new), as prometheus_client does."""
        family = self._family
        if len(extra) != (family.label is not None):
            raise ValueError(f"{family.name} takes labels expert, model{', ' + family.label if family.label else ''}")
        slot = self._slot.get(extra[0] if extra else "")
        if slot is None:
            raise ValueError(f"{family.name}: unknown {family.label} {extra[0]!r}; expected one of {family.values}")
        series = self._store.series(expert, model)
        return _Cell(self._store, series.values, family.offset + slot, family.kind)


class _PairCollector(Collector):
    """Exposes the per-pair arrays to a prometheus_client registry."""

    def __init__(self, store: _Store) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        """The family names, so the registry can refuse a duplicate."""
        return [_empty_family(f) for f in _FAMILIES] + [_empty_info()]

    def collect(self) -> Iterable[Metric]:
        """Every per-pair family, each pair's values read once."""
        pairs = self._store.snapshot()
        for family in _FAMILIES:
            out = _empty_family(family)
            for series in pairs:
                if family is _INTERVAL and not series.configured:
                    continue
                values = series.values
                if isinstance(out, HistogramMetricFamily):
                    counts, running = [], 0.0
                    for i, le in enumerate(_LE):
                        running += values[family.offset + i]
                        counts.append((le, running))
                    out.add_metric(list(series.labels), counts, values[family.offset + len(_LE)])
                else:
                    for i, extra in enumerate(family.values):
                        labels = [*series.labels, extra] if family.label else list(series.labels)
                        out.add_metric(labels, values[family.offset + i])
            yield out
        info = _empty_info()
        for series in pairs:
            if series.info is not None:
                info.add_metric([*series.labels, *series.info], 1.0)
        yield info


def _empty_family(family: _Family) -> CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily:
    labels = [*_PAIR, family.label] if family.label else list(_PAIR)
    if family.kind == "counter":
        return CounterMetricFamily(family.name, family.documentation, labels=labels)
    if family.kind == "histogram":
        return HistogramMetricFamily(family.name, family.documentation, labels=labels)
    return GaugeMetricFamily(family.name, family.documentation, labels=labels)


def _empty_info() -> GaugeMetricFamily:
    return GaugeMetricFamily("keepwarm_pair_info", "Configured pairs (=1).", labels=[*_PAIR, "ttl", "fingerprint"])


class Metrics:
    """The metric objects, plus helpers that keep per-pair series complete."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._store = _Store()
        self.registry.register(_PairCollector(self._store))
        pair = {f.name: PairMetric(self._store, f) for f in _FAMILIES}
        self.pings = pair["keepwarm_pings_total"]
        self.misses = pair["keepwarm_cache_misses_total"]
        self.errors = pair["keepwarm_ping_errors_total"]
        self.tokens = pair["keepwarm_tokens_total"]
        self.cost = pair["keepwarm_cost_usd_total"]
        self.unpriced = pair["keepwarm_unpriced_pings_total"]
        self.missed = pair["keepwarm_missed_pings_total"]
        self.duration = pair["keepwarm_ping_duration_seconds"]
        self.last_ping = pair["keepwarm_last_ping_timestamp_seconds"]
        self.expires = pair["keepwarm_cache_expires_timestamp_seconds"]
        self.prefix_tokens = pair["keepwarm_prefix_tokens"]
        self.miss_penalty = pair["keepwarm_miss_penalty_usd"]
        self.interval = pair["keepwarm_ping_interval_seconds"]

        # The few unlabelled metrics stay prometheus_client's own; they also sit in a registry
        # of their own, which `exposition()` renders after the per-pair families.
        self._plain = CollectorRegistry()
        self._budget_gauges: tuple[Gauge, Gauge] | None = None  # created by set_budget
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
        # Production observations (SPEC §8) and skipped pings (§9): plain prometheus_client
        # families until the per-pair store carries them (placeholder for the metrics branch).
        self.production_requests = Counter(
            "keepwarm_production_requests", "Observed production requests by result.",
            [*_PAIR, "result"], registry=None,
        )
        self.production_tokens = Counter(
            "keepwarm_production_tokens", "Tokens billed to observed production requests, by kind.",
            [*_PAIR, "kind"], registry=None,
        )
        self.production_cost = Counter(
            "keepwarm_production_cost_usd", "What observed production requests cost, in USD, by kind.",
            [*_PAIR, "kind"], registry=None,
        )
        self.saved = Counter(
            "keepwarm_saved_usd", "Miss penalties the keepalive avoided for production, in USD.", list(_PAIR),
            registry=None,
        )
        self.drift = Counter(
            "keepwarm_prefix_drift", "Production requests whose prefix is not the one keepwarm warms.",
            list(_PAIR), registry=None,
        )
        self.skipped = Counter(
            "keepwarm_pings_skipped", "Pings not sent because the policy said they were not needed, by reason.",
            [*_PAIR, "reason"], registry=None,
        )
        self.observations_rejected = Counter(
            "keepwarm_observations_rejected", "Observations refused, by reason.", ["reason"], registry=None,
        )
        self._production = (self.production_requests, self.production_tokens, self.production_cost,
                            self.saved, self.drift, self.skipped)
        # process_start_time_seconds and friends: the stale-ping alert measures a pair that
        # has never pinged from the process's start.
        process = ProcessCollector(registry=None)
        for metric in (self.lateness, self.reload_ok, self.build_info, self.deferred, self.ledger_errors,
                       *self._production, self.observations_rejected, process):
            self.registry.register(metric)
            self._plain.register(metric)
        self.build_info.labels(__version__).set(1)
        self.reload_ok.set(1)

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

    def add_pair(self, pair: Pair) -> None:
        """Create every series of a pair at 0."""
        series = self._store.series(pair.expert, pair.model)
        with self._store.lock:
            series.values[_INTERVAL.offset] = pair.interval
            series.info = (pair.ttl, pair.fingerprint)
            series.configured = True

    def remove_pair(self, pair: Pair) -> None:
        """Drop every series of a pair (after a reload removed or changed it)."""
        with self._store.lock:
            self._store.pairs.pop((pair.expert, pair.model), None)
        for family in self._production:
            # prometheus_client removes one label set at a time; drop every one of this pair.
            for labels in [k for k in family._metrics if k[:2] == (pair.expert, pair.model)]:
                family.remove(*labels)

    def exposition(self) -> Iterator[bytes]:
        """The Prometheus text format (what `generate_latest` gives), in chunks.

        Written straight from the arrays, a scrape of 10,000 pairs takes a fraction of a second
        and never holds the whole 45 MB page in memory, if the caller writes chunks as they come.
        """
        pairs = self._store.snapshot()
        parts: list[str] = []
        size = 0
        for family in _FAMILIES:
            parts.append(f"# HELP {family.name} {family.documentation}\n# TYPE {family.name} {family.kind}\n")
            for series in pairs:
                if family is _INTERVAL and not series.configured:
                    continue
                text = _pair_lines(family, series)
                parts.append(text)
                size += len(text)
                if size >= _CHUNK_CHARS:
                    yield "".join(parts).encode("utf-8")
                    parts, size = [], 0
        parts.append(_info_lines(pairs))
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


def _pair_lines(family: _Family, series: _Series) -> str:
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
    label = family.label
    return "".join(
        f"{name}{{{_labels(series, label, extra)}}} {_fmt(values[offset + i])}\n"
        for i, extra in enumerate(family.values)
    )


def _info_lines(pairs: list[_Series]) -> str:
    lines = ["# HELP keepwarm_pair_info Configured pairs (=1).\n# TYPE keepwarm_pair_info gauge\n"]
    for series in pairs:
        if series.info is not None:
            ttl, fingerprint = series.info
            labels = f'{series.expert},fingerprint="{_escape(fingerprint)}",{series.model},ttl="{_escape(ttl)}"'
            lines.append(f"keepwarm_pair_info{{{labels}}} 1.0\n")
    return "".join(lines)
