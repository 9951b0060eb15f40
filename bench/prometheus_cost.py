"""What monitoring keepwarm costs a real Prometheus at 10,000 pairs, before and after the series budget.

    python3 bench/prometheus_cost.py [--pairs 10000] [--seconds 330] [--before 2157f5f] [--variants before,standard,full]

For each variant it serves the /metrics page of N pairs in a healthy steady state from its own
process, has Debian's `prometheus` scrape it every --scrape-interval (30 s, as the issue
measured) with that variant's shipped rules evaluated every 30 s, and reports:

- series: Prometheus' head series (prometheus_tsdb_head_series) and the samples per scrape;
- bytes per scrape, plain and gzipped, and the time to serve each (fetched by this script);
- scrape duration as Prometheus saw it (scrape_duration_seconds), which gzips when it can;
- Prometheus' RSS (process_resident_memory_bytes, the peak over the window);
- rule evaluation, from every evaluation of every group seen in /api/v1/rules (polled every
  5 s): each group's median and slowest, the slowest rules, and the cost of one 30 s cycle
  (each group's median, a group evaluated every 5 minutes counted a tenth);
- the samples the rules' range selectors would read per 30 s cycle once their windows are
  full (series selected now x window / sample interval): a window of minutes hides what a
  [1d] or [7d] window costs after a week.

Variants: `before` is the code at --before (default 2157f5f, the commit before the budget),
extracted with `git archive` into a temporary directory and imported from there with this
interpreter (its dependencies are the same); `standard` and `full` are this tree in both
`metrics.per_pair` modes. The pairs are N/2 experts x 2 models; the page is filled as the
runner fills it after a cold start and warm pings (every kind of token, a cold_start miss, a
duration, the gauges), and a background thread keeps pinging N/240 pairs a second, as the
daemon does with a 4-minute interval, so counters move between scrapes.

Results go to bench/results/prometheus-cost.json; docs/performance.md has the table.
Only 127.0.0.1 is used; every process started is stopped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "prometheus-cost.json"
PROMPT = "You are a careful assistant. Answer briefly and cite your sources. " * 90


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the exporter: runs in its own process, with the variant's keepwarm first on sys.path ------


def serve(tree: Path, pairs: int, port: int, per_pair: str) -> None:
    """Serve the /metrics of `pairs` pairs from the keepwarm package in `tree` until SIGTERM."""
    sys.path.insert(0, str(tree))
    from keepwarm.config import parse_config
    from keepwarm.metrics import Metrics
    from keepwarm.web import WebServer

    doc = {
        "defaults": {"models": ["claude-sonnet-4-6", "claude-haiku-4-5"]},
        "experts": [{"name": f"expert-{i:05d}", "system": [{"text": PROMPT + str(i)}]} for i in range(pairs // 2)],
    }
    config = parse_config(doc, tree)
    metrics = Metrics() if per_pair == "before" else Metrics(per_pair=per_pair)  # type: ignore[arg-type]
    now = time.time()
    for pair in config.pairs:
        metrics.add_pair(pair)
        e, m = pair.expert, pair.model
        # A cold start, then a warm ping: what the runner records.
        metrics.pings.labels(e, m, "rewarmed").inc()
        metrics.pings.labels(e, m, "warm").inc()
        metrics.misses.labels(e, m, "cold_start").inc()
        for kind, n in (("input", 2), ("cache_read", 1500), ("cache_write_5m", 1500), ("output", 2)):
            metrics.tokens.labels(e, m, kind).inc(n)
            metrics.cost.labels(e, m, kind).inc(n * 3e-6)
        metrics.duration.labels(e, m).observe(0.4)
        metrics.last_ping.labels(e, m).set(now)
        metrics.expires.labels(e, m).set(now + 300)
        metrics.prefix_tokens.labels(e, m).set(1500)
        metrics.miss_penalty.labels(e, m).set(0.005)
    stop = threading.Event()

    def ping_on() -> None:  # N/240 warm pings a second, each pair every 4 minutes as the daemon does
        keys = list(config.pairs)
        random.Random(1).shuffle(keys)
        per_second = max(1, len(keys) // 240)
        turn = 0
        while not stop.wait(1.0):
            t = time.time()
            for pair in keys[turn:turn + per_second]:
                e, m = pair.expert, pair.model
                metrics.pings.labels(e, m, "warm").inc()
                metrics.tokens.labels(e, m, "cache_read").inc(1500)
                metrics.cost.labels(e, m, "cache_read").inc(1500 * 3e-7)
                metrics.duration.labels(e, m).observe(0.3)
                metrics.last_ping.labels(e, m).set(t)
                metrics.expires.labels(e, m).set(t + 300)
            turn = turn + per_second if turn + per_second < len(keys) else 0

    threading.Thread(target=ping_on, daemon=True).start()
    web = WebServer("127.0.0.1", port, metrics, lambda: [], lambda: (True, "ok"))
    web.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    web.stop()


# --- the measuring side ------------------------------------------------------------------------


def fetch(url: str, gzipped: bool) -> tuple[int, float]:
    """(bytes on the wire, seconds) for one scrape of `url`."""
    headers = {"Accept-Encoding": "gzip"} if gzipped else {}
    t0 = time.monotonic()
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=120) as resp:
        body = resp.read()
        encoded = resp.headers.get("Content-Encoding") == "gzip"
    elapsed = time.monotonic() - t0
    if gzipped and not encoded:
        return len(gzip.compress(body, 1)), elapsed  # what it would be; marked as not served
    return len(body), elapsed


def prom_metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return float("nan")


def prom_api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=30) as resp:
        return json.loads(resp.read())["data"]


def parse_seconds(text: str) -> float:
    """Prometheus' duration syntax, as used here (30s, 5m, 1h, 1d, 7d, 1h30m)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text))


def summarize(times: list[float], interval: float) -> dict[str, Any]:
    """A group's evaluations in the window: how many, median, max."""
    ordered = sorted(times)
    return {"evaluations": len(ordered), "interval_seconds": interval,
            "median_seconds": round(statistics.median(ordered), 4) if ordered else None,
            "max_seconds": round(ordered[-1], 4) if ordered else None}


# A selector with a range: name{matchers}[window] (subqueries and offsets are not used here).
_RANGE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\[(\d+[smhdwy])\]")


def steady_state_samples(url: str, rules: Path, intervals: dict[str, float], scrape: float) -> dict[str, Any]:
    """Samples the range selectors of each group read per 30 s cycle once the windows are full.

    A short window's figures hide this: [1d] over a series scraped every 30 s holds 2,880
    samples once Prometheus has a day of data, 5 after 150 s. For each range selector, the
    series it selects now (a count query) x the window / the interval its samples come at (the
    scrape interval for a raw metric, the recording group's interval for a recorded one),
    scaled to a 30 s cycle for a group with a longer interval.
    """
    doc = yaml.safe_load(rules.read_text())
    recorded_every = {r["record"]: intervals.get(g["name"], scrape) for g in doc["groups"]
                      for r in g["rules"] if "record" in r}
    main_interval = min(intervals.values(), default=scrape)
    out: dict[str, Any] = {}
    for group in doc["groups"]:
        total = 0.0
        for rule in group["rules"]:
            for name, matchers, window in _RANGE.findall(rule["expr"]):
                found = prom_api(url, "query", query=f"count({name}{matchers or ''})")["result"]
                series = float(found[0]["value"][1]) if found else 0.0
                total += series * parse_seconds(window) / recorded_every.get(name, scrape)
        out[group["name"]] = round(total * main_interval / intervals.get(group["name"], main_interval))
    out["total"] = sum(out.values())
    return out


def measure(variant: str, tree: Path, rules: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One variant: exporter and Prometheus up, a window of scrapes, the figures."""
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, __file__, "serve", "--tree", str(tree), "--pairs", str(args.pairs), "--port", str(port),
         "--per-pair", variant],
        stdout=subprocess.PIPE, text=True,
    )
    prom_port = free_port()
    prom_url = f"http://127.0.0.1:{prom_port}"
    config = workdir / f"prometheus-{variant}.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": args.scrape_interval, "evaluation_interval": args.scrape_interval,
                   "scrape_timeout": args.scrape_interval},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "keepwarm", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }))
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        assert exporter.stdout is not None
        t0 = time.monotonic()
        line = exporter.stdout.readline()
        assert line.strip() == "ready", f"exporter for {variant} did not start: {line!r}"
        setup_s = time.monotonic() - t0
        page = f"http://127.0.0.1:{port}/metrics"
        plain_bytes, plain_s = fetch(page, gzipped=False)
        gzip_bytes, gzip_s = fetch(page, gzipped=True)
        with urllib.request.urlopen(urllib.request.Request(page, headers={"Accept-Encoding": "gzip"}), timeout=120) as r:
            gzip_served = r.headers.get("Content-Encoding") == "gzip"
            r.read()
        prometheus = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={workdir / ('data-' + variant)}", f"--web.listen-address=127.0.0.1:{prom_port}",
             "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=(workdir / f"prometheus-{variant}.log").open("wb"),
        )
        peak_rss = last_rss = 0.0
        # Every evaluation of every group and rule, told apart by its lastEvaluation time.
        evaluations: dict[str, dict[str, float]] = {}
        rule_seconds: dict[str, float] = {}
        intervals: dict[str, float] = {}
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(5)
            if prometheus.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(workdir / f'prometheus-{variant}.log').read_text()[-2000:]}")
            try:
                last_rss = prom_metric(prom_url, "process_resident_memory_bytes")
                peak_rss = max(peak_rss, last_rss)
                for group in prom_api(prom_url, "rules")["groups"]:
                    name, last = group["name"], group["lastEvaluation"]
                    intervals[name] = float(group["interval"])
                    if last.startswith("0001-") or last in evaluations.setdefault(name, {}):
                        continue  # not evaluated yet, or already counted
                    evaluations[name][last] = group["evaluationTime"]
                    for rule in group["rules"]:
                        rule_seconds[rule["name"]] = max(rule_seconds.get(rule["name"], 0.0), rule["evaluationTime"])
            except OSError:
                continue  # not up yet
        groups = {name: summarize(list(times.values()), intervals[name]) for name, times in evaluations.items()}
        # What a 30 s cycle costs: each group's median evaluation, a group with a longer
        # interval counted for the share of cycles it runs in.
        main_interval = min(intervals.values(), default=30.0)
        cycle = sum(g["median_seconds"] * main_interval / g["interval_seconds"] for g in groups.values())
        steady = steady_state_samples(prom_url, rules, intervals, parse_seconds(args.scrape_interval))
        head_series = prom_metric(prom_url, "prometheus_tsdb_head_series")
        samples = prom_api(prom_url, "query", query="scrape_samples_scraped")["result"]
        durations = prom_api(prom_url, "query", query="max_over_time(scrape_duration_seconds[10m])")["result"]
        # The state measured must be the healthy one: pairs not warm, and alerts firing, at the end.
        not_warm = prom_api(prom_url, "query", query="count(keepwarm_pair_state != 1)")["result"]
        firing = prom_api(prom_url, "query", query='count by (alertname) (ALERTS{alertstate="firing"})')["result"]
        return {
            "variant": variant,
            "exporter_setup_seconds": round(setup_s, 1),
            "samples_per_scrape": float(samples[0]["value"][1]) if samples else None,
            "series_per_pair": float(samples[0]["value"][1]) / args.pairs if samples else None,
            "prometheus_head_series": head_series,
            "bytes_plain": plain_bytes,
            "serve_plain_seconds": round(plain_s, 2),
            "bytes_gzip": gzip_bytes,
            "gzip_served": gzip_served,
            "serve_gzip_seconds": round(gzip_s, 2),
            "prometheus_scrape_duration_max_seconds": float(durations[0]["value"][1]) if durations else None,
            "prometheus_peak_rss_bytes": peak_rss,
            "prometheus_rss_at_end_bytes": last_rss,
            "pairs_not_warm_at_end": float(not_warm[0]["value"][1]) if not_warm else 0.0,
            "alerts_firing_at_end": {a["metric"]["alertname"]: float(a["value"][1]) for a in firing},
            "rule_groups": groups,
            "rule_evaluation_max_seconds": max((g["max_seconds"] for g in groups.values()), default=None),
            "rule_evaluation_per_cycle_seconds": round(cycle, 3),
            "slowest_rules_seconds": dict(sorted(rule_seconds.items(), key=lambda kv: -kv[1])[:5]),
            "steady_state_samples_per_cycle": steady,
        }
    finally:
        for proc in (prometheus, exporter):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    srv = sub.add_parser("serve", help="(internal) serve one variant's /metrics")
    srv.add_argument("--tree", type=Path, required=True)
    srv.add_argument("--pairs", type=int, required=True)
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--per-pair", required=True)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=330.0,
                        help="window per variant (default 330: the 5-minute money group runs at least once)")
    parser.add_argument("--scrape-interval", default="30s", help="scrape and rule interval (default 30s)")
    parser.add_argument("--before", default="2157f5f", help="the commit measured as `before`")
    parser.add_argument("--variants", default="before,standard,full")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="what else ran on the machine, kept in the results")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.tree, args.pairs, args.port, args.per_pair)
        return 0
    if not shutil.which("prometheus"):
        print("prometheus not found (Debian package prometheus)", file=sys.stderr)
        return 1
    started = datetime.now(UTC)
    load_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="kw-prometheus-cost-") as tmp:
        workdir = Path(tmp)
        before = workdir / "before"
        before.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        for variant in args.variants.split(","):
            tree = before if variant == "before" else ROOT
            rules = tree / "deploy" / "prometheus" / "keepwarm-rules.yml"
            print(f"[{datetime.now():%H:%M:%S}] {variant}: {args.pairs} pairs for {args.seconds:.0f} s", flush=True)
            figures = measure(variant, tree, rules, args, workdir)
            print(json.dumps(figures), flush=True)
            results.append(figures)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {
        "benchmark": "prometheus_cost",
        "measured_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python3 bench/prometheus_cost.py " + " ".join(sys.argv[1:]),
        "machine": {
            "node": platform.node(), "nproc": os.cpu_count(), "python": platform.python_version(),
            "prometheus": subprocess.run(["prometheus", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
            "load_average_at_start": [round(x, 2) for x in load_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": args.note,
        },
        "tree": {"commit": commit, "before": args.before},
        "setup": {"pairs": args.pairs, "window_seconds": args.seconds, "scrape_and_rule_interval": args.scrape_interval},
        "results": results,
    }
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
