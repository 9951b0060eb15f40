"""The series budget of `metrics.per_pair`, the pair state, and the exposition's bytes."""

from __future__ import annotations

import dataclasses
import gzip
import socket
import struct
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import basic_doc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from keepwarm.classify import MISS_CAUSES, Result
from keepwarm.config import Pair, parse_config
from keepwarm.emulator import Emulator, Fault
from keepwarm.gate import Gate
from keepwarm.metrics import PER_PAIR_MODES, PRODUCTION_RESULTS, REJECT_REASONS, RESULTS, Metrics, PairStateValue
from keepwarm.ping import ERROR_TYPES, make_client
from keepwarm.policy import SKIP_REASONS
from keepwarm.pricing import COST_KINDS
from keepwarm.runner import PairState, Runner
from keepwarm.web import WebServer

BUDGET = {"without": 20, "with": 30}  # series per pair in a healthy steady state, standard mode


class FakeClock:
    """Wall time that moves only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _pair(emulator: Emulator, **defaults: object) -> Pair:
    return parse_config(basic_doc(emulator.base_url, **defaults), Path(".")).pairs[0]


def _runner(emulator: Emulator, metrics: Metrics, clock: FakeClock) -> Runner:
    config = parse_config(basic_doc(emulator.base_url), Path("."))
    return Runner(
        make_client(emulator.base_url, "sk-test-metrics", 5),
        config.prices,
        metrics,
        threading.Event(),
        key_source="test",
        clock=clock,
        wait=lambda seconds: False,
        gate=Gate(clock=FakeClock(1000.0)),
    )


def _series_per_pair(metrics: Metrics) -> Counter[tuple[str, str]]:
    """Series of each (expert, model), counted in what a scrape serves."""
    text = b"".join(metrics.exposition()).decode()
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "expert" in sample.labels:
                counts[(sample.labels["expert"], sample.labels["model"])] += 1
    return counts


def _healthy_production(metrics: Metrics, pair: Pair) -> None:
    """What the observations endpoint records for warm production requests of a pair."""
    e, m = pair.expert, pair.model
    for _ in range(3):
        metrics.production_requests.labels(e, m, "warm").inc()
        for kind, n in (("input", 40), ("cache_read", 1500), ("output", 200)):
            metrics.production_tokens.labels(e, m, kind).inc(n)
            metrics.production_cost.labels(e, m, kind).inc(n * 3e-6)
        metrics.saved.labels(e, m).inc(0.005)
        metrics.skipped.labels(e, m, "production_touch").inc()


def _steady(emulator: Emulator, mode: str, production: bool) -> tuple[Metrics, Pair]:
    clock = FakeClock(time.time())  # the runner dates a cache entry by the wall clock
    metrics = Metrics(per_pair=mode, clock=clock)  # type: ignore[arg-type]
    runner = _runner(emulator, metrics, clock)
    pair = _pair(emulator)
    metrics.add_pair(pair)
    state = PairState(pair=pair, max_tokens=pair.max_tokens)
    for _ in range(3):  # a cold start, then warm pings
        runner.ping(state)
    assert state.last_result is Result.WARM
    labels = {"expert": pair.expert, "model": pair.model}
    assert metrics.registry.get_sample_value("keepwarm_pair_state", labels) == PairStateValue.WARM
    if production:
        _healthy_production(metrics, pair)
    return metrics, pair


@pytest.mark.parametrize("production", [False, True], ids=["without", "with"])
def test_standard_mode_keeps_the_series_budget_in_a_healthy_steady_state(
    emulator: Emulator, production: bool
) -> None:
    metrics, pair = _steady(emulator, "standard", production)
    count = _series_per_pair(metrics)[(pair.expert, pair.model)]
    assert count <= BUDGET["with" if production else "without"], count
    # The budget is not met by leaving out what a healthy pair does: every kind it was billed for is there.
    text = b"".join(metrics.exposition()).decode()
    for kind in ("input", "cache_read", "cache_write_5m", "output"):
        assert f'keepwarm_tokens_total{{expert="analyst",kind="{kind}",model="claude-sonnet-4-6"}}' in text
    assert ("keepwarm_saved_usd_total{" in text) is production


@pytest.mark.parametrize("production", [False, True], ids=["without", "with"])
def test_full_mode_has_every_series_of_the_contract(emulator: Emulator, production: bool) -> None:
    metrics, pair = _steady(emulator, "full", production)
    count = _series_per_pair(metrics)[(pair.expert, pair.model)]
    histogram = 12 + 1 + 2  # buckets with +Inf, then _count and _sum
    dense = (len(RESULTS) + len(MISS_CAUSES) + len(ERROR_TYPES) + 2 * len(COST_KINDS) + 2 + len(SKIP_REASONS)
             + histogram + 5 + 2)  # 5 gauges with the interval, pair_info and pair_state
    observed = len(PRODUCTION_RESULTS) + 2 * len(COST_KINDS) + 2
    assert count == dense + (observed if production else 0)


def test_standard_mode_series_appear_as_the_contract_says(emulator: Emulator) -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    pair = _pair(emulator)
    metrics.add_pair(pair)
    get = metrics.registry.get_sample_value
    labels = {"expert": pair.expert, "model": pair.model}
    for result in RESULTS:  # dense from start-up
        assert get("keepwarm_pings_total", {**labels, "result": result}) == 0
    for kind in ("input", "cache_read", "cache_write_5m", "output"):
        assert get("keepwarm_cost_usd_total", {**labels, "kind": kind}) == 0
    # A 5m pair never writes a 1h entry: that kind is sparse, and appears if it ever happens.
    assert get("keepwarm_cost_usd_total", {**labels, "kind": "cache_write_1h"}) is None
    metrics.cost.labels(pair.expert, pair.model, "cache_write_1h").inc(0.5)
    assert get("keepwarm_cost_usd_total", {**labels, "kind": "cache_write_1h"}) == 0.5
    # Sparse families: absent until non-zero.
    assert get("keepwarm_ping_errors_total", {**labels, "error_type": "overloaded"}) is None
    metrics.errors.labels(pair.expert, pair.model, "overloaded").inc(0)
    assert get("keepwarm_ping_errors_total", {**labels, "error_type": "overloaded"}) is None
    metrics.errors.labels(pair.expert, pair.model, "overloaded").inc()
    assert get("keepwarm_ping_errors_total", {**labels, "error_type": "overloaded"}) == 1
    assert get("keepwarm_ping_errors_total", {**labels, "error_type": "server"}) is None
    # The duration histogram carries the model only, and no interval gauge.
    metrics.duration.labels(pair.expert, pair.model).observe(0.2)
    assert get("keepwarm_ping_duration_seconds_count", {"model": pair.model}) == 1
    assert get("keepwarm_ping_duration_seconds_count", labels) is None
    assert get("keepwarm_ping_interval_seconds", labels) is None
    for reason in REJECT_REASONS:
        assert get("keepwarm_observations_rejected_total", {"reason": reason}) == 0
    metrics.remove_pair(pair)
    assert get("keepwarm_pings_total", {**labels, "result": "warm"}) is None
    assert get("keepwarm_ping_duration_seconds_count", {"model": pair.model}) is None  # no pair of it left


def test_full_mode_production_families_appear_at_the_first_observation_all_at_once(emulator: Emulator) -> None:
    metrics = Metrics(per_pair="full")
    pair = _pair(emulator)
    metrics.add_pair(pair)
    get = metrics.registry.get_sample_value
    labels = {"expert": pair.expert, "model": pair.model}
    assert get("keepwarm_production_requests_total", {**labels, "result": "warm"}) is None
    metrics.drift.labels(pair.expert, pair.model).inc()
    for result in PRODUCTION_RESULTS:
        assert get("keepwarm_production_requests_total", {**labels, "result": result}) == 0
    for kind in COST_KINDS:
        assert get("keepwarm_production_tokens_total", {**labels, "kind": kind}) == 0
        assert get("keepwarm_production_cost_usd_total", {**labels, "kind": kind}) == 0
    assert get("keepwarm_saved_usd_total", labels) == 0
    assert get("keepwarm_prefix_drift_total", labels) == 1


def test_add_pair_twice_updates_in_place_and_keeps_the_counts(emulator: Emulator) -> None:
    metrics = Metrics(per_pair="full")
    pair = _pair(emulator)
    metrics.add_pair(pair)
    metrics.pings.labels(pair.expert, pair.model, "warm").inc()
    metrics.add_pair(dataclasses.replace(pair, interval=123.0))  # an equal pair but its interval, a new object
    labels = {"expert": pair.expert, "model": pair.model}
    assert metrics.registry.get_sample_value("keepwarm_pings_total", {**labels, "result": "warm"}) == 1
    assert metrics.registry.get_sample_value("keepwarm_ping_interval_seconds", labels) == 123.0


@pytest.mark.parametrize("mode", PER_PAIR_MODES)
def test_exposition_writes_what_generate_latest_writes(emulator: Emulator, mode: str) -> None:
    metrics, pair = _steady(emulator, mode, production=True)
    one_hour = parse_config(basic_doc(emulator.base_url, ttl="1h"), Path(".")).pairs[1]  # another pair, 1h TTL
    metrics.add_pair(one_hour)

    def stable(page: bytes) -> list[bytes]:  # the process's own CPU and memory move between two reads
        return [line for line in page.splitlines() if b"process_" not in line]

    assert stable(b"".join(metrics.exposition())) == stable(generate_latest(metrics.registry))


def test_pair_state_follows_the_cache(emulator: Emulator) -> None:
    clock = FakeClock(time.time())  # the runner dates a cache entry by the wall clock
    metrics = Metrics(clock=clock)
    runner = _runner(emulator, metrics, clock)
    pair = _pair(emulator)
    metrics.add_pair(pair)
    state = PairState(pair=pair, max_tokens=pair.max_tokens)

    def read() -> PairStateValue:
        value = metrics.registry.get_sample_value("keepwarm_pair_state", {"expert": pair.expert, "model": pair.model})
        assert value is not None
        return PairStateValue(int(value))

    assert read() is PairStateValue.PENDING
    clock.now += pair.ttl_seconds  # a whole TTL configured and never pinged: as good as cold
    assert read() is PairStateValue.COLD
    clock.now = time.time()
    runner.ping(state)
    assert read() is PairStateValue.WARM
    clock.now = state.expires_at + 1
    assert read() is PairStateValue.COLD
    emulator.inject(Fault(status=500, count=None))
    runner.ping(state)
    assert state.last_result is Result.ERROR
    assert read() is PairStateValue.FAILING
    emulator.clear_faults()
    clock.now = time.time()
    runner.ping(state)
    assert read() is PairStateValue.WARM
    emulator.expire_all()  # evicted between pings: the next ping rewrites it
    outcome = runner.ping(state)
    assert outcome is not None and outcome.result is Result.REWARMED
    assert read() is PairStateValue.REWARMED
    runner.ping(state)
    assert read() is PairStateValue.WARM
    emulator.inject(Fault(status=400, count=1))
    runner.ping(state)
    assert state.parked
    assert read() is PairStateValue.PARKED


def test_pair_state_of_an_uncacheable_prompt(emulator: Emulator) -> None:
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    runner = _runner(emulator, metrics, clock)
    pair = parse_config(basic_doc(emulator.base_url), Path(".")).pairs[-1]  # the terse, too-short prompt
    metrics.add_pair(pair)
    runner.ping(PairState(pair=pair, max_tokens=pair.max_tokens))
    value = metrics.registry.get_sample_value("keepwarm_pair_state", {"expert": pair.expert, "model": pair.model})
    assert value == PairStateValue.UNCACHED


# --- /metrics over HTTP ------------------------------------------------------------------------


def _get(url: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


@pytest.fixture
def served(emulator: Emulator) -> Iterator[tuple[str, Metrics]]:
    """A real web server on loopback, serving the metrics of a pinged pair."""
    metrics, _ = _steady(emulator, "standard", production=False)
    web = WebServer("127.0.0.1", 0, metrics, lambda: [], lambda: (True, "ok"))
    web.start()
    try:
        yield f"http://127.0.0.1:{web.address[1]}", metrics
    finally:
        web.stop()


def test_metrics_are_gzipped_when_the_scraper_asks(served: tuple[str, Metrics]) -> None:
    base, metrics = served
    status, headers, plain = _get(base + "/metrics")
    assert status == 200 and "content-encoding" not in headers
    status, headers, packed = _get(base + "/metrics", **{"Accept-Encoding": "gzip"})
    assert headers["content-encoding"] == "gzip" and headers["vary"] == "Accept-Encoding"
    assert len(packed) < len(plain) / 4

    def stable(page: bytes) -> list[bytes]:
        return [line for line in page.splitlines() if b"process_" not in line]

    assert stable(gzip.decompress(packed)) == stable(plain)
    # What Prometheus sends; an explicit refusal is honoured.
    _, headers, _ = _get(base + "/metrics", **{"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in headers
    _, headers, _ = _get(base + "/metrics", **{"Accept-Encoding": "deflate, gzip;q=1.0, *;q=0.5"})
    assert headers["content-encoding"] == "gzip"


def test_head_is_answered_without_a_body(served: tuple[str, Metrics]) -> None:
    base, _ = served
    status, headers, body = _get(base + "/metrics", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    status, headers, body = _get(base + "/healthz", method="HEAD")
    assert (status, body) == (200, b"") and headers["content-length"] == "3"
    # The connection still serves a GET with its body afterwards.
    assert _get(base + "/healthz")[2] == b"ok\n"


def test_a_scraper_that_gives_up_mid_page_is_no_error(capfd: pytest.CaptureFixture[str]) -> None:
    metrics = Metrics(per_pair="full")
    for i in range(3000):  # a page far bigger than the socket buffers
        metrics.pings.labels(f"expert-{i}", "claude-sonnet-4-6", "warm").inc()
    web = WebServer("127.0.0.1", 0, metrics, lambda: [], lambda: (True, "ok"))
    web.start()
    try:
        with socket.create_connection(web.address, timeout=5) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(1024).startswith(b"HTTP/1.1 200")
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, as a timeout does
        # The server notices at its next write; then it still serves the next scrape.
        assert _get(f"http://127.0.0.1:{web.address[1]}/metrics")[0] == 200
    finally:
        web.stop()
    assert "Traceback" not in capfd.readouterr().err
