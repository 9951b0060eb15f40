"""Production observations: validation, attribution, the HTTP endpoint, the policy's touches, the ledger."""

from __future__ import annotations

import http.client
import json
import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import RecordedRows, basic_doc, write_config

from keepwarm.classify import Result, Usage
from keepwarm.config import Config, parse_config
from keepwarm.emulator import Emulator
from keepwarm.metrics import Metrics
from keepwarm.observations import (
    MAX_BYTES,
    MAX_ITEMS,
    SETTLE,
    Observer,
    _PRODUCTION_WINDOW,
    PairAttribution,
    Rejection,
    load_token,
    validate,
)
from keepwarm.ping import make_client
from keepwarm.policy import Source, Touch
from keepwarm.runner import Runner
from keepwarm.scheduler import Scheduler
from keepwarm.store import Ledger, read_observations
from keepwarm.web import WebServer

T0 = 1_800_000_000.0


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, base_url: str = "http://127.0.0.1:9", **top: Any) -> Config:
    doc = basic_doc(base_url)
    doc.update(top)
    return parse_config(doc, tmp_path)


def _obs(pair_key: str = "analyst/claude-sonnet-4-6", at: float = T0, read: int = 0, write: int = 0,
         **extra: Any) -> dict[str, Any]:
    expert, model = pair_key.split("/")
    return {"expert": expert, "model": model, "at": at,
            "usage": {"input_tokens": 10, "cache_read_input_tokens": read, "cache_creation_input_tokens": write,
                      "output_tokens": 5}, **extra}


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "reason", "message"),
    [
        ({"expert": "nobody"}, "unknown_pair", "nobody/claude-sonnet-4-6 is not a configured pair"),
        ({"model": "claude-haiku-4-5"}, "unknown_pair", "analyst/claude-haiku-4-5 is not a configured pair"),
        ({"expert": 3}, "malformed", "expert and model: expected strings"),
        ({"at": "yesterday"}, "malformed", "at: expected unix seconds, got 'yesterday'"),
        ({"at": T0 + 3600}, "future", "at: 1800003600.0 is 3600.000s ahead of this daemon's clock; at most 5s is allowed"),
        ({"at": T0 + 5.5}, "future", "at: 1800000005.5 is 5.500s ahead of this daemon's clock; at most 5s is allowed"),
        # What the ledger and the counters can hold: a float's exact integers, UTF-8 text.
        ({"usage": {"input_tokens": 2**63}}, "malformed",
         "usage.input_tokens: expected an integer from 0 to 2^53, got 9223372036854775808"),
        ({"usage": {"output_tokens": 2**53 + 1}}, "malformed",
         "usage.output_tokens: expected an integer from 0 to 2^53, got 9007199254740993"),
        ({"request_id": "req_\ud800"}, "malformed", "request_id: expected text that encodes as UTF-8 (no lone surrogates)"),
        ({"expert": "\udfff"}, "malformed", "expert and model: expected text that encodes as UTF-8 (no lone surrogates)"),
        ({"at": True}, "malformed", "at: expected unix seconds, got True"),
        # JSON's integers are unbounded: one past a float's range is refused, not an OverflowError.
        ({"at": 10**400}, "malformed", "at: expected unix seconds, got an integer out of range"),
        ({"fingerprint": "ABC"}, "malformed", "fingerprint: expected 64 lower-case hex digits (sha256)"),
        ({"usage": None}, "malformed", "usage: expected an object with the response's usage"),
        ({"usage": {"input_tokens": -1}}, "malformed", "usage.input_tokens: expected an integer from 0 to 2^53, got -1"),
        ({"usage": {"cache_read_input_tokens": 1.5}}, "malformed",
         "usage.cache_read_input_tokens: expected an integer from 0 to 2^53, got 1.5"),
        ({"usage": {"cache_creation": {"ephemeral_1h_input_tokens": "x"}}}, "malformed",
         "usage.cache_creation.ephemeral_1h_input_tokens: expected an integer from 0 to 2^53, got 'x'"),
        ({"colour": "red"}, "malformed",
         "unknown key(s) ['colour']; allowed: ['account', 'at', 'expert', 'fingerprint', 'model', 'provider', 'request_id', 'usage']"),
    ],
)
def test_each_bad_item_is_rejected_with_its_reason(tmp_path: Path, change: dict[str, Any], reason: str,
                                                   message: str) -> None:
    pairs = {p.key: p for p in _config(tmp_path).pairs}
    got = validate({**_obs(), **change}, 7, pairs, T0)
    assert got == Rejection(7, reason, message)


def test_a_good_item_is_classified_and_at_defaults_to_receipt(tmp_path: Path) -> None:
    pairs = {p.key: p for p in _config(tmp_path).pairs}
    item = _obs(read=1500)
    del item["at"]
    got = validate(item, 0, pairs, T0 + 5)
    assert not isinstance(got, Rejection)
    assert (got.at, got.result, got.usage.cache_read) == (T0 + 5, Result.WARM, 1500)
    # A write without the 5m/1h split is billed at the pair's TTL (5m here).
    written = validate(_obs(write=1500), 0, pairs, T0)
    assert not isinstance(written, Rejection) and written.usage.cache_write_5m == 1500


# --- attribution --------------------------------------------------------------------------------


def test_saved_only_when_production_itself_would_have_let_the_cache_lapse() -> None:
    a = PairAttribution("f" * 64, ttl=300)
    read = Usage(input=10, cache_read=1500)
    first = a.production(T0, read, None)
    assert first.pending and not first.saved, "the first production request: a saving, credited once settled"
    assert a.settle(T0) and not a.settle(T0), "credited once"
    assert not a.production(T0 + 100, read, None).pending, "production's own request 100 s before kept it warm"
    assert not a.production(T0 + 399, read, None).pending, "299 s after the previous one: still production's"
    assert a.production(T0 + 699, read, None).pending, "exactly a TTL after production's previous: the keepalive's"
    assert not a.production(T0 + 1500, Usage(input=10, cache_write_5m=1500), None).pending, "a write saves nothing"


def test_a_late_report_is_judged_in_time_order_and_takes_back_a_saving_still_pending() -> None:
    a = PairAttribution("f" * 64, ttl=300)
    read = Usage(cache_read=1500)
    assert a.production(T0 + 1000, read, None).pending
    late = a.production(T0 + 800, read, None)
    assert (late.pending, late.late) == (True, True), "the earlier request opens the episode: the saving is its"
    assert not a.settle(T0 + 1000), "production's own request 200 s before kept the cache warm"
    assert a.settle(T0 + 800)
    assert not a.production(T0 + 1200, read, None).pending, "judged against T0 + 1000, the latest before it"
    # A report preceding a saving already credited within the TTL takes none of its own: the
    # episode's one saving was counted, and a counter cannot go down.
    assert not a.production(T0 + 700, read, None).pending
    assert a.production(T0 + 100, read, None).pending, "a TTL or more before anything known"


def test_a_report_older_than_every_request_kept_is_never_credited() -> None:
    a = PairAttribution("f" * 64, ttl=300)
    read = Usage(cache_read=1500)
    for i in range(_PRODUCTION_WINDOW + 1):
        a.production(T0 + 1000 * i, read, None)
    assert a.dropped == T0, "the oldest start forgotten"
    assert not a.production(T0 - 5000, read, None).pending, "its predecessor is no longer known"
    a.forget_until(T0 + 1000 * _PRODUCTION_WINDOW)  # the ledger knows of a request that late
    assert a.times == [] and not a.production(T0 + 500, read, None).pending


def test_drift_by_fingerprint_and_by_a_write_while_keepwarm_held_the_cache() -> None:
    a = PairAttribution("a" * 64, ttl=300)
    write = Usage(cache_write_5m=1500)
    assert a.production(T0, Usage(cache_read=9), "b" * 64).drift == "fingerprint"
    assert a.production(T0, Usage(cache_read=9), "a" * 64).drift is None
    assert a.production(T0 + 10, write, None).drift is None, "no ping yet: a cold write is no drift"
    a.ping(T0 + 20, refreshed=True)  # a ping whose tokens are unknown (read back after a restart)
    assert a.production(T0 + 30, write, None).drift == "short_read", "nothing of the warm prefix read"
    assert a.production(T0 + 320, write, None).drift is None, "the ping's entry had expired"
    a.ping(T0 + 330, refreshed=False)
    assert a.production(T0 + 340, write, None).drift is None, "a failed ping held nothing warm"


def test_a_conversation_that_reads_the_whole_prefix_and_writes_its_history_is_no_drift() -> None:
    a = PairAttribution("a" * 64, ttl=300)
    a.ping(T0, refreshed=True, prefix_tokens=2048)
    turn = Usage(input=50, cache_read=2048 + 9000, cache_write_5m=700)  # prefix + history read, new turn written
    verdict = a.production(T0 + 10, turn, None)
    assert verdict.drift is None, "the whole warmed prefix was read: a hit, whatever came after"
    assert (verdict.pending, verdict.saved_tokens) == (True, 2048), "only the warmed prefix is the keepalive's saving"
    # Less than the prefix read while warm: production sends another prefix.
    assert a.production(T0 + 20, Usage(cache_read=1024, cache_write_5m=1024), None).drift == "short_read"
    assert a.production(T0 + 30, Usage(cache_write_5m=2048), None).drift == "short_read"
    assert a.production(T0 + 400, Usage(cache_write_5m=2048), None).drift is None, "not held warm any more"
    small = PairAttribution("a" * 64, ttl=300)
    small.ping(T0, refreshed=True, prefix_tokens=4096)
    assert small.production(T0 + 1, Usage(cache_read=1500), None).saved_tokens == 1500, "a read below the prefix"


def test_the_saved_counter_counts_only_the_warmed_prefix(tmp_path: Path) -> None:
    config = _config(tmp_path)
    metrics = Metrics()
    observer = Observer(config, metrics, clock=FakeClock(T0 + 10), settle=SETTLE)
    pair = config.pairs[0]
    observer.ping(pair, T0, Result.WARM, 0.001, Usage(input=3, cache_read=2048))
    status, doc = observer.accept([_obs(pair.key, at=T0 + 5, read=12_048, write=700)])
    assert status == 202 and doc["accepted"] == 1
    labels = {"expert": pair.expert, "model": pair.model}
    assert not _value(metrics, "keepwarm_saved_usd_total", **labels), "pending until no earlier report can come"
    assert observer.settle(T0 + 10 + SETTLE) == 1
    assert _value(metrics, "keepwarm_saved_usd_total", **labels) == config.prices.miss_penalty(pair.model, 2048, pair.ttl)
    assert not _value(metrics, "keepwarm_prefix_drift_total", **labels), "no drift series moved"


# --- the endpoint over HTTP ---------------------------------------------------------------------


class Served:
    """A real web server with an observer, and a way to POST to it."""

    def __init__(self, config: Config, token: bytes | None = None, clock: FakeClock | None = None) -> None:
        self.metrics = Metrics()
        self.touches: list[tuple[str, Touch]] = []
        self.observer = Observer(config, self.metrics, token, touch=lambda k, t: self.touches.append((k, t)),
                                 clock=clock or FakeClock())
        self.web = WebServer("127.0.0.1", 0, self.metrics, states=lambda: [], health=lambda: (True, "ok"),
                             observer=self.observer)
        self.web.start()

    def post(self, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
             path: str = "/v1/observations") -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = http.client.HTTPConnection(*self.web.address, timeout=10)
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw.startswith(b"{") else {}
        finally:
            conn.close()

    def close(self) -> None:
        self.web.stop()


@pytest.fixture
def served(tmp_path: Path) -> Any:
    s = Served(_config(tmp_path))
    yield s
    s.close()


def test_a_batch_is_accepted_with_per_item_reasons_and_counted(served: Served) -> None:
    status, doc = served.post({"observations": [_obs(read=1500), _obs("ghost/claude-sonnet-4-6"), _obs(write=1500)]})
    assert status == 202
    assert doc["accepted"] == 2
    assert [(r["index"], r["reason"]) for r in doc["rejected"]] == [(1, "unknown_pair")]
    m = served.metrics
    labels = {"expert": "analyst", "model": "claude-sonnet-4-6"}
    assert _value(m, "keepwarm_production_requests_total", **labels, result="warm") == 1
    assert _value(m, "keepwarm_production_requests_total", **labels, result="rewarmed") == 1
    # metrics.per_pair standard (the default): a result production never had has no series.
    assert _value(m, "keepwarm_production_requests_total", **labels, result="partial") is None
    assert _value(m, "keepwarm_production_tokens_total", **labels, kind="cache_read") == 1500
    assert _value(m, "keepwarm_observations_rejected_total", reason="unknown_pair") == 1
    assert [k for k, _ in served.touches] == ["analyst/claude-sonnet-4-6"] * 2
    exposed = b"".join(m.exposition()).decode()
    assert "ghost" not in exposed, "an unknown pair creates no series"
    assert 'expert="terse"' not in exposed.split("keepwarm_production_requests_total")[-1].split("# HELP")[0]


def test_one_observation_alone_is_accepted(served: Served) -> None:
    assert served.post(_obs(read=1500)) == (202, {"accepted": 1, "rejected": []})


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"not json", 400, "malformed"),
        (b"[1, 2]", 400, "malformed"),
        (b'{"observations": 3}', 400, "malformed"),
        (b'{"observations": [], "x": 1}', 400, "malformed"),
        (json.dumps({"observations": [_obs()] * (MAX_ITEMS + 1)}).encode(), 413, "too_large"),
    ],
)
def test_a_body_of_the_wrong_shape_is_refused_whole(served: Served, body: bytes, status: int, reason: str) -> None:
    assert served.post(body)[0] == status
    assert _value(served.metrics, "keepwarm_observations_rejected_total", reason=reason) == 1


def test_content_length_over_the_limit_is_refused_before_reading(served: Served) -> None:
    conn = http.client.HTTPConnection(*served.web.address, timeout=10)
    conn.putrequest("POST", "/v1/observations")
    conn.putheader("Content-Length", str(MAX_BYTES + 1))
    conn.endheaders()  # no body sent at all: the answer must come from the header alone
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()
    assert _value(served.metrics, "keepwarm_observations_rejected_total", reason="too_large") == 1


def test_the_token_is_required_and_compared(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret-token\n")
    config = _config(tmp_path, observe={"token_file": "token"})
    s = Served(config, load_token(config))
    try:
        assert s.post(_obs())[0] == 401
        assert s.post(_obs(), {"Authorization": "Bearer wrong"})[0] == 401
        assert s.post(_obs(), {"Authorization": "Bearer s3cret-token"})[0] == 202
        assert _value(s.metrics, "keepwarm_observations_rejected_total", reason="unauthorized") == 2
    finally:
        s.close()


def test_an_unreadable_token_file_is_a_config_error(tmp_path: Path) -> None:
    from keepwarm.config import ConfigError

    with pytest.raises(ConfigError, match="observe.token_file: cannot read"):
        load_token(_config(tmp_path, observe={"token_file": "missing"}))


def test_the_token_comes_from_the_credentials_directory_when_the_config_names_none(tmp_path: Path) -> None:
    from keepwarm.config import ConfigError

    creds = tmp_path / "creds"
    creds.mkdir()
    config = _config(tmp_path)
    assert load_token(config, {"CREDENTIALS_DIRECTORY": str(creds)}) is None, "no file there: no token"
    (creds / "observe_token").write_text("from-systemd\n")
    assert load_token(config, {"CREDENTIALS_DIRECTORY": str(creds)}) == b"from-systemd"
    assert load_token(config, {}) is None
    (tmp_path / "token").write_text("from-config")
    named = _config(tmp_path, observe={"token_file": "token"})
    assert load_token(named, {"CREDENTIALS_DIRECTORY": str(creds)}) == b"from-config", "the config's file wins"
    (creds / "observe_token").write_text(" \n")
    with pytest.raises(ConfigError, match=r"\$CREDENTIALS_DIRECTORY/observe_token: .* is empty"):
        load_token(config, {"CREDENTIALS_DIRECTORY": str(creds)})


def test_off_loopback_without_a_token_is_refused_unless_allowed(tmp_path: Path) -> None:
    closed = Served(_config(tmp_path, metrics={"listen": "0.0.0.0:9464"}))
    opened = Served(_config(tmp_path, metrics={"listen": "0.0.0.0:9464"}, observe={"allow_unauthenticated": True}))
    try:
        assert closed.post(_obs())[0] == 401
        assert opened.post(_obs())[0] == 202
    finally:
        closed.close()
        opened.close()


def test_a_pair_of_another_shard_is_misdirected_with_its_shard(tmp_path: Path) -> None:
    from keepwarm.shard import shard_of

    doc = basic_doc("http://127.0.0.1:9")
    doc["experts"] += [{"name": f"e{i}", "system": [{"text": "x"}]} for i in range(8)]
    everyone = parse_config(doc, tmp_path)
    mine = parse_config(doc, tmp_path, shard=(0, 2))
    foreign = next(p.key for p in everyone.pairs if shard_of(p.key, 2) == 1)
    s = Served(mine)
    try:
        assert s.post(_obs(foreign)) == (421, {"shard": 1, "rejected": [
            {"index": 0, "reason": "misdirected", "message": f"{foreign} is kept warm by shard 1", "shard": 1}]})
        assert s.post(_obs("ghost/claude-sonnet-4-6"))[1]["rejected"][0]["reason"] == "unknown_pair"
    finally:
        s.close()


def test_other_methods_and_paths_are_not_found(served: Served) -> None:
    assert served.post(_obs(), path="/v1/other")[0] == 404


def test_a_get_of_the_endpoint_says_post_not_not_found(served: Served) -> None:
    """A newcomer who opens the URL in a browser learns it takes POST (405 with Allow), not 404."""
    conn = http.client.HTTPConnection(*served.web.address, timeout=10)
    try:
        conn.request("GET", "/v1/observations")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert (resp.status, resp.getheader("Allow")) == (405, "POST")
    assert b"POST" in body


# --- touches: skipped pings ---------------------------------------------------------------------


def test_a_production_touch_skips_the_ping_and_no_ping_comes_within_interval(emulator: Emulator,
                                                                            tmp_path: Path) -> None:
    clock = FakeClock()
    metrics = Metrics()
    config = _config(tmp_path, emulator.base_url)
    runner = Runner(make_client(emulator.base_url, "sk-test", 5), config.prices, metrics, threading.Event(),
                    clock=clock)
    scheduler = Scheduler(runner, metrics, clock=clock, draw=lambda: 0.5, mono=clock)
    pair = config.pairs[0]
    scheduler.apply([pair])
    due = scheduler.states[pair.key].next_due
    clock.now = due
    scheduler._run(pair.key, due)  # the first ping
    assert len(emulator.log) == 1
    first_next = scheduler.states[pair.key].next_due
    assert first_next == pytest.approx(due + pair.interval + 0.5 * pair.jitter)

    touched = due + 100
    scheduler.touch(pair.key, Touch(touched, Source.PRODUCTION, Result.WARM))
    clock.now = first_next
    scheduler._run(pair.key, first_next)  # wakes, and the policy now says later
    assert len(emulator.log) == 1, "no ping within interval after a production touch"
    labels = {"expert": pair.expert, "model": pair.model}
    assert _value(metrics, "keepwarm_pings_skipped_total", **labels, reason="production_touch") == 1
    # Production kept the cache warm: its expiry runs from the touch, so the pair does not read
    # as cold (and the stale alert stays quiet) while its pings are skipped.
    assert scheduler.states[pair.key].expires_at == touched + pair.ttl_seconds
    assert _value(metrics, "keepwarm_cache_expires_timestamp_seconds", **labels) == touched + pair.ttl_seconds
    rearmed = scheduler.states[pair.key].next_due
    assert rearmed == pytest.approx(touched + pair.interval + 0.5 * pair.jitter)
    clock.now = rearmed
    scheduler._run(pair.key, rearmed)
    assert len(emulator.log) == 2, "an interval after the production touch, the ping goes out"


def test_a_touch_that_refreshed_nothing_moves_no_ping(emulator: Emulator, tmp_path: Path) -> None:
    clock = FakeClock()
    metrics = Metrics()
    config = _config(tmp_path, emulator.base_url)
    runner = Runner(make_client(emulator.base_url, "sk-test", 5), config.prices, metrics, threading.Event(),
                    clock=clock)
    scheduler = Scheduler(runner, metrics, clock=clock, draw=lambda: 0.0, mono=clock)
    pair = config.pairs[0]
    scheduler.apply([pair])
    due = scheduler.states[pair.key].next_due
    clock.now = due
    scheduler._run(pair.key, due)
    nxt = scheduler.states[pair.key].next_due
    scheduler.touch(pair.key, Touch(due + 10, Source.PRODUCTION, Result.UNCACHED))
    clock.now = nxt
    scheduler._run(pair.key, nxt)
    assert len(emulator.log) == 2


# --- the ledger -----------------------------------------------------------------------------------


def test_observations_go_to_the_ledger_and_a_v1_ledger_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    with sqlite3.connect(path) as db:  # a ledger as the previous keepwarm left it
        from keepwarm.store import MIGRATIONS

        MIGRATIONS[0](db)
        db.execute("PRAGMA user_version = 1")
    clock = FakeClock(T0 + 10)
    ledger = Ledger(path, retention_days=1, clock=clock)
    config = _config(tmp_path)
    observer = Observer(config, Metrics(), clock=clock, ledger=lambda: ledger)
    assert observer.accept([_obs(at=T0, read=1500, fingerprint="b" * 64, request_id="req_1")])[0] == 202
    rows = read_observations(path)
    assert [(r.time, r.result, r.cache_read, r.saved, r.drift, r.request_id) for r in rows] == [
        (T0, "warm", 1500, 1, "fingerprint", "req_1")]
    assert rows[0].saved_usd == config.prices.miss_penalty("claude-sonnet-4-6", 1500, "5m")
    assert rows[0].costs == config.prices.cost("claude-sonnet-4-6", Usage(input=10, cache_read=1500, output=5))
    clock.now = T0 + 2 * 86400  # retention: observations go with the pings of their age
    ledger._sweep()
    assert read_observations(path) == []
    ledger.close()


def test_config_keys_are_strict(tmp_path: Path) -> None:
    from keepwarm.config import ConfigError, load_config

    path = write_config(tmp_path, {**basic_doc(), "observe": {"token": "x"}})
    with pytest.raises(ConfigError, match="observe.token"):
        load_config(path)


# --- after a restart, and the status page -------------------------------------------------------


def test_a_restart_with_a_ledger_keeps_attribution_and_the_page_s_sums(tmp_path: Path) -> None:
    from keepwarm.web import render_headline

    config = _config(tmp_path)
    clock = FakeClock(T0 + 10)
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    before = Observer(config, Metrics(), ledger=lambda: ledger, clock=clock)
    before.accept([_obs(at=T0, read=1500)])  # production's first request: saved
    saved = before.headline()["windows"]["24h"].saved_usd
    assert saved > 0

    after = Observer(config, Metrics(), ledger=lambda: ledger, clock=clock)  # the daemon restarted
    after.restore(ledger.recent(clock.now, T0 - 300), now=clock.now)
    clock.now = T0 + 110  # the second request, reported 10 s after it started
    records = after.record([o for o in [validate(_obs(at=T0 + 100, read=1500), 0, after.pairs, clock.now)]
                            if not isinstance(o, Rejection)])
    assert not records[0].saved, "production's own request 100 s earlier kept the cache warm"
    day = after.headline()["windows"]["24h"]
    assert (day.requests, day.saved_usd) == (2, saved)
    page = render_headline(after.headline(), now=clock.now)
    assert "Figures held in memory, since the daemon started" in page
    ledger.close()


def test_the_headline_without_observations_says_how_to_send_them(tmp_path: Path) -> None:
    from keepwarm.web import render_headline

    observer = Observer(_config(tmp_path), Metrics(), clock=FakeClock())
    page = render_headline(observer.headline(), now=T0)
    assert "No production observations in the last 24 h" in page and "/v1/observations" in page
    assert "last 24h" in page and "last 7d" in page


def test_a_reload_that_removes_a_pair_drops_its_series_and_rejects_it(tmp_path: Path) -> None:
    config = _config(tmp_path)
    metrics = Metrics()
    observer = Observer(config, metrics, clock=FakeClock())
    observer.accept([_obs("analyst/claude-opus-4-8", read=1500)])
    labels = {"expert": "analyst", "model": "claude-opus-4-8", "result": "warm"}
    assert _value(metrics, "keepwarm_production_requests_total", **labels) == 1
    smaller = parse_config({**basic_doc("http://127.0.0.1:9"), "experts": basic_doc()["experts"][1:]}, tmp_path)
    removed = next(p for p in config.pairs if p.key == "analyst/claude-opus-4-8")
    metrics.remove_pair(removed)  # what the scheduler's apply does on a reload
    observer.apply(smaller, None)
    assert _value(metrics, "keepwarm_production_requests_total", **labels) is None
    status, doc = observer.accept([_obs("analyst/claude-opus-4-8", read=1500)])
    assert (status, doc["rejected"][0]["reason"]) == (202, "unknown_pair")
    assert _value(metrics, "keepwarm_production_requests_total", **labels) is None


def test_a_write_without_the_split_is_billed_at_the_pair_s_1h_ttl(tmp_path: Path) -> None:
    config = _config(tmp_path)
    doc = basic_doc("http://127.0.0.1:9", ttl="1h")
    hour = parse_config(doc, tmp_path)
    pairs = {p.key: p for p in hour.pairs}
    got = validate(_obs(write=1500), 0, pairs, T0)
    assert not isinstance(got, Rejection) and (got.usage.cache_write_1h, got.usage.cache_write_5m) == (1500, 0)
    assert config.pairs[0].ttl == "5m"


def test_a_body_without_content_length_is_refused(served: Served) -> None:
    conn = http.client.HTTPConnection(*served.web.address, timeout=10)
    conn.putrequest("POST", "/v1/observations")
    conn.endheaders()
    assert conn.getresponse().status == 411
    conn.close()
    assert _value(served.metrics, "keepwarm_observations_rejected_total", reason="malformed") == 1


# --- the fast paths agree with the long ways -----------------------------------------------------


def _mutant(rng: random.Random, pairs: list[str]) -> Any:
    """An item near a valid one: each field often right, sometimes missing, of a wrong type or out of range."""
    odd: list[Any] = [None, True, False, -1, 0, 1.5, float("nan"), float("inf"), "x", [], {}, 10**30, 2**53 + 1, 2**63]

    def maybe(good: Any) -> Any:
        return good if rng.random() < 0.8 else rng.choice(odd)

    expert, model = rng.choice([*pairs, "ghost/claude-sonnet-4-6"]).split("/")
    usage: dict[str, Any] = {}
    for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"):
        if rng.random() < 0.9:
            usage[name] = maybe(rng.choice([0, 1, 1500, 2**40, 2**53]))
    if rng.random() < 0.3:
        split = {n: maybe(rng.randrange(3000)) for n in ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")
                 if rng.random() < 0.8}
        usage["cache_creation"] = maybe(split)
    if rng.random() < 0.05:
        usage["server_tool_use"] = {"web_search_requests": 0}  # a key the API may add: ignored
    item: dict[Any, Any] = {"expert": maybe(expert), "model": maybe(model), "usage": maybe(usage)}
    if rng.random() < 0.9:
        item["at"] = maybe(rng.choice([T0 - 600, T0, T0 + 4.5, T0 + 5, T0 + 5.01, int(T0), -5.0]))
    if rng.random() < 0.3:
        item["fingerprint"] = maybe(rng.choice(["a" * 64, "A" * 64, "a" * 63]))
    if rng.random() < 0.3:
        item["request_id"] = maybe(rng.choice(["req_1", "r" * 256, "r" * 257, "req_\ud800", "req_é"]))
    if rng.random() < 0.05:
        item[rng.choice(["colour", 3])] = 1
    if rng.random() < 0.05:
        del item["expert"]
    return item if rng.random() < 0.98 else rng.choice(odd)


def test_the_fast_validation_accepts_and_rejects_exactly_what_the_full_one_does(tmp_path: Path) -> None:
    from keepwarm.observations import _validate_in_full, _well_formed

    pairs = {p.key: p for p in _config(tmp_path).pairs}
    hour = {p.key: p for p in parse_config(basic_doc("http://127.0.0.1:9", ttl="1h"), tmp_path).pairs}
    rng = random.Random(12)
    fast = 0
    for n in range(20_000):
        table = pairs if n % 2 else hour
        item = _mutant(rng, list(table))
        full = _validate_in_full(item, n, table, T0, lambda key: None)
        quick = _well_formed(item, table, T0)
        if quick is not None:
            fast += 1
            assert quick == full, item  # the same Observation, field by field
        assert validate(item, n, table, T0) == full, item  # and the same Rejection, message included
    assert fast > 1_000, "the fuzz reaches the fast path often"


def _scheduler_for(config: Config, policy_draws: random.Random) -> Scheduler:
    metrics = Metrics()
    runner = Runner(make_client("http://127.0.0.1:9", "sk-test", 5), config.prices, metrics, threading.Event())
    clock = FakeClock(T0)
    scheduler = Scheduler(runner, metrics, clock=clock, draw=policy_draws.random, mono=clock, prices=config.prices)
    scheduler.apply(config.pairs)
    return scheduler


def _policy_state(scheduler: Scheduler) -> dict[str, Any]:
    """Everything a touch can change, as values."""
    out: dict[str, Any] = {}
    for key, state in scheduler.states.items():
        policy = scheduler.policies[key]
        out[key] = (
            (log.entries() if (log := scheduler._touches.get(key)) else []), scheduler._last_production.get(key), scheduler._prod_tokens.get(key),
            scheduler._built_tokens.get(key), scheduler._draws.get(key), key in scheduler._lapsed, state.expires_at,
            state.next_due, [policy.next_ping(T0 + t, 0.5) for t in (0, 100, 400, 4000, 90_000)],
            policy.describe(T0 + 500),
        )
    return out


@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_batched_touches_leave_the_scheduler_as_one_by_one_touches_do(tmp_path: Path, policy: str) -> None:
    config = parse_config(basic_doc("http://127.0.0.1:9", policy=policy), tmp_path)
    one, many = _scheduler_for(config, random.Random(3)), _scheduler_for(config, random.Random(3))
    for scheduler in (one, many):
        scheduler._lapsed.add("terse/claude-sonnet-4-6")  # a pair whose policy let the cache lapse: a touch arms it
    rng = random.Random(5)
    keys = [*one.states, "ghost/claude-sonnet-4-6"]
    touches = [
        (rng.choice(keys), Touch(T0 - 3000 + 10 * i + rng.random(), Source.PRODUCTION,
                                 rng.choice([Result.WARM, Result.REWARMED, Result.PARTIAL, Result.UNCACHED]),
                                 rng.choice([0, 0, 3000, 3100])))
        for i in range(300)
    ]
    for key, touch in touches:
        one.touch(key, touch)
    for start in range(0, len(touches), 64):
        many.touch_many(touches[start:start + 64])
    assert _policy_state(many) == _policy_state(one)
    assert many.states["terse/claude-sonnet-4-6"].next_due, "the lapsed pair was armed"
    if policy == "adaptive":
        prior = (list(many.prior.order), many.prior.values, many.prior.added)
        assert prior == (list(one.prior.order), one.prior.values, one.prior.added), "the shared prior learnt the same"
        assert one.prior.added, "the touches taught the shared prior something"


def test_summed_pricing_equals_the_sum_of_each_observation_s_price(tmp_path: Path) -> None:
    import math

    from keepwarm.observations import BUCKET, saved_usd
    from keepwarm.pricing import COST_KINDS

    config = _config(tmp_path)
    rows, metrics = RecordedRows(), Metrics()
    observer = Observer(config, metrics, ledger=lambda: rows, clock=FakeClock(T0 + 200_000))
    rng = random.Random(9)
    keys = [p.key for p in config.pairs]
    batch = []
    for i in range(900):
        split = {"ephemeral_5m_input_tokens": rng.randrange(900), "ephemeral_1h_input_tokens": rng.randrange(900)}
        item = _obs(rng.choice(keys), at=T0 + rng.choice([20, 200]) * i, read=rng.choice([0, 1537, 20_011]), write=rng.choice([0, 2049]))
        if rng.random() < 0.3:
            item["usage"]["cache_creation"] = split
        batch.append(item)
    for start in range(0, len(batch), 300):  # three requests: sums across requests too
        assert observer.accept(batch[start:start + 300])[1]["rejected"] == []
    assert len(rows.rows) == 900
    for pair in config.pairs:
        mine = [r for r in rows.rows if r.observation.pair.key == pair.key]
        labels = {"expert": pair.expert, "model": pair.model}
        for kind in COST_KINDS:
            each = math.fsum(r.cost[kind] for r in mine)
            got = _value(metrics, "keepwarm_production_cost_usd_total", **labels, kind=kind) or 0.0
            assert got == pytest.approx(each, rel=1e-12, abs=0.0), (pair.key, kind)
        saved = [saved_usd(config.prices, pair, r.observation.usage.cache_read) for r in mine if r.saved]
        assert saved, "some requests were credited"
        assert [r.saved_usd for r in mine if r.saved] == saved, "ledger rows are priced one by one"
        got = _value(metrics, "keepwarm_saved_usd_total", **labels) or 0.0
        assert got == pytest.approx(math.fsum(s or 0.0 for s in saved), rel=1e-12, abs=0.0)
        # The status page's hours, summed: a pair's own hours cover the last 24 (whole hours).
        first = int((T0 + 200_000 - 86400) // BUCKET) + 1
        recent = [r for r in mine if int(r.observation.at // BUCKET) >= first]
        page = observer.windows.total(pair.key, 86400, T0 + 200_000)
        assert page.saved_usd == pytest.approx(math.fsum(r.saved_usd or 0.0 for r in recent), rel=1e-12, abs=0.0)
        assert (page.requests, page.cache_read) == (len(recent), sum(r.observation.usage.cache_read for r in recent))
    week = observer.windows.total(None, 7 * 86400, T0 + 200_000)  # every pair's, the whole week
    assert week.saved_usd == pytest.approx(math.fsum(r.saved_usd or 0.0 for r in rows.rows), rel=1e-12, abs=0.0)
    assert week.requests == len(rows.rows)
