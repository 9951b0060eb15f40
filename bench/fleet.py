"""A fleet on PostgreSQL: what members sharing a database cost it, and what a member's death costs the caches.

    flock /tmp/keepwarm-heavy.lock python3 bench/fleet.py [--pairs 1000] [--members 3] [--time-scale 0.1]

Starts a throwaway PostgreSQL (as bench/postgres_store.py does: default durability, unix socket
only), a time-scaled emulator, and MEMBERS `keepwarm run` processes sharing one database and one
`fleet:`. PAIRS at TIME_SCALE ping as often as PAIRS / TIME_SCALE pairs do in real time (1,000
at 0.1: the rate of 10,000). The run, in scaled time:

1. all members start at once; once every cache is written, one interval of steady state, over
   which the database's transactions/s (pg_stat_database.xact_commit), rows/s (tup_inserted +
   tup_updated) and growth (pg_database_size) are measured against the pings recorded;
2. one member is killed with SIGKILL at a random moment: the takeover time is from the kill until
   the survivors' `keepwarm_fleet_owned_pairs` add up to every pair again;
3. after 1.5 TTLs it is started again (a join: the time from its start until it owns pairs and
   the members own every pair between them), then 1.5 TTLs more, and every member is stopped.

Reported: lapses (caches written more than once; goal 0), the takeover time (measured, and in
real time: divided by the scale), pairs pinged twice within an interval after each membership
change, the database's rates (the lease renewals run 1/scale times as often as in real time: they
are counted apart, from their own rate, and taken out of the projection), and the growth per day
at PAIRS / TIME_SCALE pairs. Also: the CPU each part spent per ping over the steady window (the
members, this process with the emulator in it, the database server), for projecting past what
this machine can run; the members' membership changes and late renewals from their logs (a drop
of a live member is a flap); and the part of the takeover that is the lease's (until the last
survivor's view dropped the killed member). Writes bench/results/fleet-<pairs/scale>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from postgres_store import throwaway_server  # noqa: E402
from scale import Processes, machine, tree  # noqa: E402

from keepwarm.emulator import Emulator  # noqa: E402

RESULTS = REPO / "bench" / "results"
STARTED = '"event": "keepwarm started"'
PINGS_PER_DAY = 86400 / 240  # the default interval of a 5m pair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """Each metric's sum over its samples, from a member's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    sums: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sums[s.name] += s.value
    return sums


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def postgres_pids() -> list[int]:
    """The bench server's postmaster (its data directory is under a keepwarm-bench-pg- directory)
    and its children: the members' backends, the WAL writer, the checkpointer."""
    parents: dict[int, int] = {}
    postmaster = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if b"keepwarm-bench-pg-" in cmdline and b"postgres" in cmdline:
            postmaster = int(entry.name)
    if postmaster is None:
        return []
    return [postmaster, *(pid for pid, parent in parents.items() if parent == postmaster)]


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def cpu_snapshot(members: list[Member]) -> dict[str, float]:
    """CPU seconds so far: each member, this process (the emulator runs in it), the database, the machine."""
    busy, total = machine_busy()
    return {"members": sum(cpu_seconds(m.proc.pid) for m in members), "bench_and_emulator": cpu_seconds(os.getpid()),
            "postgres": sum(cpu_seconds(pid) for pid in postgres_pids()), "machine_busy": busy, "machine_total": total}


def fleet_events(members: list[Member], t0_wall: float) -> list[dict[str, Any]]:
    """Every member's membership changes and lease failures, from its log, in seconds from the start."""
    out = []
    for index, m in enumerate(members):
        for line in m.log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event", "").startswith("fleet:"):
                at = datetime.fromisoformat(ev["ts"]).timestamp() - t0_wall
                out.append({"t": round(at, 2), "member": index, "event": ev["event"], "members": ev.get("members"),
                            "left": ev.get("left"), "joined": ev.get("joined"),
                            **{k: ev[k] for k in ("since_last_s", "took_s") if k in ev}})
    return sorted(out, key=lambda e: e["t"])


def db_stats(admin: str, dbname: str) -> dict[str, float]:
    """The bench database's counters and size, and the lease table's writes."""
    with psycopg.connect(admin, autocommit=True) as conn:
        commits, inserted, updated = conn.execute(
            "SELECT xact_commit, tup_inserted, tup_updated FROM pg_stat_database WHERE datname = %s", (dbname,)
        ).fetchone() or (0, 0, 0)
        size = conn.execute("SELECT pg_database_size(%s)", (dbname,)).fetchone()
    with psycopg.connect(admin.replace("dbname=postgres", f"dbname={dbname}"), autocommit=True) as conn:
        pings = conn.execute("SELECT count(*) FROM pings").fetchone()
        lease = conn.execute(
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables WHERE relname = 'members'"
        ).fetchone()
    return {"time": time.time(), "commits": float(commits), "rows": float(inserted + updated),
            "bytes": float(size[0] if size else 0), "pings": float(pings[0] if pings else 0),
            "lease_rows": float(lease[0] if lease else 0)}


class Member:
    """One `keepwarm run` of the fleet, with its own metrics port."""

    def __init__(self, processes: Processes, work: Path, index: int, doc: list[str], scale: float) -> None:
        self.port = free_port()
        self.config = work / f"member-{index}.yaml"
        self.config.write_text("\n".join([*doc, "metrics:", f"  listen: 127.0.0.1:{self.port}"]) + "\n")
        self.log = work / f"member-{index}-{time.monotonic_ns()}.log"
        self.proc = processes.start(
            [sys.executable, "-m", "keepwarm", "run", "--log-format", "json", "--config", str(self.config),
             "--time-scale", str(scale)],
            extra_env={"ANTHROPIC_API_KEY": "sk-bench-fleet", "XDG_STATE_HOME": str(work / f"state-{index}")},
            stdout=subprocess.DEVNULL, stderr=self.log.open("w"),
        )

    def started(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"member exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        return STARTED in self.log.read_text(errors="replace")


def wait(what: str, check: Any, timeout: float) -> float:
    """Seconds until `check()` is true; raises after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)
    return time.monotonic() - start


def owned_total(members: list[Member]) -> float:
    total = 0.0
    for m in members:
        try:
            total += scrape(m.port).get("keepwarm_fleet_owned_pairs", 0.0)
        except OSError:
            return -1.0
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    scale, pairs = args.time_scale, args.pairs
    interval, ttl = 240 * scale, 300 * scale
    work = Path(tempfile.mkdtemp(prefix="keepwarm-bench-fleet-"))
    processes = Processes()
    prompt = "You answer for one desk of a research department, with numbers and sources. " * 80
    with throwaway_server() as admin:
        dbname = "fleet"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE fleet")
            empty = conn.execute("SELECT pg_database_size('fleet')").fetchone()
        url = admin.replace("dbname=postgres", f"dbname={dbname}")
        try:
            with Emulator(time_scale=scale, log_limit=10**7) as emu:
                doc = ["api:", f"  base_url: {emu.base_url}", "defaults:", "  models: [claude-sonnet-4-6]",
                       "budget:", "  usd_per_day: 100000", "ledger:", f"  url: \"{url}\"",
                       "fleet:", "  name: bench", "  lease: 20s", "experts:"]
                for i in range(pairs):
                    doc += [f"  - name: desk-{i:05d}", "    system:", f"      - text: \"Desk {i:05d}. {prompt}\""]
                members = [Member(processes, work, i, doc, scale) for i in range(args.members)]
                # The emulator's log times are its monotonic clock: the changes are timed on it too.
                t0, t0_wall = time.monotonic(), time.time()
                wait("start-up", lambda: all(m.started() for m in members), 300)

                def writes() -> dict[str, int]:
                    counts: dict[str, int] = defaultdict(int)
                    for e in list(emu.log):
                        if e.fingerprint and (e.usage or {}).get("cache_creation_input_tokens"):
                            counts[e.fingerprint] += 1
                    return counts

                warm = wait("every cache written", lambda: len(writes()) >= pairs, 600)
                changes: list[tuple[str, float]] = [("start", t0)]
                before, cpu_before = db_stats(admin, dbname), cpu_snapshot(members)
                time.sleep(interval)
                after, cpu_after = db_stats(admin, dbname), cpu_snapshot(members)

                time.sleep(rng.uniform(0.1, 0.9) * interval)
                victim = members[0]
                victim.proc.kill()
                killed = time.monotonic()
                changes.append(("kill", killed))
                survivors = members[1:]
                takeover = wait("the takeover", lambda: owned_total(survivors) == pairs, 120)
                time.sleep(ttl * 1.5)
                members[0] = Member(processes, work, 0, doc, scale)
                joined = time.monotonic()
                changes.append(("join", joined))
                wait("the join", lambda: members[0].started(), 300)
                wait("the re-division", lambda: owned_total(members) == pairs
                              and scrape(members[0].port).get("keepwarm_fleet_owned_pairs", 0) > 0, 120)
                rejoin = time.monotonic() - joined
                time.sleep(ttl * 1.5)
                final = db_stats(admin, dbname)
                late = [scrape(m.port) for m in members]
                handovers = sum(scrape(m.port).get("keepwarm_fleet_handovers_total", 0) for m in members)
                lease_failures = sum(scrape(m.port).get("keepwarm_fleet_lease_failures_total", 0) for m in members)
                stopping = time.monotonic()
                for m in members:
                    processes.stop(m.proc, 60)
                events = fleet_events([victim, *members], t0_wall)
                entries = [e for e in emu.log if e.path.endswith("/v1/messages") and e.fingerprint and e.usage]
        finally:
            processes.stop_all()
            shutil.rmtree(work, ignore_errors=True)

    by_pair: dict[str, list[float]] = defaultdict(list)
    written: dict[str, int] = defaultdict(int)
    for e in entries:
        by_pair[e.fingerprint or ""].append(e.time)
        if (e.usage or {}).get("cache_creation_input_tokens"):
            written[e.fingerprint or ""] += 1
    lapses = sum(n - 1 for n in written.values() if n > 1)
    # A pair pinged twice within an interval, put down to the latest membership change before it.
    close: dict[str, int] = defaultdict(int)
    for times in by_pair.values():
        for a, b in zip(times, times[1:]):
            if b - a < interval - 0.05:
                change = max((c for c in changes if c[1] <= b), key=lambda c: c[1], default=("none", 0.0))
                close[change[0]] += 1
    seconds = after["time"] - before["time"]
    pings = after["pings"] - before["pings"]
    lease_rows = after["lease_rows"] - before["lease_rows"]
    # A renewal is one transaction and one row; at the real lease it runs `scale` times as often.
    lease_per_s = lease_rows / seconds
    real_pairs = pairs / scale
    # Growth: what the database holds per recorded ping at the end, over an empty database
    # (pair state and lease rows are counted in too: a slight over-estimate for a short run).
    bytes_per_ping = (final["bytes"] - float(empty[0] if empty else 0)) / final["pings"] if final["pings"] else None
    window_bytes_per_ping = (after["bytes"] - before["bytes"]) / pings if pings else None
    window_pings = max(pings, 1.0)
    cpu = {k: round(cpu_after[k] - cpu_before[k], 2) for k in cpu_before}
    changes_seen = [e for e in events if e["event"] == "fleet: members changed"]
    result = {
        "pairs": pairs, "members": args.members, "time_scale": scale, "ping_rate_of_pairs": real_pairs,
        "start_up_until_every_cache_written_s": round(warm, 1),
        "lapses": lapses,
        "takeover_s": round(takeover, 2), "takeover_real_time_s": round(takeover / scale, 1),
        "join_until_redivided_s": round(rejoin, 2),
        "pinged_twice_within_interval_by_change": dict(close),
        "handovers_total_after": handovers, "lease_failures_total": lease_failures,
        "pings": len(entries),
        "database": {
            "window_s": round(seconds, 1), "pings_recorded_per_s": round(pings / seconds, 2),
            "transactions_per_s": round((after["commits"] - before["commits"]) / seconds, 1),
            "rows_per_s": round((after["rows"] - before["rows"]) / seconds, 1),
            "lease_rows_per_s_measured": round(lease_per_s, 2),
            "transactions_per_s_real_time": round((after["commits"] - before["commits"]) / seconds
                                                  - lease_per_s * (1 - scale), 1),
            "bytes_per_ping": round(bytes_per_ping) if bytes_per_ping else None,
            "bytes_per_ping_steady_window": round(window_bytes_per_ping) if window_bytes_per_ping else None,
            "pings_recorded_at_end": final["pings"],
            "growth_per_day_bytes": round(bytes_per_ping * real_pairs * PINGS_PER_DAY) if bytes_per_ping else None,
            "size_at_end_bytes": final["bytes"], "size_empty_bytes": float(empty[0] if empty else 0),
        },
        # CPU over the steady window: what a ping costs each part, for projecting to more pairs.
        "cpu_steady_window_s": cpu,
        "cpu_ms_per_ping": {k: round(1000 * cpu[k] / window_pings, 3) for k in ("members", "bench_and_emulator", "postgres")},
        "machine_busy_share_steady_window": round(cpu["machine_busy"] / cpu["machine_total"], 3) if cpu["machine_total"] else None,
        "lateness": {
            "pings": sum(m.get("keepwarm_ping_lateness_seconds_count", 0) for m in late),
            "mean_s": round(sum(m.get("keepwarm_ping_lateness_seconds_sum", 0) for m in late)
                            / max(1.0, sum(m.get("keepwarm_ping_lateness_seconds_count", 0) for m in late)), 3),
        },
        # Each member's view changes: the start, the kill and the join move pairs; any more is a flap.
        "membership_changes_seen": len(changes_seen),
        "phases_s": {"kill": round(killed - t0, 2), "join": round(joined - t0, 2), "stop": round(stopping - t0, 2)},
        # The lease's part of the takeover: until the last survivor's view dropped the killed member
        # (the rest, until they own its pairs, is resuming them and a scrape of each member).
        "view_changed_after_kill_s": round(max((e["t"] for e in changes_seen if e["left"] and killed - t0 < e["t"]
                                                 < killed - t0 + takeover + 1.0), default=float("nan")) - (killed - t0), 2),
        # Drops of a member that was alive: any outside the kill's takeover and the final stop is a flap.
        "members_dropped_while_alive": sum(1 for e in changes_seen if e["left"] and (
            e["t"] < killed - t0 or killed - t0 + takeover + 1.0 < e["t"] < stopping - t0)),
        "late_renewals": sum(1 for e in events if e["event"].startswith("fleet: the lease was renewed late")),
        "fleet_events": events[:400],
        "machine": machine(), "tree": tree(),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--time-scale", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args(argv)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "tree")}, indent=2))
    out = RESULTS / f"fleet-{round(args.pairs / args.time_scale)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
