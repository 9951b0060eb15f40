"""The ledger: one SQLite row per ping, failed ones included, and one per production
observation, money at full precision.

It is what `keepwarm report` proves its figures from, so it must survive what a daemon
meets: a crash mid-write (WAL, one commit per ping), several worker threads (one
connection behind a lock), a disk that fills or a file another process locks (logged,
counted, never raised into the runner: losing a ledger row must not stop the pinging).

The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[i]` takes a database from
version i to i + 1, so a new column is one more function appended to the list.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keepwarm.classify import Usage
from keepwarm.logs import event
from keepwarm.pricing import COST_KINDS
from keepwarm.store.base import (  # the rows both backends write, their writer and readers
    COLUMN_DEFAULTS,
    COLUMNS,
    COST_COLUMNS,
    OBSERVATION_COLUMNS,
    PLACE_COLUMNS,
    SPEND_BUCKET,
    PendingLedger,
    _ping_refresh,
)

log = logging.getLogger("keepwarm.ledger")


class LedgerError(Exception):
    """The ledger file cannot be used (corrupt, unreadable, or from a newer keepwarm)."""


def _describe(exc: sqlite3.Error) -> str:
    """Say whether the file is busy (try again) or broken (move it aside)."""
    if isinstance(exc, sqlite3.OperationalError):
        return f"cannot use it: {exc}"
    return f"not a usable SQLite database ({exc}); move it aside or set another ledger.path"


# --- the summaries a restart reads (schema version 3) ---------------------------------------

_COST_SUM = " + ".join(f"COALESCE(cost_{kind}, 0)" for kind in COST_KINDS)
_UNPRICED = (
    "CASE WHEN (" + " OR ".join(f"cost_{kind} IS NULL" for kind in COST_KINDS) + ") AND result != 'error' THEN 1 ELSE 0 END"
)

# A ping: the pair's latest ping, and when it read or wrote the cache, its latest refresh and size.
_UPSERT_PING_STATE = """
    INSERT INTO pair_state (origin, expert, model, fingerprint, last_ping, last_result, last_refresh, prefix_tokens)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (origin, expert, model, fingerprint) DO UPDATE SET
        last_result = CASE WHEN excluded.last_ping >= COALESCE(last_ping, 0) THEN excluded.last_result ELSE last_result END,
        last_ping = MAX(COALESCE(last_ping, 0), excluded.last_ping),
        last_refresh = MAX(COALESCE(last_refresh, 0), COALESCE(excluded.last_refresh, 0)),
        prefix_tokens = CASE WHEN excluded.prefix_tokens IS NOT NULL AND excluded.last_ping >= COALESCE(last_ping, 0)
                             THEN excluded.prefix_tokens ELSE prefix_tokens END
"""
# A production request: the latest one, and the latest that read or wrote the warmed prefix.
_UPSERT_OBSERVATION_STATE = """
    INSERT INTO pair_state (origin, expert, model, fingerprint, last_production, last_request)
    VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (origin, expert, model, fingerprint) DO UPDATE SET
        last_production = MAX(COALESCE(last_production, 0), COALESCE(excluded.last_production, 0)),
        last_request = MAX(COALESCE(last_request, 0), excluded.last_request)
"""
_UPSERT_SPEND = """
    INSERT INTO spend (origin, bucket, usd) VALUES (?, ?, ?)
    ON CONFLICT (origin, bucket) DO UPDATE SET usd = usd + excluded.usd
"""
_UPSERT_PING_HOUR = """
    INSERT INTO hours (origin, expert, model, hour, ping_usd, ping_unpriced) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (origin, expert, model, hour) DO UPDATE SET
        ping_usd = ping_usd + excluded.ping_usd, ping_unpriced = ping_unpriced + excluded.ping_unpriced
"""
_UPSERT_OBSERVATION_HOUR = """
    INSERT INTO hours (origin, expert, model, hour, requests, cache_read, cache_write, saved_usd, drift)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (origin, expert, model, hour) DO UPDATE SET
        requests = requests + excluded.requests, cache_read = cache_read + excluded.cache_read,
        cache_write = cache_write + excluded.cache_write, saved_usd = saved_usd + excluded.saved_usd,
        drift = drift + excluded.drift
"""


def _observation_state(
    origin: str, expert: str, model: str, fingerprint: str, at: float, read: int, w5: int, w1: int, drift: str | None
) -> tuple[Any, ...]:
    """The pair_state upsert of one production request: drift touched some other prefix's entry."""
    refreshed = drift is None and (read or w5 or w1)
    return (origin, expert, model, fingerprint, at if refreshed else None, at)


# --- schema --------------------------------------------------------------------------------


def _create_v1(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE pings (
            id INTEGER PRIMARY KEY,
            time REAL NOT NULL,              -- the ping's start, unix seconds
            expert TEXT NOT NULL,
            model TEXT NOT NULL,
            ttl TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            result TEXT NOT NULL,
            input INTEGER,                   -- usage: NULL when the ping failed
            cache_read INTEGER,
            cache_write_5m INTEGER,
            cache_write_1h INTEGER,
            output INTEGER,
            cost_input REAL,                 -- USD: NULL when failed or the model has no price
            cost_cache_read REAL,
            cost_cache_write_5m REAL,
            cost_cache_write_1h REAL,
            cost_output REAL,
            latency REAL,                    -- seconds, final attempt
            duration REAL,                   -- seconds, all attempts and their backoff
            attempts INTEGER NOT NULL,
            request_id TEXT,
            error_type TEXT,
            error_message TEXT,
            expires_at REAL,                 -- NULL when unknown
            miss_cause TEXT
        )
        """
    )
    db.execute("CREATE INDEX pings_time ON pings (time)")
    db.execute("CREATE INDEX pings_pair_time ON pings (expert, model, time)")


def _observations_v2(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE observations (
            id INTEGER PRIMARY KEY,
            time REAL NOT NULL,              -- the production request's start, unix seconds
            received REAL NOT NULL,          -- when keepwarm accepted the observation
            expert TEXT NOT NULL,
            model TEXT NOT NULL,
            ttl TEXT NOT NULL,
            fingerprint TEXT NOT NULL,       -- the pair's, as warmed
            observed_fingerprint TEXT,       -- the request's, when production sent it
            result TEXT NOT NULL,
            input INTEGER NOT NULL,
            cache_read INTEGER NOT NULL,
            cache_write_5m INTEGER NOT NULL,
            cache_write_1h INTEGER NOT NULL,
            output INTEGER NOT NULL,
            cost_input REAL,                 -- USD: NULL when the model has no price
            cost_cache_read REAL,
            cost_cache_write_5m REAL,
            cost_cache_write_1h REAL,
            cost_output REAL,
            saved INTEGER NOT NULL,          -- 1: the keepalive spared it a write
            saved_usd REAL,                  -- NULL when not saved or unpriced
            drift TEXT,                      -- fingerprint | write_while_warm | NULL
            late INTEGER NOT NULL,           -- 1: arrived after a later request of its pair
            request_id TEXT
        )
        """
    )
    db.execute("CREATE INDEX observations_time ON observations (time)")
    db.execute("CREATE INDEX observations_pair_time ON observations (expert, model, time)")


def _unique_request_id_v3(db: sqlite3.Connection) -> None:
    # The same observation sent twice (a client's retry) counts once: a request_id is the API's
    # own unique id. Copies an older keepwarm stored go first, the earliest row kept.
    db.execute(
        "DELETE FROM observations WHERE request_id IS NOT NULL AND id NOT IN"
        " (SELECT MIN(id) FROM observations WHERE request_id IS NOT NULL GROUP BY request_id)"
    )
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS observations_request_id ON observations (request_id) WHERE request_id IS NOT NULL")


def _state_v4(db: sqlite3.Connection) -> None:
    """What a restart resumes from, kept up to date with every row so that reading it back
    costs O(pairs), never O(rows): each pair's latest touches, the spend of the last 24 h in
    10-second buckets (the budget), and hourly sums (the status page). Rows also say where they
    came from (`origin`), so emulator and time-scaled runs never mix with real ones."""
    for table in ("pings", "observations"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN origin TEXT NOT NULL DEFAULT 'api'")
    db.execute(
        """
        CREATE TABLE pair_state (
            origin TEXT NOT NULL,
            expert TEXT NOT NULL,
            model TEXT NOT NULL,
            fingerprint TEXT NOT NULL,        -- a new prefix is a new cache: its own row
            last_ping REAL,                   -- start of the latest ping, whatever it found
            last_result TEXT,
            last_refresh REAL,                -- start of the latest ping that read or wrote the cache
            prefix_tokens INTEGER,            -- the prefix size the latest answered ping measured
            last_production REAL,             -- start of the latest production request that read or wrote it
            last_request REAL,                -- start of the latest production request of any kind
            PRIMARY KEY (origin, expert, model, fingerprint)
        )
        """
    )
    db.execute(
        "CREATE TABLE spend (origin TEXT NOT NULL, bucket INTEGER NOT NULL, usd REAL NOT NULL,"
        " PRIMARY KEY (origin, bucket))"
    )
    db.execute(
        """
        CREATE TABLE hours (
            origin TEXT NOT NULL,
            expert TEXT NOT NULL,             -- '' (with model '') for every pair together
            model TEXT NOT NULL,
            hour INTEGER NOT NULL,            -- unix time // 3600
            ping_usd REAL NOT NULL DEFAULT 0,
            ping_unpriced INTEGER NOT NULL DEFAULT 0,
            requests INTEGER NOT NULL DEFAULT 0,
            cache_read INTEGER NOT NULL DEFAULT 0,
            cache_write INTEGER NOT NULL DEFAULT 0,
            saved_usd REAL NOT NULL DEFAULT 0,
            drift INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (origin, expert, model, hour)
        )
        """
    )
    # A ledger written by an older keepwarm: derive the summaries once from its rows, in SQL
    # (a month at 10,000 pairs is a hundred million rows: no Python loop over them).
    cached = "(cache_read > 0 OR cache_write_5m > 0 OR cache_write_1h > 0)"
    db.execute(
        f"""
        INSERT INTO pair_state (origin, expert, model, fingerprint, last_ping, last_result, last_refresh, prefix_tokens)
        SELECT p.origin, p.expert, p.model, p.fingerprint, p.t, p.result, r.t, m.tokens
        FROM (SELECT origin, expert, model, fingerprint, MAX(time) AS t, result FROM pings GROUP BY 1, 2, 3, 4) AS p
        LEFT JOIN (SELECT origin, expert, model, fingerprint, MAX(time) AS t FROM pings WHERE {cached}
                   GROUP BY 1, 2, 3, 4) AS r USING (origin, expert, model, fingerprint)
        LEFT JOIN (SELECT origin, expert, model, fingerprint, MAX(time) AS t,
                          CASE WHEN {cached} THEN COALESCE(cache_read, 0) + COALESCE(cache_write_5m, 0)
                               + COALESCE(cache_write_1h, 0) ELSE input END AS tokens
                   FROM pings WHERE input IS NOT NULL GROUP BY 1, 2, 3, 4) AS m USING (origin, expert, model, fingerprint)
        """  # SQLite takes the other columns of a MAX() aggregate from the row that holds the maximum
    )
    db.execute(
        f"""
        INSERT INTO pair_state (origin, expert, model, fingerprint, last_production, last_request)
        SELECT origin, expert, model, fingerprint, MAX(CASE WHEN drift IS NULL AND {cached} THEN time END), MAX(time)
        FROM observations WHERE true GROUP BY 1, 2, 3, 4
        ON CONFLICT (origin, expert, model, fingerprint) DO UPDATE SET
            last_production = excluded.last_production, last_request = excluded.last_request
        """
    )
    db.execute(
        f"INSERT INTO spend (origin, bucket, usd) SELECT origin, CAST(time / {SPEND_BUCKET} AS INTEGER), SUM({_COST_SUM})"
        " FROM pings GROUP BY 1, 2"
    )
    db.execute(
        "INSERT INTO hours (origin, expert, model, hour, ping_usd, ping_unpriced)"
        f" SELECT origin, '', '', CAST(time / 3600 AS INTEGER), SUM({_COST_SUM}), SUM({_UNPRICED}) FROM pings GROUP BY 1, 4"
    )
    for expert in ("expert", "''"):  # each pair's hours, and every pair's together
        model = "model" if expert == "expert" else "''"
        db.execute(
            f"""
            INSERT INTO hours (origin, expert, model, hour, requests, cache_read, cache_write, saved_usd, drift)
            SELECT origin, {expert}, {model}, CAST(time / 3600 AS INTEGER), COUNT(*), SUM(cache_read),
                   SUM(cache_write_5m + cache_write_1h), SUM(COALESCE(saved_usd, 0)), SUM(drift IS NOT NULL)
            FROM observations WHERE true GROUP BY 1, 2, 3, 4
            ON CONFLICT (origin, expert, model, hour) DO UPDATE SET
                requests = requests + excluded.requests, cache_read = cache_read + excluded.cache_read,
                cache_write = cache_write + excluded.cache_write, saved_usd = saved_usd + excluded.saved_usd,
                drift = drift + excluded.drift
            """
        )


def _members_v5(db: sqlite3.Connection) -> None:
    """A fleet's members: a row each, with the expiry of a lease its holder renews (keepwarm.fleet)."""
    db.execute(
        "CREATE TABLE members (fleet TEXT NOT NULL, member TEXT NOT NULL, expires REAL NOT NULL,"
        " joined REAL NOT NULL, PRIMARY KEY (fleet, member))"
    )


def _places_v6(db: sqlite3.Connection) -> None:
    """Where each row's cache lives: account, provider and endpoint. Older rows take the defaults
    (ADD COLUMN with a constant default rewrites nothing: instant on any size of file)."""
    for table in ("pings", "observations"):
        for column in PLACE_COLUMNS:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT '{COLUMN_DEFAULTS[column]}'")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _create_v1, _observations_v2, _unique_request_id_v3, _state_v4, _members_v5, _places_v6,
]


def schema_version() -> int:
    """The version this keepwarm writes: one per migration."""
    return len(MIGRATIONS)


def migrate(db: sqlite3.Connection, where: str) -> int:
    """Bring the schema up to `schema_version()`; return the version found before.

    Each step runs in its own transaction together with its `user_version` bump, so a crash
    mid-migration leaves the previous version intact. BEGIN IMMEDIATE takes the write lock
    before reading the version, so two processes opening the same new file cannot both
    create it.
    """
    target = schema_version()
    db.execute("BEGIN IMMEDIATE")
    try:
        found = int(db.execute("PRAGMA user_version").fetchone()[0])
        if found > target:
            raise LedgerError(
                f"ledger {where} has schema version {found}, newer than this keepwarm knows ({target}): "
                "upgrade keepwarm or point ledger.path at another file"
            )
        version = found
        while version < target:
            MIGRATIONS[version](db)
            version += 1
            # PRAGMA takes no parameters; `version` is an int we computed.
            db.execute(f"PRAGMA user_version = {version}")
            if version < target:
                db.execute("COMMIT")
                db.execute("BEGIN IMMEDIATE")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return found


# --- rows ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerRow:
    """One recorded ping, as stored."""

    id: int
    time: float
    expert: str
    model: str
    ttl: str
    fingerprint: str
    result: str
    input: int | None
    cache_read: int | None
    cache_write_5m: int | None
    cache_write_1h: int | None
    output: int | None
    cost_input: float | None
    cost_cache_read: float | None
    cost_cache_write_5m: float | None
    cost_cache_write_1h: float | None
    cost_output: float | None
    latency: float | None
    duration: float | None
    attempts: int
    request_id: str | None
    error_type: str | None
    error_message: str | None
    expires_at: float | None
    miss_cause: str | None
    origin: str = "api"
    account: str = "default"
    provider: str = "anthropic"
    endpoint: str = "default"

    @property
    def usage(self) -> Usage | None:
        """The token counts, or None for a failed ping."""
        if self.input is None:
            return None
        return Usage(
            input=self.input,
            cache_read=self.cache_read or 0,
            cache_write_5m=self.cache_write_5m or 0,
            cache_write_1h=self.cache_write_1h or 0,
            output=self.output or 0,
        )

    @property
    def costs(self) -> dict[str, float] | None:
        """USD by kind, or None when unknown (a failed ping or a model with no price)."""
        values = [getattr(self, column) for column in COST_COLUMNS]
        if any(v is None for v in values):
            return None
        return dict(zip(COST_KINDS, values))


@dataclass(frozen=True)
class ObservationRow:
    """One recorded production observation, as stored."""

    id: int
    time: float
    received: float
    expert: str
    model: str
    ttl: str
    fingerprint: str
    observed_fingerprint: str | None
    result: str
    input: int
    cache_read: int
    cache_write_5m: int
    cache_write_1h: int
    output: int
    cost_input: float | None
    cost_cache_read: float | None
    cost_cache_write_5m: float | None
    cost_cache_write_1h: float | None
    cost_output: float | None
    saved: int
    saved_usd: float | None
    drift: str | None
    late: int
    request_id: str | None
    origin: str = "api"
    account: str = "default"
    provider: str = "anthropic"
    endpoint: str = "default"

    @property
    def cache_write(self) -> int:
        """Tokens written to the cache, whatever their TTL."""
        return self.cache_write_5m + self.cache_write_1h

    @property
    def costs(self) -> dict[str, float] | None:
        """USD by kind, or None when the model has no price."""
        values = [getattr(self, column) for column in COST_COLUMNS]
        if any(v is None for v in values):
            return None
        return dict(zip(COST_KINDS, values))


_INSERT_OBSERVATION = (
    # OR IGNORE: a copy of an observation already stored (same request_id) is no new row.
    f"INSERT OR IGNORE INTO observations ({', '.join(OBSERVATION_COLUMNS)}) VALUES ({', '.join('?' * len(OBSERVATION_COLUMNS))})"
)
_INSERT = f"INSERT INTO pings ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def _where(db: sqlite3.Connection, table: str, since: float | None, origins: Sequence[str] | None) -> tuple[str, list[Any]]:
    """The WHERE clause for a window of one table's rows from some origins (None: every origin)."""
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("time >= ?")
        params.append(since)
    if origins is not None and _has_origin(db, table):
        clauses.append(f"origin IN ({', '.join('?' * len(origins))})")
        params.extend(origins)
    elif origins is not None and "api" not in origins:
        clauses.append("0")  # a ledger older than origins holds only real pings
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _has_origin(db: sqlite3.Connection, table: str) -> bool:
    """Whether the table has the `origin` column (schema version 3 and later)."""
    return "origin" in _table_columns(db, table)


def _table_columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")}


def _columns(db: sqlite3.Connection, table: str, columns: Sequence[str]) -> str:
    """The select list; a ledger read before its migration (a report never migrates) gives a
    column it lacks its default: `api` for origin (version 4), the default account (version 6)."""
    have = _table_columns(db, table)
    return ", ".join(c if c in have or c not in COLUMN_DEFAULTS else f"'{COLUMN_DEFAULTS[c]}'" for c in columns)


def _select_observations(
    db: sqlite3.Connection, since: float | None, origins: Sequence[str] | None = None
) -> list[ObservationRow]:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'observations'").fetchone():
        return []  # a ledger written before observations existed (schema version 1)
    where, params = _where(db, "observations", since, origins)
    cursor = db.execute(
        f"SELECT id, {_columns(db, 'observations', OBSERVATION_COLUMNS)} FROM observations{where} ORDER BY time, id", params
    )
    return [ObservationRow(*row) for row in cursor]


def _select(db: sqlite3.Connection, since: float | None, origins: Sequence[str] | None = None) -> list[LedgerRow]:
    where, params = _where(db, "pings", since, origins)
    cursor = db.execute(f"SELECT id, {_columns(db, 'pings', COLUMNS)} FROM pings{where} ORDER BY time, id", params)
    return [LedgerRow(*row) for row in cursor]


# --- the writer ----------------------------------------------------------------------------


class _CopyAlreadyStored(Exception):
    """A batch held an observation whose request_id is stored already: redo it row by row."""


def _ping_summaries(db: sqlite3.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
    """What newly stored pings move: each pair's latest touches, the spend, every pair's hours."""
    rows = list(rows)
    db.executemany(_UPSERT_PING_STATE, map(_ping_state_params, rows))
    db.executemany(_UPSERT_SPEND, [p for p in map(_spend_params, rows) if p is not None])
    db.executemany(_UPSERT_PING_HOUR, map(_ping_hour_params, rows))


def _observation_summaries(db: sqlite3.Connection, rows: Iterable[tuple[Any, ...]]) -> None:
    """What newly stored observations move: each pair's latest production touch, and the hours."""
    rows = list(rows)
    db.executemany(_UPSERT_OBSERVATION_STATE, map(_observation_state_params, rows))
    for params in map(_observation_hour_params, rows):
        db.execute(_UPSERT_OBSERVATION_HOUR, params)
        db.execute(_UPSERT_OBSERVATION_HOUR, (params[0], "", "", *params[3:]))


class Ledger(PendingLedger):
    """The daemon's ledger file; `record()` may be called from any thread (see PendingLedger).

    `origin` marks every row this writer adds (`api`, `emulator` or `scaled`): `report` and a
    restart read only the origin they are for, so a demo against the emulator never mixes with
    real money or resumes a real daemon's schedule.
    """

    def __init__(
        self,
        path: Path | str,
        retention_days: float | None = None,
        *,
        busy_timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[], None] | None = None,
        origin: str = "api",
    ) -> None:
        super().__init__(retention_days, clock=clock, on_error=on_error, origin=origin)
        self.path = Path(path)
        self.unwritable = 0  # rows dropped because the database cannot store their values
        self._db: sqlite3.Connection | None = self._open(busy_timeout)
        self._sweep_at_start()

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        where = str(self.path)
        try:
            # One connection shared by the worker threads, serialised by self._lock: simpler
            # than a connection per thread, and a ping's insert takes well under a millisecond.
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one commit per ping.
            db = sqlite3.connect(where, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger {where}: cannot open it: {exc}") from None
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # e.g. a filesystem without shared memory
                event(log, logging.WARNING, "ledger is not in WAL mode; readers may block pings",
                      path=where, journal_mode=mode)
            # FULL, not NORMAL: with WAL, NORMAL survives a process crash but can lose the
            # last commits on power loss, and the contract (README: Restarts and state) allows losing only the ping in flight.
            # The price is one fsync per ping, a few a minute: nothing.
            db.execute("PRAGMA synchronous=FULL")
            migrate(db, where)
        except LedgerError:
            db.close()
            raise
        except sqlite3.Error as exc:
            db.close()
            raise LedgerError(f"ledger {where}: {_describe(exc)}") from None
        return db

    def _flush(self) -> None:
        """Commit every pending row, and the summaries it moves, in one transaction (the caller holds the lock).

        A row the database cannot take (a value out of SQLite's range, text that is not UTF-8:
        validation should have stopped it) must not hold back the others, which would then wait
        in memory until they are lost: the batch is retried row by row, and such rows alone are
        dropped, logged and counted. So is a batch holding a copy of an observation already
        stored (same request_id), which must move no summary. A file that cannot be written
        (locked, full) keeps them all.
        """
        if self._db is None:
            raise LedgerError(f"ledger {self.path} is closed")
        if not self._pending and not self._pending_observations:
            return
        try:
            self._commit(batch=True)
        except sqlite3.OperationalError:
            raise  # the file, not a row: everything waits for the next try
        except Exception:  # noqa: BLE001 - some row is unwritable: find it
            self._commit(batch=False)

    def _commit(self, batch: bool) -> None:
        """Insert what is pending, and move the summaries, in one transaction: all at once, or
        row by row (isolating bad rows, and copies already stored, which move nothing)."""
        assert self._db is not None
        db = self._db
        bad: list[tuple[str, BaseException]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for kind, statement, pending, summarize in (
                ("ping", _INSERT, self._pending, _ping_summaries),
                ("observation", _INSERT_OBSERVATION, self._pending_observations, _observation_summaries),
            ):
                if not pending:
                    continue
                if batch:
                    before = db.total_changes
                    db.executemany(statement, pending)
                    if db.total_changes - before != len(pending):
                        raise _CopyAlreadyStored  # row by row, so only new rows move the summaries
                    summarize(db, pending)
                    continue
                for values in pending:
                    try:
                        inserted = db.execute(statement, values).rowcount == 1
                    except sqlite3.OperationalError:
                        raise
                    except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                        # A failed INSERT undoes only itself; the transaction and the other rows stay.
                        bad.append((kind, exc))
                        continue
                    if inserted:
                        summarize(db, [values])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._pending.clear()
        self._pending_observations.clear()
        if bad:
            self.unwritable += len(bad)
            kinds = collections.Counter(kind for kind, _ in bad)
            self._failed(f"{len(bad)} ledger row(s) the database cannot store were dropped; the others were written",
                         bad[0][1], lost=len(bad), kinds=dict(kinds))

    def _sweep(self) -> None:
        """Delete rows older than the retention (the caller holds the lock)."""
        assert self._db is not None and self.retention_days is not None
        now = self._clock()
        cutoff = now - self.retention_days * 86400.0
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            deleted = db.execute("DELETE FROM pings WHERE time < ?", (cutoff,)).rowcount
            # Observations are kept exactly as long as pings: a report needs both sides of a window.
            deleted_observations = db.execute("DELETE FROM observations WHERE time < ?", (cutoff,)).rowcount
            # The summaries: the budget needs a day, a pair's hours a day, every pair's a week.
            db.execute("DELETE FROM spend WHERE bucket < ?", (int((now - 2 * 86400.0) // SPEND_BUCKET),))
            db.execute("DELETE FROM hours WHERE hour < ? OR (expert != '' AND hour < ?)",
                       (int(cutoff // 3600), int((now - 2 * 86400.0) // 3600)))
            db.execute("DELETE FROM pair_state WHERE MAX(COALESCE(last_ping, 0), COALESCE(last_request, 0)) < ?", (cutoff,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._last_sweep = now
        if deleted or deleted_observations:
            event(log, logging.INFO, "ledger retention", path=str(self.path), deleted=deleted,
                  deleted_observations=deleted_observations or None, retention_days=self.retention_days)

    @property
    def closed(self) -> bool:
        """Whether `close()` has run."""
        return self._db is None

    def _where(self) -> str:
        return str(self.path)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._read()

    def _read(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerError(f"ledger {self.path} is closed")
        return self._db

    def rows(self, since: float | None = None) -> list[LedgerRow]:
        """Every committed row of this ledger's origin with `time >= since` (all when None), oldest first."""
        with self._lock:
            return _select(self._read(), since, (self.origin,))

    def observations(self, since: float | None = None) -> list[ObservationRow]:
        """Every committed observation of this ledger's origin with `time >= since`, oldest first."""
        with self._lock:
            return _select_observations(self._read(), since, (self.origin,))

    def renew_lease(self, fleet: str, member: str, now: float, lease: float) -> list[tuple[str, float]]:
        """Extend a fleet member's lease to `now + lease`; every live member with its expiry.

        Raises what SQLite raises: the fleet treats a failed renewal as an outage, not a crash.
        """
        with self._lock:
            db = self._read()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO members (fleet, member, expires, joined) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (fleet, member) DO UPDATE SET expires = excluded.expires",
                    (fleet, member, now + lease, now))
                # Long-dead members are forgotten; a lapsed one is simply not live.
                db.execute("DELETE FROM members WHERE fleet = ? AND expires < ?", (fleet, now - 86400.0))
                live = [(str(m), float(e)) for m, e in db.execute(
                    "SELECT member, expires FROM members WHERE fleet = ? AND expires > ? ORDER BY member", (fleet, now))]
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return live

    def drop_lease(self, fleet: str, member: str) -> None:
        """Give a member's lease up at once (a clean stop)."""
        with self._lock:
            self._read().execute("DELETE FROM members WHERE fleet = ? AND member = ?", (fleet, member))

    def _release(self) -> None:
        """Checkpoint the WAL into the main file, and close."""
        assert self._db is not None
        try:
            # TRUNCATE leaves a self-contained file behind, easy to copy or inspect.
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # another reader holds the WAL: the next open finishes it
            event(log, logging.WARNING, "ledger checkpoint skipped", path=str(self.path), error=str(exc))
        self._db.close()
        self._db = None


# --- readers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _readonly(path: Path | str) -> Iterator[sqlite3.Connection]:
    """A read-only connection to an existing keepwarm ledger; every failure is a LedgerError."""
    where = str(path)
    if not Path(path).is_file():
        raise LedgerError(f"ledger {where}: no such file: no daemon has kept state there yet"
                          " (or ledger.path names another file)")
    try:
        # mode=ro: a report must never create, migrate or prune the daemon's file. Without a
        # -wal file (the daemon stopped cleanly) nothing can change it: immutable=1 also spares
        # creating the -shm file, which a read-only user may not do.
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        if not Path(f"{path}-wal").exists():
            uri += "&immutable=1"
        db = sqlite3.connect(uri, uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {where}: cannot open it: {exc}") from None
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version < 1:
            raise LedgerError(f"ledger {where}: not a keepwarm ledger (schema version {version})")
        # A newer schema only adds columns, and we select ours by name: still readable.
        yield db
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {where}: {_describe(exc)}") from None
    finally:
        db.close()


def read_ledger(path: Path | str, since: float | None = None, origins: Sequence[str] | None = None) -> list[LedgerRow]:
    """Ping rows with `time >= since` from `origins` (None: all) of a ledger file, read without
    writing to it; raise LedgerError."""
    with _readonly(path) as db:
        return _select(db, since, origins)


def read_first_seen(path: Path | str, origins: Sequence[str] | None = None) -> dict[tuple[str, str], float]:
    """When each (expert, model) pair was first recorded, whatever the window asked for."""
    with _readonly(path) as db:
        where, params = _where(db, "pings", None, origins)
        cursor = db.execute(f"SELECT expert, model, MIN(time) FROM pings{where} GROUP BY expert, model", params)
        return {(expert, model): float(first) for expert, model, first in cursor}


def read_observations(
    path: Path | str, since: float | None = None, origins: Sequence[str] | None = None
) -> list[ObservationRow]:
    """Observations with `time >= since` from `origins` (None: all) of a ledger file, read
    without writing to it; raise LedgerError."""
    with _readonly(path) as db:
        return _select_observations(db, since, origins)


def read_origins(path: Path | str, since: float | None = None) -> dict[str, int]:
    """How many ping and observation rows each origin has since `since` (what a report leaves out)."""
    with _readonly(path) as db:
        counts: dict[str, int] = {}
        for table in ("pings", "observations"):
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone():
                continue
            where, params = _where(db, table, since, None)
            origin = "origin" if _has_origin(db, table) else "'api'"
            for name, n in db.execute(f"SELECT {origin}, COUNT(*) FROM {table}{where} GROUP BY 1", params):
                counts[name] = counts.get(name, 0) + int(n)
        return counts


# --- what each committed row moves in the summaries -----------------------------------------

_PI = {name: i for i, name in enumerate(COLUMNS)}
_OI = {name: i for i, name in enumerate(OBSERVATION_COLUMNS)}
_PING_COSTS = [_PI[c] for c in COST_COLUMNS]
_OBS_COSTS = [_OI[c] for c in COST_COLUMNS]


def _ping_state_params(v: tuple[Any, ...]) -> tuple[Any, ...]:
    at = v[_PI["time"]]
    refresh, tokens = _ping_refresh(at, v[_PI["cache_read"]], v[_PI["cache_write_5m"]], v[_PI["cache_write_1h"]], v[_PI["input"]])
    return (v[_PI["origin"]], v[_PI["expert"]], v[_PI["model"]], v[_PI["fingerprint"]], at, v[_PI["result"]], refresh, tokens)


def _ping_cost(v: tuple[Any, ...]) -> float:
    return math.fsum(v[i] or 0.0 for i in _PING_COSTS)


def _spend_params(v: tuple[Any, ...]) -> tuple[Any, ...] | None:
    cost = _ping_cost(v)
    return (v[_PI["origin"]], int(v[_PI["time"]] // SPEND_BUCKET), cost) if cost else None


def _ping_hour_params(v: tuple[Any, ...]) -> tuple[Any, ...]:
    unpriced = int(v[_PI["result"]] != "error" and any(v[i] is None for i in _PING_COSTS))
    return (v[_PI["origin"]], "", "", int(v[_PI["time"]] // 3600), _ping_cost(v), unpriced)


def _observation_state_params(v: tuple[Any, ...]) -> tuple[Any, ...]:
    return _observation_state(
        v[_OI["origin"]], v[_OI["expert"]], v[_OI["model"]], v[_OI["fingerprint"]], v[_OI["time"]],
        v[_OI["cache_read"]], v[_OI["cache_write_5m"]], v[_OI["cache_write_1h"]], v[_OI["drift"]],
    )


def _observation_hour_params(v: tuple[Any, ...]) -> tuple[Any, ...]:
    return (
        v[_OI["origin"]], v[_OI["expert"]], v[_OI["model"]], int(v[_OI["time"]] // 3600), 1, v[_OI["cache_read"]],
        v[_OI["cache_write_5m"]] + v[_OI["cache_write_1h"]], v[_OI["saved_usd"]] or 0.0, int(v[_OI["drift"]] is not None),
    )
