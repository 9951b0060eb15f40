"""deploy/alertmanager: the example passes amtool's check, routes by severity, groups by alert and
target, and inhibits the per-pair alerts while KeepwarmDown, the target rollup or a fleet alert
fires. (tests/test_deploy_alerting.py runs it on a real Alertmanager with a real Prometheus; the
fleet's inhibitions are checked here on a real Alertmanager alone.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import free_port

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


# --- the fleet's inhibitions, on a real Alertmanager ---------------------------------------------

FLEET_ALERTS = ("KeepwarmFleetDegraded", "KeepwarmFleetDatabaseUnreachable", "KeepwarmFleetSplit",
                "KeepwarmFleetPairsUnowned")


def _labels(alert: str, **extra: str) -> dict[str, str]:
    """An alert's labels as its rule sets them, with the target labels Prometheus adds."""
    rule = next(r for r in alerts() if r["alert"] == alert)
    return {"alertname": alert, **rule["labels"], **extra}


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """The shipped example on loopback, its webhooks pointed at a port nobody listens on."""
    doc = yaml.safe_load(CONFIG.read_text())
    dead = free_port()
    for receiver in doc["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = f"http://127.0.0.1:{dead}/"
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump(doc))
    binary = shutil.which("prometheus-alertmanager")
    assert binary, "prometheus-alertmanager not found: scripts/test installs it"
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.path={tmp_path / 'am'}",
                             f"--web.listen-address={url.removeprefix('http://')}", "--cluster.listen-address=",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=(tmp_path / "am.log").open("wb"))
    try:
        _until(lambda: _get(f"{url}/-/ready") is not None, f"Alertmanager ready (see {tmp_path}/am.log)")
        yield url
    finally:
        proc.kill()
        proc.wait()


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = answer.read()
    except OSError:
        return None
    return json.loads(body) if body.startswith((b"[", b"{")) else body


def _until(check: Callable[[], bool], what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("fleet_alert", FLEET_ALERTS)
def test_a_degraded_fleet_is_one_page_its_per_pair_alerts_held_back(alertmanager: str, fleet_alert: str) -> None:
    fleet = {"job": "keepwarm"}
    source = _labels(fleet_alert, **fleet, **({"instance": "b:9464"} if fleet_alert.endswith("Unreachable") else {}))
    held = [
        _labels("KeepwarmPingsStale", **fleet, instance="a:9464", expert="e1", model="m"),
        _labels("KeepwarmHitRateLow", **fleet, instance="c:9464", expert="e2", model="m"),
        _labels("KeepwarmPairDuplicated", **fleet, expert="e3", model="m"),
    ]
    kept = [
        _labels("KeepwarmPingsStale", job="other", instance="x:9464", expert="e1", model="m"),  # another fleet
        _labels("KeepwarmTargetUnhealthy", **fleet, instance="a:9464"),  # the target's rollup pages
        *(_labels(a, **fleet) for a in FLEET_ALERTS if a != fleet_alert and not a.endswith("Unreachable")),
    ]
    body = json.dumps([{"labels": labels} for labels in (source, *held, *kept)]).encode()
    request = urllib.request.Request(f"{alertmanager}/api/v2/alerts", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.status == 200

    def states() -> dict[tuple[str, ...], str]:
        found = _get(f"{alertmanager}/api/v2/alerts?active=true&inhibited=true&silenced=true") or []
        return {tuple(sorted(a["labels"].items())): a["status"]["state"] for a in found}

    def key(labels: dict[str, str]) -> tuple[str, ...]:
        return tuple(sorted(labels.items()))

    _until(lambda: len(states()) == 1 + len(held) + len(kept), "every alert received")
    now = states()
    assert now[key(source)] == "active"
    assert {now[key(a)] for a in held} == {"suppressed"}, now
    assert {now[key(a)] for a in kept} == {"active"}, now
