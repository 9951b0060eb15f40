"""How fast `keepwarm simulate` replays a large trace, and what one adaptive decision costs the daemon.

    .venv/bin/python bench/simulate_speed.py      # on a shared machine, under its benchmark lock

1. `simulate`: a generated trace of `--rows` rows (default 1,000,000) over `--pairs` pairs
   (default 200), two weeks of office-hours, 24x7 and sparse traffic with prefix sizes, replayed by
   `keepwarm simulate --format json` (every default policy, the optimum and the other TTL), timed
   end to end in this process: reading the CSV, the replays, the JSON.
2. The daemon: 10,000 adaptive pairs sharing one prior, each with a history of idle gaps; the time
   of `next_ping` right after a production touch (the appointment the scheduler arms) and when
   that ping comes due (where it is weighed: the lookahead over the shrunk, censored estimate).

Writes bench/results/simulate-speed.json. `--profile` prints where the replay's time goes.
`--repeat N` times the replay N times and keeps the best (a shared machine's other work only
ever adds time); every time and the load average before each are recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from keepwarm.adaptive import AdaptivePolicy, SharedPrior
from keepwarm.classify import Result
from keepwarm.cli import main as cli_main
from keepwarm.policy import Source, Touch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "simulate-speed.json"
T0 = 1772442000.0  # 2026-03-02T09:00:00Z, a Monday
DAYS = 14


def write_trace(path: Path, rows: int, pairs: int, seed: int) -> None:
    """`rows` requests over `pairs` pairs: a third office hours, a third 24x7, a third sparse."""
    rng = random.Random(seed)
    span = DAYS * 86400.0
    weights = [rng.choice((1.0, 3.0, 10.0)) if k % 3 != 2 else 0.1 for k in range(pairs)]
    counts = [max(2, round(rows * w / sum(weights))) for w in weights]
    counts[0] += rows - sum(counts)
    out: list[tuple[float, int, int]] = []
    for k, n in enumerate(counts):
        tokens = rng.choice((2048, 4000, 8000, 20000))
        for _ in range(n):
            t = T0 + rng.uniform(0, span)
            if k % 3 == 0:  # office hours: folded into 08:00-18:00 UTC on weekdays
                day = int((t - T0) // 86400) % 7
                day = day if day < 5 else day - 5
                t = T0 - 3600.0 + day * 86400.0 + rng.uniform(0, 36000.0) + 7 * 86400.0 * rng.randint(0, DAYS // 7 - 1)
            out.append((t, k, tokens))
    out.sort()
    with path.open("w", encoding="utf-8") as f:
        f.write("at,expert,model,prefix_tokens\n")
        f.writelines(f"{t:.3f},p{k},claude-sonnet-4-6,{n}\n" for t, k, n in out)


def write_config(path: Path, pairs: int) -> None:
    """`pairs` experts on one model, jitter as shipped."""
    experts = ", ".join(f"{{name: p{k}, system: [{{text: x}}]}}" for k in range(pairs))
    path.write_text(f"defaults: {{models: [claude-sonnet-4-6]}}\nexperts: [{experts}]\n", encoding="utf-8")


def time_simulate(rows: int, pairs: int, seed: int, profile: bool) -> dict[str, float]:
    """Seconds `keepwarm simulate` takes on a generated trace (and the trace's figures)."""
    with tempfile.TemporaryDirectory() as tmp:
        trace, config = Path(tmp) / "trace.csv", Path(tmp) / "c.yaml"
        write_trace(trace, rows, pairs, seed)
        write_config(config, pairs)
        args = ["simulate", "--config", str(config), "--trace", str(trace), "--format", "json"]
        out = io.StringIO()
        profiler = cProfile.Profile() if profile else None
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            if profiler:
                profiler.enable()
            code = cli_main(args)
            if profiler:
                profiler.disable()
        seconds = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"simulate exited {code}")
        if profiler:
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        total = json.loads(out.getvalue())["policies"]["none"]["total"]["requests"]
    return {"rows": rows, "pairs": pairs, "replayed_requests": total, "seconds": seconds}


def time_decisions(pairs: int, gaps: int, decisions: int, seed: int) -> dict[str, float]:
    """Per-decision cost of `next_ping` at `pairs` adaptive pairs sharing one prior."""
    rng = random.Random(seed)
    prior = SharedPrior()
    policies = []
    t = T0
    for _ in range(pairs):
        p = AdaptivePolicy(300.0, 240.0, 10.0, 0.00124, 0.0138, prior)
        at = t - gaps * 1800.0
        for _ in range(gaps):
            p.observe(Touch(at, Source.PRODUCTION, Result.WARM))
            at += rng.expovariate(1 / 900.0) + 30.0
        policies.append(p)
    after_touch, when_due = [], []
    now = t
    for _ in range(decisions):
        p = rng.choice(policies)
        now += 0.5
        p.observe(Touch(now, Source.PRODUCTION, Result.WARM))  # a touch: every answer cached is stale
        draw = rng.random()
        t0 = time.perf_counter()
        first = p.next_ping(now, draw)  # the appointment the scheduler arms
        t1 = time.perf_counter()
        if first.at is not None:
            p.next_ping(first.at, draw)  # the job wakes: the ping is weighed
        t2 = time.perf_counter()
        after_touch.append(t1 - t0)
        if first.at is not None:
            when_due.append(t2 - t1)

    def figures(samples: list[float]) -> dict[str, float]:
        samples.sort()
        return {
            "median_us": statistics.median(samples) * 1e6,
            "p99_us": samples[math.ceil(0.99 * len(samples)) - 1] * 1e6,
            "mean_us": statistics.fmean(samples) * 1e6,
        }

    return {
        "pairs": pairs,
        "gaps_per_pair": gaps,
        "decisions": decisions,
        "after_touch": figures(after_touch),
        "when_due": figures(when_due),
    }


def main(argv: list[str] | None = None) -> int:
    """Run both measurements, print them, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--daemon-pairs", type=int, default=10_000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="time the replay this many times, keep the best")
    ap.add_argument("--no-write", action="store_true", help="do not write bench/results/simulate-speed.json")
    args = ap.parse_args(argv)
    runs, loads = [], []
    for _ in range(max(1, args.repeat)):
        loads.append(os.getloadavg()[0])
        runs.append(time_simulate(args.rows, args.pairs, args.seed, args.profile))
    best = min(runs, key=lambda r: r["seconds"])
    result = {
        "simulate": {**best, "all_seconds": [r["seconds"] for r in runs], "load_average_1m_before": loads,
                     "cpus": os.cpu_count()},
        "daemon_decision": time_decisions(args.daemon_pairs, 50, 20_000, args.seed),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=2))
    if not args.no_write:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
