"""The daemon side of the policies: the scheduler drives `make_policy` (adaptive, active hours,
the budget), counts every skip under its reason and replays the ledger's history at start."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import basic_doc

from keepwarm.adaptive import AdaptivePolicy
from keepwarm.classify import Result
from keepwarm.config import Config, Pair, parse_config
from keepwarm.emulator import Emulator
from keepwarm.metrics import Metrics
from keepwarm.ping import make_client
from keepwarm.policy import FixedPolicy, Source, Touch
from keepwarm.runner import Runner
from keepwarm.scheduler import Scheduler

T0 = 1_800_000_000.0  # a Friday, 08:00 UTC
KEY = "analyst/claude-sonnet-4-6"


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, base_url: str, top: dict[str, Any] | None = None, **defaults: Any) -> Config:
    doc = basic_doc(base_url, **defaults)
    doc.update(top or {})
    return parse_config(doc, tmp_path)


def _scheduler(emulator: Emulator, config: Config, clock: FakeClock, metrics: Metrics, **kw: Any) -> Scheduler:
    runner = Runner(make_client(emulator.base_url, "sk-test", 5), config.prices, metrics, threading.Event(),
                    clock=clock)
    return Scheduler(runner, metrics, clock=clock, draw=lambda: 0.0, mono=clock, prices=config.prices,
                     budget_usd_per_day=config.budget_usd_per_day, time_scale=config.time_scale, **kw)


def _pair(config: Config) -> Pair:
    return next(p for p in config.pairs if p.key == KEY)


def _skipped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "keepwarm_pings_skipped_total", {"expert": "analyst", "model": "claude-sonnet-4-6", "reason": reason})
    return value or 0.0


def _wake(scheduler: Scheduler, clock: FakeClock) -> float:
    """Run the pair's armed job at its time, as APScheduler would; return that time."""
    due = scheduler.states[KEY].next_due
    assert due, "a job is armed"
    clock.now = max(clock.now, due)
    scheduler._run(KEY, due)
    return due


def test_adaptive_pair_never_prewarms_keeps_warm_after_production_then_lapses_idle(
        emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="keepwarm.scheduler")
    clock, metrics = FakeClock(), Metrics()
    config = _config(tmp_path, emulator.base_url, policy="adaptive")
    scheduler = _scheduler(emulator, config, clock, metrics)
    pair = _pair(config)
    scheduler.apply([pair])
    _wake(scheduler, clock)
    assert emulator.log == [], "an adaptive pair with no production yet does not pre-warm"
    assert scheduler.states[KEY].next_due == 0.0

    # Production writes the cache (its usage tells the prefix size): that re-arms the pair.
    touched = clock.now + 30
    clock.now = touched
    scheduler.touch(KEY, Touch(touched, Source.PRODUCTION, Result.REWARMED, prefix_tokens=3000))
    policy = scheduler.policies[KEY]
    assert isinstance(policy, AdaptivePolicy)
    assert policy.miss_penalty == config.prices.miss_penalty(pair.model, 3000, pair.ttl)
    assert scheduler.states[KEY].next_due == pytest.approx(touched + policy.spacing)
    assert policy.spacing > pair.interval, "adaptive spaces pings closer to the TTL than the interval"

    # Ski rental (no history): it pings until one idle period's pings would cost one miss.
    pings = 0
    while scheduler.states[KEY].next_due:
        _wake(scheduler, clock)
        pings += 1
        assert pings < 50
    assert len(emulator.log) == pings >= 1
    assert _skipped(metrics, "idle") == 1, "the lapse is counted under reason idle"
    assert scheduler.describe(KEY, clock.now).startswith("letting lapse: idle ")
    rebuilt = scheduler.policies[KEY]
    assert isinstance(rebuilt, AdaptivePolicy)
    assert rebuilt.miss_penalty == config.prices.miss_penalty(pair.model, scheduler.states[KEY].prefix_tokens,
                                                            pair.ttl), "re-priced from the measured prefix"
    decisions = [r.__dict__["keepwarm_fields"] for r in caplog.records if r.getMessage() == "policy decision"]
    lapse = [d for d in decisions if d["decision"] == "lapse" and d["reason"] == "idle"]
    assert len(lapse) == 1 and lapse[0]["pair"] == KEY, decisions
    assert lapse[0]["idle_s"] == pytest.approx(clock.now - touched, abs=0.1)

    # Production comes back every 400 s (a gap a single ping bridges): a touch re-arms the lapsed
    # pair, and the ping is weighed when it comes due; it goes once the history says it pays.
    sent, t = len(emulator.log), clock.now
    for _ in range(6):
        t += 400
        clock.now = t
        scheduler.touch(KEY, Touch(t, Source.PRODUCTION, Result.REWARMED, prefix_tokens=3000))
        assert scheduler.states[KEY].next_due == pytest.approx(t + rebuilt.spacing)
        while scheduler.states[KEY].next_due and scheduler.states[KEY].next_due < t + 400:
            _wake(scheduler, clock)  # the job, before production's next request
    assert len(emulator.log) > sent, "bridging the 400 s gaps pays: it pings"


def test_fixed_without_observations_is_a_ping_every_interval(emulator: Emulator, tmp_path: Path) -> None:
    clock, metrics = FakeClock(), Metrics()
    config = _config(tmp_path, emulator.base_url, jitter="0s")
    scheduler = _scheduler(emulator, config, clock, metrics)
    pair = _pair(config)
    scheduler.apply([pair])
    times = [_wake(scheduler, clock) for _ in range(4)]
    assert isinstance(scheduler.policies[KEY], FixedPolicy)
    assert [b - a for a, b in zip(times, times[1:])] == pytest.approx([pair.interval] * 3)
    assert len(emulator.log) == 4


def test_outside_active_hours_the_ping_is_skipped_as_outside_hours(emulator: Emulator, tmp_path: Path) -> None:
    clock, metrics = FakeClock(), Metrics()
    # T0 is Friday 08:00 UTC; the hours start at 09:00, so the first wake is outside them.
    config = _config(tmp_path, emulator.base_url, active_hours="mon-fri 09:00-17:00 UTC")
    scheduler = _scheduler(emulator, config, clock, metrics)
    scheduler.apply([_pair(config)])
    _wake(scheduler, clock)
    assert emulator.log == []
    assert _skipped(metrics, "outside_hours") == 1
    assert scheduler.states[KEY].next_due == T0 + 3600, "re-armed at the start of the hours"
    _wake(scheduler, clock)
    assert len(emulator.log) == 1


def test_budget_stops_pings_loudly_and_exports_the_cap(emulator: Emulator, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    clock, metrics = FakeClock(), Metrics()
    config = _config(tmp_path, emulator.base_url, {"budget": {"usd_per_day": 0.02}}, jitter="0s")
    scheduler = _scheduler(emulator, config, clock, metrics)
    assert metrics.registry.get_sample_value("keepwarm_budget_usd_per_day") == 0.02
    scheduler.apply([_pair(config)])
    for _ in range(60):
        _wake(scheduler, clock)
        if _skipped(metrics, "budget"):
            break
    spent = metrics.registry.get_sample_value("keepwarm_budget_spent_usd")
    assert spent is not None and spent >= 0.02, "pings stop once the trailing-24 h spend reaches the cap"
    assert _skipped(metrics, "budget") == 1
    sent = len(emulator.log)
    assert sent >= 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "BUDGET:" in r.getMessage()]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "BUDGET:" in r.getMessage()]
    assert len(errors) == 1, "one ERROR when the cap is reached"
    assert len(warnings) <= 1, "at most one warning per crossing"
    # Asked again within the day, it still refuses and logs nothing new.
    scheduler.check_budget()
    assert len([r for r in caplog.records if "BUDGET:" in r.getMessage()]) == len(warnings) + len(errors)
    due = scheduler.states[KEY].next_due
    assert due > clock.now, "re-armed for when old spend rolls out"
    # A day later the spend has rolled out: the gauge falls and the pair pings again.
    _wake(scheduler, clock)
    assert len(emulator.log) == sent + 1
    after = metrics.registry.get_sample_value("keepwarm_budget_spent_usd")
    assert after is not None and after < 0.02


def test_without_a_budget_there_is_no_budget_series(emulator: Emulator, tmp_path: Path) -> None:
    clock, metrics = FakeClock(), Metrics()
    config = _config(tmp_path, emulator.base_url)
    _scheduler(emulator, config, clock, metrics).apply([_pair(config)])
    assert metrics.registry.get_sample_value("keepwarm_budget_usd_per_day") is None


def test_a_reload_changes_adds_and_removes_the_budget(emulator: Emulator, tmp_path: Path) -> None:
    clock, metrics = FakeClock(), Metrics()
    config = _config(tmp_path, emulator.base_url)
    scheduler = _scheduler(emulator, config, clock, metrics)
    scheduler.apply([_pair(config)])
    _wake(scheduler, clock)
    scheduler.set_budget(3.0)
    assert metrics.registry.get_sample_value("keepwarm_budget_usd_per_day") == 3.0
    assert scheduler.budget is not None and scheduler.policies[KEY].budget is scheduler.budget  # type: ignore[attr-defined]
    scheduler.set_budget(4.0)
    assert metrics.registry.get_sample_value("keepwarm_budget_usd_per_day") == 4.0
    scheduler.set_budget(None)
    assert metrics.registry.get_sample_value("keepwarm_budget_usd_per_day") is None
    assert isinstance(scheduler.policies[KEY], FixedPolicy)


# --- history survives restarts --------------------------------------------------------------------


def test_a_restart_replays_the_ledgers_pings_and_observations_into_the_policy(
        emulator: Emulator, tmp_path: Path) -> None:
    from keepwarm.daemon import store_resume
    from keepwarm.observations import Observer
    from keepwarm.store import Ledger

    clock, metrics = FakeClock(), Metrics()
    config = _config(tmp_path, emulator.base_url, policy="adaptive")
    pair = _pair(config)
    ledger = Ledger(tmp_path / "ledger.db", clock=clock)
    observer = Observer(config, metrics, clock=clock, ledger=lambda: ledger)
    runner = Runner(make_client(emulator.base_url, "sk-test", 5), config.prices, metrics, threading.Event(),
                    clock=clock, ledger=ledger)
    first = Scheduler(runner, metrics, clock=clock, draw=lambda: 0.0, mono=clock, prices=config.prices)
    observer.touch = first.touch
    first.apply([pair])
    # Production every 400 s (a gap one ping bridges); the daemon keeps the cache warm between.
    arrivals = [T0 + 400 * i for i in range(8)]
    for at in arrivals:
        while (due := first.states[KEY].next_due) and due < at:  # the wakes before this request
            clock.now = max(clock.now, due)
            first._run(KEY, due)
        clock.now = at
        usage = {"input_tokens": 10, "cache_read_input_tokens": 3000, "cache_creation_input_tokens": 0,
                 "output_tokens": 5}
        assert observer.accept([{"expert": pair.expert, "model": pair.model, "at": at, "usage": usage}])[0] == 202
    before = first.policies[KEY]
    assert isinstance(before, AdaptivePolicy) and len(before.gaps) == len(arrivals) - 1
    pings = len(emulator.log)
    assert pings >= 1
    ledger.close()

    # A new process: its scheduler reads the ledger back and carries on where the last left off.
    clock.now = arrivals[-1] + 100
    ledger = Ledger(tmp_path / "ledger.db", clock=clock)
    resume = store_resume(ledger, clock)
    touches = resume([pair])[KEY].touches
    assert sorted(at for at, source, _, _ in touches if source == "production") == arrivals
    assert len([at for at, source, _, _ in touches if source == "ping"]) == pings
    metrics2 = Metrics()
    runner2 = Runner(make_client(emulator.base_url, "sk-test", 5), config.prices, metrics2, threading.Event(),
                     clock=clock)
    second = Scheduler(runner2, metrics2, clock=clock, draw=lambda: 0.0, mono=clock, prices=config.prices,
                       resume=resume)
    second.apply([pair])
    after = second.policies[KEY]
    assert isinstance(after, AdaptivePolicy)
    assert sorted(after.gaps.values) == sorted(before.gaps.values), "the idle-gap history survived"
    assert after.last_production == arrivals[-1]
    assert after.miss_penalty == before.miss_penalty, "priced from the ledger's prefix size"
    # Its first ping is where the policy puts it (a spacing after the last touch), not at a phase.
    decision = after.next_ping(clock.now, 0.0)
    assert decision.at is not None
    assert second.states[KEY].next_due == pytest.approx(max(decision.at, clock.now), abs=10.0)
    assert len(emulator.log) == pings, "nothing sent at start"
    # A pair whose prefix changed since is a new cache: none of the old history applies.
    changed = _config(tmp_path, emulator.base_url, policy="adaptive", max_tokens=1)
    assert not resume([p for p in changed.pairs if p.fingerprint != pair.fingerprint])
    ledger.close()


def test_a_rebuild_counts_each_gap_once_in_the_shared_prior(emulator: Emulator, tmp_path: Path) -> None:
    clock, metrics = FakeClock(), Metrics()
    config = _config(tmp_path, emulator.base_url, policy="adaptive")
    scheduler = _scheduler(emulator, config, clock, metrics)
    scheduler.apply([_pair(config)])
    for i in range(4):
        scheduler.touch(KEY, Touch(T0 + 400 * i, Source.PRODUCTION, Result.REWARMED, prefix_tokens=3000))
    assert len(scheduler.prior) == 3
    scheduler._new_policy(scheduler.states[KEY])  # as a new prefix size or a reload does
    assert len(scheduler.prior) == 3
    policy = scheduler.policies[KEY]
    assert isinstance(policy, AdaptivePolicy) and policy.prior is scheduler.prior and len(policy.gaps) == 3
