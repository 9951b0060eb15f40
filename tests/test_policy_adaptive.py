"""The adaptive policy, the active-hours and budget wrappers, and make_policy."""

from dataclasses import replace
from pathlib import Path

import pytest

from keepwarm.adaptive import AdaptivePolicy, SharedPrior
from keepwarm.budget import Budget
from keepwarm.classify import Result
from keepwarm.config import parse_config
from keepwarm.hours import parse_active_hours
from keepwarm.policy import BudgetedPolicy, Decision, FixedPolicy, HoursPolicy, Source, Touch, make_policy
from keepwarm.pricing import builtin_table

TTL = 300.0


def _adaptive(ping_cost: float = 1.0, miss: float = 10.0, prior: SharedPrior | None = None) -> AdaptivePolicy:
    return AdaptivePolicy(TTL, 240.0, 0.0, ping_cost, miss, prior, default_margin=20.0)


def _prod(at: float) -> Touch:
    return Touch(at, Source.PRODUCTION, Result.WARM)


def _ping(at: float, result: Result = Result.WARM) -> Touch:
    return Touch(at, Source.PING, result)


def _pings_until_lapse(policy: AdaptivePolicy, now: float, limit: int = 100) -> list[float]:
    """Ping whenever the policy asks, as the scheduler would, until it lets the cache lapse."""
    out: list[float] = []
    for _ in range(limit):
        decision = policy.next_ping(now, 0.0)
        if decision.at is not None and decision.at > now:
            now = decision.at  # the job wakes when the ping is due and asks again
            decision = policy.next_ping(now, 0.0)
        if decision.at is None:
            assert decision.reason == "idle"
            return out
        now = decision.at
        out.append(now)
        policy.observe(_ping(now))
    raise AssertionError("never lapsed")


def test_never_prewarms_a_cache_nothing_has_touched() -> None:
    assert _adaptive().next_ping(now=1000.0, draw=0.5) == Decision(None)


def test_without_history_it_is_ski_rental() -> None:
    # A miss costs 3.5 pings: three pings of an idle period cost less than one miss, a fourth would not.
    policy = _adaptive(ping_cost=1.0, miss=3.5)
    policy.observe(_prod(1000.0))
    pings = _pings_until_lapse(policy, 1000.0)
    assert pings == [1280.0, 1560.0, 1840.0]  # ttl - default margin apart


def test_keeps_warm_across_cron_gaps_only_when_the_pings_cost_less_than_a_miss() -> None:
    cheap, dear = _adaptive(ping_cost=1.0, miss=10.0), _adaptive(ping_cost=1.0, miss=1.5)
    for policy in (cheap, dear):
        for k in range(20):
            policy.observe(_prod(1000.0 + 600.0 * k))  # a job every 10 minutes, TTL 5 minutes
    last = 1000.0 + 600.0 * 19
    # Bridging 600 s takes two pings; one ping alone would save nothing (no request in its stretch).
    assert _pings_until_lapse(cheap, last) == [last + 280.0, last + 560.0]
    assert _pings_until_lapse(dear, last) == []


def test_lapses_once_idle_longer_than_any_gap_seen() -> None:
    policy = _adaptive()
    for k in range(30):
        policy.observe(_prod(1000.0 + 100.0 * k))  # a busy pair: a request every 100 s
    last = 1000.0 + 100.0 * 29
    assert _pings_until_lapse(policy, last) == []


def test_learns_by_hour_of_week() -> None:
    """Gaps that start at 09:00 are short, gaps that start at 18:00 long: the decisions differ."""
    policy = _adaptive(ping_cost=1.0, miss=10.0)
    week = 7 * 86400.0
    for w in range(3):
        for day in range(5):
            base = w * week + day * 86400.0
            for k in range(6):  # 09:00 - 09:50, a request every 10 minutes
                policy.observe(_prod(base + 9 * 3600.0 + 600.0 * k))
            policy.observe(_prod(base + 18 * 3600.0))  # then one at 18:00, and nothing until tomorrow
    morning = 3 * week + 9 * 3600.0
    policy.observe(_prod(morning))
    assert len(_pings_until_lapse(policy, morning)) == 2
    evening = 3 * week + 18 * 3600.0
    policy.observe(_prod(evening))
    assert _pings_until_lapse(policy, evening) == []


def test_a_new_pair_starts_from_the_shared_prior() -> None:
    prior = SharedPrior()
    veteran, newcomer = _adaptive(prior=prior), _adaptive(prior=prior)
    for k in range(50):
        veteran.observe(_prod(1000.0 + 600.0 * k))
    newcomer.observe(_prod(50_000.0))
    # The newcomer has no gap of its own; the veteran's cron gaps say a request comes at 600 s.
    assert len(_pings_until_lapse(newcomer, 50_000.0)) == 2


def test_spacing_follows_the_measured_latency() -> None:
    policy = _adaptive()
    assert policy.margin == 20.0
    for latency in [0.5] * 98 + [3.0] * 2:  # nearest-rank p99 of 100: the 99th, 3.0
        policy.observe_latency(latency)
    assert policy.margin == pytest.approx(2 * 3.0 + 1.0 + 2.0)  # p99 twice (attempt + retry), backoff, slack
    policy.observe(_prod(1000.0))
    assert policy.next_ping(1000.0, 0.0).at == pytest.approx(1000.0 + TTL - 9.0)


def test_a_pair_with_few_latencies_of_its_own_spaces_its_pings_by_the_fleets() -> None:
    prior = SharedPrior()
    veteran, newcomer = _adaptive(prior=prior), _adaptive(prior=prior)
    for latency in [0.5] * 98 + [3.0] * 2:
        veteran.observe_latency(latency)
    # The newcomer has measured nothing, but its pings reach the same API as the veteran's.
    assert newcomer.margin == pytest.approx(2 * 3.0 + 1.0 + 2.0)
    for _ in range(5):
        newcomer.observe_latency(1.0)
    assert newcomer.margin == pytest.approx(2 * 1.0 + 1.0 + 2.0)  # its own, once it has a few
    assert _adaptive(prior=SharedPrior()).margin == 20.0  # nothing measured anywhere: the default


def test_the_margin_follows_new_latencies_after_it_was_computed() -> None:
    policy = _adaptive()
    for _ in range(5):
        policy.observe_latency(1.0)
    assert policy.margin == pytest.approx(5.0)
    policy.observe_latency(4.0)  # the p99 of six is their maximum
    assert policy.margin == pytest.approx(2 * 4.0 + 3.0)


def test_never_closer_to_expiry_than_interval_allows() -> None:
    policy = AdaptivePolicy(15.0, 12.0, 0.0, 1.0, 10.0, default_margin=20.0)  # a time-scaled TTL
    policy.observe(_prod(100.0))
    assert policy.next_ping(100.0, 0.0).at == 112.0


def test_a_cold_cache_is_not_rewarmed() -> None:
    policy = _adaptive()
    policy.observe(_prod(1000.0))
    policy.observe(_ping(1280.0, Result.ERROR))  # the ping failed: the cache expires at 1300
    assert policy.next_ping(1281.0, 0.0) == Decision(None, "idle")
    late = _adaptive()
    late.observe(_prod(1000.0))
    assert late.next_ping(1400.0, 0.0) == Decision(None, "idle")  # the scheduler woke after expiry


def test_replay_rebuilds_the_same_state() -> None:
    touches = [_prod(1000.0 + 600.0 * k) for k in range(10)] + [_ping(1000.0 + 600.0 * k + 280) for k in range(10)]
    fed, replayed = _adaptive(), _adaptive()
    for t in sorted(touches, key=lambda t: t.at):
        fed.observe(t)
    replayed.replay(reversed(touches))
    assert [fed.next_ping(7000.0 + i, 0.3) for i in range(3)] == [replayed.next_ping(7000.0 + i, 0.3) for i in range(3)]
    assert list(fed.gaps.values) == list(replayed.gaps.values)


# --- wrappers ----------------------------------------------------------------------------

MONDAY = 1772409600.0  # 2026-03-02T00:00:00Z, a Monday
HOURS = parse_active_hours("mon-fri 08:00-19:00 UTC")


def test_outside_hours_fixed_resumes_at_the_start_without_observations() -> None:
    policy = HoursPolicy(FixedPolicy(240.0, 0.0), HOURS, TTL)
    policy.observe(_ping(MONDAY + 19 * 3600 - 100))
    assert policy.next_ping(MONDAY + 19 * 3600 - 99, 0.0) == Decision(MONDAY + 32 * 3600, "outside_hours")
    # At the start the wrapped policy's (overdue) answer stands: ping at once.
    due = policy.next_ping(MONDAY + 32 * 3600, 0.0)
    assert due.at is not None and due.at <= MONDAY + 32 * 3600


def test_outside_hours_with_observations_never_prewarms() -> None:
    policy = HoursPolicy(FixedPolicy(240.0, 0.0), HOURS, TTL)
    policy.observe(_prod(MONDAY + 19 * 3600 - 100))
    assert policy.next_ping(MONDAY + 19 * 3600 - 99, 0.0) == Decision(None, "outside_hours")
    # Still warm when the hours begin: the ping at the start keeps it so.
    early = HoursPolicy(FixedPolicy(240.0, 0.0), HOURS, TTL)
    early.observe(_prod(MONDAY + 8 * 3600 - 270))  # its ping would fall at 07:59:30, the cache lives to 08:00:30
    assert early.next_ping(MONDAY + 8 * 3600 - 269, 0.0) == Decision(MONDAY + 8 * 3600, "outside_hours")


def test_budget_stops_the_least_valuable_pairs_first() -> None:
    budget = Budget(1.0)
    assert budget.may_ping("low", 0.0, 0.1) and budget.may_ping("high", 0.0, 5.0)
    budget.record(10.0, 0.9)  # 90 %: half the headroom above 80 % is left
    assert budget.may_ping("high", 20.0, 5.0)
    assert not budget.may_ping("low", 20.0, 0.1)
    budget.record(30.0, 0.1)  # at the cap: nobody
    assert not budget.may_ping("high", 40.0, 5.0)
    # Spend rolls out in 10-second steps: the 0.9 of t=10 s counts until its step (10-20 s) has left.
    assert budget.resume_at(40.0) == 20.0 + 86400.0
    assert not budget.may_ping("low", 19.0 + 86400.0, 0.1)
    assert budget.may_ping("low", 20.0 + 86400.0, 0.1)  # the 0.9 rolled out of the window


def test_budgeted_policy_says_budget_and_waits_for_room() -> None:
    budget = Budget(1.0)
    budget.record(0.0, 1.0)
    policy = BudgetedPolicy(FixedPolicy(240.0, 0.0), budget, "a/m", lambda _now: 1.0)
    policy.observe(_ping(100.0))
    assert policy.next_ping(200.0, 0.0) == Decision(340.0)  # not due yet: not judged yet
    assert policy.next_ping(340.0, 0.0) == Decision(86410.0, "budget")  # its 10-second step has left the window


def test_make_policy_builds_what_the_config_asks_for() -> None:
    data = {
        "defaults": {"models": ["claude-sonnet-4-6"], "policy": "adaptive", "active_hours": "mon-fri 08:00-19:00 UTC"},
        "experts": [{"name": "a", "system": [{"text": "rules"}]}],
    }
    pair = parse_config(data, Path(".")).pairs[0]
    prices = builtin_table()
    built = make_policy(pair, prices, 4000, budget=Budget(5.0))
    assert isinstance(built, BudgetedPolicy)
    assert isinstance(built.inner, HoursPolicy) and isinstance(built.inner.inner, AdaptivePolicy)
    adaptive = built.inner.inner
    assert adaptive.miss_penalty == prices.miss_penalty("claude-sonnet-4-6", 4000, "5m")
    assert adaptive.ping_cost == prices.warm_ping_cost("claude-sonnet-4-6", 4000, 8, 1)
    unpriced = make_policy(replace(pair, model="no-such-model", active_hours=None), prices, 4000)
    assert isinstance(unpriced, FixedPolicy)
    scaled = make_policy(replace(pair, active_hours=None), prices, 4000, time_scale=0.05)
    assert isinstance(scaled, AdaptivePolicy) and scaled.default_margin == pytest.approx(1.0)


def test_an_adaptive_pair_never_pings_a_prefix_too_short_to_cache() -> None:
    data = {"defaults": {"models": ["claude-opus-4-6"], "policy": "adaptive"}, "experts": [{"name": "a", "system": [{"text": "rules"}]}]}
    pair = parse_config(data, Path(".")).pairs[0]
    prices = builtin_table()
    minimum = prices.get("claude-opus-4-6").min_cacheable_tokens
    assert minimum is not None
    short = make_policy(pair, prices, minimum - 1)
    assert isinstance(short, AdaptivePolicy) and short.miss_penalty == 0.0
    # Production every 1.9 TTLs: a prefix that caches is kept warm between requests, a shorter
    # one never (each ping would be billed as plain input and keep nothing warm).
    for policy, pings in ((make_policy(pair, prices, minimum), True), (short, False)):
        assert isinstance(policy, AdaptivePolicy)
        sent = 0
        for k in range(20):
            at = 1000.0 + 570.0 * k
            policy.observe(_prod(at))
            decision = policy.next_ping(at, 0.0)
            if decision.at is not None and decision.at < at + 570.0:
                decision = policy.next_ping(decision.at, 0.0)
                if decision.at is not None:
                    policy.observe(_ping(decision.at))
                    sent += 1
        assert (sent > 0) is pings
