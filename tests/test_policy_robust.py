"""The review's policy defects, reproduced, and the adaptive policy's worst-case bound."""

import random
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from keepwarm.adaptive import ROBUSTNESS, AdaptivePolicy, SharedPrior
from keepwarm.budget import Budget
from keepwarm.classify import Result
from keepwarm.hours import parse_active_hours
from keepwarm.policy import BudgetedPolicy, Decision, FixedPolicy, HoursPolicy, Source, Touch, cache_alive

TTL = 300.0
PING, MISS = 1.0, 11.0  # a miss costs eleven pings, as a Sonnet prefix of a few thousand tokens does


def _prod(at: float) -> Touch:
    return Touch(at, Source.PRODUCTION, Result.WARM)


def _ping(at: float) -> Touch:
    return Touch(at, Source.PING, Result.WARM)


def _adaptive(prior: SharedPrior | None = None) -> AdaptivePolicy:
    return AdaptivePolicy(TTL, 240.0, 0.0, PING, MISS, prior, default_margin=20.0)


def _decided(policy: AdaptivePolicy, now: float) -> Decision:
    """The policy's answer once the ping is due (an earlier answer is an appointment to ask again)."""
    decision = policy.next_ping(now, 0.0)
    if decision.at is not None and decision.at > now:
        decision = policy.next_ping(decision.at, 0.0)
    return decision


def _idle_period(policy: AdaptivePolicy, start: float, comes_back: float | None) -> tuple[int, bool]:
    """Drive one idle period as the scheduler does: (pings sent, whether production found the cache warm)."""
    now, pings = start, 0
    while True:
        decision = policy.next_ping(now, 0.0)
        if decision.at is not None and decision.at > now and (comes_back is None or decision.at < comes_back):
            now = decision.at  # the job wakes when the ping is due and asks again
            decision = policy.next_ping(now, 0.0)
        if decision.at is None or (comes_back is not None and decision.at >= comes_back):
            break
        now = decision.at
        policy.observe(_ping(now))
        pings += 1
        assert pings < 10_000, "never stops"
    last = max(start, now if pings else start)
    warm = comes_back is not None and cache_alive(last, TTL, comes_back)
    if comes_back is not None:
        policy.observe(_prod(comes_back))
    return pings, warm


# --- "never touched" is None, not 0.0 -------------------------------------------------------


def test_fixed_touched_at_unix_time_zero_waits_an_interval() -> None:
    policy = FixedPolicy(interval=240.0, jitter=0.0)
    policy.observe(Touch(0.0, Source.PING, Result.REWARMED))
    assert policy.next_ping(now=0.0, draw=0.0) == Decision(240.0)


def test_adaptive_and_hours_count_a_touch_at_unix_time_zero() -> None:
    policy = _adaptive()
    policy.observe(_prod(0.0))
    assert _decided(policy, 0.0).at == 280.0  # ski rental from the first request, not "never warmed"
    hours = HoursPolicy(FixedPolicy(240.0, 0.0), parse_active_hours("thu 00:00-00:02 UTC"), TTL)
    hours.observe(_prod(0.0))  # 1970-01-01 was a Thursday
    # Its next ping (240 s) falls outside the window; the next window starts when the cache is long cold.
    assert hours.next_ping(0.0, 0.0) == Decision(None, "outside_hours")


# --- "cache alive at t": a request exactly at expiry is a miss, for everyone -------------------


def test_cache_alive_is_strict_at_expiry() -> None:
    assert cache_alive(100.0, TTL, 399.999) and not cache_alive(100.0, TTL, 400.0) and not cache_alive(None, TTL, 0.0)


def test_gaps_of_exactly_the_ttl_are_kept_warm() -> None:
    policy = _adaptive()
    for k in range(30):
        policy.observe(_prod(1000.0 + TTL * k))
    start = 1000.0 + TTL * 30
    policy.observe(_prod(start))
    # Production comes back exactly at expiry: without a ping it misses, so one ping pays.
    assert _decided(policy, start) == Decision(start + 280.0, "production_touch")


# --- the budget ranks only pairs still asking ------------------------------------------------


def test_budget_forgets_pairs_that_stopped_asking() -> None:
    budget = Budget(1.0)
    for k in range(9):
        budget.may_ping(f"gone{k}", now=0.0, value=5.0)  # nine pairs that saved much, then went quiet
    budget.record(10_000.0, 0.85)  # 85 % of the cap
    assert budget.may_ping("last", now=10_000.0, value=0.1), "the only pair still pinging is refused"


def test_budget_forgets_a_pair_whose_policy_lets_its_cache_lapse() -> None:
    budget = Budget(1.0)
    quiet = BudgetedPolicy(_adaptive(), budget, "quiet", lambda _now: 5.0)
    budget.may_ping("quiet", now=0.0, value=5.0)
    assert quiet.next_ping(100.0, 0.0).at is None  # never warmed: no ping, out of the ranking
    budget.record(200.0, 0.85)
    assert budget.may_ping("busy", now=300.0, value=0.1)


# --- active hours through a spring-forward night -----------------------------------------------


@pytest.mark.parametrize(("zone", "day"), [("Europe/Berlin", (2026, 3, 29)), ("America/New_York", (2026, 3, 8))])
def test_a_window_starting_inside_the_spring_forward_gap_opens_when_the_gap_ends(zone: str, day: tuple[int, int, int]) -> None:
    hours = parse_active_hours(f"sun 02:30-05:00 {zone}")
    tz = ZoneInfo(zone)
    start = hours.next_start(datetime(*day, 0, 0, tzinfo=tz).timestamp())
    assert start is not None
    assert datetime.fromtimestamp(start, tz).strftime("%H:%M") == "03:00"  # not 03:30
    assert not hours.contains(start - 1) and hours.contains(start)


# --- the bound: learning-augmented ski rental ---------------------------------------------------


def _learnt_long_returns(policy: AdaptivePolicy, periods: int = 200, seed: int = 1) -> float:
    """History whose every idle gap returned, memoryless with a mean of half an hour: at any age
    the estimate says a return within the next TTL is likely enough to pay a ping, so without a
    cap it pings for as long as the longest gap seen (hours: many miss penalties)."""
    rng = random.Random(seed)
    t = 1_000_000.0
    for _ in range(periods):
        policy.observe(_prod(t))
        t += TTL + rng.expovariate(1 / 1800.0)  # production comes back every time
    policy.observe(_prod(t))
    return t


def test_never_returning_costs_at_most_the_cap() -> None:
    policy = _adaptive()
    start = _learnt_long_returns(policy)
    pings, _ = _idle_period(policy, start, None)
    assert pings >= 1, "the estimate says a return is near: it should try"
    assert pings * PING <= ROBUSTNESS * MISS


def test_returning_just_after_it_gives_up_costs_at_most_one_miss_more_than_the_cap() -> None:
    probe = _adaptive()
    start = _learnt_long_returns(probe)
    given_up_pings, _ = _idle_period(probe, start, None)
    policy = _adaptive()
    start = _learnt_long_returns(policy)
    last_ping = start + 280.0 * given_up_pings
    comes_back = last_ping + TTL  # the adversary returns the moment the cache expires
    pings, warm = _idle_period(policy, start, comes_back)
    assert (pings, warm) == (given_up_pings, False)
    cost = pings * PING + MISS
    assert cost <= (1 + ROBUSTNESS) * MISS
    gap = comes_back - start
    best = min((gap // TTL) * PING, MISS)  # the hindsight optimum of this gap
    assert cost <= (1 + ROBUSTNESS) * best + PING


def _conversation(policy: AdaptivePolicy, t: float, long_gap: bool) -> float:
    """A prefix used by a few requests within minutes (one thinking pause longer than the TTL if
    `long_gap`), then never again; returns the time of its last request."""
    for gap in (60.0, 600.0 if long_gap else 90.0, 60.0):
        policy.observe(_prod(t))
        t += gap
    policy.observe(_prod(t))
    return t


def test_a_thin_pair_learns_from_the_fleet_that_prefixes_go_quiet() -> None:
    """Hundreds of prefixes, each used a few times within minutes and then never again, one in
    twenty with a pause longer than the TTL. The complete gaps alone say "after a pause past the
    TTL production always came back"; the prefixes that went quiet say it mostly does not."""

    def fleet(prior: SharedPrior) -> list[AdaptivePolicy]:
        out, t = [], 2_000_000.0
        for k in range(300):
            out.append(_adaptive(prior))
            _conversation(out[-1], t, long_gap=k % 20 == 0)
            t += 120.0
        return out

    prior = SharedPrior()
    quiet = fleet(prior)
    fresh = _adaptive(prior)
    last = _conversation(fresh, 2_100_000.0, long_gap=False)
    assert _decided(fresh, last) == Decision(None, "idle")
    assert quiet
    # The same gaps without the quiet prefixes (their policies dropped, so their idle periods
    # in progress leave the prior): the estimate says production comes back, and it pings.
    returned = SharedPrior()
    gone = fleet(returned)
    del gone
    fresh = _adaptive(returned)
    last = _conversation(fresh, 2_100_000.0, long_gap=False)
    assert _decided(fresh, last).at is not None


def test_a_dropped_policy_leaves_the_prior() -> None:
    prior = SharedPrior()
    policy = _adaptive(prior)
    policy.observe(_prod(10.0))
    assert prior.open_since(10.0) == 1
    del policy
    assert prior.open_since(10.0) == 0
    moved = _adaptive(SharedPrior())
    moved.observe(_prod(20.0))
    moved.prior = prior  # as the scheduler hands a rebuilt policy the shared prior
    assert prior.open_since(20.0) == 1
