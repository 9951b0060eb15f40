"""The proof that `keepwarm simulate` shows what the daemon does.

The daemon's parts as `keepwarm run` wires them (Scheduler with its APScheduler thread, Runner,
observations endpoint) run `policy: adaptive` in real time against the emulator with every TTL
and interval scaled by S. A production driver follows a small trace at the same scale: each
request goes through the real SDK to the emulator and its observation is POSTed over raw HTTP.
Then simulate's replay runs on that same trace, at times scaled back (t / S, so hours of the
week fall alike), and the daemon's pings (the emulator's log) must be the simulated ones, each
within scheduling tolerance.

The interval is 280 s, the spacing the adaptive policy chooses in a simulation (TTL minus its
default 20 s margin): under a time scale a measured margin still holds a real second of retry
backoff, so the daemon spaces pings at the interval, and the two agree only when that is the same.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import anthropic
from conftest import LONG_PROMPT

from keepwarm.config import parse_config
from keepwarm.daemon import build_observer, build_runner, build_scheduler, build_web
from keepwarm.emulator import Emulator
from keepwarm.metrics import Metrics
from keepwarm.ping import make_client
from keepwarm.prefix import fingerprint
from keepwarm.simulate import PairSetup, Request, replay

S = 0.015  # 5 minutes of TTL are 4.5 s
KEY = "sk-policy-e2e"
QUESTION = "What changed since this morning?"
# Seconds (trace time) of each production request: two sessions with short gaps, gaps of ~12
# minutes a keepalive bridges, and a quiet end after which the policy lets the cache lapse.
TRACE = [0, 150, 300, 1000, 1100, 1800, 1900]
TAIL = 1200  # trace seconds observed after the last request: long enough to see the lapse
TOLERANCE = 25.0  # trace seconds (0.375 s of wall time): wake-up and request latency under load


def _daemon(tmp_path: Path, emulator: Emulator) -> dict[str, Any]:
    doc = {
        "api": {"base_url": emulator.base_url},
        "defaults": {"policy": "adaptive", "interval": "280s", "jitter": "0s"},
        "experts": [{"name": "analyst", "system": [{"text": LONG_PROMPT}], "models": ["claude-sonnet-4-6"]}],
        "metrics": {"listen": "127.0.0.1:0"},
        "observe": {"allow_unauthenticated": True},
    }
    config = parse_config(doc, tmp_path)
    scaled = config.scaled(S)
    metrics = Metrics()
    runner = build_runner(scaled, make_client(emulator.base_url, KEY, 10), metrics, threading.Event(), "test")
    scheduler = build_scheduler(scaled, runner, metrics)
    observer = build_observer(scaled, metrics, scheduler, runner)
    web = build_web(scaled, metrics, scheduler, observer)
    web.start()
    return {"config": config, "scaled": scaled, "scheduler": scheduler, "web": web,
            "url": "http://%s:%d" % web.address}


def test_the_daemon_sends_the_pings_simulate_predicts(tmp_path: Path) -> None:
    emulator = Emulator(time_scale=S).start()
    d = _daemon(tmp_path, emulator)
    scheduler, pair, scaled_pair = d["scheduler"], d["config"].pairs[0], d["scaled"].pairs[0]
    production = anthropic.Anthropic(base_url=emulator.base_url, api_key=KEY, max_retries=0)
    system = list(scaled_pair.prefix.params()["system"])
    sent: list[float] = []
    try:
        scheduler.start(d["scaled"].pairs)
        origin = time.time() + 0.5
        for offset in TRACE:  # the driver follows the trace's own times
            time.sleep(max(origin + offset * S - time.time(), 0.0))
            at = time.time()
            response = production.messages.create(
                model=pair.model, max_tokens=16, system=system,
                messages=[{"role": "user", "content": QUESTION}])
            obs = {"expert": pair.expert, "model": pair.model, "at": at, "usage": response.usage.model_dump(),
                   "fingerprint": fingerprint(pair.model, system), "request_id": response.id}
            post = urllib.request.Request(d["url"] + "/v1/observations", data=json.dumps(obs).encode(),
                                          headers={"Content-Type": "application/json"}, method="POST")
            with urllib.request.urlopen(post, timeout=10) as resp:
                assert json.loads(resp.read()) == {"accepted": 1, "rejected": []}
            sent.append(at)
        end = sent[-1] + TAIL * S
        time.sleep(max(end - time.time(), 0.0))  # the trace's quiet tail, then read what happened
    finally:
        scheduler.stop(2.0)
        d["web"].stop()
    with urllib.request.urlopen(emulator.base_url + "/_emulator/log", timeout=10) as resp:
        doc = json.loads(resp.read())
    emulator.stop()
    entries = doc if isinstance(doc, list) else doc.get("entries", doc.get("log", []))
    messages = [e for e in entries if e.get("path", "/v1/messages") == "/v1/messages"]
    # The emulator's clock has its own origin: production's requests, logged there too, align it.
    seen = sorted(e["time"] for e in messages if e["body"]["messages"][0]["content"] == QUESTION)
    assert len(seen) == len(sent)
    shift = sum(a - b for a, b in zip(sent, seen)) / len(sent)
    pings = sorted((e["time"] + shift) / S for e in messages if e["body"]["messages"][0]["content"] != QUESTION)

    tokens = scheduler.states[pair.key].prefix_tokens
    assert tokens > 0
    requests = [Request(at / S, pair.expert, pair.model, tokens) for at in sent]
    simulated: list[tuple[float, str, str, str]] = []
    replay("adaptive", [PairSetup.build(pair, d["config"].prices, tokens)], requests, d["config"].prices,
           requests[0].at, end / S, pings=simulated)
    predicted = [at for at, *_ in simulated]

    horizon = end / S - TOLERANCE  # a ping right at the end may fall either side of it
    daemon = [p for p in pings if p < horizon]
    predicted = [p for p in predicted if p < horizon]
    rel = [round(p - requests[0].at) for p in daemon], [round(p - requests[0].at) for p in predicted]
    assert len(predicted) >= 3, f"the trace should make the policy ping: {rel}"
    assert len(daemon) == len(predicted), f"daemon vs simulate pings (trace seconds from the start): {rel}"
    assert all(abs(a - b) <= TOLERANCE for a, b in zip(daemon, predicted)), rel
    # The quiet tail: the policy let the cache lapse (a keepalive that never stops would have
    # pinged through it), and the daemon did the same.
    tail = [p for p in predicted if p > requests[-1].at]
    assert 0 < len(tail) < (horizon - requests[-1].at) // pair.interval, rel
    assert d["scheduler"].metrics.registry.get_sample_value(
        "keepwarm_pings_skipped_total", {"expert": pair.expert, "model": pair.model, "reason": "idle"}), \
        "the daemon counted its lapse under reason idle"
