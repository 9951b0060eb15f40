"""deploy/grafana/keepwarm.json: a dashboard Grafana can import, whose every query parses.

promtool has no command that checks a lone expression, but `promtool check rules` parses
every rule's expr: the dashboard's queries, template variables substituted, are written out as
recording rules of a temporary rules file and checked that way.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from deploy_metrics import (
    DASHBOARD,
    FLEET_ONLY,
    NOT_YET_EXPORTED,
    RULES,
    all_panels,
    dashboard_expressions,
    metric_names,
    metric_names_used,
)
from prometheus_client.parser import text_string_to_metric_families

from keepwarm.metrics import Metrics, PairStateValue

ROOT = Path(__file__).resolve().parent.parent


def exported_families() -> set[str]:
    """Every family keepwarm declares on /metrics, as PromQL names it (counters with _total)."""
    metrics = Metrics(per_pair="full")
    metrics.set_budget(1.0, 0.0)  # the budget gauges exist only with budget.usd_per_day
    families = text_string_to_metric_families(b"".join(metrics.exposition()).decode())
    return {f.name + "_total" if f.type == "counter" else f.name for f in families}


# Families with a series per process, not per pair: a range query over them reads a few series.
UNLABELLED = {"keepwarm_ping_lateness_seconds", "keepwarm_config_last_reload_successful", "keepwarm_build_info",
              *FLEET_ONLY}
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
    assert metric_names_used() - NOT_YET_EXPORTED <= exported_families(), metric_names_used() - exported_families()
    # Histograms are read through their series, but named by their family.
    assert "keepwarm_ping_duration_seconds" in metric_names_used()


def test_every_recording_rule_the_dashboard_reads_exists() -> None:
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"]
                for rule in group["rules"] if "record" in rule}
    read = {name for expr in dashboard_expressions() for name in re.findall(r"[a-z_]+:keepwarm_\w+:\w+", expr)}
    assert read, "the dashboard reads no recording rule"
    assert read <= recorded, read - recorded


def test_panels_read_recording_rules_rather_than_per_pair_ranges() -> None:
    # A range query over a raw per-pair family reads every pair's series at every step of
    # every refresh (a topk too: it ranks all of them at each step); the recording rules have
    # done that work once, per job or per target. Only instant queries read raw per-pair series.
    for panel in panels():
        for target in panel["targets"]:
            if target.get("instant"):
                continue
            raw = {n for n in metric_names(target["expr"]) if n not in UNLABELLED}
            assert not raw, f"{panel['title']}: range query on raw per-pair {sorted(raw)}"


PER_PAIR_ROWS = re.compile(r"\s*(topk|bottomk)\((10|20),")


def test_no_panel_shows_a_row_per_pair() -> None:
    # At 10,000 pairs a table with a row per pair is unreadable and heavy: an instant query that
    # keeps the expert and model labels is a top 10 or 20; the others sum or count them away.
    for panel in panels():
        for target in panel["targets"]:
            expr = " ".join(target["expr"].split())
            per_pair = metric_names(expr) - UNLABELLED or "pair:" in expr
            if not per_pair or PER_PAIR_ROWS.match(expr):
                continue
            assert re.match(r"(sum|count) (by|without) \(", expr) or "instance:" in expr or "job:" in expr or \
                " and on (namespace, job, expert, model) topk(20, " in expr, f"{panel['title']}: {expr}"
            if re.match(r"(sum|count) without \(", expr):
                assert "expert" in expr.split(")")[0] or "instance:" in expr, f"{panel['title']}: {expr}"


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


def bench_module() -> ModuleType:
    """bench/dashboard_cost.py: the same checks, at 10,000 pairs, as a benchmark."""
    spec = importlib.util.spec_from_file_location("bench_dashboard_cost", ROOT / "bench" / "dashboard_cost.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PAIRS = 1_000


def test_every_panel_query_answers_on_a_real_prometheus_within_its_default_limits(tmp_path: Path) -> None:
    # Debian's prometheus scrapes keepwarm's own /metrics for 1,000 pairs (2% of them cold, 1%
    # re-written) with the shipped rules, and every panel's query runs as Grafana sends it:
    # instant for tables and stats, over the dashboard's 6 hours for graphs. Each answers
    # without error or warning, within a tenth of the default sample limit even at ten times
    # the pairs, and with at most 20 series: no table or graph has a line per pair.
    bench = bench_module()
    exporter = bench.Exporter(bench.fill(PAIRS), bench.free_port())
    rules = bench.rules_for_minutes(tmp_path, tile="4s", every_group_at_once=True)
    prometheus = bench.Prometheus(tmp_path, [exporter.target], "2s", rules)
    try:
        bench.ready(prometheus, 60)
        time.sleep(4)  # the tiles: a second 4 s round
        results = [bench.run_query(prometheus, query) for query in bench.panel_queries()]
    finally:
        prometheus.stop()
        exporter.stop()
    assert len(results) == sum(len(p["targets"]) for p in panels())
    for result in results:
        where = f"{result['panel']} {result['ref']}: {result['expr']}"
        assert result["status"] == "success" and not result["warnings"], (where, result["error"], result["warnings"])
        assert result["series"] <= 20, where
        assert result["peak_samples"] is not None and result["peak_samples"] * 10_000 / PAIRS < bench.MAX_SAMPLES / 10, where
        assert result["seconds"] < bench.TIMEOUT / 10, where
    # The top-20 tables found what the exporter put there: the check reads real answers.
    answered = {(r["panel"], r["ref"]): r["series"] for r in results}
    assert answered[("Pairs not warm (worst 20, state now)", "A")] == 20
    assert answered[("Coldest caches: expired longest ago (20 pairs)", "A")] == 20
    assert answered[("Most expensive pairs: spend, miss cost and break-even (top 20)", "B")] == 20
    assert answered[("Unhealthy pairs per target", "A")] == 1
