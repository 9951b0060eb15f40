"""The shipped rules on a real Prometheus, scraping real daemons against the emulator.

Debian's `prometheus` (the package that also gives promtool) runs on loopback with a 1 s
scrape and evaluation interval and deploy/prometheus/keepwarm-rules.yml as shipped (only the
5-minute money tiles are scaled, see `scaled_rules`).
Alert `for:` durations are wall time and stay as shipped, so time is scaled on the keepwarm
side instead: each daemon runs `--emulator --time-scale 0.02`, where a 5-minute TTL lasts 6 s.

Three daemons, so that the faults can run side by side and the test stays short:
  A - the example config (its style-editor prompt is deliberately too short to cache): every
      ping of one pair fails, every cache entry is expired as soon as it is written, and a
      reload removes the uncacheable pair;
  B - one pair, whose API answers with the monthly spend cap;
  C - one pair, stopped and started again.
The test checks, through Prometheus' HTTP API, that the targets are up, every recording rule
has values, nothing but the uncacheable prompt fires while healthy, the faults raise exactly
their alerts (and none of the misleading ones: no stale or failing page for the spend cap, no
per-pair alert of the stopped daemon), and that everything clears once the faults are gone.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import LONG_PROMPT, ROOT, DaemonProcess, daemon_env, free_port, write_config

RULES = ROOT / "deploy" / "prometheus" / "keepwarm-rules.yml"
TIME_SCALE = "0.02"
DEADLINE = 110.0  # for an alert with `for: 1m` to fire, from the fault
# Recording rules with no values in a healthy run that only pings: those over production
# observations (which need the observations endpoint, and the per-pair spend tile only exists
# for observed pairs), and the hit rate of the pairs below 85%, checked in the fault phase.
NO_VALUES_WHEN_HEALTHY = ("saved", "production", "net_saving", "pair:keepwarm_spend_usd:increase5m",
                          "pair:keepwarm_cache_hit_ratio_low:1h", "job:keepwarm_ping_errors:rate5m",
                          "fleet")  # these daemons are no fleet: they export no keepwarm_fleet_* series

Alert = tuple[str, str, str, str]  # alertname, instance, expert, model


def _get(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _send(url: str, method: str, body: Any = None) -> None:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        resp.read()


def scaled_rules(directory: Path) -> Path:
    """The shipped rules with their groups' own intervals scaled for a test of minutes.

    A tile group evaluated every 5 minutes would record nothing in this test's minutes; its
    interval and its tiles' window are shortened together (to TIME_SCALE x 5m), so the tiles
    still cover time exactly once. The groups evaluated every 2 minutes run at the test's 1 s,
    as the others do. Every rule is as shipped.
    """
    doc = yaml.safe_load(RULES.read_text())
    tile = f"{float(TIME_SCALE) * 300:g}s"
    for group in doc["groups"]:
        if group.get("interval") == "2m":
            del group["interval"]
        elif group.get("interval") == "5m":
            group["interval"] = tile
            for rule in group["rules"]:
                rule["expr"] = rule["expr"].replace("[5m]", f"[{tile}]")
    assert all(g.get("interval") in (None, tile) for g in doc["groups"]), "a group interval this test does not scale"
    path = directory / "keepwarm-rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class PrometheusServer:
    """A `prometheus` process on loopback with its own config and storage."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus not found: scripts/test installs it (Debian package prometheus)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(scaled_rules(directory))],
            "scrape_configs": [{"job_name": "keepwarm", "static_configs": [{"targets": targets}]}],
        }))
        self.log = (directory / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> Any:
        """The `data` of one API answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        answer = _get(f"{self.url}/api/v1/{path}{query}")
        assert answer["status"] == "success", answer
        return answer["data"]

    def firing(self) -> set[Alert]:
        """The alerts firing now (pending ones left out)."""
        return {
            (a["labels"]["alertname"], a["labels"].get("instance", ""), a["labels"].get("expert", ""),
             a["labels"].get("model", ""))
            for a in self.api("alerts")["alerts"] if a["state"] == "firing"
        }

    def stop(self) -> None:
        self.proc.kill()  # its storage is a temporary directory: nothing to shut down cleanly
        self.proc.wait()
        self.log.close()


def wait_until(what: str, check: Callable[[], bool], deadline: float, watch: Callable[[], None] = lambda: None) -> None:
    """Poll `check` (calling `watch` on each round) until it holds, or fail after `deadline` s."""
    t0 = time.monotonic()
    end = t0 + deadline
    while time.monotonic() < end:
        watch()
        try:
            if check():
                print(f"{time.monotonic() - t0:6.1f}s {what}")  # where the test's time goes, with -s
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    pytest.fail(f"timed out after {deadline:.0f}s waiting for {what}")


def one_pair_doc(name: str) -> dict[str, Any]:
    return {
        "defaults": {"models": ["claude-sonnet-4-6"], "interval": "3m", "jitter": "0s"},
        "experts": [{"name": name, "system": [{"text": LONG_PROMPT}]}],
        "shutdown_timeout": "2s",
    }


def example_doc(directory: Path) -> dict[str, Any]:
    """The example config, its files beside it, with an interval that leaves the scaled TTL a
    margin the shared test machine's ping lateness cannot eat."""
    for item in (ROOT / "config").iterdir():
        if item.name != "keepwarm.yaml":
            (directory / item.name).symlink_to(item)
    doc: dict[str, Any] = yaml.safe_load((ROOT / "config" / "keepwarm.yaml").read_text())
    doc["defaults"]["interval"] = "3m"
    doc["shutdown_timeout"] = "2s"
    return doc


def start(directory: Path, doc: dict[str, Any], port: int | None = None) -> DaemonProcess:
    port = port or free_port()
    doc.setdefault("metrics", {})["listen"] = f"127.0.0.1:{port}"
    return DaemonProcess(write_config(directory, doc), port, daemon_env(), ("--emulator", "--time-scale", TIME_SCALE))


def emulator_url(daemon: DaemonProcess) -> str:
    found: list[str] = []

    def check() -> bool:
        found[:] = [e["emulator"] for e in daemon.events() if "emulator" in e]
        return bool(found)

    daemon.wait_for("the emulator's address in the log", check, 60)  # a loaded CI machine starts slowly
    return found[0]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[PrometheusServer, dict[str, DaemonProcess], dict[str, Path]]]:
    dirs = {name: tmp_path / name for name in "ABC"}
    for directory in dirs.values():
        directory.mkdir()
    daemons = {
        "A": start(dirs["A"], example_doc(dirs["A"])),
        "B": start(dirs["B"], one_pair_doc("capped")),
        "C": start(dirs["C"], one_pair_doc("stopped")),
    }
    prometheus = PrometheusServer(tmp_path, [f"127.0.0.1:{d.port}" for d in daemons.values()])
    try:
        yield prometheus, daemons, dirs
    finally:
        prometheus.stop()
        for daemon in daemons.values():
            daemon.kill()


def test_the_shipped_rules_on_a_real_prometheus(
    rig: tuple[PrometheusServer, dict[str, DaemonProcess], dict[str, Path]],
) -> None:
    prometheus, daemons, dirs = rig
    inst = {name: f"127.0.0.1:{d.port}" for name, d in daemons.items()}
    t0 = time.monotonic()
    emulators = {name: emulator_url(daemons[name]) for name in "AB"}
    print(f"{time.monotonic() - t0:6.1f}s the daemons started")
    uncacheable: Alert = ("KeepwarmPromptUncacheable", inst["A"], "style-editor", "claude-sonnet-4-6")

    # Healthy: every target up, every pair pinged, every recording rule with values, and only
    # the example's deliberately uncacheable prompt firing.
    def targets_up() -> bool:
        active = prometheus.api("targets")["activeTargets"]
        return len(active) == 3 and all(t["health"] == "up" for t in active)

    wait_until("every target up", targets_up, 30)
    records = [r for g in prometheus.api("rules")["groups"] for r in g["rules"] if r["type"] == "recording"]
    assert len(records) >= 15

    def recorded(name: str) -> bool:
        return bool(prometheus.api("query", query=name)["result"])

    def every_rule_has_values() -> bool:
        wanted = [r["name"] for r in records if not any(word in r["name"] for word in NO_VALUES_WHEN_HEALTHY)]
        return all(recorded(name) for name in wanted)

    wait_until("every recording rule to have values", every_rule_has_values, 30)
    for group in prometheus.api("rules")["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", rule
    wait_until("the uncacheable prompt's alert", lambda: uncacheable in prometheus.firing(), 20)
    assert prometheus.firing() == {uncacheable}

    # The faults, side by side.
    _send(f"{emulators['A']}/_emulator/faults", "POST", {"status": 500, "count": None, "model": "claude-haiku-4-5"})
    _send(f"{emulators['B']}/_emulator/faults", "POST", {"spend_cap": True, "count": None})
    stop_expiring = threading.Event()

    def expire_every_entry() -> None:  # caches that expire as soon as they are written
        while not stop_expiring.wait(0.5):
            try:
                _send(f"{emulators['A']}/_emulator/expire", "POST")
            except OSError:
                pass

    expiring = threading.Thread(target=expire_every_entry, daemon=True)
    expiring.start()
    daemons["C"].stop()

    expected: set[Alert] = {
        uncacheable,
        ("KeepwarmPingsFailing", inst["A"], "chief-economist", "claude-haiku-4-5"),
        ("KeepwarmCacheCold", inst["A"], "chief-economist", "claude-sonnet-4-6"),
        ("KeepwarmCacheCold", inst["A"], "support-triage", "claude-sonnet-4-6"),
        ("KeepwarmPingsDeferred", inst["B"], "", ""),
        ("KeepwarmDown", inst["C"], "", ""),
    }
    seen: set[Alert] = set()

    def watch() -> None:
        seen.update(prometheus.firing())

    try:
        wait_until(f"exactly {sorted(expected)} to fire", lambda: prometheus.firing() == expected, DEADLINE, watch)
        # Never anything else on the way: no stale or failing page for the spend cap, nothing
        # per pair for the stopped daemon.
        assert seen <= expected, sorted(seen - expected)
        # Caches that expire between pings: every ping writes, and the hit rate of their pairs
        # falls below 85% (KeepwarmHitRateLow's `for` of 15 minutes is longer than this test).
        low = prometheus.api("query", query="pair:keepwarm_cache_hit_ratio_low:1h")["result"]
        assert {(r["metric"]["expert"], r["metric"]["model"]) for r in low} >= {
            ("chief-economist", "claude-sonnet-4-6"), ("support-triage", "claude-sonnet-4-6")}, low
    finally:
        stop_expiring.set()
        expiring.join()

    # Every fault undone: the API answers again, a reload (which also reopens the spend-cap
    # gate) removes the uncacheable pair, the stopped daemon starts on its old port.
    _send(f"{emulators['A']}/_emulator/faults", "DELETE")
    _send(f"{emulators['B']}/_emulator/faults", "DELETE")
    doc_a = yaml.safe_load(daemons["A"].config.read_text())
    doc_a["experts"] = [e for e in doc_a["experts"] if e["name"] != "style-editor"]
    write_config(dirs["A"], doc_a)
    daemons["A"].signal(signal.SIGHUP)
    daemons["B"].signal(signal.SIGHUP)
    daemons["C"].kill()
    daemons["C"] = start(dirs["C"], one_pair_doc("stopped"), daemons["C"].port)
    wait_until("every alert to clear", lambda: prometheus.firing() == set(), 60, watch)
    assert seen <= expected, sorted(seen - expected)
    assert prometheus.api("query", query='keepwarm_pair_info{expert="style-editor"}')["result"] == []
