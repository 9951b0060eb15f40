"""Every metric the alert rules and the dashboard use is exported by the running daemon.

A rename in the code would otherwise silently break an alert: Prometheus evaluates a rule on a
missing series as "no data", which never fires.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from conftest import LONG_PROMPT, ROOT, STARTUP_DEADLINE, daemon_env, free_port, keepwarm_cmd
from deploy_metrics import FLEET_ONLY, NOT_YET_EXPORTED, metric_names_used
from prometheus_client.parser import text_string_to_metric_families

from keepwarm.config import load_config
from keepwarm.emulator import Emulator


def test_the_running_daemon_exports_every_metric_the_deploy_files_use(tmp_path: Path) -> None:
    used = metric_names_used()
    assert len(used) >= 10, used
    config = tmp_path / "config"
    config.mkdir()
    for item in (ROOT / "config").iterdir():
        os.symlink(item, config / item.name)
    (config / "keepwarm.yaml").unlink()
    port = free_port()
    text = (ROOT / "config" / "keepwarm.yaml").read_text().replace("127.0.0.1:9464", f"127.0.0.1:{port}")
    if "\nbudget:" not in text:  # the budget gauges exist only with a budget
        text += "\nbudget:\n  usd_per_day: 100\n"
    (config / "keepwarm.yaml").write_text(text)
    proc = subprocess.Popen(
        keepwarm_cmd("run", "--config", str(config / "keepwarm.yaml"), "--emulator"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        exported: set[str] = set()
        # The production families appear at a pair's first observation: send one.
        pair = load_config(config / "keepwarm.yaml").pairs[0]
        observation = json.dumps({"expert": pair.expert, "model": pair.model,
                                  "usage": {"input_tokens": 5, "cache_read_input_tokens": 100}}).encode()
        end = time.monotonic() + STARTUP_DEADLINE  # the daemon's start-up under load; free when fast
        while time.monotonic() < end and proc.poll() is None:
            try:
                post = urllib.request.Request(f"http://127.0.0.1:{port}/v1/observations", data=observation,
                                              headers={"Content-Type": "application/json"}, method="POST")
                with urllib.request.urlopen(post, timeout=5) as resp:
                    assert resp.status == 202
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    families = list(text_string_to_metric_families(resp.read().decode()))
                    # Sample names are what PromQL sees: counters with _total, histogram parts.
                    # Sparse families (metrics.per_pair: standard) have no sample until their
                    # first non-zero value, but are declared (# TYPE) from the start.
                    exported = {s.name for f in families for s in f.samples}
                    exported |= {f.name + "_total" if f.type == "counter" else f.name for f in families}
                break
            except OSError:
                time.sleep(0.1)
        histograms = {n.removesuffix(part) for n in exported for part in ("_bucket", "_count", "_sum") if n.endswith(part)}
        missing = sorted(used - exported - histograms - NOT_YET_EXPORTED)
        assert not missing, f"used by rules or dashboard but not exported: {missing}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_a_fleet_member_exports_the_fleet_metrics_the_deploy_files_use(keepwarm_daemon: Any, postgres_url: str) -> None:
    used = metric_names_used() & FLEET_ONLY
    assert {"keepwarm_fleet_members", "keepwarm_fleet_owned_pairs", "keepwarm_fleet_lease_failures_total",
            "keepwarm_fleet_min_members"} <= used
    with Emulator() as emu:
        doc = {"api": {"base_url": emu.base_url}, "defaults": {"models": ["claude-sonnet-4-6"]},
               "experts": [{"name": "e0", "system": [{"text": LONG_PROMPT}]}],
               "ledger": {"url": postgres_url}, "fleet": {"name": "names"}}
        member = keepwarm_daemon(doc, env=daemon_env(ANTHROPIC_API_KEY="sk-test-names"))
        member.wait_for("its fleet gauges", lambda: member.total("keepwarm_fleet_members") == 1, 30)
        families = list(text_string_to_metric_families(member.get("/metrics")[1]))
        exported = {f.name + "_total" if f.type == "counter" else f.name for f in families}
        assert used <= exported, used - exported
        assert member.stop()[0] == 0
