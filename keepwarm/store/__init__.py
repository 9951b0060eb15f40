"""keepwarm's state: the ledger of every ping and observation, and what a restart resumes from.

One small interface (`keepwarm.store.base`) with interchangeable backends behind it, as
APScheduler keeps its job stores: the daemon, `report`, `simulate` and the status page ask the
store for what they need and never see SQL. Today's backend is SQLite (`keepwarm.store.sqlite`).
"""

from keepwarm.store.sqlite import (
    MIGRATIONS,
    Ledger,
    LedgerError,
    LedgerRow,
    ObservationRow,
    Recent,
    read_first_seen,
    read_ledger,
    read_observations,
    schema_version,
)

__all__ = [
    "MIGRATIONS",
    "Ledger",
    "LedgerError",
    "LedgerRow",
    "ObservationRow",
    "Recent",
    "read_first_seen",
    "read_ledger",
    "read_observations",
    "schema_version",
]
