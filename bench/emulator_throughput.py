"""How many keepalive pings per second the emulator answers.

Starts `serve()` in a subprocess (on a small machine the client and the server then share the
cores the way they would in a real test run, instead of sharing one interpreter lock), drives it
from N threads, each with its own keep-alive `http.client.HTTPConnection`, sending the body a
keepalive ping sends: a ~5,000-token system prompt with a `cache_control` breakpoint, a short
user message, `max_tokens: 1`. Prints requests/second and latency percentiles and writes them,
with a description of the machine, to bench/results/emulator_throughput.json.

A second, shorter phase sends bodies that differ after the breakpoint (as production traffic
does), which defeats the emulator's per-body memo and measures its full analysis path.

    python3 bench/emulator_throughput.py [--threads 4] [--duration 10] [--max-requests 100000]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "bench" / "results" / "emulator_throughput.json"
MODEL = "claude-sonnet-4-6"
SYSTEM_TOKENS = 5000
# Replaced by a request counter in the distinct-bodies phase: same length, so no re-encoding.
_COUNTER = b"0000000000"

_PARAGRAPH = (
    "You are the chief economist of a mid-sized logistics company. You answer questions about "
    "freight rates, fuel surcharges, warehouse utilisation and demand forecasts with care, cite "
    "the internal data tables you are given, state your assumptions, and say plainly when the "
    "data cannot answer a question. "
)


def ping_body(user_text: str = "ping") -> bytes:
    """The JSON body of one keepalive ping, encoded once and reused."""
    repeats = SYSTEM_TOKENS * 4 // len(_PARAGRAPH) + 1
    system_text = (_PARAGRAPH * repeats)[: SYSTEM_TOKENS * 4]
    body = {
        "model": MODEL,
        "max_tokens": 1,
        "system": [{"type": "text", "text": system_text, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": user_text}],
    }
    return json.dumps(body).encode("utf-8")


def start_server() -> tuple[subprocess.Popen[str], int]:
    """The emulator in a child process, and the port it chose."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import sys; from keepwarm.emulator import serve; sys.exit(serve(0, 1.0, None))"
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    assert process.stdout is not None
    first = process.stdout.readline().strip()
    prefix = "listening on http://127.0.0.1:"
    if not first.startswith(prefix):
        process.kill()
        raise SystemExit(f"unexpected first line from the emulator: {first!r}")
    return process, int(first[len(prefix) :])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], check=False, capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        nproc = os.cpu_count() or 0
    return {
        "node": platform.node(),
        "nproc": nproc,
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def drive(
    port: int, body: bytes, threads: int, duration: float, max_requests: int, distinct: bool = False
) -> dict[str, Any]:
    """Send pings from `threads` keep-alive connections until the time or the count runs out;
    with `distinct`, `body` holds `_COUNTER`, replaced by a different number each time."""
    headers = {
        "content-type": "application/json",
        "x-api-key": "sk-bench-0000",
        "anthropic-version": "2023-06-01",
    }
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    issued = [0]
    lock = threading.Lock()
    start_gate = threading.Event()
    deadline = [0.0]

    def worker(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine = latencies[index]
        start_gate.wait()
        while time.perf_counter() < deadline[0]:
            with lock:
                if issued[0] >= max_requests:
                    break
                issued[0] += 1
                number = issued[0]
            payload = body.replace(_COUNTER, b"%010d" % number) if distinct else body
            sent = time.perf_counter()
            try:
                connection.request("POST", "/v1/messages", body=payload, headers=headers)
                response = connection.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            if ok:
                mine.append(time.perf_counter() - sent)
            else:
                errors[index] += 1
        connection.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + duration
    start_gate.set()
    for thread in workers:
        thread.join()
    elapsed = time.perf_counter() - began

    all_latencies = sorted(value for mine in latencies for value in mine)
    completed = len(all_latencies)

    def percentile(fraction: float) -> float:
        return all_latencies[min(completed - 1, int(fraction * completed))] * 1000 if completed else 0.0

    return {
        "requests": completed,
        "errors": sum(errors),
        "elapsed_seconds": round(elapsed, 3),
        "requests_per_second": round(completed / elapsed, 1),
        "latency_ms": {
            "p50": round(percentile(0.50), 3),
            "p99": round(percentile(0.99), 3),
            "mean": round(statistics.fmean(all_latencies) * 1000, 3) if completed else 0.0,
        },
    }


def measured(pid: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one phase and add the server's CPU time per request to its result."""
    before = cpu_seconds(pid)
    result = run()
    used = cpu_seconds(pid) - before
    result["server_cpu_ms_per_request"] = (
        round(used * 1000 / result["requests"], 3) if result["requests"] else None
    )
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when the target rate was reached, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument(
        "--distinct-duration", type=float, default=5.0, help="seconds of the distinct-bodies phase"
    )
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--target", type=float, default=1000.0, help="requests/second to reach")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    body = ping_body()
    # Other work on the machine skews the figure: record how busy it was when we started.
    load_before = os.getloadavg()
    process, port = start_server()
    try:
        # One ping first, so every measured request is a cache read (what a keepalive does).
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        warm.request("POST", "/v1/messages", body=body, headers={"x-api-key": "sk-bench-0000"})
        usage = json.loads(warm.getresponse().read())["usage"]
        warm.close()
        result = measured(process.pid, lambda: drive(port, body, args.threads, args.duration, args.max_requests))
        distinct_body = ping_body("ping " + _COUNTER.decode())
        distinct = measured(
            process.pid,
            lambda: drive(
                port, distinct_body, args.threads, args.distinct_duration, args.max_requests, True
            ),
        )
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = process.wait(timeout=10)
    report = {
        "benchmark": "emulator_throughput",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {**machine(), "load_average_at_start": [round(x, 2) for x in load_before]},
        "setup": {
            "server": "keepwarm.emulator.serve() in a subprocess",
            "client_threads": args.threads,
            "keep_alive": True,
            "duration_limit_seconds": args.duration,
            "request_limit": args.max_requests,
            "request_body_bytes": len(body),
            "system_prompt_tokens": SYSTEM_TOKENS,
            "max_tokens": 1,
            "first_ping_usage": usage,
        },
        "result": result,
        "distinct_bodies_result": distinct,
        "target_requests_per_second": args.target,
        "server_exit_code": exit_code,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")

    latency = result["latency_ms"]
    print(
        f"{result['requests_per_second']:.0f} requests/s over {result['elapsed_seconds']} s "
        f"({result['requests']} requests, {result['errors']} errors, {args.threads} threads); "
        f"latency p50 {latency['p50']} ms, p99 {latency['p99']} ms; "
        f"server CPU {result['server_cpu_ms_per_request']} ms/request"
    )
    print(
        f"distinct bodies: {distinct['requests_per_second']:.0f} requests/s, "
        f"p50 {distinct['latency_ms']['p50']} ms, p99 {distinct['latency_ms']['p99']} ms; "
        f"server CPU {distinct['server_cpu_ms_per_request']} ms/request"
    )
    print(f"written to {args.output}")
    return 0 if result["requests_per_second"] >= args.target and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
