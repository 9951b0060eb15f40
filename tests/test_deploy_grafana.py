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
    RULES,
    all_panels,
    dashboard_expressions,
    metric_names,
    metric_names_used,
)
from prometheus_client.parser import text_string_to_metric_families

from keepwarm.metrics import Metrics, PairStateValue


def exported_families() -> set[str]:
    """Every family keepwarm declares on /metrics, as PromQL names it (counters with _total)."""
    metrics = Metrics(per_pair="full")
    metrics.set_budget(1.0, 0.0)  # the budget gauges exist only with budget.usd_per_day
    families = text_string_to_metric_families(b"".join(metrics.exposition()).decode())
    return {f.name + "_total" if f.type == "counter" else f.name for f in families}


UNLABELLED = {"keepwarm_ping_lateness_seconds", "keepwarm_config_last_reload_successful", "keepwarm_build_info"}
# What Grafana puts in place of the variables, near enough for parsing.
SUBSTITUTIONS = {
    "expert": ".+", "model": ".+", "namespace": ".*", "job": ".+", "instance": ".+",
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


def test_only_exported_metrics_are_queried() -> None:
    assert metric_names_used() <= exported_families(), metric_names_used() - exported_families()
    # Histograms are read through their series, but named by their family.
    assert "keepwarm_ping_duration_seconds" in metric_names_used()


def test_every_recording_rule_the_dashboard_reads_exists() -> None:
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    read = {name for expr in dashboard_expressions() for name in re.findall(r"[a-z_]+:keepwarm_\w+:\w+", expr)}
    assert read, "the dashboard reads no recording rule"
    assert read <= recorded, read - recorded


def test_panels_read_recording_rules_rather_than_per_pair_ranges() -> None:
    # A range query over a raw per-pair family touches every pair's series at every refresh;
    # the recording rules have done that work once. Instant queries, bounded topk/bottomk and
    # the sparse error family (series only for what failed) are the exceptions.
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            if target.get("instant") or re.match(r"\s*(topk|bottomk)\(", expr):
                continue
            raw = {n for n in metric_names(expr) if n not in UNLABELLED} - {"keepwarm_ping_errors_total"}
            assert not raw, f"{panel['title']}: range query on raw per-pair {sorted(raw)}"


def test_every_query_follows_the_variables() -> None:
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for match in re.finditer(r"([a-z_]*:)?(keepwarm_\w+)(:\w+)?(\{[^}]*\})?", expr):
                rule, name, selector = match.group(1), match.group(2), match.group(4) or ""
                where = f"{panel['title']}: {match.group(0)}"
                assert 'namespace=~"$namespace"' in selector and 'job=~"$job"' in selector, where
                if rule is None:  # a raw series still has its instance label
                    assert 'instance=~"$instance"' in selector, where
                (family,) = metric_names(name) or {name}
                per_pair = rule in ("pair:", None) and family not in UNLABELLED
                if per_pair:
                    assert 'expert=~"$expert"' in selector and 'model=~"$model"' in selector, where


def test_variables() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "instance", "expert", "model"):
        assert variables[name]["type"] == "query"
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    for name in ("expert", "model"):
        assert "keepwarm_pair_info" in variables[name]["definition"]
    # Outside Kubernetes there is no namespace label: "All" must match the empty value.
    assert variables["namespace"]["allValue"] == ".*"


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
    for topic in ("state", "expires", "hit rate", "spend", "miss", "latency", "errors", "break-even",
                  "saved", "production hit rate"):
        assert any(topic in title for title in titles), f"no panel about {topic}: {titles}"
    rows = [p["title"] for p in all_panels(dashboard()["panels"]) if p["type"] == "row"]
    assert "Does it pay?" in rows


def test_state_is_shown_as_words() -> None:
    states = [p for p in panels() if "state" in p["title"].lower()]
    assert len(states) == 2
    words = {s.name.lower() for s in PairStateValue}
    for panel in states:
        mappings = panel["fieldConfig"]["defaults"].get("mappings")
        if mappings:  # a value per pair, mapped to its word
            (mapping,) = mappings
            assert {int(v): o["text"] for v, o in mapping["options"].items()} == {
                s.value: s.name.lower() for s in PairStateValue}
        else:  # a count per state, one query each, named by the word
            assert {t["legendFormat"] for t in panel["targets"]} == words


def test_layout_fits_the_grid_without_overlaps() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in all_panels(dashboard()["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells
