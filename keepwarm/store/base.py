"""What both ledger backends share: the rows a ping or an observation becomes, and the writer
that keeps the rows it cannot commit.

A backend (`keepwarm.store.sqlite.Ledger`, `keepwarm.store.postgres.PostgresLedger`) subclasses
`PendingLedger` and supplies only what differs with the driver: how the pending rows and their
summaries are committed (`_flush`), how old rows are pruned (`_sweep`), whether it is closed and
how its connection is let go (`closed`, `_release`), and how a driver's error reads in a log
(`_error_text`). What a daemon relies on is here once: `record()` never raises into the runner,
a row that cannot be committed waits in memory (at most MAX_PENDING, the oldest dropped first)
and goes in with the next write, and every failure is logged and counted through `on_error`.

What a restart, the budget, the status page and a fleet read back is plain SQL both dialects run
(a PostgreSQL connection is seen through sqlite3's `?` placeholders, `_reader`), so it is also
written once, here, and held to one set of contract tests (tests/test_store.py).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, Self

from keepwarm.logs import event
from keepwarm.pricing import COST_KINDS

if TYPE_CHECKING:
    import sqlite3

    from keepwarm.runner import PingOutcome  # it imports the SDK; `keepwarm report` should not need it

log = logging.getLogger("keepwarm.ledger")

RETENTION_EVERY = 3600.0  # seconds between two retention sweeps
MAX_PENDING = 10_000  # rows kept in memory while the store cannot be written (~days of pings)
USAGE_COLUMNS = ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output")
COST_COLUMNS = tuple(f"cost_{kind}" for kind in COST_KINDS)
# Where the pair's cache lives (schema version 6): its `accounts` entry, that account's provider, and
# how the provider routes the model (`global`, `geo`, `regional` or `default`), which sets its price.
PLACE_COLUMNS = ("account", "provider", "endpoint")
# What a row written before a column existed reads as: a real ping, of the one Anthropic account a
# config without `accounts:` has (keepwarm.config names it `default`).
COLUMN_DEFAULTS = {"origin": "api", "account": "default", "provider": "anthropic", "endpoint": "default"}
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
    "origin",
    *PLACE_COLUMNS,
)
ORIGINS = ("api", "emulator", "scaled")  # real pings; the built-in emulator; a time-scaled run
SPEND_BUCKET = 10  # seconds: the budget's spend is kept, and rolls out of its window, in these steps


def place(pair: Any) -> tuple[str, str, str]:
    """(account, provider, endpoint) of a configured pair, as its rows record them.

    The endpoint is read from the pair's price row (`provider:endpoint:model`, see
    keepwarm.providers.base.provider_price): it is what the pair was billed at, so a report
    prices the row the way the daemon did, with or without the config at hand.
    """
    row = getattr(pair, "price_row", "")
    endpoint = row.split(":", 2)[1] if row.count(":") >= 2 else COLUMN_DEFAULTS["endpoint"]
    return (getattr(pair, "account", COLUMN_DEFAULTS["account"]), getattr(pair, "provider", COLUMN_DEFAULTS["provider"]),
            endpoint)


def _row_values(outcome: PingOutcome, origin: str = "api") -> tuple[Any, ...]:
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
        origin,
        *place(pair),
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
    "origin",
    *PLACE_COLUMNS,
)


class ObservationRecord(Protocol):
    """What the store keeps of a judged production observation (`keepwarm.observations` makes
    them; described here so that the store, below it, never imports it)."""

    @property
    def observation(self) -> Any:
        """The request: at, pair (expert, model, ttl, fingerprint), fingerprint, result, usage, request_id."""

    @property
    def cost(self) -> dict[str, float] | None:
        """USD by kind, or None when the model has no price."""

    @property
    def saved(self) -> bool:
        """Whether the keepalive spared it a write."""

    @property
    def saved_usd(self) -> float | None:
        """What it spared, or None."""

    @property
    def drift(self) -> str | None:
        """Why it is drift, or None."""

    @property
    def late(self) -> bool:
        """Whether it arrived after a later request of its pair."""


def _observation_values(record: ObservationRecord, received: float, origin: str = "api") -> tuple[Any, ...]:
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
        origin,
        *place(pair),
    )



# --- the state a restart reads back ---------------------------------------------------------


def _ping_refresh(at: float, read: int | None, w5: int | None, w1: int | None, inp: int | None) -> tuple[float | None, int | None]:
    """(start if the ping read or wrote the cache, the prefix size it measured) of one ping."""
    if inp is None:  # failed: no usage
        return None, None
    cached = (read or 0) + (w5 or 0) + (w1 or 0)
    return (at if cached else None), (cached or inp)


@dataclass(frozen=True)
class Recent:
    """What the status page and the attribution of savings take back after a restart."""

    # hour -> (ping cost known, unpriced answered pings, requests, cache_read, cache_write, saved_usd, drift),
    # every pair together, for the week before `now`
    all_hours: dict[int, tuple[float, int, int, int, int, float, int]]
    # (expert, model, hour) -> (requests, cache_read, cache_write, saved_usd, drift), the day before `now`
    pair_hours: dict[tuple[str, str, int], tuple[int, int, int, float, int]]
    # (expert, model) -> start of the latest production request
    last_production: dict[tuple[str, str], float]
    # (expert, model) -> starts of pings that read or wrote the cache since ttl_since
    pings: dict[tuple[str, str], list[float]]
    first: float | None  # the oldest row of either table in the week before `now`


def _recent(db: sqlite3.Connection, origin: str, now: float, ttl_since: float) -> Recent:
    week, day = int((now - 7 * 86400.0) // 3600), int((now - 86400.0) // 3600)
    all_hours = {
        int(h): (float(c), int(u), int(n), int(r), int(w), float(sv), int(d))
        for h, c, u, n, r, w, sv, d in db.execute(
            "SELECT hour, ping_usd, ping_unpriced, requests, cache_read, cache_write, saved_usd, drift FROM hours"
            " WHERE origin = ? AND expert = '' AND hour >= ?", (origin, week))
    }
    pair_hours = {
        (e, m, int(h)): (int(n), int(r), int(w), float(sv), int(d))
        for e, m, h, n, r, w, sv, d in db.execute(
            "SELECT expert, model, hour, requests, cache_read, cache_write, saved_usd, drift FROM hours"
            " WHERE origin = ? AND expert != '' AND hour >= ? AND requests > 0", (origin, day))
    }
    last_production = {
        (e, m): float(t)
        for e, m, t in db.execute(
            "SELECT expert, model, MAX(last_request) FROM pair_state WHERE origin = ? AND last_request IS NOT NULL"
            " GROUP BY 1, 2", (origin,))
    }
    pings: dict[tuple[str, str], list[float]] = {}
    for e, m, t in db.execute(
        "SELECT expert, model, time FROM pings WHERE time >= ? AND origin = ? AND"
        " (cache_read > 0 OR cache_write_5m > 0 OR cache_write_1h > 0) ORDER BY time", (ttl_since, origin)):
        pings.setdefault((e, m), []).append(float(t))
    since = now - 7 * 86400.0
    firsts = [
        db.execute(f"SELECT MIN(time) FROM {table} WHERE time >= ? AND origin = ?", (since, origin)).fetchone()[0]
        for table in ("pings", "observations")
    ]
    found = [float(t) for t in firsts if t is not None]
    return Recent(all_hours, pair_hours, last_production, pings, min(found) if found else None)


# How far back a restart reads an adaptive pair's touches: it learns idle gaps by hour of the week.
HISTORY_WINDOW = 7 * 86400.0


@dataclass(frozen=True)
class PairKey:
    """A pair as the store knows it: its cache is (expert, model, fingerprint)."""

    expert: str
    model: str
    fingerprint: str
    history: bool = False  # also read back its touches (an adaptive pair learns from them)


# A touch as a restart hands it back: (start, "ping" | "production", result, prefix tokens).
StoredTouch = tuple[float, str, str, int]
# An observation as a fleet's owner takes it from the store: (id, expert, model, start, result, prefix tokens).
StoredObservation = tuple[int, str, str, float, str, int]


@dataclass(frozen=True)
class PairResume:
    """What a restart resumes one pair from (each None when never seen)."""

    last_ping: float | None = None  # start of the latest ping, whatever it found
    last_result: str | None = None
    last_refresh: float | None = None  # start of the latest ping that read or wrote the cache
    prefix_tokens: int | None = None  # the prefix size the latest answered ping measured
    last_production: float | None = None  # start of the latest production request that read or wrote it
    last_request: float | None = None  # start of the latest production request of any kind
    touches: tuple[StoredTouch, ...] = ()  # oldest first; only for a PairKey with `history`

    def last_touch(self) -> float | None:
        """Start of the latest request, ping or production, that read or wrote the cache."""
        found = [t for t in (self.last_refresh, self.last_production) if t]
        return max(found) if found else None


def _resume(
    db: sqlite3.Connection, origin: str, pairs: list[PairKey], now: float,
    ping_log: int = 32, touch_log: int = 2500,
) -> dict[tuple[str, str], PairResume]:
    wanted = {(p.expert, p.model): p for p in pairs}
    out: dict[tuple[str, str], PairResume] = {}
    for e, m, fp, lp, lr, lref, tokens, lprod, lreq in db.execute(
        "SELECT expert, model, fingerprint, last_ping, last_result, last_refresh, prefix_tokens, last_production,"
        " last_request FROM pair_state WHERE origin = ?", (origin,)):
        pair = wanted.get((e, m))
        if pair is None or pair.fingerprint != fp:
            continue  # not configured here, or an older prefix: another cache
        out[(e, m)] = PairResume(lp or None, lr, lref or None, tokens, lprod or None, lreq or None)
    since = now - HISTORY_WINDOW
    for pair in pairs:
        key = (pair.expert, pair.model)
        if not pair.history or key not in out:
            continue
        args = (pair.expert, pair.model, origin, pair.fingerprint, since)
        touches: list[StoredTouch] = []
        for at, result, read, w5, w1, inp in db.execute(
            "SELECT time, result, cache_read, cache_write_5m, cache_write_1h, input FROM pings WHERE expert = ?"
            " AND model = ? AND origin = ? AND fingerprint = ? AND time >= ? ORDER BY time DESC LIMIT ?",
            (*args, ping_log)):
            touches.append((float(at), "ping", result, _ping_refresh(at, read, w5, w1, inp)[1] or 0))
        for at, result, read, written, inp in db.execute(
            "SELECT time, result, cache_read, cache_write_5m + cache_write_1h, input FROM observations WHERE"
            " expert = ? AND model = ? AND origin = ? AND fingerprint = ? AND time >= ? AND drift IS NULL"
            " ORDER BY time DESC LIMIT ?", (*args, touch_log)):
            touches.append((float(at), "production", result, (read + written) or inp))
        touches.sort()
        out[key] = replace(out[key], touches=tuple(touches))
    return out


class PendingLedger(abc.ABC):
    """A ledger writer: `record()` and `record_observations()` may be called from any thread and
    never raise. Rows are marked with this writer's `origin` (`api`, `emulator` or `scaled`), so
    that `report` and a restart read only the origin they are for."""

    def __init__(
        self,
        retention_days: float | None,
        *,
        clock: Callable[[], float],
        on_error: Callable[[], None] | None,
        origin: str,
    ) -> None:
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {', '.join(ORIGINS)}, not {origin!r}")
        self.origin = origin
        self._on_error = on_error  # e.g. a metric's inc: failures must be visible, not just logged
        self.retention_days = retention_days
        self.write_errors = 0
        self.dropped = 0  # rows lost for good because the backlog overflowed
        self._clock = clock
        self._lock = threading.Lock()
        # Rows that failed to commit (a locked or full file, a database away) wait here and go in
        # with the next write, so a passing outage costs no row; bounded so that a dead disk or
        # server cannot eat memory.
        self._pending: collections.deque[tuple[Any, ...]] = collections.deque()
        self._pending_observations: collections.deque[tuple[Any, ...]] = collections.deque()
        self._last_sweep = float("-inf")

    # --- what a backend supplies (each called with the lock held) ----------------------------

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether `close()` has run: nothing more is written."""

    @abc.abstractmethod
    def _flush(self) -> None:
        """Commit every pending row, and the summaries they move, in one transaction; clear what went in."""

    @abc.abstractmethod
    def _sweep(self) -> None:
        """Delete rows older than the retention, and set `_last_sweep`."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Let the connection go, after the last flush."""

    @abc.abstractmethod
    def _where(self) -> str:
        """Where the rows go, for logs: a path, or a URL without any password."""

    def _error_text(self, exc: BaseException) -> str:
        """A driver's error as a log may show it."""
        return str(exc)

    @abc.abstractmethod
    def _reader(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """The connection for a read, under the lock, taking `?` placeholders (not with the lock held)."""

    # --- the shared writer ---------------------------------------------------------------------

    def _sweep_at_start(self) -> None:
        """The first retention sweep, when the ledger opens: a failure only waits for the next one."""
        if self.retention_days is None:
            return
        with self._lock:
            try:
                self._sweep()
            except Exception as exc:  # noqa: BLE001 - old rows can wait for the next sweep; pinging cannot
                self._failed("cannot delete old ledger rows", exc)

    def record(self, outcome: PingOutcome) -> None:
        """Store one ping; never raises: a failure is logged and counted in `write_errors`."""
        try:
            values = _row_values(outcome, self.origin)
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

    def record_observations(self, records: Sequence[ObservationRecord]) -> None:
        """Store the accepted observations of one request in one commit; never raises."""
        try:
            received = self._clock()
            values = [_observation_values(r, received, self.origin) for r in records]
        except Exception as exc:  # noqa: BLE001 - a malformed record is a bug, not worth a crash
            self._failed("cannot turn observations into rows", exc)
            return
        with self._lock:
            self._queue(self._pending_observations, values,
                        "cannot write observations to the ledger; kept in memory and retried")

    def can_keep(self) -> bool:
        """Whether observations accepted now would be written: nothing waits in memory, or what
        waits goes in now (the endpoint answers 503 otherwise)."""
        with self._lock:
            if self.closed:
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

    @property
    def pending(self) -> int:
        """Rows, pings and observations, waiting in memory for the store to take them."""
        return len(self._pending) + len(self._pending_observations)

    def _failed(self, what: str, exc: BaseException, **fields: Any) -> None:
        self.write_errors += 1
        if self._on_error is not None:
            self._on_error()
        event(log, logging.ERROR, what, path=self._where(), error=f"{type(exc).__name__}: {self._error_text(exc)}",
              write_errors=self.write_errors, pending=self.pending, dropped=self.dropped or None, **fields)

    def close(self) -> None:
        """Write what is pending, and let the connection go."""
        with self._lock:
            if self.closed:
                return
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever the store does
                lost = self.pending
                self._failed(f"cannot write {lost} pending ledger row(s) at close; they are lost", exc, lost=lost)
            self._release()

    # --- the shared readers ----------------------------------------------------------------

    def recent(self, now: float, ttl_since: float) -> Recent:
        """What the status page and the attribution of savings need back after a restart."""
        with self._reader() as db:
            return _recent(db, self.origin, now, ttl_since)

    def resume(self, pairs: Iterable[PairKey], now: float) -> dict[tuple[str, str], PairResume]:
        """Each pair's state to resume from, by (expert, model): O(pairs), whatever the rows.

        Only the pair's current prefix counts (a changed prefix is a new cache); adaptive pairs
        also get their bounded touch history of the last week (`HISTORY_WINDOW`).
        """
        with self._reader() as db:
            return _resume(db, self.origin, list(pairs), now)

    def spend(self, since: float) -> list[tuple[float, float]]:
        """The keepalive's spend since `since` in SPEND_BUCKET steps: (bucket start, USD), oldest first."""
        with self._reader() as db:
            cursor = db.execute("SELECT bucket, usd FROM spend WHERE origin = ? AND bucket >= ? ORDER BY bucket",
                                (self.origin, int(since // SPEND_BUCKET)))
            return [(float(bucket * SPEND_BUCKET), float(usd)) for bucket, usd in cursor]

    def refreshed_between(self, expert: str, model: str, start: float, end: float) -> bool:
        """Whether a ping of the pair that read or wrote the cache started in (start, end]: whether
        keepwarm held it warm for a production request reported later than the observer remembers."""
        with self._reader() as db:
            row = db.execute(
                "SELECT 1 FROM pings WHERE expert = ? AND model = ? AND time > ? AND time <= ?"
                " AND (cache_read > 0 OR cache_write_5m > 0 OR cache_write_1h > 0) LIMIT 1",
                (expert, model, start, end),
            ).fetchone()
            return row is not None

    def last_requests(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """The start of the latest production request each (expert, model) has in the store, any
        member's (a fleet judges savings against the fleet's history)."""
        out: dict[tuple[str, str], float] = {}
        with self._reader() as db:
            for expert, model in pairs:
                row = db.execute("SELECT MAX(last_request) FROM pair_state WHERE origin = ? AND expert = ? AND model = ?",
                                 (self.origin, expert, model)).fetchone()
                if row is not None and row[0]:
                    out[(expert, model)] = float(row[0])
        return out

    def received_since(self, since: float) -> list[StoredObservation]:
        """Observations of this origin that any writer stored at or after `since` (its clock), as
        a fleet's owner applies those another member accepted: (id, expert, model, at, result,
        prefix tokens), in id order. Drifted ones touched another prefix's cache: left out."""
        with self._reader() as db:
            return [(int(i), e, m, float(t), r, int(n)) for i, e, m, t, r, n in db.execute(
                "SELECT id, expert, model, time, result, (cache_read + cache_write_5m + cache_write_1h) FROM observations"
                " WHERE received >= ? AND origin = ? AND drift IS NULL ORDER BY id", (since, self.origin))]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
