"""Observation throughput of `POST /v1/observations` while the daemon pings 1,000 pairs.

    python3 bench/observations.py [--pairs 1000] [--interval 60] [--seconds 30]

Starts `keepwarm emulator` and `keepwarm run` (two processes, as deployed) on loopback, with
every pair pinged every `--interval` seconds (a 5m TTL, so 1,000 pairs at 60 s are 16.7 pings/s,
four times the load of 1,000 pairs at the default 4m), lets every pair be pinged once, then
runs three windows of `--seconds` each:

1. quiet: pings only, the reference for ping lateness;
2. batches at the target: one client thread POSTs 5 batches of 1,000 observations a second;
3. singles at the target: four client threads POST 500 single observations a second;
4. batches flat out: batches of 1,000 back to back (the throughput ceiling);
5. singles flat out: four threads, one observation per request, back to back.

The paced windows say whether pings stay on time at the target load; the flat-out ones saturate
the machine (client, daemon and emulator share its two cores), so their lateness shows what
saturation costs, not what the target costs. It reports observations/s and requests/s from the
client's side (every answer must be a 202 with
everything accepted), and the daemon's ping lateness p99 in each window from its own
`keepwarm_ping_lateness_seconds` histogram (so at bucket resolution). The observations are real
warm reads of configured pairs, dated two TTLs back: they are validated, classified, priced,
counted and attributed like any other, but being older than each pair's last ping they move no
ping (a fed touch older than the last ping changes nothing), so the ping load stays that of
1,000 pairs throughout. No ledger (its SQLite commit per request is not measured here). The
client runs on the same machine and takes CPU from the daemon: the figures are a lower bound.
Results go to bench/results/observations.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT = REPO / "bench" / "results" / "observations.json"
MODELS = ("claude-sonnet-4-6", "claude-haiku-4-5")
_BUCKET = re.compile(r'^keepwarm_ping_lateness_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)
_PINGS = re.compile(r'^keepwarm_pings_total\{[^}]*\} (\S+)$', re.M)
_SKIPPED = re.compile(r'^keepwarm_pings_skipped_total\{[^}]*\} (\S+)$', re.M)
_ACCEPTED = re.compile(r'^keepwarm_production_requests_total\{[^}]*\} (\S+)$', re.M)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(directory: Path, pairs: int, emulator_port: int, metrics_port: int, interval: float) -> Path:
    # ~22 kB shared: above the 4,096-token minimum of claude-haiku-4-5 (a token per 4 bytes).
    (directory / "shared.md").write_text("You are one of many careful analysts. Cite sources. " * 420)
    experts = [
        {"name": f"expert-{i:04d}", "system": [{"file": "shared.md"}, {"text": f"You are analyst {i}."}],
         "models": list(MODELS)}
        for i in range((pairs + 1) // 2)
    ]
    doc = {
        "api": {"base_url": f"http://127.0.0.1:{emulator_port}"},
        "defaults": {"interval": f"{interval:g}s", "jitter": "1s"},
        "experts": experts,
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }
    path = directory / "keepwarm.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return path


def scrape(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def lateness(text: str) -> tuple[list[tuple[float, float]], float]:
    buckets = [(float(le), float(v)) for le, v in _BUCKET.findall(text)]
    return buckets, sum(float(v) for v in _PINGS.findall(text))


def p99(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> dict[str, Any]:
    """The p99 of the pings between two scrapes, as the upper bound of its histogram bucket."""
    deltas = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
    count = deltas[-1][1] if deltas else 0.0
    bound = next((le for le, n in deltas if n >= 0.99 * count), float("inf")) if count else None
    return {"pings": count, "p99_at_most_seconds": bound}


def post(port: int, body: bytes) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/observations", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    doc: dict[str, Any] = json.loads(resp.read())
    conn.close()
    if resp.status != 202 or doc["rejected"]:
        raise RuntimeError(f"unexpected answer {resp.status}: {str(doc)[:300]}")
    return doc


def observation(pairs: int, at: float, rng: random.Random) -> dict[str, Any]:
    i = rng.randrange(pairs)
    return {"expert": f"expert-{i // 2:04d}", "model": MODELS[i % 2], "at": at,
            "usage": {"input_tokens": 40, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5600,
                      "output_tokens": 300}}


def load(port: int, seconds: float, threads: int, batch: int, pairs: int, stale: float,
         rate: float | None = None) -> dict[str, Any]:
    """POST for `seconds` from `threads` threads, `batch` observations a request (1: a bare one),
    as fast as answers come, or at most `rate` requests a second in all."""
    rng = random.Random(7)
    # Bodies are built up front: the client's JSON encoding should not be what is measured.
    bodies = []
    for _ in range(20):
        items = [observation(pairs, time.time() - stale, rng) for _ in range(batch)]
        bodies.append(json.dumps(items[0] if batch == 1 else {"observations": items}).encode())
    counts = [0] * threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    end = time.monotonic() + seconds

    def worker(k: int) -> None:
        n = 0
        gap = threads / rate if rate else 0.0
        due = time.monotonic() + k * gap / threads
        while time.monotonic() < end:
            if gap:
                due += gap
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            t0 = time.perf_counter()
            post(port, bodies[n % len(bodies)])
            latencies[k].append(time.perf_counter() - t0)
            n += 1
        counts[k] = n

    began = time.monotonic()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    window = time.monotonic() - began
    requests = sum(counts)
    ordered = sorted(x for per in latencies for x in per)
    return {
        "threads": threads,
        "batch": batch,
        "paced_requests_per_second": rate,
        "window_seconds": round(window, 3),
        "requests": requests,
        "requests_per_second": round(requests / window, 1),
        "observations_per_second": round(requests * batch / window, 1),
        "request_latency_p50_ms": round(ordered[len(ordered) // 2] * 1000, 2) if ordered else None,
        "request_latency_p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 2) if ordered else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between two pings of a pair")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--result", type=Path, default=RESULT)
    args = parser.parse_args(argv)

    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-bench-observations", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        eport, mport = free_port(), free_port()
        config = write_config(directory, args.pairs, eport, mport, args.interval)
        emulator = subprocess.Popen(
            [sys.executable, "-m", "keepwarm", "emulator", "--port", str(eport)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        daemon: subprocess.Popen[str] | None = None
        try:
            assert emulator.stdout is not None and emulator.stdout.readline().startswith("listening on")
            with open(directory / "daemon.log", "w") as logfile:
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "keepwarm", "run", "--config", str(config)],
                    env=env, stdout=logfile, stderr=logfile, text=True)
            deadline = time.monotonic() + 60
            while True:
                try:
                    scrape(mport)
                    break
                except OSError:
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise RuntimeError((directory / "daemon.log").read_text()[-2000:]) from None
                    time.sleep(0.2)
            interval, ttl = args.interval, 300.0
            print(f"warming {args.pairs} pairs for one interval ({interval:.0f}s)", flush=True)
            time.sleep(interval + 5)
            windows: dict[str, Any] = {}
            plan: list[tuple[str, int, int, float | None]] = [
                ("quiet", 0, 0, None),
                ("batches_at_target", 1, 1000, 5.0),  # 5,000 observations/s
                ("singles_at_target", 4, 1, 500.0),
                ("batches_flat_out", 1, 1000, None),
                ("singles_flat_out", 4, 1, None),
            ]
            for name, threads, batch, rate in plan:
                before = lateness(scrape(mport))
                if threads:
                    windows[name] = load(mport, args.seconds, threads, batch, args.pairs, 2 * ttl, rate)
                else:
                    time.sleep(args.seconds)
                    windows[name] = {}
                after_text = scrape(mport)
                after = lateness(after_text)
                windows[name]["ping_lateness"] = p99(before[0], after[0])
                windows[name]["ping_lateness"]["pings_per_second"] = round((after[1] - before[1]) / args.seconds, 1)
                print(name, json.dumps(windows[name]), flush=True)
            final = scrape(mport)
            result = {
                "command": "python3 bench/observations.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                            "note": "shared with other users' jobs; compare the windows with each other"},
                "pairs": args.pairs,
                "interval_seconds": interval,
                "windows": windows,
                "production_requests_counted": sum(float(v) for v in _ACCEPTED.findall(final)),
                "pings_skipped": sum(float(v) for v in _SKIPPED.findall(final)),
                "targets": {"observations_per_second_in_batches": 5000, "single_requests_per_second": 500},
            }
        finally:
            for proc in (daemon, emulator):
                if proc is not None:
                    proc.terminate()
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
