"""A fleet's production money, counted once: each pair's series on its owner only.

First the counting itself, two members' observers on one real PostgreSQL; then a real
Prometheus scraping three `keepwarm run` members through a kill and a takeover.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import LONG_PROMPT, basic_doc, daemon_env, free_port

from keepwarm.classify import usage_from_api
from keepwarm.config import Config, parse_config
from keepwarm.emulator import Emulator
from keepwarm.fleetcount import ProductionFeed
from keepwarm.metrics import Metrics
from keepwarm.observations import Observer
from keepwarm.pricing import builtin_table
from keepwarm.store.postgres import PostgresLedger

T0 = 1_800_000_000.0
USAGE = {"input_tokens": 10, "cache_read_input_tokens": 1500, "cache_creation_input_tokens": 0, "output_tokens": 5}
COLD = {"input_tokens": 10, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 1500, "output_tokens": 5}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _series(metrics: Metrics) -> dict[tuple[str, str, str], float]:
    """Every production sample a member exports: (family, expert, model, label) -> value, summed over the label."""
    out: dict[tuple[str, str, str], float] = {}
    for family in metrics.registry.collect():
        if family.name.startswith("keepwarm_production_") or family.name in ("keepwarm_saved_usd", "keepwarm_prefix_drift"):
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, sample.labels["expert"], sample.labels["model"])
                out[key] = out.get(key, 0.0) + sample.value
    return out


class Member:
    """One member's observer, metrics and feed, over its own connection to the shared database."""

    def __init__(self, url: str, config: Config, clock: Clock, owned: set[str]) -> None:
        self.ledger = PostgresLedger(url, clock=clock)
        self.metrics = Metrics(clock=clock)
        self.observer = Observer(config, self.metrics, ledger=lambda: self.ledger, clock=clock)
        self.observer.fleet_history = self.ledger.last_requests
        self.observer.counted_by_owner = True
        self.feed = ProductionFeed(self.ledger)
        self.feed.start()
        self.config = config
        self.owned: set[str] = set()
        self.own(owned)

    def own(self, keys: set[str]) -> None:
        """Take and give up pairs as the scheduler's `apply` does with their series."""
        for pair in self.config.pairs:
            if pair.key in keys and pair.key not in self.owned:
                self.metrics.add_pair(pair)
            elif pair.key not in keys and pair.key in self.owned:
                self.metrics.remove_pair(pair)
        self.owned = set(keys)

    def poll(self) -> int:
        return self.observer.count_stored(self.feed.read(), lambda key: key in self.owned)


def test_each_pair_s_production_series_are_its_owner_s_whoever_received_the_observation(
    postgres_url: str, tmp_path: Path
) -> None:
    clock = Clock()
    config = parse_config(basic_doc("http://127.0.0.1:9"), tmp_path)
    keys = sorted(p.key for p in config.pairs)
    assert len(keys) >= 2
    x, y = keys[0], keys[1]
    a = Member(postgres_url, config, clock, {x})
    b = Member(postgres_url, config, clock, set(keys) - {x})
    try:
        posts = 0
        for member, key, usage in [(a, y, USAGE), (b, x, USAGE), (a, x, COLD), (b, y, USAGE), (a, y, USAGE),
                                   (b, x, USAGE)]:
            expert, model = key.split("/")
            clock.now += 400.0  # more than the 5m TTL after the pair's previous request: a read is a saving
            status, _ = member.observer.accept([{"expert": expert, "model": model, "at": clock.now - 1, "usage": usage}])
            assert status == 202
            posts += 1
        # Nothing is counted where it was received: the receiver leaves it to the owner.
        assert _series(a.metrics) == {} and _series(b.metrics) == {}
        assert a.poll() + b.poll() == posts
        assert a.poll() + b.poll() == 0, "each row counted once, though the next read covers it again"

        exported_a = {(e, m) for _, e, m in _series(a.metrics)}
        exported_b = {(e, m) for _, e, m in _series(b.metrics)}
        assert exported_a == {tuple(x.split("/"))} and exported_b == {tuple(y.split("/"))}

        rows = a.ledger.observations()
        assert len(rows) == posts
        # The status page's figures follow the series: the owner's.
        for member, mine, other in ((a, x, y), (b, y, x)):
            pairs = member.observer.headline()["pairs"]
            assert pairs[mine].requests == sum(1 for r in rows if f"{r.expert}/{r.model}" == mine)
            assert pairs[other].requests == 0
        # The store's read: above an id, and the gaps below it asked for by id.
        ids = [r.id for r in rows]
        assert [r[0] for r in a.ledger.observations_after(ids[-2], [ids[0], ids[2]])] == [ids[0], ids[2], ids[-1]]
        _check_totals([a, b], rows)

        # A handover: x moves from a to b. a drops its series (the pings' do so too), b starts
        # counting x from the next row, whichever member received it.
        a.own(set())
        b.own(set(keys))
        expert, model = x.split("/")
        clock.now += 400.0
        for member in (a, b):
            clock.now += 1.0
            assert member.observer.accept([{"expert": expert, "model": model, "at": clock.now - 1, "usage": USAGE}])[0] == 202
        assert a.poll() == 0 and b.poll() == 2
        assert _series(a.metrics) == {}
        assert b.metrics.registry.get_sample_value(
            "keepwarm_production_requests_total", {"expert": expert, "model": model, "result": "warm"}) == 2
    finally:
        a.ledger.close()
        b.ledger.close()


def _check_totals(members: list[Member], rows: list[Any]) -> None:
    """The sums over members are the ledger's: requests exactly, money to float rounding."""
    totals: dict[str, float] = {}
    for member in members:
        for (name, _, _), value in _series(member.metrics).items():
            totals[name] = totals.get(name, 0.0) + value
    assert totals["keepwarm_production_requests_total"] == len(rows)
    saved = math.fsum(r.saved_usd or 0.0 for r in rows)
    assert saved > 0
    assert totals["keepwarm_saved_usd_total"] == pytest.approx(saved, rel=1e-12)
    cost = math.fsum(sum((r.costs or {}).values()) for r in rows)
    assert totals["keepwarm_production_cost_usd_total"] == pytest.approx(cost, rel=1e-12)


class Rows:
    """A store whose rows become visible out of id order, as concurrent commits do."""

    def __init__(self) -> None:
        self.visible: dict[int, tuple[Any, ...]] = {}
        self.asked: list[tuple[int, int]] = []  # (after, how many gaps)

    def add(self, row_id: int, drift: str | None = None) -> None:
        self.visible[row_id] = (row_id, "e", "m", T0, "warm", 1, 2, 0, 0, 3, 0.1, 0.2, 0.0, 0.0, 0.3, 0.0, drift)

    def last_observation_id(self) -> int:
        return max(self.visible, default=0)

    def observations_after(self, after: int, also: Sequence[int] = ()) -> list[tuple[Any, ...]]:
        self.asked.append((after, len(also)))
        return [row for i, row in sorted(self.visible.items()) if i > after or i in also]


def test_the_feed_hands_every_row_out_once_even_when_an_earlier_id_commits_later() -> None:
    from keepwarm.fleetcount import COMMIT_SLACK, MAX_GAPS

    rows, mono = Rows(), Clock()
    rows.add(1)  # stored before this member started: its owner then counted it
    feed = ProductionFeed(rows, mono=mono)
    assert feed.start() and feed.read() == []
    rows.add(3)
    assert [r.id for r in feed.read()] == [3]
    rows.add(2, drift="fingerprint")  # its transaction took id 2 before 3 committed, and committed after
    mono.now += 1
    got = feed.read()
    assert [(r.id, r.drift, r.tokens["cache_read"], r.cost) for r in got] == [
        (2, True, 2, {"input": 0.1, "cache_read": 0.2, "cache_write_5m": 0.0, "cache_write_1h": 0.0, "output": 0.3})]
    assert rows.asked[-1] == (3, 1), "above the highest id read, and the one gap below it"
    mono.now += COMMIT_SLACK
    assert feed.read() == [] and feed.floor == 3, "ids read long enough ago are no longer re-read"
    assert feed._seen == set(), "nor remembered"
    # Another origin's rows take ids too: past MAX_GAPS gaps the range is read again whole.
    rows.add(3 + MAX_GAPS + 2)
    assert [r.id for r in feed.read()] == [3 + MAX_GAPS + 2]
    rows.add(4)  # committed late, far below
    assert [r.id for r in feed.read()] == [4] and rows.asked[-1] == (3, 0)
    assert feed.read() == []


def test_the_feed_waits_out_an_unreachable_store() -> None:
    class Down(Rows):
        up = False

        def observations_after(self, after: int, also: Sequence[int] = ()) -> list[tuple[Any, ...]]:
            if not self.up:
                raise OSError("connection refused")
            return super().observations_after(after, also)

        def last_observation_id(self) -> int:
            if not self.up:
                raise OSError("connection refused")
            return super().last_observation_id()

    rows = Down()
    feed = ProductionFeed(rows)
    assert not feed.start() and feed.read() == [] and feed.failures == 2
    rows.up = True
    rows.add(1)
    assert feed.read() == [], "started once the store is back: what it held then was counted before"
    rows.add(2)
    rows.up = False
    assert feed.read() == []
    rows.up = True
    assert [r.id for r in feed.read()] == [2]


# --- a real Prometheus scraping three members through a kill ---------------------------------
#
# At a tenth of real time (as tests/test_fleet_e2e.py): a 5m TTL lasts 30 s, the 4m interval
# 24 s, the 20 s lease 2 s. Prometheus scrapes every second.

SCALE = 0.1
PAIRS = 12
RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "keepwarm-rules.yml"
MODEL = "claude-sonnet-4-6"
SCRAPE = 1.0
# A ping's counter moves a few milliseconds after the ping ends (its row's start + duration):
# one that ended this close to a scrape may be on either side of it.
EDGE = 0.25


def _doc(base_url: str, url: str) -> dict[str, Any]:
    return {
        "api": {"base_url": base_url},
        "defaults": {"models": [MODEL]},
        "experts": [{"name": f"e{i}", "system": [{"text": f"Expert {i}. {LONG_PROMPT}"}]} for i in range(PAIRS)],
        "ledger": {"url": url},
        "fleet": {"name": "prom", "lease": "20s", "min_members": 3},
    }


class Prometheus:
    """A `prometheus` on loopback scraping the given targets every second, no rules."""

    def __init__(self, directory: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus not found: scripts/test installs it (Debian package prometheus)"
        self.url = f"http://127.0.0.1:{free_port()}"
        config = directory / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{SCRAPE:g}s", "scrape_timeout": "900ms"},
            "scrape_configs": [{"job_name": "keepwarm", "static_configs": [{"targets": targets}]}],
        }))
        self.log = (directory / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'prom-data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str, **params: str) -> list[dict[str, Any]]:
        """The result of one PromQL query (instant; a range selector gives raw samples)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr, **params})}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            doc = json.loads(answer.read())
        assert doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        """A scalar-like query's one value (0 when it has none)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else 0.0

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def _wait(what: str, check: Callable[[], bool], deadline: float) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            if check():
                return
        except OSError:
            pass  # Prometheus not listening yet
        assert time.monotonic() < end, f"timed out after {deadline:.0f} s waiting for {what}"
        time.sleep(0.2)


def _post(port: int, items: list[dict[str, Any]]) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/observations",
                                     data=json.dumps({"observations": items}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 202


def _observations(rng: random.Random, n: int, experts: list[str]) -> list[dict[str, Any]]:
    """Production requests: mostly reads of the warmed prefix, some writes, some of another prefix."""
    out = []
    for _ in range(n):
        kind = rng.random()
        usage = {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3000,
                 "cache_creation_input_tokens": 0}
        if kind < 0.2:
            usage.update(cache_read_input_tokens=0, cache_creation_input_tokens=3000)
        item: dict[str, Any] = {"expert": rng.choice(experts), "model": MODEL, "at": time.time() - 0.05,
                                "usage": usage, "request_id": f"req-{rng.getrandbits(64):016x}"}
        if kind > 0.9:
            item["fingerprint"] = f"{rng.getrandbits(256):064x}"  # production's prefix differs: drift
        out.append(item)
    return out


def _samples(prometheus: Prometheus, family: str, span: float) -> dict[tuple[str, ...], list[tuple[float, float]]]:
    """Every raw sample of a family over the last `span` seconds, by (instance, expert, model, label)."""
    out: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    for series in prometheus.query(f"{family}[{math.ceil(span)}s]"):
        labels = series["metric"]
        extra = next((v for k, v in sorted(labels.items()) if k not in ("__name__", "instance", "job", "expert", "model")), "")
        key = (labels["instance"], labels["expert"], labels["model"], extra)
        out[key] = [(float(t), float(v)) for t, v in series["values"]]
    return out


def test_a_real_prometheus_sums_the_fleet_s_money_once_through_a_kill(
    keepwarm_daemon: Any, postgres_url: str, tmp_path: Path
) -> None:
    rng = random.Random(19)
    # Production uses half the pairs: a request makes its pair's next ping unnecessary for an
    # interval, and the other half go on pinging through the window checked below.
    experts = [f"e{i}" for i in range(PAIRS // 2)]
    started = time.time()
    with Emulator(time_scale=SCALE) as emu:
        env = daemon_env(ANTHROPIC_API_KEY="sk-test-fleet-prometheus")
        members = [keepwarm_daemon(_doc(emu.base_url, postgres_url), env=env, name=f"m{i}.yaml",
                                   args=("--time-scale", str(SCALE))) for i in range(3)]
        for m in members:
            m.wait_for("three members", lambda m=m: m.total("keepwarm_fleet_members") == 3, 60)
        instance = {m: f"127.0.0.1:{m.port}" for m in members}
        prometheus = Prometheus(tmp_path, list(instance.values()))
        try:
            _wait("every member scraped", lambda: prometheus.value('count(up{job="keepwarm"} == 1)') == 3, 60)
            _wait("every pair exported", lambda: prometheus.value("count(keepwarm_pair_info)") == PAIRS, 30)

            # Production posts to members at random, for pairs at random.
            first = _observations(rng, 40, experts)
            for chunk in (first[i:i + 5] for i in range(0, len(first), 5)):
                _post(rng.choice(members).port, chunk)
            _wait("the first requests counted, each by its pair's owner",
                  lambda: prometheus.value("sum(keepwarm_production_requests_total)") == len(first), 30)

            # The member that counted the most production is killed: its pairs move to the others.
            victim = max(members, key=lambda m: prometheus.value(
                f'sum(keepwarm_production_requests_total{{instance="{instance[m]}"}})'))
            moved = {s["metric"]["expert"] for s in prometheus.query(
                f'keepwarm_pair_info{{instance="{instance[victim]}"}}')}
            assert moved, "the victim owns pairs"
            # The shipped KeepwarmFleetDegraded condition (its `for` aside), on what the members export.
            (degraded,) = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
                           if r.get("alert") == "KeepwarmFleetDegraded"]
            assert prometheus.query(degraded) == [], "three members, fleet.min_members 3: not degraded"
            victim.kill()
            survivors = [m for m in members if m is not victim]
            for m in survivors:
                m.wait_for("the takeover", lambda m=m: m.total("keepwarm_fleet_members") == 2, 30)
            _wait("the survivors exporting every pair",
                  lambda: prometheus.value(f'count(keepwarm_pair_info{{instance!="{instance[victim]}"}})') == PAIRS, 30)
            time.sleep(2 * SCRAPE)  # a scrape of each survivor after the takeover, before anything new
            assert [float(r["value"][1]) for r in prometheus.query(degraded)] == [2.0], "two members: degraded"
            window_start = time.time()
            alive = f'instance!="{instance[victim]}"'
            before = prometheus.value(f"sum(keepwarm_production_requests_total{{{alive}}})")

            # More production, to the survivors, half of it for the pairs that moved.
            assert moved & set(experts), "the victim counted production, so it owned pairs production uses"
            second = _observations(rng, 20, sorted(moved & set(experts))) + _observations(rng, 20, experts)
            rng.shuffle(second)
            for chunk in (second[i:i + 5] for i in range(0, len(second), 5)):
                _post(rng.choice(survivors).port, chunk)
            _wait("the second requests counted by the new owners", lambda: prometheus.value(
                f"sum(keepwarm_production_requests_total{{{alive}}})") == before + len(second), 30)
            # Pings go on after the takeover: a few in the window (within an interval), then a scrape.
            with PostgresLedger(postgres_url, origin="scaled") as ledger:
                _wait("pings after the takeover", lambda: len(ledger.rows(window_start + SCRAPE)) >= 3, 240 * SCALE + 10)
            time.sleep(2 * SCRAPE)
            span = time.time() - started + 5
            production = {name: _samples(prometheus, name, span) for name in (
                "keepwarm_production_requests_total", "keepwarm_saved_usd_total", "keepwarm_prefix_drift_total",
                "keepwarm_production_cost_usd_total")}
            pings = _samples(prometheus, "keepwarm_pings_total", span)
            cost = _samples(prometheus, "keepwarm_cost_usd_total", span)
            doubles = prometheus.query(
                f"max_over_time((count by (expert, model) (count by (instance, expert, model) "
                f'({{__name__=~"keepwarm_.+", expert!=""}})) > 1)[{math.ceil(span)}s:{SCRAPE:g}s])')
            log = list(emu.log)
        finally:
            prometheus.stop()
        for m in survivors:
            assert m.stop()[0] == 0

    assert doubles == [], f"pairs exported by two members at one scrape: {doubles}"

    with PostgresLedger(postgres_url, origin="scaled") as ledger:
        observations = ledger.observations()
        pinged = ledger.rows()
    # Production: every series keeps one owner for its whole life here (requests came only while
    # the fleet agreed), so each series' last value is what that member counted; their sum is
    # the ledger's, each request once. Counts exactly; dollars to float rounding.
    def total(family: str) -> float:
        return math.fsum(max(v for _, v in samples) for samples in production[family].values())

    assert len(observations) == len(first) + len(second)
    assert total("keepwarm_production_requests_total") == len(observations)
    assert total("keepwarm_prefix_drift_total") == sum(1 for o in observations if o.drift)
    saved = math.fsum(o.saved_usd or 0.0 for o in observations)
    assert saved > 0
    assert total("keepwarm_saved_usd_total") == pytest.approx(saved, rel=1e-9)
    assert total("keepwarm_production_cost_usd_total") == pytest.approx(
        math.fsum(sum((o.costs or {}).values()) for o in observations), rel=1e-9)
    victim_counted = sum(max(v for _, v in samples) for key, samples in production[
        "keepwarm_production_requests_total"].items() if key[0] == instance[victim])
    assert victim_counted > 0, "the killed member counted some: its scraped series still count"

    # Pings after the takeover: between a member's first scrape in the window and its last,
    # its counters moved by the pings its pairs' rows say ended between those two scrapes.
    _check_pings_in_window(pings, cost, pinged, log, instance[victim], window_start)


def _check_pings_in_window(
    pings: dict[tuple[str, ...], list[tuple[float, float]]],
    cost: dict[tuple[str, ...], list[tuple[float, float]]],
    rows: list[Any],
    log: list[Any],
    victim: str,
    start: float,
) -> None:
    """Per survivor and pair: counted pings (and cost) between two scrapes equal the stored ones
    that ended between them, up to those that ended within EDGE of a scrape (either side)."""
    spans: dict[tuple[str, str], tuple[float, float]] = {}
    counted: dict[tuple[str, str], float] = defaultdict(float)
    counted_usd: dict[tuple[str, str], float] = defaultdict(float)
    for family, into in ((pings, counted), (cost, counted_usd)):
        for (inst, expert, _model, _), samples in family.items():
            if inst == victim:
                continue
            inside = [(t, v) for t, v in samples if t >= start]
            if len(inside) < 2:
                continue
            if family is pings:  # dense: every result's series spans the member's scrapes of the pair
                owner = spans.setdefault((inst, expert), (inside[0][0], inside[-1][0]))
                assert owner == (inside[0][0], inside[-1][0])
            into[(inst, expert)] += inside[-1][1] - inside[0][1]
    owners: dict[str, tuple[str, float, float]] = {}
    for (inst, expert), (t0, t1) in spans.items():
        assert expert not in owners, f"{expert} counted by two survivors"
        owners[expert] = (inst, t0, t1)
    assert len(owners) == PAIRS, sorted(owners)
    answered = {e.request_id: e for e in log if e.usage}
    prices = builtin_table()
    expected = edge = 0
    expected_usd = 0.0
    for row in rows:
        inst, t0, t1 = owners[row.expert]
        end = row.time + (row.duration or 0.0)
        if min(abs(end - t0), abs(end - t1)) < EDGE:
            edge += 1
        elif t0 < end <= t1:
            expected += 1
            expected_usd += sum((row.costs or {}).values())
            if row.costs is not None:  # what the emulator answered is what the row holds
                entry = answered[row.request_id]
                emulated = prices.cost(MODEL, usage_from_api(entry.usage, "5m")) or {}
                assert sum(emulated.values()) == pytest.approx(sum(row.costs.values()), rel=1e-9)
    assert expected >= 3, "pings in the window"
    measured = sum(counted.values())
    print(f"pings in the window: {measured:g} counted, {expected} stored, {edge} within {EDGE} s of a scrape")
    assert expected <= measured <= expected + edge, (measured, expected, edge)
    if edge == 0:
        assert math.fsum(counted_usd.values()) == pytest.approx(expected_usd, rel=1e-9)
