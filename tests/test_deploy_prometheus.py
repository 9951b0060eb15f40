"""deploy/prometheus: the rules pass promtool's check and its unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "keepwarm-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "keepwarm-rules.test.yml"
ALERTS = {
    "KeepwarmCacheCold",
    "KeepwarmHitRateLow",
    "KeepwarmPromptUncacheable",
    "KeepwarmPingsFailing",
    "KeepwarmPingsStale",
    "KeepwarmDown",
    "KeepwarmConfigReloadFailed",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool not found: scripts/test installs it (Debian package prometheus)"
    return subprocess.run([path, *args], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", "--lint-fatal", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


# The production group's alerts, tested in tests/test_observations_deploy.py.
PRODUCTION_ALERTS = {"KeepwarmProductionHitRateLow", "KeepwarmPrefixDrift", "KeepwarmKeepaliveNotPaying"}
BUDGET_ALERTS = {"KeepwarmBudgetReached"}  # tests in test_policy_daemon_deploy.py


def test_alerts_are_exactly_the_contracted_ones() -> None:
    assert {rule["alert"] for rule in rules() if "alert" in rule} == ALERTS | PRODUCTION_ALERTS | BUDGET_ALERTS


def test_every_alert_has_severity_summary_and_description() -> None:
    for rule in rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_hit_rate_low_has_a_critical_and_a_warning_rule() -> None:
    severities = sorted(
        rule["labels"]["severity"] for rule in rules() if rule.get("alert") == "KeepwarmHitRateLow"
    )
    assert severities == ["critical", "warning"]


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing >= ALERTS, f"no firing case for {sorted(ALERTS - firing)}"
    assert quiet >= ALERTS, f"no quiet case for {sorted(ALERTS - quiet)}"
