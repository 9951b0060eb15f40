"""`keepwarm simulate`: traces, the replay, the hindsight optimum, the command."""

import csv
import io
import json
import random
import sqlite3
import subprocess
import sys
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
    # Where each pair's cache lives: the default Anthropic account here.
    place = data["pairs"]["chief-economist/claude-sonnet-4-6"]
    assert (place["account"], place["provider"]) == ("default", "anthropic")


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


# --- defects of the review: each one reproduced ------------------------------------------------

SIM_CONFIG = "defaults: {models: [claude-sonnet-4-6], jitter: 0s}\nexperts: [{name: a, system: [{text: x}]}]\n"


def _simulate(tmp_path: Path, trace_text: str | bytes, *extra: str, config: str = SIM_CONFIG) -> subprocess.CompletedProcess[str]:
    """`keepwarm simulate` in a child process with a deadline: a hang fails the test, not the suite."""
    cfg, trace = tmp_path / "c.yaml", tmp_path / "t.csv"
    cfg.write_text(config)
    if isinstance(trace_text, bytes):
        trace.write_bytes(trace_text)
    else:
        trace.write_text(trace_text)
    cmd = [sys.executable, "-m", "keepwarm", "simulate", "--config", str(cfg), "--trace", str(trace), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_a_trace_with_no_row_for_the_configs_pairs_exits_65_and_says_so(tmp_path: Path) -> None:
    done = _simulate(tmp_path, "at,expert,model,prefix_tokens\n1772442000,other,claude-sonnet-4-6,4000\n",
                     "--pings-out", str(tmp_path / "p.csv"))
    assert done.returncode == 65, done.stderr
    assert "no trace row names a configured pair" in done.stderr
    assert "the trace has: other/claude-sonnet-4-6" in done.stderr and "the config has: a/claude-sonnet-4-6" in done.stderr


def test_a_row_at_unix_time_zero_replays_and_finishes(tmp_path: Path) -> None:
    done = _simulate(tmp_path, "at,expert,model,prefix_tokens\n0,a,claude-sonnet-4-6,4000\n600,a,claude-sonnet-4-6,4000\n",
                     "--format", "json", "--pings-out", str(tmp_path / "p.csv"))
    assert done.returncode == 0, done.stderr
    fixed = json.loads(done.stdout)["policies"]["fixed"]["total"]
    assert fixed["keepalive_pings"] == 2  # at 240 and 480: an interval after each touch, not at 0 forever


def test_millisecond_timestamps_exit_65_naming_the_line_also_with_active_hours(tmp_path: Path) -> None:
    trace = "at,expert,model,prefix_tokens\n1772442000,a,claude-sonnet-4-6,4000\n1772442300000,a,claude-sonnet-4-6,4000\n"
    for config in (SIM_CONFIG, SIM_CONFIG.replace("jitter: 0s", "jitter: 0s, active_hours: 'mon-fri 08:00-19:00 UTC'")):
        done = _simulate(tmp_path, trace, config=config)
        assert done.returncode == 65, done.stderr
        assert "t.csv:3: at: '1772442300000' is after the year 5000: milliseconds?" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_trace_spanning_decades_is_refused_not_replayed_for_hours(tmp_path: Path) -> None:
    done = _simulate(tmp_path, "at,expert,model,prefix_tokens\n1000,a,claude-sonnet-4-6,4000\n1772442000,a,claude-sonnet-4-6,4000\n")
    assert done.returncode == 65 and "spans 20,514 days (line 2 to line 3)" in done.stderr


def test_a_utf8_bom_and_a_leap_second_are_read(tmp_path: Path) -> None:
    rows = ("at,expert,model,prefix_tokens\r\n2016-12-31T23:59:59Z,a,claude-sonnet-4-6,4000\r\n"
            "2016-12-31T23:59:60Z,a,claude-sonnet-4-6,4000\r\n")
    parsed = parse_trace(io.StringIO("\ufeff" + rows))
    assert [r.at for r in parsed] == [1483228799.0, 1483228800.0]  # the leap second counts as the next second
    done = _simulate(tmp_path, b"\xef\xbb\xbf" + rows.encode(), "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["policies"]["none"]["total"]["requests"] == 2


def test_from_ledger_before_any_observation_exits_65(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.db"
    Ledger(ledger_path).close()
    with sqlite3.connect(ledger_path) as db:
        db.execute("CREATE TABLE IF NOT EXISTS observations (id INTEGER PRIMARY KEY, time REAL, expert TEXT, model TEXT)")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SIM_CONFIG + f"ledger: {{path: {ledger_path.name}}}\n")
    done = subprocess.run([sys.executable, "-m", "keepwarm", "simulate", "--config", str(cfg), "--from-ledger"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 65 and "the ledger's observations: no requests to replay" in done.stderr


def _every(period: float, n: int, name: str = "a") -> list[Request]:
    return [Request(T0 + k * period, name, "claude-sonnet-4-6", None, k + 2) for k in range(n)]


@pytest.mark.parametrize(("ttl", "period"), [("5m", 300.0), ("1h", 3600.0)])
def test_requests_exactly_every_ttl_are_misses_unless_pinged_and_adaptive_pings(ttl: str, period: float) -> None:
    """A request at the cache's expiry misses (as the API counts it); the policy must know it too."""
    from keepwarm.config import DEFAULT_INTERVAL, TTL_SECONDS

    setup = _setup(policy="adaptive", ttl=ttl, ttl_seconds=TTL_SECONDS[ttl], interval=DEFAULT_INTERVAL[ttl])
    sim = run([setup], _every(period, 200), PRICES, ("none", "fixed", "adaptive", "optimum"), alternative_ttl=False)
    best = sim.total("optimum").extra_usd
    assert sim.total("none").misses == 200  # every request at the previous one's expiry
    assert sim.total("optimum").misses == 1
    assert sim.total("adaptive").extra_usd <= 1.25 * best, sim.total("adaptive")
    assert sim.total("fixed").extra_usd <= 1.25 * best


def test_the_optimum_is_a_lower_bound_when_the_prefix_size_varies() -> None:
    rng = random.Random(11)
    for seed in range(4):
        requests, t = [], T0
        for k in range(300):
            t += rng.choice([30.0, 200.0, 299.0, 300.0, 301.0, 900.0, 2400.0, 7200.0])
            # Conversation-like: each request's prefix a different size, from tiny to large.
            requests.append(Request(t, "a", "claude-sonnet-4-6", rng.choice([0, 500, 1024, 4000, 30000, 150000]), k + 2))
        setups = [_setup(policy=p, tokens=requests[0].prefix_tokens or 0) for p in ("fixed",)]
        sim = run(setups, requests, PRICES, ("none", "fixed", "fixed-plain", "adaptive", "optimum"), seed=seed,
                  alternative_ttl=False)
        best = sim.total("optimum").extra_usd
        for name in ("none", "fixed", "fixed-plain", "adaptive"):
            assert best <= sim.total(name).extra_usd + 1e-12, (seed, name, sim.total(name).extra_usd, best)


def test_cutting_the_trace_changes_no_price_or_ping_before_the_cut(tmp_path: Path) -> None:
    """Prices are online too: a pair's size is what its rows said so far, never a whole-trace median."""
    rows = ["at,expert,model,prefix_tokens"]
    for k in range(120):
        tokens = 2000 if k < 60 else 90000  # the prefix grows half way
        rows.append(f"{T0 + 500.0 * k:.0f},a,claude-sonnet-4-6,{tokens}")
    cut = T0 + 500.0 * 59 + 250.0
    config = SIM_CONFIG.replace("jitter: 0s", "jitter: 0s, policy: adaptive")
    whole = _simulate(tmp_path, "\n".join(rows) + "\n", "--format", "json", "--until", f"{cut:.0f}", config=config)
    part = _simulate(tmp_path, "\n".join(rows[:61]) + "\n", "--format", "json", "--until", f"{cut:.0f}", config=config)
    assert whole.returncode == part.returncode == 0, whole.stderr + part.stderr
    a, b = json.loads(whole.stdout), json.loads(part.stdout)
    assert a["pairs"] == b["pairs"]
    for name in ("fixed", "adaptive"):
        assert a["policies"][name]["total"] == b["policies"][name]["total"]


def test_the_optimum_stays_below_fixed_when_a_pair_starts_late_with_a_large_prefix(tmp_path: Path) -> None:
    """`fixed` pings every pair from the trace's start; its first (cold) ping must be priced at the
    size the pair's cache will hold, not at a size from later rows, or it "saves" a large write cheaply."""
    config = ("defaults: {models: [claude-sonnet-4-6], jitter: 0s}\n"
              "experts: [{name: a, system: [{text: x}]}, {name: b, system: [{text: y}]}]\n")
    rows = ["at,expert,model,prefix_tokens", f"{T0:.0f},a,claude-sonnet-4-6,2000", f"{T0 + 600:.0f},b,claude-sonnet-4-6,150000"]
    rows += [f"{T0 + 600 + 60 * k:.0f},b,claude-sonnet-4-6,1100" for k in range(1, 9)]
    done = _simulate(tmp_path, "\n".join(rows) + "\n", "--format", "json", config=config)
    assert done.returncode == 0, done.stderr
    policies = json.loads(done.stdout)["policies"]
    for key in ("a/claude-sonnet-4-6", "b/claude-sonnet-4-6"):
        best = policies["optimum"]["pairs"][key]["extra_usd"]
        for name in ("none", "fixed", "adaptive"):
            assert best <= policies[name]["pairs"][key]["extra_usd"] + 1e-12, (key, name)


def test_simulate_finishes_with_a_clear_exit_on_random_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Garbage in, a clear exit out: 0 or 65 with a message, never a traceback or a hang."""
    rng = random.Random(20)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SIM_CONFIG.replace("jitter: 0s", "jitter: 0s, active_hours: 'mon-fri 08:00-19:00 Europe/Berlin'"))
    stamps = ["0", "1", "-5", "nan", "1e10", "1772442000", "1772442000.5", "1772442000123", "2026-03-29T01:59:60Z",
              "2026-03-29T02:30:00+01:00", "2026-03-02T09:00:00", "", "x", "99999999999"]
    for k in range(40):
        rows = ["at,expert,model,prefix_tokens"]
        for _ in range(rng.randint(0, 6)):
            at = rng.choice(stamps) if rng.random() < 0.5 else f"{T0 + rng.uniform(-1e6, 1e6):.3f}"
            rows.append(f"{at},{rng.choice(['a', 'b', ''])},claude-sonnet-4-6,{rng.choice(['4000', '', '0', '-1'])}")
        trace = tmp_path / f"t{k}.csv"
        trace.write_text("\n".join(rows) + "\n")
        code = main(["simulate", "--config", str(cfg), "--trace", str(trace), "--policy", "adaptive", "--format", "json"])
        err = capsys.readouterr().err
        assert code in (0, 65), (rows, code, err)
        assert code == 0 or err.startswith("keepwarm simulate: "), err


def test_the_other_ttl_replayed_in_a_child_process_gives_the_same_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    import keepwarm.simulate as simulate

    rng = random.Random(8)
    setups = [_setup("a", policy="adaptive"), _setup("b")]
    requests = sorted((Request(T0 + rng.uniform(0, 86400.0), name, "claude-sonnet-4-6") for name in "ab" for _ in range(300)),
                      key=lambda r: r.at)
    pings: list[tuple[float, str, str, str]] = []
    here = run(setups, requests, PRICES, seed=2, pings=pings)
    monkeypatch.setattr(simulate, "PARALLEL_ROWS", 1)
    forked: list[int] = []
    real = simulate._beside

    def counting(work: Any) -> Any:
        forked.append(1)
        return real(work)

    monkeypatch.setattr(simulate, "_beside", counting)
    beside: list[tuple[float, str, str, str]] = []
    there = run(setups, requests, PRICES, seed=2, pings=beside)
    assert there.ttl_alternative == here.ttl_alternative
    # This TTL's replays but adaptive's ran in the child too: the same tallies, pings, order of rows.
    assert list(there.results) == list(here.results) and there.results == here.results
    assert {p[3] for p in pings} >= {"fixed", "adaptive"} and sorted(beside) == sorted(pings)
    assert forked == [1]


# --- the replay's speed paths and measured latencies -------------------------------------------


@pytest.mark.parametrize("policy", ["fixed", "fixed-plain", "ski-rental"])
def test_pairs_replayed_alone_do_exactly_what_the_shared_timeline_does(policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pairs that share nothing replay one by one (fast); the result is the shared timeline's to the ping."""
    import keepwarm.simulate as simulate

    rng = random.Random(11)
    hours = parse_config({"defaults": {"models": ["m"], "active_hours": "mon-fri 08:00-19:00 UTC"},
                          "experts": [{"name": "c", "system": [{"text": "x"}]}]}, Path(".")).pairs[0].active_hours
    setups = [_setup("a", jitter=10.0), _setup("b", jitter=10.0, ttl="1h", ttl_seconds=3600.0, interval=3300.0),
              _setup("c", jitter=10.0, active_hours=hours)]
    requests = []
    for name in "abc":
        t = T0
        while t < T0 + 2 * 86400:
            t += rng.expovariate(1 / 900) if rng.random() < 0.8 else rng.expovariate(1 / 7200)
            requests.append(Request(t, name, "claude-sonnet-4-6", rng.choice((None, 3000, 5000))))
    requests.append(Request(requests[-1].at, "b", "claude-sonnet-4-6"))  # a tie: the request goes first, as a wake would
    requests.sort(key=lambda r: r.at)
    end = requests[-1].at - 3600.0  # `until` before the last request
    alone: list[tuple[float, str, str, str]] = []
    fast = run(setups, requests, PRICES, (policy,), end, seed=4, pings=alone, alternative_ttl=False)
    monkeypatch.setattr(simulate, "INDEPENDENT_POLICIES", ())
    shared: list[tuple[float, str, str, str]] = []
    slow = run(setups, requests, PRICES, (policy,), end, seed=4, pings=shared, alternative_ttl=False)
    assert len(shared) > 50
    assert sorted(alone) == sorted(shared)
    assert fast.results == slow.results


def test_adaptive_spaces_pings_by_the_latencies_the_ledger_measured(tmp_path: Path) -> None:
    """With pings in the ledger, simulate's adaptive policy keeps the margin the daemon measured."""
    ledger_path = tmp_path / "ledger.db"
    Ledger(ledger_path).close()
    with sqlite3.connect(ledger_path) as db:
        for k in range(50):  # the daemon's pings: about a second each, the slowest 3 s
            db.execute("INSERT INTO pings (time, expert, model, ttl, fingerprint, result, latency, attempts)"
                       " VALUES (?, 'a', 'claude-sonnet-4-6', '5m', 'f', 'warm', ?, 1)", (T0 - 86400 + 240 * k, 3.0 if k == 7 else 1.0))
    times = [T0 + 420.0 * k for k in range(200)]  # a job every 7 minutes: each gap takes one ping
    trace = "at,expert,model,prefix_tokens\n" + "".join(f"{t},a,claude-sonnet-4-6,4000\n" for t in times)

    def gaps(ledger: bool) -> set[float]:
        config = SIM_CONFIG.replace("jitter: 0s", "jitter: 0s, policy: adaptive")
        if ledger:
            config += f"ledger: {{path: {ledger_path}}}\n"
        out = tmp_path / f"pings-{ledger}.csv"
        done = _simulate(tmp_path, trace, "--policy", "adaptive", "--pings-out", str(out), config=config)
        assert done.returncode == 0, done.stderr
        pinged = [float(row["at"]) for row in csv.DictReader(out.open())]
        assert len(pinged) > 100
        return {round(min(p - t for t in times if t <= p), 3) for p in pinged}

    assert gaps(ledger=False) == {300.0 - 20.0}  # no latency measured: the default margin
    assert gaps(ledger=True) == {300.0 - (2 * 3.0 + 1.0 + 2.0)}  # p99 3 s: twice, backoff, slack
