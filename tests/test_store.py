"""The state a restart resumes from: kept up to date with every row, read back in O(pairs).

The daemon, `report` and the status page ask the store (`keepwarm.store`) for what they need;
these tests hold both backends (SQLite, and a real PostgreSQL the suite starts) to what the
daemon relies on after a restart: each pair's latest touches, the budget's trailing spend, the
page's hourly sums, rows kept apart by origin; and the SQLite file to what only it has: a ledger
of an older keepwarm brought up to date, and the default place of the file.
"""

from __future__ import annotations

import math
import os
import sqlite3
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_ledger import PRICES, SONNET, T0, UNPRICED, WARM, outcome
from test_observations import _config, _obs

from keepwarm.budget import Budget
from keepwarm.classify import Usage
from keepwarm.metrics import Metrics
from keepwarm.observations import Observer
from keepwarm.ping import PingError
from keepwarm.store import (
    MIGRATIONS,
    SPEND_BUCKET,
    Ledger,
    Location,
    PairKey,
    PostgresTarget,
    Store,
    read_ledger,
    read_origins,
)
from keepwarm.store.paths import default_ledger_path, prepare

REWARM = Usage(input=8, cache_write_5m=1234, output=1)
KEY = PairKey(SONNET.expert, SONNET.model, SONNET.fingerprint)


@dataclass
class Backend:
    """One store location, and how to open a writer on it: what the contract tests run against."""

    where: Location
    open: Callable[..., Store]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The same contract on both backends: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        path = tmp_path / "l.db"
        return Backend(path, lambda **kw: Ledger(path, **kw))
    from keepwarm.store.postgres import PostgresLedger

    target = PostgresTarget(request.getfixturevalue("postgres_url"))
    return Backend(target, lambda **kw: PostgresLedger(target, **kw))


def _opened(store: Store) -> Any:
    return store  # both are context managers; the Protocol names only what the daemon calls


def test_a_pair_resumes_from_its_latest_ping_and_latest_refresh(backend: Backend) -> None:
    with _opened(backend.open()) as ledger:
        ledger.record(outcome(SONNET, REWARM, T0))
        ledger.record(outcome(SONNET, WARM, T0 + 240))
        ledger.record(outcome(SONNET, None, T0 + 480, error=PingError("overloaded", "Overloaded", 529)))
        (state,) = ledger.resume([KEY], T0 + 500).values()
    assert (state.last_ping, state.last_result) == (T0 + 480, "error")
    assert state.last_refresh == T0 + 240, "a failed ping refreshed nothing"
    assert state.prefix_tokens == 1234
    assert state.last_touch() == T0 + 240
    assert state.touches == (), "a fixed pair needs no history"


def test_only_the_pair_s_current_prefix_and_the_ledger_s_own_origin_count(backend: Backend) -> None:
    path = backend.where
    with _opened(backend.open(origin="emulator")) as ledger:
        ledger.record(outcome(SONNET, WARM, T0 + 100))
    with _opened(backend.open()) as ledger:
        ledger.record(outcome(SONNET, WARM, T0))
        assert ledger.resume([KEY], T0 + 200)[(SONNET.expert, SONNET.model)].last_ping == T0
        changed = PairKey(SONNET.expert, SONNET.model, "f" * 64)  # the prompt changed: a new cache
        assert ledger.resume([changed], T0 + 200) == {}
        assert [r.time for r in ledger.rows()] == [T0], "a writer reads its own origin"
    assert {r.origin for r in read_ledger(path)} == {"api", "emulator"}
    assert [r.time for r in read_ledger(path, origins=("api",))] == [T0]
    assert read_origins(path) == {"api": 1, "emulator": 1}


def test_production_touches_resume_too_but_drift_does_not_refresh(tmp_path: Path, backend: Backend) -> None:
    config = _config(tmp_path)
    ledger = backend.open()
    observer = Observer(config, Metrics(), ledger=lambda: ledger, clock=lambda: T0 + 1000)
    observer.accept([_obs(at=T0 + 10, read=1500)])
    observer.accept([_obs(at=T0 + 20, read=1500, fingerprint="b" * 64)])  # another prefix: drift
    pair = next(p for p in config.pairs if p.key == "analyst/claude-sonnet-4-6")
    key = PairKey(pair.expert, pair.model, pair.fingerprint, history=True)
    state = ledger.resume([key], T0 + 1000)[(pair.expert, pair.model)]
    assert state.last_production == T0 + 10
    assert state.last_request == T0 + 20
    assert state.touches == ((T0 + 10, "production", "warm", 1500),), "an adaptive pair gets its history"
    ledger.close()


def test_an_adaptive_pair_s_history_is_bounded_and_oldest_first(backend: Backend) -> None:
    with _opened(backend.open()) as ledger:
        for i in range(50):
            ledger.record(outcome(SONNET, WARM, T0 + 240 * i))
        key = PairKey(SONNET.expert, SONNET.model, SONNET.fingerprint, history=True)
        touches = ledger.resume([key], T0 + 240 * 50)[(SONNET.expert, SONNET.model)].touches
    assert [t[0] for t in touches] == [T0 + 240 * i for i in range(18, 50)], "the last 32 pings"


def test_the_budget_s_spend_survives_exactly(backend: Backend) -> None:
    """What a process counted toward the cap is what the next one restores, bucket for bucket."""
    live = Budget(1.0)
    with _opened(backend.open()) as ledger:
        for i in range(400):
            sent = outcome(SONNET, WARM if i % 7 else REWARM, T0 + 3.7 * i)
            ledger.record(sent)
            live.record(sent.started, sent.total_cost)
        ledger.record(outcome(UNPRICED, WARM, T0 + 5))  # no price: counted as nothing, as live
        now = T0 + 3.7 * 400
        restored = Budget(1.0)
        restored.restore(ledger.spend(now - restored.window))
    for later in (now, now + 86400 - 600, now + 86400 + 5):
        assert restored.spent(later) == pytest.approx(live.spent(later), rel=1e-12, abs=1e-15)
    assert restored.resume_at(now) == live.resume_at(now)
    with _opened(backend.open()) as reopened:
        assert all(start % SPEND_BUCKET == 0 for start, _ in reopened.spend(0))


def test_the_page_s_hours_come_from_the_summaries(tmp_path: Path, backend: Backend) -> None:
    config = _config(tmp_path)
    ledger = backend.open()
    ledger.record(outcome(SONNET, WARM, T0))
    ledger.record(outcome(SONNET, WARM, T0 + 7200))
    observer = Observer(config, Metrics(), ledger=lambda: ledger, clock=lambda: T0 + 7300)
    observer.accept([_obs(at=T0 + 7250, read=1500)])
    recent = ledger.recent(T0 + 7300, T0 + 7000)
    costs = [outcome(SONNET, WARM, T0).total_cost or 0.0] * 2
    assert sum(h[0] for h in recent.all_hours.values()) == pytest.approx(math.fsum(costs), rel=1e-12)
    assert sum(h[2] for h in recent.all_hours.values()) == 1
    assert list(recent.pair_hours) == [("analyst", "claude-sonnet-4-6", int((T0 + 7250) // 3600))]
    assert recent.pings == {("analyst", "claude-sonnet-4-6"): [T0 + 7200]}
    assert recent.last_production == {("analyst", "claude-sonnet-4-6"): T0 + 7250}
    assert recent.first == T0
    ledger.close()


def test_a_ledger_of_the_previous_schema_gets_its_summaries_once(tmp_path: Path) -> None:
    """An existing ledger must resume as well as a new one: the summaries are derived from its rows."""
    path = tmp_path / "l.db"
    with sqlite3.connect(path) as db:  # a version-2 ledger with the rows it would hold
        for step in MIGRATIONS[:2]:
            step(db)
        db.execute("PRAGMA user_version = 2")
    with Ledger(path) as fresh:  # written as the current keepwarm writes, then moved back to v2's shape
        fresh.record(outcome(SONNET, REWARM, T0))
        fresh.record(outcome(SONNET, WARM, T0 + 240))
        expected_state = fresh.resume([KEY], T0 + 300)
        expected_spend = fresh.spend(0)
    with sqlite3.connect(path) as db:
        for table in ("pair_state", "spend", "hours", "members"):
            db.execute(f"DROP TABLE {table}")
        for table in ("pings", "observations"):  # and the columns of later versions
            for column in ("origin", "account", "provider", "endpoint"):
                db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("PRAGMA user_version = 2")
    with Ledger(path) as migrated:
        assert migrated.resume([KEY], T0 + 300) == expected_state
        spend = migrated.spend(0)
        assert [start for start, _ in spend] == [start for start, _ in expected_spend]
        assert [usd for _, usd in spend] == pytest.approx([usd for _, usd in expected_spend], rel=1e-12)


def test_retention_also_prunes_the_summaries(backend: Backend) -> None:
    clock = [T0]
    ledger = backend.open(retention_days=30, clock=lambda: clock[0])
    ledger.record(outcome(SONNET, WARM, T0))
    clock[0] = T0 + 31 * 86400
    ledger.record(outcome(SONNET, WARM, T0 - 40 * 86400))  # the first write after an hour sweeps
    assert ledger.rows() == [], "both rows are past the retention"
    assert ledger.resume([KEY], clock[0]) == {}
    assert ledger.spend(0) == []
    assert ledger.recent(clock[0], clock[0] - 300).all_hours == {}
    ledger.close()


def test_the_default_state_path_follows_systemd_then_xdg_then_home(tmp_path: Path) -> None:
    assert default_ledger_path({"STATE_DIRECTORY": "/var/lib/keepwarm:/var/lib/other", "HOME": "/h"}) == Path(
        "/var/lib/keepwarm/ledger.db")
    assert default_ledger_path({"XDG_STATE_HOME": "/x", "HOME": "/h"}) == Path("/x/keepwarm/ledger.db")
    assert default_ledger_path({"XDG_STATE_HOME": "relative", "HOME": "/h"}) == Path(
        "/h/.local/state/keepwarm/ledger.db"), "the XDG spec ignores a relative path"
    assert default_ledger_path({"HOME": "/h"}) == Path("/h/.local/state/keepwarm/ledger.db")
    path = tmp_path / "state" / "keepwarm" / "ledger.db"
    prepare(path)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    Ledger(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, "SQLite keeps the mode of the file it opens"


def test_costs_in_the_summaries_match_the_rows_to_the_last_bit(backend: Backend) -> None:
    with _opened(backend.open()) as ledger:
        for i in range(100):
            ledger.record(outcome(SONNET, WARM if i % 3 else REWARM, T0 + 2.5 * i))
        total = math.fsum(c for r in ledger.rows() for c in (r.costs or {}).values())
        assert math.fsum(usd for _, usd in ledger.spend(0)) == pytest.approx(total, rel=1e-12)
    assert PRICES.cost(SONNET.model, WARM)


def test_report_leaves_emulator_and_time_scaled_rows_out_unless_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import io
    import json

    from keepwarm.report import run_report

    path = tmp_path / "l.db"
    with Ledger(path, origin="emulator") as demo:
        demo.record(outcome(SONNET, REWARM, T0))
    with Ledger(path, origin="scaled") as scaled:
        scaled.record(outcome(SONNET, WARM, T0 + 1))
    with Ledger(path) as real:
        real.record(outcome(SONNET, WARM, T0 + 2))
    out = io.StringIO()
    assert run_report(path, PRICES, None, "json", out, now=T0 + 10) == 0
    assert json.loads(out.getvalue())["total"]["pings"] == 1, "only the real ping"
    assert "left out 1 row(s) from emulator runs, 1 row(s) from scaled runs" in capsys.readouterr().err
    out = io.StringIO()
    assert run_report(path, PRICES, None, "json", out, now=T0 + 10, origins=None) == 0
    assert json.loads(out.getvalue())["total"]["pings"] == 3
