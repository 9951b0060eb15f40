"""What the daemon's per-pair state costs in heap, by allocation site (tracemalloc).

    python3 bench/memory_per_pair.py [--pairs 10000] [--pings 2]

Builds N pairs (N/2 experts x 2 models, a 9 kB prompt each) with a real `Scheduler` and
`Observer` wired as the daemon wires them (unstarted: no thread, no HTTP), then feeds every pair
`--pings` finished pings as the scheduler's job hands them over. Prints the heap added by the
set-up and by the pings, with the allocation sites that added most, and writes them to
bench/results/memory-per-pair.json. The daemon's RSS is bench/scale.py's; this says where the
per-pair part of it goes.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keepwarm.classify import Result  # noqa: E402 - after the path set-up
from keepwarm.config import parse_config  # noqa: E402
from keepwarm.metrics import Metrics  # noqa: E402
from keepwarm.observations import Observer  # noqa: E402
from keepwarm.ping import PingAttempt, make_client  # noqa: E402
from keepwarm.runner import PingOutcome, Runner  # noqa: E402
from keepwarm.scheduler import Scheduler  # noqa: E402

RESULT = ROOT / "bench" / "results" / "memory-per-pair.json"


def grown(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int) -> dict[str, Any]:
    """Heap added between two snapshots, in all and by the sites that added most."""
    stats = after.compare_to(before, "lineno")
    sites = [
        {"site": str(s.traceback[0]).replace(str(ROOT) + "/", ""), "mb": round(s.size_diff / 1e6, 2),
         "allocations": s.count_diff}
        for s in stats[:top]
    ]
    return {"mb": round(sum(s.size_diff for s in stats) / 1e6, 2), "top_sites": sites}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--pings", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()

    doc = {"defaults": {"models": ["claude-sonnet-4-6", "claude-haiku-4-5"]},
           "experts": [{"name": f"e{i:05d}", "system": [{"text": "x" * 9000 + str(i)}]} for i in range(args.pairs // 2)]}
    config = parse_config(doc, Path(tempfile.mkdtemp()))
    metrics = Metrics()
    runner = Runner(make_client("http://127.0.0.1:9", "sk-bench", 5), config.prices, metrics, threading.Event())
    scheduler = Scheduler(runner, metrics, prices=config.prices)
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.take_snapshot()
    scheduler.apply(config.pairs)
    observer = Observer(config, metrics, touch_many=scheduler.touch_many)
    gc.collect()
    built = tracemalloc.take_snapshot()
    now = time.time()
    for k in range(args.pings):
        for key, state in list(scheduler.states.items()):
            at = now + k * 240
            outcome = PingOutcome(state.pair, Result.WARM, at, 0.4, (PingAttempt(at, 0.4, None, None),), None, None,
                                  at + 300)
            scheduler._record_ping(key, state, outcome)  # what the job does with a finished ping
            observer.ping(state.pair, at, Result.WARM, 0.001)
    gc.collect()
    pinged = tracemalloc.take_snapshot()
    # What one empty collections.deque costs, the reason per-pair state avoids one per pair.
    before_deques = tracemalloc.take_snapshot()
    deques = [collections.deque() for _ in range(10_000)]
    after_deques = tracemalloc.take_snapshot()
    deque_bytes = round(grown(before_deques, after_deques, 1)["mb"] * 1e6 / len(deques))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result = {
        "command": "python3 bench/memory_per_pair.py " + " ".join(sys.argv[1:]),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit.stdout.strip(),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "pairs": args.pairs,
        "pings_per_pair": args.pings,
        "set_up": grown(start, built, args.top),
        "pings": grown(built, pinged, args.top),
        "one_empty_deque_bytes": deque_bytes,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
