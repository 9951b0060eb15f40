"""deploy/alertmanager: the example passes amtool's check, routes by severity, groups by alert and
target, and inhibits the per-pair alerts while KeepwarmDown or the target rollup fires.
(tests/test_deploy_alerting.py runs it on a real Alertmanager.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RULES = ROOT / "deploy" / "prometheus" / "keepwarm-rules.yml"


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("amtool")
    assert path, "amtool not found: scripts/test installs it (Debian package prometheus-alertmanager)"
    return subprocess.run([path, *args], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)


def alerts() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def test_amtool_check_config() -> None:
    result = amtool("check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_routed_by_its_severity() -> None:
    expected = {"critical": "keepwarm-pager", "warning": "keepwarm-tickets", "info": "keepwarm-tickets"}
    for rule in alerts():
        labels = {"alertname": rule["alert"], **rule["labels"]}
        result = amtool("config", "routes", "test", f"--config.file={CONFIG}",
                        *(f"{k}={v}" for k, v in labels.items()))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == expected[rule["labels"]["severity"]], rule["alert"]


def test_keepwarm_down_inhibits_every_per_pair_alert_of_its_target() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    down = [r for r in config["inhibit_rules"] if 'alertname="KeepwarmDown"' in r["source_matchers"]]
    assert down, "no inhibit rule has KeepwarmDown as its source"
    assert all(r["target_matchers"] == ['scope="pair"'] for r in down)
    assert any(set(r["equal"]) == {"namespace", "job", "instance"} for r in down)
    per_pair = [r for r in alerts() if r["labels"].get("scope") == "pair"]
    assert len(per_pair) >= 8
    # KeepwarmDown itself carries no scope label, so it cannot inhibit itself.
    assert all("scope" not in r["labels"] for r in alerts() if r["alert"] == "KeepwarmDown")


def test_notifications_are_grouped_by_alert_and_target_never_by_pair() -> None:
    route = yaml.safe_load(CONFIG.read_text())["route"]
    assert route["group_by"] == ["alertname", "namespace", "job", "instance"]
    assert all("group_by" not in r for r in route.get("routes", []))


def test_the_target_rollup_inhibits_the_per_pair_alerts_of_its_target_only() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    rollup = [r for r in config["inhibit_rules"] if r["source_matchers"] == ['alertname="KeepwarmTargetUnhealthy"']]
    assert rollup == [{"source_matchers": ['alertname="KeepwarmTargetUnhealthy"'], "target_matchers": ['scope="pair"'],
                       "equal": ["namespace", "job", "instance"]}]
    (rule,) = [r for r in alerts() if r["alert"] == "KeepwarmTargetUnhealthy"]
    assert rule["labels"]["scope"] == "target"  # not "pair": it cannot inhibit itself
