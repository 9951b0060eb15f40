"""What one observation costs the daemon's interpreter: in-process, no HTTP, no other process.

    python3 bench/observation_cost.py [--runs 7] [--label after] [--out bench/results/observation-cost.json]

The configuration of `bench/observations.py` (1,000 pairs: 500 experts on claude-sonnet-4-6 and
claude-haiku-4-5), an `Observer` wired to a real `Scheduler` (its pairs applied, its policies
built, its APScheduler not started: no ping runs, so the figure is the observations' alone) as
the daemon wires them, and no ledger. Bodies are built up front, as the HTTP bench's client
does: warm reads of random configured pairs dated two TTLs back. Each is handed to
`Observer.post` with its headers, so the figure covers parsing, validation, attribution, the
counters and the scheduler's touches, everything the daemon's interpreter does for a request
except the HTTP server's own work.

- batch: requests of 1,000 observations; the figure is µs per observation.
- single: requests of one observation each; the figure is µs per request.

Each run times 40 batches (40,000 observations) and 4,000 singles, in wall and in CPU time;
the figures are the medians of `--runs` runs. The target (issue 12): at most 25 µs per observation in batches, so that
5,000 observations a second cost an eighth of one core. Results are merged into the output file
under `--label`, so the same file holds the code before a change and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import observations as http_bench  # noqa: E402 - the HTTP bench's config and observations

from keepwarm import daemon  # noqa: E402
from keepwarm.config import load_config  # noqa: E402
from keepwarm.metrics import Metrics  # noqa: E402
from keepwarm.observations import Observer  # noqa: E402
from keepwarm.ping import make_client  # noqa: E402
from keepwarm.runner import Runner  # noqa: E402
from keepwarm.scheduler import Scheduler  # noqa: E402

PAIRS = 1000
BATCH = 1000
BATCHES_PER_RUN = 40
SINGLES_PER_RUN = 4000
STALE = 600.0  # two TTLs back, as in bench/observations.py: no observation moves a ping


def build() -> Observer:
    """The daemon's observer and scheduler over the HTTP bench's 1,000 pairs, not started."""
    directory = Path(tempfile.mkdtemp(prefix="keepwarm-observation-cost-"))
    config = load_config(http_bench.write_config(directory, PAIRS, 9, 9, 60))
    metrics = Metrics()
    runner = Runner(make_client("http://127.0.0.1:9", "sk-unused", 5), config.prices, metrics, threading.Event())
    scheduler = Scheduler(runner, metrics, prices=config.prices)
    scheduler.apply(config.pairs)
    wiring: dict[str, Any] = {"touch": scheduler.touch}
    # As keepwarm.daemon wires it. The code before the batched touches had `touch` only; the
    # script measures both, so a checkout of the older code can be measured with it.
    if hasattr(scheduler, "touch_many"):
        wiring["touch_many"] = scheduler.touch_many
    observer = Observer(config, metrics, **wiring)
    freeze = getattr(daemon, "freeze_heap", None)  # as the daemon does once started (newer code only)
    if freeze is not None:
        freeze()
    return observer


def bodies(batch: int, count: int, rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(count):
        items = [http_bench.observation(PAIRS, time.time() - STALE, rng) for _ in range(batch)]
        out.append(json.dumps(items[0] if batch == 1 else {"observations": items}).encode())
    return out


def timed(observer: Observer, requests: list[bytes], n: int) -> tuple[float, float]:
    """Seconds (wall, CPU) for `n` requests cycling through `requests`; every answer must accept everything."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        body = requests[i % len(requests)]
        status, doc = observer.post(None, str(len(body)), lambda _n, body=body: body)
        if status != 202 or doc["rejected"]:
            raise RuntimeError(f"unexpected answer {status}: {str(doc)[:300]}")
    return time.perf_counter() - start, time.process_time() - cpu


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--", "../keepwarm"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out + ("+uncommitted changes in keepwarm/" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--label", default="current")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "observation-cost.json")
    args = parser.parse_args()

    load_start = os.getloadavg()
    observer = build()
    rng = random.Random(7)
    batches, singles = bodies(BATCH, 20, rng), bodies(1, 200, rng)
    timed(observer, batches, 5)  # warm-up: every pair's series exists, the code paths are hot
    timed(observer, singles, 500)
    batch_us, single_us, batch_cpu, single_cpu = [], [], [], []
    for _ in range(args.runs):
        wall, cpu = timed(observer, batches, BATCHES_PER_RUN)
        batch_us.append(wall / (BATCHES_PER_RUN * BATCH) * 1e6)
        batch_cpu.append(cpu / (BATCHES_PER_RUN * BATCH) * 1e6)
        wall, cpu = timed(observer, singles, SINGLES_PER_RUN)
        single_us.append(wall / SINGLES_PER_RUN * 1e6)
        single_cpu.append(cpu / SINGLES_PER_RUN * 1e6)
    result = {
        "commit": git_commit(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # Wall time: what a request holds the daemon's interpreter for, its `sleep(0)`s included
        # (each gives the pings the lock for ~60 us); CPU time: the share of a core it costs.
        "batch_us_per_observation": round(statistics.median(batch_us), 2),
        "single_us_per_request": round(statistics.median(single_us), 2),
        "batch_cpu_us_per_observation": round(statistics.median(batch_cpu), 2),
        "single_cpu_us_per_request": round(statistics.median(single_cpu), 2),
        "batch_runs_us": [round(x, 2) for x in batch_us],
        "single_runs_us": [round(x, 2) for x in single_us],
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in load_start],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    print(f"{args.label}: batch {result['batch_us_per_observation']} us/observation "
          f"({result['batch_cpu_us_per_observation']} CPU), "
          f"single {result['single_us_per_request']} us/request ({result['single_cpu_us_per_request']} CPU) "
          f"(median of {args.runs}; load {result['machine']['load_average_at_start'][0]})")
    doc: dict[str, Any] = {}
    if args.out.exists():
        doc = json.loads(args.out.read_text())
    doc.setdefault("about", "bench/observation_cost.py: in-process cost of POST /v1/observations, no HTTP, "
                            "1,000 pairs, no ledger; medians of several runs")
    doc.setdefault("runs", {})[args.label] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
