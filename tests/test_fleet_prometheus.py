"""A fleet's production money, counted once: each pair's series on its owner only.

First the counting itself, two members' observers on one real PostgreSQL; then a real
Prometheus scraping three `keepwarm run` members through a kill and a takeover.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import basic_doc

from keepwarm.config import Config, parse_config
from keepwarm.fleetcount import ProductionFeed
from keepwarm.metrics import Metrics
from keepwarm.observations import Observer
from keepwarm.store.postgres import PostgresLedger

T0 = 1_800_000_000.0
USAGE = {"input_tokens": 10, "cache_read_input_tokens": 1500, "cache_creation_input_tokens": 0, "output_tokens": 5}
COLD = {"input_tokens": 10, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 1500, "output_tokens": 5}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _series(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    """Every production sample a member exports: (family, expert, model, label) -> value, summed over the label."""
    out: dict[tuple[str, str, str], float] = {}
    for family in metrics.registry.collect():
        if family.name.startswith("keepwarm_production_") or family.name in ("keepwarm_saved_usd", "keepwarm_prefix_drift"):
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, sample.labels["expert"], sample.labels["model"])
                out[key] = out.get(key, 0.0) + sample.value
    return out


class Member:
    """One member's observer, metrics and feed, over its own connection to the shared database."""

    def __init__(self, url: str, config: Config, clock: Clock, owned: set[str]) -> None:
        self.ledger = PostgresLedger(url, clock=clock)
        self.metrics = Metrics(clock=clock)
        self.observer = Observer(config, self.metrics, ledger=lambda: self.ledger, clock=clock)
        self.observer.fleet_history = self.ledger.last_requests
        self.observer.counted_by_owner = True
        self.feed = ProductionFeed(self.ledger)
        self.feed.start()
        self.config = config
        self.owned: set[str] = set()
        self.own(owned)

    def own(self, keys: set[str]) -> None:
        """Take and give up pairs as the scheduler's `apply` does with their series."""
        for pair in self.config.pairs:
            if pair.key in keys and pair.key not in self.owned:
                self.metrics.add_pair(pair)
            elif pair.key not in keys and pair.key in self.owned:
                self.metrics.remove_pair(pair)
        self.owned = set(keys)

    def poll(self) -> int:
        return self.observer.count_stored(self.feed.read(), lambda key: key in self.owned)


def test_each_pair_s_production_series_are_its_owner_s_whoever_received_the_observation(
    postgres_url: str, tmp_path: Path
) -> None:
    clock = Clock()
    config = parse_config(basic_doc("http://127.0.0.1:9"), tmp_path)
    keys = sorted(p.key for p in config.pairs)
    assert len(keys) >= 2
    x, y = keys[0], keys[1]
    a = Member(postgres_url, config, clock, {x})
    b = Member(postgres_url, config, clock, set(keys) - {x})
    try:
        posts = 0
        for member, key, usage in [(a, y, USAGE), (b, x, USAGE), (a, x, COLD), (b, y, USAGE), (a, y, USAGE),
                                   (b, x, USAGE)]:
            expert, model = key.split("/")
            clock.now += 400.0  # more than the 5m TTL after the pair's previous request: a read is a saving
            status, _ = member.observer.accept([{"expert": expert, "model": model, "at": clock.now - 1, "usage": usage}])
            assert status == 202
            posts += 1
        # Nothing is counted where it was received: the receiver leaves it to the owner.
        assert _series(a.metrics) == {} and _series(b.metrics) == {}
        assert a.poll() + b.poll() == posts
        assert a.poll() + b.poll() == 0, "each row counted once, though the next read covers it again"

        exported_a = {(e, m) for _, e, m in _series(a.metrics)}
        exported_b = {(e, m) for _, e, m in _series(b.metrics)}
        assert exported_a == {tuple(x.split("/"))} and exported_b == {tuple(y.split("/"))}

        rows = a.ledger.observations()
        assert len(rows) == posts
        _check_totals([a, b], rows)

        # A handover: x moves from a to b. a drops its series (the pings' do so too), b starts
        # counting x from the next row, whichever member received it.
        a.own(set())
        b.own(set(keys))
        expert, model = x.split("/")
        clock.now += 400.0
        for member in (a, b):
            clock.now += 1.0
            assert member.observer.accept([{"expert": expert, "model": model, "at": clock.now - 1, "usage": USAGE}])[0] == 202
        assert a.poll() == 0 and b.poll() == 2
        assert _series(a.metrics) == {}
        assert b.metrics.registry.get_sample_value(
            "keepwarm_production_requests_total", {"expert": expert, "model": model, "result": "warm"}) == 2
    finally:
        a.ledger.close()
        b.ledger.close()


def _check_totals(members: list[Member], rows: list[Any]) -> None:
    """The sums over members are the ledger's: requests exactly, money to float rounding."""
    totals: dict[str, float] = {}
    for member in members:
        for (name, _, _), value in _series(member.metrics).items():
            totals[name] = totals.get(name, 0.0) + value
    assert totals["keepwarm_production_requests_total"] == len(rows)
    saved = math.fsum(r.saved_usd or 0.0 for r in rows)
    assert saved > 0
    assert totals["keepwarm_saved_usd_total"] == pytest.approx(saved, rel=1e-12)
    cost = math.fsum(sum((r.costs or {}).values()) for r in rows)
    assert totals["keepwarm_production_cost_usd_total"] == pytest.approx(cost, rel=1e-12)


class Rows:
    """A store whose rows become visible out of id order, as concurrent commits do."""

    def __init__(self) -> None:
        self.visible: dict[int, tuple[Any, ...]] = {}

    def add(self, row_id: int, drift: str | None = None) -> None:
        self.visible[row_id] = (row_id, "e", "m", T0, "warm", 1, 2, 0, 0, 3, 0.1, 0.2, 0.0, 0.0, 0.3, 0.0, drift)

    def last_observation_id(self) -> int:
        return max(self.visible, default=0)

    def observations_after(self, after: int) -> list[tuple[Any, ...]]:
        return [row for i, row in sorted(self.visible.items()) if i > after]


def test_the_feed_hands_every_row_out_once_even_when_an_earlier_id_commits_later() -> None:
    from keepwarm.fleetcount import COMMIT_SLACK

    rows, mono = Rows(), Clock()
    rows.add(1)  # stored before this member started: its owner then counted it
    feed = ProductionFeed(rows, mono=mono)
    assert feed.start() and feed.read() == []
    rows.add(3)
    assert [r.id for r in feed.read()] == [3]
    rows.add(2, drift="fingerprint")  # its transaction took id 2 before 3 committed, and committed after
    mono.now += 1
    got = feed.read()
    assert [(r.id, r.drift, r.tokens["cache_read"], r.cost) for r in got] == [
        (2, True, 2, {"input": 0.1, "cache_read": 0.2, "cache_write_5m": 0.0, "cache_write_1h": 0.0, "output": 0.3})]
    mono.now += COMMIT_SLACK
    assert feed.read() == [] and feed.floor == 3, "ids read long enough ago are no longer re-read"
    assert feed._seen == set(), "nor remembered"


def test_the_feed_waits_out_an_unreachable_store() -> None:
    class Down(Rows):
        up = False

        def observations_after(self, after: int) -> list[tuple[Any, ...]]:
            if not self.up:
                raise OSError("connection refused")
            return super().observations_after(after)

        def last_observation_id(self) -> int:
            if not self.up:
                raise OSError("connection refused")
            return super().last_observation_id()

    rows = Down()
    feed = ProductionFeed(rows)
    assert not feed.start() and feed.read() == [] and feed.failures == 2
    rows.up = True
    rows.add(1)
    assert feed.read() == [], "started once the store is back: what it held then was counted before"
    rows.add(2)
    rows.up = False
    assert feed.read() == []
    rows.up = True
    assert [r.id for r in feed.read()] == [2]
