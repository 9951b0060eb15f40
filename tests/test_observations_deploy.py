"""The production alerts: promtool unit tests, a firing and a quiet case each, runbook sections."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from test_deploy_prometheus import PRODUCTION_ALERTS, RULES, promtool

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "deploy" / "prometheus" / "tests" / "keepwarm-production.test.yml"
# KeepwarmKeepaliveNotPaying reads keepwarm.money's 5-minute tiles: tested at their interval.
MONEY_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "keepwarm-money.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def _group() -> dict[str, Any]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    assert groups[-1]["name"] == "keepwarm.production", "the production group comes last"
    group: dict[str, Any] = groups[-1]
    return group


def test_promtool_unit_tests_of_the_production_group() -> None:
    result = promtool("test", "rules", str(TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_production_alert_fires_in_one_case_and_stays_quiet_in_another() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    cases = yaml.safe_load(TESTS.read_text())["tests"] + yaml.safe_load(MONEY_TESTS.read_text())["tests"]
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == quiet == PRODUCTION_ALERTS


def test_hit_rate_has_a_critical_and_a_warning_rule_over_enough_requests() -> None:
    rules = [r for r in _group()["rules"] if r.get("alert") == "KeepwarmProductionHitRateLow"]
    assert sorted(r["labels"]["severity"] for r in rules) == ["critical", "warning"]
    assert all("0.60" in r["expr"] and "pair:keepwarm_production_requests:increase1h >= 20" in r["expr"]
               for r in rules)


def test_every_production_alert_links_its_runbook_section() -> None:
    runbook = RUNBOOK.read_text()
    assert "## Production alerts" in runbook
    production = runbook.split("## Production alerts", 1)[1]
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^## (.+)$", production, re.M)}
    for rule in _group()["rules"]:
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"critical", "warning"}
        url = rule["annotations"]["runbook_url"]
        assert url.split("#", 1)[0].endswith("/docs/runbook.md") and url.split("#", 1)[1] in anchors, url
