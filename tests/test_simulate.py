"""`keepwarm simulate` (SPEC §10): traces, the replay, the hindsight optimum, the command."""

import csv
import io
import json
import random
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from keepwarm.cli import main
from keepwarm.config import Pair, parse_config
from keepwarm.pricing import builtin_table
from keepwarm.simulate import PairSetup, Request, TraceError, optimum, parse_trace, run
from keepwarm.store import Ledger

ROOT = Path(__file__).resolve().parent.parent
PRICES = builtin_table()
T0 = 1772442000.0  # 2026-03-02T09:00:00Z, a Monday


def _pair(name: str = "a", **changes: Any) -> Pair:
    data = {"defaults": {"models": ["claude-sonnet-4-6"], "jitter": "0s"}, "experts": [{"name": name, "system": [{"text": "x"}]}]}
    return replace(parse_config(data, Path(".")).pairs[0], **changes)


def _setup(name: str = "a", tokens: int = 4000, **changes: Any) -> PairSetup:
    return PairSetup.build(_pair(name, **changes), PRICES, tokens)


# --- traces ---------------------------------------------------------------------------------


def test_trace_takes_unix_seconds_or_rfc3339_in_any_order_and_ignores_other_columns() -> None:
    text = "request_id,model,expert,at\nr2,m,e,2026-03-02T09:00:10+01:00\nr1,m,e,1772438400\n"
    rows = parse_trace(io.StringIO(text))
    assert [r.at for r in rows] == [1772438400.0, 1772438410.0]
    assert rows[0].line == 3 and rows[0].prefix_tokens is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("at,expert\n1,e\n", "trace:1: the header lacks model"),
        ("at,expert,model\n1,e,m\nyesterday,e,m\n", "trace:3: at: 'yesterday' is neither unix seconds nor an RFC 3339 time"),
        ("at,expert,model\n2026-03-02T09:00:00,e,m\n", "trace:2: at: '2026-03-02T09:00:00' has no UTC offset"),
        ("at,expert,model,prefix_tokens\n1,e,m,lots\n", "trace:2: prefix_tokens: expected a whole number"),
        ("at,expert,model\n1,e\n", "trace:2: 2 fields, the header has 3"),
        ("", "trace: empty"),
    ],
)
def test_a_bad_trace_names_the_line(text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_trace(io.StringIO(text))


# --- the replay and the optimum ------------------------------------------------------------


def _requests(times: list[float], name: str = "a", model: str = "claude-sonnet-4-6") -> list[Request]:
    return [Request(T0 + t, name, model) for t in times]


def test_optimum_keeps_warm_a_gap_only_when_its_pings_cost_less_than_a_miss() -> None:
    setup = _setup()
    ratio = setup.miss_penalty / setup.ping_cost
    short, bridgeable, long = 200.0, 300.0 * 3 + 10.0, 300.0 * (int(ratio) + 2)
    times = [0.0, short, short + bridgeable, short + bridgeable + long]
    tally = optimum(setup, _requests(times), PRICES)
    # First request: a miss, whoever writes. The short gap: a hit. The bridgeable: three pings.
    # The long one: cheaper to miss.
    assert (tally.requests, tally.misses, tally.pings) == (4, 2, 3)
    assert tally.extra_usd == pytest.approx(2 * setup.miss_penalty + 3 * setup.ping_cost)


def test_none_misses_every_request_a_ttl_after_the_previous() -> None:
    sim = run([_setup()], _requests([0, 100, 500, 700]), PRICES, ("none",), alternative_ttl=False)
    tally = sim.results["none"]["a/claude-sonnet-4-6"]
    assert (tally.misses, tally.pings, tally.keepalive_usd) == (2, 0, 0.0)


def test_fixed_skips_pings_production_made_unnecessary_and_plain_fixed_does_not() -> None:
    times = [float(t) for t in range(0, 3600, 60)]  # a request a minute for an hour
    sim = run([_setup()], _requests(times), PRICES, ("fixed", "fixed-plain"), alternative_ttl=False)
    fixed, plain = sim.results["fixed"]["a/claude-sonnet-4-6"], sim.results["fixed-plain"]["a/claude-sonnet-4-6"]
    assert fixed.pings == 0  # the start's ping comes after the first request: production keeps it warm
    assert fixed.skipped["production_touch"] > 0
    assert plain.pings == len(range(0, 3541, 240))  # one every interval, production or not
    assert fixed.misses == plain.misses == 1  # the first request, before any ping


def test_a_ping_refreshes_the_cache_from_its_start() -> None:
    pings: list[tuple[float, str, str, str]] = []
    sim = run([_setup()], _requests([0.0, 4000.0]), PRICES, ("fixed",), until=T0 + 4000.0, pings=pings, alternative_ttl=False)
    tally = sim.results["fixed"]["a/claude-sonnet-4-6"]
    # The first request writes; each ping then reads (never writes) and pushes expiry a TTL on.
    assert tally.misses == 1 and tally.pings == len(pings) == 4000 // 240
    assert tally.keepalive_usd == pytest.approx(tally.pings * _setup().ping_cost)
    assert all(b[0] - a[0] == pytest.approx(240.0) for a, b in zip(pings, pings[1:]))


def test_the_budget_caps_the_keepalive_spend() -> None:
    setups = [_setup("a"), _setup("b")]
    times = _requests([0.0, 86400.0], "a") + _requests([0.0, 86400.0], "b")
    times.sort(key=lambda r: r.at)
    free = run(setups, times, PRICES, ("fixed",), alternative_ttl=False)
    cap = free.total("fixed").keepalive_usd / 4
    capped = run(setups, times, PRICES, ("fixed",), budget_usd_per_day=cap, alternative_ttl=False)
    total = capped.total("fixed")
    assert total.keepalive_usd <= cap + 2 * setups[0].cold_ping_cost
    assert total.skipped["budget"] > 0


def test_online_pings_before_any_cut_are_the_same() -> None:
    """A decision at t depends only on what came before t: cut the trace anywhere, same pings before."""
    rng = random.Random(5)
    hours = "mon-fri 08:00-19:00 UTC"
    setups = [
        _setup("a", policy="adaptive", jitter=10.0),
        _setup("b", policy="fixed", jitter=10.0),
        _setup("c", policy="adaptive", jitter=10.0, active_hours=parse_config(
            {"defaults": {"models": ["m"], "active_hours": hours}, "experts": [{"name": "c", "system": [{"text": "x"}]}]},
            Path("."),
        ).pairs[0].active_hours),
    ]
    requests = []
    for name in "abc":
        t = T0
        while t < T0 + 3 * 86400:
            t += rng.expovariate(1 / 900) if rng.random() < 0.8 else rng.expovariate(1 / 7200)
            requests.append(Request(t, name, "claude-sonnet-4-6"))
    requests.sort(key=lambda r: r.at)
    end = requests[-1].at
    full: list[tuple[float, str, str, str]] = []
    run(setups, requests, PRICES, ("fixed", "adaptive"), end, seed=3, budget_usd_per_day=0.5, pings=full,
        alternative_ttl=False)
    assert len(full) > 100
    for cut in sorted(rng.uniform(T0, end) for _ in range(6)):
        part: list[tuple[float, str, str, str]] = []
        run(setups, [r for r in requests if r.at <= cut], PRICES, ("fixed", "adaptive"), cut, seed=3,
            budget_usd_per_day=0.5, pings=part, alternative_ttl=False)
        assert sorted(part) == sorted(p for p in full if p[0] <= cut)


# --- the command ------------------------------------------------------------------------------


def _doc_example() -> tuple[str, str]:
    """The worked example's command and output, as docs/policy.md shows them."""
    text = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    block = text.split("<!-- simulate-example:begin -->")[1].split("<!-- simulate-example:end -->")[0]
    command, output = block.split("```")[1], block.split("```")[3]
    return command.removeprefix("sh\n").strip(), output.removeprefix("text\n").strip("\n")


def test_the_documented_example_prints_what_the_docs_show(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    command, expected = _doc_example()
    assert command.startswith("keepwarm simulate ")
    monkeypatch.chdir(ROOT)
    assert main(command.split()[1:]) == 0
    assert capsys.readouterr().out.strip("\n") == expected


def test_json_pings_out_and_policy_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pings.csv"
    args = ["simulate", "--config", str(ROOT / "docs/simulate-example.yaml"), "--trace", str(ROOT / "docs/simulate-example.csv"),
            "--format", "json", "--policy", "adaptive", "--pings-out", str(out), "--seed", "4"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["policies"]) == ["adaptive"]
    total = data["policies"]["adaptive"]["total"]
    assert total["extra_usd"] == pytest.approx(total["keepalive_usd"] + total["write_premiums_usd"])
    assert total["ratio_to_optimum"] >= 1.0
    rows = list(csv.DictReader(out.open()))
    assert rows and set(rows[0]) == {"at", "expert", "model", "policy"}
    assert {r["policy"] for r in rows} == {"adaptive"} and len(rows) == total["keepalive_pings"]
    assert data["ttl_alternative"]["pairs"]["chief-economist/claude-sonnet-4-6"]["other_ttl"] == "1h"


def test_exit_65_names_the_bad_line_and_78_for_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("at,expert,model\n1772442000,chief-economist,claude-sonnet-4-6\nsoon,x,y\n")
    config = str(ROOT / "docs/simulate-example.yaml")
    assert main(["simulate", "--config", config, "--trace", str(trace)]) == 65
    assert f"{trace}:3: at: 'soon'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: []\n")
    assert main(["simulate", "--config", str(bad), "--trace", str(trace)]) == 78


def test_prefix_tokens_come_from_count_tokens_with_emulator_else_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("at,expert,model\n1772442000,chief-economist,claude-sonnet-4-6\n1772442100,chief-economist,claude-sonnet-4-6\n")
    config = str(ROOT / "docs/simulate-example.yaml")
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert main(["simulate", "--config", config, "--trace", str(trace)]) == 78
    assert "no prefix_tokens for chief-economist/claude-sonnet-4-6, support-triage/claude-sonnet-4-6" in capsys.readouterr().err
    assert main(["simulate", "--config", config, "--trace", str(trace), "--emulator", "--format", "json"]) == 0
    pairs = json.loads(capsys.readouterr().out)["pairs"]
    assert pairs["chief-economist/claude-sonnet-4-6"]["prefix_tokens"] > 100


def test_from_ledger_replays_the_observations_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger_path = tmp_path / "ledger.db"
    Ledger(ledger_path).close()  # the daemon's schema; observations as the observing daemon writes them
    with sqlite3.connect(ledger_path) as db:
        # The observing daemon's table (ledger migration 2) when this ledger has it, else its columns we read.
        db.execute("CREATE TABLE IF NOT EXISTS observations (id INTEGER PRIMARY KEY, time REAL, expert TEXT, model TEXT,"
                   " cache_read INTEGER, cache_write_5m INTEGER, cache_write_1h INTEGER)")
        columns = {row[1] for row in db.execute("PRAGMA table_info(observations)")} - {"id"}
        for k in range(10):
            row = {"time": T0 + 120 * k, "received": T0 + 120 * k, "expert": "e", "model": "claude-sonnet-4-6",
                   "ttl": "5m", "fingerprint": "f", "result": "rewarmed" if k == 0 else "warm", "input": 10,
                   "cache_read": 0 if k == 0 else 3000, "cache_write_5m": 3000 if k == 0 else 0, "cache_write_1h": 0,
                   "output": 5, "saved": 0, "late": 0}
            names = [c for c in row if c in columns]
            db.execute(f"INSERT INTO observations ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                       [row[c] for c in names])
    config = tmp_path / "c.yaml"
    config.write_text(
        f"defaults: {{models: [claude-sonnet-4-6]}}\nexperts: [{{name: e, system: [{{text: x}}]}}]\nledger: {{path: {ledger_path.name}}}\n"
    )
    assert main(["simulate", "--config", str(config), "--from-ledger", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pairs"]["e/claude-sonnet-4-6"]["prefix_tokens"] == 3000
    assert data["policies"]["none"]["total"]["requests"] == 10
    assert data["policies"]["none"]["total"]["misses"] == 1
