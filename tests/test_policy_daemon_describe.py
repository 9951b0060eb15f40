"""A word per pair from its policy for the status page (`describe`), and the page's column."""

from __future__ import annotations

from conftest import basic_doc

from keepwarm.adaptive import AdaptivePolicy
from keepwarm.budget import Budget
from keepwarm.classify import Result
from keepwarm.config import parse_config
from keepwarm.hours import parse_active_hours
from keepwarm.policy import BudgetedPolicy, FixedPolicy, HoursPolicy, Source, Touch, human_duration
from keepwarm.runner import PairState
from keepwarm.web import PageInfo, render_page

FRIDAY_0800 = 1_800_000_000.0  # Fri 2027-01-15 08:00 UTC


def _adaptive_with_40_minute_gaps() -> tuple[AdaptivePolicy, float]:
    """A pair whose production comes back every 40 minutes; returns it and its last request."""
    policy = AdaptivePolicy(300.0, 240.0, 0.0, ping_cost=0.001, miss_penalty=0.1)
    t = FRIDAY_0800
    for _ in range(12):
        policy.observe(Touch(t, Source.PRODUCTION, Result.WARM))
        t += 2400
    return policy, t - 2400


def test_human_durations() -> None:
    assert [human_duration(s) for s in (5, 59.9, 60, 720, 3600, 3900)] == ["5 s", "59 s", "1 m", "12 m", "1 h", "1 h 5 m"]


def test_adaptive_keeping_warm_says_idle_and_the_expected_gap() -> None:
    policy, last = _adaptive_with_40_minute_gaps()
    for k in (1, 2):
        policy.observe(Touch(last + k * 280, Source.PING, Result.WARM))
    assert policy.describe(last + 720) == "keeping warm, idle 12 m of an expected 40 m"


def test_adaptive_letting_lapse_says_how_long_idle() -> None:
    policy, last = _adaptive_with_40_minute_gaps()
    assert policy.describe(last + 3900) == "letting lapse: idle 1 h 5 m"


def test_adaptive_without_history_and_never_warmed() -> None:
    policy = AdaptivePolicy(300.0, 240.0, 0.0, ping_cost=0.001, miss_penalty=0.1)
    assert policy.describe(FRIDAY_0800) == "waiting for production's first request (never pre-warms)"
    policy.observe(Touch(FRIDAY_0800, Source.PRODUCTION, Result.REWARMED))
    assert policy.describe(FRIDAY_0800 + 60) == "keeping warm, idle 1 m (no gaps seen yet: until its pings cost one miss)"


def test_fixed_says_its_interval_and_a_production_touch() -> None:
    policy = FixedPolicy(240.0, 0.0)
    policy.observe(Touch(FRIDAY_0800, Source.PING, Result.WARM))
    assert policy.describe(FRIDAY_0800 + 10) == "keeping warm: a ping every 4 m"
    policy.observe(Touch(FRIDAY_0800 + 100, Source.PRODUCTION, Result.WARM))
    assert policy.describe(FRIDAY_0800 + 220) == "keeping warm: a ping every 4 m, production touched it 2 m ago"


def test_outside_active_hours_says_until_when_in_the_hours_zone() -> None:
    hours = parse_active_hours("mon-fri 08:00-19:00 Europe/Berlin")
    policy = HoursPolicy(FixedPolicy(240.0, 0.0), hours, 300.0)
    saturday_noon = FRIDAY_0800 + 28 * 3600
    assert policy.describe(saturday_noon) == "outside active hours until Mon 08:00"
    assert policy.describe(FRIDAY_0800) == "keeping warm: a ping every 4 m"  # 09:00 in Berlin


def test_budget_reached() -> None:
    budget = Budget(1.0)
    policy = BudgetedPolicy(FixedPolicy(240.0, 0.0), budget, "a/b", lambda _now: 0.1)
    assert policy.describe(FRIDAY_0800) == "keeping warm: a ping every 4 m"
    budget.record(FRIDAY_0800 - 10, 1.5)
    assert policy.describe(FRIDAY_0800) == "budget reached"
    assert policy.describe(FRIDAY_0800 + 86400) == "keeping warm: a ping every 4 m", "spend rolled out"


def test_the_status_page_shows_each_pairs_policy_in_a_column(tmp_path: object) -> None:
    from pathlib import Path

    config = parse_config(basic_doc("http://127.0.0.1:9"), Path(str(tmp_path)))
    states = [PairState(pair=p, max_tokens=1) for p in config.pairs]
    words = {p.key: f"words for {p.key} at {FRIDAY_0800:.0f}" for p in config.pairs}
    page = render_page(states, (True, "ok"), FRIDAY_0800, PageInfo(policy=lambda key, now: words[key]))
    assert "<th>policy</th>" in page
    for text in words.values():
        assert f"<td>{text}</td>" in page
    plain = render_page(states, (True, "ok"), FRIDAY_0800)
    assert "<td>fixed</td>" in plain, "without a scheduler the column names the configured policy"
