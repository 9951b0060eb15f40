"""Restarts: what a restart costs the caches, and what a week of state costs the start-up.

    python3 bench/restart.py startup  [--pairs 10000] [--days 7]
    python3 bench/restart.py catch-up [--pairs 1000,10000] [--requests-per-minute 0,4000]
    python3 bench/restart.py restarts [--pairs 400] [--cycles 6] [--time-scale 0.1]

startup: the daemon's start-up at N pairs (the default config shape: 5m TTL, 4m interval) with
  an empty ledger, then with a ledger holding DAYS of pings for every pair, side by side: time
  from exec to "keepwarm started", the peak RSS then and 30 s later, the ledger's size (and so
  the bytes a ping costs on disk), and the one-off migration of the same week from the
  previous schema.
catch-up: a daemon keeps N pairs warm, is killed, its state is deleted, and a new one starts
  without state, optionally capped at --requests-per-minute: how long the catch-up takes, how
  many caches alive at the kill it re-wrote (lost), and what the arithmetic predicts.
restarts: the default config with no `ledger:` key against a time-scaled emulator, restarted
  with SIGTERM and SIGKILL at random moments: caches re-written because of a restart (goal 0),
  pairs pinged twice within an interval (goal 0, but for pings in flight at a SIGKILL), and the
  budget's spend before and after each restart.

Every run prints its figures and writes them to bench/results/restart-<mode>.json.
Only 127.0.0.1 is used; every process started is stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scale import Processes, machine, memory_mb, start_emulator, tree, write_config  # noqa: E402

from keepwarm.config import load_config  # noqa: E402
from keepwarm.store import MIGRATIONS, Ledger, read_ledger  # noqa: E402

RESULTS = REPO / "bench" / "results"
STARTED = '"event": "keepwarm started"'


def daemon(processes: Processes, config: Path, log: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    """`keepwarm run` with JSON logs to `log`."""
    return processes.start(
        [sys.executable, "-m", "keepwarm", "run", "--log-format", "json", "--config", str(config), *extra],
        extra_env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )


def wait_for_line(process: subprocess.Popen[str], log: Path, needle: str, timeout: float) -> float:
    """Seconds until `needle` appears in the log; raises if the process dies or time runs out."""
    start = time.monotonic()
    while needle not in log.read_text(errors="replace"):
        if process.poll() is not None:
            raise RuntimeError(f"exited {process.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"no {needle!r} in {timeout:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    return time.monotonic() - start


def events(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines() if line.startswith("{")]


# --- startup ---------------------------------------------------------------------------------


def synthesize(path: Path, config: Path, days: float, now: float, schema: int) -> dict[str, Any]:
    """A ledger of `days` of pings every 4 minutes for every pair of `config`, ending a minute
    ago, as the daemon writes them (first a write, then reads), at schema version `schema`."""
    pairs = load_config(config).pairs
    with sqlite3.connect(path) as db:
        for step in MIGRATIONS[:schema]:
            step(db)
        db.execute(f"PRAGMA user_version = {schema}")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")  # only the benchmark's own set-up
    prices = load_config(config).prices
    db.execute("CREATE TEMP TABLE p (expert TEXT, model TEXT, fingerprint TEXT, phase REAL, tokens INT,"
               " c_in REAL, c_read REAL, c_write REAL, c_out REAL)")
    from keepwarm.classify import Usage
    from keepwarm.scheduler import phase

    tokens = 5750
    rows = []
    for pair in pairs:
        warm = prices.cost(pair.model, Usage(input=1, cache_read=tokens, output=1)) or {}
        cold = prices.cost(pair.model, Usage(input=1, cache_write_5m=tokens, output=1)) or {}
        rows.append((pair.expert, pair.model, pair.fingerprint, phase(pair.key, 240.0), tokens,
                     warm.get("input", 0.0), warm.get("cache_read", 0.0), cold.get("cache_write_5m", 0.0),
                     warm.get("output", 0.0)))
    db.executemany("INSERT INTO p VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    ticks = int(days * 86400 / 240)
    start = now - 60 - ticks * 240
    began = time.monotonic()
    db.execute("BEGIN")
    for n in range(ticks):
        first = int(n == 0)  # a pair's first ping writes its cache; every later one reads it
        db.execute(
            "INSERT INTO pings (time, expert, model, ttl, fingerprint, result, input, cache_read, cache_write_5m,"
            " cache_write_1h, output, cost_input, cost_cache_read, cost_cache_write_5m, cost_cache_write_1h,"
            " cost_output, latency, duration, attempts, request_id, expires_at)"
            " SELECT :at + phase, expert, model, '5m', fingerprint, CASE WHEN :first THEN 'rewarmed' ELSE 'warm' END,"
            " 1, CASE WHEN :first THEN 0 ELSE tokens END, CASE WHEN :first THEN tokens ELSE 0 END, 0, 1, c_in,"
            " CASE WHEN :first THEN 0 ELSE c_read END, CASE WHEN :first THEN c_write ELSE 0 END, 0, c_out,"
            " 0.4, 0.4, 1, 'req_' || rowid || '_' || :n, :at + phase + 300 FROM p",
            {"at": start + n * 240, "first": first, "n": n},
        )
        if n % 200 == 199:
            db.execute("COMMIT")
            db.execute("BEGIN")
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    count = db.execute("SELECT COUNT(*) FROM pings").fetchone()[0]
    db.close()
    return {"rows": count, "seconds_to_write": round(time.monotonic() - began, 1)}


def measure_start(processes: Processes, config: Path, log: Path, env: dict[str, str], settle: float) -> dict[str, Any]:
    """Exec to "keepwarm started", the peak RSS then and `settle` seconds later."""
    process = daemon(processes, config, log, env)
    try:
        seconds = wait_for_line(process, log, STARTED, 900)
        _, peak_at_start = memory_mb(process.pid)
        time.sleep(settle)
        rss, peak = memory_mb(process.pid)
    finally:
        code = processes.stop(process, 60)
    stopped = [e for e in events(log) if e.get("event") == "catch-up: pinging the pairs that are due now"]
    return {"seconds_to_started": round(seconds, 2), "peak_rss_mb_at_started": round(peak_at_start, 1),
            "rss_mb_after": round(rss, 1), "peak_rss_mb_after": round(peak, 1), "settle_s": settle,
            "catch_up": stopped[0] if stopped else None, "exit_code": code}


def freshen(path: Path, now: float) -> float:
    """Move a synthesized ledger's latest pings up to `now`, as if the daemon stopped a moment ago:
    each pair's last ping, its summary and the last TTL of rows shift by the same amount."""
    db = sqlite3.connect(path, isolation_level=None)
    latest = db.execute("SELECT MAX(last_ping) FROM pair_state").fetchone()[0]
    shift = now - 5.0 - latest
    db.execute("BEGIN")
    db.execute("UPDATE pair_state SET last_ping = last_ping + ?, last_refresh = last_refresh + ?", (shift, shift))
    db.execute("UPDATE pings SET time = time + ?, expires_at = expires_at + ? WHERE time >= ?", (shift, shift, latest - 600))
    db.execute("COMMIT")
    db.close()
    return shift


def startup(args: argparse.Namespace) -> dict[str, Any]:
    processes = Processes()
    work = Path(tempfile.mkdtemp(prefix="keepwarm-restart-"))
    try:
        _, url = start_emulator(processes, 1.0, 0.0)
        config = write_config(work, args.pairs, url, None)
        env = {"XDG_STATE_HOME": str(work / "state"), "ANTHROPIC_API_KEY": "sk-bench-restart", "MALLOC_ARENA_MAX": "2"}
        out: dict[str, Any] = {"pairs": args.pairs, "days_of_history": args.days}
        configs = {}
        for name in ("empty", "history", "migrated"):
            configs[name] = work / f"{name}.yaml"
            configs[name].write_text(config.read_text() + f"ledger: {{path: {name}.db}}\n")
        history = work / "history.db"
        # The rows as the previous schema held them, then the summaries the daemon keeps up to
        # date with every row, derived once here: the steady state of a week's run.
        out["synthesized"] = synthesize(history, configs["history"], args.days, time.time(), 2)
        began = time.monotonic()
        Ledger(history, 30).close()
        out["summaries_from_rows_s"] = round(time.monotonic() - began, 1)
        out["ledger_bytes"] = history.stat().st_size
        out["bytes_per_ping"] = round(out["ledger_bytes"] / out["synthesized"]["rows"], 1)
        kept = work / "history-kept.db"
        shutil.copyfile(history, kept)
        runs: dict[str, list[dict[str, Any]]] = {"empty": [], "history": []}
        for i in range(args.repeat):
            for name in ("empty", "history"):  # alternating, so the machine's noise hits both alike
                (work / "empty.db").unlink(missing_ok=True)
                if name == "history":
                    shutil.copyfile(kept, history)  # the run before pinged into it
                    freshen(history, time.time())
                runs[name].append(measure_start(processes, configs[name], work / f"{name}-{i}.log", env, args.settle))
        out["runs"] = runs
        out["median"] = {
            name: {key: statistics.median(r[key] for r in rs)
                   for key in ("seconds_to_started", "peak_rss_mb_at_started", "peak_rss_mb_after")}
            for name, rs in runs.items()
        }
        out["history_over_empty"] = {
            key: round(out["median"]["history"][key] / out["median"]["empty"][key], 3) for key in out["median"]["empty"]
        }
        if args.migrated:
            migrated = work / "migrated.db"
            run: dict[str, Any] = {"synthesized": synthesize(migrated, configs["migrated"], args.days, time.time(), 2)}
            run.update(measure_start(processes, configs["migrated"], work / "migrated.log", env, args.settle))
            out["migrated_at_start"] = run
        return out
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


# --- catch-up without state --------------------------------------------------------------------


def alive_at(rows: list[Any], at: float, ttl: float) -> dict[tuple[str, str], float]:
    """(expert, model) -> expiry of each cache a ledger's pings had alive at time `at`."""
    last: dict[tuple[str, str], float] = {}
    for row in rows:
        if row.time < at and row.result in ("warm", "rewarmed", "partial"):
            last[(row.expert, row.model)] = max(last.get((row.expert, row.model), 0.0), row.time)
    return {key: t + ttl for key, t in last.items() if t + ttl > at}


def catch_up_one(processes: Processes, pairs: int, rpm: int, scale: float, rng: random.Random) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="keepwarm-catchup-"))
    try:
        _, url = start_emulator(processes, scale, 0.0)
        config = write_config(work, pairs, url, None)
        if rpm:
            config.write_text(config.read_text().replace("api:\n", f"api:\n  requests_per_minute: {rpm}\n", 1))
        env = {"XDG_STATE_HOME": str(work / "state"), "ANTHROPIC_API_KEY": "sk-bench-catchup"}
        ledger = work / "state" / "keepwarm" / "ledger.db"
        interval, ttl = 240 * scale, 300 * scale
        first = daemon(processes, config, work / "a.log", env, "--time-scale", str(scale))
        wait_for_line(first, work / "a.log", STARTED, 600)
        time.sleep(interval * rng.uniform(1.2, 1.9))  # warm everywhere, then a random moment
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        killed = time.time()
        before = read_ledger(ledger)
        shutil.move(str(ledger.parent), str(work / "old-state"))  # state lost: a volume-less deploy
        second = daemon(processes, config, work / "b.log", env, "--time-scale", str(scale))
        wait_for_line(second, work / "b.log", STARTED, 600)
        up = time.time()
        time.sleep(ttl * 1.2 + (pairs * 60.0 / rpm if rpm else 0.0))
        processes.stop(second, 60)
        after = read_ledger(ledger)
        alive = alive_at(before, killed, ttl)
        firsts: dict[tuple[str, str], Any] = {}
        for row in after:
            firsts.setdefault((row.expert, row.model), row)
        lost = [k for k in alive if k in firsts and firsts[k].result == "rewarmed"]
        unpinged = [k for k in alive if k not in firsts]
        starts = sorted(r.time for r in firsts.values())
        catch = [e for e in events(work / "b.log") if e.get("event", "").startswith("catch-up:")]
        # The arithmetic: pair i starts at i x spacing (at least), its cache lives until its expiry.
        # requests_per_minute spaces real seconds: it is not scaled with the TTLs.
        spacing = 60.0 / rpm if rpm else 0.0
        predicted = sum(1 for i, expiry in enumerate(sorted(alive.values(), reverse=True))
                        if up + i * spacing > expiry)
        return {
            "pairs": pairs, "requests_per_minute": rpm or None, "time_scale": scale,
            "requests_per_minute_at_real_scale": rpm * scale if rpm else None,
            "downtime_s": round(up - killed, 2),
            "caches_alive_at_kill": len(alive),
            "lost": len(lost) + len(unpinged),
            "margin_s": round(50 * scale, 2),
            "catch_up_s_measured": round(starts[-1] - up, 2) if starts else None,
            "catch_up_s_planned": catch[0]["takes_s"] if catch else None,
            "lost_if_soonest_expiry_went_first": predicted,
            "log": catch[0] if catch else None,
        }
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def catch_up(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    runs = []
    for pairs in (int(p) for p in args.pairs.split(",")):
        for rpm in (int(r) for r in args.requests_per_minute.split(",")):
            scale = args.time_scale if pairs <= 2000 else args.large_time_scale
            runs.append(catch_up_one(Processes(), pairs, rpm, scale, rng))
            print(json.dumps(runs[-1]), flush=True)
    return {"runs": runs, "arithmetic": (
        "Without state every cache the old process kept warm has between TTL - interval - jitter (50 s) and the"
        " TTL (300 s) left at the kill. The catch-up pings pair i at about i x 60/requests_per_minute after start"
        " (and no faster than the workers answer); a cache is lost when that comes after its expiry."
    )}


# --- restarts with state -----------------------------------------------------------------------


def restarts_run(args: argparse.Namespace) -> dict[str, Any]:
    from keepwarm.emulator import Emulator

    rng = random.Random(args.seed)
    scale = args.time_scale
    work = Path(tempfile.mkdtemp(prefix="keepwarm-restarts-"))
    processes = Processes()
    prompt = "You answer for one desk of a research department, with numbers and sources. " * 80
    try:
        with Emulator(time_scale=scale, log_limit=10**7) as emu:
            lines = ["api:", f"  base_url: {emu.base_url}", "defaults:", "  models: [claude-sonnet-4-6]",
                     "budget:", "  usd_per_day: 1000", "metrics:", "  listen: 127.0.0.1:0", "experts:"]
            for i in range(args.pairs):
                lines += [f"  - name: desk-{i:05d}", "    system:", f"      - text: \"Desk {i:05d}. {prompt}\""]
            config = work / "keepwarm.yaml"
            config.write_text("\n".join(lines) + "\n")
            env = {"XDG_STATE_HOME": str(work / "state"), "ANTHROPIC_API_KEY": "sk-bench-restarts"}
            interval, ttl = 240 * scale, 300 * scale
            lives: list[tuple[float, subprocess.Popen[str], Path, str]] = []

            def start(how: str) -> None:
                log = work / f"daemon-{len(lives)}.log"
                proc = daemon(processes, config, log, env, "--time-scale", str(scale))
                lives.append((time.time(), proc, log, how))

            stops: list[float] = []

            startups: list[float] = []
            start("first")
            startups.append(wait_for_line(lives[-1][1], lives[-1][2], STARTED, 300))
            time.sleep(interval * 1.2)
            for cycle in range(args.cycles):
                how = signal.SIGTERM if cycle % 2 == 0 else signal.SIGKILL
                time.sleep(rng.uniform(0.2, 1.0) * interval)
                proc = lives[-1][1]
                stops.append(time.time())
                proc.send_signal(how)
                proc.wait(60)
                start(how.name)
                startups.append(wait_for_line(lives[-1][1], lives[-1][2], STARTED, 300))
            time.sleep(ttl * 1.5)
            processes.stop(lives[-1][1], 60)
            entries = [e for e in emu.log if e.path.endswith("/v1/messages") and e.fingerprint and e.usage]
        ledger = work / "state" / "keepwarm" / "ledger.db"
        rows = read_ledger(ledger)
        recorded = {r.request_id for r in rows}
        writes: dict[str, int] = defaultdict(int)
        by_pair: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for e in entries:
            by_pair[e.fingerprint or ""].append((e.time, e.request_id))
            if (e.usage or {}).get("cache_creation_input_tokens"):
                writes[e.fingerprint or ""] += 1
        # Each re-write: how long after the pair's previous request, and after which restart.
        rewrites = []
        for pings in by_pair.values():
            for (a, _), (b, b_id) in zip(pings, pings[1:]):
                entry = next(e for e in entries if e.request_id == b_id)
                if (entry.usage or {}).get("cache_creation_input_tokens"):
                    since_stop = [b - t for t in stops if t <= b]
                    rewrites.append({"gap_s": round(b - a, 2), "after_stop_s": round(min(since_stop), 2) if since_stop else None})
        duplicates = in_flight = 0
        close = []
        for pings in by_pair.values():
            for (a, a_id), (b, _) in zip(pings, pings[1:]):
                if b - a < interval - 0.05:
                    since_stop = [b - t for t in stops if t <= b]
                    close.append({"gap_s": round(b - a, 2), "first_recorded": a_id in recorded,
                                  "after_stop_s": round(min(since_stop), 2) if since_stop else None})
                    if a_id in recorded:
                        duplicates += 1
                    else:
                        in_flight += 1
        budget = []
        for started, _, log, how in lives[1:]:
            restored = [e for e in events(log) if e.get("event", "").startswith("budget: the spend")]
            before = math.fsum(sum((r.costs or {}).values()) for r in rows if r.time < started)
            budget.append({"restart": how, "ledger_usd_before": before,
                           "restored_usd": restored[0]["spent_usd"] if restored else None})
        return {
            "pairs": args.pairs, "time_scale": scale, "restarts": [how for _, _, _, how in lives[1:]],
            "pings": len(entries),
            "caches_written_more_than_once": sum(1 for n in writes.values() if n > 1),
            "rewrites_beyond_the_first": sum(n - 1 for n in writes.values() if n > 1),
            "pinged_twice_within_an_interval": duplicates,
            "resent_after_a_sigkill_in_flight": in_flight,
            "budget": budget,
            "startup_s": [round(wait, 2) for wait in startups],
            "downtime_s": [round(lives[i + 1][0] - stops[i], 2) for i in range(len(stops))],
            "rewrites": rewrites[:50],
            "pings_closer_than_an_interval": close[:50],
            "margin_s": round((300 - 240 - 10) * scale, 2),
        }
    finally:
        processes.stop_all()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("startup")
    s.add_argument("--pairs", type=int, default=10_000)
    s.add_argument("--days", type=float, default=7.0)
    s.add_argument("--settle", type=float, default=30.0)
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--migrated", action="store_true", help="also time the one-off migration of the same week at start")
    c = sub.add_parser("catch-up")
    c.add_argument("--pairs", default="1000,10000")
    c.add_argument("--requests-per-minute", default="0,6000")
    c.add_argument("--time-scale", type=float, default=0.1)
    c.add_argument("--large-time-scale", type=float, default=0.5, help="for more than 2,000 pairs")
    c.add_argument("--seed", type=int, default=18)
    r = sub.add_parser("restarts")
    r.add_argument("--pairs", type=int, default=400)
    r.add_argument("--cycles", type=int, default=6)
    r.add_argument("--time-scale", type=float, default=0.1)
    r.add_argument("--seed", type=int, default=18)
    args = parser.parse_args(argv)
    run = {"startup": startup, "catch-up": catch_up, "restarts": restarts_run}[args.mode]
    figures = {"machine": machine(), "tree": tree(), "mode": args.mode, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **run(args)}
    text = json.dumps(figures, indent=2)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"restart-{args.mode}.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
