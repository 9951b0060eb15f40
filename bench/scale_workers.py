"""The two processes bench/scale.py measures: keepwarm's daemon, and the naive baseline.

    python3 bench/scale_workers.py keepwarm --config F --seconds S --launched T --result R
    python3 bench/scale_workers.py baseline --config F --seconds S --scale X --result R

`keepwarm` wires the daemon in-process with keepwarm.daemon's own `build_runner` and
`build_web` (config, SDK client, Metrics, the runner, Scheduler with the
config's `api.max_concurrency` (sized from the pairs when the config leaves it out), the web
server on the config's `metrics.listen`, `freeze_heap` once it schedules, the main loop's clock
check and memory trim, glibc's mmap threshold kept as keepwarm.heap keeps it), with a recorder in the
ledger's place, prints `ready PORT` once it schedules, runs for S seconds and writes
what it saw to R. `baseline` is the seed's approach transliterated: one loop that pings every
pair one after another, then waits for the next multiple of the interval, through the same SDK
client and the same `send_ping`. Neither is meant to be run by hand; bench/scale.py runs them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

# The keepwarm beside this file, not an installed one: a copy of the tree measures its own code.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from keepwarm.classify import Result, classify  # noqa: E402 - imported after sys.path names this tree
from keepwarm.config import load_config  # noqa: E402 - imported after sys.path names this tree
from keepwarm.daemon import TRIM_EVERY, build_runner, build_web, freeze_heap  # noqa: E402 - imported after sys.path names this tree
from keepwarm.heap import keep_large_blocks_mapped, release_free_memory  # noqa: E402 - imported after sys.path names this tree
from keepwarm.logs import setup_logging  # noqa: E402 - imported after sys.path names this tree
from keepwarm.metrics import Metrics  # noqa: E402 - imported after sys.path names this tree
from keepwarm.ping import make_client, send_ping  # noqa: E402 - imported after sys.path names this tree
from keepwarm.runner import PingOutcome  # noqa: E402 - imported after sys.path names this tree
from keepwarm.scheduler import HEARTBEAT_EVERY, Scheduler  # noqa: E402 - imported after sys.path names this tree

# A ping found the cache cold although the pair had been pinged before: the cache lapsed.
COLD = {Result.REWARMED.value, Result.PARTIAL.value}


def rss_mb(pid: int | str = "self", field: str = "VmRSS") -> float:
    """Resident memory of a process, in MiB (Linux /proc); `field` VmHWM: its peak so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return math.nan


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """p50, p90, p99 and max of a sample (nearest rank), with its size."""
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float | None:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] if n else None

    return {"count": n, "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1] if n else None}


def lapses(pings: list[tuple[str, float, str]], ttl: float) -> dict[str, Any]:
    """From (pair, start, result) rows: pings that found a previously pinged cache cold, and gaps."""
    by_pair: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for key, started, result in pings:
        by_pair[key].append((started, result))
    cold_again = 0
    gaps: list[float] = []
    examples: list[dict[str, Any]] = []
    for key, rows in by_pair.items():
        rows.sort()
        for (before, _), (after, result) in pairwise(rows):
            gaps.append(after - before)
            if result in COLD:
                cold_again += 1
                if len(examples) < 5:
                    examples.append({"pair": key, "gap_seconds": round(after - before, 3), "result": result})
    return {
        "pairs_pinged": len(by_pair),
        "pairs_pinged_twice": sum(len(rows) > 1 for rows in by_pair.values()),
        "lapses": cold_again,
        "lapse_examples": examples,
        "max_gap_seconds": max(gaps) if gaps else None,
        "ttl_seconds": ttl,
    }


class Recorder:
    """Stands where the ledger would: writes the few fields the figures need from each ping to a
    file, as the ledger writes its rows to disk. Kept in a list, the rows themselves (about 200
    bytes a ping, 41 pings a second) would be most of the growth the RSS figures are there to
    show: 6 MB over 12 minutes at 10,000 pairs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._file = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed in rows()

    def record(self, outcome: PingOutcome) -> None:
        """One finished ping, a tab-separated line (pair keys and results hold no tab)."""
        scheduled = "" if outcome.scheduled_at is None else repr(outcome.scheduled_at)
        line = (f"{outcome.pair.key}\t{scheduled}\t{outcome.started!r}\t{outcome.result.value}\t"
                f"{outcome.duration!r}\t{outcome.miss_cause or ''}\n")
        with self._lock:
            self._file.write(line)

    def close(self) -> None:
        """Nothing to flush: the rows are read when the run ends."""

    def rows(self) -> list[tuple[str, float | None, float, str, float, str | None]]:
        """Every row written, read back once the window is over."""
        with self._lock:
            self._file.seek(0)
            lines = self._file.read().splitlines()
            self._file.close()
        out = []
        for line in lines:
            key, scheduled, started, result, duration, cause = line.split("\t")
            out.append((key, float(scheduled) if scheduled else None, float(started), result, float(duration),
                        cause or None))
        return out


def run_keepwarm(args: argparse.Namespace) -> dict[str, Any]:
    """The daemon as keepwarm.daemon wires it, for `args.seconds`; returns its own figures."""
    setup_logging("text")
    memory = {"after_imports": rss_mb()}
    keep_large_blocks_mapped()  # as keepwarm.daemon does before it loads the config
    began = time.perf_counter()
    config = load_config(args.config)
    config_seconds = time.perf_counter() - began
    memory["after_config"] = rss_mb()

    stop = threading.Event()
    recorder = Recorder()
    metrics = Metrics()
    client = make_client(config.api.base_url, args.api_key, config.api.timeout)
    runner = build_runner(config, client, metrics, stop, "bench", recorder)
    scheduler = Scheduler(runner, metrics, max_workers=config.api.max_concurrency)
    web = build_web(config, metrics, scheduler)
    web.start()
    began = time.perf_counter()
    started_wall = time.time()
    scheduler.start(config.pairs)
    start_seconds = time.perf_counter() - began
    freeze_heap()  # as keepwarm.daemon does once the scheduler runs
    memory["after_scheduler_start"] = rss_mb()
    print(f"ready {web.address[1]}", flush=True)

    end = started_wall + args.seconds
    trimmed = time.monotonic()
    # keepwarm.daemon's main loop: wait a heartbeat, check the wall clock for a step, and every
    # TRIM_EVERY seconds hand the freed memory back.
    while not stop.wait(max(0.0, min(HEARTBEAT_EVERY, end - time.time()))):
        scheduler.check_clock()
        if time.monotonic() - trimmed >= TRIM_EVERY:
            trimmed = time.monotonic()
            release_free_memory()
        if time.time() >= end:
            break
    ended_wall = time.time()
    # Pings due but not yet started are as late as they are now: leaving them out would hide
    # exactly the lateness of a daemon that fell behind.
    overdue = [ended_wall - s.next_due for s in scheduler.states.values() if s.next_due and s.next_due < ended_wall]
    healthy = scheduler.healthy()
    memory["at_end"] = rss_mb()
    # The peak while keepwarm ran, before this script's own analysis of the rows below (which
    # the process's lifetime peak, the parent's VmHWM, also counts).
    memory["peak_at_window_end"] = rss_mb(field="VmHWM")
    left = scheduler.stop(config.shutdown_timeout)
    web.stop()

    rows = [r for r in recorder.rows() if r[2] < ended_wall]
    lateness = [started - scheduled for _, scheduled, started, *_ in rows if scheduled is not None]
    durations = [r[4] for r in rows]
    window = ended_wall - started_wall
    ttl = config.pairs[0].ttl_seconds if config.pairs else math.nan
    interval = config.pairs[0].interval if config.pairs else math.nan
    jitter = config.pairs[0].jitter if config.pairs else 0.0
    return {
        "pairs": len(config.pairs),
        "max_concurrency": config.api.max_concurrency,
        "interval_seconds": interval,
        "jitter_seconds": jitter,
        "config_load_seconds": round(config_seconds, 3),
        "scheduler_start_seconds": round(start_seconds, 3),
        "first_ping_after_launch_seconds": round(min(r[2] for r in rows) - args.launched, 3) if rows else None,
        "first_ping_after_scheduler_start_seconds": round(min(r[2] for r in rows) - started_wall, 3) if rows else None,
        "window_seconds": round(window, 3),
        "pings": len(rows),
        "pings_per_second": round(len(rows) / window, 3),
        "target_pings_per_second": round(len(config.pairs) / interval, 3),
        "results": dict(Counter(r[3] for r in rows)),
        "miss_causes": dict(Counter(r[5] for r in rows if r[5])),
        "lateness_seconds": percentiles(lateness),
        "overdue_at_end": {"count": len(overdue), "max_seconds": max(overdue) if overdue else 0.0},
        "ping_duration_seconds": percentiles(durations),
        **lapses([(r[0], r[2], r[3]) for r in rows], ttl),
        "healthz_at_end": {"ok": healthy[0], "why": healthy[1]},
        "inflight_abandoned_at_stop": left,
        "rss_mb": {k: round(v, 1) for k, v in memory.items()},
    }


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The seed's loop, on the config scaled by `args.scale`, for `args.seconds`."""
    config = load_config(args.config).scaled(args.scale)
    client = make_client(args.base_url, args.api_key, 30.0)
    pairs = config.pairs
    interval = pairs[0].interval
    ttl = pairs[0].ttl_seconds
    began = time.monotonic()
    end = began + args.seconds
    rows: list[tuple[str, float, str]] = []
    latencies: list[float] = []
    sweeps: list[float] = []
    errors = 0
    while time.monotonic() < end:
        sweep_began = time.monotonic()
        finished = True
        for pair in pairs:
            if time.monotonic() >= end:
                finished = False
                break
            attempt = send_ping(client, pair, 1)
            rows.append((pair.key, attempt.started_wall, classify(attempt.usage).value))
            latencies.append(attempt.latency)
            errors += attempt.error is not None
        if finished:
            sweeps.append(time.monotonic() - sweep_began)
        # Start to start every interval: the kindest reading of "every 4 minutes". A loop that
        # sleeps a full interval after each sweep would lapse even sooner.
        pause = sweep_began + interval - time.monotonic()
        if pause > 0:
            time.sleep(min(pause, max(0.0, end - time.monotonic())))
    elapsed = time.monotonic() - began
    # A sweep's length in API seconds (the scale undone): measured, or, when none finished in
    # the window (no pause was taken then), extrapolated from the pings that were sent.
    per_ping = sweeps[0] / len(pairs) if sweeps else elapsed / max(len(rows), 1)
    sweep_api = per_ping * len(pairs) / args.scale
    summary = lapses(rows, ttl)
    return {
        "pairs": len(pairs),
        "scale": args.scale,
        "window_seconds": round(elapsed, 3),
        "pings": len(rows),
        "errors": errors,
        "results": dict(Counter(r[2] for r in rows)),
        "sweeps_completed": len(sweeps),
        "sweep_seconds_in_api_time": round(sweep_api, 1),
        "sweep_measured": bool(sweeps),
        "seconds_per_ping_in_api_time": round(per_ping / args.scale, 4),
        "ping_latency_seconds": percentiles(latencies),
        **summary,
        "max_gap_seconds_in_api_time": None if summary["max_gap_seconds"] is None
        else round(summary["max_gap_seconds"] / args.scale, 1),
        "ttl_seconds_in_api_time": round(ttl / args.scale, 1),
        "lapses_every_sweep": sweep_api > ttl / args.scale,
    }


def main(argv: list[str] | None = None) -> int:
    """Run one worker and write its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("keepwarm", "baseline"))
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--api-key", default="sk-bench-0000")
    parser.add_argument("--launched", type=float, default=time.time(), help="wall time the process was started")
    parser.add_argument("--scale", type=float, default=1.0, help="baseline: the time scale of config and emulator")
    parser.add_argument("--base-url", default=None, help="baseline: the emulator")
    args = parser.parse_args(argv)
    figures = run_keepwarm(args) if args.role == "keepwarm" else run_baseline(args)
    args.result.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
