"""Which HTTP server keeps scrapes fast while the listener is under attack: a side-by-side measurement.

    python3 bench/http_server.py [--pairs 10000] [--seconds 30] [--candidates waitress,cheroot,http.server]

Each candidate serves the daemon's own routes (`keepwarm.web.App`: /metrics, /healthz, POST
/v1/observations) from a process of its own, over a configuration of --pairs pairs with their
series filled in (the page a 10,000-pair daemon serves), with the same bounds: 8 worker
threads, 10 s to send a request, 60 s of idle keep-alive, at most 2,000 connections.

- waitress: what `keepwarm.web.WebServer` ships (an event loop reads requests; only complete
  ones reach the pool).
- cheroot: `cheroot.wsgi.Server` with numthreads=8 and a 10 s socket timeout (not a dependency
  of keepwarm: `pip install cheroot` to measure it).
- http.server: the standard library's server hardened by hand, as an alternative to a new
  dependency: `wsgiref`'s handler on a bounded pool of 8 threads, a 10 s socket timeout per
  connection, connections beyond the cap closed at once.

A load process (also on its own, so it does not share the server's interpreter lock) then holds
1,000 idle connections open (connected, nothing sent; reopened when the server closes them),
100 slow ones (a request header sent one byte a second, reopened when closed), and POSTs
5,000 observations a second (50 requests of 100 a second, on keep-alive connections); meanwhile it
scrapes /metrics (gzip, as Prometheus asks) and /healthz once a second and times each to its last
byte, 10 s timeout. A quiet phase (scrapes alone) comes first, for reference.

Per candidate and phase: scrape latency p50 / p95 / max, failed scrapes, /healthz latency,
observations accepted, the server's threads and CPU seconds. Results go to
bench/results/http-server.json; docs/performance.md has the table. Only 127.0.0.1 is used; every
process started is stopped. Run it under the shared lock: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import platform
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "http-server.json"
sys.path.insert(0, str(HERE))

WORKERS = 8
REQUEST_TIMEOUT = 10.0
IDLE = 1000
SLOW = 100
OBS_PER_SECOND = 5000
BATCH = 100
SCRAPE_TIMEOUT = 10.0


# --- the server side -------------------------------------------------------------------------


def build_app(pairs: int) -> Any:
    """The daemon's routes over `pairs` pairs with their series filled, as after warm pings."""
    import observations as http_bench

    from keepwarm.classify import Result, Usage
    from keepwarm.config import load_config
    from keepwarm.metrics import Metrics
    from keepwarm.observations import Observer
    from keepwarm.web import App

    directory = Path(tempfile.mkdtemp(prefix="keepwarm-http-bench-"))
    config = load_config(http_bench.write_config(directory, pairs, 9, 9, 240))
    metrics = Metrics()
    usage = Usage(input=40, cache_read=5600, output=1)
    for pair in config.pairs:
        metrics.pings.labels(pair.expert, pair.model, Result.WARM.value).inc()
        for kind, n in usage.by_kind().items():
            metrics.tokens.labels(pair.expert, pair.model, kind).inc(n)
    observer = Observer(config, metrics)
    holder = SimpleNamespace(metrics=metrics, observer=observer, states=lambda: [], health=lambda: (True, "ok"),
                             live=lambda: (True, "ok"), page_info=None)
    return App(holder)  # type: ignore[arg-type]


def serve_waitress(app: Any, port: int) -> None:
    from keepwarm import web

    server = web._serve(app, "127.0.0.1", port, WORKERS, 2000, 60, REQUEST_TIMEOUT)
    server.run()


def serve_cheroot(app: Any, port: int) -> None:
    from cheroot import wsgi

    server = wsgi.Server(("127.0.0.1", port), app, numthreads=WORKERS, max=WORKERS, timeout=int(REQUEST_TIMEOUT),
                         request_queue_size=1024, accepted_queue_size=2000)
    server.start()


def serve_http_server(app: Any, port: int) -> None:
    import socketserver
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Handler(WSGIRequestHandler):
        timeout = REQUEST_TIMEOUT  # per socket operation: a silent or trickling client is dropped

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(WSGIServer):
        request_queue_size = 1024
        pool = concurrent.futures.ThreadPoolExecutor(WORKERS)
        open = threading.BoundedSemaphore(2000)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.open.acquire(blocking=False):
                self.shutdown_request(request)  # over the cap
                return
            self.pool.submit(self._work, request, client_address)

        def _work(self, request: Any, client_address: Any) -> None:
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - a reset or a timeout
                pass
            finally:
                self.shutdown_request(request)
                self.open.release()

    assert issubclass(Server, socketserver.TCPServer)
    server = Server(("127.0.0.1", port), Handler)
    server.set_app(app)
    server.serve_forever()


SERVERS = {"waitress": serve_waitress, "cheroot": serve_cheroot, "http.server": serve_http_server}


def serve(candidate: str, pairs: int, port: int) -> None:
    app = build_app(pairs)
    from keepwarm.daemon import freeze_heap

    freeze_heap()
    print("ready", flush=True)
    SERVERS[candidate](app, port)


# --- the load side ---------------------------------------------------------------------------


def _open(port: int) -> socket.socket | None:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.setblocking(False)
        return s
    except OSError:
        return None


def _alive(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


class Attack:
    """Idle and slow connections held open, reopened as the server closes them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.idle: list[socket.socket | None] = []
        self.slow: list[tuple[socket.socket | None, int]] = []
        self.reopened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        for _ in range(IDLE):
            self.idle.append(_open(self.port))
        for _ in range(SLOW):
            self.slow.append((_open(self.port), 0))
        self.thread.start()

    def _run(self) -> None:
        header = b"POST /v1/observations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: " + b"a" * 4000
        while not self.stop.wait(1.0):
            for i, (s, sent) in enumerate(self.slow):  # one more byte each, every second
                if s is None or not _alive(s):
                    if s is not None:
                        s.close()
                    self.slow[i] = (_open(self.port), 0)
                    self.reopened += 1
                    continue
                try:
                    s.send(header[sent % len(header):sent % len(header) + 1])
                    self.slow[i] = (s, sent + 1)
                except OSError:
                    s.close()
                    self.slow[i] = (None, 0)
            for i, s in enumerate(self.idle):
                if s is None or not _alive(s):
                    if s is not None:
                        s.close()
                    self.idle[i] = _open(self.port)
                    self.reopened += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.idle:
            if s is not None:
                s.close()
        for s, _ in self.slow:
            if s is not None:
                s.close()

    def held(self) -> int:
        return sum(1 for s in self.idle if s is not None) + sum(1 for s, _ in self.slow if s is not None)


class Observations:
    """POSTs OBS_PER_SECOND observations a second in batches of BATCH, on keep-alive connections."""

    def __init__(self, port: int, pairs: int) -> None:
        import observations as http_bench

        rng = random.Random(3)
        self.port = port
        self.bodies = [json.dumps({"observations": [http_bench.observation(pairs, time.time() - 600, rng)
                                                    for _ in range(BATCH)]}).encode() for _ in range(20)]
        self.stop = threading.Event()
        self.accepted = 0
        self.failed = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(4)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        per_thread = OBS_PER_SECOND / BATCH / len(self.threads)  # requests a second
        conn: http.client.HTTPConnection | None = None
        n = 0
        start = time.monotonic()
        while not self.stop.is_set():
            due = start + n / per_thread
            delay = due - time.monotonic()
            if delay > 0 and self.stop.wait(delay):
                break
            n += 1
            body = self.bodies[(i + n) % len(self.bodies)]
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=SCRAPE_TIMEOUT)
                conn.request("POST", "/v1/observations", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                doc = json.loads(resp.read())
                if resp.status == 202:
                    self.accepted += int(doc["accepted"])
                else:
                    self.failed += BATCH
            except (OSError, http.client.HTTPException, ValueError):
                self.failed += BATCH
                if conn is not None:
                    conn.close()
                conn = None

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def timed_get(port: int, path: str, headers: dict[str, str]) -> float | None:
    """Seconds to the last byte of a GET on a fresh connection, or None when it failed or timed out."""
    start = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=SCRAPE_TIMEOUT)
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status != 200:
            return None
    except (OSError, http.client.HTTPException):
        return None
    return time.perf_counter() - start


def scrapes(port: int, seconds: float) -> dict[str, Any]:
    metrics: list[float | None] = []
    health: list[float | None] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tick = time.monotonic()
        metrics.append(timed_get(port, "/metrics", {"Accept-Encoding": "gzip"}))
        health.append(timed_get(port, "/healthz", {}))
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    return {"scrape": summary(metrics), "healthz": summary(health)}


def summary(samples: list[float | None]) -> dict[str, Any]:
    ok = sorted(s for s in samples if s is not None)
    out: dict[str, Any] = {"n": len(samples), "failed": len(samples) - len(ok)}
    if ok:
        out.update(p50_ms=round(statistics.median(ok) * 1000, 1),
                   p95_ms=round(ok[min(len(ok) - 1, int(0.95 * len(ok)))] * 1000, 1),
                   max_ms=round(ok[-1] * 1000, 1))
    return out


def proc_stats(pid: int) -> dict[str, Any]:
    threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                threads = int(line.split()[1])
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"threads": threads, "cpu_seconds": round((int(fields[11]) + int(fields[12])) / tick, 2)}


def measure(candidate: str, pairs: int, seconds: float, warmup: float) -> dict[str, Any]:
    import observations as http_bench

    port = http_bench.free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", candidate, "--pairs", str(pairs), "--port", str(port)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{candidate}: the server did not start")
        for _ in range(100):
            if timed_get(port, "/healthz", {}) is not None:
                break
            time.sleep(0.1)
        size = len(urlopen_bytes(port))
        quiet = scrapes(port, 10)
        quiet.update(proc_stats(proc.pid))
        attack = Attack(port)
        attack.start()
        posts = Observations(port, pairs)
        posts.start()
        time.sleep(warmup)
        before = proc_stats(proc.pid)
        accepted0 = posts.accepted
        loaded = scrapes(port, seconds)
        after = proc_stats(proc.pid)
        loaded.update(
            threads=after["threads"], cpu_seconds=round(after["cpu_seconds"] - before["cpu_seconds"], 2),
            observations_per_second=round((posts.accepted - accepted0) / seconds),
            observations_failed=posts.failed, attack_connections_held=attack.held(),
            attack_reopened=attack.reopened,
        )
        posts.close()
        attack.close()
        return {"page_bytes_plain": size, "quiet": quiet, "under_attack": loaded}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def urlopen_bytes(port: int) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read()
    conn.close()
    return body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--candidates", default="waitress,cheroot,http.server")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192, hard))
    if args.serve:
        serve(args.serve, args.pairs, args.port)
        return 0
    results: dict[str, Any] = {
        "command": " ".join(["python3", "bench/http_server.py", *sys.argv[1:]]),
        "pairs": args.pairs, "seconds": args.seconds, "warmup": args.warmup, "idle": IDLE, "slow": SLOW,
        "observations_per_second_offered": OBS_PER_SECOND, "workers": WORKERS,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "candidates": {},
    }
    for candidate in args.candidates.split(","):
        print(f"{candidate} ...", flush=True)
        results["candidates"][candidate] = found = measure(candidate, args.pairs, args.seconds, args.warmup)
        print(json.dumps(found, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
