"""Scale: keepwarm holding N caches warm on one machine, beside the naive loop it replaces.

    python3 bench/scale.py --pairs 100,1000,10000 [--seconds 270] [--latency 1.0]

For each N it starts the emulator in its own process (so it does not share the daemon's
interpreter lock), generates a config of N pairs (N/2 experts x 2 models, each prompt one
shared 23 kB file plus a line of its own, so every pair is its own cache), and runs side by side:

- keepwarm, in real time: 4m interval, 5m TTL, 10s jitter, so it pings at the real rate of
  N/240 per second. `bench/scale_workers.py keepwarm` wires the daemon as keepwarm.daemon does,
  and /metrics is scraped every 30 s as the ServiceMonitor would. The config sets no
  `api.max_concurrency`, so keepwarm sizes its workers from the pairs as a user's daemon does
  (keepwarm.config.auto_concurrency); `--concurrency` sets it explicitly instead, and the
  report says which;
- the baseline, the seed's approach: one loop pinging every pair one after another, once per
  interval, through the same SDK client. It is latency-bound, so it runs with interval, TTL and
  API latency all scaled by --baseline-scale (its own emulator with that time scale): the same
  outcome in a fifth of the time.

Every answer takes --latency seconds (injected in the emulator: loopback answers in 1 ms, the
real API does not). Then, unless --few-workers-seconds is 0, the largest N runs once more with
`api.max_concurrency: 8` set explicitly (the default before it followed the pairs), labelled as
such in the report. `--daemon-env KEY=VALUE` passes an environment variable to the keepwarm
daemon's process only (e.g. MALLOC_ARENA_MAX=2, as systemd/keepwarm.service and the Dockerfile
set it). Figures go to bench/results/scale.json; docs/performance.md explains them.
Only 127.0.0.1 is used; every process started is stopped, and each phase has a deadline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKERS = REPO / "bench" / "scale_workers.py"
DEFAULT_OUTPUT = REPO / "bench" / "results" / "scale.json"
MODELS = ("claude-sonnet-4-6", "claude-haiku-4-5")
# Above claude-haiku-4-5's 4,096-token minimum (the emulator counts 4 bytes a token).
PROMPT_BYTES = 23_000
# Setup (config load, 10,000 pairs scheduled) and shutdown, on top of the window.
SLACK_SECONDS = 180.0
# The explicit-worker comparison: api.max_concurrency's default before it followed the pairs.
OLD_DEFAULT_WORKERS = 8

_PARAGRAPH = (
    "You are one desk of a research department. You answer questions about markets, prices and "
    "forecasts with numbers, their sources and their uncertainty; you state your assumptions, cite "
    "the tables you are given, and say plainly when the evidence cannot answer the question. "
)


# --- the machine and its processes -----------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "node": platform.node(),
        "nproc": int(nproc) if nproc.isdigit() else os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(int(memory) / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def tree() -> dict[str, Any]:
    """Which keepwarm was measured: the commit, and any uncommitted change to the package."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "keepwarm")
    return {"commit": git("rev-parse", "HEAD") or None, "uncommitted": changed.splitlines() if changed else []}


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM: the peak so far) of a process, in MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            found[line[:5]] = int(line.split()[1]) / 1024
    return found.get("VmRSS", math.nan), found.get("VmHWM", math.nan)


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of a child, or an error naming what it printed instead."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise RuntimeError(f"no output from {process.args!r} within {timeout:.0f} s")
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"{process.args!r} exited with {process.wait(10)} before it was ready")
    return line.strip()


class Processes:
    """Every child this benchmark starts, so each is stopped whatever happens."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[str]] = []

    def start(self, args: list[str], extra_env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
        """Start a child on this tree's keepwarm, with `extra_env` added to this process's environment."""
        env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
        process = subprocess.Popen(args, text=True, cwd=REPO, env=env, **kwargs)
        self.children.append(process)
        return process

    def stop(self, process: subprocess.Popen[str], timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def stop_all(self) -> None:
        """Stop whatever is still running."""
        for process in self.children:
            self.stop(process)
        self.children.clear()


def start_emulator(processes: Processes, time_scale: float, latency: float) -> tuple[subprocess.Popen[str], str]:
    """An emulator in its own process whose every answer takes `latency` seconds."""
    process = processes.start(
        [sys.executable, "-m", "keepwarm", "emulator", "--port", "0", "--time-scale", str(time_scale)],
        stdout=subprocess.PIPE,
    )
    url = read_line(process, 30).removeprefix("listening on ")
    if latency > 0:
        fault = json.dumps({"kind": "latency", "latency": latency, "count": None}).encode()
        request = urllib.request.Request(f"{url}/_emulator/faults", data=fault, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    return process, url


# --- the config ----------------------------------------------------------------------------


def write_config(directory: Path, pairs: int, base_url: str, max_concurrency: int | None) -> Path:
    """A config of `pairs` pairs: ceil(pairs/2) experts on two models, one shared prompt file.

    `max_concurrency` None leaves `api.max_concurrency` out, so keepwarm sizes it from the pairs.
    """
    prompt = directory / "shared-prompt.md"
    if not prompt.exists():
        prompt.write_text((_PARAGRAPH * (PROMPT_BYTES // len(_PARAGRAPH) + 1))[:PROMPT_BYTES] + "\n")
    lines = ["api:", f"  base_url: {base_url}"]
    if max_concurrency is not None:
        lines.append(f"  max_concurrency: {max_concurrency}")
    lines += [
        "defaults:",
        f"  models: [{', '.join(MODELS)}]",
        "  ttl: 5m",
        "  interval: 4m",
        "  jitter: 10s",
        "metrics:",
        "  listen: 127.0.0.1:0",
        "experts:",
    ]
    experts = math.ceil(pairs / 2)
    for i in range(experts):
        lines += [
            f"  - name: desk-{i:05d}",
            "    system:",
            "      - file: shared-prompt.md",
            # The line of its own makes each expert's prefix, hence its cache, distinct.
            f'      - text: "You speak for desk {i:05d} only."',
        ]
        if i == experts - 1 and pairs % 2:
            lines.append(f"    models: [{MODELS[0]}]")
    path = directory / f"keepwarm-{pairs}-{workers_label(max_concurrency)}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def workers_label(max_concurrency: int | None) -> str:
    """`auto` when keepwarm sizes its workers itself, else the explicit count."""
    return "auto" if max_concurrency is None else str(max_concurrency)


# --- one run -------------------------------------------------------------------------------


class Monitor(threading.Thread):
    """Samples a process's memory and CPU every second and scrapes its /metrics now and then."""

    def __init__(self, pid: int, port: int, scrape_every: float, emulator_pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.port, self.scrape_every, self.emulator_pid = pid, port, scrape_every, emulator_pid
        self.done = threading.Event()
        self.rss: list[float] = []
        self.peak = 0.0
        self.cpu = self.cpu_start = cpu_seconds(pid)
        self.emulator_cpu_start = self.emulator_cpu = cpu_seconds(emulator_pid)
        self.began = self.ended = time.monotonic()
        self.scrapes: list[dict[str, Any]] = []
        self._scraper = threading.Thread(target=self._scrape_loop, daemon=True)

    def run(self) -> None:
        """Sample until told to stop or the process is gone."""
        self._scraper.start()
        while not self.done.wait(1.0):
            try:
                rss, peak = memory_mb(self.pid)
                self.cpu = cpu_seconds(self.pid)
                self.emulator_cpu = cpu_seconds(self.emulator_pid)
            except (OSError, ValueError, IndexError):
                break
            self.rss.append(rss)
            self.peak = max(self.peak, peak)
            self.ended = time.monotonic()

    def _scrape_loop(self) -> None:
        # One scrape at a time, like Prometheus; a slow one delays the next.
        while not self.done.wait(self.scrape_every):
            began = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=120) as response:
                    size = len(response.read())
                status = response.status
            except OSError as exc:
                size, status = 0, f"failed: {exc}"
            self.scrapes.append({"seconds": round(time.perf_counter() - began, 3), "bytes": size, "status": status})

    def summary(self) -> dict[str, Any]:
        """Memory and CPU over the window, and the scrapes."""
        window = max(self.ended - self.began, 1e-9)
        scrape_seconds = [s["seconds"] for s in self.scrapes if s["status"] == 200]
        return {
            "rss_mb_median": round(statistics.median(self.rss), 1) if self.rss else None,
            "rss_mb_max_sampled": round(max(self.rss), 1) if self.rss else None,
            "rss_mb_peak": round(self.peak, 1),
            # The highest sample of each minute: whether the level settles or keeps rising.
            "rss_mb_max_by_minute": [round(max(self.rss[i:i + 60]), 1) for i in range(0, len(self.rss), 60)],
            "cpu_seconds_in_window": round(self.cpu - self.cpu_start, 2),
            "cpu_percent_of_one_core": round(100 * (self.cpu - self.cpu_start) / window, 1),
            "emulator_cpu_percent_of_one_core": round(100 * (self.emulator_cpu - self.emulator_cpu_start) / window, 1),
            "scrapes": {
                "count": len(self.scrapes),
                "ok": len(scrape_seconds),
                "seconds_median": round(statistics.median(scrape_seconds), 3) if scrape_seconds else None,
                "seconds_max": max(scrape_seconds) if scrape_seconds else None,
                "bytes": self.scrapes[-1]["bytes"] if self.scrapes else None,
                "failures": [s["status"] for s in self.scrapes if s["status"] != 200][:3],
            },
        }


def run_keepwarm(
    processes: Processes, workdir: Path, pairs: int, concurrency: int | None, seconds: float, latency: float,
    scrape_every: float, daemon_env: dict[str, str],
) -> dict[str, Any]:
    """keepwarm with `pairs` pairs in real time against its own emulator; its figures.

    `concurrency` None: no `api.max_concurrency` in the config, keepwarm's own default.
    """
    emulator, url = start_emulator(processes, 1.0, latency)
    config = write_config(workdir, pairs, url, concurrency)
    label = workers_label(concurrency)
    result = workdir / f"keepwarm-{pairs}-{label}.json"
    log = workdir / f"keepwarm-{pairs}-{label}.log"
    try:
        with log.open("w") as stderr:
            launched = time.time()
            worker = processes.start(
                [sys.executable, str(WORKERS), "keepwarm", "--config", str(config), "--seconds", str(seconds),
                 "--launched", repr(launched), "--result", str(result), "--api-key", f"sk-bench-kw-{pairs}"],
                extra_env=daemon_env, stdout=subprocess.PIPE, stderr=stderr,
            )
            port = int(read_line(worker, SLACK_SECONDS).split()[-1])
            monitor = Monitor(worker.pid, port, scrape_every, emulator.pid)
            monitor.start()
            try:
                worker.wait(seconds + SLACK_SECONDS)
            finally:
                monitor.done.set()
                monitor.join(10)
            code = processes.stop(worker)
        figures: dict[str, Any] = json.loads(result.read_text()) if result.exists() else {"error": f"exit {code}"}
        figures["max_concurrency_in_config"] = concurrency if concurrency is not None else "not set (keepwarm's default)"
        figures["daemon_env"] = daemon_env
        figures["process"] = monitor.summary()
        text = log.read_text(errors="replace")
        figures["log"] = {"lines": text.count("\n"), "bytes": len(text.encode()),
                          "warnings_or_worse": sum(" WARNING " in ln or " ERROR " in ln for ln in text.splitlines()),
                          "first_problems": [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln][:3]}
        figures["exit_code"] = code
        return figures
    finally:
        processes.stop(emulator)


@dataclass(frozen=True)
class Started:
    """A worker still running, its emulator, and where its figures will be."""

    worker: subprocess.Popen[str]
    emulator: subprocess.Popen[str]
    result: Path


def run_baseline(
    processes: Processes, workdir: Path, pairs: int, seconds: float, latency: float, scale: float
) -> Started:
    """Start the naive loop against its own time-scaled emulator; bench_pair collects it."""
    emulator, url = start_emulator(processes, scale, latency * scale)
    config = write_config(workdir, pairs, url, None)  # the loop has no workers to size
    result = workdir / f"baseline-{pairs}.json"
    worker = processes.start(
        [sys.executable, str(WORKERS), "baseline", "--config", str(config), "--seconds", str(seconds),
         "--scale", str(scale), "--base-url", url, "--result", str(result), "--api-key", f"sk-bench-bl-{pairs}"],
        stdout=subprocess.DEVNULL,
    )
    return Started(worker, emulator, result)


def bench_pair(processes: Processes, workdir: Path, pairs: int, args: argparse.Namespace) -> dict[str, Any]:
    """keepwarm and the baseline, side by side, for one N."""
    print(f"[{time.strftime('%H:%M:%S')}] {pairs} pairs: keepwarm and baseline for {args.seconds:.0f} s", flush=True)
    baseline = run_baseline(processes, workdir, pairs, args.seconds, args.latency, args.baseline_scale)
    try:
        keepwarm = run_keepwarm(processes, workdir, pairs, args.concurrency, args.seconds, args.latency,
                                args.scrape_every, args.daemon_env)
        try:
            baseline.worker.wait(SLACK_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        code = processes.stop(baseline.worker)
    finally:
        processes.stop(baseline.emulator)
    naive = json.loads(baseline.result.read_text()) if baseline.result.exists() else {"error": f"exit {code}"}
    return {"pairs": pairs, "keepwarm": keepwarm, "baseline": naive}


# --- the report ----------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def print_summary(runs: list[dict[str, Any]], few: dict[str, Any] | None) -> None:
    """One line per N for keepwarm, one for the baseline."""
    for run in runs:
        k, b = run["keepwarm"], run["baseline"]
        if "error" in k:
            print(f"{run['pairs']:>6} keepwarm: {k['error']}")
        else:
            late = k["lateness_seconds"]
            print(
                f"{run['pairs']:>6} keepwarm ({k['max_concurrency']} workers, "
                f"{'explicit' if isinstance(k.get('max_concurrency_in_config'), int) else 'default'}): "
                f"{k['pings_per_second']:.2f}/s (target {k['target_pings_per_second']:.2f}), "
                f"lateness p50 {_fmt(late['p50'])} p99 {_fmt(late['p99'])} max {_fmt(late['max'])} s, "
                f"lapses {k['lapses']} of {k['pairs_pinged_twice']} pairs pinged twice, "
                f"RSS {k['process']['rss_mb_median']} MB (peak {k['process']['rss_mb_peak']}), "
                f"CPU {k['process']['cpu_percent_of_one_core']}%, config {k['config_load_seconds']} s, "
                f"first ping {k['first_ping_after_launch_seconds']} s after launch"
            )
        if "error" in b:
            print(f"{'':>6} baseline: {b['error']}")
        else:
            print(
                f"{'':>6} baseline: sweep {b['sweep_seconds_in_api_time']} s "
                f"({'measured' if b['sweep_measured'] else 'extrapolated'}) vs TTL {b['ttl_seconds_in_api_time']} s, "
                f"lapses {b['lapses']} of {b['pairs_pinged_twice']} pairs pinged twice"
            )
    if few is not None and "lateness_seconds" in few:
        late = few["lateness_seconds"]
        print(
            f"{few['pairs']:>6} keepwarm with api.max_concurrency: {few['max_concurrency']} set explicitly: "
            f"lateness p99 {_fmt(late['p99'])} "
            f"max {_fmt(late['max'])} s, {few['overdue_at_end']['count']} pings overdue at the end "
            f"(up to {_fmt(few['overdue_at_end']['max_seconds'])} s)"
        )


def main(argv: list[str] | None = None) -> int:
    """Run every N, write bench/results/scale.json; exit 0 when keepwarm met the targets at every N."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="100,1000,10000", help="comma-separated N (default 100,1000,10000)")
    parser.add_argument("--seconds", type=float, default=270.0, help="window per N, real seconds (default 270)")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds each API answer takes (default 1.0)")
    parser.add_argument(
        "--concurrency", type=int, default=None,
        help="set keepwarm's api.max_concurrency explicitly (default: not set, so keepwarm sizes it from the pairs)",
    )
    parser.add_argument("--baseline-scale", type=float, default=0.2, help="baseline time scale (default 0.2)")
    parser.add_argument("--scrape-every", type=float, default=30.0, help="seconds between /metrics scrapes")
    parser.add_argument(
        "--few-workers-seconds", type=float, default=45.0,
        help=f"then run the largest N with api.max_concurrency: {OLD_DEFAULT_WORKERS} set explicitly (the default "
             "before it followed the pairs) for this long (0: skip; default 45)",
    )
    parser.add_argument(
        "--daemon-env", action="append", default=[], metavar="KEY=VALUE",
        help="an environment variable for the keepwarm daemon's process only (repeatable), e.g. MALLOC_ARENA_MAX=2",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--note", default="", help="what this run measures, kept in the report")
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.pairs.split(",") if n.strip()]
    if not sizes or min(sizes) < 1 or args.seconds <= 0 or not 0 < args.baseline_scale <= 1:
        parser.error("--pairs must list positive numbers, --seconds be > 0, --baseline-scale in (0, 1]")
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if any("=" not in item or not item.split("=", 1)[0] for item in args.daemon_env):
        parser.error("--daemon-env takes KEY=VALUE")
    args.daemon_env = dict(item.split("=", 1) for item in args.daemon_env)

    report: dict[str, Any] = {
        "benchmark": "scale",
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python3 bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "tree": tree(),
        # Inherited by every child; these change how CPython and glibc allocate.
        "environment": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "PYTHONMALLOC", "GLIBC_"))},
        "note": args.note,
        "setup": {
            "api_latency_seconds": args.latency,
            "keepwarm": {"time_scale": 1.0, "interval_seconds": 240, "ttl_seconds": 300, "jitter_seconds": 10,
                         "max_concurrency": args.concurrency if args.concurrency is not None
                         else "not set in the config: keepwarm's default, auto_concurrency(pairs)",
                         "daemon_env": args.daemon_env, "window_seconds": args.seconds,
                         "scrape_every_seconds": args.scrape_every,
                         "wiring": "bench/scale_workers.py: config, client, Metrics, Runner, Scheduler, WebServer "
                                   "as keepwarm.daemon wires them; text logs on stderr to a file"},
            "baseline": {"time_scale": args.baseline_scale, "interval_seconds": 240 * args.baseline_scale,
                         "ttl_seconds": 300 * args.baseline_scale, "latency_seconds": args.latency * args.baseline_scale,
                         "loop": "every pair in turn, sweeps start one interval apart (or at once when late)"},
            "config": {"experts": "ceil(N/2)", "models": list(MODELS), "shared_prompt_bytes": PROMPT_BYTES,
                       "per_expert_text": "one line, so each pair is its own cache"},
            "emulators": "python3 -m keepwarm emulator --port 0, one per run, in their own processes",
        },
        "runs": [],
        "few_workers": None,
    }
    processes = Processes()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with tempfile.TemporaryDirectory(prefix="keepwarm-scale-") as tmp:
            workdir = Path(tmp)
            for pairs in sizes:
                report["runs"].append(bench_pair(processes, workdir, pairs, args))
                write(report, args.output)
            if args.few_workers_seconds > 0:
                largest = max(sizes)
                print(f"[{time.strftime('%H:%M:%S')}] {largest} pairs with api.max_concurrency: "
                      f"{OLD_DEFAULT_WORKERS} set explicitly for {args.few_workers_seconds:.0f} s", flush=True)
                few = run_keepwarm(processes, workdir, largest, OLD_DEFAULT_WORKERS, args.few_workers_seconds,
                                   args.latency, args.scrape_every, args.daemon_env)
                label = (f"comparison, not keepwarm's default: api.max_concurrency: {OLD_DEFAULT_WORKERS} set "
                         "explicitly in the config (the default before it followed the pairs)")
                report["few_workers"] = {"label": label, **few}
        report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write(report, args.output)
    finally:
        processes.stop_all()
        signal.signal(signal.SIGTERM, previous)
    print_summary(report["runs"], report["few_workers"])
    print(f"written to {args.output}")
    return 0 if all(targets_met(run["keepwarm"]) for run in report["runs"]) else 1


def targets_met(figures: dict[str, Any]) -> bool:
    """The issue's targets: no lapse, lateness p99 within 1 s, RSS within 150 MB."""
    if "error" in figures:
        return False
    p99 = figures["lateness_seconds"]["p99"]
    return bool(
        figures["lapses"] == 0 and (p99 is None or p99 <= 1.0) and figures["process"]["rss_mb_peak"] <= 150
    )


def write(report: dict[str, Any], path: Path) -> None:
    """Write what is known so far (a run cut short keeps the finished figures)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
