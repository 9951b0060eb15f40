"""A pair's array holds only the slots its mode exports; the page is the same byte for byte.

Standard mode gives a pair the production slots at its first observation and no slots for what
only `full` exports (the per-pair histogram, the interval). The golden pages in tests/data were
written by the layout before that change (every slot for every pair, commit cbe4632) from the
scenario below: a mix of pairs, some observed, some failing, one removed, one never configured.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keepwarm.config import parse_config
from keepwarm.metrics import PER_PAIR_MODES, Metrics

DATA = Path(__file__).parent / "data"
PROMPT = "You are a careful analyst of shipping rates. " * 200


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def scenario(mode: str) -> Metrics:
    """Every kind of write the runner, the scheduler and the observations make, on six pairs."""
    doc = {
        "defaults": {"models": ["claude-sonnet-4-6", "claude-haiku-4-5"]},
        "experts": [
            {"name": "analyst", "system": [{"text": PROMPT}]},
            {"name": "hourly", "system": [{"text": PROMPT + "hourly"}], "ttl": "1h", "models": ["claude-sonnet-4-6"]},
            {"name": "gone", "system": [{"text": PROMPT + "gone"}]},
            {"name": "odd.name-1", "system": [{"text": PROMPT + "odd"}], "models": ["claude-haiku-4-5"]},
        ],
    }
    pairs = {p.key: p for p in parse_config(doc, Path(".")).pairs}
    clock = Clock()
    metrics = Metrics(per_pair=mode, clock=clock)  # type: ignore[arg-type]
    for pair in pairs.values():
        metrics.add_pair(pair)
        metrics.prefix_tokens.labels(pair.expert, pair.model).set(2048)
        metrics.miss_penalty.labels(pair.expert, pair.model).set(0.0061)
    a, b = ("analyst", "claude-sonnet-4-6"), ("analyst", "claude-haiku-4-5")
    # Healthy pings, with their tokens, cost and durations.
    for n, (e, m) in enumerate((a, b, ("hourly", "claude-sonnet-4-6"))):
        for result in ("rewarmed", "warm", "warm"):
            metrics.pings.labels(e, m, result).inc()
        metrics.misses.labels(e, m, "cold_start").inc()
        for kind, tokens in (("input", 12), ("cache_read", 4096), ("output", 1)):
            metrics.tokens.labels(e, m, kind).inc(tokens)
            metrics.cost.labels(e, m, kind).inc(tokens * 3e-7)
        metrics.tokens.labels(e, m, "cache_write_1h" if e == "hourly" else "cache_write_5m").inc(2048)
        metrics.duration.labels(e, m).observe(0.4 + n)
        metrics.duration.labels(e, m).observe(0.07)
        metrics.last_ping.labels(e, m).set(clock.now - 30)
        metrics.expires.labels(e, m).set(clock.now + 270)
    # A failing pair, a skipped one, a missed slot, an unpriced ping.
    odd = ("odd.name-1", "claude-haiku-4-5")
    metrics.errors.labels(*odd, "rate_limit").inc(2)
    metrics.errors.labels(*odd, "timeout").inc()
    metrics.pings.labels(*odd, "error").inc()
    metrics.skipped.labels(*b, "production_touch").inc(3)
    metrics.missed.labels(*a).inc()
    metrics.unpriced.labels(*b).inc()
    # Production: one pair through the cells, one through the batched handle.
    metrics.production_requests.labels(*a, "warm").inc(5)
    metrics.production_tokens.labels(*a, "cache_read").inc(20480)
    metrics.production_cost.labels(*a, "cache_read").inc(0.006144)
    metrics.saved.labels(*a).inc(0.0123)
    metrics.production(*b).add({"warm": 2, "partial": 1}, {"input": 30, "cache_write_5m": 100},
                               {"input": 9e-5, "cache_write_5m": 3.75e-4}, 0.004, 1)
    # A pair removed by a reload (after its production), and one the runner touched unconfigured.
    metrics.production_requests.labels("gone", "claude-sonnet-4-6", "warm").inc()
    metrics.remove_pair(pairs["gone/claude-sonnet-4-6"])
    metrics.pings.labels('once"\\', "claude-sonnet-4-6", "warm").inc()  # quotes, escaped
    clock.now += 60
    return metrics


def page(metrics: Metrics) -> bytes:
    """The scrape, without what moves between two runs: the process's own CPU and memory, and the
    creation times prometheus_client gives its own (not per-pair) families."""
    moving = (b"process_", b"# HELP process_", b"# TYPE process_")
    lines = b"".join(metrics.exposition()).splitlines()
    return b"".join(line + b"\n" for line in lines if not line.startswith(moving) and b"_created" not in line)


@pytest.mark.parametrize("mode", PER_PAIR_MODES)
def test_the_page_is_the_one_the_old_layout_wrote(mode: str) -> None:
    assert page(scenario(mode)) == (DATA / f"metrics-mixed-{mode}.prom").read_bytes()


def test_standard_mode_gives_production_slots_only_to_observed_pairs() -> None:
    store = scenario("standard")._store
    widths = {key: len(series.values) for key, series in store.pairs.items()}
    core = widths[("hourly", "claude-sonnet-4-6")]
    assert widths[("analyst", "claude-sonnet-4-6")] == widths[("analyst", "claude-haiku-4-5")] > core
    assert widths[("odd.name-1", "claude-haiku-4-5")] == widths[('once"\\', "claude-sonnet-4-6")] == core
    assert set(scenario("full")._store.pairs) == set(store.pairs)
    assert {len(s.values) for s in scenario("full")._store.pairs.values()} == {max(widths.values()) + 15}


def test_late_production_slots_reach_cells_handed_out_before() -> None:
    metrics = Metrics(per_pair="standard")
    last_ping = metrics.last_ping.labels("analyst", "claude-sonnet-4-6")  # a cell on the short array
    metrics.production_requests.labels("analyst", "claude-sonnet-4-6", "warm").inc()  # the array grows
    last_ping.set(42.0)
    labels = {"expert": "analyst", "model": "claude-sonnet-4-6"}
    assert metrics.registry.get_sample_value("keepwarm_last_ping_timestamp_seconds", labels) == 42.0
    assert metrics.registry.get_sample_value("keepwarm_production_requests_total", {**labels, "result": "warm"}) == 1


def test_labels_are_one_string_per_expert_and_per_model() -> None:
    store = scenario("standard")._store
    s1, s2 = store.pairs[("analyst", "claude-sonnet-4-6")], store.pairs[("analyst", "claude-haiku-4-5")]
    s3 = store.pairs[("hourly", "claude-sonnet-4-6")]
    assert s1.expert is s2.expert and s1.model is s3.model
