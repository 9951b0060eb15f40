"""The runner (retries, recording) and the scheduler (policy, diffs), against the real emulator."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import LONG_PROMPT, basic_doc

from keepwarm.classify import Result
from keepwarm.config import parse_config
from keepwarm.emulator import Emulator, Fault
from keepwarm.gate import Gate
from keepwarm.metrics import RESULTS, Metrics
from keepwarm.ping import ERROR_TYPES, PingError, make_client
from keepwarm.pricing import COST_KINDS
from keepwarm.runner import MAX_ATTEMPTS, PairState, Runner, retry_delay
from keepwarm.scheduler import CATCH_UP_SPREAD, Scheduler, missed_slots, next_ping_at, phase


class FakeClock:
    """Wall time that moves only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _config(base_url: str, **defaults):  # type: ignore[no-untyped-def]
    return parse_config(basic_doc(base_url, **defaults), Path("."))


def _runner(emulator: Emulator, metrics: Metrics, clock: FakeClock | None = None, waits: list | None = None) -> Runner:
    config = _config(emulator.base_url)
    waited = waits if waits is not None else []
    mono = FakeClock(1000.0)  # the gate's monotonic clock, moved by the waits below

    def wait(seconds: float) -> bool:
        waited.append(seconds)
        mono.now += seconds
        return False

    return Runner(
        make_client(emulator.base_url, "sk-test-runner", 5),
        config.prices,
        metrics,
        threading.Event(),
        key_source="test",
        clock=clock or FakeClock(),
        wait=wait,
        gate=Gate(clock=mono),
    )


def _one_pair(
    emulator: Emulator, clock: FakeClock | None = None, waits: list[float] | None = None, **defaults: object
) -> tuple[Metrics, Runner, PairState]:
    """Metrics, a runner on the emulator, and the state of the first configured pair (series at 0)."""
    metrics = Metrics()
    runner = _runner(emulator, metrics, clock, waits)
    pair = _config(emulator.base_url, **defaults).pairs[0]
    metrics.add_pair(pair)
    return metrics, runner, PairState(pair=pair, max_tokens=pair.max_tokens)


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# --- the pure policy ---------------------------------------------------------------------------


def test_phase_is_stable_and_spreads_pairs_over_the_interval() -> None:
    assert phase("a/m", 240) == phase("a/m", 240)
    phases = [phase(f"expert-{i}/claude-sonnet-4-6", 240) for i in range(2000)]
    assert all(0 <= p < 240 for p in phases)
    buckets = [0] * 8
    for p in phases:
        buckets[int(p // 30)] += 1
    assert min(buckets) > 0.8 * 250 and max(buckets) < 1.2 * 250, buckets


@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999999])
def test_next_ping_gap_lies_within_interval_and_interval_plus_jitter(draw: float) -> None:
    gap = next_ping_at(1000.0, 240, 10, draw) - 1000.0
    assert 240 <= gap < 250


def test_missed_slots() -> None:
    assert missed_slots(100.0, 100.5, 240) == 0
    assert missed_slots(100.0, 100 + 3 * 240 + 1, 240) == 3


def test_retry_delay_honours_retry_after_but_not_past_expiry() -> None:
    err = PingError("rate_limit", "slow down", 429, retry_after=20)
    assert retry_delay(err, 1, now=0, deadline=60) == 20
    assert retry_delay(err, 1, now=0, deadline=15) is None, "a retry after expiry keeps nothing warm"
    backoff = PingError("overloaded", "busy", 529)
    assert [retry_delay(backoff, n, 0, 1e9) for n in (1, 2, 3)] == [1, 2, 4]
    assert retry_delay(backoff, MAX_ATTEMPTS, 0, 1e9) is None
    assert retry_delay(PingError("rate_limit", "cap", 429, spend_cap=True), 1, 0, 1e9) is None
    for kind in ("authentication", "permission", "invalid_request", "other"):
        assert retry_delay(PingError(kind, "no"), 1, 0, 1e9) is None


# --- the runner ------------------------------------------------------------------------------


def test_metrics_start_with_every_series_at_zero() -> None:
    metrics = Metrics(per_pair="full")  # standard mode's sparse families: tests/test_metrics.py
    pair = _config("http://unused").pairs[0]
    metrics.add_pair(pair)
    labels = {"expert": pair.expert, "model": pair.model}
    for result in RESULTS:
        assert _value(metrics, "keepwarm_pings_total", **labels, result=result) == 0
    for error_type in ERROR_TYPES:
        assert _value(metrics, "keepwarm_ping_errors_total", **labels, error_type=error_type) == 0
    for kind in COST_KINDS:
        assert _value(metrics, "keepwarm_tokens_total", **labels, kind=kind) == 0
        assert _value(metrics, "keepwarm_cost_usd_total", **labels, kind=kind) == 0
    for gauge in (
        "keepwarm_last_ping_timestamp_seconds",
        "keepwarm_cache_expires_timestamp_seconds",
        "keepwarm_prefix_tokens",
        "keepwarm_miss_penalty_usd",
    ):
        assert _value(metrics, gauge, **labels) == 0
    assert _value(metrics, "keepwarm_ping_duration_seconds_count", **labels) == 0
    assert _value(metrics, "keepwarm_pair_info", **labels, ttl="5m", fingerprint=pair.fingerprint,
                  account="default", provider="anthropic") == 1
    assert _value(metrics, "keepwarm_config_last_reload_successful") == 1
    metrics.remove_pair(pair)
    assert _value(metrics, "keepwarm_pings_total", **labels, result="warm") is None


def test_rewarmed_then_warm_with_costs_from_the_usage(emulator: Emulator) -> None:
    clock = FakeClock()
    metrics, runner, state = _one_pair(emulator, clock)
    pair = state.pair

    first = runner.ping(state, scheduled_at=clock.now - 0.25)
    second = runner.ping(state)
    assert (first.result, second.result) == (Result.REWARMED, Result.WARM)
    assert state.expires_at == pytest.approx(second.final.started_wall + 300)
    labels = {"expert": pair.expert, "model": pair.model}
    assert _value(metrics, "keepwarm_pings_total", **labels, result="rewarmed") == 1
    assert _value(metrics, "keepwarm_pings_total", **labels, result="warm") == 1
    # Costs equal a hand calculation from the usage the emulator returned.
    usages = [entry.usage for entry in emulator.log]
    write, read = usages[0]["cache_creation_input_tokens"], usages[1]["cache_read_input_tokens"]
    assert write == read == len(LONG_PROMPT.encode()) // 4 + (len(LONG_PROMPT.encode()) % 4 > 0)
    assert _value(metrics, "keepwarm_cost_usd_total", **labels, kind="cache_write_5m") == pytest.approx(write * 3e-6 * 1.25)
    assert _value(metrics, "keepwarm_cost_usd_total", **labels, kind="cache_read") == pytest.approx(read * 3e-6 * 0.1)
    inputs = sum(u["input_tokens"] for u in usages)
    assert _value(metrics, "keepwarm_cost_usd_total", **labels, kind="input") == pytest.approx(inputs * 3e-6)
    assert _value(metrics, "keepwarm_prefix_tokens", **labels) == read
    assert _value(metrics, "keepwarm_miss_penalty_usd", **labels) == pytest.approx(read * 3e-6 * (1.25 - 0.1))
    assert _value(metrics, "keepwarm_ping_lateness_seconds_count") == 1
    assert _value(metrics, "keepwarm_ping_lateness_seconds_sum") == pytest.approx(0.25)


def test_below_minimum_prompt_is_uncached(emulator: Emulator) -> None:
    metrics = Metrics()
    runner = _runner(emulator, metrics)
    terse = next(p for p in _config(emulator.base_url).pairs if p.expert == "terse")
    metrics.add_pair(terse)
    outcome = runner.ping(PairState(pair=terse, max_tokens=1))
    assert outcome.result is Result.UNCACHED and outcome.expires_at == 0


def test_transient_errors_are_retried_and_counted(emulator: Emulator) -> None:
    waits: list[float] = []
    metrics, runner, state = _one_pair(emulator, waits=waits)
    pair = state.pair
    emulator.inject(Fault(status=429, retry_after=7))
    emulator.inject(Fault(status=529))
    emulator.inject(Fault(status=500))
    outcome = runner.ping(state)
    assert outcome.result is Result.REWARMED and len(outcome.attempts) == 4
    assert waits == [7, 2, 4], "retry-after honoured, then exponential backoff"
    labels = {"expert": pair.expert, "model": pair.model}
    for error_type in ("rate_limit", "overloaded", "server"):
        assert _value(metrics, "keepwarm_ping_errors_total", **labels, error_type=error_type) == 1
    assert _value(metrics, "keepwarm_pings_total", **labels, result="error") == 0


def test_retry_after_beyond_expiry_gives_up_and_counts_an_error(emulator: Emulator) -> None:
    waits: list[float] = []
    metrics, runner, state = _one_pair(emulator, waits=waits)
    pair = state.pair
    emulator.inject(Fault(status=429, retry_after=3600))
    outcome = runner.ping(state)
    assert outcome.result is Result.ERROR and waits == []
    assert _value(metrics, "keepwarm_pings_total", expert=pair.expert, model=pair.model, result="error") == 1


def test_a_400_parks_the_pair_and_max_tokens_0_falls_back_to_1(emulator: Emulator) -> None:
    metrics, runner, state = _one_pair(emulator, max_tokens=0)
    assert state.max_tokens == 0
    emulator.inject(Fault(status=400, message="max_tokens: 0 is not supported here"))
    outcome = runner.ping(state)
    assert outcome.result is Result.REWARMED and state.max_tokens == 1 and not state.parked
    assert emulator.log[-1].body["max_tokens"] == 1

    emulator.inject(Fault(status=400, message="messages: text content blocks must be non-empty"))
    outcome = runner.ping(state)
    assert outcome.result is Result.ERROR and state.parked
    assert state.park_reason == "messages: text content blocks must be non-empty"


def test_unknown_model_price_is_counted_not_zeroed(emulator: Emulator, tmp_path: Path) -> None:
    metrics = Metrics()
    runner = _runner(emulator, metrics)
    doc = basic_doc(emulator.base_url)
    doc["experts"] = [{"name": "x", "system": [{"text": LONG_PROMPT}], "models": ["claude-fable-5"]}]
    pair = parse_config(doc, tmp_path).pairs[0]
    metrics.add_pair(pair)
    state = PairState(pair=pair, max_tokens=1)
    outcome = runner.ping(state)
    assert outcome.result is Result.REWARMED and outcome.cost is None and state.spend_unknown
    labels = {"expert": "x", "model": "claude-fable-5"}
    assert _value(metrics, "keepwarm_unpriced_pings_total", **labels) == 1
    assert _value(metrics, "keepwarm_cost_usd_total", **labels, kind="cache_write_5m") == 0
    penalty = _value(metrics, "keepwarm_miss_penalty_usd", **labels)
    assert penalty is not None and penalty != penalty, "NaN: unknown"


# --- the scheduler ---------------------------------------------------------------------------


def _scheduler(emulator: Emulator, clock: FakeClock, metrics: Metrics, draw: float = 0.0) -> Scheduler:
    """A scheduler whose APScheduler is started paused: jobs are stored, none fire by themselves."""
    # One fake clock for wall and monotonic time: tests move time, they do not step the clock.
    scheduler = Scheduler(_runner(emulator, metrics, clock), metrics, clock=clock, draw=lambda: draw, mono=clock)
    scheduler._aps.start(paused=True)
    return scheduler


def _job_time(scheduler: Scheduler, key: str) -> float:
    job = scheduler._aps.get_job(key)
    assert job is not None
    return job.trigger.run_date.timestamp()


def test_start_up_without_state_is_spread_within_the_ttl_margin_and_a_run_rearms_itself(emulator: Emulator) -> None:
    """No state: any cache the previous process kept warm has at least TTL − interval − jitter
    left, so every pair is pinged within that margin, spread at a stable phase inside it."""
    clock = FakeClock()
    metrics = Metrics()
    scheduler = _scheduler(emulator, clock, metrics, 0.5)
    pairs = _config(emulator.base_url).pairs
    report = scheduler.apply(pairs)
    assert len(report.added) == 3
    for pair in pairs:
        margin = pair.ttl_seconds - pair.interval - pair.jitter
        assert _job_time(scheduler, pair.key) == pytest.approx(clock.now + phase(pair.key, margin * CATCH_UP_SPREAD), abs=1e-3)
        assert _job_time(scheduler, pair.key) < clock.now + margin

    key = pairs[0].key
    clock.now += 10
    scheduler._run(key, scheduled_at=scheduler.states[key].next_due)
    state = scheduler.states[key]
    assert state.last_result is Result.REWARMED
    assert state.next_due == pytest.approx(clock.now + 240 + 5)
    assert _job_time(scheduler, key) == pytest.approx(state.next_due, abs=1e-3)


def test_after_a_stall_one_catch_up_ping_and_missed_slots_counted(emulator: Emulator) -> None:
    clock = FakeClock()
    metrics = Metrics()
    scheduler = _scheduler(emulator, clock, metrics)
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    due = scheduler.states[pair.key].next_due
    clock.now = due + 3 * 240 + 5  # the process was frozen for three intervals
    scheduler._run(pair.key, scheduled_at=due)
    assert _value(metrics, "keepwarm_missed_pings_total", expert=pair.expert, model=pair.model) == 3
    assert len(emulator.log) == 1, "exactly one catch-up ping"
    assert scheduler.states[pair.key].next_due == pytest.approx(clock.now + 240)


def test_reload_is_a_diff(emulator: Emulator, tmp_path: Path) -> None:
    clock = FakeClock()
    metrics = Metrics()
    scheduler = _scheduler(emulator, clock, metrics)
    old = _config(emulator.base_url).pairs
    scheduler.apply(old)
    before = {p.key: _job_time(scheduler, p.key) for p in old}

    doc = basic_doc(emulator.base_url)
    doc["experts"][0]["system"] = [{"text": LONG_PROMPT + " Edited."}]  # the prompt file changed
    doc["experts"][0]["models"] = ["claude-sonnet-4-6"]  # opus-4-8 pair removed
    doc["experts"].append({"name": "new-one", "system": [{"text": LONG_PROMPT}]})
    clock.now += 30
    report = scheduler.apply(parse_config(doc, tmp_path).pairs)
    assert report.changed == ("analyst/claude-sonnet-4-6",)
    assert report.removed == ("analyst/claude-opus-4-8",)
    assert report.added == ("new-one/claude-sonnet-4-6",)
    assert report.unchanged == ("terse/claude-sonnet-4-6",)
    assert _job_time(scheduler, "terse/claude-sonnet-4-6") == before["terse/claude-sonnet-4-6"], "keeps its phase"
    assert _job_time(scheduler, "analyst/claude-sonnet-4-6") == pytest.approx(clock.now), "prefix changed: ping now"
    assert scheduler._aps.get_job("analyst/claude-opus-4-8") is None
    assert _value(metrics, "keepwarm_pings_total", expert="analyst", model="claude-opus-4-8", result="warm") is None
    new_fp = scheduler.states["analyst/claude-sonnet-4-6"].pair.fingerprint
    assert _value(metrics, "keepwarm_pair_info", expert="analyst", model="claude-sonnet-4-6", ttl="5m", fingerprint=new_fp,
                  account="default", provider="anthropic") == 1
    old_fp = old[0].fingerprint
    assert _value(metrics, "keepwarm_pair_info", expert="analyst", model="claude-sonnet-4-6", ttl="5m", fingerprint=old_fp,
                  account="default", provider="anthropic") is None


def test_a_parked_pair_is_not_rearmed(emulator: Emulator) -> None:
    clock = FakeClock()
    metrics = Metrics()
    scheduler = _scheduler(emulator, clock, metrics)
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    first = _job_time(scheduler, pair.key)
    emulator.inject(Fault(status=400, message="bad request"))
    scheduler._run(pair.key, scheduled_at=scheduler.states[pair.key].next_due)
    assert scheduler.states[pair.key].parked and scheduler.states[pair.key].park_reason == "bad request"
    assert _job_time(scheduler, pair.key) == first, "not re-armed"
    assert scheduler.overdue(clock.now + 1e6) == []


def test_overdue_pairs_make_health_fail(emulator: Emulator) -> None:
    clock = FakeClock()
    metrics = Metrics()
    scheduler = Scheduler(_runner(emulator, metrics, clock), metrics, clock=clock)
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    due = scheduler.states[pair.key].next_due
    margin = pair.ttl_seconds - pair.interval - pair.jitter
    assert scheduler.overdue(due + margin - 1) == []
    assert scheduler.overdue(due + margin + 1) == [pair.key]
    assert scheduler.healthy() == (False, "scheduler not running")


# --- miss causes -----------------------------------------------------------------------------


def test_miss_cause_rules() -> None:
    from keepwarm.runner import miss_cause

    pair = _config("http://unused").pairs[0]
    fresh = PairState(pair=pair, max_tokens=1)
    assert miss_cause(fresh, Result.WARM, 100.0, None) is None
    assert miss_cause(fresh, Result.REWARMED, 100.0, None) == "cold_start"
    seen = PairState(pair=pair, max_tokens=1, last_start=50.0, expires_at=350.0)
    assert miss_cause(seen, Result.REWARMED, 400.0, None) == "ttl_lapsed", "last touch longer ago than the TTL"
    assert miss_cause(seen, Result.REWARMED, 200.0, None) == "unexplained"
    assert miss_cause(seen, Result.PARTIAL, 200.0, "system_changed") == "system_changed", "the API's diagnosis"
    seen.miss_hint = "prefix_changed"
    assert miss_cause(seen, Result.REWARMED, 200.0, None) == "prefix_changed"


def test_misses_are_counted_by_cause(emulator: Emulator) -> None:
    clock = FakeClock()
    metrics, runner, state = _one_pair(emulator, clock)
    pair = state.pair
    assert runner.ping(state).miss_cause == "cold_start"
    emulator.expire_all()  # evicted early: keepwarm cannot tell why
    assert runner.ping(state).miss_cause == "unexplained"
    labels = {"expert": pair.expert, "model": pair.model}
    assert _value(metrics, "keepwarm_cache_misses_total", **labels, cause="cold_start") == 1
    assert _value(metrics, "keepwarm_cache_misses_total", **labels, cause="unexplained") == 1
    assert _value(metrics, "keepwarm_cache_misses_total", **labels, cause="ttl_lapsed") is None  # sparse: never hit


def test_a_changed_prefix_is_the_cause_of_the_next_miss(emulator: Emulator, tmp_path: Path) -> None:
    clock = FakeClock()
    metrics = Metrics()
    scheduler = _scheduler(emulator, clock, metrics)
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    scheduler._run(pair.key, scheduler.states[pair.key].next_due)
    doc = basic_doc(emulator.base_url)
    doc["experts"][0]["system"] = [{"text": LONG_PROMPT + " v2"}]
    scheduler.apply([parse_config(doc, tmp_path).pairs[0]])
    scheduler._run(pair.key, scheduler.states[pair.key].next_due)
    assert _value(metrics, "keepwarm_cache_misses_total", expert=pair.expert, model=pair.model, cause="prefix_changed") == 1


def test_a_wall_clock_step_is_detected_and_the_schedule_re_anchored(emulator: Emulator) -> None:
    wall, mono = FakeClock(), FakeClock(5000.0)
    metrics = Metrics()
    scheduler = Scheduler(_runner(emulator, metrics, wall), metrics, clock=wall, draw=lambda: 0.0, mono=mono)
    scheduler._aps.start(paused=True)
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    due = scheduler.states[pair.key].next_due
    wall.now += 1.0
    mono.now += 1.0
    scheduler.check_clock()  # a normal second: nothing moves
    assert _job_time(scheduler, pair.key) == pytest.approx(due, abs=1e-3)
    wall.now -= 3600  # stepped back an hour
    mono.now += 1.0
    assert scheduler.check_clock() == pytest.approx(-3601)
    assert _job_time(scheduler, pair.key) == pytest.approx(due - 3601, abs=1e-3), "the same real time away"
    wall.now += 7200  # and forward two hours
    mono.now += 1.0
    # The run that APScheduler fires at once after a forward step is superseded, not a burst:
    # the job itself notices the step and re-anchors before the main loop does.
    stale = scheduler.states[pair.key].next_due
    scheduler._run(pair.key, stale)
    assert not emulator.log, "no ping: the re-anchored run is pending"
    assert _job_time(scheduler, pair.key) == pytest.approx(due - 3601 + 7199, abs=1e-3)
