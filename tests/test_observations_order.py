"""Savings are attributed in time order however the reports arrive (issue 21, item 4).

Production's requests to a pair form episodes: requests closer together than the TTL kept the
cache warm for one another. An episode's first request, if it read the cache, is the one the
keepalive spared a write. Reports arriving in any order, duplicated, in one batch or one by one,
must credit exactly the savings that arrival in time order credits.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import RecordedRows, basic_doc

from keepwarm.config import Config, parse_config
from keepwarm.metrics import Metrics
from keepwarm.observations import SETTLE, Observer, PairAttribution, saved_usd

T0 = 1_800_000_000.0
TTL = 300.0  # basic_doc's pairs are 5m
READ = 1500
# The reviewer's case, reads 250 s apart (one saving: A's), then a second episode (Y's) more than
# a TTL later, and a request that wrote instead of reading opening a third (no saving).
EVENTS = {"A": (0.0, READ), "B": (250.0, READ), "X": (500.0, READ), "Y": (900.0, READ), "W": (1300.0, 0),
          "Z": (1400.0, READ)}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path) -> Config:
    return parse_config(basic_doc("http://127.0.0.1:9"), tmp_path)


def _item(name: str) -> dict[str, Any]:
    offset, read = EVENTS[name]
    return {"expert": "analyst", "model": "claude-sonnet-4-6", "at": T0 + offset, "request_id": f"req_{name}",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": read,
                      "cache_creation_input_tokens": 0 if read else 1500, "output_tokens": 5}}


def _expected() -> set[str]:
    """The episodes' first requests that read, straight from the definition."""
    credited, previous = set(), None
    for name, (offset, read) in sorted(EVENTS.items(), key=lambda e: e[1][0]):
        if read and (previous is None or offset - previous >= TTL):
            credited.add(name)
        previous = offset
    return credited


class World:
    def __init__(self, tmp_path: Path, now: float) -> None:
        self.config = _config(tmp_path)
        self.clock = Clock(now)
        self.rows = RecordedRows()
        self.metrics = Metrics()
        self.observer = Observer(self.config, self.metrics, clock=self.clock, ledger=lambda: self.rows, settle=SETTLE)

    def saved_usd(self) -> float:
        labels = {"expert": "analyst", "model": "claude-sonnet-4-6"}
        return self.metrics.registry.get_sample_value("keepwarm_saved_usd_total", labels) or 0.0

    def credited(self) -> set[str]:
        return {r.observation.request_id[4:] for r in self.rows.rows if r.saved}


def test_the_definition_gives_the_savings_the_test_expects() -> None:
    assert _expected() == {"A", "Y"}, "the W write opens an episode but saves nothing; Z follows it by 100 s"


@pytest.mark.parametrize("order", ["".join(p) for p in itertools.permutations("ABXYWZ")][::7] + ["ABXYWZ", "AXB"])
def test_any_order_of_reports_credits_what_time_order_credits(tmp_path: Path, order: str) -> None:
    world = World(tmp_path, T0 + 1400 + 1)
    names = list(order) + [n for n in EVENTS if n not in order]
    for name in names:  # one request each, as separate clients send them
        assert world.observer.accept([_item(name)])[0] == 202
        world.clock.now += 1
    assert world.saved_usd() == 0, "nothing credited while an earlier report may still come"
    world.clock.now += SETTLE
    world.observer.settle()
    assert world.credited() == _expected()
    per_saving = saved_usd(world.config.prices, world.config.pairs[0], READ)
    assert per_saving is not None
    assert world.saved_usd() == pytest.approx(len(_expected()) * per_saving, rel=1e-12)
    assert len(world.rows.rows) == len(EVENTS), "every accepted report has its ledger row"


def test_reports_arriving_as_the_requests_happen_credit_the_same(tmp_path: Path) -> None:
    world = World(tmp_path, T0)
    for name, (offset, _) in sorted(EVENTS.items(), key=lambda e: e[1][0]):
        world.clock.now = T0 + offset + 1
        world.observer.accept([_item(name)])
    world.clock.now += SETTLE
    world.observer.settle()
    assert world.credited() == _expected()


def test_shuffled_batches_with_duplicates_credit_the_same(tmp_path: Path) -> None:
    rng = random.Random(21)
    for _ in range(30):
        world = World(tmp_path, T0 + 1400 + 1)
        reports = [_item(n) for n in EVENTS] + [_item(rng.choice(list(EVENTS))) for _ in range(3)]
        rng.shuffle(reports)
        cut = sorted(rng.sample(range(1, len(reports)), 2))
        for batch in (reports[:cut[0]], reports[cut[0]:cut[1]], reports[cut[1]:]):
            world.observer.accept(batch)
            world.clock.now += rng.uniform(0, SETTLE / 4)
        world.clock.now += SETTLE
        world.observer.settle()
        assert world.credited() == _expected()
        assert len(world.rows.rows) == len(EVENTS), "a copy is counted once, and its saving once"


def test_a_saving_waits_only_its_settling_time_then_is_written_with_its_row(tmp_path: Path) -> None:
    world = World(tmp_path, T0 + 600)
    world.observer.accept([_item("A")])
    assert world.rows.rows == [], "the row says saved or not: it waits with the saving"
    world.clock.now += SETTLE - 0.5
    world.observer.accept([_item("B")])  # not a saving: its row goes at once
    assert [r.observation.request_id for r in world.rows.rows] == ["req_B"]
    world.clock.now += 1
    world.observer.accept([_item("X")])  # any request settles what is due
    assert world.credited() == {"A"}


def test_a_report_later_than_the_settling_time_takes_no_saving_and_withdraws_none(tmp_path: Path) -> None:
    world = World(tmp_path, T0 + 501)
    world.observer.accept([_item("X")])  # X first: as far as is known, it opens an episode
    world.clock.now += SETTLE + 1
    world.observer.settle()
    assert world.credited() == {"X"}
    # B (250 s before X) arrives after X's saving was credited: the episode's one saving is
    # counted already (under X's name); B takes none, nor does A, 250 s before B: one episode.
    world.observer.accept([_item("B")])
    world.observer.accept([_item("A")])
    world.clock.now += SETTLE + 1
    world.observer.settle()
    assert world.credited() == {"X"}, "A preceded B within the TTL: the episode whose saving X holds"
    assert len(world.rows.rows) == 3


def test_held_savings_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import keepwarm.observations as module

    monkeypatch.setattr(module, "MAX_HELD", 3)
    world = World(tmp_path, T0 + 100_000)
    for i in range(6):  # each a TTL apart: six episodes, six savings waiting
        world.observer.accept([{**_item("A"), "at": T0 + i * 1000, "request_id": f"req_{i}"}])
    assert len(world.observer._held) == 3, "the oldest beyond the bound were settled early"
    world.observer.settle(everything=True)
    assert len(world.credited()) == 6


def test_without_a_settling_time_each_request_is_judged_when_it_arrives(tmp_path: Path) -> None:
    world = World(tmp_path, T0 + 1400 + 1)
    world.observer = Observer(world.config, world.metrics, clock=world.clock, ledger=lambda: world.rows)
    world.observer.accept([_item(n) for n in "XAB"])  # one batch: judged in time order
    assert world.credited() == {"A"} and len(world.rows.rows) == 3, "written at once"
    world.observer.accept([_item("Y")])
    assert world.credited() == {"A", "Y"}


def test_the_pure_attribution_keeps_a_bounded_window() -> None:
    a = PairAttribution("f" * 64, ttl=TTL)
    from keepwarm.observations import _PRODUCTION_WINDOW, Usage

    for i in range(1000):
        a.production(T0 + i, Usage(cache_read=READ), None)
    assert len(a.times) == _PRODUCTION_WINDOW and len(a.heads) <= 1


def test_a_fleet_member_judges_at_arrival_so_its_rows_and_touches_reach_the_others_at_once(tmp_path: Path) -> None:
    world = World(tmp_path, T0 + 1400 + 1)
    world.observer.fleet_history = lambda pairs: {}
    world.observer.accept([_item("A")])
    assert world.credited() == {"A"} and len(world.rows.rows) == 1, "stored at once: the owner polls the store"


def test_a_daemon_stopped_while_a_saving_waits_credits_it_and_keeps_its_row(tmp_path: Path) -> None:
    import json as _json
    import time
    import urllib.request

    from conftest import DaemonProcess, basic_doc, daemon_env, free_port, write_config

    from keepwarm.store import read_observations

    port = free_port()
    doc = basic_doc(interval="3s", jitter="0s")
    doc["metrics"] = {"listen": f"127.0.0.1:{port}"}
    doc["ledger"] = {"path": "ledger.db"}
    daemon = DaemonProcess(write_config(tmp_path, doc), port, daemon_env(), ("--emulator",))
    try:
        daemon.wait_for("keepwarm started", lambda: daemon.started)
        item = {**_item("A"), "at": time.time() - 1}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/observations", data=_json.dumps(item).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 202
        assert daemon.stop()[0] == 0, "stopped well within the 10 s the saving waits"
    finally:
        if daemon.alive:
            daemon.proc.kill()
    rows = read_observations(tmp_path / "ledger.db")
    assert [(r.request_id, r.saved) for r in rows] == [("req_A", 1)], "settled at shutdown, before the ledger closed"
