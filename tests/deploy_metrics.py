"""Which keepwarm metrics the deploy artefacts query: alert and recording rules, the
PrometheusRule and the Grafana dashboard. A test that runs the daemon checks it exports each."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "keepwarm-rules.yml"
PROMETHEUS_RULE = ROOT / "deploy" / "kubernetes" / "components" / "monitoring" / "prometheusrule.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "keepwarm.json"

# Exported only by a fleet member (daemons sharing a PostgreSQL ledger), which the single daemons
# and registries of these tests are not: KeepwarmTargetMissing and the keepwarm.fleet group read
# them. tests/test_deploy_metric_names.py checks them on a fleet member of its own.
FLEET_ONLY = {"keepwarm_fleet_members", "keepwarm_fleet_owned_pairs", "keepwarm_fleet_lease_failures_total",
              "keepwarm_fleet_handovers_total", "keepwarm_fleet_min_members"}
NOT_YET_EXPORTED = FLEET_ONLY

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$", re.DOTALL)
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def rule_expressions() -> Iterator[str]:
    """Every `expr` of deploy/prometheus/keepwarm-rules.yml and of the PrometheusRule."""
    for groups in (
        yaml.safe_load(RULES.read_text())["groups"],
        yaml.safe_load(PROMETHEUS_RULE.read_text())["spec"]["groups"],
    ):
        for group in groups:
            for rule in group["rules"]:
                yield str(rule["expr"])


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_expressions() -> Iterator[str]:
    """Every PromQL expression of the dashboard: panel targets, and the series selectors of
    its `label_values(...)` variables. Template variables are left as written."""
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield str(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        match = _LABEL_VALUES.match(text.strip())
        if match:
            yield match.group(1)


def metric_names(expr: str) -> set[str]:
    """The `keepwarm_*` metric names an expression reads: string literals skipped, recording
    rule names (with ':') ignored, histogram series folded to the histogram's name."""
    names = set()
    for token in _NAME.findall(_STRING.sub('""', expr)):
        if token.startswith("keepwarm_") and ":" not in token:
            names.add(_HISTOGRAM_SUFFIX.sub("", token))
    return names


def metric_names_used() -> set[str]:
    """Every `keepwarm_*` metric the rules, the PrometheusRule and the dashboard query."""
    used: set[str] = set()
    for expr in (*rule_expressions(), *dashboard_expressions()):
        used |= metric_names(expr)
    return used
