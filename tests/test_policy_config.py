"""The policy config keys: policy, active_hours, budget.usd_per_day."""

from pathlib import Path
from typing import Any

import pytest

from keepwarm.config import ConfigError, parse_config


def _config(**top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "defaults": {"models": ["claude-sonnet-4-6"]},
        "experts": [{"name": "a", "system": [{"text": "rules"}]}, {"name": "b", "system": [{"text": "rules"}]}],
    }
    for key, value in top.items():
        if key in ("policy", "active_hours"):
            data["defaults"][key] = value
        else:
            data[key] = value
    return data


def test_defaults_are_fixed_always_and_no_budget() -> None:
    config = parse_config(_config(), Path("."))
    assert {p.policy for p in config.pairs} == {"fixed"}
    assert {p.active_hours for p in config.pairs} == {None}
    assert config.budget_usd_per_day is None


def test_policy_hours_and_budget_resolve_with_per_expert_override() -> None:
    data = _config(policy="adaptive", active_hours="mon-fri 08:00-19:00 Europe/Berlin", budget={"usd_per_day": 2.5})
    data["experts"][1]["policy"] = "fixed"
    data["experts"][1]["active_hours"] = ["sat 10:00-12:00 UTC", "sun 10:00-12:00 UTC"]
    config = parse_config(data, Path("."))
    a, b = config.pairs
    assert (a.policy, b.policy) == ("adaptive", "fixed")
    assert a.active_hours is not None and str(a.active_hours) == "mon-fri 08:00-19:00 Europe/Berlin"
    assert b.active_hours is not None and len(b.active_hours.ranges) == 2
    assert config.budget_usd_per_day == 2.5


def test_bad_values_are_reported_at_their_location() -> None:
    data = _config(policy="sometimes", budget={"usd_per_day": -1})
    data["experts"][0]["active_hours"] = "mon-fri 08:00-19:00 Mars/Olympus"
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("."))
    problems = info.value.problems
    assert any(p.startswith("defaults.policy: expected 'fixed' or 'adaptive'") for p in problems), problems
    assert any(p.startswith("budget.usd_per_day: must be above 0, got -1") for p in problems), problems
    del data["defaults"]["policy"], data["budget"]
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("."))
    assert info.value.problems == [
        "experts[0].active_hours: 'mon-fri 08:00-19:00 Mars/Olympus': unknown time zone 'Mars/Olympus';"
        " use an IANA name such as Europe/Berlin or UTC"
    ]


def test_inherited_bad_active_hours_is_reported_once_at_defaults() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_config(active_hours="weekdays 8-19 UTC"), Path("."))
    assert info.value.problems == [
        "defaults.active_hours: 'weekdays 8-19 UTC': expected 'DAYS HH:MM-HH:MM ZONE', e.g. 'mon-fri 08:00-19:00 Europe/Berlin'"
    ]
