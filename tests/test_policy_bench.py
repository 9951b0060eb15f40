"""bench/policy.py: the trace shapes exist and behave, and docs/policy.md holds their table."""

import importlib.util
import random
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

from keepwarm.config import DEFAULT_INTERVAL, TTL_SECONDS
from keepwarm.pricing import builtin_table
from keepwarm.simulate import PairSetup, Request, run

ROOT = Path(__file__).resolve().parent.parent


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_policy", ROOT / "bench" / "policy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_policy"] = module
    spec.loader.exec_module(module)
    return module


def test_at_least_ten_shapes_each_with_traffic() -> None:
    bench = _bench()
    shapes = bench.shapes(7.0)
    assert len(shapes) >= 10
    start = bench.START.timestamp()
    for name, specs in shapes.items():
        for spec in specs:
            times = spec.traffic(random.Random(1), start, start + 7 * 86400.0)
            assert times, f"{name}/{spec.name} has no traffic"
            assert times == sorted(times) and start <= times[0] and times[-1] < start + 7 * 86400.0


def test_office_hours_traffic_keeps_to_its_zone() -> None:
    bench = _bench()
    inside = bench.office("Asia/Tokyo")
    start = bench.START.timestamp()
    times = bench.sessions(2.0, 3, 60, inside)(random.Random(2), start, start + 7 * 86400.0)
    # Sessions start inside office hours; their requests follow within minutes.
    assert sum(inside(t) for t in times) > 0.9 * len(times)


def test_a_shape_replays_under_every_policy_and_the_optimum_is_least() -> None:
    bench = _bench()
    extra = bench.replay_shape(bench.shapes(2.0)["cron-30m"], seed=1, days=2.0)
    assert set(extra) == set(bench.POLICIES)
    assert all(extra["optimum"] <= v + 1e-9 for v in extra.values())


def test_docs_hold_the_generated_table_for_every_shape() -> None:
    bench = _bench()
    doc = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    table = doc.split("<!-- policy-table:begin -->")[1].split("<!-- policy-table:end -->")[0]
    for name in bench.shapes(21.0):
        assert f"| {name} |" in table
    assert "| **total** |" in table and "bench/policy.py --write-docs" in table


def test_the_new_shapes_follow_their_seed_and_a_held_out_seed_is_a_new_shape() -> None:
    bench = _bench()
    one, again, other = bench.new_shapes(1), bench.new_shapes(1), bench.new_shapes(2)
    assert set(one) == {"conversations", "every-ttl", "periodic-straddle", "heavy-tailed-gaps", "thin-beside-busy"}
    assert [s.name for s in one["periodic-straddle"]] == [s.name for s in again["periodic-straddle"]]
    assert any([s.name for s in one[k]] != [s.name for s in other[k]] for k in one)


def test_conversations_are_a_few_requests_within_minutes_then_silence() -> None:
    bench = _bench()
    start = bench.START.timestamp()
    rng = random.Random(3)
    for _ in range(50):
        times = bench.conversation(rng, start, start + 7 * 86400.0)
        assert 1 <= len(times) <= 8 and times[-1] - times[0] < 8 * 1300.0


def test_new_shapes_replay_online_cut_anywhere_the_pings_before_are_the_same() -> None:
    """Cutting a trace leaves every earlier ping unchanged (same seed), with the fleet's prior in play."""
    bench = _bench()
    prices = builtin_table()
    base = bench._base_pair()
    start, days = bench.START.timestamp(), 2.0
    specs = bench.new_shapes(5)["conversations"][:40] + bench.new_shapes(5)["thin-beside-busy"][:8]
    setups, requests = [], []
    for spec in specs:
        pair = replace(base, expert=spec.name, model=spec.model, ttl=spec.ttl, ttl_seconds=TTL_SECONDS[spec.ttl],
                       interval=DEFAULT_INTERVAL[spec.ttl])
        setups.append(PairSetup.build(pair, prices, spec.tokens))
        times = spec.traffic(random.Random(f"5:{spec.name}"), start, start + days * 86400.0)
        requests += [Request(t, spec.name, spec.model, spec.tokens + k * spec.growth) for k, t in enumerate(times)]
    requests.sort(key=lambda r: r.at)
    end = requests[-1].at
    full: list[tuple[float, str, str, str]] = []
    run(setups, requests, prices, ("adaptive", "ski-rental"), end, seed=9, pings=full, alternative_ttl=False)
    assert len(full) > 20
    rng = random.Random(1)
    for cut in sorted(rng.uniform(requests[0].at, end) for _ in range(4)):
        part: list[tuple[float, str, str, str]] = []
        run(setups, [r for r in requests if r.at <= cut], prices, ("adaptive", "ski-rental"), cut, seed=9, pings=part,
            alternative_ttl=False)
        assert sorted(part) == sorted(p for p in full if p[0] <= cut)
