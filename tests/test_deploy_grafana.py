"""deploy/grafana/keepwarm.json: a dashboard Grafana can import, whose every query parses.

promtool has no command that checks a lone expression, but `promtool check rules` parses
every rule's expr: the dashboard's queries, template variables substituted, are written out as
recording rules of a temporary rules file and checked that way.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from deploy_metrics import (
    DASHBOARD,
    all_panels,
    dashboard_expressions,
    metric_names,
    metric_names_used,
)

# The metrics of SPEC §5, plus the pair's configured interval the daemon also exports.
CONTRACT_METRICS = {
    "keepwarm_pings_total",
    "keepwarm_ping_errors_total",
    "keepwarm_tokens_total",
    "keepwarm_cost_usd_total",
    "keepwarm_ping_duration_seconds",
    "keepwarm_ping_lateness_seconds",
    "keepwarm_last_ping_timestamp_seconds",
    "keepwarm_cache_expires_timestamp_seconds",
    "keepwarm_prefix_tokens",
    "keepwarm_miss_penalty_usd",
    "keepwarm_pair_info",
    "keepwarm_config_last_reload_successful",
    "keepwarm_build_info",
    "keepwarm_ping_interval_seconds",
    # Production observations (the keepwarm.production rule group).
    "keepwarm_production_requests_total",
    "keepwarm_production_tokens_total",
    "keepwarm_production_cost_usd_total",
    "keepwarm_saved_usd_total",
    "keepwarm_prefix_drift_total",
    "keepwarm_pings_skipped_total",
    "keepwarm_observations_rejected_total",
    # The spend cap (the keepwarm.budget rule group), exported only with budget.usd_per_day.
    "keepwarm_budget_usd_per_day",
    "keepwarm_budget_spent_usd",
}
UNLABELLED = {"keepwarm_ping_lateness_seconds", "keepwarm_config_last_reload_successful", "keepwarm_build_info"}
# What Grafana puts in place of the variables, near enough for parsing.
SUBSTITUTIONS = {
    "expert": ".+", "model": ".+",
    "__interval": "5m", "__rate_interval": "2m", "__range": "6h",
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard()["panels"]) if p["type"] != "row"]


def substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in SUBSTITUTIONS, f"unknown template variable ${name} in {expr}"
        return SUBSTITUTIONS[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def test_every_expression_parses(tmp_path: Path) -> None:
    exprs = list(dashboard_expressions())
    assert len(exprs) >= 15
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard_query_{n}", "expr": substitute(expr)} for n, expr in enumerate(exprs)
    ]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: scripts/test installs it (Debian package prometheus)"
    result = subprocess.run([promtool, "check", "rules", "--lint=none", str(path)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_the_parse_check_catches_a_broken_query(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "dashboard_query_0", "expr": substitute('sum by (expert (keepwarm_pings_total{expert=~"$expert"})')}
    ]}]}))
    result = subprocess.run([shutil.which("promtool") or "promtool", "check", "rules", str(path)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_only_contract_metrics_are_queried() -> None:
    assert metric_names_used() <= CONTRACT_METRICS, metric_names_used() - CONTRACT_METRICS
    # Histograms are read through their series, but named by their family.
    assert "keepwarm_ping_duration_seconds" in metric_names_used()


def test_pair_metrics_follow_the_expert_and_model_variables() -> None:
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for match in re.finditer(r"(keepwarm_\w+)(\{[^}]*\})?", expr):
                (name,) = metric_names(match.group(1)) or {match.group(1)}
                if name in UNLABELLED:
                    continue
                selector = match.group(2) or ""
                assert 'expert=~"$expert"' in selector and 'model=~"$model"' in selector, (
                    f"{panel['title']}: {match.group(0)} ignores the variables"
                )


def test_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("expert", "model"):
        assert variables[name]["type"] == "query"
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert "keepwarm_pair_info" in variables[name]["definition"]


def test_panels_use_the_datasource_variable_and_have_ids() -> None:
    ids = [p["id"] for p in all_panels(dashboard()["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_operator_questions_each_have_a_panel() -> None:
    titles = [p["title"].lower() for p in panels()]
    for topic in ("state", "expires", "hit rate", "spend", "miss", "latency", "errors", "break-even"):
        assert any(topic in title for title in titles), f"no panel about {topic}: {titles}"


def test_state_is_shown_as_words() -> None:
    states = [p for p in panels() if "state" in p["title"].lower()]
    assert states
    for panel in states:
        (mapping,) = panel["fieldConfig"]["defaults"]["mappings"]
        assert {option["text"] for option in mapping["options"].values()} == {"warm", "cold", "uncached"}


def test_layout_fits_the_grid_without_overlaps() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in all_panels(dashboard()["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
