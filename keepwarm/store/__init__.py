"""keepwarm's state: the ledger of every ping and observation, and what a restart resumes from.

One small interface with interchangeable backends behind it, as APScheduler keeps its job
stores: the daemon, `report`, `simulate` and the status page ask the store for what they need
(a pair's last touches, a window of rows, the trailing spend) and never see SQL. The backend
today is SQLite (`keepwarm.store.sqlite`); `keepwarm.store.paths` says where it lives by default.
"""

from keepwarm.store.sqlite import (
    HISTORY_WINDOW,
    MIGRATIONS,
    ORIGINS,
    SPEND_BUCKET,
    Ledger,
    LedgerError,
    LedgerRow,
    ObservationRow,
    PairKey,
    PairResume,
    Recent,
    StoredTouch,
    read_first_seen,
    read_ledger,
    read_observations,
    read_origins,
    schema_version,
)

__all__ = [
    "HISTORY_WINDOW",
    "MIGRATIONS",
    "ORIGINS",
    "SPEND_BUCKET",
    "Ledger",
    "LedgerError",
    "LedgerRow",
    "ObservationRow",
    "PairKey",
    "PairResume",
    "Recent",
    "StoredTouch",
    "read_first_seen",
    "read_ledger",
    "read_observations",
    "read_origins",
    "schema_version",
]
