"""Regressions of the runtime faults a review found (issue 10): holds, suspend, reloads, 429s, 400s.

Each test names the fault it guards against; every one failed before its fix. The real SDK talks
to the real emulator over HTTP, except where the emulator cannot say what the test needs (an
HTTP-date `retry-after`): there the SDK talks to an httpx transport that answers like the API.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import pytest
from conftest import LONG_PROMPT, SHORT_PROMPT, STARTUP_DEADLINE, basic_doc, daemon_env, write_config
from test_gate import _setup
from test_runner_scheduler import FakeClock, _config, _job_time, _one_pair, _runner, _scheduler, _value

from keepwarm.classify import Result
from keepwarm.config import parse_config
from keepwarm.daemon import Daemon, build_runner
from keepwarm.emulator import Emulator, Fault
from keepwarm.metrics import Metrics
from keepwarm.ping import describe_error, make_client
from keepwarm.runner import PairState
from keepwarm.scheduler import Scheduler
from keepwarm.store import Ledger, read_ledger

KEY = "sk-ant-test-hardening-9f8e7d"


def _labels(state: PairState) -> dict[str, str]:
    return {"expert": state.pair.expert, "model": state.pair.model}


# --- item 2: a 403 holds its pair, not the shared gate -----------------------------------------


def test_403_holds_only_its_pair(emulator: Emulator) -> None:
    runner, (sonnet, opus), waits, _ = _setup(emulator)
    emulator.inject(Fault(status=403, model=sonnet.pair.model, count=None))
    refused = runner.ping(sonnet)
    assert refused is not None and refused.error is not None and refused.error.error_type == "permission"
    assert runner.gate.open_in() == 0, "a 403 concerns this pair's model, not the key"
    healthy = runner.ping(opus)
    assert healthy is not None and healthy.error is None, "the other pair is pinged at once"
    assert waits == []


def test_401_still_holds_every_pair(emulator: Emulator) -> None:
    runner, (a, b), _, _ = _setup(emulator)
    emulator.inject(Fault(status=401, count=None))
    runner.ping(a)
    assert runner.gate.open_in() == a.pair.interval
    assert runner.ping(b) is None


def test_a_hold_that_defers_a_ping_past_expiry_is_warned_and_counted(
    emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    runner, (a, _b), _, metrics = _setup(emulator)
    wall = FakeClock()
    scheduler = Scheduler(runner, metrics, clock=wall, draw=lambda: 0.0, mono=wall)
    scheduler._aps.start(paused=True)
    scheduler.apply([a.pair])
    state = scheduler.states[a.pair.key]
    state.last_start, state.expires_at = wall.now - 100, wall.now - 100 + a.pair.ttl_seconds
    runner.gate.close_for(a.pair.interval, "authentication")  # the key-wide hold of a 401
    with caplog.at_level(logging.WARNING, "keepwarm.scheduler"):
        scheduler._run(a.pair.key, state.next_due)
    assert state.next_due > state.expires_at
    warned = [r for r in caplog.records if "past its cache's expiry" in r.getMessage()]
    assert len(warned) == 1 and state.holds_past_expiry == 1
    fields = warned[0].keepwarm_fields  # type: ignore[attr-defined]
    assert fields["pair"] == a.pair.key and fields["expires_at"].startswith("20")

    wall.now = state.expires_at + 1  # still held, and the cache has lapsed: nothing new to say
    caplog.clear()
    with caplog.at_level(logging.WARNING, "keepwarm.scheduler"):
        scheduler._run(a.pair.key, state.next_due)
    assert not [r for r in caplog.records if "past its cache's expiry" in r.getMessage()]
    assert state.holds_past_expiry == 1


# --- item 4 (second half): a pair that caches only a little of its prefix ----------------------


def test_a_pair_whose_uncached_input_is_most_of_its_prefix_is_flagged(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    runner = _runner(emulator, metrics)
    doc = basic_doc(emulator.base_url)
    # The marker sits on the first block: the (longer) second block is sent uncached every time.
    doc["experts"] = [{
        "name": "early-marker",
        "system": [{"text": LONG_PROMPT, "cache_control": {"type": "ephemeral"}}, {"text": LONG_PROMPT * 2}],
    }]
    pair = parse_config(doc, tmp_path).pairs[0]
    metrics.add_pair(pair)
    state = PairState(pair=pair, max_tokens=1)
    with caplog.at_level(logging.WARNING, "keepwarm.ping"):
        first = runner.ping(state)
        second = runner.ping(state)
    assert first is not None and second is not None and second.result is Result.WARM
    assert second.usage is not None and second.usage.input > second.usage.cache_read
    assert state.mostly_uncached, "the status page and metrics read this flag"
    flagged = [r for r in caplog.records if "sent uncached" in r.getMessage()]
    assert len(flagged) == 1, "said once when it starts, not at every ping"


def test_a_pair_that_caches_its_whole_prefix_is_not_flagged(emulator: Emulator) -> None:
    _, runner, state = _one_pair(emulator)
    runner.ping(state)
    assert state.last_result is Result.REWARMED and not state.mostly_uncached


# --- item 5: a suspend is not a clock step ------------------------------------------------------


def test_after_a_suspend_the_catch_up_ping_comes_at_once(emulator: Emulator) -> None:
    wall, mono, boot = FakeClock(), FakeClock(5000.0), FakeClock(9000.0)
    metrics = Metrics()
    scheduler = Scheduler(_runner(emulator, metrics, wall), metrics, clock=wall, draw=lambda: 0.0, mono=mono, boot=boot)
    scheduler._aps.start(paused=True)
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    due = scheduler.states[pair.key].next_due
    # Suspended for an hour: the wall clock and CLOCK_BOOTTIME moved on, CLOCK_MONOTONIC did not.
    wall.now += 3600
    boot.now += 3600
    assert scheduler.check_clock() == 0.0, "not a clock step"
    assert scheduler.states[pair.key].next_due == pytest.approx(wall.now)
    assert _job_time(scheduler, pair.key) == pytest.approx(wall.now, abs=1e-3), "at once, not an interval late"
    assert due < wall.now
    missed = _value(metrics, "keepwarm_missed_pings_total", expert=pair.expert, model=pair.model)
    assert missed is not None and missed >= 1, "the slots the suspend swallowed are counted"


def test_a_step_during_a_suspend_is_still_re_anchored(emulator: Emulator) -> None:
    wall, mono, boot = FakeClock(), FakeClock(5000.0), FakeClock(9000.0)
    metrics = Metrics()
    scheduler = Scheduler(_runner(emulator, metrics, wall), metrics, clock=wall, draw=lambda: 0.0, mono=mono, boot=boot)
    scheduler._aps.start(paused=True)
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    wall.now += 600 - 7200  # slept 10 minutes, and NTP stepped the clock back two hours
    boot.now += 600
    assert scheduler.check_clock() == pytest.approx(-7200)


# --- item 6: the max_tokens 0 fallback only for a max_tokens refusal ---------------------------


def test_a_mistyped_model_parks_the_pair_instead_of_falling_back_from_max_tokens_0(emulator: Emulator) -> None:
    _, runner, state = _one_pair(emulator, max_tokens=0)
    emulator.inject(Fault(status=404, message="model: claude-sonet-4-6", count=None))
    outcome = runner.ping(state)
    assert outcome is not None and outcome.result is Result.ERROR
    assert state.max_tokens == 0, "no fallback: the refusal is not about max_tokens"
    assert state.parked and state.park_reason == "model: claude-sonet-4-6"
    assert len(emulator.log) == 1, "not retried with max_tokens 1"


def test_the_emulators_max_tokens_0_refusal_falls_back_to_1(emulator: Emulator) -> None:
    """The emulator's own wording (a forced tool_choice cannot run with max_tokens 0)."""
    _, runner, state = _one_pair(emulator, max_tokens=0)
    emulator.inject(Fault(status=400, message="max_tokens: 0 cannot be used together with a forced `tool_choice`."))
    outcome = runner.ping(state)
    assert outcome is not None and outcome.error is None and state.max_tokens == 1 and not state.parked


# --- item 7: an HTTP-date retry-after is a rate limit, not the spend cap -----------------------


def _answer_429(headers: dict[str, str], message: str, error_code: str | None = None) -> anthropic.Anthropic:
    """An SDK client whose every request gets this 429, shaped as the API shapes it."""
    error: dict[str, Any] = {"type": "rate_limit_error", "message": message}
    if error_code:
        error["details"] = {"error_code": error_code}

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"request-id": "req_test", **headers}, json={"type": "error", "error": error})

    return anthropic.Anthropic(
        api_key=KEY, base_url="http://api.test", max_retries=0, http_client=httpx.Client(transport=httpx.MockTransport(handler))
    )


def _error_of(client: anthropic.Anthropic, now: float) -> Any:
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=1, messages=[{"role": "user", "content": "ping"}])
    return describe_error(caught.value, now)


def test_a_429_with_an_http_date_retry_after_is_a_rate_limit_not_the_spend_cap() -> None:
    now = time.time()
    date = email.utils.formatdate(now + 20, usegmt=True)  # IMF-fixdate, as RFC 9110 prefers
    err = _error_of(_answer_429({"retry-after": date}, "Number of requests has exceeded your per-minute rate limit."), now)
    assert not err.spend_cap
    assert err.retry_after == pytest.approx(20, abs=1.0)


def test_the_spend_cap_is_recognised_from_the_error_itself() -> None:
    now = time.time()
    by_code = _error_of(_answer_429({}, "Limit reached.", "enforced_spend_limit_reached"), now)
    assert by_code.spend_cap and by_code.retry_after is None
    by_message = _error_of(
        _answer_429({"retry-after": "60"}, "You have reached your organization's monthly spend limit."), now
    )
    assert by_message.spend_cap and by_message.retry_after is None
    unparseable = _error_of(_answer_429({"retry-after": "soon"}, "Too many requests."), now)
    assert not unparseable.spend_cap, "a retry-after was sent, even if unreadable: a limit that clears"


def test_the_emulators_spend_cap_429_stays_the_spend_cap(emulator: Emulator) -> None:
    _, runner, state = _one_pair(emulator)
    emulator.inject(Fault(spend_cap=True))
    outcome = runner.ping(state)
    assert outcome is not None and outcome.error is not None and outcome.error.spend_cap
    assert len(outcome.attempts) == 1


# --- item 8: a timing-only reload keeps the pair's series and state -----------------------------


def test_a_timing_only_reload_keeps_the_pairs_series_and_state(emulator: Emulator, tmp_path: Path) -> None:
    clock = FakeClock()
    metrics = Metrics(per_pair="full")  # the interval gauge is exported in full mode only
    scheduler = _scheduler(emulator, clock, metrics)
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    scheduler._run(pair.key, scheduler.states[pair.key].next_due)
    state = scheduler.states[pair.key]
    labels = _labels(state)
    pinged_at, expires_at = state.last_start, state.expires_at
    assert _value(metrics, "keepwarm_pings_total", **labels, result="rewarmed") == 1

    clock.now += 30
    retimed = [
        p for p in parse_config(
            basic_doc(emulator.base_url, interval="200s", jitter="2s", max_tokens=0, ping_message="hello"), tmp_path
        ).pairs if p.key == pair.key
    ]
    assert retimed[0].fingerprint == pair.fingerprint
    report = scheduler.apply(retimed)
    assert report.changed == (pair.key,)
    kept = scheduler.states[pair.key]
    assert kept.pings == 1 and kept.last_start == pinged_at and kept.expires_at == expires_at
    assert kept.last_result is Result.REWARMED and kept.max_tokens == 0
    assert _value(metrics, "keepwarm_pings_total", **labels, result="rewarmed") == 1, "counters kept"
    assert _value(metrics, "keepwarm_last_ping_timestamp_seconds", **labels) == pinged_at, "no false stale alert"
    assert _value(metrics, "keepwarm_cache_expires_timestamp_seconds", **labels) == expires_at
    assert _value(metrics, "keepwarm_ping_interval_seconds", **labels) == 200, "the interval gauge follows"
    assert kept.next_due == pytest.approx(pinged_at + 200)


def test_a_prompt_change_still_resets_the_pairs_series(emulator: Emulator, tmp_path: Path) -> None:
    clock = FakeClock()
    metrics = Metrics()
    scheduler = _scheduler(emulator, clock, metrics)
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    scheduler._run(pair.key, scheduler.states[pair.key].next_due)
    doc = basic_doc(emulator.base_url)
    doc["experts"][0]["system"] = [{"text": LONG_PROMPT + " v2"}]
    scheduler.apply([parse_config(doc, tmp_path).pairs[0]])
    fresh = scheduler.states[pair.key]
    assert fresh.pings == 0 and fresh.last_start == 0
    assert _value(metrics, "keepwarm_pings_total", **_labels(fresh), result="rewarmed") == 0


# --- item 10: a ping in flight when its pair is removed records nothing -------------------------


def test_a_ping_finishing_after_its_pair_was_removed_creates_no_series(emulator: Emulator, tmp_path: Path) -> None:
    clock = FakeClock()
    metrics = Metrics()
    scheduler = _scheduler(emulator, clock, metrics)
    scheduler.runner.ledger = Ledger(tmp_path / "ledger.sqlite")
    pair = _config(emulator.base_url).pairs[0]
    scheduler.apply([pair])
    in_flight = scheduler.states[pair.key]
    emulator.inject(Fault(status=529))  # an error counted mid-ping must not re-create a series either
    scheduler.apply([])  # the reload removes the pair while its ping is under way
    assert in_flight.removed
    outcome = scheduler.runner.ping(in_flight, scheduled_at=clock.now)
    assert outcome is not None and outcome.result is Result.REWARMED
    names = {m.name for m in metrics.registry.collect() for s in m.samples if s.labels.get("expert") == pair.expert}
    assert names == set(), f"series re-created for a removed pair: {sorted(names)}"
    scheduler.runner.ledger.close()
    assert read_ledger(tmp_path / "ledger.sqlite") == [], "no ledger row for a pair no longer configured"


# --- item 9: a ledger that cannot open does not block reloads -----------------------------------


def test_a_reload_applies_although_the_ledger_cannot_open(
    emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the ledger's directory should be\n")
    doc = basic_doc(emulator.base_url)
    doc["ledger"] = {"path": str(blocker / "ledger.sqlite")}
    path = write_config(tmp_path, doc)
    daemon = Daemon(path)
    config, key, _ = daemon._load()
    metrics = Metrics()
    client = make_client(emulator.base_url, key.value, 5)
    runner = build_runner(config, client, metrics, daemon.stop_event, key.source, None)  # it failed at start
    scheduler = Scheduler(runner, metrics)
    scheduler._aps.start(paused=True)
    try:
        scheduler.apply(config.pairs)
        doc["experts"][0]["system"] = [{"text": LONG_PROMPT + " Fixed."}]  # the operator's prompt fix
        write_config(tmp_path, doc)
        new = daemon._reload(config, metrics, runner, scheduler)
    finally:
        scheduler._aps.shutdown(wait=False)
    assert new is not config, "the reload was applied"
    fixed = next(p for p in new.pairs if p.key == "analyst/claude-sonnet-4-6")
    assert scheduler.states[fixed.key].pair.fingerprint == fixed.fingerprint
    assert runner.ledger is None
    assert _value(metrics, "keepwarm_ledger_errors_total") == 1
    assert _value(metrics, "keepwarm_config_last_reload_successful") == 1


# --- item 11: a SIGHUP during start-up is queued, not fatal -------------------------------------

# A daemon that receives SIGHUP while it loads its config (after Daemon.run began), and one that
# receives it while `keepwarm run` is still importing the daemon's modules (a second or more on
# a busy machine): where a SIGHUP from a quick `systemctl reload` after a start lands.
_HUP_WHILE_LOADING = """
import os, signal, sys
from pathlib import Path
from keepwarm.daemon import Daemon
from keepwarm.logs import setup_logging

class EarlyHup(Daemon):
    hupped = False
    def _load(self):
        if not self.hupped:
            self.hupped = True
            os.kill(os.getpid(), signal.SIGHUP)
        return super()._load()

setup_logging("json")
sys.exit(EarlyHup(Path(sys.argv[1])).run())
"""
_HUP_WHILE_IMPORTING = """
import importlib.abc, os, signal, sys

class HupOnDaemonImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "keepwarm.daemon":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGHUP)
        return None

sys.meta_path.insert(0, HupOnDaemonImport())
from keepwarm.cli import main
sys.exit(main(["run", "--config", sys.argv[1], "--log-format", "json"]))
"""


@pytest.mark.parametrize("script", [_HUP_WHILE_LOADING, _HUP_WHILE_IMPORTING], ids=["loading", "importing"])
def test_a_sighup_during_start_up_is_queued_not_fatal(emulator: Emulator, tmp_path: Path, script: str) -> None:
    doc = {
        "api": {"base_url": emulator.base_url},
        "defaults": {"models": ["claude-sonnet-4-6"]},
        "experts": [{"name": "terse", "system": [{"text": SHORT_PROMPT}]}],
        "metrics": {"listen": "127.0.0.1:0"},
    }
    path = write_config(tmp_path, doc)
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(path)], stdout=out, stderr=subprocess.STDOUT,
            env=daemon_env(ANTHROPIC_API_KEY=KEY), cwd=os.getcwd(),
        )
        try:
            deadline = time.monotonic() + STARTUP_DEADLINE  # start-up under load; free when fast
            reloaded = False
            while time.monotonic() < deadline and proc.poll() is None and not reloaded:
                reloaded = any(
                    line.startswith("{") and json.loads(line).get("event") == "config reloaded"
                    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                )
                time.sleep(0.05)
            assert proc.poll() is None, f"the daemon died ({proc.returncode}):\n{log_path.read_text()[-2000:]}"
            assert reloaded, "the SIGHUP queued during start-up was applied once running"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(STARTUP_DEADLINE) == 0  # a wait, not a bound: free when the exit is quick
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_an_uncached_pairs_prefix_tokens_are_what_check_counts(emulator: Emulator) -> None:
    # Issue 10 item 19: `check` counts the prefix as count_tokens(prefix + ping) - count_tokens(ping);
    # an uncached ping's input_tokens also holds the ping message, so the gauge said one more.
    metrics = Metrics()
    runner = _runner(emulator, metrics)
    pair = next(p for p in _config(emulator.base_url).pairs if p.expert == "terse")
    metrics.add_pair(pair)
    state = PairState(pair=pair, max_tokens=pair.max_tokens)
    outcome = runner.ping(state)
    assert outcome is not None and outcome.result is Result.UNCACHED
    message = [{"role": "user", "content": pair.ping_message}]
    client = make_client(emulator.base_url, "sk-test", 5)
    total = client.messages.count_tokens(model=pair.model, messages=message, **pair.prefix.params()).input_tokens
    tail = client.messages.count_tokens(model=pair.model, messages=message).input_tokens
    assert state.prefix_tokens == total - tail
    assert _value(metrics, "keepwarm_prefix_tokens", **_labels(state)) == total - tail
