"""When each pair is pinged: APScheduler 3.11 with one self-rearming job per pair.

Every pair's job is a one-shot `DateTrigger`; when a ping finishes, the job schedules the
pair's next ping from the pair's pure policy (`keepwarm.policy`), fed every touch in time
order: its own pings and production requests reported as observations (`touch`). That keeps
the "when next" decision in one pure component, makes overlapping pings of one pair
impossible (the next is only scheduled once the current one is done), and turns any
stall into exactly one catch-up ping per pair: a pair has at most one pending run.

Production touches are only fed, never scheduled: when a job wakes it asks the policy again,
and if a production request since has made the ping unnecessary the answer lies later; the
ping is skipped (`keepwarm_pings_skipped_total{reason}`) and the job re-armed at that time.
The jitter draw of an armed job is kept with it, so asking again without a new touch gives
exactly the time the job was armed for.

Start-up is spread: each pair's first ping comes at a stable phase within its interval,
derived from a hash of the pair, so a restart does not fire every pair at once.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.events import (
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
    JobEvent,
    JobExecutionEvent,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger

from keepwarm.adaptive import AdaptivePolicy, SharedPrior
from keepwarm.budget import Budget
from keepwarm.classify import Result
from keepwarm.config import Pair
from keepwarm.logs import event
from keepwarm.metrics import Metrics
from keepwarm.policy import BudgetedPolicy, Decision, HoursPolicy, PairPolicy, Source, Touch, make_policy
from keepwarm.pricing import PriceTable
from keepwarm.runner import PairState, PingOutcome, Runner
from keepwarm.store import PairResume

log = logging.getLogger("keepwarm.scheduler")

HEARTBEAT_EVERY = 1.0  # seconds between scheduler heartbeats (watchdog and /healthz)
# A wall clock that moved this much more (or less) than the monotonic clock between two
# heartbeats was stepped (NTP, an operator, a VM restored): re-anchor the schedule.
CLOCK_JUMP_THRESHOLD = 2.0
# Ping workers busy more than this share of a minute: pings queue for a free worker and start
# late; at 100 % the queue grows without bound and caches lapse (docs/performance.md). The
# warning suggests a pool that would be half busy (at least: a saturated pool hides demand).
BUSY_WARN_SHARE = 0.8
BUSY_WINDOW = 60.0
BUSY_WARN_EVERY = 600.0
# Touches kept per pair to rebuild its policy (a new prefix size, a reload): about a week of
# 5-minute pings, the window the adaptive policy learns from.
TOUCH_LOG = 2500
# Pings an adaptive pair keeps for a rebuild: those since production's last request are all
# its policy counts, and it stops pinging an idle cache after about twenty (see TouchLog).
PING_LOG = 32
# Ping attempts' latencies an adaptive pair keeps for a rebuild (its safety margin's p99).
LATENCY_LOG = 200
# The budget's loud warning comes once per crossing of this share of the cap (the policy's own
# "near" point, where the pairs that save least start to stop).
BUDGET_WARN_SHARE = 0.8


# A touch as the log keeps it (at, source, result, prefix_tokens): a tuple of plain values, which
# the cyclic garbage collector stops tracking. As Touch objects, 1,000 pairs' full logs made
# every full collection take 0.4 s on the bench machine (0.08 s as tuples), the interpreter lock
# held throughout, and each production touch one more object for the collector to walk.
_KeptTouch = tuple[float, str, str, int]


def _kept(touch: Touch) -> _KeptTouch:
    # `_value_`, not `.value`: the same string, without the enum property's Python-level call.
    return (touch.at, touch.source._value_, touch.result._value_, touch.prefix_tokens)


def _unkept(kept: _KeptTouch) -> Touch:
    at, source, result, prefix_tokens = kept
    return Touch(at, Source(source), Result(result), prefix_tokens)


class TouchLog:
    """What a rebuilt policy needs of one pair's past touches, in bounded memory.

    A policy is rebuilt by replaying touches (a reload, a measured prefix size, a clock step).
    The fixed policy, and the active-hours and budget wrappers, use only the latest ping and the
    latest touch that refreshed the cache; the adaptive policy learns from the gaps between
    production requests and counts the pings since the last of them (its ski rental stops
    after about twenty). So an adaptive pair keeps up to TOUCH_LOG production touches and its
    last PING_LOG pings, any other pair its latest ping and its latest refreshing production
    touch. Keeping every touch, a week of pings every 4 minutes was 2,520 touches a pair:
    25 million at 10,000 pairs.
    """

    __slots__ = ("adaptive", "pings", "production")

    def __init__(self, adaptive: bool, kept: Iterable[_KeptTouch] = ()) -> None:
        self.adaptive = adaptive
        # An adaptive pair's touches go in bounded deques. Any other pair's latest of each kind
        # is a 1-tuple: a deque costs about 760 bytes even empty, 15 MB for two at 10,000 pairs.
        self.pings: Sequence[_KeptTouch] = deque(maxlen=PING_LOG) if adaptive else ()
        self.production: Sequence[_KeptTouch] = deque(maxlen=TOUCH_LOG) if adaptive else ()
        for entry in sorted(kept):
            self._add(entry)

    def add(self, touch: Touch) -> None:
        """Keep one touch (caller holds the scheduler's policy lock)."""
        if not self.adaptive and touch.source is not Source.PING and not touch.refreshed:
            return  # moves nothing a fixed policy or its wrappers keep
        self._add(_kept(touch))

    def _add(self, entry: _KeptTouch) -> None:
        ping = entry[1] == Source.PING._value_
        kept = self.pings if ping else self.production
        if isinstance(kept, deque):
            kept.append(entry)
        elif not kept or kept[-1][0] <= entry[0]:  # a late touch: the latest is the one that counts
            if ping:
                self.pings = (entry,)
            else:
                self.production = (entry,)

    def entries(self) -> list[_KeptTouch]:
        """Every touch kept, oldest first."""
        return sorted([*self.production, *self.pings])

    def touches(self) -> list[Touch]:
        """Every touch kept, oldest first, to replay into a new policy."""
        return [_unkept(entry) for entry in self.entries()]

    def shifted(self, jump: float) -> TouchLog:
        """The same touches `jump` seconds later (a wall-clock step)."""
        return TouchLog(self.adaptive, ((at + jump, s, r, n) for at, s, r, n in self.entries()))

    def __len__(self) -> int:
        return len(self.pings) + len(self.production)


_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def boottime() -> float:
    """CLOCK_BOOTTIME: monotonic, but it goes on counting while the system is suspended.

    Where the clock is missing or refused (some kernels, or a clock faked by libfaketime answers
    EINVAL), this is the monotonic clock: a suspend then looks like a wall-clock step, as it did
    before CLOCK_BOOTTIME was used, rather than every clock check raising.
    """
    global _BOOTTIME
    if _BOOTTIME is not None:
        try:
            return time.clock_gettime(_BOOTTIME)
        except OSError:
            _BOOTTIME = None
    return time.monotonic()


# --- the pure policy -------------------------------------------------------------------------


def phase(key: str, interval: float) -> float:
    """A stable offset in [0, interval) for a pair, the same across restarts."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval


def next_ping_at(last_start: float, interval: float, jitter: float, draw: float) -> float:
    """When to ping a pair next, given when its last ping started.

    The cache's TTL runs from the start of the request that touched it, so the next ping
    is `interval` after that start, plus a jitter that only ever delays (`draw` in [0, 1)):
    the gap stays within [interval, interval + jitter], which the config keeps below the TTL.
    """
    return last_start + interval + jitter * draw


# Pairs without state are spread over this share of their margin, not all of it: a cache the old
# process left with exactly the margin to live survives any restart that takes less than the rest
# (37 s with the defaults), and the API sees no burst.
CATCH_UP_SPREAD = 0.25


def catch_up_window(pair: Pair) -> float:
    """How soon a pair without state must be pinged: the TTL's margin (TTL − interval − jitter),
    since a cache the previous process kept warm has at least that long left; or the interval
    when that is shorter, which keeps the rate the previous process pinged at."""
    return min(pair.ttl_seconds - pair.interval - pair.jitter, pair.interval)


def catch_up_plan(
    due: Sequence[tuple[str, float | None, float]], now: float, spacing: float
) -> list[tuple[str, float]]:
    """When to ping each pair due at start: (key, its cache's expiry or None if unknown, its
    TTL's margin) in, (key, time) out, in the order they will be sent.

    Known-alive caches first by expiry, then pairs without state at a stable phase within the
    first CATCH_UP_SPREAD of their margin, then known-expired caches. With a `spacing` (the
    API's request rate) no two starts are closer than it, in that order of priority; without
    one each pair starts when it wants.
    """
    alive = sorted((e, k) for k, e, _ in due if e is not None and e > now)
    unknown = sorted((now + phase(k, max(m, 0.0) * CATCH_UP_SPREAD), k) for k, e, m in due if e is None)
    expired = sorted(k for k, e, _ in due if e is not None and e <= now)
    plan: list[tuple[str, float]] = []
    at = now - spacing
    for wanted, key in [(now, k) for _, k in alive] + unknown + [(now, k) for k in expired]:
        at = max(wanted, at + spacing) if spacing > 0 else wanted
        plan.append((key, at))
    return plan


def _stored_touches(stored: PairResume) -> list[Touch]:
    """The touches a pair's policy is rebuilt from after a restart, oldest first.

    An adaptive pair has its history; for any other pair, its latest ping and the latest
    requests that refreshed the cache are all the fixed policy and its wrappers use.
    """
    if stored.touches:
        return [Touch(at, Source(source), Result(result), tokens) for at, source, result, tokens in stored.touches
                if result in Result._value2member_map_]
    touches = []
    tokens = stored.prefix_tokens or 0
    if stored.last_refresh and stored.last_refresh != stored.last_ping:
        touches.append(Touch(stored.last_refresh, Source.PING, Result.WARM, tokens))
    if stored.last_ping and stored.last_result in Result._value2member_map_:
        touches.append(Touch(stored.last_ping, Source.PING, Result(stored.last_result), tokens))
    if stored.last_production:
        touches.append(Touch(stored.last_production, Source.PRODUCTION, Result.WARM))
    return sorted(touches, key=lambda t: t.at)


def busy_share(busy_seconds: float, window: float, workers: int) -> float:
    """The share of the workers' time spent in pings over a window: demand over capacity."""
    return busy_seconds / (window * workers) if window > 0 and workers > 0 else 0.0


def missed_slots(scheduled_at: float, started: float, interval: float) -> int:
    """How many whole intervals a ping started late: slots that never ran."""
    return max(int((started - scheduled_at) // interval), 0) if interval > 0 else 0


# --- the scheduler ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyReport:
    """What a (re)load changed."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]


def _innermost(policy: PairPolicy) -> PairPolicy:
    """The policy inside every wrapper (active hours, budget)."""
    while isinstance(policy, HoursPolicy | BudgetedPolicy):
        policy = policy.inner
    return policy


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _iso(ts: float) -> str:
    return _utc(ts).isoformat(timespec="seconds").replace("+00:00", "Z")


class Scheduler:
    """Owns the APScheduler instance and the per-pair state."""

    def __init__(
        self,
        runner: Runner,
        metrics: Metrics,
        max_workers: int = 8,
        clock: Callable[[], float] = time.time,
        draw: Callable[[], float] = random.random,
        mono: Callable[[], float] = time.monotonic,
        boot: Callable[[], float] | None = None,
        *,
        prices: PriceTable | None = None,
        budget_usd_per_day: float | None = None,
        time_scale: float = 1.0,
        resume: Callable[[Sequence[Pair]], Mapping[str, PairResume]] | None = None,
        requests_per_minute: float | None = None,
        spend: Callable[[float], list[tuple[float, float]]] | None = None,
    ) -> None:
        self.runner = runner
        # What every pair's policy is built from (`make_policy`): one prior learnt across all
        # pairs, one budget they share, and the time scale of an emulator's TTLs.
        self.prices = prices if prices is not None else runner.prices
        self.prior = SharedPrior()
        # The budget's trailing-24 h spend survives a restart: taken back from the store.
        self.clock = clock
        self._spend_history = spend
        self.budget = self._new_budget(budget_usd_per_day) if budget_usd_per_day else None
        self.time_scale = time_scale
        # The store's state of newly added pairs, by key (keepwarm.store): what a restart resumes from.
        self.resume = resume
        # Catch-up pings after a start are spaced to stay within the API's request rate.
        self.spacing = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self.mono = mono
        # The suspend-aware clock; a test that fakes `mono` alone gets a machine that never sleeps.
        self.boot = boot if boot is not None else (boottime if mono is time.monotonic else mono)
        self._anchor = (clock(), mono(), self.boot())  # wall, monotonic, boot time at the last clock check
        self._clock_lock = threading.Lock()
        self.metrics = metrics
        self.clock = clock
        self.draw = draw
        self.states: dict[str, PairState] = {}
        # One policy per pair beside its state, with the jitter draw of the pair's armed job.
        self.policies: dict[str, PairPolicy] = {}
        self._draws: dict[str, float] = {}
        self._lapsed: set[str] = set()  # pairs with no job armed because their policy said none
        self._touches: dict[str, TouchLog] = {}  # what a rebuilt policy needs of the touches fed
        self._latencies: dict[str, deque[float]] = {}  # adaptive pairs' ping latencies, likewise
        self._built_tokens: dict[str, int] = {}  # the prefix size each pair's policy was priced with
        self._prod_tokens: dict[str, int] = {}  # prefix size production reported, before any ping
        self._last_production: dict[str, float] = {}
        self._budget_state = "ok"  # ok | near | reached: the loud budget log fires on a change
        self._budget_lock = threading.Lock()
        if self.budget is not None:
            metrics.set_budget(self.budget.cap, self.budget.spent(clock()))
        self._policy_lock = threading.Lock()
        # Called with every finished ping (the observations' attribution listens here).
        self.on_ping: Callable[[PingOutcome], None] | None = None
        # In a fleet: whether this member still owns a pair, checked before each ping, so a pair
        # that moved since its job was armed is not pinged by two members (keepwarm.fleet).
        self.owns: Callable[[str], bool] | None = None
        self.stopping = threading.Event()
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self.max_workers = max_workers
        self._busy = 0.0  # worker-seconds spent in finished pings since _busy_since
        self._busy_since = mono()
        self._busy_warned = -math.inf
        self.last_heartbeat = mono()
        self._aps = BackgroundScheduler(
            executors={
                "pings": ThreadPoolExecutor(max_workers),
                # Its own thread, so busy ping workers never delay the heartbeat.
                "heartbeat": ThreadPoolExecutor(1),
            },
            job_defaults={
                # One pending run per pair; a late run still runs (once), however late:
                # a late ping still re-warms the cache, a skipped one helps nobody.
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": None,
            },
            timezone=UTC,
        )
        self._aps.add_listener(self._on_job_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, pairs: Iterable[Pair]) -> ApplyReport:
        """Schedule every pair at its phase and start the scheduler thread."""
        report = self.apply(pairs)
        self._aps.add_job(
            self._heartbeat, "interval", seconds=HEARTBEAT_EVERY, id="heartbeat", executor="heartbeat"
        )
        self._aps.start()
        return report

    def stop(self, deadline: float) -> int:
        """Start no new pings; wait up to `deadline` seconds for those in flight.

        Returns how many were still running at the deadline.
        """
        self.stopping.set()
        self._aps.shutdown(wait=False)
        end = self.mono() + deadline
        with self._inflight_cv:
            while self._inflight and self.mono() < end:
                self._inflight_cv.wait(max(end - self.mono(), 0))
            return self._inflight

    @property
    def running(self) -> bool:
        """True while the APScheduler thread is running."""
        return bool(self._aps.running)

    def _heartbeat(self) -> None:
        self.last_heartbeat = self.mono()
        self.check_clock()
        self.check_budget()  # spend rolls out of the window with no ping to notice it
        mono = self.mono()
        if mono - self._busy_since >= BUSY_WINDOW:
            self._check_busy(mono)

    def _check_busy(self, now: float) -> None:
        """Warn when the ping workers cannot keep up, before the lateness turns into lapses."""
        with self._inflight_cv:
            busy, self._busy = self._busy, 0.0
            window, self._busy_since = now - self._busy_since, now
        share = busy_share(busy, window, self.max_workers)
        if share >= BUSY_WARN_SHARE and now - self._busy_warned >= BUSY_WARN_EVERY:
            self._busy_warned = now
            event(
                log,
                logging.WARNING,
                "ping workers are busy most of the time: pings start late and caches may lapse;"
                " raise api.max_concurrency",
                busy_share=round(share, 2),
                max_concurrency=self.max_workers,
                suggested_at_least=math.ceil(busy / window / 0.5),
            )

    def check_clock(self) -> float:
        """Detect a wall-clock step since the last check and re-anchor the schedule; return it.

        Called from the daemon's main loop (which waits on the monotonic clock, so it runs even
        when a step back has left APScheduler asleep until a far wall time), from the
        heartbeat, and by every ping job before it starts.

        A suspend is not a step: the wall clock and CLOCK_BOOTTIME moved on together while
        CLOCK_MONOTONIC stood still. Real time passed, so the caches expired with it and
        every pair whose ping fell due meanwhile is pinged at once, not re-anchored.
        """
        with self._clock_lock:
            wall, mono, boot = self.clock(), self.mono(), self.boot()
            wall0, mono0, boot0 = self._anchor
            self._anchor = (wall, mono, boot)
            slept = (boot - boot0) - (mono - mono0)
            step = (wall - wall0) - (boot - boot0)  # what no real time explains
            if slept > CLOCK_JUMP_THRESHOLD:
                self._resumed(slept, wall)
            if abs(step) <= CLOCK_JUMP_THRESHOLD:
                return 0.0
            self.shift(step)
            return step

    def _resumed(self, slept: float, now: float) -> None:
        """After a suspend: ping every pair that fell due meanwhile now, and count its lost slots."""
        due = [s for s in list(self.states.values()) if s.next_due and s.next_due <= now]
        event(log, logging.WARNING, "the system was suspended; pinging the pairs that fell due meanwhile now",
              suspended_s=round(slept, 3), pairs_due=len(due))
        for state in due:
            missed = missed_slots(state.next_due, now, state.pair.interval)
            if missed:
                self.metrics.missed.labels(state.pair.expert, state.pair.model).inc(missed)
            self._schedule(state, now)

    def release_held(self) -> int:
        """Bring back pairs pushed out by a gate hold (after a reload opened a fresh gate)."""
        now, released = self.clock(), 0
        for state in list(self.states.values()):
            pair = state.pair
            if state.next_due and state.next_due > now + pair.interval + pair.jitter:
                self._schedule(state, now + self.draw() * min(pair.interval, 10.0))
                released += 1
        return released

    def shift(self, jump: float) -> None:
        """Move every pair's timeline by a wall-clock step of `jump` seconds.

        APScheduler runs jobs at wall-clock times: after a step back every ping would come
        late by the step (and caches lapse), after a step forward all would fire at once.
        The caches did not move, so keep each ping the same real time away.
        """
        event(log, logging.WARNING, "wall clock stepped; re-anchoring every pair's schedule", jump_s=round(jump, 3))
        for state in list(self.states.values()):
            if state.last_start:
                state.last_start += jump
            if state.expires_at:
                state.expires_at += jump
            with self._policy_lock:
                touches = self._touches.get(state.pair.key)
                if touches:
                    self._touches[state.pair.key] = touches.shifted(jump)
                last = self._last_production.get(state.pair.key)
                if last:
                    self._last_production[state.pair.key] = last + jump
            self._new_policy(state)  # its anchors are wall times too; rebuilt from the shifted state
            if state.next_due:  # 0: in flight or parked; the ping re-arms itself from last_start
                self._schedule(state, state.next_due + jump)
        if self._aps.get_job("heartbeat") is not None:
            # The heartbeat's own next run is a wall-clock time too.
            self._aps.reschedule_job("heartbeat", trigger="interval", seconds=HEARTBEAT_EVERY)

    # --- (re)configuration -------------------------------------------------------------------

    def apply(self, pairs: Iterable[Pair]) -> ApplyReport:
        """Make the schedule match `pairs`, touching only what changed.

        Unchanged pairs keep their state and next run. A pair whose timing changed (interval,
        jitter, max_tokens, ping message: the fingerprint is the same) keeps its state and
        metric series, with its next ping re-timed from its last. A pair whose prefix changed
        gets fresh state and series and is pinged at once (its old cache is useless to
        production). Removed pairs lose their job and their metric series, and a ping of theirs
        still in flight records nothing.
        """
        wanted = {p.key: p for p in pairs}
        added, removed, changed, unchanged = [], [], [], []
        now = self.clock()
        new = [p for key, p in wanted.items() if key not in self.states]
        stored = self._stored(new, now)
        due: list[tuple[PairState, float | None]] = []  # to ping at once: (state, its cache's expiry if known)
        for key in list(self.states):
            if key not in wanted:
                old = self.states.pop(key)
                old.removed = True  # before its series go: a ping in flight must not re-create them
                with self._policy_lock:
                    self.policies.pop(key, None)
                    self._draws.pop(key, None)
                    self._lapsed.discard(key)
                    for kept in (self._touches, self._latencies, self._built_tokens, self._prod_tokens,
                                 self._last_production):
                        kept.pop(key, None)
                self._remove_job(key)
                self.metrics.remove_pair(old.pair)
                removed.append(key)
        for key, pair in wanted.items():
            old_state = self.states.get(key)
            if old_state is not None and old_state.pair == pair:
                unchanged.append(key)
                continue
            if old_state is not None and old_state.pair.fingerprint == pair.fingerprint:
                changed.append(key)
                self._retime(old_state, pair, now)
                continue
            state = PairState(pair=pair, max_tokens=pair.max_tokens)
            self.states[key] = state
            if old_state is None:
                added.append(key)
                self.metrics.add_pair(pair)
                self._restore(state, stored.get(key), now, due)
            else:
                with self._policy_lock:  # a new prefix: a new cache, whose history starts now
                    for kept in (self._touches, self._latencies, self._built_tokens, self._prod_tokens):
                        kept.pop(key, None)
                self._new_policy(state)
                changed.append(key)
                self.metrics.remove_pair(old_state.pair)
                self.metrics.add_pair(pair)
                state.miss_hint = "prefix_changed"
                self._schedule(state, now)
        if due:
            self._catch_up(due, now, resumed=len(stored))
        return ApplyReport(tuple(added), tuple(removed), tuple(changed), tuple(unchanged))

    def _stored(self, pairs: Sequence[Pair], now: float) -> Mapping[str, PairResume]:
        """The store's state of pairs about to be added (empty without a store, or when it fails)."""
        if self.resume is None or not pairs:
            return {}
        try:
            return self.resume(pairs)
        except Exception as exc:  # noqa: BLE001 - bookkeeping: pairs without their state still ping
            event(log, logging.WARNING, "cannot read the pairs' state back; they start without it",
                  pairs=len(pairs), error=str(exc))
            return {}

    def _restore(
        self, state: PairState, stored: PairResume | None, now: float, due: list[tuple[PairState, float | None]]
    ) -> None:
        """Resume a newly added pair from its stored state, or queue it for the catch-up.

        With state, the pair's policy is rebuilt from its touches and its next ping comes where
        the policy puts it: an interval after its last touch, so a restart neither pings early
        (no duplicate) nor late. A ping due already joins `due`, pinged at once; a policy that
        lets the cache lapse arms nothing. Without state, the pair joins `due` with no known
        expiry: whatever cache it had may be alive, so it is pinged within the TTL's margin.
        """
        pair = state.pair
        touches = _stored_touches(stored) if stored is not None else []
        touches = [t for t in touches if t.at <= now]
        if not touches:
            self._new_policy(state)
            due.append((state, None))
            return
        assert stored is not None
        if stored.last_ping:
            state.last_start = stored.last_ping
            state.last_result = Result(stored.last_result) if stored.last_result in Result._value2member_map_ else None
        if stored.prefix_tokens:
            state.prefix_tokens = stored.prefix_tokens
        last_touch = stored.last_touch()
        if last_touch:
            state.expires_at = last_touch + pair.ttl_seconds
            self.metrics.expires.labels(pair.expert, pair.model).set(state.expires_at)
        if stored.last_ping:
            self.metrics.last_ping.labels(pair.expert, pair.model).set(stored.last_ping)
        production = [t for t in touches if t.source is Source.PRODUCTION]
        with self._policy_lock:
            history = self._touches[pair.key] = TouchLog(pair.adaptive)
            for touch in touches:
                history.add(touch)
            if stored.last_request:
                self._last_production[pair.key] = stored.last_request
            sizes = [t.prefix_tokens for t in production if t.prefix_tokens]
            if sizes:
                self._prod_tokens[pair.key] = sizes[-1]
        policy = self._new_policy(state)
        draw = self._draw(pair.key)
        with self._policy_lock:
            decision = policy.next_ping(now, draw)
        self._decided(state, "restore", decision.reason, decision.at)
        if decision.at is None:
            self._lapse(state)
        elif decision.at > now:
            self._schedule(state, decision.at)
        else:
            due.append((state, state.expires_at or None))

    def _catch_up(self, due: list[tuple[PairState, float | None]], now: float, resumed: int) -> None:
        """Ping the pairs due at start, in the order that saves the most caches, at the API's rate.

        Caches known alive go first, soonest to expire first; then pairs without state, spread
        over the TTL's margin (`catch_up_window`: a cache the previous process kept warm has at
        least that long left); then caches known to have expired, which nothing saves.
        Starts are spaced by `api.requests_per_minute`, which may stretch the catch-up past the
        margin: the log says how long it takes.
        """
        plan = catch_up_plan(
            [(s.pair.key, expires, catch_up_window(s.pair)) for s, expires in due],
            now, self.spacing,
        )
        states = {s.pair.key: s for s, _ in due}
        for key, at in plan:
            self._schedule(states[key], at)
        unknown = sum(1 for _, expires in due if expires is None)
        alive = sum(1 for _, expires in due if expires is not None and expires > now)
        margin = min((catch_up_window(s.pair) for s, e in due if e is None), default=None)
        takes = max(at for _, at in plan) - now
        event(
            log,
            logging.INFO if margin is None or takes <= margin else logging.WARNING,
            "catch-up: pinging the pairs that are due now" + (
                "" if margin is None or takes <= margin else
                "; it takes longer than the TTL's margin, so caches alive at the restart may lapse:"
                " raise api.requests_per_minute if the API allows it"),
            resumed=resumed,
            due_alive=alive or None,
            without_state=unknown or None,
            expired=(len(due) - unknown - alive) or None,
            takes_s=round(takes, 3),
            within_s=None if margin is None else round(margin, 3),
            requests_per_minute=round(60.0 / self.spacing, 3) if self.spacing else None,
        )

    def _retime(self, state: PairState, pair: Pair, now: float) -> None:
        """Same cache, new timing: the state and series go on; the next ping follows the new interval."""
        old, state.pair = state.pair, pair
        if pair.max_tokens != old.max_tokens:
            state.max_tokens = pair.max_tokens  # else keep a fallback from 0 to 1
        # A config change is how an operator says "fixed" (a ping message, max_tokens).
        state.parked, state.park_reason = False, None
        self.metrics.add_pair(pair)  # updates the interval and info series in place
        if state.lock.locked():
            return  # in flight: the job re-arms itself from the new pair when the ping is done
        decision = self._new_policy(state).next_ping(now, self._draw(pair.key))
        if decision.at is not None:
            self._schedule(state, max(decision.at, now))

    # --- the policy --------------------------------------------------------------------------

    def _new_policy(self, state: PairState) -> PairPolicy:
        """The pair's policy as its config asks (`make_policy`), fed every touch and latency it has had.

        Rebuilt, never patched, when what it is priced or timed from changes (the prefix size
        becomes known, a reload changes the pair): replaying the same touches in order gives the
        state an unchanged policy would have, since policies are pure.
        """
        pair = state.pair
        tokens = state.prefix_tokens or self._prod_tokens.get(pair.key, 0)
        policy = make_policy(
            pair, self.prices, tokens, prior=self.prior, budget=self.budget, time_scale=self.time_scale
        )
        with self._policy_lock:
            history = self._touches.get(pair.key)
            if history is not None and history.adaptive != pair.adaptive:
                # A reload changed the policy: keep what was kept, within the new bounds.
                history = self._touches[pair.key] = TouchLog(pair.adaptive, history.entries())
            touches = history.touches() if history is not None else []
            if not touches and state.last_start and state.last_result is not None:
                touches = [Touch(state.last_start, Source.PING, state.last_result)]
            # A rebuild replays gaps the shared prior already holds: replay them past it, so the
            # prior counts each gap once, as a simulation of the same traffic does.
            inner = _innermost(policy)
            rebuild = isinstance(inner, AdaptivePolicy) and pair.key in self._built_tokens
            if isinstance(inner, AdaptivePolicy) and rebuild:
                inner.prior = SharedPrior()
            for touch in touches:
                policy.observe(touch)  # through every wrapper: active hours track refreshes too
            if isinstance(inner, AdaptivePolicy):
                inner.prior = self.prior
            observe_latency = getattr(policy, "observe_latency", None)
            if callable(observe_latency):
                for seconds in self._latencies.get(pair.key, ()):
                    observe_latency(seconds)
            self.policies[pair.key] = policy
            self._built_tokens[pair.key] = tokens
        return policy

    def describe(self, key: str, now: float) -> str:
        """The pair's policy in a few words for the status page (empty for a pair not kept here)."""
        with self._policy_lock:
            policy = self.policies.get(key)
            return "" if policy is None else policy.describe(now)

    def _log_touch(self, key: str, touch: Touch) -> None:
        """Keep a touch for rebuilding the pair's policy. Caller holds `_policy_lock`."""
        kept = self._touches.get(key)
        if kept is None:  # not setdefault: that would build a log for every touch
            state = self.states.get(key)
            kept = self._touches[key] = TouchLog(state is not None and state.pair.adaptive)
        kept.add(touch)
        if touch.source is Source.PRODUCTION:
            self._last_production[key] = max(self._last_production.get(key, 0.0), touch.at)

    def _draw(self, key: str) -> float:
        """A new jitter draw for the pair's next arming, kept until it is re-armed."""
        draw = self.draw()
        with self._policy_lock:
            self._draws[key] = draw
        return draw

    def touch(self, key: str, touch: Touch) -> None:
        """Feed a production request (an observation) to the pair's policy; pairs not kept here are ignored."""
        self.touch_many([(key, touch)])

    def touch_many(self, touches: Sequence[tuple[str, Touch]]) -> None:
        """Feed production requests to their pairs' policies, in the order given: what `touch`
        does for each in turn, under one acquisition of the policy lock.

        A batch of observations brings up to a thousand touches: one acquisition for a chunk
        of them, where touching one by one took the lock three times each. Every touch reaches its
        policy, in order (the adaptive policy learns from every one); the caller hands over
        one chunk at a time, so a ping waits for the lock behind one chunk at most.
        """
        armed: list[tuple[PairState, Decision]] = []
        i = 0
        while i < len(touches):
            rebuild: tuple[str, PairState] | None = None
            with self._policy_lock:
                while i < len(touches):
                    key, touch = touches[i]
                    i += 1
                    state, policy = self.states.get(key), self.policies.get(key)
                    if policy is None or state is None:
                        continue
                    self._log_touch(key, touch)
                    self._refresh_expiry(state, touch)
                    if touch.prefix_tokens and not state.prefix_tokens and not self._built_tokens.get(key):
                        # No ping has measured the prefix yet: production's size prices the policy.
                        # It is rebuilt outside the lock (which `_new_policy` takes), replaying this touch.
                        self._prod_tokens[key] = touch.prefix_tokens
                        rebuild = key, state
                        break
                    policy.observe(touch)
                    self._after_touch(key, policy, state, armed)
            if rebuild is not None:
                key, state = rebuild
                policy = self._new_policy(state)
                with self._policy_lock:
                    self._after_touch(key, policy, state, armed)
            for state, decision in armed:
                assert decision.at is not None
                # A policy that let the cache lapse has no job armed: a touch is what wakes it.
                self._decided(state, "arm", decision.reason, decision.at)
                self._schedule(state, max(decision.at, self.clock()))
            armed.clear()

    def _after_touch(
        self, key: str, policy: PairPolicy, state: PairState, armed: list[tuple[PairState, Decision]]
    ) -> None:
        """After a touch: a new jitter draw (as `keepwarm simulate` draws anew after every touch),
        and a lapsed pair's next ping, to arm. Caller holds `_policy_lock`."""
        draw = self._draws[key] = self.draw()
        if key in self._lapsed:
            decision = policy.next_ping(self.clock(), draw)
            if decision.at is not None:
                self._lapsed.discard(key)
                armed.append((state, decision))

    def _refresh_expiry(self, state: PairState, touch: Touch) -> None:
        """A production request that read or wrote the cache keeps it warm a TTL from its start.

        Without this, a cache production keeps warm (its pings skipped) would read as expired:
        `keepwarm_pair_state` cold, the stale alert firing, a retry deadline in the past.
        """
        expires = touch.at + state.pair.ttl_seconds
        if not touch.refreshed or state.removed or expires <= state.expires_at:
            return
        state.expires_at = expires
        self.metrics.expires.labels(state.pair.expert, state.pair.model).set(expires)

    def _lapse(self, state: PairState) -> None:
        """No ping until a later touch (the policy said so): no job stays armed."""
        state.next_due = 0.0
        with self._policy_lock:
            self._lapsed.add(state.pair.key)

    def _decided(self, state: PairState, decision: str, reason: str | None, at: float | None) -> None:
        """One DEBUG line per policy decision: what, why, and how long production has been away."""
        if not log.isEnabledFor(logging.DEBUG):
            return
        key, now = state.pair.key, self.clock()
        last = self._last_production.get(key)
        event(
            log,
            logging.DEBUG,
            "policy decision",
            pair=key,
            decision=decision,
            # None means no reason to differ from a plain schedule: say so rather than leave it blank.
            reason=reason or ("on schedule: an interval after the last touch" if at is not None
                              else "no ping planned until production comes back"),
            next_ping_at=None if at is None else _iso(at),
            idle_s=None if last is None else round(now - last, 1),
        )

    def _skip(self, state: PairState, reason: str | None) -> None:
        """Count a ping the policy did not send under its reason (keepwarm_pings_skipped_total)."""
        if reason is not None and not state.removed:
            self.metrics.skipped.labels(state.pair.expert, state.pair.model, reason).inc()

    def _policy_wait(self, state: PairState) -> Decision | None:
        """If the policy now says later than this wake-up (or never), its decision; None to ping now."""
        key = state.pair.key
        now = self.clock()
        with self._policy_lock:
            policy = self.policies.get(key)
            if policy is None:
                return None
            decision = policy.next_ping(now, self._draws.get(key, 0.0))
        if decision.at is not None and decision.at <= now:
            return None
        if decision.at is not None and decision.reason is None:
            return Decision(decision.at, "production_touch")
        return decision

    def _record_ping(self, key: str, state: PairState, outcome: PingOutcome) -> None:
        """Feed a finished ping to the pair's policy: the touch, each attempt's latency, its cost."""
        touch = Touch(outcome.started, Source.PING, outcome.result)
        with self._policy_lock:
            policy = self.policies.get(key)
            if policy is None or self.states.get(key) is not state:
                return
            self._log_touch(key, touch)
            policy.observe(touch)
            observe_latency = getattr(policy, "observe_latency", None)
            if state.pair.adaptive:  # only its margin reads them: kept for a rebuild
                latencies = self._latencies.get(key)
                if latencies is None:
                    latencies = self._latencies[key] = deque(maxlen=LATENCY_LOG)
                latencies.extend(attempt.latency for attempt in outcome.attempts)
            if callable(observe_latency):
                for attempt in outcome.attempts:
                    observe_latency(attempt.latency)
            if self.budget is not None:
                self.budget.record(outcome.started, outcome.total_cost)
            stale = state.prefix_tokens and state.prefix_tokens != self._built_tokens.get(key)
        if stale:
            self._new_policy(state)  # priced from the measured prefix now
        self.check_budget()

    def set_budget(self, usd_per_day: float | None) -> None:
        """Apply a reloaded `budget.usd_per_day`; a changed cap keeps the spend already counted."""
        old = self.budget
        if old is not None and usd_per_day:
            old.cap = usd_per_day
        elif old is not None or usd_per_day:
            # Added or removed: every policy is rebuilt with (or without) its budget wrapper.
            self.budget = self._new_budget(usd_per_day) if usd_per_day else None
            if self.budget is None:
                self.metrics.drop_budget()
            for state in list(self.states.values()):
                self._new_policy(state)
        with self._budget_lock:
            self._budget_state = "ok"  # judged afresh against the new cap
        self.check_budget()

    def _new_budget(self, usd_per_day: float) -> Budget:
        """A budget that has counted what the store says was spent in the window already."""
        budget = Budget(usd_per_day)
        if self._spend_history is not None:
            try:
                budget.restore(self._spend_history(self.clock() - budget.window))
            except Exception as exc:  # noqa: BLE001 - the cap still applies, to the spend from now on
                event(log, logging.WARNING, "cannot read the budget's spend back; counting from zero",
                      error=str(exc))
            else:
                event(log, logging.INFO, "budget: the spend of the last 24 h is restored from the ledger",
                      spent_usd=budget.spent(self.clock()), cap_usd_per_day=usd_per_day)
        return budget

    def sync_budget(self) -> None:
        """In a fleet: take the spend of every member from the shared store (the cap is the fleet's)."""
        budget, history = self.budget, self._spend_history
        if budget is None or history is None:
            return
        try:
            spends = history(self.clock() - budget.window)
        except Exception as exc:  # noqa: BLE001 - the last known spend stands until the store answers
            event(log, logging.WARNING, "cannot read the fleet's spend; the budget counts what it knew", error=str(exc))
            return
        with self._policy_lock:
            budget.replace(spends)
        self.check_budget()

    def check_budget(self, now: float | None = None) -> None:
        """Export the trailing-24 h spend and log loudly, once per crossing, near and at the cap."""
        budget = self.budget
        if budget is None:
            return
        now = self.clock() if now is None else now
        with self._policy_lock:
            spent = budget.spent(now)
        with self._budget_lock:
            self._budget_level(budget, spent)

    def _budget_level(self, budget: Budget, spent: float) -> None:
        self.metrics.set_budget(budget.cap, spent)
        level = "reached" if spent >= budget.cap else "near" if spent >= BUDGET_WARN_SHARE * budget.cap else "ok"
        if level == self._budget_state:
            return
        before, self._budget_state = self._budget_state, level
        fields = {"spent_usd": round(spent, 6), "cap_usd_per_day": budget.cap}
        if level == "reached":
            event(log, logging.ERROR, "BUDGET: the keepalive's daily spend cap is reached; no pings until"
                  " spend older than 24 h rolls out of the window (budget.usd_per_day)", **fields)
        elif level == "near" and before == "ok":
            event(log, logging.WARNING, "BUDGET: the keepalive's spend is near its daily cap; the pairs whose"
                  " pings save least stop first (budget.usd_per_day)", **fields)
        elif level == "ok":
            event(log, logging.INFO, "BUDGET: spend is back below the warning share of the daily cap", **fields)

    def _schedule(self, state: PairState, at: float) -> None:
        state.next_due = at
        key = state.pair.key
        self._aps.add_job(
            self._run,
            DateTrigger(run_date=_utc(at)),
            args=[key, at],
            id=key,
            name=key,
            executor="pings",
            replace_existing=True,
        )

    def _remove_job(self, key: str) -> None:
        job = self._aps.get_job(key)
        if job is not None:
            job.remove()

    # --- the job ---------------------------------------------------------------------------

    def _run(self, key: str, scheduled_at: float) -> None:
        """Ping one pair, then arm its next ping. Runs in a worker thread."""
        state = self.states.get(key)
        if state is None or self.stopping.is_set():
            return
        self.check_clock()
        if state.next_due and abs(state.next_due - scheduled_at) > CLOCK_JUMP_THRESHOLD:
            return  # superseded: a clock step re-anchored this pair, and its new run is pending
        if self.owns is not None and not self.owns(key):
            # Another member owns it now: the next reassignment removes it here. Ask again
            # soon in case the pair comes back first (the other member left again).
            self._schedule(state, self.clock() + state.pair.interval / 4)
            return
        later = self._policy_wait(state)
        if later is not None:
            # A touch since this run was armed made the ping unnecessary (yet, or at all).
            self._skip(state, later.reason)
            self._decided(state, "skip" if later.at is not None else "lapse", later.reason, later.at)
            if later.at is None:
                self._lapse(state)
            else:
                self._schedule(state, later.at)
            return
        with self._inflight_cv:
            self._inflight += 1
        began = self.mono()
        state.next_due = 0.0  # in flight: not overdue, whatever its retries take
        deferred = False
        outcome: PingOutcome | None = None
        started = self.clock()
        try:
            missed = missed_slots(scheduled_at, started, state.pair.interval)
            if missed and not state.removed:
                self.metrics.missed.labels(state.pair.expert, state.pair.model).inc(missed)
            with state.lock:
                outcome = self.runner.ping(state, scheduled_at)
            if outcome is None:
                deferred = True
                self.metrics.deferred.inc()
            else:
                self._record_ping(key, state, outcome)
                if self.on_ping is not None:
                    self.on_ping(outcome)
        except Exception:
            log.exception("ping job failed", extra={"keepwarm_fields": {"pair": key}})
        finally:
            with self._inflight_cv:
                self._inflight -= 1
                self._busy += self.mono() - began
                self._inflight_cv.notify_all()
            # Re-arm only if this state is still the pair's (a reload may have replaced it).
            if not self.stopping.is_set() and self.states.get(key) is state and not state.parked:
                pair = state.pair
                now = self.clock()
                with self._policy_lock:
                    policy = self.policies.get(key)
                if policy is not None and outcome is None and not deferred:
                    # The job failed before it had a result: still no retry storm, an interval on.
                    failed = Touch(started, Source.PING, Result.ERROR)
                    with self._policy_lock:
                        self._log_touch(key, failed)
                        policy.observe(failed)
                draw = self._draw(key)
                with self._policy_lock:
                    decision = policy.next_ping(now, draw) if policy is not None else None
                at = decision.at if decision is not None else now + pair.interval
                if at is None:
                    self._skip(state, decision.reason if decision is not None else None)
                    self._decided(state, "lapse", decision.reason if decision is not None else None, None)
                    self._lapse(state)
                elif deferred:
                    # Not sent: the API asked every pair to wait. Come back when the gate opens,
                    # spread over a few seconds so the pairs do not all return at once.
                    reopen = now + self.runner.gate_for(pair).open_in() + self.draw() * min(pair.interval, 10.0)
                    at = max(at, reopen)
                    self._check_hold_past_expiry(state, at, now)
                    self._schedule(state, at)
                else:
                    self._schedule(state, at)

    def _check_hold_past_expiry(self, state: PairState, at: float, now: float) -> None:
        """A hold on every pair must not let this pair's cache lapse unsaid: warn and count it.

        Only a cache still warm now counts: one already expired was not lapsed by this hold, and
        a long hold (the spend cap) must not repeat the warning at every deferral.
        """
        if not state.expires_at or state.expires_at <= now or at < state.expires_at:
            return
        state.holds_past_expiry += 1
        event(
            log,
            logging.WARNING,
            "a hold on every pair defers this pair's ping past its cache's expiry: the cache will lapse",
            pair=state.pair.key,
            expires_at=_iso(state.expires_at),
            expires_in_s=round(state.expires_at - now, 1),
            next_ping_at=_iso(at),
            reason=self.runner.gate_for(state.pair).reason or None,
            times=state.holds_past_expiry,
        )

    def _on_job_event(self, ev: JobEvent | JobExecutionEvent) -> None:
        """A run that APScheduler skipped: count it and re-arm the pair so its chain continues."""
        state = self.states.get(ev.job_id)
        if state is None or self.stopping.is_set():
            return
        self.metrics.missed.labels(state.pair.expert, state.pair.model).inc()
        event(log, logging.WARNING, "ping skipped by the scheduler; re-arming", pair=ev.job_id, code=ev.code)
        self._schedule(state, self.clock() + min(1.0, state.pair.interval / 10))

    # --- health ----------------------------------------------------------------------------

    def overdue(self, now: float | None = None) -> list[str]:
        """Pairs whose ping is so late that their cache may lapse."""
        now = self.clock() if now is None else now
        late = []
        for key, state in list(self.states.items()):
            pair = state.pair
            margin = max(pair.ttl_seconds - pair.interval - pair.jitter, 1.0)
            if state.next_due and now - state.next_due > margin:
                late.append(key)
        return late

    def alive(self) -> tuple[bool, str]:
        """Liveness: the scheduler runs and its heartbeat is fresh. Never depends on the API,
        so a slow or failing API cannot turn a liveness probe into a restart loop."""
        if not self.running:
            return False, "scheduler not running"
        age = self.mono() - self.last_heartbeat
        if age > 5 * HEARTBEAT_EVERY:
            return False, f"scheduler heartbeat is {age:.1f}s old"
        return True, "ok"

    def healthy(self) -> tuple[bool, str]:
        """Readiness: alive, and no pair's ping is so late that its cache may lapse."""
        ok, why = self.alive()
        if not ok:
            return ok, why
        late = self.overdue()
        if late:
            return False, f"{len(late)} pair(s) overdue, e.g. {late[0]}"
        return True, "ok"
