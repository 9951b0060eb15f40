"""The shared gate: all pairs wait together when the API says so, and an optional rpm cap."""

from __future__ import annotations

import threading
from pathlib import Path

from conftest import LONG_PROMPT

from keepwarm.config import parse_config
from keepwarm.emulator import Emulator, Fault
from keepwarm.gate import SPEND_CAP_FIRST_BACKOFF, Gate
from keepwarm.metrics import Metrics
from keepwarm.ping import make_client
from keepwarm.runner import PairState, Runner
from keepwarm.scheduler import Scheduler


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_gate_spacing_holds_and_refusals() -> None:
    mono = Clock(100.0)
    gate = Gate(requests_per_minute=120, clock=mono)  # one start every 0.5 s
    assert [gate.reserve(200.0) for _ in range(3)] == [0.0, 0.5, 1.0]
    assert gate.reserve(100.9) is None, "the next slot (101.5) is past the latest acceptable start"
    gate.close_for(10, "rate_limit")
    gate.close_for(3, "overloaded")  # never shortens a hold
    assert gate.open_in() == 10 and gate.reason == "rate_limit"
    assert gate.reserve(105.0) is None and gate.reserve(120.0) == 10.0


def test_spend_cap_backoff_grows_and_resets() -> None:
    mono = Clock(0.0)
    gate = Gate(clock=mono)
    assert gate.spend_cap_hit() == SPEND_CAP_FIRST_BACKOFF
    assert gate.spend_cap_hit() == 2 * SPEND_CAP_FIRST_BACKOFF
    gate.succeeded()
    mono.now += 10_000
    assert gate.spend_cap_hit() == SPEND_CAP_FIRST_BACKOFF


def _setup(emulator: Emulator):  # type: ignore[no-untyped-def]
    doc = {
        "api": {"base_url": emulator.base_url},
        "defaults": {"models": ["claude-sonnet-4-6", "claude-opus-4-8"]},
        "experts": [{"name": "e", "system": [{"text": LONG_PROMPT}]}],
    }
    config = parse_config(doc, Path("."))
    mono = Clock(1000.0)
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        mono.now += seconds
        return False

    metrics = Metrics()
    for pair in config.pairs:
        metrics.add_pair(pair)
    runner = Runner(
        make_client(emulator.base_url, "sk-test-gate", 5), config.prices, metrics, threading.Event(),
        key_source="file /etc/keepwarm/key", wait=wait, gate=Gate(clock=mono),
    )
    states = [PairState(pair=p, max_tokens=1) for p in config.pairs]
    return runner, states, waits, metrics


def test_one_pairs_retry_after_makes_every_pair_wait(emulator: Emulator) -> None:
    runner, (a, b), waits, _ = _setup(emulator)
    emulator.inject(Fault(status=429, retry_after=3, model="claude-sonnet-4-6", count=None))
    outcome = runner.ping(a)
    assert outcome is not None and outcome.error is not None
    emulator.clear_faults()
    waits.clear()
    assert runner.gate.open_in() > 0
    outcome = runner.ping(b)
    assert outcome is not None and outcome.error is None
    assert waits and waits[0] > 0, "the other pair waited for the gate before sending"


def test_spend_cap_stops_every_pair_without_hammering(emulator: Emulator) -> None:
    runner, (a, b), _, metrics = _setup(emulator)
    emulator.inject(Fault(spend_cap=True, count=None))
    first = runner.ping(a)
    assert first is not None and len(first.attempts) == 1, "the spend cap is not retried"
    sent = len(emulator.log)
    assert runner.ping(b) is None, "deferred: not sent while the cap holds"
    assert len(emulator.log) == sent


def test_a_dead_key_holds_every_pair_for_an_interval(emulator: Emulator) -> None:
    runner, (a, b), _, _ = _setup(emulator)
    emulator.inject(Fault(status=401, count=None))
    runner.ping(a)
    assert runner.gate.open_in() == a.pair.interval
    assert runner.ping(b) is None


def test_a_deferred_ping_is_rearmed_when_the_gate_opens(emulator: Emulator) -> None:
    runner, (a, _b), _, metrics = _setup(emulator)
    wall = Clock(1_800_000_000.0)
    scheduler = Scheduler(runner, metrics, clock=wall, draw=lambda: 0.0)
    scheduler._aps.start(paused=True)
    scheduler.apply([a.pair])
    runner.gate.close_for(500, "spend cap")
    scheduler._run(a.pair.key, scheduler.states[a.pair.key].next_due)
    assert metrics.registry.get_sample_value("keepwarm_pings_deferred_total") == 1
    assert scheduler.states[a.pair.key].next_due == wall.now + 500
    assert not emulator.log
