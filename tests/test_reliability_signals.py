"""Signals against the real daemon process: SIGTERM mid-ping, SIGSTOP/SIGCONT, SIGHUP good and bad.

Request times come from the emulator's log (it runs in this process, on this process's
monotonic clock), so a test can say exactly when each pair was pinged. TTL and interval
are shrunk together; nothing sleeps for a schedule, everything polls with a deadline.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LONG_PROMPT, STARTUP_DEADLINE, DaemonProcess, daemon_env, event_time, keepwarm_cmd, write_config

from keepwarm.emulator import Emulator, Fault, LogEntry
from keepwarm.store import read_ledger

KEY = "sk-ant-test-signals-0a1b2c3d"
SONNET, OPUS = "claude-sonnet-4-6", "claude-opus-4-8"
DEADLINE = 15.0
Start = Callable[..., DaemonProcess]


@pytest.fixture
def emu() -> Iterator[Emulator]:
    # The 5m TTL lasts 3 s; each test picks an interval well inside it.
    with Emulator(time_scale=0.01, log_limit=20_000) as emulator:
        yield emulator


def two_pairs(base_url: str, interval: str = "500ms", **top: Any) -> dict[str, Any]:
    return {
        "api": {"base_url": base_url, "timeout": "5s"},
        "defaults": {"interval": interval, "jitter": "0s", "models": [SONNET, OPUS]},
        "experts": [{"name": "analyst", "system": [{"text": LONG_PROMPT}]}],
        "ledger": {"path": "ledger.sqlite"},
        **top,
    }


def start(keepwarm_daemon: Start, doc: dict[str, Any]) -> DaemonProcess:
    return keepwarm_daemon(doc, env=daemon_env(ANTHROPIC_API_KEY=KEY))


def warm_counts(daemon: DaemonProcess) -> dict[tuple[tuple[str, str], ...], float]:
    """Each pair's count of warm pings, keyed by its labels."""
    return {
        labels: v for (name, labels), v in daemon.metrics().items()
        if name == "keepwarm_pings_total" and ("result", "warm") in labels
    }


def warm_everywhere(daemon: DaemonProcess, pairs: int) -> None:
    """Wait until each of `pairs` pairs has had a warm ping from now on."""
    try:
        before = warm_counts(daemon)
    except OSError:  # not listening yet: nothing counted
        before = {}

    def check() -> bool:
        now = warm_counts(daemon)
        return len(now) == pairs and all(v > before.get(k, 0.0) for k, v in now.items())

    daemon.wait_for(f"{pairs} pairs warm", check, DEADLINE)


def messages(emu: Emulator, since: float = 0.0) -> list[LogEntry]:
    return [e for e in emu.log if e.path == "/v1/messages" and e.time >= since]


def pending_faults(emu: Emulator) -> list[Any]:
    """The emulator's queued faults: empty once every injected fault has met its request."""
    with urllib.request.urlopen(f"{emu.base_url}/_emulator/faults", timeout=5) as resp:
        return list(json.load(resp)["faults"])


def by_model(entries: list[LogEntry]) -> dict[str | None, list[float]]:
    times: dict[str | None, list[float]] = {}
    for e in entries:
        times.setdefault(e.model, []).append(e.time)
    return times


# --- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_pings_finish_and_records_them(
    keepwarm_daemon: Start, emu: Emulator, tmp_path: Path
) -> None:
    daemon = start(keepwarm_daemon, two_pairs(emu.base_url, shutdown_timeout="5s"))
    warm_everywhere(daemon, 2)
    # The next two requests (one per pair) take 1.5 s: SIGTERM lands while both are in flight.
    emu.inject(Fault(kind="latency", latency=1.5, count=2))
    daemon.wait_for("both slow requests to arrive", lambda: pending_faults(emu) == [], DEADLINE)
    sent_at, sent_wall = time.monotonic(), time.time()
    code, _ = daemon.stop()

    assert code == 0, daemon.text()[-3000:]
    # How long the daemon's shutdown took, to its "stopped" line: the interpreter's teardown
    # after it is not what shutdown_timeout bounds, and on a loaded machine it alone can take
    # over 15 s of wall time (a final garbage collection).
    took = next(event_time(e) for e in daemon.events() if e.get("event") == "stopped") - sent_wall
    assert 0.5 <= took <= 5.0 + 2.0, f"waited {took:.1f}s: in-flight pings finish, within shutdown_timeout"
    assert messages(emu, sent_at + 0.2) == [], "no new ping starts after SIGTERM"
    # Each pair's last request is the one that was in flight: answered, and in the ledger.
    rows = {r.request_id for r in read_ledger(tmp_path / "ledger.sqlite")}
    for model, times in by_model(messages(emu)).items():
        last = next(e for e in messages(emu) if e.model == model and e.time == times[-1])
        assert last.status == 200 and last.time < sent_at, (model, last.status)
        assert last.request_id in rows, f"{model}: the ping in flight at SIGTERM has no ledger row"
    answered = {e.request_id for e in messages(emu) if e.status == 200}
    assert answered <= rows, "every finished ping has its row"
    assert any(e.get("event") == "stopped" for e in daemon.events())


def test_sigterm_abandons_a_hung_ping_at_the_shutdown_deadline(
    keepwarm_daemon: Start, emu: Emulator, tmp_path: Path
) -> None:
    """A ping that never answers (api.timeout 30 s) must not hold the exit past shutdown_timeout."""
    doc = two_pairs(emu.base_url, shutdown_timeout="1s")
    doc["api"]["timeout"] = "30s"
    daemon = start(keepwarm_daemon, doc)
    warm_everywhere(daemon, 2)
    emu.inject(Fault(kind="hang", latency=6))
    daemon.wait_for("the hung request to arrive", lambda: pending_faults(emu) == [], DEADLINE)
    code, took = daemon.stop(timeout=15)

    assert code == 0, daemon.text()[-3000:]
    assert took <= 1.0 + 2.0, f"exit took {took:.1f}s with shutdown_timeout 1s: the hung ping held the process"
    # Losing the ping in flight is allowed; losing an earlier one is not.
    answered = {e.request_id for e in messages(emu) if e.status == 200}
    assert answered <= {r.request_id for r in read_ledger(tmp_path / "ledger.sqlite")}


# --- SIGSTOP / SIGCONT ------------------------------------------------------------------------


def test_after_sigstop_for_four_intervals_each_pair_catches_up_once(keepwarm_daemon: Start, emu: Emulator) -> None:
    interval = 0.5
    daemon = start(keepwarm_daemon, two_pairs(emu.base_url))
    warm_everywhere(daemon, 2)
    missed_before = daemon.total("keepwarm_missed_pings_total")
    daemon.signal(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        # Nothing arrives while it is stopped; wait out four intervals by watching that.
        while time.monotonic() < stopped_at + 4 * interval:
            time.sleep(0.05)
    finally:
        daemon.signal(signal.SIGCONT)
    resumed = time.monotonic()
    daemon.wait_for(
        "the pings after the catch-up", lambda: all(len(t) >= 2 for t in by_model(messages(emu, resumed)).values())
        and len(by_model(messages(emu, resumed))) == 2, DEADLINE,
    )
    quiet = [e for e in messages(emu, stopped_at + 0.1) if e.time < resumed]
    assert quiet == [], "a stopped process sends nothing"
    for model, times in by_model(messages(emu, resumed)).items():
        burst = [t for t in times if t < times[0] + 0.8 * interval]
        assert len(burst) == 1, f"{model}: {len(burst)} pings right after resuming, expected one catch-up"
        assert times[0] - resumed < interval, f"{model}: the catch-up came {times[0] - resumed:.2f}s after resuming"
    assert daemon.total("keepwarm_missed_pings_total") - missed_before >= 2 * 2, "skipped slots are counted"


# --- SIGHUP -----------------------------------------------------------------------------------


def test_sighup_rejects_a_bad_config_then_applies_a_good_one_as_a_diff(keepwarm_daemon: Start, tmp_path: Path) -> None:
    """One daemon, two reloads.

    A bad config is rejected with the messages a start-up would give and the old config keeps
    running. Then a good one is applied as a diff over three experts: `kept` is unchanged and
    keeps its cadence, `edited` had its prompt file changed and is pinged at once, `gone` is
    removed and its series disappear.
    """
    interval = 2.0  # long enough to tell "at once" (within the daemon's 1 s signal tick) from cadence
    (tmp_path / "edited.md").write_text(LONG_PROMPT + "\nfirst edition", encoding="utf-8")
    with Emulator(time_scale=0.02, log_limit=20_000) as emu:  # the 5m TTL lasts 6 s
        doc = {
            "api": {"base_url": emu.base_url},
            "defaults": {"interval": "2s", "jitter": "0s"},
            "experts": [
                {"name": "kept", "system": [{"text": LONG_PROMPT}], "models": [SONNET]},
                {"name": "edited", "system": [{"file": "edited.md"}], "models": [OPUS]},
                {"name": "gone", "system": [{"text": LONG_PROMPT + " gone"}], "models": ["claude-sonnet-4-5"]},
            ],
        }
        daemon = start(keepwarm_daemon, doc)
        daemon.wait_for("every pair pinged", lambda: len(by_model(messages(emu))) == 3, DEADLINE)
        assert daemon.total("keepwarm_config_last_reload_successful") == 1

        # The bad config: shape problems and a name the pattern refuses.
        bad = json.loads(json.dumps(doc))
        bad["defaults"]["colour"] = "blue"
        bad["experts"].append({"name": "Bad Name", "system": [{"file": "missing.md"}]})
        write_config(tmp_path, bad)
        daemon.signal(signal.SIGHUP)
        # Meanwhile, the same file at start-up: exit 78 and its problems, word for word.
        started = subprocess.run(
            keepwarm_cmd("run", "--config", str(daemon.config), "--log-format", "json"),
            capture_output=True, text=True, timeout=STARTUP_DEADLINE, env=daemon_env(ANTHROPIC_API_KEY=KEY), check=False,
        )
        daemon.wait_for("the reload to be rejected", lambda: daemon.total("keepwarm_config_last_reload_successful") == 0)
        assert started.returncode == 78
        at_start = [json.loads(line)["problem"] for line in started.stderr.splitlines() if '"config error"' in line]
        rejected = [e["problem"] for e in daemon.events() if e.get("event", "").startswith("reload rejected")]
        assert len(at_start) >= 2 and rejected == at_start

        # The good one, sent just after `edited` was pinged: its cadence would bring the next
        # ping 2 s later, "at once" within the daemon's 1 s signal tick.
        seen = len(by_model(messages(emu))[OPUS])
        daemon.wait_for("a fresh ping of the edited pair", lambda: len(by_model(messages(emu))[OPUS]) > seen, DEADLINE)
        (tmp_path / "edited.md").write_text(LONG_PROMPT + "\nsecond edition", encoding="utf-8")
        doc["experts"] = doc["experts"][:2]
        write_config(tmp_path, doc)
        hup = time.monotonic()
        daemon.signal(signal.SIGHUP)
        daemon.wait_for("the reload", lambda: any(e.get("event") == "config reloaded" for e in daemon.events()))
        applied = time.monotonic()
        daemon.wait_for("a ping of the kept pair after the reload",
                        lambda: any(t > applied for t in by_model(messages(emu)).get(SONNET, [])), DEADLINE)
        log = messages(emu)

    assert daemon.total("keepwarm_config_last_reload_successful") == 1
    old_edited = next(e.fingerprint for e in log if e.model == OPUS)
    first_new = next(e for e in log if e.model == OPUS and e.fingerprint != old_edited)
    assert first_new.time >= hup and first_new.time - hup < 1.6, (
        f"the edited pair was pinged {first_new.time - hup:.2f}s after SIGHUP, not at once"
    )
    # The kept pair's cadence never broke: not by the rejected reload, not by the applied one.
    kept = [e.time for e in log if e.model == SONNET]
    gaps = [b - a for a, b in itertools.pairwise(kept)]
    assert len(gaps) >= 2 and all(interval - 0.1 <= g <= interval + 0.4 for g in gaps), gaps
    m = daemon.metrics()
    assert not [k for k in m if ("expert", "gone") in k[1]], "a removed pair's series disappear"
    assert not [e for e in log if e.model == "claude-sonnet-4-5" and e.time > applied], "a removed pair is not pinged"
    assert KEY not in daemon.text()
