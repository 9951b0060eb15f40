"""Every Prometheus metric keepwarm exports, defined in one place (SPEC §5).

Metrics are built against an injectable registry so each test gets a fresh one. Every
configured pair's series exist from start-up at 0, so a dashboard or alert never has to
guess whether a missing series means "zero" or "not configured".
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from keepwarm import __version__
from keepwarm.classify import Result
from keepwarm.config import Pair
from keepwarm.ping import ERROR_TYPES
from keepwarm.pricing import COST_KINDS

RESULTS = tuple(r.value for r in Result)
_PAIR = ("expert", "model")
# Pings take tens of milliseconds to many seconds (retries, slow API).
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LATENESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The metric objects, plus helpers that keep per-pair series complete."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.pings = Counter("keepwarm_pings", "Pings by final result.", [*_PAIR, "result"], registry=r)
        self.errors = Counter(
            "keepwarm_ping_errors",
            "Failed ping attempts by kind, retried ones included.",
            [*_PAIR, "error_type"],
            registry=r,
        )
        self.tokens = Counter("keepwarm_tokens", "Tokens billed to pings, by kind.", [*_PAIR, "kind"], registry=r)
        self.cost = Counter("keepwarm_cost_usd", "What pings cost, in USD, by kind.", [*_PAIR, "kind"], registry=r)
        self.unpriced = Counter(
            "keepwarm_unpriced_pings",
            "Pings whose cost is unknown because the model has no price in the table.",
            _PAIR,
            registry=r,
        )
        self.missed = Counter(
            "keepwarm_missed_pings",
            "Scheduled ping slots skipped because the process fell more than an interval behind.",
            _PAIR,
            registry=r,
        )
        self.duration = Histogram(
            "keepwarm_ping_duration_seconds",
            "Time from a ping's first attempt to its final answer.",
            _PAIR,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.lateness = Histogram(
            "keepwarm_ping_lateness_seconds",
            "How late each ping started against its scheduled time.",
            buckets=_LATENESS_BUCKETS,
            registry=r,
        )
        self.last_ping = Gauge(
            "keepwarm_last_ping_timestamp_seconds", "When the pair was last pinged (0: never).", _PAIR, registry=r
        )
        self.expires = Gauge(
            "keepwarm_cache_expires_timestamp_seconds",
            "When the pair's cache entry expires if nothing touches it again (0: unknown).",
            _PAIR,
            registry=r,
        )
        self.prefix_tokens = Gauge(
            "keepwarm_prefix_tokens", "Tokens in the pair's cacheable prefix (0: not yet known).", _PAIR, registry=r
        )
        self.miss_penalty = Gauge(
            "keepwarm_miss_penalty_usd",
            "Extra USD one production request pays when it finds this cache cold (NaN: no price).",
            _PAIR,
            registry=r,
        )
        self.interval = Gauge(
            "keepwarm_ping_interval_seconds", "The pair's configured ping interval.", _PAIR, registry=r
        )
        self.pair_info = Gauge(
            "keepwarm_pair_info", "Configured pairs (=1).", [*_PAIR, "ttl", "fingerprint"], registry=r
        )
        self.reload_ok = Gauge(
            "keepwarm_config_last_reload_successful", "1 if the last config (re)load succeeded.", registry=r
        )
        self.build_info = Gauge("keepwarm_build_info", "keepwarm's version (=1).", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.reload_ok.set(1)

    def add_pair(self, pair: Pair) -> None:
        """Create every series of a pair at 0."""
        labels = (pair.expert, pair.model)
        for result in RESULTS:
            self.pings.labels(*labels, result)
        for error_type in ERROR_TYPES:
            self.errors.labels(*labels, error_type)
        for kind in COST_KINDS:
            self.tokens.labels(*labels, kind)
            self.cost.labels(*labels, kind)
        for metric in (self.unpriced, self.missed, self.duration, self.last_ping, self.expires):
            metric.labels(*labels)
        for metric in (self.prefix_tokens, self.miss_penalty):
            metric.labels(*labels)
        self.interval.labels(*labels).set(pair.interval)
        self.pair_info.labels(*labels, pair.ttl, pair.fingerprint).set(1)

    def remove_pair(self, pair: Pair) -> None:
        """Drop every series of a pair (after a reload removed or changed it)."""
        labels = (pair.expert, pair.model)
        labelled: tuple[tuple[Counter, tuple[str, ...]], ...] = (
            (self.pings, RESULTS),
            (self.errors, ERROR_TYPES),
            (self.tokens, COST_KINDS),
            (self.cost, COST_KINDS),
        )
        for metric, extra in labelled:
            for value in extra:
                _remove(metric, *labels, value)
        plain: tuple[Counter | Gauge | Histogram, ...] = (
            self.unpriced,
            self.missed,
            self.duration,
            self.last_ping,
            self.expires,
            self.prefix_tokens,
            self.miss_penalty,
            self.interval,
        )
        for one in plain:
            _remove(one, *labels)
        _remove(self.pair_info, *labels, pair.ttl, pair.fingerprint)


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass  # never created: nothing to remove
