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
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from keepwarm.classify import Usage
from keepwarm.logs import event
from keepwarm.pricing import COST_KINDS

if TYPE_CHECKING:  # the runner imports the SDK; `keepwarm report` should not need it
    from keepwarm.observations import ObservationRecord
    from keepwarm.runner import PingOutcome

log = logging.getLogger("keepwarm.ledger")

RETENTION_EVERY = 3600.0  # seconds between two retention sweeps
MAX_PENDING = 10_000  # rows kept in memory while the file cannot be written (~days of pings)
USAGE_COLUMNS = ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output")
COST_COLUMNS = tuple(f"cost_{kind}" for kind in COST_KINDS)
COLUMNS = (
    "time",
    "expert",
    "model",
    "ttl",
    "fingerprint",
    "result",
    *USAGE_COLUMNS,
    *COST_COLUMNS,
    "latency",
    "duration",
    "attempts",
    "request_id",
    "error_type",
    "error_message",
    "expires_at",
    "miss_cause",
)


class LedgerError(Exception):
    """The ledger file cannot be used (corrupt, unreadable, or from a newer keepwarm)."""


def _describe(exc: sqlite3.Error) -> str:
    """Say whether the file is busy (try again) or broken (move it aside)."""
    if isinstance(exc, sqlite3.OperationalError):
        return f"cannot use it: {exc}"
    return f"not a usable SQLite database ({exc}); move it aside or set another ledger.path"


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


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_create_v1, _observations_v2, _unique_request_id_v3]


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


def _row_values(outcome: PingOutcome) -> tuple[Any, ...]:
    pair, usage, final = outcome.pair, outcome.usage, outcome.final
    counts: list[int | None] = (
        [None] * len(USAGE_COLUMNS) if usage is None else [usage.by_kind()[k] for k in USAGE_COLUMNS]
    )
    costs: list[float | None] = (
        [None] * len(COST_KINDS) if outcome.cost is None else [outcome.cost[k] for k in COST_KINDS]
    )
    error = outcome.error
    return (
        outcome.started,
        pair.expert,
        pair.model,
        pair.ttl,
        pair.fingerprint,
        outcome.result.value,
        *counts,
        *costs,
        final.latency,
        outcome.duration,
        len(outcome.attempts),
        final.request_id,
        None if error is None else error.error_type,
        None if error is None else error.message,
        outcome.expires_at or None,  # the runner's 0.0 means "unknown"; a database says NULL
        outcome.miss_cause,
    )


OBSERVATION_COLUMNS = (
    "time",
    "received",
    "expert",
    "model",
    "ttl",
    "fingerprint",
    "observed_fingerprint",
    "result",
    *USAGE_COLUMNS,
    *COST_COLUMNS,
    "saved",
    "saved_usd",
    "drift",
    "late",
    "request_id",
)


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


def _observation_values(record: ObservationRecord, received: float) -> tuple[Any, ...]:
    obs = record.observation
    pair, usage = obs.pair, obs.usage.by_kind()
    costs: list[float | None] = [None] * len(COST_KINDS) if record.cost is None else [record.cost[k] for k in COST_KINDS]
    return (
        obs.at,
        received,
        pair.expert,
        pair.model,
        pair.ttl,
        pair.fingerprint,
        obs.fingerprint,
        obs.result.value,
        *(usage[k] for k in USAGE_COLUMNS),
        *costs,
        int(record.saved),
        record.saved_usd,
        record.drift,
        int(record.late),
        obs.request_id,
    )


_INSERT_OBSERVATION = (
    # OR IGNORE: a copy of an observation already stored (same request_id) is no new row.
    f"INSERT OR IGNORE INTO observations ({', '.join(OBSERVATION_COLUMNS)}) VALUES ({', '.join('?' * len(OBSERVATION_COLUMNS))})"
)
_SELECT_OBSERVATIONS = f"SELECT id, {', '.join(OBSERVATION_COLUMNS)} FROM observations"


def _select_observations(db: sqlite3.Connection, since: float | None) -> list[ObservationRow]:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'observations'").fetchone():
        return []  # a ledger written before observations existed (schema version 1)
    if since is None:
        cursor = db.execute(_SELECT_OBSERVATIONS + " ORDER BY time, id")
    else:
        cursor = db.execute(_SELECT_OBSERVATIONS + " WHERE time >= ? ORDER BY time, id", (since,))
    return [ObservationRow(*row) for row in cursor]


_INSERT = f"INSERT INTO pings ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
_SELECT = f"SELECT id, {', '.join(COLUMNS)} FROM pings"


def _select(db: sqlite3.Connection, since: float | None) -> list[LedgerRow]:
    if since is None:
        cursor = db.execute(_SELECT + " ORDER BY time, id")
    else:
        cursor = db.execute(_SELECT + " WHERE time >= ? ORDER BY time, id", (since,))
    return [LedgerRow(*row) for row in cursor]


# --- the writer ----------------------------------------------------------------------------


class Ledger:
    """The daemon's ledger file; `record()` may be called from any thread."""

    def __init__(
        self,
        path: Path | str,
        retention_days: float | None = None,
        *,
        busy_timeout: float = 2.0,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._on_error = on_error  # e.g. a metric's inc: failures must be visible, not just logged
        self.retention_days = retention_days
        self.write_errors = 0
        self.dropped = 0  # rows lost for good because the backlog overflowed
        self.unwritable = 0  # rows dropped because the database cannot store their values
        self._clock = clock
        self._lock = threading.Lock()
        # Rows that failed to commit (locked or full file) wait here and go in with the next
        # ping, so a passing lock costs no row; bounded so a dead disk cannot eat memory.
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._pending_observations: collections.deque[tuple[Any, ...]] = collections.deque()
        self._last_sweep = float("-inf")
        self._db: sqlite3.Connection | None = self._open(busy_timeout)
        if retention_days is not None:
            with self._lock:
                try:
                    self._sweep()
                except sqlite3.Error as exc:  # old rows can wait for the next sweep; pinging cannot
                    self._failed("cannot delete old ledger rows", exc)

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
            # last commits on power loss, and the SPEC allows losing only the ping in flight.
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

    def record(self, outcome: PingOutcome) -> None:
        """Store one ping; never raises: a failure is logged and counted in `write_errors`."""
        try:
            values = _row_values(outcome)
        except Exception as exc:  # noqa: BLE001 - a malformed outcome is a bug, not worth a crash
            self._failed("cannot turn the ping into a row", exc)
            return
        with self._lock:
            if not self._queue(self._pending, [values],
                               "cannot write the ledger; the row is kept in memory and retried with the next ping"):
                return
            try:
                if self.retention_days is not None and self._clock() - self._last_sweep >= RETENTION_EVERY:
                    self._sweep()
            except Exception as exc:  # noqa: BLE001 - the row is safe; only the clean-up failed
                self._failed("cannot delete old ledger rows", exc)

    def record_observations(self, records: list[ObservationRecord]) -> None:
        """Store the accepted observations of one request in one commit; never raises."""
        try:
            received = self._clock()
            values = [_observation_values(r, received) for r in records]
        except Exception as exc:  # noqa: BLE001 - a malformed record is a bug, not worth a crash
            self._failed("cannot turn observations into rows", exc)
            return
        with self._lock:
            self._queue(self._pending_observations, values,
                        "cannot write observations to the ledger; kept in memory and retried")

    def refreshed_between(self, expert: str, model: str, start: float, end: float) -> bool:
        """Whether a ping of the pair that read or wrote the cache started in (start, end]: whether
        keepwarm held it warm for a production request reported later than the observer remembers."""
        with self._lock:
            if self._db is None:
                raise LedgerError(f"ledger {self.path} is closed")
            row = self._db.execute(
                "SELECT 1 FROM pings WHERE expert = ? AND model = ? AND time > ? AND time <= ?"
                " AND (cache_read > 0 OR cache_write_5m > 0 OR cache_write_1h > 0) LIMIT 1",
                (expert, model, start, end),
            ).fetchone()
            return row is not None

    def can_keep(self) -> bool:
        """Whether observations accepted now would be written: nothing waits in memory, or what
        waits goes in now (the endpoint answers 503 otherwise)."""
        with self._lock:
            if self._db is None:
                return False
            if not self._pending and not self._pending_observations:
                return True
            try:
                self._flush()
            except Exception:  # noqa: BLE001 - still failing: logged at the write that failed
                return False
            return True

    def _queue(self, pending: collections.deque[tuple[Any, ...]], values: list[tuple[Any, ...]], failure: str) -> bool:
        """Add rows to a bounded queue (the oldest dropped past MAX_PENDING) and commit what is
        pending; False, logged and counted, when the commit failed (the caller holds the lock)."""
        pending.extend(values)
        while len(pending) > MAX_PENDING:
            pending.popleft()
            self.dropped += 1
        try:
            self._flush()
        except Exception as exc:  # noqa: BLE001 - neither the pinging nor the endpoint may stop for it
            self._failed(failure, exc)
            return False
        return True

    def _flush(self) -> None:
        """Commit every pending row in one transaction (the caller holds the lock).

        A row the database cannot take (a value out of SQLite's range, text that is not UTF-8:
        validation should have stopped it) must not hold back the others, which would then wait
        in memory until they are lost: the batch is retried row by row, and such rows alone are
        dropped, logged and counted. A file that cannot be written (locked, full) keeps them all.
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
        """Insert what is pending in one transaction, all at once or row by row (isolating bad rows)."""
        assert self._db is not None
        bad: list[tuple[str, BaseException]] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement, pending in ((_INSERT, self._pending), (_INSERT_OBSERVATION, self._pending_observations)):
                if not pending:
                    continue
                if batch:
                    self._db.executemany(statement, pending)
                    continue
                for values in pending:
                    try:
                        self._db.execute(statement, values)
                    except sqlite3.OperationalError:
                        raise
                    except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
                        # A failed INSERT undoes only itself; the transaction and the other rows stay.
                        bad.append(("ping" if statement is _INSERT else "observation", exc))
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
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
        cursor = self._db.execute("DELETE FROM pings WHERE time < ?", (cutoff,))
        deleted = cursor.rowcount
        # Observations are kept exactly as long as pings: a report needs both sides of a window.
        deleted_observations = self._db.execute("DELETE FROM observations WHERE time < ?", (cutoff,)).rowcount
        self._last_sweep = now
        if deleted or deleted_observations:
            event(log, logging.INFO, "ledger retention", path=str(self.path), deleted=deleted,
                  deleted_observations=deleted_observations or None, retention_days=self.retention_days)

    def _failed(self, what: str, exc: BaseException, **fields: Any) -> None:
        self.write_errors += 1
        if self._on_error is not None:
            self._on_error()
        event(log, logging.ERROR, what, path=str(self.path), error=f"{type(exc).__name__}: {exc}",
              write_errors=self.write_errors, pending=self.pending, dropped=self.dropped or None, **fields)

    @property
    def pending(self) -> int:
        """Rows, pings and observations, waiting in memory for the file to take them."""
        return len(self._pending) + len(self._pending_observations)

    def rows(self, since: float | None = None) -> list[LedgerRow]:
        """Every committed row with `time >= since` (all when None), oldest first."""
        with self._lock:
            if self._db is None:
                raise LedgerError(f"ledger {self.path} is closed")
            return _select(self._db, since)

    def observations(self, since: float | None = None) -> list[ObservationRow]:
        """Every committed observation with `time >= since` (all when None), oldest first."""
        with self._lock:
            if self._db is None:
                raise LedgerError(f"ledger {self.path} is closed")
            return _select_observations(self._db, since)

    def recent(self, since: float, ttl_since: float) -> Recent:
        """What the daemon needs back after a restart: hourly sums since `since`, and the last
        touches since `ttl_since`, by (expert, model)."""
        with self._lock:
            if self._db is None:
                raise LedgerError(f"ledger {self.path} is closed")
            return _recent(self._db, since, ttl_since)

    def close(self) -> None:
        """Write what is pending, checkpoint the WAL into the main file, and close."""
        with self._lock:
            if self._db is None:
                return
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever the file does
                lost = self.pending
                self._failed(f"cannot write {lost} pending ledger row(s) at close; they are lost", exc, lost=lost)
            try:
                # TRUNCATE leaves a self-contained file behind, easy to copy or inspect.
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # another reader holds the WAL: the next open finishes it
                event(log, logging.WARNING, "ledger checkpoint skipped", path=str(self.path), error=str(exc))
            self._db.close()
            self._db = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- readers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _readonly(path: Path | str) -> Iterator[sqlite3.Connection]:
    """A read-only connection to an existing keepwarm ledger; every failure is a LedgerError."""
    where = str(path)
    if not Path(path).is_file():
        raise LedgerError(f"ledger {where}: no such file (is ledger.path set, and has the daemon run?)")
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


def read_ledger(path: Path | str, since: float | None = None) -> list[LedgerRow]:
    """Rows with `time >= since` of a ledger file, read without writing to it; raise LedgerError."""
    with _readonly(path) as db:
        return _select(db, since)


def read_first_seen(path: Path | str) -> dict[tuple[str, str], float]:
    """When each (expert, model) pair was first recorded, whatever the window asked for."""
    with _readonly(path) as db:
        cursor = db.execute("SELECT expert, model, MIN(time) FROM pings GROUP BY expert, model")
        return {(expert, model): float(first) for expert, model, first in cursor}


def read_observations(path: Path | str, since: float | None = None) -> list[ObservationRow]:
    """Observations with `time >= since` of a ledger file, read without writing to it; raise LedgerError."""
    with _readonly(path) as db:
        return _select_observations(db, since)


@dataclass(frozen=True)
class Recent:
    """Hourly sums and recent touches per (expert, model), from the ledger (see `Ledger.recent`)."""

    # (expert, model, hour) -> (ping cost known, unpriced answered pings)
    ping_hours: dict[tuple[str, str, int], tuple[float, int]]
    # (expert, model, hour) -> (requests, cache_read, cache_write, saved_usd, drift)
    observation_hours: dict[tuple[str, str, int], tuple[int, int, int, float, int]]
    # (expert, model) -> start of the latest production request attributed in order
    last_production: dict[tuple[str, str], float]
    # (expert, model) -> starts of pings that read or wrote the cache since ttl_since
    pings: dict[tuple[str, str], list[float]]
    first: float | None  # the oldest row of either table at or after `since`


def _recent(db: sqlite3.Connection, since: float, ttl_since: float) -> Recent:
    cost = " + ".join(f"COALESCE({c}, 0)" for c in COST_COLUMNS)
    missing = " OR ".join(f"{c} IS NULL" for c in COST_COLUMNS)
    ping_hours = {
        (e, m, int(h)): (float(c), int(u))
        for e, m, h, c, u in db.execute(
            f"SELECT expert, model, CAST(time / 3600 AS INTEGER), SUM({cost}),"
            f" SUM(CASE WHEN ({missing}) AND result != 'error' THEN 1 ELSE 0 END)"
            " FROM pings WHERE time >= ? GROUP BY 1, 2, 3", (since,))
    }
    pings: dict[tuple[str, str], list[float]] = {}
    for e, m, t in db.execute(
        "SELECT expert, model, time FROM pings WHERE time >= ? AND"
        " (cache_read > 0 OR cache_write_5m > 0 OR cache_write_1h > 0) ORDER BY time", (ttl_since,)):
        pings.setdefault((e, m), []).append(float(t))
    first_ping = db.execute("SELECT MIN(time) FROM pings WHERE time >= ?", (since,)).fetchone()[0]
    observation_hours: dict[tuple[str, str, int], tuple[int, int, int, float, int]] = {}
    last_production: dict[tuple[str, str], float] = {}
    first_obs = None
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'observations'").fetchone():
        observation_hours = {
            (e, m, int(h)): (int(n), int(r), int(w), float(s), int(d))
            for e, m, h, n, r, w, s, d in db.execute(
                "SELECT expert, model, CAST(time / 3600 AS INTEGER), COUNT(*), SUM(cache_read),"
                " SUM(cache_write_5m + cache_write_1h), SUM(COALESCE(saved_usd, 0)),"
                " SUM(drift IS NOT NULL) FROM observations WHERE time >= ? GROUP BY 1, 2, 3", (since,))
        }
        last_production = {
            (e, m): float(t)
            for e, m, t in db.execute("SELECT expert, model, MAX(time) FROM observations GROUP BY 1, 2")
        }
        first_obs = db.execute("SELECT MIN(time) FROM observations WHERE time >= ?", (since,)).fetchone()[0]
    firsts = [float(t) for t in (first_ping, first_obs) if t is not None]
    return Recent(ping_hours, observation_hours, last_production, pings, min(firsts) if firsts else None)
