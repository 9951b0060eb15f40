"""Soak: a simulated day of API trouble against the real daemon, and what keepwarm made of it.

Runs `keepwarm run` (a real process, with a distinctive API key) against the emulator (in this
process, accepting only that key), with every TTL and interval shrunk by `--time-scale`: at
0.002 a 5-minute TTL lasts 0.6 s and 24 simulated hours pass in under three minutes. A seeded
schedule of outages, one kind after another in shuffled rounds so every kind comes up, of random
lengths and at random gaps:

    rate_limit_429      every request answered 429 with a retry-after
    overloaded_529      every request answered 529
    server_5xx          500, 502 or 503
    timeout_hang        the API holds the connection past api.timeout
    connection_drop     the connection closes without an answer
    malformed_body      200 with a body cut in half
    connection_refused  the API's port is closed (the emulator stops, then restarts: caches lost)
    auth_401            the key is refused, then accepted again
    invalid_400         every ping is rejected; at the end the operator edits the prompts and
                        sends SIGHUP (a 400 parks a pair until its config changes)
    process_stopped     SIGSTOP for the outage, then SIGCONT (a suspended VM, a frozen container)
    slow_api            every answer takes 100 simulated seconds, but comes

It counts, from the emulator's request log and the daemon's own output:

    crashes             the daemon exiting on its own (it is restarted, and the soak goes on)
    faults              outages of each kind, and the requests they failed
    recoveries          outages after which every pair had a warm ping before the next began,
                        and how long that took
    cache lapses        pings that found the cache cold (`rewarmed`) with no outage since the
                        pair's previous successful ping: the one failure a keepalive exists to prevent
    catch-up pings      after SIGCONT, pings per pair within one interval (must be at most one)
    rows lost           answered pings with no ledger row, after a clean SIGTERM at the end that
                        lands while pings are in flight
    key leaks           places the key (all but its last four characters) appears: the daemon's
                        log, /metrics, /, /healthz, the ledger file, `keepwarm report`, the
                        emulator's log

and writes them to bench/results/soak.json (see docs/reliability.py, which turns them into
docs/reliability.md).

    python3 bench/soak.py [--hours 24] [--time-scale 0.002] [--seed 7] [--policy fixed|adaptive]

With `--policy adaptive` the daemon runs the adaptive policy (started with `--time-scale`, so
it knows the scaled TTL), and a production driver in this process sends each pair seeded
working sessions (a request every 0.5-3 simulated minutes for 20-90 minutes, then 5-120 quiet
minutes) through the emulator and reports each one to the daemon's observations endpoint. The
policy lets some caches lapse on purpose; a cache lapse still means a *ping* that found the
cache cold, which under this policy only happens when a cache it chose to keep warm expired.
Production's requests are left out of every other count (requests, rows lost, recoveries), and
an outage counts as recovered when every pair the policy kept warm had a warm ping after it.

Not simulated: the spend-cap 429, whose back-off (1 minute, doubling) is real time and would
last simulated hours here (tests/test_reliability_faults.py covers it), and wall-clock steps
(tests/test_reliability_limits.py steps the daemon's clock with libfaketime). The daemon is
given its interval, jitter and timeout already scaled but still believes in a 300 s TTL, so its
retries may run on past the scaled expiry: that only makes outages longer, never hides a lapse.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402 - after the path set-up, so a checkout runs without installing

from keepwarm.config import load_config  # noqa: E402
from keepwarm.emulator import Emulator, Fault, LogEntry  # noqa: E402
from keepwarm.store import read_ledger  # noqa: E402

DEFAULT_OUTPUT = REPO / "bench" / "results" / "soak.json"
KEY = "sk-ant-api03-SOAKTEST-4c1e9b7d2a6f0358e1b2-soakKEY9"
KINDS = (
    "rate_limit_429",
    "overloaded_529",
    "server_5xx",
    "timeout_hang",
    "connection_drop",
    "malformed_body",
    "connection_refused",
    "auth_401",
    "invalid_400",
    "process_stopped",
    "slow_api",
)
# One expert per model pair, each model once, so a request's model names its pair.
PAIRS = {
    "claude-sonnet-4-6": "analyst",
    "claude-opus-4-8": "analyst",
    "claude-sonnet-4-5": "critic",
    "claude-sonnet-5": "critic",
}
TTL = 300.0  # simulated seconds: the 5m TTL
INTERVAL = 180.0  # simulated seconds between pings: two minutes of margin below the TTL
JITTER = 10.0
TIMEOUT_REAL = 0.5  # real seconds: above any healthy answer on a busy 2-core machine
HANG_REAL = 1.0  # a hang outlasts the timeout, so the client gives up first
PROMPT = (
    "You are a careful analyst. Check every figure against the tables you are given, say which "
    "assumption each conclusion rests on, and answer in short paragraphs. "
) * 40


@dataclass
class Outage:
    """One stretch of trouble, in simulated seconds from the start of the soak."""

    kind: str
    start: float
    end: float
    detail: dict[str, Any] = field(default_factory=dict)
    # Filled in as it happens and afterwards (real times are the emulator's monotonic clock).
    real_start: float = 0.0
    real_end: float = 0.0
    failed_requests: int = 0
    recovered: bool = False
    recovery_s: float | None = None  # simulated seconds from the end to every pair warm
    catch_up_max: int | None = None  # process_stopped: the most pings one pair sent right after SIGCONT
    errors_counted: dict[str, float] = field(default_factory=dict)  # by error_type, the daemon's /metrics


def schedule(
    rng: random.Random, hours: float, gap: tuple[float, float], length: tuple[float, float], kinds: tuple[str, ...]
) -> list[Outage]:
    """Outages over `hours`, gaps and lengths in simulated minutes, kinds in shuffled rounds."""
    outages: list[Outage] = []
    now, end = 10 * 60.0, hours * 3600.0  # ten quiet minutes first: every pair warm
    queue: list[str] = []
    while True:
        if not queue:
            queue = list(kinds)
            rng.shuffle(queue)
        kind = queue.pop()
        minutes = rng.uniform(*length)
        if now + minutes * 60 + gap[0] * 60 > end:
            return outages
        detail: dict[str, Any] = {}
        if kind == "server_5xx":
            detail["status"] = rng.choice([500, 502, 503])
        if kind == "rate_limit_429":
            detail["retry_after_simulated_s"] = rng.choice([5, 15, 30])
        outages.append(Outage(kind, now, now + minutes * 60, detail))
        now += minutes * 60 + rng.uniform(*gap) * 60


# --- the analysis: pure functions of the emulator's log --------------------------------------


PRODUCTION_QUESTION = "A production question for the soak."


def is_production(e: LogEntry) -> bool:
    """A request of the production driver (`--policy adaptive`), not a ping."""
    body = e.body if isinstance(e.body, dict) else {}
    messages = body.get("messages") or [{}]
    return isinstance(messages[0], dict) and messages[0].get("content") == PRODUCTION_QUESTION


def pings_only(entries: list[LogEntry]) -> list[LogEntry]:
    """The keepalive's own requests."""
    return [e for e in entries if not is_production(e)]


def sessions(rng: random.Random, hours: float) -> list[float]:
    """Seeded production request times (simulated seconds) for one pair: sessions and quiet gaps."""
    out, t = [], rng.uniform(0, 600)
    while t < hours * 3600:
        end = t + rng.uniform(20, 90) * 60
        while t < end:
            out.append(t)
            t += rng.uniform(30, 180)
        t += rng.uniform(5, 120) * 60
    return out


def successes(entries: list[LogEntry]) -> dict[str, list[LogEntry]]:
    """Answered pings by model (that is, by pair), oldest first."""
    out: dict[str, list[LogEntry]] = {}
    for e in sorted(entries, key=lambda e: e.time):
        if e.path == "/v1/messages" and e.status == 200 and e.usage and e.model in PAIRS:
            out.setdefault(e.model, []).append(e)
    return out


def answered(entries: list[LogEntry]) -> set[str]:
    """Request ids of pings the API answered with a usable message (a malformed body is not one)."""
    return {e.request_id for e in entries if e.path == "/v1/messages" and e.status == 200 and e.error_type is None}


def is_warm(e: LogEntry) -> bool:
    usage = e.usage or {}
    return bool(usage.get("cache_read_input_tokens")) and not usage.get("cache_creation_input_tokens")


def is_rewarmed(e: LogEntry) -> bool:
    usage = e.usage or {}
    return bool(usage.get("cache_creation_input_tokens")) and not usage.get("cache_read_input_tokens")


def lapses(entries: list[LogEntry], outages: list[Outage], ttl_real: float) -> list[dict[str, Any]]:
    """Pings that found the cache cold with no outage since the pair's previous success.

    A cache is a pair's prefix: when a reload changes the prompt, the first ping of the new
    fingerprint writes a new entry, which is no lapse.
    """
    found = []
    for model, pings in successes(entries).items():
        for before, after in itertools.pairwise(pings):
            if is_production(after) or not is_rewarmed(after) or before.fingerprint != after.fingerprint:
                continue  # production may write a cache the policy let lapse: only a cold *ping* lapsed
            if any(o.real_start <= after.time and o.real_end >= before.time for o in outages):
                continue  # an outage in between explains it
            found.append({
                "model": model,
                "gap_s": round(after.time - before.time, 4),
                "within_ttl": after.time - before.time < ttl_real,  # the emulator forgot early?
            })
    return found


def assess_recoveries(entries: list[LogEntry], outages: list[Outage], scale: float, horizon: float,
                      keep_warm: Callable[[str, float, float], bool] | None = None) -> None:
    """Mark each outage recovered when every pair (that `keep_warm` says the policy kept warm
    between the outage's end and the next one's start) had a warm ping in that stretch."""
    by_pair = successes(entries)
    for i, outage in enumerate(outages):
        until = outages[i + 1].real_start if i + 1 < len(outages) else horizon
        firsts = []
        for model in PAIRS:
            if keep_warm is not None and not keep_warm(model, outage.real_end, until):
                continue  # the adaptive policy let this cache lapse meanwhile: nothing to recover
            warm = [e.time for e in by_pair.get(model, []) if outage.real_end <= e.time < until and is_warm(e)]
            firsts.append(warm[0] if warm else None)
        outage.recovered = all(t is not None for t in firsts)
        if outage.recovered and firsts:
            outage.recovery_s = round((max(t for t in firsts if t is not None) - outage.real_end) / scale, 1)


def count_failed(entries: list[LogEntry], outages: list[Outage]) -> None:
    for outage in outages:
        outage.failed_requests = sum(
            1 for e in entries
            if e.path == "/v1/messages" and outage.real_start <= e.time <= outage.real_end
            and (e.status != 200 or e.error_type is not None)
        )


# --- the run -------------------------------------------------------------------------------


class Soak:
    """The daemon, the emulator and the schedule; `run()` returns the figures."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.adaptive = getattr(args, "policy", "fixed") == "adaptive"
        self.production_stop = threading.Event()
        self.production_sent = 0
        self._prefixes: tuple[int, dict[str, list[dict[str, Any]]]] = (-1, {})
        self.scale = float(args.time_scale)
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.outages = schedule(self.rng, args.hours, tuple(args.gap), tuple(args.length), tuple(args.kinds))
        self.entries: dict[str, LogEntry] = {}  # every request any emulator instance saw
        self.crashes: list[dict[str, Any]] = []
        self.pages: list[tuple[str, bytes]] = []
        self.edition = 0
        self.port = 0
        self.stopped = False
        self.errors_before_outages: dict[str, float] = {}
        self.baseline: dict[str, float] = {}  # the daemon's error counts when last looked at
        self.emu = self._new_emulator()
        self.metrics_port = _free_port()
        self.config = self.workdir / "keepwarm.yaml"
        self._write_config()
        self.log_files: list[Path] = []
        self.daemon = self._start_daemon()
        self.t0 = time.monotonic()  # restarted by run() once every pair is warm

    # --- simulated time --------------------------------------------------------------------

    def sim(self) -> float:
        return (time.monotonic() - self.t0) / self.scale

    def real(self, simulated: float) -> float:
        return self.t0 + simulated * self.scale

    # --- the pieces ------------------------------------------------------------------------

    def _new_emulator(self) -> Emulator:
        emu = Emulator(time_scale=self.scale, api_keys=[KEY], port=self.port, log_limit=1_000_000)
        emu.start()
        self.port = emu.port
        return emu

    def _write_config(self) -> None:
        for expert in set(PAIRS.values()):
            text = f"{PROMPT}\nYou are the {expert}. Edition {self.edition}."
            (self.workdir / f"{expert}.md").write_text(text, encoding="utf-8")
        if self.adaptive:  # `--time-scale` scales them, and the TTL the policy reasons about
            defaults: dict[str, Any] = {"interval": f"{INTERVAL:g}s", "jitter": f"{JITTER:g}s", "policy": "adaptive"}
        else:
            defaults = {"interval": f"{INTERVAL * self.scale:.4f}s", "jitter": f"{JITTER * self.scale:.4f}s"}
        doc = {
            "api": {"base_url": f"http://127.0.0.1:{self.port}", "timeout": f"{TIMEOUT_REAL}s"},
            "defaults": defaults,
            "experts": [
                {"name": expert, "system": [{"file": f"{expert}.md"}], "models": [m for m, e in PAIRS.items() if e == expert]}
                for expert in sorted(set(PAIRS.values()))
            ],
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "ledger": {"path": "ledger.sqlite"},
            "shutdown_timeout": "3s",
        }
        if self.adaptive:
            doc["observe"] = {"allow_unauthenticated": True}  # loopback only, the driver below
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")

    def _start_daemon(self) -> subprocess.Popen[bytes]:
        log = self.workdir / f"daemon-{len(self.log_files)}.log"
        self.log_files.append(log)
        env = {k: v for k, v in os.environ.items() if k not in ("ANTHROPIC_API_KEY", "CREDENTIALS_DIRECTORY")}
        env["ANTHROPIC_API_KEY"] = KEY
        with log.open("wb") as sink:
            return subprocess.Popen(
                [sys.executable, "-m", "keepwarm", "run", "--config", str(self.config), "--log-format", "json",
                 *(["--time-scale", str(self.scale)] if self.adaptive else [])],
                stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            )

    def _get(self, path: str) -> bytes:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return bytes(exc.read())

    def harvest(self) -> None:
        for e in self.emu.log:
            self.entries[e.request_id] = e

    def _check_alive(self) -> None:
        code = self.daemon.poll()
        if code is None:
            return
        tail = self.log_files[-1].read_text(errors="replace")[-2000:]
        self.crashes.append({"at_simulated_s": round(self.sim(), 1), "exit": code, "log_tail": tail})
        self.daemon = self._start_daemon()

    def idle_until(self, simulated: float, every: Callable[[], None] | None = None) -> None:
        """Let the daemon work until a simulated time, watching for crashes."""
        last_page = self.sim()
        while self.sim() < simulated:
            self._check_alive()
            if self.sim() - last_page > 3600:  # a look at every page once a simulated hour
                last_page = self.sim()
                self.snapshot_pages()
            time.sleep(min(0.02, max(self.real(simulated) - time.monotonic(), 0)))
        if every:
            every()

    def errors_now(self) -> dict[str, float]:
        """keepwarm_ping_errors_total by error_type, summed over the pairs."""
        counts: dict[str, float] = {}
        for line in self._get("/metrics").decode("utf-8", errors="replace").splitlines():
            if line.startswith("keepwarm_ping_errors_total{"):
                kind = line.split('error_type="', 1)[1].split('"', 1)[0]
                counts[kind] = counts.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
        return counts

    def await_counted(self, o: Outage, error_type: str, deadline: float = 5.0) -> None:
        """Wait until the daemon counts every request the emulator refused in the outage so far.

        The emulator logs a refusal when it answers; the daemon counts it a moment later, when
        the answer is back and classified. Counted before that, a ping in flight at the end of
        the outage would be missing, and a reload resetting its pair's series would lose it.
        """
        refused = sum(1 for e in self.emu.log
                      if e.path == "/v1/messages" and e.time >= o.real_start and e.error_type == "invalid_request_error")
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.errors_now().get(error_type, 0.0) - self.baseline.get(error_type, 0.0) >= refused:
                return
            time.sleep(0.02)

    def count_errors(self, since: dict[str, float], into: dict[str, float]) -> dict[str, float]:
        """Add what the daemon counted since `since` to `into`; return the counts now."""
        now = self.errors_now()
        for kind, n in now.items():
            if n - since.get(kind, 0.0):
                into[kind] = into.get(kind, 0.0) + n - since.get(kind, 0.0)
        return now

    def reloaded(self, before: int, deadline: float = 10.0) -> None:
        """Wait until the daemon logs one more `config reloaded` than `before`."""
        end = time.monotonic() + deadline
        while self._reloads() <= before and time.monotonic() < end:
            time.sleep(0.01)

    def _reloads(self) -> int:
        return self.log_files[-1].read_text(errors="replace").count('"event": "config reloaded"')

    def snapshot_pages(self) -> None:
        if self.stopped:
            return  # a SIGSTOPped daemon answers nothing
        for path in ("/metrics", "/", "/healthz"):
            try:
                self.pages.append((path, self._get(path)))
            except OSError:
                pass  # a stopped or restarting daemon

    def wait_ready(self, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                self._get("/metrics")
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the daemon never served /metrics:\n" + self.log_files[-1].read_text()[-3000:])

    # --- outages ---------------------------------------------------------------------------

    def begin(self, o: Outage) -> None:
        o.real_start = time.monotonic()
        kind = o.kind
        if kind == "rate_limit_429":
            self.emu.inject(Fault(429, retry_after=round(o.detail["retry_after_simulated_s"] * self.scale, 4), count=None))
        elif kind == "overloaded_529":
            self.emu.inject(Fault(529, count=None))
        elif kind == "server_5xx":
            self.emu.inject(Fault(o.detail["status"], count=None))
        elif kind == "timeout_hang":
            self.emu.inject(Fault(kind="hang", latency=HANG_REAL, count=None))
        elif kind == "connection_drop":
            self.emu.inject(Fault(kind="drop", count=None))
        elif kind == "malformed_body":
            self.emu.inject(Fault(kind="malformed", count=None))
        elif kind == "connection_refused":
            self.harvest()
            self.emu.stop()
        elif kind == "auth_401":
            self.emu.inject(Fault(401, count=None))
        elif kind == "invalid_400":
            self.emu.inject(Fault(400, count=None, message="messages: the emulator refuses this on purpose"))
        elif kind == "process_stopped":
            self.daemon.send_signal(signal.SIGSTOP)
            self.stopped = True
        elif kind == "slow_api":
            self.emu.inject(Fault(kind="latency", latency=round(100 * self.scale, 4), count=None))

    def finish(self, o: Outage) -> None:
        kind = o.kind
        if kind == "connection_refused":
            self.emu = self._new_emulator()
        elif kind == "process_stopped":
            self.daemon.send_signal(signal.SIGCONT)
            self.stopped = False
        else:
            self.emu.clear_faults()
        if kind == "invalid_400":
            # The operator's answer to a 400: fix the prompt, reload. (A 400 parks a pair.) A
            # changed pair starts its series afresh, so count its errors before the reload,
            # once the last refused ping has made its way back into the daemon's counters.
            self.await_counted(o, "invalid_request")
            self.count_errors(self.baseline, o.errors_counted)
            self.edition += 1
            self._write_config()
            reloads = self._reloads()
            self.daemon.send_signal(signal.SIGHUP)
            o.real_end = time.monotonic()
            self.reloaded(reloads)
            self.baseline = self.errors_now()
            return
        o.real_end = time.monotonic()

    # --- the end ---------------------------------------------------------------------------

    def stop_with_pings_in_flight(self) -> dict[str, Any]:
        """SIGTERM while every pair's ping is slow: they must finish and be recorded."""
        self.emu.inject(Fault(kind="latency", latency=0.3, count=len(PAIRS)))
        end = time.monotonic() + 10
        while self.emu._faults.pending() and time.monotonic() < end:  # noqa: SLF001 - the bench's own emulator
            time.sleep(0.01)
        in_flight = len(PAIRS) - sum(f["remaining"] or 0 for f in self.emu._faults.pending())  # noqa: SLF001
        t = time.monotonic()
        self.daemon.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.daemon.wait(30)
        except subprocess.TimeoutExpired:
            code = None
            self.daemon.kill()
            self.daemon.wait()
        return {"exit": code, "seconds": round(time.monotonic() - t, 2), "pings_in_flight": in_flight}

    def wait_all_warm(self, deadline: float = 30.0) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            self._check_alive()
            self.harvest()
            answered = successes(list(self.entries.values()))
            if all(any(is_warm(e) for e in answered.get(m, [])) for m in PAIRS):
                return
            time.sleep(0.05)
        raise SystemExit("the pairs never got warm:\n" + self.log_files[-1].read_text()[-3000:])

    # --- production (`--policy adaptive`) ----------------------------------------------------

    def _production(self, model: str, times: list[float]) -> None:
        """One pair's production: each request to the emulator, then its observation to the daemon."""
        expert = PAIRS[model]
        for t in times:
            if self.production_stop.wait(max(self.real(t) - time.monotonic(), 0)):
                return
            try:
                system = self._system(expert)
                at = time.time()
                body = {"model": model, "max_tokens": 16, "system": system,
                        "messages": [{"role": "user", "content": PRODUCTION_QUESTION}]}
                answer = self._post(f"http://127.0.0.1:{self.port}/v1/messages", body, {"x-api-key": KEY})
                obs = {"expert": expert, "model": model, "at": at, "usage": answer["usage"]}
                self._post(f"http://127.0.0.1:{self.metrics_port}/v1/observations", obs, {})
                self.production_sent += 1
            except (OSError, ValueError, KeyError):
                continue  # an outage fails production too; it just tries again later

    def _system(self, expert: str) -> list[dict[str, Any]]:
        """The system blocks the daemon pings with (built by the same code): the same cache."""
        if self._prefixes[0] != self.edition:  # a reload's new prompts: build them again
            pairs = load_config(self.config).pairs
            self._prefixes = (self.edition, {p.expert: list(p.prefix.params()["system"]) for p in pairs})
        return self._prefixes[1][expert]

    @staticmethod
    def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01",
                                              **headers})
        with urllib.request.urlopen(req, timeout=5) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
            return answer

    def start_production(self) -> list[threading.Thread]:
        rng = random.Random(f"{self.args.seed}:production")
        threads = [threading.Thread(target=self._production, args=(m, sessions(rng, self.args.hours)), daemon=True)
                   for m in PAIRS]
        for thread in threads:
            thread.start()
        return threads

    def kept_warm(self, model: str, since: float, until: float) -> bool:
        """Whether the policy pinged the pair at all between two real times (else it let it lapse)."""
        return any(e.model == model and since <= e.time < until and not is_production(e)
                   for e in self.entries.values() if e.path == "/v1/messages")

    def run(self) -> dict[str, Any]:
        self.wait_ready()
        threads: list[threading.Thread] = []
        if self.adaptive:
            self.t0 = time.monotonic()  # production's clock; restarted below once all are warm
            threads = self.start_production()
        self.wait_all_warm(deadline=120.0 if self.adaptive else 30.0)
        # Simulated time starts now: the outages meet a daemon in its steady state.
        self.t0 = started = time.monotonic()
        self.baseline = self.errors_now()
        previous: Outage | None = None
        for outage in self.outages:
            self.idle_until(outage.start)
            # What the daemon counted since the last outage began is that outage's (its retries
            # run on after it ends); before the first, nothing should have failed at all.
            into = previous.errors_counted if previous else self.errors_before_outages
            self.baseline = self.count_errors(self.baseline, into)
            previous = outage
            self.begin(outage)
            self.idle_until(outage.end)
            self.finish(outage)
            if outage.kind == "process_stopped":
                self.idle_until(outage.end + 2 * INTERVAL)
                self.harvest()
                outage.catch_up_max = max(
                    (len([e for e in self.entries.values() if e.model == m and not is_production(e) and
                          outage.real_end <= e.time < outage.real_end + 0.8 * INTERVAL * self.scale])
                     for m in PAIRS),
                    default=0,
                )
        self.idle_until(self.args.hours * 3600)
        horizon = time.monotonic()
        self.production_stop.set()
        for thread in threads:
            thread.join(timeout=10)
        if previous is not None:
            self.count_errors(self.baseline, previous.errors_counted)
        self.snapshot_pages()
        self.harvest()
        shutdown = self.stop_with_pings_in_flight()
        self.harvest()
        self.emu.stop()
        return self.figures(started, horizon, shutdown)

    def figures(self, started: float, horizon: float, shutdown: dict[str, Any]) -> dict[str, Any]:
        everything = list(self.entries.values())
        entries = pings_only(everything)  # production's requests are not the keepalive's
        ttl_real = TTL * self.scale
        count_failed(entries, self.outages)
        assess_recoveries(entries, self.outages, self.scale, horizon, self.kept_warm if self.adaptive else None)
        found_lapses = lapses(everything, self.outages, ttl_real)
        ledger = self.workdir / "ledger.sqlite"
        rows = read_ledger(ledger)
        lost = answered(entries) - {r.request_id for r in rows}

        report = subprocess.run(
            [sys.executable, "-m", "keepwarm", "report", "--ledger", str(ledger), "--since", "all", "--format", "json"],
            capture_output=True, timeout=60, check=False,
        )
        places: list[tuple[str, bytes]] = [(f"daemon log {p.name}", p.read_bytes()) for p in self.log_files]
        places += [(f"page {path}", body) for path, body in self.pages]
        places += [(name.name, name.read_bytes()) for name in self.workdir.glob("ledger.sqlite*")]
        places += [("keepwarm report", report.stdout + report.stderr)]
        places += [("emulator log", json.dumps([e.to_json() for e in everything]).encode())]
        secret = KEY[:-4].encode()
        leaks = [where for where, data in places if secret in data]

        by_kind: dict[str, dict[str, Any]] = {}
        for o in self.outages:
            k = by_kind.setdefault(o.kind, {"outages": 0, "failed_requests": 0, "recovered": 0, "recovery_s": [],
                                            "errors_counted": {}})
            k["outages"] += 1
            k["failed_requests"] += o.failed_requests
            k["recovered"] += o.recovered
            if o.recovery_s is not None:
                k["recovery_s"].append(o.recovery_s)
            for kind, n in o.errors_counted.items():
                k["errors_counted"][kind] = k["errors_counted"].get(kind, 0.0) + n
        for k in by_kind.values():
            times = k.pop("recovery_s")
            k["recovery_simulated_s_median"] = statistics.median(times) if times else None
            k["recovery_simulated_s_max"] = max(times) if times else None
        stopped = [o.catch_up_max for o in self.outages if o.catch_up_max is not None]
        error_counts: dict[str, float] = {}
        for o in self.outages:
            for kind, n in o.errors_counted.items():
                error_counts[kind] = error_counts.get(kind, 0.0) + n
        pings = [e for e in entries if e.path == "/v1/messages"]
        return {
            "what": "bench/soak.py: a seeded day of API faults against the real keepwarm daemon",
            "settings": {
                "simulated_hours": self.args.hours,
                "time_scale": self.scale,
                "seed": self.args.seed,
                "pairs": len(PAIRS),
                "ttl_simulated_s": TTL,
                "interval_simulated_s": INTERVAL,
                "jitter_simulated_s": JITTER,
                "api_timeout_real_s": TIMEOUT_REAL,
                "gap_simulated_min": list(self.args.gap),
                "length_simulated_min": list(self.args.length),
                "kinds": list(self.args.kinds),
                "policy": "adaptive" if self.adaptive else "fixed",
            },
            "production_requests": len(everything) - len(entries),
            "real_seconds": round(horizon - started, 1),
            "requests": len(pings),
            "answered": len(answered(entries)),
            "crashes": len(self.crashes),
            "crash_details": self.crashes,
            "outages": len(self.outages),
            "faults_injected": sum(o.failed_requests for o in self.outages),
            "recoveries": sum(o.recovered for o in self.outages),
            "cache_lapses_outside_outages": len(found_lapses),
            "lapse_details": found_lapses,
            "catch_up_pings_max": max(stopped) if stopped else None,
            "ledger_rows": len(rows),
            "rows_lost": len(lost),
            "shutdown": shutdown,
            "key_leaks": len(leaks),
            "key_leak_places": leaks,
            "places_searched_for_the_key": len(places),
            "errors_counted_by_the_daemon": error_counts,
            "errors_counted_before_any_outage": self.errors_before_outages,
            "by_kind": by_kind,
            "schedule": [
                {k: v for k, v in asdict(o).items() if k not in ("real_start", "real_end")} for o in self.outages
            ],
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        }

    def close(self) -> None:
        """Leave nothing running, whatever happened."""
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGCONT)
            self.daemon.kill()
            self.daemon.wait()
        self.emu.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--hours", type=float, default=24.0, help="simulated hours (default 24)")
    p.add_argument("--time-scale", type=float, default=0.002, help="real seconds per simulated second")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--gap", type=float, nargs=2, default=(40.0, 100.0), metavar=("MIN", "MAX"),
                   help="simulated minutes between outages")
    p.add_argument("--length", type=float, nargs=2, default=(1.0, 20.0), metavar=("MIN", "MAX"),
                   help="simulated minutes an outage lasts")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--output", type=Path, default=None,
                   help=f"default {DEFAULT_OUTPUT.relative_to(REPO)} (fixed) or bench/results/soak-adaptive.json")
    p.add_argument("--policy", choices=("fixed", "adaptive"), default="fixed",
                   help="the daemon's policy; adaptive adds production traffic (default fixed)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One soak; returns the figures (and writes them to args.output unless it is None)."""
    with tempfile.TemporaryDirectory(prefix="keepwarm-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            figures = soak.run()
        finally:
            soak.close()
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output is None:
        args.output = DEFAULT_OUTPUT if args.policy == "fixed" else DEFAULT_OUTPUT.with_name("soak-adaptive.json")
    figures = run(args)
    summary = {k: figures[k] for k in ("real_seconds", "requests", "production_requests", "crashes", "outages", "faults_injected",
                                       "recoveries", "cache_lapses_outside_outages", "catch_up_pings_max",
                                       "rows_lost", "key_leaks")}
    print(json.dumps(summary, indent=2))
    for kind, k in figures["by_kind"].items():
        print(f"  {kind:20} outages {k['outages']:2}  failed requests {k['failed_requests']:4}  "
              f"recovered {k['recovered']}/{k['outages']}  max recovery {k['recovery_simulated_s_max']} s (simulated)")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
