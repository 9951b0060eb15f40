"""deploy/prometheus: the rules pass promtool's check and its unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "keepwarm-rules.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "keepwarm-rules.test.yml"
MONEY_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "keepwarm-money.test.yml"
FLEET_TESTS = ROOT / "deploy" / "prometheus" / "tests" / "keepwarm-fleet.test.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"
ALERTS = {
    "KeepwarmCacheCold",
    "KeepwarmHitRateLow",
    "KeepwarmPromptUncacheable",
    "KeepwarmPairParked",
    "KeepwarmPingsFailing",
    "KeepwarmPingsStale",
    "KeepwarmPingsDeferred",
    "KeepwarmPingsMissed",
    "KeepwarmPingsUnpriced",
    "KeepwarmLedgerErrors",
    "KeepwarmDown",
    "KeepwarmConfigReloadFailed",
    "KeepwarmTargetUnhealthy",
    "KeepwarmTargetMissing",
    "KeepwarmPairDuplicated",
}
# Where every runbook_url points, followed by `#<alert in lower case>`: one base, which the
# kustomize base's settings (deploy/kubernetes/base/settings.yaml) replace.
RUNBOOK_BASE = "https://github.com/keepwarm/keepwarm/blob/main/docs/runbook.md"


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
    result = promtool("test", "rules", str(RULE_TESTS), str(MONEY_TESTS), str(FLEET_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def groups() -> dict[str, dict[str, Any]]:
    return {group["name"]: group for group in yaml.safe_load(RULES.read_text())["groups"]}


def test_the_money_tiles_are_tested_at_their_own_interval() -> None:
    # promtool runs every group at the test file's evaluation_interval, ignoring a group's own:
    # the tiles' test must run at the tiles' interval, or overlapping tiles would count money
    # several times and the test would check numbers no real Prometheus produces.
    money = [g for g in groups().values() if g.get("interval") == "5m"]
    assert {g["name"] for g in money} == {"keepwarm.money", "keepwarm.money_by_pair"}
    tiles = [r for g in money for r in g["rules"] if "record" in r]
    names = {r["record"] for r in tiles}
    # Each tile is 5 minutes of a raw counter, or a sum of another tile of the same evaluation.
    assert tiles and all(
        r["record"].endswith(":increase5m") and ("[5m]" in r["expr"] or any(n in r["expr"] for n in names - {r["record"]}))
        for r in tiles
    )
    assert yaml.safe_load(MONEY_TESTS.read_text())["evaluation_interval"] == "5m"


def test_tiles_are_only_read_through_sums_over_time() -> None:
    # A tile is recorded every 5 minutes, the length of Prometheus' lookback: read as an instant
    # vector it would come and go. Over a range (sum_over_time) it never does. Inside its own
    # group a tile is read at the evaluation that wrote it, so there it may be instant.
    money = [r for g in groups().values() if g.get("interval") == "5m" for r in g["rules"]]
    tiles = {r["record"] for r in money if "record" in r}
    for rule in (r for r in rules() if r not in money):
        for tile in tiles:
            for use in re.finditer(re.escape(tile) + r"(\{[^}]*\})?(\[[^]]+\])?", rule["expr"]):
                assert use.group(2), f"{rule.get('record') or rule.get('alert')} reads {tile} as an instant vector"


def test_no_rule_reads_a_raw_counter_over_days() -> None:
    # increase() of a raw per-pair counter over [1d] or [7d] reads every sample of every pair's
    # series at every evaluation: seconds of rule time at 10,000 pairs. Those sums read tiles.
    for rule in rules():
        for window in re.findall(r"\b(keepwarm_\w+)(?:\{[^}]*\})?\[(\d+)([dh])\]", rule["expr"]):
            name, n, unit = window
            hours = int(n) * (24 if unit == "d" else 1)
            assert hours <= 1, f"{rule.get('record') or rule.get('alert')} reads {name} over {n}{unit}"


# The production group's alerts (tests/test_observations_deploy.py) and the budget group's
# (tests/test_policy_daemon_deploy.py) are checked beside their features.
PRODUCTION_ALERTS = {"KeepwarmProductionHitRateLow", "KeepwarmPrefixDrift", "KeepwarmKeepaliveNotPaying"}
BUDGET_ALERTS = {"KeepwarmBudgetReached"}
# A fleet's own alerts (keepwarm.fleet), tested in keepwarm-fleet.test.yml.
FLEET_ALERTS = {"KeepwarmFleetDegraded", "KeepwarmFleetDatabaseUnreachable", "KeepwarmFleetSplit",
                "KeepwarmFleetPairsUnowned"}


def test_every_group_holds_exactly_its_contracted_alerts() -> None:
    assert {rule["alert"] for rule in rules() if "alert" in rule} == ALERTS | PRODUCTION_ALERTS | BUDGET_ALERTS | FLEET_ALERTS


KEEPWARM_GROUPS = ("keepwarm.recording", "keepwarm.pings", "keepwarm.pairs", "keepwarm.alerts")


def keepwarm_rules() -> list[dict[str, Any]]:
    """The rules of keepwarm's own groups (production alerts live in a group of their own)."""
    data = yaml.safe_load(RULES.read_text())
    return [rule for group in data["groups"] if group["name"] in KEEPWARM_GROUPS for rule in group["rules"]]


def test_alerts_are_exactly_the_contracted_ones() -> None:
    assert {rule["alert"] for rule in keepwarm_rules() if "alert" in rule} == ALERTS


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def runbook_sections() -> dict[str, str]:
    """The runbook's `## ` sections by anchor, each with its text."""
    sections: dict[str, str] = {}
    current = None
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("## "):
            current = _anchor(line[3:])
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def test_every_alert_links_its_own_runbook_section_saying_what_check_and_fix() -> None:
    sections = runbook_sections()
    for rule in rules():
        if "alert" not in rule:
            continue
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == RUNBOOK_BASE, (rule["alert"], url)
        assert anchor == rule["alert"].lower(), (rule["alert"], url)
        assert anchor in sections, f"{rule['alert']}: no section #{anchor} in docs/runbook.md"
        text = sections[anchor]
        for part in ("**What it means**", "**How to check**", "**How to fix**"):
            assert part in text, f"docs/runbook.md#{anchor} has no {part}"


def test_per_pair_alerts_are_gated_on_the_pair_being_configured_and_the_target_up() -> None:
    # An alert on the instant pair state needs no other gate than the target: the series goes
    # stale at the first scrape without it (a removed pair, a failed scrape), and the alert with
    # it. One that reads a window, where a removed pair lingers for the window's length, is
    # gated on an instant series of the same pair: the sparse counter itself, so the gate reads
    # the few pairs with the problem rather than 10,000 keepwarm_pair_info series.
    by_name = {r["record"]: r for r in rules() if "record" in r}
    for rule in keepwarm_rules():
        if "alert" not in rule or rule["labels"].get("scope") != "pair":
            continue
        expr = " ".join(rule["expr"].split())
        if expr.startswith("pair:keepwarm_cache_hit_ratio_low:1h "):
            # Gated inside the rule: a removed pair or a target that is down has no prefix gauge.
            assert "* max without (instance, pod) (keepwarm_prefix_tokens)" in by_name[expr.split()[0]]["expr"]
            continue
        assert "and on (namespace, job, instance) up == 1" in expr, rule["alert"]
        if expr.startswith("pair:keepwarm_pair_state:unhealthy == "):
            continue
        family = re.search(r"increase\((keepwarm_\w+)\[", expr)
        assert family, rule["alert"]
        assert f"and on (namespace, job, instance, expert, model) {family.group(1)} " in expr, rule["alert"]
    per_pair = {r["alert"] for r in keepwarm_rules() if r.get("labels", {}).get("scope") == "pair"}
    # Every alert with expert/model labels is marked, so Alertmanager can inhibit it.
    assert per_pair == ALERTS - {"KeepwarmDown", "KeepwarmConfigReloadFailed", "KeepwarmLedgerErrors",
                                 "KeepwarmPingsDeferred", "KeepwarmTargetUnhealthy", "KeepwarmTargetMissing",
                                 "KeepwarmPairDuplicated"}
    unhealthy = " ".join(by_name["pair:keepwarm_pair_state:unhealthy"]["expr"].split())
    assert unhealthy == "keepwarm_pair_state >= 2"


def test_a_healthy_fleet_without_observations_gets_no_per_pair_series_from_the_rules() -> None:
    # Each per-pair rule would be one more series per pair in Prometheus' head (10,000 at
    # 10,000 pairs, 40 to 50 MB of its memory): a per-pair rule records only the pairs that need
    # attention (a comparison at the end) or that have production observations.
    per_pair = {r["record"]: " ".join(r["expr"].split()) for r in rules() if r.get("record", "").startswith("pair:")}
    observed = {name for name, expr in per_pair.items() if "keepwarm_production_" in expr or "saved" in name}
    assert set(per_pair) - observed == {"pair:keepwarm_pair_state:unhealthy", "pair:keepwarm_cache_hit_ratio_low:1h"}
    assert per_pair["pair:keepwarm_cache_hit_ratio_low:1h"].endswith("< 0.85")
    assert per_pair["pair:keepwarm_spend_usd:increase5m"].endswith(
        "and on (namespace, job, expert, model) keepwarm_production_requests_total")


DENSE_PER_PAIR = ("keepwarm_pings_total", "keepwarm_cost_usd_total", "keepwarm_tokens_total",
                  "keepwarm_last_ping_timestamp_seconds", "keepwarm_cache_expires_timestamp_seconds",
                  "keepwarm_prefix_tokens", "keepwarm_miss_penalty_usd", "keepwarm_pair_info", "keepwarm_pair_state")


def test_what_runs_every_30_seconds_reads_each_pair_once() -> None:
    # At 10,000 pairs a selector of a dense per-pair family reads 10,000 to 50,000 series. What
    # Prometheus evaluates every 30 s reads one, keepwarm_pair_state, once (into the unhealthy
    # rule the per-pair alerts read); the rest runs every 2 or every 5 minutes.
    reads = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        if "interval" in group:
            assert group["interval"] in ("2m", "5m"), group["name"]
            continue
        for rule in group["rules"]:
            for family in DENSE_PER_PAIR:
                reads += [(rule.get("record") or rule.get("alert"), family)] * len(
                    re.findall(rf"(?<![\w:]){family}(?![\w:])", rule["expr"]))
    assert reads == [("pair:keepwarm_pair_state:unhealthy", "keepwarm_pair_state")]


def test_the_stale_threshold_is_the_ttl_not_the_interval() -> None:
    # The daemon marks a pair cold (keepwarm_pair_state 2) once its TTL has passed unpinged;
    # the rule reads that rather than comparing against a multiple of the interval.
    stale = next(r for r in rules() if r.get("alert") == "KeepwarmPingsStale")
    assert "pair:keepwarm_pair_state:unhealthy == 2" in stale["expr"]
    assert "interval" not in stale["expr"]


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


def test_the_job_is_named_only_where_the_settings_replace_it() -> None:
    # The kustomize settings replace the quoted job of the rules that
    # deploy/kubernetes/components/monitoring/kustomization.yaml lists (and every runbook_url's
    # base, checked above): another rule naming the job would keep the old name.
    named = {r.get("alert") or r.get("record") for r in rules() if 'job="keepwarm"' in r["expr"]
             or r.get("labels", {}).get("job") == "keepwarm"}
    assert named == {"KeepwarmDown", "KeepwarmTargetMissing", "job:keepwarm_expected_targets:count"}


def test_a_single_eviction_is_quiet_and_a_stuck_target_is_one_rollup() -> None:
    # The behaviours the promtool cases below pin: KeepwarmCacheCold needs two re-writes in 30
    # minutes; the rollup's `for` is shorter than KeepwarmPingsStale's, so it is firing (and
    # inhibiting) before the first per-pair page of a stuck target.
    cold = next(r for r in rules() if r.get("alert") == "KeepwarmCacheCold")
    assert ">= 2" in cold["expr"] and "offset 30m" in cold["expr"]
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [c for case in cases for c in case.get("alert_rule_test", [])]
    assert any(c["alertname"] == "KeepwarmCacheCold" and not c.get("exp_alerts") for c in checks)
    durations = {r["alert"]: r.get("for", "0s") for r in rules() if "alert" in r}
    minutes = {name: int(d[:-1]) * (60 if d.endswith("m") else 1) for name, d in durations.items()}
    assert minutes["KeepwarmTargetUnhealthy"] < minutes["KeepwarmPingsStale"]


def test_the_documented_seds_set_the_job_and_the_runbook_base(tmp_path: Path) -> None:
    # docs/deploy.md tells a plain-Prometheus operator to set both settings with sed: those very
    # commands, run on a copy, leave rules that promtool accepts and that name nothing else.
    seds = re.findall(r"`(sed -i '[^`]+' keepwarm-rules\.yml)`", (ROOT / "docs" / "deploy.md").read_text())
    assert len(seds) == 2, seds
    copy = tmp_path / "keepwarm-rules.yml"
    copy.write_text(RULES.read_text())
    for command in seds:
        subprocess.run(["sh", "-c", command], check=True, cwd=tmp_path, timeout=30)
    result = promtool("check", "rules", "--lint-fatal", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    moved = [r for g in yaml.safe_load(copy.read_text())["groups"] for r in g["rules"]]
    assert all(r["annotations"]["runbook_url"].startswith("https://wiki.example.org/keepwarm/runbook#")
               for r in moved if "alert" in r)
    named = {r.get("alert") or r.get("record") for r in moved
             if 'job="YOURJOB"' in r["expr"] or r.get("labels", {}).get("job") == "YOURJOB"}
    assert named == {"KeepwarmDown", "KeepwarmTargetMissing", "job:keepwarm_expected_targets:count"}
    assert 'job="keepwarm"' not in copy.read_text()


def test_every_fleet_alert_has_a_firing_case_and_a_quiet_case() -> None:
    data = yaml.safe_load(RULES.read_text())
    fleet = {rule["alert"] for group in data["groups"] if group["name"] == "keepwarm.fleet"
             for rule in group["rules"] if "alert" in rule}
    assert fleet == FLEET_ALERTS
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(FLEET_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == quiet == FLEET_ALERTS, (firing, quiet)
