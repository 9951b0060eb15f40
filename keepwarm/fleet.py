"""A fleet: daemons sharing one store divide the pairs among the live members.

Membership is a row per member with an expiry that its holder renews (a lease), as job queues
on PostgreSQL keep their workers: anyone can see a lapsed lease and act on it, and there is no
consensus protocol of our own. Each member computes the same division from the same list of
live members, by rendezvous hashing (`keepwarm.shard.owner`), so a join or a leave moves only
the pairs it must (about 1/N), and a member that left is replaced within its lease plus one
renewal.

When the store cannot be reached a member keeps the last view it had and goes on pinging what
it owned: a duplicate ping costs one cache read, a lapse a write. Once it reaches the store
again it sees who is live and yields what moved. An outage of the whole store lets every lease
run out, though no member left: the first member back would find itself alone and take every
pair, then give them back as the others return, two handovers and a duplicate ping per pair
for nothing. So a member back from an outage keeps the members it knew for a recovery period
(the lease, plus the longest the store waits before it tries to reconnect), time for the
others to renew; only those still silent then have left. A pair that changes owner is resumed by its
new owner from the shared store (its last touch, its cache's expiry): neither a cold start nor
a duplicate ping.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from keepwarm.classify import Result
from keepwarm.logs import event
from keepwarm.policy import Source, Touch
from keepwarm.shard import owner
from keepwarm.store import StoredObservation

log = logging.getLogger("keepwarm.fleet")

# A member renews this many times per lease, so one lost renewal never costs it the lease.
RENEWALS_PER_LEASE = 3
SLOW = 2 / 3  # a renewal later than this share of the lease after the last one is logged


class LeaseStore(Protocol):
    """What a fleet needs of its store (keepwarm.store): leases, nothing else."""

    def renew_lease(self, fleet: str, member: str, now: float, lease: float) -> list[tuple[str, float]]:
        """Extend `member`'s lease to `now + lease`; return every member of `fleet` whose lease
        is live at `now`, with its expiry (this member included)."""

    def drop_lease(self, fleet: str, member: str) -> None:
        """Give the lease up at once (a clean stop): the others take over without waiting for it."""


def reconnect_within(store: object) -> float:
    """The longest `store` waits between two attempts to reach its database once it lost it
    (its `reconnect_within`; 0 for a store that tries at every call)."""
    value = getattr(store, "reconnect_within", 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0


@dataclass(frozen=True)
class View:
    """Who is in the fleet, as one member last saw it."""

    members: tuple[str, ...]  # live members, sorted: every member divides the pairs the same way
    epoch: int  # this member's count of membership changes: the pairs it owns changed with it


def member_id() -> str:
    """A name for this daemon, unique in its fleet: the host (the pod's name on Kubernetes) and a
    random suffix, so a restarted process is a new member and never inherits a lapsed lease."""
    host = os.environ.get("HOSTNAME") or socket.gethostname() or "keepwarm"
    return f"{host[:48]}-{uuid.uuid4().hex[:8]}"


K = TypeVar("K")


class Membership:
    """One daemon's membership: renews its lease, follows who is live, says which pairs it owns."""

    def __init__(
        self,
        store: LeaseStore,
        fleet: str,
        lease: float,
        member: str | None = None,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        recovery: float | None = None,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.lease = lease
        # After an outage, how long the members known before it stay in the view though their
        # leases ran out: every one of them tries the store within its reconnection wait and
        # renews within a lease.
        self.recovery = lease + reconnect_within(store) if recovery is None else recovery
        self._recovering_until: float | None = None  # monotonic; set when the store comes back
        self.member = member or member_id()
        self.clock = clock
        self.mono = mono
        self.view = View((self.member,), 0)
        self.renewed_at: float | None = None  # monotonic time of the last successful renewal
        self.failures = 0  # renewals that could not reach the store
        self.handovers = 0  # membership changes seen (each moves pairs)
        self._lock = threading.Lock()
        self._failing = False
        self.changed = threading.Event()  # set by `keep` at each membership change

    @property
    def every(self) -> float:
        """How often to renew."""
        return self.lease / RENEWALS_PER_LEASE

    def renew(self) -> bool:
        """Renew the lease and take the fleet's current members; True when they changed.

        Never raises: a store that cannot be reached keeps the last view (and the pairs it
        gives), counted in `failures` and logged once per outage.
        """
        began = self.mono()
        try:
            live = self.store.renew_lease(self.fleet, self.member, self.clock(), self.lease)
        except Exception as exc:  # noqa: BLE001 - an outage must not stop the pinging
            with self._lock:
                self.failures += 1
                first = not self._failing
                self._failing = True
            if first:
                event(log, logging.ERROR, "fleet: cannot renew the lease; pinging on what this member owned"
                      " until the store is back", fleet=self.fleet, member=self.member, error=str(exc))
            return False
        names = {name for name, _ in live} | {self.member}
        with self._lock:
            previous, self.renewed_at = self.renewed_at, (now := self.mono())
            if previous is not None and now - previous > self.lease * SLOW and not self._failing:
                # The others count this member gone once a lease passes without a renewal: say
                # how close it came, and whether the store (took) or this process (late) was slow.
                event(log, logging.WARNING, "fleet: the lease was renewed late; the others may have counted this"
                      " member gone", fleet=self.fleet, member=self.member, since_last_s=round(now - previous, 3),
                      took_s=round(now - began, 3), lease_s=self.lease)
            if self._failing:
                self._failing = False
                self._recovering_until = now + self.recovery
                event(log, logging.INFO, "fleet: the store is back; lease renewed; members whose lease ran out"
                      " meanwhile count as live until they had the time to renew", fleet=self.fleet,
                      member=self.member, failures=self.failures, recovery_s=round(self.recovery, 3))
            if self._recovering_until is not None:
                if now < self._recovering_until:
                    names |= set(self.view.members)  # a newcomer joins at once; nobody leaves yet
                else:
                    self._recovering_until = None
            members = tuple(sorted(names))
            if members == self.view.members:
                return False
            before = self.view.members
            self.view = View(members, self.view.epoch + 1)
            self.handovers += 1
        event(log, logging.INFO, "fleet: members changed", fleet=self.fleet, member=self.member,
              members=len(members), joined=",".join(sorted(set(members) - set(before))) or None,
              left=",".join(sorted(set(before) - set(members))) or None)
        return True

    def keep(self, stop: threading.Event) -> threading.Thread:
        """Renew every `every` in a thread of its own until `stop` is set; `changed` is set at
        each membership change, for the daemon to apply.

        Not in the daemon's main loop: there a renewal waited behind the loop's tick, the work a
        change brings (resuming a thousand pairs from the store) and start-up itself, and at a
        short lease, with pings coming in waves, members counted each other gone while all were
        alive (bench/fleet.py at 5,000 pairs and five members: renewals 1.4-2.9 s apart against a
        2 s lease, each taking milliseconds in the store).
        """

        def renew_until_stopped() -> None:
            while not stop.wait(self.every):
                if self.renew():
                    self.changed.set()

        thread = threading.Thread(target=renew_until_stopped, name="keepwarm-fleet-lease", daemon=True)
        thread.start()
        return thread

    def holds_lease(self) -> bool:
        """Whether the last renewal is recent enough that no other member can have taken over."""
        with self._lock:
            return self.renewed_at is not None and self.mono() - self.renewed_at < self.lease

    def owns(self, key: str) -> bool:
        """Whether this member pings the pair `key` (an `expert/model`) in its current view."""
        return owner(key, self.view.members) == self.member

    def owned(self, items: Iterable[K], key: Callable[[K], str]) -> list[K]:
        """The items (pairs) this member owns, in their order."""
        members = self.view.members
        return [item for item in items if owner(key(item), members) == self.member]

    def leave(self) -> None:
        """Give the lease up (a clean stop), so the others take over at their next renewal."""
        try:
            self.store.drop_lease(self.fleet, self.member)
        except Exception as exc:  # noqa: BLE001 - the lease lapses by itself anyway
            event(log, logging.WARNING, "fleet: cannot give the lease up; it lapses by itself", error=str(exc))


class ObservationSource(Protocol):
    """What the poller needs of the store."""

    def received_since(self, since: float) -> list[StoredObservation]:
        """Observations any member stored at or after `since`, in id order."""


# How far back each poll looks past the last one: members' clocks, and commits that land late.
POLL_SLACK = 5.0
SEEN = 100_000  # observation ids remembered, so a row seen by two polls is applied once


class RemoteObservations:
    """The observations other members accepted for the pairs this member owns, as touches.

    Production may post to any member; the one that owns the pair must see the request as a touch
    within seconds, or it pings a cache production has just refreshed. Each poll reads what the
    store received since the last poll (less `POLL_SLACK`), skips what this member accepted
    itself (it touched its scheduler already) and what it does not own.
    """

    def __init__(self, store: ObservationSource, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.since = clock()  # what came before is in the state a pair resumes from
        self._seen: dict[int, None] = {}
        self._local: dict[tuple[str, float], None] = {}
        self.failures = 0

    def mine(self, touches: Iterable[tuple[str, Touch]]) -> None:
        """Remember the touches this member applied itself (it accepted their observations)."""
        for key, touch in touches:
            self._local[(key, touch.at)] = None
        while len(self._local) > SEEN:
            del self._local[next(iter(self._local))]

    def poll(self, owns: Callable[[str], bool]) -> list[tuple[str, Touch]]:
        """The new touches of owned pairs, oldest first; none when the store cannot be read."""
        now = self.clock()
        try:
            rows = self.store.received_since(self.since - POLL_SLACK)
        except Exception:  # noqa: BLE001 - the next poll reads the same window again
            self.failures += 1
            return []
        self.since = now
        out: list[tuple[str, Touch]] = []
        for row_id, expert, model, at, result, tokens in rows:
            if row_id in self._seen:
                continue
            self._seen[row_id] = None
            key = f"{expert}/{model}"
            if (key, at) in self._local or not owns(key) or result not in Result._value2member_map_:
                continue
            out.append((key, Touch(at, Source.PRODUCTION, Result(result), tokens)))
        while len(self._seen) > SEEN:
            del self._seen[next(iter(self._seen))]
        out.sort(key=lambda item: item[1].at)
        return out


def divide(keys: Sequence[str], members: Sequence[str]) -> dict[str, list[str]]:
    """Every member's pairs (what each member computes for itself), for reports and tests."""
    out: dict[str, list[str]] = {m: [] for m in members}
    for key in keys:
        out[owner(key, members)].append(key)
    return out
