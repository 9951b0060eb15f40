"""The budget alert: promtool unit tests with a firing and a quiet case, the same rules for the
Prometheus Operator, and its runbook section."""

from __future__ import annotations

from pathlib import Path

import yaml
from test_deploy_prometheus import BUDGET_ALERTS, RULES, promtool

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "deploy" / "prometheus" / "tests" / "keepwarm-budget.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def _alerts() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    group = next(g for g in groups if g["name"] == "keepwarm.budget")
    return [r for r in group["rules"] if "alert" in r]


def test_promtool_unit_tests_of_the_budget_group() -> None:
    result = promtool("test", "rules", str(TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_budget_alert_fires_in_one_case_and_stays_quiet_in_another() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == quiet == BUDGET_ALERTS == {str(a["alert"]) for a in _alerts()}


def test_the_budget_alert_links_its_runbook_section() -> None:
    text = RUNBOOK.read_text()
    for alert in _alerts():
        annotations = alert["annotations"]
        assert isinstance(annotations, dict)
        url = annotations["runbook_url"]
        anchor = url.split("#")[1]
        assert f"## {alert['alert']}" in text and anchor == str(alert["alert"]).lower(), url
    # The section comes last, after every other alert's.
    assert text.rstrip().rsplit("\n## ", 1)[1].startswith("KeepwarmBudgetReached")
