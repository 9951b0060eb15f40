"""The review's attacks on the observations endpoint and the ledger, each a regression test."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

from test_observations import T0, FakeClock, Served, _config, _obs, _value

from keepwarm.classify import Usage
from keepwarm.metrics import Metrics
from keepwarm.observations import Observation, Observer, Rejection, validate
from keepwarm.store import Ledger, read_observations

PAIR = "analyst/claude-sonnet-4-6"


def test_counts_a_ledger_cannot_hold_are_refused_per_item_and_the_rest_is_kept(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.db", clock=FakeClock(T0))
    served = Served(_config(tmp_path), clock=FakeClock(T0))
    served.observer.ledger = lambda: ledger
    try:
        huge = _obs(read=1500)
        huge["usage"]["input_tokens"] = 2**63
        status, doc = served.post({"observations": [
            huge, _obs(read=1500, request_id="req_\ud800"), _obs(read=1500, request_id="req_ok")]})
        assert status == 202 and doc["accepted"] == 1
        assert [(r["index"], r["reason"]) for r in doc["rejected"]] == [(0, "malformed"), (1, "malformed")]
        assert [r.request_id for r in read_observations(ledger.path)] == ["req_ok"]
        cost = _value(served.metrics, "keepwarm_production_cost_usd_total", expert="analyst",
                      model="claude-sonnet-4-6", kind="input")
        assert cost is not None and cost < 1, "only the sane observation was priced"
    finally:
        served.close()
        ledger.close()


def _bad_record(observer: Observer, **usage: int) -> Any:
    """An observation past validation with values no SQLite row can hold (as a bug would make)."""
    good = validate(_obs(read=1500), 0, observer.pairs, T0)
    assert not isinstance(good, Rejection)
    bad = dataclasses.replace(good, usage=Usage(input=2**63, cache_read=1500))
    return observer.record([bad])


def test_a_row_the_ledger_cannot_store_is_isolated_and_the_others_are_written(tmp_path: Path, caplog: Any) -> None:
    clock = FakeClock(T0)
    errors: list[int] = []
    ledger = Ledger(tmp_path / "l.db", clock=clock, on_error=lambda: errors.append(1))
    observer = Observer(_config(tmp_path), Metrics(), clock=clock)
    good = validate(_obs(read=1500, request_id="req_good"), 0, observer.pairs, T0)
    assert isinstance(good, Observation)
    ledger.record_observations(_bad_record(observer) + observer.record([good]))
    assert [r.request_id for r in ledger.observations()] == ["req_good"], "the good row did not wait behind the bad"
    assert (ledger.unwritable, ledger.pending, len(errors)) == (1, 0, 1)
    assert "1 ledger row(s) the database cannot store were dropped" in caplog.text
    assert caplog.records[-1].keepwarm_fields["lost"] == 1
    # Nothing is left behind to block the next writes.
    later = validate(_obs(at=T0 + 1, read=1500, request_id="req_later"), 0, observer.pairs, T0 + 1)
    assert isinstance(later, Observation)
    ledger.record_observations(observer.record([later]))
    assert [r.request_id for r in ledger.observations()] == ["req_good", "req_later"]
    ledger.close()
    assert [r.request_id for r in read_observations(tmp_path / "l.db")] == ["req_good", "req_later"]


def test_a_locked_file_keeps_every_row_pending_and_logs_the_true_count(tmp_path: Path, caplog: Any) -> None:
    clock = FakeClock(T0)
    path = tmp_path / "l.db"
    ledger = Ledger(path, clock=clock, busy_timeout=0.05)
    observer = Observer(_config(tmp_path), Metrics(), clock=clock)
    items = [validate(_obs(at=T0 - i, read=1500, request_id=f"req_{i}"), 0, observer.pairs, T0) for i in range(3)]
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    ledger.record_observations(observer.record([i for i in items if isinstance(i, Observation)]))
    assert ledger.pending == 3 and ledger.unwritable == 0, "a busy file is no reason to drop a row"
    assert caplog.records[-1].keepwarm_fields["pending"] == 3
    other.execute("ROLLBACK")
    other.close()
    ledger.close()
    assert len(read_observations(path)) == 3


def test_deeply_nested_json_is_a_400_not_a_500(tmp_path: Path) -> None:
    served = Served(_config(tmp_path))
    try:
        status, doc = served.post(b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and "nested too deeply" in doc["error"]
        status, doc = served.post(b'{"observations": [' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"]}")
        assert status == 400
        big = json.dumps(_obs()).replace('"output_tokens": 5', '"output_tokens": ' + "9" * 5000).encode()
        assert served.post(big)[0] == 400, "an integer too long to parse is a malformed body"
        float_count = json.dumps(_obs()).replace('"output_tokens": 5', '"output_tokens": 1e400').encode()
        status, doc = served.post(float_count)
        assert status == 202 and doc["rejected"][0]["reason"] == "malformed"
    finally:
        served.close()


def test_a_future_at_is_rejected_with_an_allowance_scaled_by_the_time_scale(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    touches: list[Any] = []
    config = _config(tmp_path)
    observer = Observer(config, Metrics(), clock=clock, touch=lambda k, t: touches.append(t))
    status, doc = observer.accept([_obs(at=T0 + 60, read=1500)])
    assert (status, doc["accepted"], doc["rejected"][0]["reason"]) == (202, 0, "future")
    assert touches == [], "a report from the future is never taken as a touch"
    assert _value(observer.metrics, "keepwarm_observations_rejected_total", reason="malformed") == 1
    assert observer.accept([_obs(at=T0 + 4, read=1500)])[1]["accepted"] == 1, "clock skew of seconds is fine"
    scaled = Observer(config.scaled(0.05), Metrics(), clock=clock)
    # At x0.05 a 5-minute TTL lasts 15 s: 4 s ahead is 80 real seconds.
    assert scaled.accept([_obs(at=T0 + 4, read=1500)])[1]["rejected"][0]["reason"] == "future"
    assert scaled.accept([_obs(at=T0 + 0.2, read=1500)])[1]["accepted"] == 1


def test_a_v2_ledger_with_copies_migrates_to_one_row_per_request_id(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    clock = FakeClock(T0)
    observer = Observer(_config(tmp_path), Metrics(), clock=clock)
    one = validate(_obs(read=1500, request_id="req_1"), 0, observer.pairs, T0)
    assert isinstance(one, Observation)
    records = observer.record([one])
    with Ledger(path, clock=clock) as ledger:
        ledger.record_observations(records)
    # Made into what the previous keepwarm wrote (schema 2: no unique key, no summaries, no origin,
    # no members), with a client's retry stored twice.
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX observations_request_id")
        for table in ("pair_state", "spend", "hours", "members"):
            db.execute(f"DROP TABLE {table}")
        for table in ("pings", "observations"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN origin")
        columns = [row[1] for row in db.execute("PRAGMA table_info(observations)") if row[1] != "id"]
        db.execute(f"INSERT INTO observations ({', '.join(columns)}) SELECT {', '.join(columns)} FROM observations")
        db.execute("PRAGMA user_version = 2")
        assert db.execute("SELECT COUNT(*) FROM observations").fetchone() == (2,)
    with Ledger(path, clock=clock) as ledger:
        assert [r.request_id for r in ledger.observations()] == ["req_1"]
        ledger.record_observations(records)  # a copy beyond the observer's window: no new row, no error
        assert [r.request_id for r in ledger.observations()] == ["req_1"] and ledger.write_errors == 0


def test_the_same_observation_sent_twice_counts_once(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    touches: list[Any] = []
    observer = Observer(_config(tmp_path), Metrics(), clock=clock, ledger=lambda: ledger,
                        touch=lambda k, t: touches.append(t))
    first = _obs(read=1500, write=10, request_id="req_a", fingerprint="b" * 64)
    assert observer.accept([first, _obs(at=T0 - 1, read=1500)]) == (202, {"accepted": 2, "rejected": []})
    # A client's retry of the whole batch, and a copy within one batch.
    assert observer.accept([first, first, _obs(at=T0 - 1, read=1500)]) == (
        202, {"accepted": 3, "rejected": [], "duplicates": 2})
    labels = {"expert": "analyst", "model": "claude-sonnet-4-6"}
    requests = sum(_value(observer.metrics, "keepwarm_production_requests_total", **labels, result=r) or 0
                   for r in ("warm", "rewarmed", "partial", "uncached"))
    assert requests == 3, "the copies were not counted; one without a request_id always is"
    assert _value(observer.metrics, "keepwarm_prefix_drift_total", **labels) == 1
    assert [r.request_id for r in ledger.observations()].count("req_a") == 1
    ledger.close()


def test_the_window_of_request_ids_is_bounded(tmp_path: Path, monkeypatch: Any) -> None:
    import keepwarm.observations as module

    monkeypatch.setattr(module, "DEDUP_WINDOW", 3)
    observer = Observer(_config(tmp_path), Metrics(), clock=FakeClock(T0))
    for i in range(5):
        observer.accept([_obs(read=1500, request_id=f"req_{i}")])
    assert list(observer._seen) == ["req_2", "req_3", "req_4"]
    assert "duplicates" not in observer.accept([_obs(read=1500, request_id="req_0")])[1], "forgotten: new again"


def test_a_ledger_that_cannot_keep_them_gets_503_and_nothing_changes(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    path = tmp_path / "l.db"
    ledger = Ledger(path, clock=clock, busy_timeout=0.05)
    served = Served(_config(tmp_path), clock=clock)
    served.observer.ledger = lambda: ledger
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # the disk is full, or another process holds the file
        assert served.post(_obs(at=T0 - 2, read=1500, request_id="req_1"))[0] == 202, "the failure is not known yet"
        assert ledger.pending == 1
        before = b"".join(served.metrics.exposition())
        conn = __import__("http.client").client.HTTPConnection(*served.web.address, timeout=10)
        body = json.dumps(_obs(at=T0 - 1, read=1500, request_id="req_2"))
        conn.request("POST", "/v1/observations", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert (resp.status, resp.getheader("Retry-After")) == (503, "5")
        assert "retry" in json.loads(resp.read())["error"]
        conn.close()
        after = b"".join(served.metrics.exposition())
        strip = [line for line in before.splitlines() if not line.startswith(b"process_")]
        assert strip == [line for line in after.splitlines() if not line.startswith(b"process_")], "a refused batch changes nothing"
        assert served.touches and len(served.touches) == 1
        other.execute("ROLLBACK")
        status, doc = served.post(body.encode())  # the client's retry, once the file is writable
        assert (status, doc.get("duplicates")) == (202, None)
        assert [r.request_id for r in ledger.observations()] == ["req_1", "req_2"]
    finally:
        other.close()
        served.close()
        ledger.close()


def test_old_reports_do_not_grow_the_page_s_hours(tmp_path: Path) -> None:
    from keepwarm.observations import Totals, Windows

    windows = Windows(since=T0)
    for hour in range(24 * 7 + 50):  # a week and more of hours, newest first then a report days late
        windows.add("k", T0 - hour * 3600, Totals(requests=1))
    assert len(windows.buckets["all pairs"]) <= 7 * 24 + 1 and len(windows.buckets["k"]) <= 25
    windows.add("k", T0 - 30 * 86400, Totals(requests=1))
    assert len(windows.buckets["all pairs"]) <= 7 * 24 + 1
    assert windows.total(None, 7 * 86400, T0).requests == 7 * 24, "the week's hours are all there"


def test_a_touch_is_never_later_than_now(tmp_path: Path) -> None:
    touches: list[Any] = []
    observer = Observer(_config(tmp_path), Metrics(), clock=FakeClock(T0), touch=lambda k, t: touches.append(t))
    assert observer.accept([_obs(at=T0 + 3, read=1500)])[1]["accepted"] == 1
    assert [t.at for t in touches] == [T0]


def test_a_write_while_warm_reported_hours_late_is_judged_from_the_ledger(tmp_path: Path) -> None:
    from keepwarm.classify import Result

    path = tmp_path / "l.db"
    clock = FakeClock(T0)
    ledger = Ledger(path, clock=clock)
    config = _config(tmp_path)
    observer = Observer(config, Metrics(), clock=clock, ledger=lambda: ledger)
    pair = config.pairs[0]
    # 30 pings four minutes apart, each reading the prefix: the ledger has them all, memory the last 16.
    with sqlite3.connect(path) as db:
        for i in range(30):
            db.execute("INSERT INTO pings (time, expert, model, ttl, fingerprint, result, input, cache_read,"
                       " cache_write_5m, cache_write_1h, output, attempts) VALUES (?, ?, ?, ?, ?, 'warm', 3, 2048, 0, 0, 1, 1)",
                       (T0 + 240 * i, pair.expert, pair.model, pair.ttl, pair.fingerprint))
    for i in range(30):
        observer.ping(pair, T0 + 240 * i, Result.WARM, 0.001, Usage(input=3, cache_read=2048))
    clock.now = T0 + 240 * 30
    early = _obs(pair.key, at=T0 + 240 * 2 + 10, write=2048)  # held warm by ping 2, two hours ago
    assert observer.accept([early])[0] == 202
    labels = {"expert": pair.expert, "model": pair.model}
    assert _value(observer.metrics, "keepwarm_prefix_drift_total", **labels) == 1, "the ledger's ping 2 decided it"
    kept = observer._attribution[pair.key]
    assert kept.held_warm(T0 + 240 * 2 + 10) is None, "older than the pings kept in memory"
    cold = Observer(config, Metrics(), clock=clock, ledger=lambda: ledger)  # no ping within a TTL before
    assert cold.accept([_obs(pair.key, at=T0 - 400, write=2048)])[0] == 202
    assert not _value(cold.metrics, "keepwarm_prefix_drift_total", **labels)
    ledger.close()
