"""The ledger on PostgreSQL 13+: the SQLite backend's interface and semantics, in a database that
several daemons (a fleet) can share.

The same tables as `keepwarm.store.sqlite`, the same summaries kept in the same transaction as
the rows, so a restart still reads O(pairs). What differs is what a network database brings:

- The schema is migrated by numbered SQL files (`keepwarm/store/migrations/NNNN_*.sql`), all
  applied in one transaction that holds `pg_advisory_xact_lock`: the first of several daemons
  started at once migrates, the others wait for it and find the work done.
- The database can go away and come back. Rows that cannot be committed wait in memory (bounded,
  as with SQLite) and go in with a later commit; reconnecting backs off, so a dead server costs a
  ping at most one connection timeout every few seconds, never one per ping.
- The password comes from libpq's own means (`PGPASSWORD`, `PGPASSFILE`, `~/.pgpass`), from
  `ledger.password_file`, or from systemd's `$CREDENTIALS_DIRECTORY/ledger_password`; never from
  the URL, and it never appears in a log, metric, error or repr: libpq's messages can echo the
  connection string, so every message is scrubbed before it leaves this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeGuard, cast

import psycopg
from psycopg import sql as pgsql

from keepwarm.logs import event
from keepwarm.store import sqlite as lite
from keepwarm.store.base import COLUMN_DEFAULTS, COLUMNS, OBSERVATION_COLUMNS, SPEND_BUCKET, PendingLedger
from keepwarm.store.location import PostgresTarget, read_password, redact
from keepwarm.store.sqlite import LedgerError, LedgerRow, ObservationRow

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger("keepwarm.ledger")

# Any 64-bit number names the lock; this one is "keepwarm" in ASCII, so a DBA who sees it in
# pg_locks can tell whose it is.
MIGRATION_LOCK = 0x6B656570_7761726D
CONNECT_TIMEOUT = 5  # seconds: libpq's connect_timeout when the URL does not set one
STATEMENT_TIMEOUT_MS = 15_000  # a hung server must not hold a ping's thread forever
TCP_DEFAULTS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                "tcp_user_timeout": 15_000}  # libpq's, in seconds and (the last) milliseconds
RETRY_MAX = 30.0  # seconds: the longest wait between two reconnection attempts


# --- where, and with which password --------------------------------------------------------


def url_problem(url: str) -> str | None:
    """What is wrong with a `ledger.url` (unparseable, or holding a password), or None."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        # libpq quotes the piece it choked on, which may be (part of) a password: say only that
        # it does not parse, and how it should look.
        return ("cannot be parsed: write a libpq URI (postgresql://user@host:5432/dbname) or conninfo string"
                " (host=... port=... dbname=... user=...), quoting values that hold spaces")
    if params.get("password"):
        return ("holds a password: put it in ledger.password_file, $CREDENTIALS_DIRECTORY/ledger_password,"
                " PGPASSFILE or PGPASSWORD instead, so that the URL can be logged")
    return None


def connect(target: PostgresTarget, *, readonly: bool = False) -> psycopg.Connection[Any]:
    """A connection to the ledger's database, in autocommit (transactions are explicit); raise
    LedgerError with a message that holds no password."""
    password = read_password(target)
    options: dict[str, Any] = {"autocommit": True}
    try:
        given = psycopg.conninfo.conninfo_to_dict(target.url)
    except psycopg.Error:
        raise LedgerError(f"ledger {target}: {url_problem(target.url)}") from None
    given.pop("password", None)  # refused by the config; ignored if a caller passes one anyway
    if "connect_timeout" not in given and "PGCONNECT_TIMEOUT" not in os.environ:
        options["connect_timeout"] = CONNECT_TIMEOUT
    if "application_name" not in given and "PGAPPNAME" not in os.environ:
        options["application_name"] = "keepwarm"
    # A server behind a dead network path answers nothing, not even a reset: without these a
    # commit would wait for the kernel's retransmissions, a quarter of an hour, holding the
    # writers' lock. The URL's own settings win.
    for key, value in TCP_DEFAULTS.items():
        if key not in given:
            options[key] = value
    if password is not None:
        options["password"] = password
    try:
        conn = psycopg.connect(psycopg.conninfo.make_conninfo("", **given), **options)
    except psycopg.Error as exc:
        raise LedgerError(f"ledger {target}: cannot connect: {_message(exc, password, target)}") from None
    try:
        if readonly:  # a report must never write, even by mistake; it may read for as long as it needs
            conn.execute("SET default_transaction_read_only = on")
        else:  # a writer holds the pings' lock: a hung statement must not hold it for long
            conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    except psycopg.Error as exc:
        conn.close()
        raise LedgerError(f"ledger {target}: {_message(exc, password, target)}") from None
    return conn


def _message(exc: BaseException, password: str | None, target: PostgresTarget) -> str:
    """One line that says what went wrong, scrubbed of any password libpq may have echoed."""
    text = " ".join(str(exc).split())  # libpq's messages span lines; a log event is one
    return redact(text or type(exc).__name__, [p for p in (password, os.environ.get("PGPASSWORD")) if p])


# --- schema --------------------------------------------------------------------------------


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every migration shipped, in order: `NNNN_name.sql` takes the schema to NNNN."""
    found = []
    for entry in resources.files("keepwarm.store").joinpath("migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort()
    # A gap or a duplicate is a packaging bug: refuse it rather than skip a step.
    if [v for v, _, _ in found] != list(range(1, len(found) + 1)):
        raise LedgerError(f"the shipped migrations are not numbered 1..N: {[v for v, _, _ in found]}")
    return found


def schema_version() -> int:
    """The version this keepwarm writes: the number of the last migration."""
    return len(migrations())


def migrate(conn: psycopg.Connection[Any], where: str) -> int:
    """Bring the schema up to `schema_version()` in one transaction; return the version found before.

    The transaction first takes an advisory lock, so daemons started together migrate one after
    the other: the first applies every step, the next ones find nothing left to do. A failed
    step rolls everything back, leaving the schema as it was.
    """
    steps = migrations()
    target = len(steps)
    with conn.transaction():
        # A migration that rewrites a large table, or waits for another daemon's, may take a while.
        conn.execute("SET LOCAL statement_timeout = 0")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS keepwarm_schema (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM keepwarm_schema").fetchone()
        found = int(row[0]) if row else 0
        if found > target:
            raise LedgerError(
                f"ledger {where} has schema version {found}, newer than this keepwarm knows ({target}): "
                "upgrade keepwarm or point ledger.url at another database"
            )
        for version, name, text in steps[found:]:
            # No parameters: psycopg sends the file as one simple query, several statements and all.
            conn.execute(cast(Any, text))
            conn.execute("INSERT INTO keepwarm_schema (version, name) VALUES (%s, %s)", (version, name))
    if found < target:
        event(log, logging.INFO, "ledger schema migrated", ledger=where, found=found, version=target)
    return found


# --- writing -------------------------------------------------------------------------------

_INSERT = f"INSERT INTO pings ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
_INSERT_OBSERVATION = (
    # DO NOTHING: a copy of an observation already stored (same request_id) is no new row.
    f"INSERT INTO observations ({', '.join(OBSERVATION_COLUMNS)}) VALUES ({', '.join(['%s'] * len(OBSERVATION_COLUMNS))})"
    " ON CONFLICT DO NOTHING"
)
# The SQLite backend's upserts, in PostgreSQL's words: GREATEST for the two-argument MAX, and the
# target's columns named by table (PostgreSQL resolves a bare name in DO UPDATE to the table too,
# but spelling it out keeps `excluded.` and the stored value apart for the reader).
_UPSERT_PING_STATE = """
    INSERT INTO pair_state AS s (origin, expert, model, fingerprint, last_ping, last_result, last_refresh, prefix_tokens)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (origin, expert, model, fingerprint) DO UPDATE SET
        last_result = CASE WHEN excluded.last_ping >= COALESCE(s.last_ping, 0) THEN excluded.last_result ELSE s.last_result END,
        last_ping = GREATEST(COALESCE(s.last_ping, 0), excluded.last_ping),
        last_refresh = GREATEST(COALESCE(s.last_refresh, 0), COALESCE(excluded.last_refresh, 0)),
        prefix_tokens = CASE WHEN excluded.prefix_tokens IS NOT NULL AND excluded.last_ping >= COALESCE(s.last_ping, 0)
                             THEN excluded.prefix_tokens ELSE s.prefix_tokens END
"""
_UPSERT_OBSERVATION_STATE = """
    INSERT INTO pair_state AS s (origin, expert, model, fingerprint, last_production, last_request)
    VALUES (%s, %s, %s, %s, %s, %s)
    ON CONFLICT (origin, expert, model, fingerprint) DO UPDATE SET
        last_production = GREATEST(COALESCE(s.last_production, 0), COALESCE(excluded.last_production, 0)),
        last_request = GREATEST(COALESCE(s.last_request, 0), excluded.last_request)
"""
_UPSERT_SPEND = """
    INSERT INTO spend AS s (origin, bucket, usd) VALUES (%s, %s, %s)
    ON CONFLICT (origin, bucket) DO UPDATE SET usd = s.usd + excluded.usd
"""
_UPSERT_PING_HOUR = """
    INSERT INTO hours AS h (origin, expert, model, hour, ping_usd, ping_unpriced) VALUES (%s, %s, %s, %s, %s, %s)
    ON CONFLICT (origin, expert, model, hour) DO UPDATE SET
        ping_usd = h.ping_usd + excluded.ping_usd, ping_unpriced = h.ping_unpriced + excluded.ping_unpriced
"""
_UPSERT_OBSERVATION_HOUR = """
    INSERT INTO hours AS h (origin, expert, model, hour, requests, cache_read, cache_write, saved_usd, drift)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (origin, expert, model, hour) DO UPDATE SET
        requests = h.requests + excluded.requests, cache_read = h.cache_read + excluded.cache_read,
        cache_write = h.cache_write + excluded.cache_write, saved_usd = h.saved_usd + excluded.saved_usd,
        drift = h.drift + excluded.drift
"""


_REQUEST_ID = OBSERVATION_COLUMNS.index("request_id")


def _new_observations(cur: psycopg.Cursor[Any], rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The rows whose request_id is not stored yet (nor earlier in the batch): a copy sent again
    is no new row and must move no summary. A copy another member stores at the same moment is
    still kept out of the table by the unique index (ON CONFLICT DO NOTHING)."""
    ids = [v[_REQUEST_ID] for v in rows if v[_REQUEST_ID] is not None]
    if not ids:
        return rows
    seen = {row[0] for row in cur.execute("SELECT request_id FROM observations WHERE request_id = ANY(%s)", (ids,))}
    out = []
    for values in rows:
        request_id = values[_REQUEST_ID]
        if request_id is not None:
            if request_id in seen:
                continue
            seen.add(request_id)
        out.append(values)
    return out


def _locking_order(params: Iterable[tuple[Any, ...]], key: int) -> list[tuple[Any, ...]]:
    """Upserts sorted by their row's key (stably: sums keep their order): writers sharing the
    database then lock shared rows (a spend bucket, an hour) in one order and cannot deadlock."""
    return sorted(params, key=lambda p: tuple(p[:key]))


class _Qmark:
    """A psycopg connection seen through sqlite3's `?` placeholders, so that the plain-SQL readers
    of keepwarm.store.base (`resume`, `recent`, `spend`...) serve both backends: one copy of that
    logic, held to one set of contract tests."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, query: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self._conn.execute(cast(Any, query.replace("?", "%s")), params)


def _as_sqlite(conn: psycopg.Connection[Any]) -> sqlite3.Connection:
    """The adapter, typed as what the shared readers take (they call only `execute` and iterate or fetchone)."""
    return cast("sqlite3.Connection", _Qmark(conn))


def _alive(conn: psycopg.Connection[Any] | None) -> TypeGuard[psycopg.Connection[Any]]:
    """Whether a connection is open and unbroken (one that is neither is reopened)."""
    return conn is not None and not conn.closed and not conn.broken


@dataclass
class _Backoff:
    """When the next reconnection may be tried: after 1 s, then doubling up to RETRY_MAX."""

    delay: float = 0.0
    not_before: float = 0.0
    mono: Callable[[], float] = field(default=time.monotonic)

    def ready(self) -> bool:
        return self.mono() >= self.not_before

    def failed(self) -> None:
        self.delay = min(max(1.0, self.delay * 2), RETRY_MAX)
        self.not_before = self.mono() + self.delay

    def succeeded(self) -> None:
        self.delay, self.not_before = 0.0, 0.0


class PostgresLedger(PendingLedger):
    """The ledger in a PostgreSQL database; `record()` may be called from any thread and never raises.

    The same contract as `keepwarm.store.Ledger` (PendingLedger holds the writer they share):
    rows marked with this writer's `origin`, summaries kept in the rows' transaction, failures
    logged and counted through `on_error`, uncommitted rows kept (at most MAX_PENDING) and
    retried with the next write; a lost connection is reopened, with backoff.
    """

    # The longest it waits before trying a lost database again: a fleet member back from an
    # outage gives the others this long (and a lease) to renew before it counts them gone.
    reconnect_within = RETRY_MAX

    def __init__(
        self,
        target: PostgresTarget | str,
        retention_days: float | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[], None] | None = None,
        origin: str = "api",
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(retention_days, clock=clock, on_error=on_error, origin=origin)
        self.target = target if isinstance(target, PostgresTarget) else PostgresTarget(target)
        self._backoff = _Backoff(mono=mono)
        self._closed = False
        # A fleet's leases go over a connection of their own: behind the pings' commits (one a
        # ping, each holding `_lock`) a renewal waited 0.7-1.2 s at 1,000 pairs a member
        # (bench/fleet.py), and a lease missed counts a live member gone.
        self._lease_lock = threading.Lock()
        self._lease_conn: psycopg.Connection[Any] | None = None
        self._lease_backoff = _Backoff(mono=mono)
        # Opening fails loudly, as a SQLite file that cannot open does: the daemon then runs
        # without a ledger and says so. Once open, a lost connection is only retried.
        self._conn: psycopg.Connection[Any] | None = self._open()
        self._sweep_at_start()

    def __repr__(self) -> str:
        return f"PostgresLedger({self.target!s}, origin={self.origin!r})"

    @property
    def path(self) -> str:
        """Where the rows go, for logs: the URL without any password."""
        return str(self.target)

    def _open(self) -> psycopg.Connection[Any]:
        conn = connect(self.target)
        try:
            migrate(conn, str(self.target))
        except LedgerError:
            conn.close()
            raise
        except psycopg.Error as exc:
            conn.close()
            raise LedgerError(f"ledger {self.target}: cannot migrate the schema: {_message(exc, None, self.target)}") from None
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        """The live connection, reconnecting (with backoff) if the last one broke (the caller holds the lock)."""
        if self._closed:
            raise LedgerError(f"ledger {self.target} is closed")
        old = self._conn
        if _alive(old):
            return old
        self._conn = None
        self._conn = self._reconnect(old, self._backoff, self._open)
        event(log, logging.INFO, "ledger reconnected", ledger=str(self.target))
        return self._conn

    def _reconnect(
        self, old: psycopg.Connection[Any] | None, backoff: _Backoff, open_: Callable[[], psycopg.Connection[Any]]
    ) -> psycopg.Connection[Any]:
        """A new connection in place of `old` (closed here), tried no sooner than `backoff` allows."""
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
        if not backoff.ready():
            raise LedgerError(f"ledger {self.target}: the database is unreachable; next attempt in"
                              f" {backoff.not_before - backoff.mono():.0f} s")
        try:
            conn = open_()
        except LedgerError:
            backoff.failed()
            raise
        backoff.succeeded()
        return conn

    def _flush(self) -> None:
        """Commit every pending row, and the summaries they move, in one transaction (the caller holds the lock)."""
        if not self._pending and not self._pending_observations:
            return
        conn = self._connection()
        pings, observations = list(self._pending), list(self._pending_observations)
        with conn.transaction(), conn.cursor() as cur:
            if pings:
                cur.executemany(_INSERT, pings)
                cur.executemany(_UPSERT_PING_STATE, _locking_order(map(lite._ping_state_params, pings), 4))
                spend = [p for p in map(lite._spend_params, pings) if p is not None]
                cur.executemany(_UPSERT_SPEND, _locking_order(spend, 2))
                cur.executemany(_UPSERT_PING_HOUR, _locking_order(map(lite._ping_hour_params, pings), 4))
            if observations:
                observations = _new_observations(cur, observations)
            if observations:
                cur.executemany(_INSERT_OBSERVATION, observations)
                cur.executemany(_UPSERT_OBSERVATION_STATE,
                                _locking_order(map(lite._observation_state_params, observations), 4))
                hours: list[tuple[Any, ...]] = []
                for params in map(lite._observation_hour_params, observations):
                    hours += [params, (params[0], "", "", *params[3:])]
                cur.executemany(_UPSERT_OBSERVATION_HOUR, _locking_order(hours, 4))
        self._pending.clear()
        self._pending_observations.clear()

    def _sweep(self) -> None:
        """Delete rows older than the retention (the caller holds the lock)."""
        assert self.retention_days is not None
        now = self._clock()
        cutoff = now - self.retention_days * 86400.0
        conn = self._connection()
        with conn.transaction():
            deleted = conn.execute("DELETE FROM pings WHERE time < %s", (cutoff,)).rowcount
            deleted_observations = conn.execute("DELETE FROM observations WHERE time < %s", (cutoff,)).rowcount
            conn.execute("DELETE FROM spend WHERE bucket < %s", (int((now - 2 * 86400.0) // SPEND_BUCKET),))
            conn.execute("DELETE FROM hours WHERE hour < %s OR (expert != '' AND hour < %s)",
                         (int(cutoff // 3600), int((now - 2 * 86400.0) // 3600)))
            conn.execute("DELETE FROM pair_state WHERE GREATEST(COALESCE(last_ping, 0), COALESCE(last_request, 0)) < %s",
                         (cutoff,))
        self._last_sweep = now
        if deleted or deleted_observations:
            event(log, logging.INFO, "ledger retention", path=str(self.target), deleted=deleted,
                  deleted_observations=deleted_observations or None, retention_days=self.retention_days)

    @property
    def closed(self) -> bool:
        """Whether `close()` has run."""
        return self._closed

    def _where(self) -> str:
        return str(self.target)

    def _error_text(self, exc: BaseException) -> str:
        return _message(exc, None, self.target)  # libpq may echo the connection string: scrubbed

    @contextlib.contextmanager
    def _reading(self) -> Iterator[psycopg.Connection[Any]]:
        """The connection for a read, under the lock; a database error becomes a LedgerError."""
        with self._lock:
            try:
                yield self._connection()
            except psycopg.Error as exc:
                raise LedgerError(f"ledger {self.target}: cannot read it: {_message(exc, None, self.target)}") from None

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._reading() as conn:
            yield _as_sqlite(conn)

    def rows(self, since: float | None = None) -> list[LedgerRow]:
        """Every committed row of this ledger's origin with `time >= since` (all when None), oldest first."""
        with self._reading() as conn:
            return _select(conn, since, (self.origin,))

    def observations(self, since: float | None = None) -> list[ObservationRow]:
        """Every committed observation of this ledger's origin with `time >= since`, oldest first."""
        with self._reading() as conn:
            return _select_observations(conn, since, (self.origin,))

    def last_observation_id(self) -> int:
        """The highest observation id stored so far (0: none); where a new member's counts start."""
        with self._reading() as conn:
            row = conn.execute("SELECT COALESCE(MAX(id), 0) FROM observations").fetchone()
            return int(row[0]) if row is not None else 0

    def observations_after(self, after: int, also: Sequence[int] = ()) -> list[tuple[Any, ...]]:
        """Observations of this origin with an id above `after` or in `also`, in id order,
        drifted ones included: (id, expert, model, time, result, input, cache_read,
        cache_write_5m, cache_write_1h, output, the five costs, saved_usd, drift). What a fleet
        member counts in the production series of the pairs it owns (keepwarm.fleetcount)."""
        with self._reading() as conn:
            return [tuple(row) for row in conn.execute(
                "SELECT id, expert, model, time, result, input, cache_read, cache_write_5m, cache_write_1h, output,"
                " cost_input, cost_cache_read, cost_cache_write_5m, cost_cache_write_1h, cost_output, saved_usd, drift"
                " FROM observations WHERE (id > %s OR id = ANY(%s)) AND origin = %s ORDER BY id",
                (after, list(also), self.origin))]

    def _lease_connection(self) -> psycopg.Connection[Any]:
        """The leases' own connection, (re)opened with its own backoff (the caller holds `_lease_lock`)."""
        if self._closed:
            raise LedgerError(f"ledger {self.target} is closed")
        old = self._lease_conn
        if _alive(old):
            return old
        self._lease_conn = None
        # The schema was migrated when the ledger opened: a plain connection will do.
        self._lease_conn = self._reconnect(old, self._lease_backoff, lambda: connect(self.target))
        return self._lease_conn

    def renew_lease(self, fleet: str, member: str, now: float, lease: float) -> list[tuple[str, float]]:
        """Extend a fleet member's lease to `now + lease`; every live member with its expiry.

        Raises when the database cannot be reached: the fleet treats that as an outage."""
        with self._lease_lock:
            conn = self._lease_connection()
            with conn.transaction():
                conn.execute(
                    "INSERT INTO members (fleet, member, expires, joined) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (fleet, member) DO UPDATE SET expires = excluded.expires",
                    (fleet, member, now + lease, now))
                conn.execute("DELETE FROM members WHERE fleet = %s AND expires < %s", (fleet, now - 86400.0))
                return [(str(m), float(e)) for m, e in conn.execute(
                    "SELECT member, expires FROM members WHERE fleet = %s AND expires > %s ORDER BY member",
                    (fleet, now))]

    def drop_lease(self, fleet: str, member: str) -> None:
        """Give a member's lease up at once (a clean stop)."""
        with self._lease_lock:
            conn = self._lease_connection()
            with conn.transaction():
                conn.execute("DELETE FROM members WHERE fleet = %s AND member = %s", (fleet, member))

    def _release(self) -> None:
        """Close the connections: the writer's, and the leases' own."""
        self._closed = True
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        with self._lease_lock:
            if self._lease_conn is not None:
                with contextlib.suppress(Exception):
                    self._lease_conn.close()
                self._lease_conn = None


# --- readers -------------------------------------------------------------------------------


def _where(since: float | None, origins: Sequence[str] | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("time >= %s")
        params.append(since)
    if origins is not None:
        clauses.append("origin = ANY(%s)")
        params.append(list(origins))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _columns(conn: psycopg.Connection[Any], table: str, columns: Sequence[str]) -> str:
    """The select list; a schema not migrated yet (a report reads while older daemons still write)
    gives a column it lacks its default, as the SQLite reader does."""
    # The table the query will read, found by the search_path as the query finds it.
    have = {row[0] for row in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped", (table,))}
    return ", ".join(c if c in have or c not in COLUMN_DEFAULTS else f"'{COLUMN_DEFAULTS[c]}'" for c in columns)


def _select(conn: psycopg.Connection[Any], since: float | None, origins: Sequence[str] | None) -> list[LedgerRow]:
    where, params = _where(since, origins)
    query = f"SELECT id, {_columns(conn, 'pings', COLUMNS)} FROM pings{where} ORDER BY time, id"
    return [LedgerRow(*row) for row in conn.execute(cast(Any, query), params)]


def _select_observations(conn: psycopg.Connection[Any], since: float | None, origins: Sequence[str] | None) -> list[ObservationRow]:
    where, params = _where(since, origins)
    query = f"SELECT id, {_columns(conn, 'observations', OBSERVATION_COLUMNS)} FROM observations{where} ORDER BY time, id"
    return [ObservationRow(*row) for row in conn.execute(cast(Any, query), params)]


@contextlib.contextmanager
def _readonly(target: PostgresTarget) -> Iterator[psycopg.Connection[Any]]:
    """A read-only connection to an existing keepwarm ledger; every failure is a LedgerError."""
    conn = connect(target, readonly=True)
    try:
        found = conn.execute("SELECT to_regclass('keepwarm_schema') IS NOT NULL").fetchone()
        if not found or not found[0]:
            raise LedgerError(f"ledger {target}: no keepwarm ledger in this database (has a daemon run with this ledger.url?)")
        yield conn
    except psycopg.Error as exc:
        raise LedgerError(f"ledger {target}: cannot read it: {_message(exc, None, target)}") from None
    finally:
        conn.close()


def read_ledger(target: PostgresTarget, since: float | None = None, origins: Sequence[str] | None = None) -> list[LedgerRow]:
    """Ping rows with `time >= since` from `origins` (None: all); raise LedgerError."""
    with _readonly(target) as conn:
        return _select(conn, since, origins)


def read_observations(
    target: PostgresTarget, since: float | None = None, origins: Sequence[str] | None = None
) -> list[ObservationRow]:
    """Observations with `time >= since` from `origins` (None: all); raise LedgerError."""
    with _readonly(target) as conn:
        return _select_observations(conn, since, origins)


def read_first_seen(target: PostgresTarget, origins: Sequence[str] | None = None) -> dict[tuple[str, str], float]:
    """When each (expert, model) pair was first recorded, whatever the window asked for."""
    with _readonly(target) as conn:
        where, params = _where(None, origins)
        query = f"SELECT expert, model, MIN(time) FROM pings{where} GROUP BY expert, model"
        return {(e, m): float(first) for e, m, first in conn.execute(cast(Any, query), params)}


def read_origins(target: PostgresTarget, since: float | None = None) -> dict[str, int]:
    """How many ping and observation rows each origin has since `since`."""
    with _readonly(target) as conn:
        counts: dict[str, int] = {}
        where, params = _where(since, None)
        for table in ("pings", "observations"):
            query = pgsql.SQL("SELECT origin, COUNT(*) FROM {}" + where + " GROUP BY 1").format(pgsql.Identifier(table))
            for name, n in conn.execute(query, params):
                counts[name] = counts.get(name, 0) + int(n)
        return counts


def is_empty(target: PostgresTarget) -> bool:
    """Whether the database holds no keepwarm row yet (no schema, or empty tables)."""
    conn = connect(target, readonly=True)
    try:
        found = conn.execute("SELECT to_regclass('keepwarm_schema') IS NOT NULL").fetchone()
        if not found or not found[0]:
            return True
        row = conn.execute("SELECT EXISTS (SELECT 1 FROM pings) OR EXISTS (SELECT 1 FROM observations)").fetchone()
        return not (row and row[0])
    except psycopg.Error as exc:
        raise LedgerError(f"ledger {target}: cannot read it: {_message(exc, None, target)}") from None
    finally:
        conn.close()
