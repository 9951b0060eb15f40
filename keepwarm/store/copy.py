"""`keepwarm ledger copy`: a SQLite ledger's rows and summaries into a PostgreSQL ledger.

A move to a fleet should keep the history: the report's days, each pair's last touches (so the
first start on PostgreSQL resumes rather than re-writes every cache) and the budget's spend. The
copy runs in one transaction, so it either lands whole or leaves the target as it was; it refuses
a target that already holds rows, so it cannot count money twice, and running it again after a
success says so rather than copying again.
"""

from __future__ import annotations

import contextlib
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psycopg

from keepwarm.store import sqlite as lite
from keepwarm.store.base import COLUMNS, OBSERVATION_COLUMNS
from keepwarm.store.location import PostgresTarget
from keepwarm.store.postgres import _message, connect, migrate
from keepwarm.store.sqlite import LedgerError

TABLES = ("pings", "observations", "pair_state", "spend", "hours")
SUMMARIES = {
    "pair_state": ("origin", "expert", "model", "fingerprint", "last_ping", "last_result", "last_refresh", "prefix_tokens",
                   "last_production", "last_request"),
    "spend": ("origin", "bucket", "usd"),
    "hours": ("origin", "expert", "model", "hour", "ping_usd", "ping_unpriced", "requests", "cache_read", "cache_write",
              "saved_usd", "drift"),
}
# Version 3 added the summaries this copy carries over; an older file is brought up to it first.
SUMMARY_VERSION = 3


@contextlib.contextmanager
def _source(path: Path) -> Iterator[sqlite3.Connection]:
    """The SQLite ledger to read, at schema version 3 or later; an older one is migrated in a
    temporary copy (its summaries derived from its rows), never in place."""
    with lite._readonly(path) as db:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version >= SUMMARY_VERSION:
            yield db
            return
        with tempfile.TemporaryDirectory(prefix="keepwarm-copy-") as tmp:
            copy = Path(tmp) / "ledger.db"
            with sqlite3.connect(copy) as out:
                db.backup(out)  # consistent even while a daemon writes the file
            out.close()
            lite.Ledger(copy).close()  # migrates, deriving the summaries from the rows
            with lite._readonly(copy) as migrated:
                yield migrated


def copy_ledger(source: Path, target: PostgresTarget, batch: int = 10_000) -> dict[str, int]:
    """Copy every row (all origins) and the summaries of the SQLite ledger `source` into the
    PostgreSQL ledger `target`, migrating its schema first; return the rows copied per table.
    Raise LedgerError when either side cannot be used or the target already holds rows."""
    conn = connect(target)
    counts: dict[str, int] = {}
    try:
        conn.execute("SET statement_timeout = 0")  # one COPY moves the whole table: it takes what it takes
        migrate(conn, str(target))
        with _source(source) as db, conn.transaction():
            # Taken before the check: a daemon already writing to the target waits for the copy
            # and adds its rows after it, instead of racing the emptiness test.
            conn.execute(f"LOCK TABLE {', '.join(TABLES)} IN EXCLUSIVE MODE")
            held = {t: _count(conn, t) for t in TABLES}
            if any(held.values()):
                found = ", ".join(f"{n} {t}" for t, n in held.items() if n)
                raise LedgerError(
                    f"ledger {target} already holds rows ({found}): a copy goes into an empty ledger only, so that no"
                    " ping or dollar is counted twice (was it copied already?)"
                )
            tables: dict[str, tuple[str, ...]] = {"pings": COLUMNS, "observations": OBSERVATION_COLUMNS, **SUMMARIES}
            for table, columns in tables.items():
                if table in ("pings", "observations"):
                    # A file from before account and provider (schema 6) is read as the report
                    # reads it, its rows in the default account: no migration for a select.
                    cursor = db.execute(f"SELECT {lite._columns(db, table, columns)} FROM {table} ORDER BY id")
                else:
                    cursor = db.execute(f"SELECT {', '.join(columns)} FROM {table}")
                counts[table] = _copy_rows(conn, table, columns, cursor, batch)
    except psycopg.Error as exc:
        raise LedgerError(f"ledger {target}: the copy failed and was rolled back: {_message(exc, None, target)}") from None
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {source}: cannot read it: {exc}") from None
    finally:
        conn.close()
    return counts


def _count(conn: psycopg.Connection[Any], table: str) -> int:
    row = conn.execute(cast(Any, f"SELECT COUNT(*) FROM {table}")).fetchone()
    return int(row[0]) if row else 0


def _copy_rows(conn: psycopg.Connection[Any], table: str, columns: tuple[str, ...], rows: sqlite3.Cursor, batch: int) -> int:
    """Stream a cursor's rows into `table` with COPY, `batch` at a time from SQLite: memory stays flat."""
    n = 0
    with conn.cursor() as cur, cur.copy(cast(Any, f"COPY {table} ({', '.join(columns)}) FROM STDIN")) as copy:
        while chunk := rows.fetchmany(batch):
            for row in chunk:
                copy.write_row(row)
            n += len(chunk)
    return n
