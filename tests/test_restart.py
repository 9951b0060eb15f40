"""Restarts lose nothing: a new process resumes each pair from the store, at the time the old
one would have pinged it, and without state it pings every pair inside the TTL's margin.

The scheduler tests drive a paused APScheduler with a fake clock against the real emulator and
a real SQLite ledger; the last test restarts the real daemon with SIGTERM and SIGKILL against a
time-scaled emulator and checks what the emulator saw.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import LONG_PROMPT, basic_doc, free_port, write_config

from keepwarm.config import parse_config
from keepwarm.daemon import store_resume
from keepwarm.emulator import Emulator
from keepwarm.gate import Gate
from keepwarm.metrics import Metrics
from keepwarm.ping import make_client
from keepwarm.runner import Runner
from keepwarm.scheduler import CATCH_UP_SPREAD, Scheduler, catch_up_plan, phase
from keepwarm.store import Ledger, read_ledger

T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the catch-up plan: pure ----------------------------------------------------------------


def test_catch_up_pings_caches_known_alive_first_then_unknown_within_margin_then_expired() -> None:
    now = 1000.0
    due = [
        ("expired", now - 5, 50.0),
        ("unknown-1", None, 50.0),
        ("alive-late", now + 40, 50.0),
        ("unknown-2", None, 50.0),
        ("alive-soon", now + 3, 50.0),
    ]
    plan = catch_up_plan(due, now, spacing=0.0)
    keys = [k for k, _ in plan]
    assert keys[:2] == ["alive-soon", "alive-late"]
    assert keys[-1] == "expired"
    times = dict(plan)
    assert times["alive-soon"] == times["alive-late"] == times["expired"] == now
    for key in ("unknown-1", "unknown-2"):
        assert times[key] == now + phase(key, 50.0 * CATCH_UP_SPREAD) < now + 50.0 * CATCH_UP_SPREAD


def test_catch_up_is_spaced_by_the_request_rate_and_says_when_it_outlasts_the_margin() -> None:
    due = [(f"p{i}", None, 10.0) for i in range(30)]
    plan = catch_up_plan(due, 0.0, spacing=1.0)  # 60 requests a minute
    starts = [at for _, at in plan]
    assert starts == sorted(starts)
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(starts, starts[1:]))
    assert starts[-1] >= 29.0, "30 pings at one a second take 29 s, past the 10 s margin"


# --- a new scheduler resumes from the store ------------------------------------------------


def _setup(emulator: Emulator, tmp_path: Path, clock: FakeClock, ledger: Ledger | None, budget: float | None = None,
           **defaults: object) -> tuple[Scheduler, Metrics]:
    config = parse_config(basic_doc(emulator.base_url, **defaults), tmp_path)
    metrics = Metrics()
    runner = Runner(make_client(emulator.base_url, "sk-test-restart", 5), config.prices, metrics, threading.Event(),
                    clock=clock, ledger=ledger, gate=Gate(clock=clock))
    scheduler = Scheduler(runner, metrics, clock=clock, draw=lambda: 0.5, mono=clock, prices=config.prices,
                          resume=store_resume(ledger, clock) if ledger is not None else None,
                          spend=ledger.spend if ledger is not None else None,
                          budget_usd_per_day=budget)
    scheduler._aps.start(paused=True)
    scheduler.apply(config.pairs)
    return scheduler, metrics


def _job(scheduler: Scheduler, key: str) -> float:
    job = scheduler._aps.get_job(key)
    assert job is not None
    return float(job.trigger.run_date.timestamp())


KEY = "analyst/claude-sonnet-4-6"


def _first_life(emulator: Emulator, tmp_path: Path) -> tuple[FakeClock, float]:
    """A process that pinged the analyst pair twice, then stopped: returns its last ping's start."""
    clock = FakeClock()
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        first, _ = _setup(emulator, tmp_path, clock, ledger)
        for _ in range(2):
            clock.now = first.states[KEY].next_due
            first._run(KEY, clock.now)
        last = first.states[KEY].last_start
        first._aps.shutdown(wait=False)
    return clock, last


@pytest.mark.parametrize("down", [30.0, 200.0])
def test_a_restart_inside_the_interval_pings_an_interval_after_the_last_touch(
        emulator: Emulator, tmp_path: Path, down: float) -> None:
    clock, last = _first_life(emulator, tmp_path)
    sent = len(emulator.log)
    clock.now = last + down
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        second, metrics = _setup(emulator, tmp_path, clock, ledger)
        state = second.states[KEY]
        assert _job(second, KEY) == pytest.approx(last + 240 + 0.5 * 10), "no earlier ping: no duplicate"
        assert state.last_start == last and state.expires_at == pytest.approx(last + 300)
        assert state.last_result is not None and state.last_result.value == "warm"
        assert metrics.registry.get_sample_value(
            "keepwarm_cache_expires_timestamp_seconds", {"expert": "analyst", "model": "claude-sonnet-4-6"}
        ) == pytest.approx(last + 300)
    assert len(emulator.log) == sent, "nothing sent at start"


def test_a_restart_past_the_due_time_pings_at_once_while_the_cache_lives(emulator: Emulator, tmp_path: Path) -> None:
    """The SIGKILL case: due 2 s before the new process was up. At once, not at a phase later."""
    clock, last = _first_life(emulator, tmp_path)
    clock.now = last + 250  # due at 245; the cache lives until 300
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        second, _ = _setup(emulator, tmp_path, clock, ledger)
        assert _job(second, KEY) == pytest.approx(clock.now)
        # The two other pairs never pinged: no state, so within the margin (300 − 240 − 10 s).
        for key in second.states:
            if key != KEY:
                assert clock.now <= _job(second, key) < clock.now + 50
        clock.now += 1
        second._run(KEY, _job(second, KEY))
        assert second.states[KEY].last_result is not None and second.states[KEY].last_result.value == "warm"


def test_a_pair_whose_prompt_changed_while_down_starts_without_state(emulator: Emulator, tmp_path: Path) -> None:
    clock, last = _first_life(emulator, tmp_path)
    clock.now = last + 30
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        second, _ = _setup(emulator, tmp_path, clock, ledger, ping_message="a new prefix? no: only the tail")
        assert _job(second, KEY) == pytest.approx(last + 245), "the tail is not the prefix: same cache"
    doc = basic_doc(emulator.base_url)
    doc["experts"][0]["system"] = [{"text": LONG_PROMPT + " Revised."}]
    pair = next(p for p in parse_config(doc, tmp_path).pairs if p.key == KEY)
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        assert store_resume(ledger, clock)([pair]) == {}


def test_the_budget_s_spend_survives_a_restart(emulator: Emulator, tmp_path: Path) -> None:
    clock = FakeClock()
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        first, metrics = _setup(emulator, tmp_path, clock, ledger, budget=5.0)
        for _ in range(3):
            for key in list(first.states):
                due = first.states[key].next_due
                clock.now = max(clock.now, due)
                first._run(key, due)
        first.check_budget()
        before = metrics.registry.get_sample_value("keepwarm_budget_spent_usd")
        first._aps.shutdown(wait=False)
    assert before and before > 0
    with Ledger(tmp_path / "l.db", clock=clock) as ledger:
        _, metrics = _setup(emulator, tmp_path, clock, ledger, budget=5.0)
        assert metrics.registry.get_sample_value("keepwarm_budget_spent_usd") == pytest.approx(before, rel=1e-12)


def test_without_a_ledger_every_pair_is_pinged_within_the_margin(emulator: Emulator, tmp_path: Path) -> None:
    clock = FakeClock()
    scheduler, _ = _setup(emulator, tmp_path, clock, None)
    for key, state in scheduler.states.items():
        margin = state.pair.ttl_seconds - state.pair.interval - state.pair.jitter
        assert clock.now <= _job(scheduler, key) < clock.now + margin


# --- the real daemon, restarted -------------------------------------------------------------

# A 5m TTL lasts 30 s; the 3m interval below 18 s, so the margin is 11 s: room for a restart's
# start-up on a loaded machine (the bench runs the 4m default at full scale).
SCALE = 0.1
PAIRS = 12


def _request_ids(path: Path) -> set[str]:
    return {r.request_id for r in read_ledger(path) if r.request_id}


def _events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def test_sigterm_and_sigkill_restarts_rewrite_no_cache_and_duplicate_no_ping(tmp_path: Path, _private_state: Path) -> None:
    """The default config (no `ledger:` key): state at the default path, resumed after each restart."""
    rng = random.Random(18)
    port = free_port()
    with Emulator(time_scale=SCALE) as emu:
        doc = {
            "api": {"base_url": emu.base_url},
            "defaults": {"models": ["claude-sonnet-4-6"], "interval": "3m", "jitter": "10s"},
            "experts": [{"name": f"e{i}", "system": [{"text": f"Expert {i}. " + LONG_PROMPT}]} for i in range(PAIRS)],
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "budget": {"usd_per_day": 100},
        }
        config = write_config(tmp_path, doc)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_STATE_HOME": str(_private_state),
               "ANTHROPIC_API_KEY": "sk-test-restart"}
        interval = 180 * SCALE
        lives: list[tuple[float, subprocess.Popen[bytes], Path]] = []

        def start() -> None:
            log = tmp_path / f"daemon-{len(lives)}.log"
            proc = subprocess.Popen(
                [sys.executable, "-m", "keepwarm", "run", "--log-format", "json", "--config", str(config),
                 "--time-scale", str(SCALE)], env=env, stderr=log.open("wb"), stdout=subprocess.DEVNULL)
            lives.append((time.time(), proc, log))

        def writes_per_pair() -> dict[str, int]:
            counts: dict[str, int] = defaultdict(int)
            for entry in emu.log:
                if entry.usage and entry.fingerprint and (entry.usage.get("cache_creation_input_tokens") or 0) > 0:
                    counts[entry.fingerprint] += 1
            return counts

        try:
            start()
            deadline = time.monotonic() + 90
            while len(writes_per_pair()) < PAIRS:  # every cache written once
                assert time.monotonic() < deadline and lives[-1][1].poll() is None, lives[-1][2].read_text()[-3000:]
                time.sleep(0.1)
            for how in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
                time.sleep(rng.uniform(0.3, 1.3) * interval)
                proc = lives[-1][1]
                proc.send_signal(how)
                assert proc.wait(20) in (0, -signal.SIGKILL)
                start()  # at once, as systemd's Restart= or a rollout does
            time.sleep(1.2 * interval)
        finally:
            for _, proc, _ in lives:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(20)
        entries = [e for e in emu.log if e.path.endswith("/v1/messages") and e.fingerprint]

    ledger = _private_state / "keepwarm" / "ledger.db"
    assert ledger.exists(), "no ledger: key, yet the state is kept at the default place"
    rewrites = {fp: n for fp, n in writes_per_pair_of(entries).items() if n != 1}
    assert not rewrites, f"caches re-written because of a restart: {rewrites}"
    # No pair pinged twice within an interval, except a ping in flight at a SIGKILL: its answer
    # never reached the ledger, so the next process sends it again (a read, where a lapse is a write).
    recorded = _request_ids(ledger)
    by_pair: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for e in entries:
        by_pair[e.fingerprint or ""].append((e.time, e.request_id))
    for fingerprint, pings in by_pair.items():
        for (a, a_id), (b, _) in zip(pings, pings[1:]):
            if b - a < interval - 0.05:
                assert a_id not in recorded, f"{fingerprint[:12]}: pinged at {a:.2f} and again at {b:.2f}"
    # The budget's spend: what each new process restored is what the ledger held before it started.
    rows = read_ledger(ledger)
    for started, _, log in lives[1:]:
        restored = [e for e in _events(log) if e.get("event", "").startswith("budget: the spend")]
        assert restored, log.read_text()[-2000:]
        before = sum(sum((r.costs or {}).values()) for r in rows if r.time < started)
        assert float(restored[0]["spent_usd"]) == pytest.approx(before, rel=1e-5)  # type: ignore[arg-type]


def writes_per_pair_of(entries: list) -> dict[str, int]:  # type: ignore[type-arg]
    counts: dict[str, int] = defaultdict(int)
    for entry in entries:
        if entry.usage and (entry.usage.get("cache_creation_input_tokens") or 0) > 0:
            counts[entry.fingerprint] += 1
    return counts


# --- probes: a slow API is readiness' business, never liveness' ------------------------------


def test_a_slow_api_makes_the_daemon_unready_but_never_not_alive(keepwarm_daemon, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The review's case: an API answering in 5 s turned /healthz 503 within 15 s, which the
    shipped liveness probe would turn into a restart loop. Here the API answers in 3 s and one
    worker serves three pairs due every 2.4 s (a 4m interval at this scale): pings start later
    and later, /readyz says so with a pair's name, and /healthz stays 200 throughout."""
    from conftest import daemon_env

    from keepwarm.emulator import Fault

    with Emulator(time_scale=0.01) as emu:
        doc = basic_doc(emu.base_url, interval="4m", jitter="0s")
        doc["api"]["max_concurrency"] = 1
        daemon = keepwarm_daemon(doc, env=daemon_env(ANTHROPIC_API_KEY="sk-test-probes"),
                                 args=("--time-scale", "0.01"))
        daemon.wait_for("pings", lambda: daemon.total("keepwarm_pings_total") >= 3, 60)
        assert daemon.get("/readyz")[0] == 200 and daemon.get("/healthz")[0] == 200
        emu.inject(Fault(kind="latency", latency=3.0, count=None))
        seen_unready = False
        end = time.monotonic() + 12
        while time.monotonic() < end:
            assert daemon.get("/healthz") == (200, "ok\n"), "liveness must not follow the API"
            status, why = daemon.get("/readyz")
            if status == 503:
                seen_unready = True
                assert "overdue" in why
            time.sleep(0.2)
        assert seen_unready, "readiness never noticed pings falling behind"
        emu.clear_faults()
        daemon.wait_for("ready again", lambda: daemon.get("/readyz")[0] == 200, 30)
