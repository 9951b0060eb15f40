"""The SQLite ledger: real PingOutcome objects in, the same facts out, whatever the file goes through."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from keepwarm.classify import Usage, classify
from keepwarm.config import Pair, parse_config
from keepwarm.ping import PingAttempt, PingError
from keepwarm.pricing import builtin_table
from keepwarm.runner import PingOutcome
from keepwarm.store import Ledger, LedgerError, read_ledger, schema_version
from keepwarm.store import sqlite as ledger_module

ROOT = Path(__file__).resolve().parent.parent
PRICES = builtin_table()
PROMPT = "You are a careful analyst. Cite sources. " * 60
T0 = 1_790_000_000.0


def make_pairs() -> dict[str, Pair]:
    """Real pairs from a config: one priced model, one the price table does not know."""
    config = parse_config(
        {"experts": [{"name": "analyst", "system": [{"text": PROMPT}], "models": ["claude-sonnet-4-6", "claude-unpriced-9"]}]},
        Path("."),
    )
    return {p.model: p for p in config.pairs}


PAIRS = make_pairs()
SONNET = PAIRS["claude-sonnet-4-6"]
UNPRICED = PAIRS["claude-unpriced-9"]


def outcome(pair: Pair, usage: Usage | None, started: float = T0, error: PingError | None = None) -> PingOutcome:
    """A PingOutcome as the runner builds it, costs from the shipped price table."""
    attempts = (
        PingAttempt(started_wall=started, latency=0.25, usage=None, request_id="req_1",
                    error=PingError("overloaded", "Overloaded", 529)),
        PingAttempt(started_wall=started + 1.5, latency=0.5, usage=usage, request_id="req_2", error=error),
    )
    cost = None if usage is None else PRICES.cost(pair.model, usage)
    expires = started + 1.5 + pair.ttl_seconds if usage is not None else 0.0
    return PingOutcome(pair, classify(usage), started, 2.0, attempts, usage, cost, expires)


WARM = Usage(input=8, cache_read=1234, output=1)


def test_round_trip_of_a_successful_ping(tmp_path: Path) -> None:
    sent = outcome(SONNET, Usage(input=8, cache_read=1000, cache_write_5m=200, cache_write_1h=30, output=1))
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.record(sent)
        (row,) = ledger.rows()
    assert (row.time, row.expert, row.model, row.ttl, row.fingerprint, row.result) == (
        T0, "analyst", "claude-sonnet-4-6", "5m", SONNET.fingerprint, "partial")
    assert row.usage == sent.usage
    assert row.costs == sent.cost  # REAL columns keep every bit of a float
    assert (row.latency, row.duration, row.attempts, row.request_id) == (0.5, 2.0, 2, "req_2")
    assert row.expires_at == sent.expires_at
    assert row.error_type is None and row.error_message is None and row.miss_cause is None


def test_a_failed_ping_is_recorded_with_null_usage_and_cost(tmp_path: Path) -> None:
    failed = outcome(SONNET, None, error=PingError("rate_limit", "Number of requests has exceeded your rate limit", 429))
    with Ledger(tmp_path / "l.db") as ledger:
        ledger.record(failed)
        (row,) = ledger.rows()
    assert row.result == "error"
    assert (row.error_type, row.error_message) == ("rate_limit", "Number of requests has exceeded your rate limit")
    assert row.usage is None and row.costs is None
    assert [row.input, row.cache_read, row.cache_write_5m, row.cache_write_1h, row.output] == [None] * 5
    assert row.expires_at is None  # the runner's 0.0, "unknown"


def test_an_unknown_price_is_stored_as_null_not_zero(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as ledger:
        ledger.record(outcome(UNPRICED, WARM))
    with sqlite3.connect(path) as db:
        costs = db.execute(
            "SELECT cost_input, cost_cache_read, cost_cache_write_5m, cost_cache_write_1h, cost_output FROM pings"
        ).fetchone()
        tokens = db.execute("SELECT cache_read FROM pings").fetchone()
    assert costs == (None,) * 5
    assert tokens == (1234,)


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    Ledger(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema_version() == 6


def test_migration_from_an_older_version_keeps_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as ledger:
        ledger.record(outcome(SONNET, WARM))

    def add_region(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE pings ADD COLUMN region TEXT")

    monkeypatch.setattr(ledger_module, "MIGRATIONS", [*ledger_module.MIGRATIONS, add_region])
    with Ledger(path) as ledger:
        ledger.record(outcome(SONNET, WARM, started=T0 + 240))
        assert [r.time for r in ledger.rows()] == [T0, T0 + 240]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(ledger_module.MIGRATIONS)
        assert "region" in [c[1] for c in db.execute("PRAGMA table_info(pings)")]


def test_a_ledger_from_a_newer_keepwarm_is_refused_for_writing_but_readable(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with Ledger(path) as ledger:
        ledger.record(outcome(SONNET, WARM))
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(LedgerError, match=r"schema version 99, newer"):
        Ledger(path)
    assert len(read_ledger(path)) == 1


def test_retention_at_open_and_at_most_hourly(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    day = 86400.0
    with Ledger(path) as ledger:
        for age_days in (10, 3, 0):
            ledger.record(outcome(SONNET, WARM, started=T0 - age_days * day))
    now = [T0]
    ledger = Ledger(path, retention_days=7, clock=lambda: now[0])
    assert [r.time for r in ledger.rows()] == [T0 - 3 * day, T0]  # swept at open
    now[0] += 3599  # within the hour: no sweep, the 3-day-old row ages past 7 days unnoticed
    ledger.retention_days = 2
    ledger.record(outcome(SONNET, WARM, started=now[0]))
    assert len(ledger.rows()) == 3
    now[0] += 2  # an hour since the last sweep
    ledger.record(outcome(SONNET, WARM, started=now[0]))
    assert [r.time for r in ledger.rows()] == [T0, T0 + 3599, T0 + 3601]
    ledger.close()


def test_since_filters_rows(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as ledger:
        for i in range(5):
            ledger.record(outcome(SONNET, WARM, started=T0 + 240 * i))
        assert [r.time for r in ledger.rows(since=T0 + 480)] == [T0 + 480, T0 + 720, T0 + 960]


def test_a_locked_database_is_counted_not_raised_and_the_row_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    ledger = Ledger(path, busy_timeout=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    ledger.record(outcome(SONNET, WARM, started=T0))  # must not raise
    assert ledger.write_errors == 1
    other.execute("COMMIT")
    other.close()
    ledger.record(outcome(SONNET, WARM, started=T0 + 240))
    assert [r.time for r in ledger.rows()] == [T0, T0 + 240]  # the held-back row went in too
    ledger.close()


def test_a_full_database_is_counted_not_raised(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    assert ledger._db is not None
    pages = ledger._db.execute("PRAGMA page_count").fetchone()[0]
    ledger._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full from here on
    for i in range(200):
        ledger.record(outcome(SONNET, WARM, started=T0 + i))
    assert ledger.write_errors > 0
    ledger.close()


def test_record_after_close_does_not_raise(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db")
    ledger.close()
    ledger.record(outcome(SONNET, WARM))
    assert ledger.write_errors == 1


def test_threads_share_one_ledger(tmp_path: Path) -> None:
    import concurrent.futures

    with Ledger(tmp_path / "l.db") as ledger:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: ledger.record(outcome(SONNET, WARM, started=T0 + i)), range(200)))
        assert ledger.write_errors == 0
        assert sorted(r.time for r in ledger.rows()) == [T0 + i for i in range(200)]


@pytest.mark.parametrize("content", [b"this is not a database, it is a text file\n" * 100, b"SQLite format 3\x00" + b"\xff" * 4000])
def test_a_corrupt_file_gives_a_clear_error_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(content)
    with pytest.raises(LedgerError, match=str(path)):
        Ledger(path)
    with pytest.raises(LedgerError, match=str(path)):
        read_ledger(path)


def test_read_ledger_never_creates_a_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(LedgerError, match="no such file"):
        read_ledger(path)
    assert not path.exists()


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from tests.test_ledger import SONNET, WARM, T0, outcome
    from keepwarm.store import Ledger

    ledger = Ledger(sys.argv[1])
    for i in range(100_000):
        ledger.record(outcome(SONNET, WARM, started=T0 + i))
        print(i + 1, flush=True)  # after the commit: this row is durable
    """
)


def test_kill_9_loses_no_committed_row(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    errors = tmp_path / "child.stderr"
    with errors.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(ROOT)],
                                 stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert child.stdout is not None
    reported: list[int] = []
    for line in child.stdout:
        reported.append(int(line))
        if reported[-1] >= 50:
            break
    os.kill(child.pid, signal.SIGKILL)  # mid-burst: it keeps writing until the signal lands
    child.wait(timeout=10)
    with child.stdout:
        reported += [int(x) for x in child.stdout.read().split()]  # read() drains what iteration buffered
    assert child.returncode == -signal.SIGKILL, errors.read_text()
    assert reported, errors.read_text()
    rows = read_ledger(path)
    committed = max(reported)
    times = {r.time for r in rows}
    assert all(T0 + i in times for i in range(committed)), "a row reported committed is missing"
    assert len(rows) in (committed, committed + 1)  # at most the one in flight when killed
    with Ledger(path) as reopened:  # and the file is still fit for writing
        reopened.record(outcome(SONNET, WARM, started=T0 - 1))
        assert reopened.write_errors == 0


def _column_names(path: Path) -> list[Any]:
    with sqlite3.connect(path) as db:
        return [c[1] for c in db.execute("PRAGMA table_info(pings)")]


def test_the_schema_has_every_column_the_report_and_later_changes_need(tmp_path: Path) -> None:
    Ledger(tmp_path / "l.db").close()
    assert _column_names(tmp_path / "l.db") == ["id", *ledger_module.COLUMNS]
    assert "miss_cause" in ledger_module.COLUMNS
