"""The shipped rules and Alertmanager example together, on a real Prometheus and a real
Alertmanager (Debian's `prometheus` and `prometheus-alertmanager`), on loopback.

What the operator receives is the point: a stuck target is one page, with its per-pair alerts
inhibited; one early eviction is quiet and repeated re-writes are one ticket; a missing shard
and a pair exported twice are noticed.

The targets are three small exporters in this process serving keepwarm's metric families in
Prometheus' text format, so that each can be put in a state a real daemon reaches only after
minutes or hours (a scheduler stuck for a whole TTL, a cache evicted twice): the rules read
only what the daemon exports, and tests/test_deploy_metric_names.py checks that a running
daemon exports every family they read. tests/test_prometheus_server.py runs the same rules
against real daemons.

Time: Prometheus scrapes and evaluates every second, and the alerts' `for` durations and
Alertmanager's group timings are divided by SCALE together, so that their order (the rollup
fires before the per-pair alerts it inhibits) is the shipped one. The rules are otherwise as
shipped, except for the expectation job:keepwarm_expected_targets:count, set to 4 as for four
shards (three are scraped: one is missing).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, free_port

RULES = ROOT / "deploy" / "prometheus" / "keepwarm-rules.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
SCALE = 20  # `for: 2m` becomes 6 s, group_wait 30 s becomes 1.5 s
DEADLINE = 90.0

STUCK_PAIRS = 12  # a stuck scheduler: every pair cold


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", duration))


def _scaled(duration: str) -> str:
    return f"{round(_seconds(duration) * 1000 / SCALE)}ms"  # whole ms: Alertmanager takes no "1.5s"


def scaled_rules(directory: Path, expected_targets: int) -> Path:
    """The shipped rules, every group at the global 1 s, every `for` divided by SCALE."""
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        group.pop("interval", None)
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = _scaled(rule["for"])
            if rule.get("record") == "job:keepwarm_expected_targets:count":
                rule["expr"] = str(expected_targets)
    path = directory / "rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Exporter:
    """One scrape target: keepwarm's families for a set of pairs, changed by the test."""

    def __init__(self, pairs: dict[str, int]) -> None:
        self.state = dict(pairs)  # expert -> keepwarm_pair_state
        self.misses: dict[str, int] = {}  # expert -> unexplained re-writes so far
        self.lock = threading.Lock()
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = exporter.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.target = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def render(self) -> str:
        with self.lock:
            lines = ["# TYPE keepwarm_pair_state gauge"]
            lines += [f'keepwarm_pair_state{{expert="{e}",model="sonnet"}} {v}' for e, v in self.state.items()]
            lines += [f'keepwarm_pair_info{{expert="{e}",model="sonnet",ttl="5m",fingerprint="f"}} 1' for e in self.state]
            lines.append("# TYPE keepwarm_cache_misses_total counter")
            lines += [f'keepwarm_cache_misses_total{{expert="{e}",model="sonnet",cause="unexplained"}} {n}'
                      for e, n in self.misses.items()]
            lines.append("# TYPE keepwarm_pings_deferred_total counter")
            lines.append("keepwarm_pings_deferred_total 0")
            return "\n".join(lines) + "\n"

    def evict(self, expert: str) -> None:
        """One more early eviction of `expert`'s cache, found and re-written by its last ping."""
        with self.lock:
            self.misses[expert] = self.misses.get(expert, 0) + 1
            self.state[expert] = 6

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Receiver:
    """The webhook both of the example's receivers post to: every notification, by path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.received.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notified(self, path: str) -> list[tuple[str, str]]:
        """(alertname, instance) of every firing alert in the notifications sent to `path`."""
        return [(a["labels"]["alertname"], a["labels"].get("instance", ""))
                for p, body in list(self.received) if p == path
                for a in body["alerts"] if a["status"] == "firing"]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def alertmanager_config(directory: Path, receiver: Receiver) -> Path:
    """The shipped example with its webhooks pointed at `receiver` and its timings scaled."""
    doc = yaml.safe_load(ALERTMANAGER.read_text())
    for route in (doc["route"], *doc["route"].get("routes", [])):
        for key in ("group_wait", "group_interval", "repeat_interval"):
            if key in route:
                route[key] = _scaled(route[key])
    for item in doc["receivers"]:
        for hook in item["webhook_configs"]:
            hook["url"] = receiver.url + urllib.parse.urlsplit(hook["url"]).path
    path = directory / "alertmanager.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: scripts/test installs it (Debian package {package})"
    return path


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    exporters = {
        # 12 pairs, every one cold: the scheduler of this process is stuck.
        "stuck": Exporter({f"s{i:02d}": 2 for i in range(STUCK_PAIRS)}),
        # 3 pairs, healthy but for evictions the test makes.
        "healthy": Exporter({"once": 1, "again": 1, "shared": 1}),
        # 1 pair, which `healthy` exports too: two daemons ping it.
        "twin": Exporter({"shared": 1}),
    }
    receiver = Receiver()
    am_port = free_port()
    alertmanager = subprocess.Popen(
        [_binary("prometheus-alertmanager", "prometheus-alertmanager"),
         f"--config.file={alertmanager_config(tmp_path, receiver)}", f"--storage.path={tmp_path / 'am'}",
         f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address=", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "alertmanager.log").open("wb"),
    )
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(scaled_rules(tmp_path, expected_targets=4))],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
        "scrape_configs": [{"job_name": "keepwarm",
                            "static_configs": [{"targets": [e.target for e in exporters.values()]}]}],
    }))
    prometheus = subprocess.Popen(
        [_binary("prometheus", "prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        for name, proc, url in (("alertmanager", alertmanager, f"http://127.0.0.1:{am_port}"),
                                ("prometheus", prometheus, f"http://127.0.0.1:{prom_port}")):
            def ready(proc: subprocess.Popen[bytes] = proc, url: str = url) -> bool:
                assert proc.poll() is None, f"exited: see {tmp_path}/*.log"
                with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as resp:
                    return resp.status == 200
            wait_until(f"{name} to be ready", ready, 30)
        yield {"exporters": exporters, "receiver": receiver,
               "prometheus": f"http://127.0.0.1:{prom_port}", "alertmanager": f"http://127.0.0.1:{am_port}"}
    finally:
        for proc in (prometheus, alertmanager):
            proc.kill()
            proc.wait()
        for exporter in exporters.values():
            exporter.stop()
        receiver.server.shutdown()
        receiver.server.server_close()


def wait_until(what: str, check: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Poll `check` until it holds, or fail after `deadline` s."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if check():
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"timed out after {deadline:.0f}s waiting for {what}")


def test_a_stuck_target_is_one_page_and_a_single_eviction_is_quiet(stack: dict[str, Any]) -> None:
    prometheus, alertmanager, receiver = stack["prometheus"], stack["alertmanager"], stack["receiver"]
    exporters: dict[str, Exporter] = stack["exporters"]
    stuck, healthy, twin = (exporters[k].target for k in ("stuck", "healthy", "twin"))

    def firing() -> set[tuple[str, str, str]]:
        alerts = _get(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
        return {(a["labels"]["alertname"], a["labels"].get("instance", ""), a["labels"].get("expert", ""))
                for a in alerts if a["state"] == "firing"}

    def targets_up() -> bool:
        active = _get(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        return len(active) == 3 and all(t["health"] == "up" for t in active)

    wait_until("every target up", targets_up)
    # One early eviction of `once`, two of `again`.
    healthy_exporter = exporters["healthy"]
    healthy_exporter.evict("once")
    healthy_exporter.evict("again")
    time.sleep(2)  # two scrapes with one re-write each
    healthy_exporter.evict("again")

    per_pair_stale = {("KeepwarmPingsStale", stuck, f"s{i:02d}") for i in range(STUCK_PAIRS)}
    expected = per_pair_stale | {
        ("KeepwarmTargetUnhealthy", stuck, ""),
        ("KeepwarmCacheCold", healthy, "again"),
        ("KeepwarmTargetMissing", "", ""),
        ("KeepwarmPairDuplicated", "", "shared"),
    }
    seen: set[tuple[str, str, str]] = set()

    def everything_fires() -> bool:
        now = firing()
        seen.update(now)
        return now == expected

    wait_until(f"exactly {len(expected)} alerts to fire in Prometheus", everything_fires)
    # The single eviction never fired, on the way or at the end.
    assert not {a for a in seen if a[2] == "once"}, seen
    assert seen <= expected, sorted(seen - expected)

    # Alertmanager holds every per-pair alert of the stuck target back, inhibited by the rollup.
    def stuck_alerts_settled() -> bool:
        alerts = _get(f"{alertmanager}/api/v2/alerts?active=true&inhibited=true&silenced=false")
        stale = [a for a in alerts if a["labels"]["alertname"] == "KeepwarmPingsStale"]
        return len(stale) == STUCK_PAIRS and all(a["status"]["state"] == "suppressed" for a in stale)

    wait_until("Alertmanager to inhibit the stuck target's per-pair alerts", stuck_alerts_settled)
    for alert in _get(f"{alertmanager}/api/v2/alerts?active=true&inhibited=true&silenced=false"):
        if alert["labels"]["alertname"] == "KeepwarmPingsStale":
            assert alert["status"]["inhibitedBy"], alert

    # What the receivers got: one page for the stuck target (and one for the missing shard),
    # one ticket for the repeatedly evicted pair and one for the duplicated pair, nothing per
    # pair of the stuck target, nothing for the single eviction.
    def notified() -> bool:
        return (("KeepwarmTargetUnhealthy", stuck) in receiver.notified("/pager")
                and ("KeepwarmCacheCold", healthy) in receiver.notified("/tickets")
                and ("KeepwarmPairDuplicated", "") in receiver.notified("/tickets")
                and ("KeepwarmTargetMissing", "") in receiver.notified("/pager"))

    wait_until("the notifications", notified)
    time.sleep(3 * _seconds("30s") / SCALE)  # a few more group_waits: anything late would arrive now
    pages = receiver.notified("/pager")
    assert sorted(set(pages)) == [("KeepwarmTargetMissing", ""), ("KeepwarmTargetUnhealthy", stuck)], pages
    assert pages.count(("KeepwarmTargetUnhealthy", stuck)) == 1, pages  # one page, not one per pair
    tickets = receiver.notified("/tickets")
    assert sorted(set(tickets)) == [("KeepwarmCacheCold", healthy), ("KeepwarmPairDuplicated", "")], tickets
    # The twin is healthy apart from the duplicate: nothing of its own.
    assert not [a for a in firing() if a[1] == twin]
