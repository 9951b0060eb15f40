"""End to end against the emulator: production (the real SDK) reports its requests over raw HTTP.

One clock drives the emulator's cache and keepwarm, and the test moves it: the pings are the
scheduler's own job runs, called at their due times, so nothing sleeps.
"""

from __future__ import annotations

import io
import json
import re
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import anthropic
import pytest
from conftest import LONG_PROMPT

from keepwarm.classify import classify, usage_from_api
from keepwarm.config import Config, parse_config
from keepwarm.daemon import build_observer, build_web
from keepwarm.emulator import Emulator
from keepwarm.metrics import Metrics
from keepwarm.ping import make_client
from keepwarm.prefix import fingerprint
from keepwarm.report import run_report
from keepwarm.runner import Runner
from keepwarm.scheduler import Scheduler
from keepwarm.store import Ledger
from keepwarm.web import _money

T0 = 1_800_000_000.0
# One key for both: the API's (and the emulator's) caches are shared within a key's workspace only.
KEY = "sk-same-workspace"
QUESTION = "What moved the markets today?"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class World:
    """The emulator, keepwarm wired as `keepwarm run` wires it, and a production client."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock(T0)
        self.emulator = Emulator(clock=self.clock).start()
        doc = {
            "api": {"base_url": self.emulator.base_url},
            "defaults": {"jitter": "0s"},
            "experts": [{"name": "analyst", "system": [{"text": LONG_PROMPT}], "models": ["claude-sonnet-4-6"]}],
            "metrics": {"listen": "127.0.0.1:0"},
            "ledger": {"path": "ledger.db"},
        }
        self.config: Config = parse_config(doc, tmp_path)
        self.pair = self.config.pairs[0]
        self.metrics = Metrics()
        assert self.config.ledger_path is not None
        self.ledger = Ledger(self.config.ledger_path, clock=self.clock)
        self.runner = Runner(make_client(self.emulator.base_url, KEY, 10), self.config.prices, self.metrics,
                             threading.Event(), ledger=self.ledger, clock=self.clock)
        self.scheduler = Scheduler(self.runner, self.metrics, clock=self.clock, draw=lambda: 0.0, mono=self.clock)
        self.observer = build_observer(self.config, self.metrics, self.scheduler, self.runner)
        self.observer.clock = self.clock
        self.observer.windows.since = T0
        self.web = build_web(self.config, self.metrics, self.scheduler, self.observer)
        self.web.start()
        self.url = "http://%s:%d" % self.web.address
        self.production = anthropic.Anthropic(base_url=self.emulator.base_url, api_key=KEY, max_retries=0)
        self.scheduler.apply(self.config.pairs)

    def close(self) -> None:
        self.web.stop()
        self.ledger.close()
        self.emulator.stop()

    def value(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(
            name, {"expert": self.pair.expert, "model": self.pair.model, **labels})
        return 0.0 if found is None else found

    def due(self) -> float:
        return self.scheduler.states[self.pair.key].next_due

    def wake(self, at: float) -> None:
        """Run the pair's job as APScheduler would at its due time `at`."""
        self.clock.now = at
        self.scheduler._run(self.pair.key, at)

    def request(self, at: float, system: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A production request through the real SDK, then its observation POSTed as raw HTTP."""
        self.clock.now = at
        system = system if system is not None else list(self.pair.prefix.params()["system"])
        response = self.production.messages.create(
            model=self.pair.model, max_tokens=64, system=system,  # type: ignore[arg-type]
            messages=[{"role": "user", "content": QUESTION}])
        obs = {"expert": self.pair.expert, "model": self.pair.model, "at": at,
               "usage": response.usage.model_dump(), "fingerprint": fingerprint(self.pair.model, system),
               "request_id": response.id}
        req = urllib.request.Request(self.url + "/v1/observations", data=json.dumps(obs).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
            assert json.loads(resp.read()) == {"accepted": 1, "rejected": []}
        return obs

    def pings_sent(self) -> list[float]:
        return [e.time for e in self.emulator.log if e.body["messages"][0]["content"] != QUESTION]

    def emulator_log(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.emulator.base_url + "/_emulator/log", timeout=10) as resp:
            doc = json.loads(resp.read())
        entries = doc if isinstance(doc, list) else doc.get("entries", doc.get("log", []))
        assert isinstance(entries, list)
        return entries


@pytest.fixture
def world(tmp_path: Path) -> Any:
    w = World(tmp_path)
    yield w
    w.close()


def test_production_seen_saved_drift_and_skipped_pings_agree_everywhere(world: World, tmp_path: Path) -> None:
    pair, ttl, interval = world.pair, world.pair.ttl_seconds, world.pair.interval
    start = world.due()
    world.wake(start)  # cold start: the keepalive writes the prefix
    assert world.value("keepwarm_pings_total", result="rewarmed") == 1

    saved_at = []
    first = world.request(start + 30)  # production's first request reads what the keepalive wrote
    saved_at.append(first)
    world.request(start + 60)  # 30 s after production's own request: production kept it warm itself

    # The ping due an interval after the first one is not needed: production touched the cache at +60.
    world.wake(world.due())
    assert world.pings_sent() == [start], "no ping within interval after a production touch"
    assert world.value("keepwarm_pings_skipped_total", reason="production_touch") == 1
    assert world.due() == pytest.approx(start + 60 + interval)
    world.wake(world.due())  # an interval after the touch: pinged, and warm
    world.wake(world.due())
    assert len(world.pings_sent()) == 3
    assert all(t - u >= interval for t, u in zip(world.pings_sent()[1:], [start + 60, world.pings_sent()[1]]))

    # Production comes back more than a TTL after its last request: only the keepalive kept it warm.
    back = start + 60 + ttl + 200
    assert world.pings_sent()[-1] > back - ttl, "the keepalive held the cache when production came back"
    saved_at.append(world.request(back))

    # A timestamp injected before the breakpoint: a full-price write on every request, pings stay warm.
    stamped = [{"type": "text", "text": "Today is 2026-12-01T10:00:00Z.\n" + LONG_PROMPT,
                "cache_control": {"type": "ephemeral"}}]
    world.request(back + 5, stamped)
    assert world.value("keepwarm_prefix_drift_total") == 1, "flagged as drift within one request"
    sent = len(world.pings_sent())
    world.wake(world.due())  # skipped: production's request at `back` touched the cache...
    world.wake(world.due())  # ...so the ping comes an interval after it; the drifted one moved nothing
    assert len(world.pings_sent()) == sent + 1
    assert world.pings_sent()[-1] == pytest.approx(back + interval)
    assert world.value("keepwarm_pings_total", result="warm") == 3, "the pings stay warm"

    # Production counters equal the emulator's own classification of production's requests.
    log = [e for e in world.emulator_log() if e["body"]["messages"][0]["content"] == QUESTION]
    assert len(log) == 4
    expected = Counter(classify(usage_from_api(e["usage"], pair.ttl)).value for e in log)
    for result in ("warm", "rewarmed", "partial", "uncached"):
        assert world.value("keepwarm_production_requests_total", result=result) == expected.get(result, 0), result
    read = sum(e["usage"]["cache_read_input_tokens"] or 0 for e in log)
    assert world.value("keepwarm_production_tokens_total", kind="cache_read") == read

    # Saved, by hand: the two requests production itself would have found cold.
    price = world.config.prices.get(pair.model)
    assert price.input is not None and price.read_multiplier is not None
    per_token = price.input / 1e6 * (world.config.prices.write_5m_multiplier - price.read_multiplier)
    hand = sum(o["usage"]["cache_read_input_tokens"] * per_token for o in saved_at)
    saved = world.value("keepwarm_saved_usd_total")
    assert saved == pytest.approx(hand, rel=1e-12) and saved > 0

    # The report (from the ledger) agrees with the metrics.
    world.ledger.close()
    out = io.StringIO()
    assert world.config.ledger_path is not None
    assert run_report(world.config.ledger_path, world.config.prices, None, "json", out, now=world.clock.now) == 0
    total = json.loads(out.getvalue())["total"]
    spent = sum(world.value("keepwarm_cost_usd_total", kind=k)
                for k in ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output"))
    assert total["production_requests"] == 4
    assert total["saved_by_keepalive_usd"] == pytest.approx(saved, rel=1e-12)
    assert total["keepalive_spend_usd"] == pytest.approx(spent, rel=1e-12)
    assert total["net_usd"] == pytest.approx(saved - spent, rel=1e-12)
    assert total["pays_for_itself"] is (saved >= spent)
    assert total["prefix_drift"] == 1
    prod_spend = sum(world.value("keepwarm_production_cost_usd_total", kind=k)
                     for k in ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output"))
    assert total["production_spend_usd"] == pytest.approx(prod_spend, rel=1e-12)

    # The status page shows the same spent, saved and net.
    with urllib.request.urlopen(world.url + "/", timeout=10) as resp:
        page = resp.read().decode()
    day = re.search(r"<tr><td>last 24h</td>(.*?)</tr>", page)
    assert day is not None, page
    cells = re.findall(r"<td[^>]*>(.*?)</td>", day.group(1))
    assert cells[:3] == [_money(spent), _money(saved), _money(saved - spent)]
    assert cells[3] == "4"
    assert "analyst/claude-sonnet-4-6" in page
