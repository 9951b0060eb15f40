"""keepwarm's state: the ledger of every ping and observation, and what a restart resumes from.

One small interface with interchangeable backends behind it, as APScheduler keeps its job
stores: the daemon, `report`, `simulate` and the status page ask the store for what they need
(a pair's last touches, a window of rows, the trailing spend) and never see SQL. The backend
is SQLite (`keepwarm.store.sqlite`, a file: one daemon) or PostgreSQL (`keepwarm.store.postgres`,
a database several daemons share); `open_store` picks the one the config names, and the readers
take either a file's path or a `PostgresTarget`. `keepwarm.store.paths` says where the file lives
by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from keepwarm.store import sqlite as _sqlite
from keepwarm.store.base import (
    HISTORY_WINDOW,
    ORIGINS,
    SPEND_BUCKET,
    PairKey,
    PairResume,
    Recent,
    StoredObservation,
    StoredTouch,
)
from keepwarm.store.location import PostgresTarget, is_url, redact
from keepwarm.store.sqlite import (
    MIGRATIONS,
    Ledger,
    LedgerError,
    LedgerRow,
    ObservationRow,
    schema_version,
)

if TYPE_CHECKING:
    from keepwarm.config import Config
    from keepwarm.runner import PingOutcome
    from keepwarm.store.base import ObservationRecord

# Where a ledger is: a SQLite file, or a PostgreSQL database.
Location = Path | str | PostgresTarget


@runtime_checkable
class Store(Protocol):
    """What the daemon asks of its state store, whichever the backend: the backends' shared contract
    (tests/test_store.py runs on both)."""

    origin: str
    write_errors: int

    def record(self, outcome: PingOutcome) -> None: ...

    def record_observations(self, records: Sequence[ObservationRecord]) -> None: ...

    def resume(self, pairs: Iterable[PairKey], now: float) -> dict[tuple[str, str], PairResume]: ...

    def spend(self, since: float) -> list[tuple[float, float]]: ...

    def recent(self, now: float, ttl_since: float) -> Recent: ...

    def rows(self, since: float | None = None) -> list[LedgerRow]: ...

    def observations(self, since: float | None = None) -> list[ObservationRow]: ...

    def refreshed_between(self, expert: str, model: str, start: float, end: float) -> bool: ...

    def can_keep(self) -> bool: ...

    def received_since(self, since: float) -> list[StoredObservation]: ...

    def last_requests(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], float]: ...

    def renew_lease(self, fleet: str, member: str, now: float, lease: float) -> list[tuple[str, float]]: ...

    def drop_lease(self, fleet: str, member: str) -> None: ...

    def close(self) -> None: ...


def location(config: Config) -> Path | PostgresTarget | None:
    """Where the config keeps its ledger: its database, its file, or None (`ledger: off`)."""
    if config.ledger_url is not None:
        return PostgresTarget(config.ledger_url, config.ledger_password_file)
    return config.ledger_path


def open_store(config: Config, origin: str = "api", on_error: Callable[[], None] | None = None) -> Store | None:
    """The config's store, open and migrated: PostgreSQL for `ledger.url`, else the SQLite file
    (its directory made when it is the default path), else None (`ledger: off`); raise
    LedgerError or OSError when it cannot open."""
    where = location(config)
    if isinstance(where, PostgresTarget):
        from keepwarm.store.postgres import PostgresLedger  # psycopg loads only for a database

        return PostgresLedger(where, config.ledger_retention_days, on_error=on_error, origin=origin)
    if where is None:
        return None
    from keepwarm.store.paths import prepare

    prepare(where, make_directory=config.ledger_default)
    return Ledger(where, config.ledger_retention_days, on_error=on_error, origin=origin)


def _database(where: Location) -> PostgresTarget | None:
    if isinstance(where, PostgresTarget):
        return where
    return PostgresTarget(where) if isinstance(where, str) and is_url(where) else None


def read_ledger(where: Location, since: float | None = None, origins: Sequence[str] | None = None) -> list[LedgerRow]:
    """Ping rows with `time >= since` from `origins` (None: all) of a ledger file or database,
    read without writing to it; raise LedgerError."""
    target = _database(where)
    if target is None:
        return _sqlite.read_ledger(Path(where) if isinstance(where, str) else where, since, origins)  # type: ignore[arg-type]
    from keepwarm.store import postgres

    return postgres.read_ledger(target, since, origins)


def read_observations(where: Location, since: float | None = None, origins: Sequence[str] | None = None) -> list[ObservationRow]:
    """Observations with `time >= since` from `origins` (None: all) of a ledger file or database; raise LedgerError."""
    target = _database(where)
    if target is None:
        return _sqlite.read_observations(where, since, origins)  # type: ignore[arg-type]
    from keepwarm.store import postgres

    return postgres.read_observations(target, since, origins)


def read_first_seen(where: Location, origins: Sequence[str] | None = None) -> dict[tuple[str, str], float]:
    """When each (expert, model) pair was first recorded, whatever the window asked for."""
    target = _database(where)
    if target is None:
        return _sqlite.read_first_seen(where, origins)  # type: ignore[arg-type]
    from keepwarm.store import postgres

    return postgres.read_first_seen(target, origins)


def read_origins(where: Location, since: float | None = None) -> dict[str, int]:
    """How many ping and observation rows each origin has since `since` (what a report leaves out)."""
    target = _database(where)
    if target is None:
        return _sqlite.read_origins(where, since)  # type: ignore[arg-type]
    from keepwarm.store import postgres

    return postgres.read_origins(target, since)


__all__ = [
    "HISTORY_WINDOW",
    "MIGRATIONS",
    "ORIGINS",
    "SPEND_BUCKET",
    "Ledger",
    "LedgerError",
    "LedgerRow",
    "Location",
    "ObservationRow",
    "PairKey",
    "PairResume",
    "PostgresTarget",
    "Recent",
    "Store",
    "StoredObservation",
    "StoredTouch",
    "is_url",
    "location",
    "open_store",
    "read_first_seen",
    "read_ledger",
    "read_observations",
    "read_origins",
    "redact",
    "schema_version",
]
