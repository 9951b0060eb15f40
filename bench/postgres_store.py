"""The PostgreSQL store: what a ping costs the database, and how fast one daemon can write.

    python3 bench/postgres_store.py [--pairs 10000] [--rounds 5] [--threads 8] [--url URL]

Records ROUNDS pings for each of PAIRS pairs through `PostgresLedger.record` (the daemon's path:
one commit per ping, the summaries in the same transaction) from THREADS threads, as the worker
pool does, then measures the tables (rows, indexes and TOAST together, after VACUUM), the WAL
written per ping (what a replica or a backup ships), and the commit rate. From those it projects
a day at PAIRS pairs with the default 4-minute interval (360 pings a pair a day) and the default
30-day retention.

Without --url it starts a throwaway PostgreSQL (Debian's `postgresql` package: initdb and pg_ctl
in a temporary directory, as `nobody` when run as root, default durability settings, listening on
a unix socket only) and removes it at the end. Writes bench/results/postgres-store.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keepwarm.classify import Usage, classify  # noqa: E402
from keepwarm.config import Pair, parse_config  # noqa: E402
from keepwarm.ping import PingAttempt  # noqa: E402
from keepwarm.pricing import builtin_table  # noqa: E402
from keepwarm.runner import PingOutcome  # noqa: E402
from keepwarm.store.postgres import PostgresLedger  # noqa: E402

PINGS_PER_DAY = 86400 / 240  # the default interval of a 5m pair
RETENTION_DAYS = 30
TABLES = ("pings", "observations", "pair_state", "spend", "hours")


@contextmanager
def throwaway_server() -> Iterator[str]:
    """A PostgreSQL cluster in a temporary directory, on a unix socket there; its conninfo."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not bins:
        sys.exit("no PostgreSQL server binaries: apt-get install postgresql (or pass --url)")
    bindir = bins[-1].parent
    # runuser lives in /usr/sbin, which a minimal PATH leaves out.
    runuser = shutil.which("runuser", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])) or "runuser"
    owner = [runuser, "-u", "nobody", "--"] if os.geteuid() == 0 else []
    base = Path(tempfile.mkdtemp(prefix="keepwarm-bench-pg-"))
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    for d in (data, sock):
        d.mkdir()
        if owner:
            shutil.chown(d, "nobody")
    try:
        subprocess.run([*owner, str(bindir / "initdb"), "-D", str(data), "-U", "keepwarm", "--auth-local=trust",
                        "-E", "UTF8", "--no-instructions"], check=True, capture_output=True)
        subprocess.run([*owner, str(bindir / "pg_ctl"), "-D", str(data), "-o", f"-k {sock} -c listen_addresses=''",
                        "-l", str(data / "server.log"), "-w", "start"], check=True, capture_output=True)
        yield f"host={sock} user=keepwarm dbname=postgres"
    finally:
        subprocess.run([*owner, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def make_pairs(n: int) -> list[Pair]:
    """N pairs shaped like a real config's: one priced model, 64-hex fingerprints, distinct experts."""
    base = parse_config({"experts": [{"name": "analyst", "system": [{"text": "You are careful. " * 200}],
                                      "models": ["claude-sonnet-4-6"]}]}, ROOT).pairs[0]
    return [dataclasses.replace(base, expert=f"expert-{i:05d}", fingerprint=hashlib.sha256(str(i).encode()).hexdigest())
            for i in range(n)]


def ping(pair: Pair, started: float, prices: object, i: int) -> PingOutcome:
    """A warm ping as the runner records it: one attempt, a request id, priced."""
    usage = Usage(input=8, cache_read=1500, output=1)
    attempt = PingAttempt(started_wall=started, latency=0.8, usage=usage, request_id=f"req_{i:024x}", error=None)
    cost = prices.cost(pair.model, usage)  # type: ignore[attr-defined]
    return PingOutcome(pair, classify(usage), started, 0.8, (attempt,), usage, cost, started + 300.8)


def sizes(conn: psycopg.Connection) -> dict[str, int]:
    return {t: int(conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]) for t in TABLES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--url", help="an empty database to use instead of a throwaway server")
    args = parser.parse_args()
    pairs, prices = make_pairs(args.pairs), builtin_table()
    with (throwaway_server() if args.url is None else _given(args.url)) as url:
        ledger = PostgresLedger(url)
        admin = psycopg.connect(url, autocommit=True)
        server = admin.execute("SHOW server_version").fetchone()[0]
        wal_before = admin.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        t0 = 1_800_000_000.0
        work = [(pair, t0 + 240 * r + 240 * k / len(pairs)) for r in range(args.rounds) for k, pair in enumerate(pairs)]
        chunks = [work[i::args.threads] for i in range(args.threads)]

        def writer(chunk: list[tuple[Pair, float]], offset: int) -> None:
            for j, (pair, at) in enumerate(chunk):
                ledger.record(ping(pair, at, prices, offset + j * args.threads))

        started = time.perf_counter()
        threads = [threading.Thread(target=writer, args=(c, i)) for i, c in enumerate(chunks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        ledger.close()
        assert ledger.write_errors == 0, ledger.write_errors
        wal = int(admin.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (wal_before,)).fetchone()[0])
        admin.execute("VACUUM ANALYZE")
        table_bytes = sizes(admin)
        n = int(admin.execute("SELECT COUNT(*) FROM pings").fetchone()[0])
        admin.close()
    assert n == len(work), (n, len(work))
    per_ping = table_bytes["pings"] / n
    per_day = PINGS_PER_DAY * args.pairs
    result = {
        "server_version": server,
        "pairs": args.pairs,
        "pings": n,
        "threads": args.threads,
        "seconds": round(elapsed, 2),
        "pings_per_second": round(n / elapsed, 1),
        "table_bytes": table_bytes,
        "bytes_per_ping_pings_table": round(per_ping, 1),
        "wal_bytes_per_ping": round(wal / n, 1),
        "summaries_bytes": sum(v for k, v in table_bytes.items() if k != "pings"),
        "projection": {
            "pings_per_day": int(per_day),
            "pings_table_gb_per_day": round(per_ping * per_day / 1e9, 2),
            "wal_gb_per_day": round(wal / n * per_day / 1e9, 2),
            "pings_table_gb_at_retention": round(per_ping * per_day * RETENTION_DAYS / 1e9, 1),
            "retention_days": RETENTION_DAYS,
            "commits_per_second_needed": round(per_day / 86400, 1),
        },
        "command": "python3 bench/postgres_store.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "postgres-store.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    main()
