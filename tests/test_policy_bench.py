"""bench/policy.py: the trace shapes exist and behave, and docs/policy.md holds their table."""

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

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
