"""Every fault the API can throw, against the real daemon process: counted, survived, recovered.

One `keepwarm run` serves the whole module (starting a daemon costs seconds; these tests
cost what their faults cost). It pings two pairs every half second against an emulator
whose 5-minute TTL lasts 3 s. Each test waits until every pair has pinged warm since it
began, injects its fault into the emulator (which runs in this process), checks the error
is counted under its documented `error_type`, and then waits until every pair pings warm
again with no restart. No test sleeps for a schedule: each polls with a deadline.
"""

from __future__ import annotations

import copy
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import LONG_PROMPT, DaemonProcess, daemon_env, free_port, write_config

from keepwarm.emulator import Emulator, Fault, LogEntry

KEY = "sk-ant-test-faults-7f3c9a1e5b2d4086-Q8zK"
PAIRS = (("analyst", "claude-sonnet-4-6"), ("critic", "claude-opus-4-8"))
INTERVAL = 0.5  # seconds between pings of a pair
TIME_SCALE = 0.01  # the emulator's 5m TTL lasts 3 s: six intervals of margin
DEADLINE = 15.0  # for anything the schedule should bring within a few intervals


@dataclass
class Rig:
    """The module's daemon, its emulator, and the config it was started from."""

    daemon: DaemonProcess
    emu: Emulator
    doc: dict[str, Any]
    directory: Path

    def errors(self) -> dict[str, float]:
        """keepwarm_ping_errors_total by error_type, summed over the pairs."""
        out: dict[str, float] = {}
        for (name, labels), value in self.daemon.metrics().items():
            if name == "keepwarm_ping_errors_total":
                kind = dict(labels)["error_type"]
                out[kind] = out.get(kind, 0.0) + value
        return out

    def warm_counts(self) -> dict[tuple[str, str], float]:
        return {
            (e, m): self.daemon.total("keepwarm_pings_total", expert=e, model=m, result="warm") for e, m in PAIRS
        }

    def wait_every_pair_warm(self, what: str, deadline: float = DEADLINE) -> None:
        """Wait until every pair has had a `warm` ping from now on."""
        before = self.warm_counts()
        self.daemon.wait_for(
            f"every pair warm {what}",
            lambda: all(n > before[p] for p, n in self.warm_counts().items()),
            deadline,
        )

    def wait_errors(self, what: str, check: Callable[[dict[str, float]], bool]) -> dict[str, float]:
        self.daemon.wait_for(what, lambda: check(self.errors()), DEADLINE)
        return self.errors()

    def reload(self, doc: dict[str, Any]) -> None:
        """Write `doc` as the config, SIGHUP, and wait until the daemon says it applied it."""
        done = self._reloads()
        write_config(self.directory, doc)
        self.daemon.signal(signal.SIGHUP)
        self.daemon.wait_for("the reload to be applied", lambda: self._reloads() > done, DEADLINE)

    def _reloads(self) -> int:
        return sum(e.get("event") == "config reloaded" for e in self.daemon.events())

    def requests(self, since: float, model: str | None = None) -> list[LogEntry]:
        """Messages requests the emulator received at or after `since` (its monotonic clock)."""
        return [
            e for e in self.emu.log
            if e.time >= since and e.path == "/v1/messages" and (model is None or e.model == model)
        ]


def config_doc(base_url: str) -> dict[str, Any]:
    """Two pairs, each its own expert, so a test can change one prompt and not the other."""
    return {
        "api": {"base_url": base_url, "timeout": "1s"},
        "defaults": {"interval": f"{int(INTERVAL * 1000)}ms", "jitter": "0s"},
        "experts": [
            {"name": "analyst", "system": [{"text": LONG_PROMPT}], "models": ["claude-sonnet-4-6"]},
            {"name": "critic", "system": [{"file": "critic.md"}], "models": ["claude-opus-4-8"]},
        ],
        "ledger": {"path": "ledger.sqlite"},
        "shutdown_timeout": "5s",
    }


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("faults")
    (directory / "critic.md").write_text(LONG_PROMPT + "\nYou are the critic.", encoding="utf-8")
    with Emulator(time_scale=TIME_SCALE, log_limit=20_000) as emu:
        doc = config_doc(emu.base_url)
        doc["metrics"] = {"listen": "127.0.0.1:0"}  # the port it gets is in its start-up line
        daemon = DaemonProcess(write_config(directory, doc), None, daemon_env(ANTHROPIC_API_KEY=KEY))
        try:
            daemon.wait_for("the metrics endpoint", lambda: daemon.get("/metrics")[0] == 200, DEADLINE)
            yield Rig(daemon, emu, doc, directory)
        finally:
            daemon.kill()


@pytest.fixture
def fx(rig: Rig) -> Iterator[Rig]:
    """The rig, with every pair warm when the test starts; faults cleared and liveness checked after."""
    rig.wait_every_pair_warm("before the fault")
    try:
        yield rig
    finally:
        rig.emu.clear_faults()
    assert rig.daemon.alive, f"the daemon exited ({rig.daemon.proc.returncode})\n{rig.daemon.text()[-3000:]}"


def grew(before: dict[str, float], after: dict[str, float], kind: str) -> float:
    return after.get(kind, 0.0) - before.get(kind, 0.0)


# --- transient faults: retried, counted, recovered ------------------------------------------------


def test_429_with_retry_after_is_rate_limit_and_the_retry_waits_for_it(fx: Rig) -> None:
    before = fx.errors()
    injected = time.monotonic()
    fx.emu.inject(Fault(429, retry_after=1))
    after = fx.wait_errors("the 429 to be counted", lambda e: grew(before, e, "rate_limit") >= 1)
    assert grew(before, after, "rate_limit") == 1
    fx.wait_every_pair_warm("after the 429")
    # The pair that was told to wait sent nothing for a second: retry-after was honoured.
    log = fx.requests(injected)
    hit = next(e for e in log if e.status == 429)
    following = [e for e in log if e.model == hit.model and e.time > hit.time]
    assert following and following[0].time - hit.time >= 0.95, [(e.status, e.time - hit.time) for e in following[:3]]


def test_a_529_storm_counts_every_attempt_as_overloaded_and_passes(fx: Rig) -> None:
    storm = 4
    before = fx.errors()
    injected = time.monotonic()
    fx.emu.inject(Fault(529, count=storm))
    fx.wait_every_pair_warm("after the 529 storm")
    after = fx.errors()
    assert len([e for e in fx.requests(injected) if e.status == 529]) == storm
    assert grew(before, after, "overloaded") == storm, "every failed attempt is counted, retried ones included"
    assert sum(after.values()) - sum(before.values()) == storm, after


def test_500_502_503_are_server_errors(fx: Rig) -> None:
    before = fx.errors()
    injected = time.monotonic()
    for status in (500, 502, 503):
        fx.emu.inject(Fault(status))
    fx.wait_every_pair_warm("after three 5xx")
    after = fx.errors()
    assert sorted(e.status for e in fx.requests(injected) if e.status >= 500) == [500, 502, 503]
    assert grew(before, after, "server") == 3, after


def test_a_client_timeout_is_timeout_not_connection(fx: Rig) -> None:
    """A hang (no answer at all) and a slow answer, both longer than api.timeout (1 s)."""
    before = fx.errors()
    fx.emu.inject(Fault(kind="hang", latency=2.5))
    fx.emu.inject(Fault(kind="latency", latency=2.0))
    after = fx.wait_errors("two timeouts", lambda e: grew(before, e, "timeout") >= 2)
    fx.wait_every_pair_warm("after the timeouts")
    after = fx.errors()
    assert grew(before, after, "timeout") == 2
    assert grew(before, after, "connection") == 0, "a client timeout must not be counted as a connection error"


def test_a_dropped_connection_is_connection(fx: Rig) -> None:
    before = fx.errors()
    fx.emu.inject(Fault(kind="drop"))
    fx.wait_every_pair_warm("after the dropped connection")
    after = fx.errors()
    assert grew(before, after, "connection") == 1, after
    assert sum(after.values()) - sum(before.values()) == 1


def test_a_malformed_body_is_other(fx: Rig) -> None:
    before = fx.errors()
    fx.emu.inject(Fault(kind="malformed"))
    fx.wait_every_pair_warm("after the malformed body")
    after = fx.errors()
    assert grew(before, after, "other") == 1, after
    assert sum(after.values()) - sum(before.values()) == 1


def test_a_refused_connection_is_connection_and_a_reload_to_the_right_url_recovers(fx: Rig) -> None:
    """The API's address goes dead (here: the config points at a closed port), then is fixed."""
    before = fx.errors()
    broken = copy.deepcopy(fx.doc)
    broken["api"]["base_url"] = f"http://127.0.0.1:{free_port()}"
    fx.reload(broken)
    after = fx.wait_errors("refused connections", lambda e: grew(before, e, "connection") >= 2)
    assert grew(before, after, "timeout") == 0
    fx.reload(fx.doc)
    fx.wait_every_pair_warm("after the address was fixed")


# --- faults that are not retried --------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [(401, "authentication"), (403, "permission")])
def test_401_and_403_are_counted_and_name_where_the_key_came_from(fx: Rig, status: int, kind: str) -> None:
    before = fx.errors()
    logged = len(fx.daemon.events())
    fx.emu.inject(Fault(status))
    after = fx.wait_errors(f"the {status} to be counted", lambda e: grew(before, e, kind) >= 1)
    assert grew(before, after, kind) == 1
    fx.wait_every_pair_warm(f"after the {status}")
    refusals = [e for e in fx.daemon.events()[logged:] if e.get("status") == status]
    assert refusals and refusals[0]["level"] == "error", refusals
    assert "environment variable ANTHROPIC_API_KEY" in refusals[0]["event"], refusals[0]
    assert KEY not in fx.daemon.text()


def test_a_400_parks_the_pair_until_its_config_changes(fx: Rig) -> None:
    message = "system.0.text: this emulated request was refused on purpose"
    opus = "claude-opus-4-8"
    before = fx.errors()
    logged = len(fx.daemon.events())
    fx.emu.inject(Fault(400, model=opus, message=message))
    after = fx.wait_errors("the 400 to be counted", lambda e: grew(before, e, "invalid_request") >= 1)
    assert grew(before, after, "invalid_request") == 1
    rejected = [e for e in fx.daemon.events()[logged:] if e.get("status") == 400]
    assert rejected and rejected[0]["api_message"] == message and rejected[0]["level"] == "error"
    parked_at = next(e.time for e in fx.emu.log if e.status == 400)

    # Parked: the other pair goes on pinging, this one sends nothing more.
    sonnet_before = len(fx.requests(parked_at, "claude-sonnet-4-6"))
    fx.daemon.wait_for(
        "six more intervals of the other pair",
        lambda: len(fx.requests(parked_at, "claude-sonnet-4-6")) >= sonnet_before + 6,
        DEADLINE,
    )
    assert [e for e in fx.requests(parked_at, opus) if e.time > parked_at] == [], "a parked pair is not pinged"
    _, page = fx.daemon.get("/")
    assert 'class="parked">parked<' in page

    # Its config changes (the prompt is edited), SIGHUP: pinged again at once, and warm after.
    (fx.directory / "critic.md").write_text(LONG_PROMPT + "\nYou are the critic, second edition.", encoding="utf-8")
    reloaded = time.monotonic()
    fx.reload(fx.doc)
    fx.daemon.wait_for("the edited pair to be pinged", lambda: any(e.status == 200 for e in fx.requests(reloaded, opus)))
    first = next(e for e in fx.requests(reloaded, opus) if e.status == 200)
    assert first.fingerprint != next(e.fingerprint for e in fx.emu.log if e.status == 400)
    fx.wait_every_pair_warm("after the edit")


def test_the_spend_cap_is_rate_limit_logged_loudly_and_not_retried(fx: Rig) -> None:
    """Last in the module: its back-off may hold every pair until someone acts (here: a reload)."""
    before = fx.errors()
    logged = len(fx.daemon.events())
    injected = time.monotonic()
    fx.emu.inject(Fault(spend_cap=True))
    after = fx.wait_errors("the spend cap to be counted", lambda e: grew(before, e, "rate_limit") >= 1)
    assert grew(before, after, "rate_limit") == 1
    loud = [e for e in fx.daemon.events()[logged:] if e.get("status") == 429]
    assert loud and loud[0]["level"] == "error" and "spend" in loud[0]["event"], loud
    capped = next(e for e in fx.requests(injected) if e.status == 429)
    retried = [e for e in fx.requests(capped.time) if e.model == capped.model and e.time < capped.time + INTERVAL * 0.9]
    assert [e for e in retried if e.request_id != capped.request_id] == [], "the spend cap is not retried at once"
    # The operator raises the cap and reloads: every pair is warm again, without a restart.
    fx.reload(fx.doc)
    fx.wait_every_pair_warm("after the cap was raised", deadline=8)  # sixteen intervals
