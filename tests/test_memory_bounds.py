"""What the daemon keeps per pair stays bounded however long it runs.

At 10,000 pairs a few objects a pair per ping add up within hours: the scheduler once kept
every touch (a week of pings is 2,520 a pair) and every ping latency, and the status page's
hourly sums a week of buckets for every pair. These feed the pieces their real inputs for
days of simulated time and check both the bound and that nothing a decision needs was lost.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from conftest import basic_doc

from keepwarm.adaptive import AdaptivePolicy
from keepwarm.classify import Result
from keepwarm.config import Config, Pair, parse_config
from keepwarm.metrics import Metrics
from keepwarm.observations import ALL, BUCKET, Observer
from keepwarm.ping import PingAttempt, make_client
from keepwarm.policy import FixedPolicy, Source, Touch
from keepwarm.runner import PingOutcome, Runner
from keepwarm.scheduler import PING_LOG, Scheduler

T0 = 1_800_000_000.0
KEY = "analyst/claude-sonnet-4-6"
INTERVAL = 240.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, **defaults: Any) -> Config:
    return parse_config(basic_doc("http://127.0.0.1:9", **defaults), tmp_path)


def _scheduler(config: Config, clock: Clock) -> Scheduler:
    metrics = Metrics()
    runner = Runner(make_client("http://127.0.0.1:9", "sk-test", 5), config.prices, metrics, threading.Event(),
                    clock=clock)
    scheduler = Scheduler(runner, metrics, clock=clock, draw=lambda: 0.0, mono=clock, prices=config.prices)
    scheduler.apply([_pair(config)])
    return scheduler


def _pair(config: Config) -> Pair:
    return next(p for p in config.pairs if p.key == KEY)


def _ping(scheduler: Scheduler, at: float, result: Result = Result.WARM) -> None:
    """One finished ping, as the scheduler's job hands it over (no HTTP: only what is kept counts)."""
    state = scheduler.states[KEY]
    attempt = PingAttempt(at, 0.4, None, None)
    scheduler._record_ping(KEY, state, PingOutcome(state.pair, result, at, 0.4, (attempt,), None, None, at + 300))


def _rebuilt_decides_alike(scheduler: Scheduler, now: float) -> None:
    live = scheduler.policies[KEY].next_ping(now, 0.5)
    scheduler._new_policy(scheduler.states[KEY])  # what a reload or a measured prefix size does
    assert scheduler.policies[KEY].next_ping(now, 0.5) == live


def test_a_fixed_pair_keeps_two_touches_and_no_latencies_after_a_week(tmp_path: Path) -> None:
    clock = Clock()
    scheduler = _scheduler(_config(tmp_path), clock)
    assert isinstance(scheduler.policies[KEY], FixedPolicy)
    week = int(7 * 86400 / INTERVAL)
    for i in range(week):
        at = T0 + i * INTERVAL
        if i % 10 == 0:
            scheduler.touch(KEY, Touch(at + 30, Source.PRODUCTION, Result.WARM, prefix_tokens=3000))
        _ping(scheduler, at, Result.ERROR if i % 7 == 0 else Result.WARM)
    assert len(scheduler._touches[KEY]) <= 2  # the latest ping, the latest refreshing request
    assert KEY not in scheduler._latencies
    clock.now = T0 + week * INTERVAL
    _rebuilt_decides_alike(scheduler, clock.now)


def test_a_late_touch_does_not_push_out_the_latest_one(tmp_path: Path) -> None:
    clock = Clock()
    scheduler = _scheduler(_config(tmp_path), clock)
    _ping(scheduler, T0 + 1000)
    scheduler.touch(KEY, Touch(T0 + 1100, Source.PRODUCTION, Result.WARM))
    scheduler.touch(KEY, Touch(T0 + 500, Source.PRODUCTION, Result.WARM))  # a slow client's report
    clock.now = T0 + 1200
    _rebuilt_decides_alike(scheduler, clock.now)
    assert scheduler.policies[KEY].next_ping(clock.now, 0.0).at == T0 + 1100 + INTERVAL


def test_an_adaptive_pair_keeps_production_gaps_and_the_pings_of_the_idle_period(tmp_path: Path) -> None:
    clock = Clock()
    scheduler = _scheduler(_config(tmp_path, policy="adaptive"), clock)
    for i in range(200):  # production every ~7 minutes, a ping after each
        at = T0 + i * 400
        scheduler.touch(KEY, Touch(at, Source.PRODUCTION, Result.WARM, prefix_tokens=3000))
        _ping(scheduler, at + 200)
    last = T0 + 199 * 400
    for i in range(PING_LOG // 2):  # an idle period: pings only
        _ping(scheduler, last + 250 + i * INTERVAL)
    clock.now = last + 250 + PING_LOG // 2 * INTERVAL
    policy = scheduler.policies[KEY]
    assert isinstance(policy, AdaptivePolicy)
    before = (len(policy.gaps), policy.pings_this_idle, policy.last_ping, policy.last_refresh)
    scheduler._new_policy(scheduler.states[KEY])
    rebuilt = scheduler.policies[KEY]
    assert isinstance(rebuilt, AdaptivePolicy)
    assert (len(rebuilt.gaps), rebuilt.pings_this_idle, rebuilt.last_ping, rebuilt.last_refresh) == before
    # A week of pings with no production: the log stops growing at PING_LOG pings.
    for i in range(2600):
        _ping(scheduler, clock.now + i * INTERVAL)
    assert len(scheduler._touches[KEY]) <= 200 + PING_LOG
    assert len(scheduler._latencies[KEY]) <= 200


def test_the_page_keeps_a_week_of_all_pairs_and_a_day_per_pair(tmp_path: Path) -> None:
    config = _config(tmp_path)
    clock = Clock()
    observer = Observer(config, Metrics(), clock=clock)
    pairs = list(config.pairs)
    hours = 10 * 24
    for h in range(hours):
        for pair in pairs:  # every pair pinged every hour, for ten days: spend only
            observer.ping(pair, T0 + h * BUCKET, Result.WARM, 0.001)
    assert set(observer.windows.buckets) == {ALL}  # no pair got hours of its own from pings
    assert len(observer.windows.buckets[ALL]) <= 7 * 24 + 1
    for h in range(48):  # production on one pair for two days
        clock.now = T0 + (hours - 48 + h) * BUCKET
        status, doc = observer.accept([{"expert": "analyst", "model": "claude-sonnet-4-6", "at": clock.now,
                                        "usage": {"input_tokens": 10, "cache_read_input_tokens": 3000}}])
        assert status == 202 and doc["accepted"] == 1
    assert len(observer.windows.buckets[KEY]) <= 25
    headline = observer.headline(clock.now + 1)
    week, day = headline["windows"]["7d"], headline["windows"]["24h"]
    assert round(week.keepalive_usd, 6) == round(7 * 24 * len(pairs) * 0.001, 6)  # whole hours in the window
    assert (day.requests, week.requests) == (24, 48)
    assert headline["pairs"][KEY].requests == 24
