"""`budget.usd_per_day`: a cap on the keepalive's own spend over the trailing 24 h (docs/policy.md).

One `Budget` serves all pairs. It is fed the cost of every ping (`record`) and asked, when a
pair's ping is due, whether it may go (`may_ping`). Below `near` (80 %) of the cap every pair
may ping. Between there and the cap the headroom left shrinks the share of pairs allowed, best
first: a pair pings only while fewer than that share of the pairs rank above it by expected
saving of their next ping, so the pairs whose pings save least stop first. Only pairs still
asking are ranked: one whose policy let its cache lapse is forgotten (`forget`), and so is one
that has not asked for `STALE` seconds; counting pairs that stopped asking long ago kept the
only pair still pinging refused for hours. At the cap nobody pings until spend older than 24 h
rolls out of the window (`resume_at`). Pure: time is passed in.

Spend is kept in 10-second buckets, as the ledger keeps it, so that a restart restores exactly
the spend the process had counted (`restore`) and memory stays bounded (8,640 buckets a day,
where a tuple per ping was 3.6 million at 10,000 pairs). A bucket leaves the window once all of
it is older than 24 h: spend is counted up to 10 s longer, never shorter.
"""

from __future__ import annotations

from collections import deque

WINDOW = 86400.0
NEAR = 0.8
BUCKET = 10.0  # seconds; the ledger's SPEND_BUCKET
# A pair asks whenever a ping is due: every interval, at most an hour under the 1 h TTL.
# One that has not asked for two hours has stopped pinging, and ranks nobody out.
STALE = 7200.0


class Budget:
    """A trailing-24 h spend cap shared by every pair."""

    def __init__(self, usd_per_day: float, near: float = NEAR, window: float = WINDOW, stale: float = STALE) -> None:
        self.cap = usd_per_day
        self.near = near
        self.window = window
        self.stale = stale
        # [bucket start, USD] in time order; lists, so a late ping adds to its bucket in place.
        self._spends: deque[list[float]] = deque()
        self._total = 0.0
        self._values: dict[str, tuple[float, float]] = {}  # pair -> (expected saving, when it asked)

    def record(self, at: float, cost: float | None) -> None:
        """Count one ping's cost (None: unknown price, counted as nothing)."""
        if not cost:
            return
        start = at // BUCKET * BUCKET
        self._total += cost
        # Pings finish out of order by a few seconds: their bucket is at or near the end.
        for i in range(len(self._spends) - 1, -1, -1):
            bucket = self._spends[i]
            if bucket[0] == start:
                bucket[1] += cost
                return
            if bucket[0] < start:
                self._spends.insert(i + 1, [start, cost])
                return
        self._spends.appendleft([start, cost])

    def restore(self, spends: list[tuple[float, float]]) -> None:
        """Take back the spend a previous process counted: (bucket start, USD), from the ledger."""
        for start, cost in spends:
            self.record(start, cost)

    def replace(self, spends: list[tuple[float, float]]) -> None:
        """Count exactly `spends` (bucket start, USD): a fleet's spend as its shared store has it,
        every member's pings included, so the cap is the fleet's, not each member's."""
        self._spends.clear()
        self._total = 0.0
        self.restore(spends)

    def spent(self, now: float) -> float:
        """USD spent on pings in the window ending at `now`."""
        while self._spends and self._spends[0][0] + BUCKET <= now - self.window:
            self._total -= self._spends.popleft()[1]
        if not self._spends:
            self._total = 0.0  # no float drift once the window is empty
        return max(self._total, 0.0)

    def may_ping(self, key: str, now: float, value: float) -> bool:
        """Whether pair `key`, whose next ping is expected to save `value` USD, may ping now."""
        self._values[key] = (value, now)
        spent = self.spent(now)
        if spent >= self.cap:
            return False
        if spent < self.near * self.cap:
            return True
        headroom = (self.cap - spent) / (self.cap * (1.0 - self.near))  # 1 at `near`, 0 at the cap
        since = now - self.stale
        for stale in [k for k, (_, asked) in self._values.items() if asked < since]:
            del self._values[stale]
        better = sum(1 for v, _ in self._values.values() if v > value)
        return better < headroom * len(self._values)

    def forget(self, key: str) -> None:
        """Pair `key` stopped asking (its policy let the cache lapse): rank without it."""
        self._values.pop(key, None)

    def resume_at(self, now: float) -> float:
        """When to ask again after a refusal: the next time old spend rolls out and frees room."""
        self.spent(now)
        running, at = self._total, now
        for start, cost in self._spends:
            at = start + BUCKET + self.window  # after `now`: everything left is inside the window
            running -= cost
            if running < self.cap:
                break
        return at
