"""Every query of the Grafana dashboard against a real Prometheus holding N pairs.

    python3 bench/dashboard_cost.py [--pairs 10000] [--warmup 150]

An exporter in this process serves keepwarm's /metrics for N pairs (N/2 experts x 2 models,
filled by keepwarm's own Metrics as the runner fills it: a cold start then warm pings, every
kind of token; 2% of the pairs with caches that expired, 1% re-written twice), and Debian's
`prometheus` scrapes it every 15 s with the shipped rules (the 5-minute money tiles at 1 minute,
their windows with them, so that a few minutes give them values; the 2-minute groups as
shipped). After --warmup seconds every panel query runs as Grafana runs it: an instant query
for tables, stats and bar gauges, a range query over the dashboard's default 6 hours at a
15 s step for graphs. For each: the answer's status and warnings, how many series it
returned, the peak samples Prometheus held for it (`stats=all`) against its default
`--query.max-samples` of 50,000,000, and the wall time against the default 2-minute timeout.
Also Prometheus' head series and each rule group's last evaluation time.

Results go to bench/results/dashboard-cost.json; docs/deploy.md has the table. The test suite
runs the same checks at 1,000 pairs (tests/test_deploy_grafana.py). Only 127.0.0.1 is used;
every process started is stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DASHBOARD = ROOT / "deploy" / "grafana" / "keepwarm.json"
RULES = ROOT / "deploy" / "prometheus" / "keepwarm-rules.yml"
RESULTS = ROOT / "bench" / "results" / "dashboard-cost.json"
PROMPT = "You are a careful assistant. Answer briefly and cite your sources. " * 90
MAX_SAMPLES = 50_000_000  # Prometheus' default --query.max-samples
TIMEOUT = 120.0  # Prometheus' default --query.timeout
# What Grafana puts in place of the variables with "All" selected.
VARIABLES = {"namespace": ".*", "job": ".+", "instance": ".+", "expert": ".+", "model": ".+",
             "__rate_interval": "1m", "__interval": "15s", "__range": "6h"}


def fill(pairs: int) -> Any:
    """keepwarm's Metrics for `pairs` pairs after a cold start and a warm ping each; a few cold."""
    from keepwarm.config import parse_config
    from keepwarm.metrics import Metrics

    doc = {
        "defaults": {"models": ["claude-sonnet-4-6", "claude-haiku-4-5"]},
        "experts": [{"name": f"expert-{i:05d}", "system": [{"text": PROMPT + str(i)}]} for i in range(pairs // 2)],
    }
    config = parse_config(doc, ROOT)
    metrics = Metrics()
    now = time.time()
    for n, pair in enumerate(config.pairs):
        metrics.add_pair(pair)
        e, m = pair.expert, pair.model
        metrics.pings.labels(e, m, "rewarmed").inc()
        metrics.pings.labels(e, m, "warm").inc()
        metrics.misses.labels(e, m, "cold_start").inc()
        for kind, tokens in (("input", 2), ("cache_read", 1500), ("cache_write_5m", 1500), ("output", 2)):
            metrics.tokens.labels(e, m, kind).inc(tokens)
            metrics.cost.labels(e, m, kind).inc(tokens * 3e-6 * (1 + n % 7))
        metrics.duration.labels(e, m).observe(0.4)
        stale = n % 50 == 0  # 2% of the caches expired ten minutes ago, nothing pinged them since
        metrics.last_ping.labels(e, m).set(now - 900 if stale else now)
        metrics.expires.labels(e, m).set(now - 600 if stale else now + 300)
        metrics.prefix_tokens.labels(e, m).set(1500)
        metrics.miss_penalty.labels(e, m).set(0.005 * (1 + n % 11))
        if n % 100 == 1:  # 1% found their cache evicted, twice
            metrics.misses.labels(e, m, "unexplained").inc(2)
    return metrics


class Exporter:
    """/metrics of `metrics` on 127.0.0.1, rendered at every scrape."""

    def __init__(self, metrics: Any, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = b"".join(metrics.exposition())
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.target = f"127.0.0.1:{port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rules_for_minutes(directory: Path, tile: str = "1m", every_group_at_once: bool = False) -> Path:
    """The shipped rules, the 5-minute tile groups every `tile` (their windows with them); with
    `every_group_at_once` the 2-minute groups at the global interval too (a test of seconds)."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        if group.get("interval") == "5m":
            group["interval"] = tile
            for rule in group["rules"]:
                rule["expr"] = rule["expr"].replace("[5m]", f"[{tile}]")
        elif group.get("interval") == "2m" and every_group_at_once:
            del group["interval"]
    path = directory / "rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Prometheus:
    """Debian's `prometheus` on loopback scraping `targets` with the shipped rules."""

    def __init__(self, directory: Path, targets: list[str], scrape: str, rules: Path | None = None) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus not found: scripts/test installs it (Debian package prometheus)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": scrape, "scrape_timeout": scrape, "evaluation_interval": scrape},
            "rule_files": [str(rules or rules_for_minutes(directory))],
            "scrape_configs": [{"job_name": "keepwarm", "static_configs": [{"targets": targets}]}],
        }))
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(directory / "prometheus.log").open("wb"),
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT + 10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as error:  # 4xx/5xx answers carry the error as JSON
            return json.loads(error.read())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def panel_queries() -> list[dict[str, Any]]:
    """Every target of every panel: title, refId, expression with the variables put in, instant?"""
    dashboard = json.loads(DASHBOARD.read_text())

    def walk(panels: list[dict[str, Any]]) -> Any:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    def put(match: re.Match[str]) -> str:
        return VARIABLES[match.group(1) or match.group(2)]

    queries = []
    for panel in walk(dashboard["panels"]):
        for target in panel.get("targets", []):
            expr = re.sub(r"\$\{(\w+)\}|\$(\w+)", put, target["expr"])
            queries.append({"panel": panel["title"], "ref": target["refId"], "expr": expr,
                            "instant": bool(target.get("instant"))})
    return queries


def run_query(prometheus: Prometheus, query: dict[str, Any], hours: float = 6.0) -> dict[str, Any]:
    """One query as Grafana sends it, with its cost."""
    now = time.time()
    t0 = time.monotonic()
    if query["instant"]:
        answer = prometheus.get("query", query=query["expr"], time=f"{now:.3f}", stats="all")
    else:
        answer = prometheus.get("query_range", query=query["expr"], start=f"{now - hours * 3600:.3f}",
                                end=f"{now:.3f}", step="15", stats="all")
    seconds = time.monotonic() - t0
    data = answer.get("data", {})
    samples = data.get("stats", {}).get("samples", {})
    return {
        **query,
        "status": answer["status"],
        "error": answer.get("error"),
        "warnings": answer.get("warnings", []),
        "series": len(data.get("result", [])),
        "peak_samples": samples.get("peakSamples"),
        "total_samples": samples.get("totalQueryableSamples"),
        "seconds": round(seconds, 3),
    }


def ready(prometheus: Prometheus, deadline: float) -> None:
    """Until the rules every panel reads have values (or `deadline` seconds pass)."""
    wanted = ("job:keepwarm_pair_state:count", "instance:keepwarm_pair_state:count",
              "instance:keepwarm_pairs_unhealthy:count", "job:keepwarm_spend_usd:increase5m",
              "job:keepwarm_pings_by_result:rate5m")
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if all(prometheus.get("query", query=name).get("data", {}).get("result") for name in wanted):
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the rules had no values after {deadline:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--warmup", type=float, default=150.0, help="seconds of scrapes and rules before querying")
    args = parser.parse_args()
    t_fill = time.monotonic()
    metrics = fill(args.pairs)
    fill_s = time.monotonic() - t_fill
    exporter = Exporter(metrics, free_port())
    with tempfile.TemporaryDirectory() as tmp:
        prometheus = Prometheus(Path(tmp), [exporter.target], "15s")
        try:
            time.sleep(args.warmup)
            ready(prometheus, 120)
            results = [run_query(prometheus, q) for q in panel_queries()]
            with urllib.request.urlopen(f"{prometheus.url}/api/v1/status/tsdb", timeout=30) as resp:
                head = json.loads(resp.read())["data"]["headStats"]["numSeries"]
            # What each rule group took at its last evaluation: the rules' side of the cost.
            groups = {g["name"]: round(g["evaluationTime"], 3) for g in prometheus.get("rules")["data"]["groups"]}
        finally:
            prometheus.stop()
            exporter.stop()
    worst = max(results, key=lambda r: r["peak_samples"] or 0)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": __import__("os").cpu_count(), "python": platform.python_version(),
        "command": " ".join(["python3", "bench/dashboard_cost.py", *sys.argv[1:]]),
        "pairs": args.pairs, "warmup_s": args.warmup, "fill_s": round(fill_s, 1),
        "head_series": head,
        "rule_group_seconds": groups,
        "queries": len(results),
        "all_success": all(r["status"] == "success" and not r["warnings"] for r in results),
        "max_series": max(r["series"] for r in results),
        "max_peak_samples": worst["peak_samples"], "max_peak_samples_panel": worst["panel"],
        "max_seconds": max(r["seconds"] for r in results),
        "limits": {"max_samples": MAX_SAMPLES, "timeout_s": TIMEOUT},
        "results": results,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        print(f"{r['status']:8} {r['series']:6} series {r['peak_samples'] or 0:>10} peak {r['seconds']:7.3f} s  "
              f"{'instant' if r['instant'] else 'range  '}  {r['panel']} {r['ref']}")
    print(f"rule groups, last evaluation (s): {groups}")
    print(f"head series {report['head_series']}, max peak samples {report['max_peak_samples']} "
          f"({report['max_peak_samples_panel']}), max {report['max_seconds']} s -> {RESULTS}")
    return 0 if report["all_success"] else 1


if __name__ == "__main__":
    sys.exit(main())
