"""`keepwarm report`'s production view, from a ledger holding pings and observations."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from conftest import basic_doc
from test_ledger import outcome

from keepwarm.classify import Usage
from keepwarm.config import parse_config
from keepwarm.metrics import Metrics
from keepwarm.observations import Observer
from keepwarm.report import run_report
from keepwarm.store import Ledger

T0 = 1_790_000_000.0


def _ledger(tmp_path: Path, reads: list[tuple[float, int, int]]) -> tuple[Path, Observer]:
    config = parse_config(basic_doc("http://127.0.0.1:9"), tmp_path)
    pair = config.pairs[0]
    path = tmp_path / "l.db"
    ledger = Ledger(path, clock=lambda: T0 + 1000)
    ledger.record(outcome(pair, Usage(input=8, cache_write_5m=1500, output=1), started=T0))
    ledger.record(outcome(pair, Usage(input=8, cache_read=1500, output=1), started=T0 + 240))
    observer = Observer(config, Metrics(), ledger=lambda: ledger, clock=lambda: T0 + 1000)
    items = [{"expert": pair.expert, "model": pair.model, "at": at,
              "usage": {"input_tokens": 20, "cache_read_input_tokens": r, "cache_creation_input_tokens": w,
                        "output_tokens": 100}} for at, r, w in reads]
    assert observer.accept(items)[0] == 202
    ledger.close()
    return path, observer


def test_json_carries_the_production_view_at_full_precision(tmp_path: Path) -> None:
    path, observer = _ledger(tmp_path, [(T0 + 10, 1500, 0), (T0 + 20, 1500, 0), (T0 + 900, 0, 1500)])
    prices = observer.prices
    out = io.StringIO()
    assert run_report(path, prices, None, "json", out, now=T0 + 1000) == 0
    doc = json.loads(out.getvalue())
    (p,) = doc["pairs"]
    assert p["production_requests"] == 3
    assert p["production_hit_rate"] == 3000 / 4500
    price = prices.get("claude-sonnet-4-6")
    assert price.input is not None and price.read_multiplier is not None
    per = price.input / 1e6
    # Full input price for every input token, minus what the input actually cost.
    by_caching = [
        (20 + 1500) * per - (20 * per + 1500 * per * price.read_multiplier),
        (20 + 1500) * per - (20 * per + 1500 * per * price.read_multiplier),
        (20 + 1500) * per - (20 * per + 1500 * per * prices.write_5m_multiplier),
    ]
    assert p["saved_by_caching_usd"] == math.fsum(by_caching)
    saved = 1500 * price.input / 1e6 * (prices.write_5m_multiplier - price.read_multiplier)  # the first read only
    assert p["saved_by_keepalive_usd"] == saved
    assert p["net_usd"] == saved - p["keepalive_spend_usd"]
    assert p["pays_for_itself"] is (saved >= p["keepalive_spend_usd"])
    assert doc["total"]["saved_by_keepalive_usd"] == saved
    assert p["spend_usd"] == p["keepalive_spend_usd"], "the existing columns keep working"


def test_table_and_csv_say_whether_it_pays(tmp_path: Path) -> None:
    path, observer = _ledger(tmp_path, [(T0 + 10, 1500, 0)])
    out = io.StringIO()
    assert run_report(path, observer.prices, None, "table", out, now=T0 + 1000) == 0
    text = out.getvalue()
    assert "PAYS FOR ITSELF" in text and "PROD HIT RATE" in text and "100.0%" in text
    assert "BREAK-EVEN" in text
    out = io.StringIO()
    assert run_report(path, observer.prices, None, "csv", out, now=T0 + 1000) == 0
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[0]["production_requests"] == "1" and rows[0]["pays_for_itself"] in ("true", "false")
    assert float(rows[0]["saved_by_keepalive_usd"]) > 0


def test_without_observations_the_table_says_nothing_is_proven(tmp_path: Path) -> None:
    path, observer = _ledger(tmp_path, [])
    out = io.StringIO()
    assert run_report(path, observer.prices, None, "table", out, now=T0 + 1000) == 0
    assert "no observations in the window" in out.getvalue()
