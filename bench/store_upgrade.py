"""What the account/provider upgrade costs an existing ledger: the first open of a keepwarm that
records where each row's cache lives, on a ledger written before it.

    python3 bench/store_upgrade.py [--pings 1000000] [--observations 200000] [--url URL]

Builds a SQLite ledger at schema version 5 and a PostgreSQL ledger at migration 2 (without the
account, provider and endpoint columns), each holding PINGS pings and OBSERVATIONS observations,
then times the first open by this keepwarm (`Ledger`, `PostgresLedger`: the migration and, for
SQLite, the WAL checkpoint at close), and checks that it rewrote no row: the SQLite file keeps its
size, and PostgreSQL's tables keep their file node. Then times one report read of every row.
Without --url it starts a throwaway PostgreSQL as bench/postgres_store.py does. Writes
bench/results/store-upgrade.json.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from postgres_store import _given, make_pairs, ping, throwaway_server  # noqa: E402

from keepwarm.pricing import builtin_table  # noqa: E402
from keepwarm.store import Ledger, PostgresTarget, read_ledger  # noqa: E402
from keepwarm.store import sqlite as lite  # noqa: E402
from keepwarm.store.base import COLUMNS, OBSERVATION_COLUMNS, PLACE_COLUMNS, _row_values  # noqa: E402
from keepwarm.store.postgres import PostgresLedger  # noqa: E402

OLD_PINGS = [c for c in COLUMNS if c not in PLACE_COLUMNS]
OLD_OBSERVATIONS = [c for c in OBSERVATION_COLUMNS if c not in PLACE_COLUMNS]
T0 = 1_790_000_000.0


def rows(pings: int, observations: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Pings of 1,000 pairs four minutes apart, and observations shaped like the Observer's rows."""
    pairs, prices = make_pairs(1000), builtin_table()
    template = _row_values(ping(pairs[0], T0, prices, 0))[: len(OLD_PINGS)]
    at = OLD_PINGS.index("time")
    expert = OLD_PINGS.index("expert")
    out_pings = []
    for i in range(pings):
        row = list(template)
        row[at], row[expert] = T0 + 240 * (i // 1000), pairs[i % 1000].expert
        out_pings.append(tuple(row))
    obs = dict.fromkeys(OLD_OBSERVATIONS, 0)
    obs.update(ttl="5m", model="claude-sonnet-4-6", fingerprint="f" * 64, result="warm", cache_read=1500, origin="api",
               observed_fingerprint=None, drift=None, saved_usd=None)
    out_obs = []
    for i in range(observations):
        obs.update(time=T0 + i, received=T0 + i, expert=pairs[i % 1000].expert, request_id=f"req_{i:024x}")
        out_obs.append(tuple(obs[c] for c in OLD_OBSERVATIONS))
    return out_pings, out_obs


def sqlite_upgrade(path: Path, pings: list[tuple[Any, ...]], observations: list[tuple[Any, ...]]) -> dict[str, Any]:
    with sqlite3.connect(path) as db:  # the schema keepwarm wrote at version 5
        for step in lite.MIGRATIONS[:5]:
            step(db)
        db.execute("PRAGMA user_version = 5")
        db.executemany(f"INSERT INTO pings ({', '.join(OLD_PINGS)}) VALUES ({', '.join('?' * len(OLD_PINGS))})", pings)
        db.executemany(f"INSERT INTO observations ({', '.join(OLD_OBSERVATIONS)})"
                       f" VALUES ({', '.join('?' * len(OLD_OBSERVATIONS))})", observations)
    db.close()
    before = path.stat().st_size
    start = time.perf_counter()
    Ledger(path).close()
    opened = time.perf_counter() - start
    start = time.perf_counter()
    read = read_ledger(path)
    return {"file_bytes_before": before, "file_bytes_after": path.stat().st_size, "first_open_seconds": round(opened, 3),
            "report_read_seconds": round(time.perf_counter() - start, 3), "rows_read": len(read),
            "default_account": read[0].account}


def postgres_upgrade(url: str, pings: list[tuple[Any, ...]], observations: list[tuple[Any, ...]]) -> dict[str, Any]:
    PostgresLedger(url).close()  # the current schema, then back to migration 2's shape
    with psycopg.connect(url, autocommit=True) as conn:
        for table in ("pings", "observations"):
            conn.execute(f"ALTER TABLE {table} " + ", ".join(f"DROP COLUMN {c}" for c in PLACE_COLUMNS))  # type: ignore[arg-type]
        conn.execute("DELETE FROM keepwarm_schema WHERE version > 2")
        conn.execute("VACUUM FULL pings")  # as a table that never had the columns
        conn.execute("VACUUM FULL observations")
        for table, columns, data in (("pings", OLD_PINGS, pings), ("observations", OLD_OBSERVATIONS, observations)):
            with conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:  # type: ignore[arg-type]
                for row in data:
                    copy.write_row(row)
        conn.execute("VACUUM ANALYZE")
        nodes = conn.execute("SELECT pg_relation_filenode('pings'), pg_relation_filenode('observations')").fetchone()
        size = conn.execute("SELECT pg_total_relation_size('pings') + pg_total_relation_size('observations')").fetchone()
    start = time.perf_counter()
    PostgresLedger(url).close()
    opened = time.perf_counter() - start
    with psycopg.connect(url, autocommit=True) as conn:
        after = conn.execute("SELECT pg_relation_filenode('pings'), pg_relation_filenode('observations')").fetchone()
        size_after = conn.execute("SELECT pg_total_relation_size('pings') + pg_total_relation_size('observations')").fetchone()
    start = time.perf_counter()
    read = read_ledger(PostgresTarget(url))
    return {"table_bytes_before": size[0] if size else None, "table_bytes_after": size_after[0] if size_after else None,
            "rewritten": nodes != after, "first_open_seconds": round(opened, 3),
            "report_read_seconds": round(time.perf_counter() - start, 3), "rows_read": len(read),
            "default_account": read[0].account}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pings", type=int, default=1_000_000)
    parser.add_argument("--observations", type=int, default=200_000)
    parser.add_argument("--url", help="an empty PostgreSQL database to use instead of a throwaway server")
    args = parser.parse_args()
    pings, observations = rows(args.pings, args.observations)
    result: dict[str, Any] = {"pings": args.pings, "observations": args.observations}
    with tempfile.TemporaryDirectory(prefix="keepwarm-bench-upgrade-") as tmp:
        result["sqlite"] = sqlite_upgrade(Path(tmp) / "v5.db", pings, observations)
        print("sqlite", result["sqlite"], flush=True)
    with (_given(args.url) if args.url else throwaway_server()) as url:
        result["postgres"] = postgres_upgrade(url, pings, observations)
        print("postgres", result["postgres"], flush=True)
    out = ROOT / "bench" / "results" / "store-upgrade.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
