"""In a fleet, production's money is counted by the pair's owner, from the shared store.

Production posts an observation to any member. The member that receives it judges it (saved,
drift: against the fleet's history) and stores it; the member that owns the pair counts it in
the pair's `keepwarm_production_*`, `keepwarm_saved_usd_total` and
`keepwarm_prefix_drift_total` series, as the store holds it. So a pair's series live on one
member, the one that pings it and exports its other series, and a sum over members counts each
request, cost and saving once, however production spreads its posts.

The rule is one: an observation is counted by the member that owns its pair when that member
first reads it from the store. Every member reads every new row within a renewal of its
commit, so with members that agree on who is live each row is counted exactly once. A row read
within one renewal of a membership change may be read by the old owner before it let the pair
go and by the new one after it took it (counted twice), or by each on the wrong side of the
change (counted by neither): the ledger (`keepwarm report`) is the exact account; the series
are per member, like the pings' counters, which also restart at 0 on a new owner.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

from keepwarm.pricing import COST_KINDS

# How long a read row id stays below the ones re-read: a transaction that got its id but had not
# committed at the last read commits within this (the store's statement timeout is 15 s).
COMMIT_SLACK = 30.0
# The most gaps below the highest id read asked for by id; more (another origin's rows, a burst of
# rollbacks) and the range is read again whole.
MAX_GAPS = 1000


class StoredProduction(NamedTuple):
    """One observation as the store keeps it: what its owner counts."""

    id: int
    expert: str
    model: str
    at: float
    result: str
    tokens: dict[str, int]  # by COST_KINDS
    cost: dict[str, float] | None  # by COST_KINDS; None: the model has no price
    saved_usd: float  # 0 when not saved (or unpriced)
    drift: bool

    @property
    def key(self) -> str:
        """The pair's key, `expert/model`."""
        return f"{self.expert}/{self.model}"


def from_row(row: tuple[Any, ...]) -> StoredProduction:
    """A store row (`observations_after`) as a StoredProduction."""
    row_id, expert, model, at, result = row[:5]
    tokens = {kind: int(n or 0) for kind, n in zip(COST_KINDS, row[5:10], strict=True)}
    costs = row[10:15]
    cost = None if all(c is None for c in costs) else {
        kind: float(c or 0.0) for kind, c in zip(COST_KINDS, costs, strict=True)}
    return StoredProduction(int(row_id), str(expert), str(model), float(at), str(result), tokens, cost,
                            float(row[15] or 0.0), row[16] is not None)


class ProductionStore(Protocol):
    """What the feed needs of the store (keepwarm.store.postgres)."""

    def last_observation_id(self) -> int:
        """The highest observation id stored so far."""

    def observations_after(self, after: int, also: Sequence[int] = ()) -> list[tuple[Any, ...]]:
        """Observation rows with an id above `after` or in `also`, in id order."""


class ProductionFeed:
    """The observations stored since the last read, each handed out once, by id.

    Reads by id rather than by the receiving member's clock: a member that could not reach the
    store writes its buffered rows when it is back, with new ids, and they are read then. Ids are
    handed out at insert and become visible at commit, so a read may see a later id before an
    earlier one: each read asks for the ids above the highest seen, and again for the gaps below
    it that are younger than COMMIT_SLACK (an id not seen by then was rolled back, or belongs to
    another origin's row). Past MAX_GAPS gaps it reads the whole range again instead.
    """

    def __init__(self, store: ProductionStore, mono: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.mono = mono
        self.floor: int | None = None  # every id up to here is handed out or will never be
        self.highest = 0  # the highest id handed out
        self._marks: deque[tuple[float, int]] = deque()  # (when, highest id seen then)
        self._seen: set[int] = set()  # ids above the floor handed out
        self.failures = 0

    def start(self) -> bool:
        """Start after what the store holds now (counted by whoever owned it then); False when
        the store cannot be read (the next `read` tries again)."""
        try:
            self.floor = self.highest = self.store.last_observation_id()
        except Exception:  # noqa: BLE001 - an outage: the next read starts it
            self.failures += 1
            return False
        return True

    def read(self) -> list[StoredProduction]:
        """The rows not handed out yet, in id order; none when the store cannot be read."""
        if self.floor is None and not self.start():
            return []
        assert self.floor is not None
        floor, seen = self.floor, self._seen
        if self.highest - floor - len(seen) <= MAX_GAPS:
            after, gaps = self.highest, [i for i in range(floor + 1, self.highest) if i not in seen]
        else:
            after, gaps = floor, []
        try:
            rows = self.store.observations_after(after, gaps)
        except Exception:  # noqa: BLE001 - the next read covers the same ids again
            self.failures += 1
            return []
        now = self.mono()
        out = [from_row(r) for r in rows if int(r[0]) not in seen]
        seen.update(r.id for r in out)
        self.highest = max([self.highest, *(r.id for r in out)])
        if not self._marks or self.highest > self._marks[-1][1]:
            self._marks.append((now, self.highest))
        while self._marks and now - self._marks[0][0] >= COMMIT_SLACK:
            _, mark = self._marks.popleft()
            self.floor = max(self.floor, mark)
        if self.floor != floor:
            self._seen = {i for i in seen if i > self.floor}
        return out
