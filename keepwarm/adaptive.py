"""`policy: adaptive`: keep an idle cache warm only while that is expected to pay (docs/policy.md).

The unit of decision is the *idle period*: the time since the pair's last production request.
A ping at age `a` of an idle period, followed by up to k - 1 more every `spacing` seconds, keeps
the cache warm until age `a + (k - 1) * spacing + ttl`. If production comes back within that
stretch (and after the cache would have expired without it) the pings saved one miss penalty;
each ping is paid only if production has not come back before it. So with the idle-gap
distribution G of this pair, conditioned on the gap being longer than `a`:

    saving(k) = miss_penalty * P(expiry_without_ping <= G < a + (k - 1) * spacing + ttl | G >= a)
    cost(k)   = ping_cost * sum(P(G >= a + i * spacing | G >= a) for i in 0 .. k - 1)

(a request exactly at expiry misses: `keepwarm.touch.cache_alive`)

and the next ping is sent when some k makes saving(k) > cost(k). With k = 1 this is "the
expected saving of the next ping exceeds its cost"; looking further ahead keeps a cache warm
across a gap it can bridge only with several pings (a cron job every 10 minutes under a 5-minute
TTL), which no single ping pays for on its own.

G is learnt from the pair's own production requests: the gaps that started in the same hour of
the week (and the hours beside it), shrunk towards the same hours of every day, then
towards all of the pair's gaps, then towards a prior shared by all pairs (see
`_distribution`). With no gap anywhere it is ski rental: keep pinging until the pings of
this idle period would cost one miss penalty, then stop, which never pays more than about twice
the best choice in hindsight.

Pings are spaced as close to the TTL as a safety margin allows: twice the p99 ping latency (a
first attempt that fails slowly, then its retry) plus the runner's backoff and a little
scheduling slack; until latencies are measured, a default margin. Never closer together than
`interval`, which the config has already checked against the TTL.

Whatever the estimate says, the pings of one idle period never cost more than ROBUSTNESS miss
penalties (learning-augmented ski rental: follow the prediction, with a robustness cap), so an
idle period costs at most one penalty in pings plus the miss if production comes back after
that; docs/policy.md states the bound. The estimate is censored: the shared prior also counts the
other pairs' idle periods still in progress, so prefixes that went quiet for good teach the thin
pairs how long a prefix lives. A ping is weighed when it comes due: before that, `next_ping`
answers with the time it would go, an appointment the scheduler keeps by asking again.

It never pre-warms: with no touch that refreshed the cache, or once the cache has expired, it
answers None and waits for the next production request (which writes the cache whoever makes it).
Pure and online like every policy: time and the jitter draw are passed in.
"""

from __future__ import annotations

import bisect
import math
import weakref
from collections import deque
from collections.abc import Iterable

from keepwarm.touch import Decision, Source, Touch, cache_alive, human_duration

DEFAULT_MARGIN = 20.0  # seconds before expiry, until ping latencies are measured (a p99 of ~8 s and a retry)
RETRY_BACKOFF = 1.0  # the runner's first backoff (runner.BASE_BACKOFF), between an attempt and its retry
SCHEDULING_SLACK = 2.0  # a scheduler wakes a little late under load
HOUR = 3600.0
WEEK_HOURS = 168
PAIR_GAPS = 2000  # the pair's most recent gaps that count: the present, not last year
HOUR_GAPS = 50  # per hour of the week
PRIOR_GAPS = 5000
K_HOUR = 5.0  # pseudo-counts of the shrinkage: hour of week -> hour of day -> pair -> shared prior
K_DAY = 5.0
K_PAIR = 3.0
LATENCIES = 200  # ping latencies the margin's p99 is taken over, per pair and for the whole fleet
MIN_LATENCIES = 5  # fewer measured than this: the pair borrows the fleet's, and the fleet the default
MAX_LOOKAHEAD = 5000  # pings considered ahead; a week of 5-minute pings is ~2,000
# The robustness cap (learning-augmented ski rental): the pings of one idle period never cost
# more than this many miss penalties, whatever the estimate says. A gap whose bridging costs
# more than one penalty is never worth bridging in hindsight, so 1.0 forgoes nothing the
# optimum would do, and bounds what a wrong estimate can cost (docs/policy.md, "The bound").
ROBUSTNESS = 1.0


class SortedWindow:
    """The last `size` values, kept sorted too: counts above a value in O(log n)."""

    __slots__ = ("order", "values", "added", "size")

    def __init__(self, size: int) -> None:
        self.order: deque[float] = deque(maxlen=size)
        self.values: list[float] = []
        self.added = 0  # values ever added: tells a cached answer it is stale
        self.size = size

    def add(self, value: float) -> float | None:
        """Add a value, forgetting the oldest when full; return the value forgotten (None: none)."""
        # Called three times per production request (pair, hour, prior): locals, not attributes.
        order, values = self.order, self.values
        forgotten = None
        if len(order) == self.size:
            forgotten = order[0]
            del values[bisect.bisect_left(values, forgotten)]
        order.append(value)
        bisect.insort(values, value)
        self.added += 1
        return forgotten

    def __len__(self) -> int:
        return len(self.values)


class SharedPrior(SortedWindow):
    """What every pair has seen, for a pair with little history of its own to lean on.

    The idle gaps of every pair together (complete: production came back), and the idle periods
    still in progress (censored: production has not come back *yet*). A pair that went quiet for
    good shows up only in the second: without it, a fleet of prefixes each used a few times and
    then never again would read as "production always comes back within minutes".
    """

    __slots__ = ("open_starts", "_open_of", "version", "latencies", "latencies_seen")

    def __init__(self) -> None:
        super().__init__(PRIOR_GAPS)
        self.open_starts: list[float] = []  # sorted starts of the idle periods in progress
        self._open_of: dict[int, float] = {}
        self.version = 0  # bumped on every change: tells a cached answer it is stale
        # Every pair's recent ping latencies: they all reach the same API, so a pair that has
        # measured few of its own (new, or just rebuilt) spaces its pings by the fleet's.
        self.latencies: deque[float] = deque(maxlen=LATENCIES)
        self.latencies_seen = 0  # latencies ever added: tells a cached margin it is stale

    def observe_latency(self, seconds: float) -> None:
        """Record one ping attempt's latency, of any pair."""
        self.latencies.append(seconds)
        self.latencies_seen += 1

    def add(self, value: float) -> float | None:
        """Add a complete idle gap."""
        self.version += 1
        return SortedWindow.add(self, value)

    def open_period(self, owner: int, start: float) -> None:
        """Pair `owner`'s idle period in progress now started at `start` (replacing its last)."""
        starts = self.open_starts
        old = self._open_of.get(owner)
        if old is not None:
            del starts[bisect.bisect_left(starts, old)]
        self._open_of[owner] = start
        bisect.insort(starts, start)
        self.version += 1

    def close_period(self, owner: int) -> None:
        """Forget pair `owner`'s idle period in progress (its policy is gone or moved)."""
        old = self._open_of.pop(owner, None)
        if old is not None:
            del self.open_starts[bisect.bisect_left(self.open_starts, old)]
            self.version += 1

    def open_since(self, start: float) -> int:
        """How many idle periods in progress started at or before `start`."""
        return bisect.bisect_right(self.open_starts, start)


class _Mixture:
    """A weighted mixture of empirical distributions of idle gaps (sorted lists, not copied),
    plus `never`: the weight of gaps known to last beyond any age asked about (censored)."""

    __slots__ = ("parts", "never")

    def __init__(self, parts: list[tuple[list[float], float]], never: float = 0.0) -> None:
        self.parts = [(values, w) for values, w in parts if w > 0 and values]
        self.never = never

    def at_least(self, x: float) -> float:
        """Weight of the gaps of x or longer: production not back before age x."""
        total = 0.0  # a plain loop: the lookahead's hot spot, faster than sum(generator), same sum
        for values, w in self.parts:
            total += w * (len(values) - bisect.bisect_left(values, x))
        return self.never + total

    def mean_above(self, x: float) -> float | None:
        """The mean of the complete gaps longer than x (None: none is)."""
        weight = sum(w * (len(values) - bisect.bisect_right(values, x)) for values, w in self.parts)
        if weight <= 0:
            return None
        total = sum(w * math.fsum(values[bisect.bisect_right(values, x):]) for values, w in self.parts)
        return total / weight


class AdaptivePolicy:
    """`policy: adaptive` for one pair: see the module docstring for the rule."""

    def __init__(
        self,
        ttl: float,
        interval: float,
        jitter: float,
        ping_cost: float,
        miss_penalty: float,
        prior: SharedPrior | None = None,
        default_margin: float = DEFAULT_MARGIN,
        hour: float = HOUR,
        robustness: float = ROBUSTNESS,
    ) -> None:
        self.ttl = ttl
        self.interval = interval
        self.jitter = jitter
        self.ping_cost = ping_cost
        self.miss_penalty = miss_penalty
        self._prior = prior if prior is not None else SharedPrior()
        self.default_margin = default_margin
        self.hour = hour  # scaled with the TTL against a time-scaled emulator
        self.robustness = robustness
        # None, not 0.0, for "never": unix time 0 is a time like any other.
        self.last_refresh: float | None = None  # start of the latest request that read or wrote the cache
        self.last_ping: float | None = None
        self.last_production: float | None = None  # start of the latest production request, cached or not
        self.idle_since: float | None = None  # start of the current idle period
        self.pings_this_idle = 0
        self.gaps = SortedWindow(PAIR_GAPS)
        # Per hour of the week, its latest gaps in arrival order: only ever merged (and sorted)
        # into `_levels`, so unlike the pair's and the prior's windows they need no sorted copy.
        self.by_hour: dict[int, deque[float]] = {}
        self.latencies: deque[float] = deque(maxlen=LATENCIES)
        self._latencies_seen = 0
        self._margin: tuple[bool, int, float] | None = None  # (own?, latencies seen, margin): a sort saved
        self._memo: tuple[tuple[float, float, float, int, int, float], tuple[bool, float]] | None = None
        # The hour-of-week and hour-of-day levels of `_distribution`, merged into one sorted list
        # each: their gaps weigh the same, so one list answers as all of them do, in one bisect.
        self._levels: tuple[int, list[float], list[float]] | None = None
        self._owner = id(self)  # this pair in the prior's idle periods in progress
        # The prior counts this pair's idle period in progress until the policy is dropped.
        self._finalizer = weakref.finalize(self, SharedPrior.close_period, self._prior, id(self))

    @property
    def prior(self) -> SharedPrior:
        """The prior shared by all pairs; setting it moves this pair's idle period in progress there."""
        return self._prior

    @prior.setter
    def prior(self, prior: SharedPrior) -> None:
        # The scheduler replays a rebuilt policy's history against a scratch prior (so the shared
        # one counts each gap once), then hands it the shared one.
        if prior is self._prior:
            return
        self._finalizer.detach()
        self._prior.close_period(id(self))
        self._prior = prior
        self._margin = None  # it may have been the old prior's latencies
        self._finalizer = weakref.finalize(self, SharedPrior.close_period, prior, id(self))
        if self.last_production is not None:
            prior.open_period(id(self), self.last_production)

    # --- feeding ---------------------------------------------------------------------------

    def observe(self, touch: Touch) -> None:
        """Record a touch; a production request ends the idle period and adds its gap."""
        at = touch.at
        if touch.refreshed and (self.last_refresh is None or at > self.last_refresh):
            self.last_refresh = at
        if self.idle_since is None:
            self.idle_since = at
        if touch.source is Source.PING:
            if self.last_ping is None or at > self.last_ping:
                self.last_ping = at
            if at >= self.idle_since:
                self.pings_this_idle += 1
            return
        if self.last_production is not None:
            if at <= self.last_production:
                return  # a late, older observation: its gap is unknown, its refresh is counted above
            self._add_gap(at - self.last_production, self.last_production)
        self.last_production = at
        self.idle_since = at
        self.pings_this_idle = 0
        self._prior.open_period(self._owner, at)

    def replay(self, touches: Iterable[Touch]) -> None:
        """Rebuild the state from history (the ledger's pings and observations) at start."""
        for touch in sorted(touches, key=lambda t: t.at):
            self.observe(touch)

    def observe_latency(self, seconds: float) -> None:
        """Record one ping attempt's latency: the safety margin follows their p99."""
        if seconds >= 0 and math.isfinite(seconds):
            self.latencies.append(seconds)
            self._latencies_seen += 1
            self._prior.observe_latency(seconds)

    def _add_gap(self, gap: float, started: float) -> None:
        self.gaps.add(gap)
        how = self._hour_of_week(started)
        window = self.by_hour.get(how)
        if window is None:
            window = self.by_hour[how] = deque(maxlen=HOUR_GAPS)
        forgotten = window[0] if len(window) == HOUR_GAPS else None
        window.append(gap)
        self._prior.add(gap)
        if self._levels is not None:
            # Keep the merged levels in step with their windows, rather than merging them anew
            # (a sort of up to a thousand gaps) at the next decision.
            cached, week, day = self._levels
            for merged, near in ((week, (how - cached) % WEEK_HOURS), (day, (how - cached) % 24)):
                if near in (0, 1, WEEK_HOURS - 1 if merged is week else 23):
                    bisect.insort(merged, gap)
                    if forgotten is not None:
                        del merged[bisect.bisect_left(merged, forgotten)]

    def _hour_of_week(self, t: float) -> int:
        return int(t // self.hour) % WEEK_HOURS

    # --- deciding --------------------------------------------------------------------------

    @property
    def margin(self) -> float:
        """Seconds before expiry the ping must start: p99 latency, one retry, slack.

        The p99 of the pair's own latencies once it has measured a few, else of the whole
        fleet's (the same API: a new pair need not pay the default's wide margin until its own
        pings have been measured), else the default.
        """
        own = len(self.latencies) >= MIN_LATENCIES
        source = self.latencies if own else self._prior.latencies
        if len(source) < MIN_LATENCIES:
            return self.default_margin
        seen = self._latencies_seen if own else self._prior.latencies_seen
        if self._margin is not None and self._margin[0] == own and self._margin[1] == seen:
            return self._margin[2]
        ordered = sorted(source)
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        margin = 2 * p99 + RETRY_BACKOFF + SCHEDULING_SLACK
        self._margin = (own, seen, margin)
        return margin

    @property
    def spacing(self) -> float:
        """Seconds from one touch to the next ping (before jitter)."""
        return max(self.interval, self.ttl - self.margin - self.jitter)

    @property
    def pings_left(self) -> int:
        """Pings this idle period may still send under the robustness cap (see ROBUSTNESS)."""
        if self.ping_cost <= 0:
            return MAX_LOOKAHEAD
        allowed = self.robustness * self.miss_penalty / self.ping_cost - self.pings_this_idle
        return max(0, min(MAX_LOOKAHEAD, math.floor(allowed + 1e-9)))

    def _distribution(self, age: float) -> _Mixture | None:
        """The idle-gap distribution beyond `age` for the current idle period; None: no history.

        Levels from the most specific to the most general, each shrunk towards the next:
        P_level = (n F_level + K P_next) / (n + K), where F is the level's empirical
        distribution and K its pseudo-count; an empty level passes straight on. n counts only
        the level's gaps of `age` or longer: the decision is about the tail beyond it, and a
        level with a thousand short gaps but three long ones knows little about that tail.
        The shared prior also counts the other pairs' idle periods in progress that are already
        older than `age` (censored: production has not come back to them, and for all the
        lookahead knows it never will), so thin pairs learn how long prefixes live.
        """
        if self.idle_since is None or (not self.gaps and not self._prior):
            return None
        week, day = self._hour_levels(self._hour_of_week(self.idle_since))
        # Other pairs idle at least as long (their idle periods began no later than this one).
        censored = max(0, self._prior.open_since(self.idle_since) - (self.last_production is not None))
        levels = ((week, K_HOUR, 0), (day, K_DAY, 0), (self.gaps.values, K_PAIR, 0), (self._prior.values, 0.0, censored))
        parts: list[tuple[list[float], float]] = []
        never = 0.0
        mass = 1.0  # of the distribution still to hand out to the more general levels
        for values, k, extra in levels:
            n = len(values) - bisect.bisect_left(values, age) + extra
            if not n:
                continue
            share = n / (n + k)
            weight = mass * share / n
            parts.append((values, weight))
            never += weight * extra
            mass *= 1.0 - share
        if mass > 0 and (parts or never):  # the most general level present takes the rest
            parts = [(v, w / (1.0 - mass)) for v, w in parts]
            never /= 1.0 - mass
        return _Mixture(parts, never)

    def _hour_levels(self, how: int) -> tuple[list[float], list[float]]:
        """The gaps that started in hour of week `how` or the hours beside it, and those that
        started at the same hours of any day, each as one sorted list (kept in step by `_add_gap`)."""
        if self._levels is not None and self._levels[0] == how:
            return self._levels[1], self._levels[2]
        week: list[float] = []
        for d in (-1, 0, 1):
            week += self.by_hour.get((how + d) % WEEK_HOURS, ())
        day: list[float] = []
        for d in (-1, 0, 1):
            for weekday in range(7):
                day += self.by_hour.get((how % 24 + d) % 24 + 24 * weekday, ())
        week.sort()
        day.sort()
        self._levels = (how, week, day)
        return week, day

    def _worth_it(self, at: float) -> tuple[bool, float]:
        """Whether a ping at `at` is expected to pay, and its expected net saving in USD."""
        assert self.idle_since is not None and self.last_refresh is not None
        memo_key = (self.idle_since, self.last_refresh, at, self._prior.version, self.pings_this_idle, self.spacing)
        if self._memo is not None and self._memo[0] == memo_key:
            return self._memo[1]
        age = at - self.idle_since
        left = self.pings_left
        dist = self._distribution(age)
        if not left:
            answer = (False, -self.ping_cost)  # the robustness cap: this idle period has had its pings
        elif dist is None:
            # Ski rental: the pings of this idle period stop where they would cost one miss.
            net = self.miss_penalty - (self.pings_this_idle + 1) * self.ping_cost
            answer = (net >= 0, net)
        else:
            answer = self._lookahead(dist, age, self.last_refresh + self.ttl - self.idle_since, left)
        self._memo = (memo_key, answer)
        return answer

    def _lookahead(self, dist: _Mixture, age: float, expiry_age: float, most: int) -> tuple[bool, float]:
        """The best expected net saving of the next k <= `most` pings, from idle age `age`.

        Production returning at idle age G finds the cache alive without pings when
        G < expiry_age, and with pings sent at ages age + i * step (i < k) when
        G < age + (k - 1) * step + ttl (`cache_alive`: a request at expiry is a miss). Ping i
        is paid when production has not returned before it (G >= its age).
        """
        alive = dist.at_least(age)
        if alive <= 0:
            return False, -self.ping_cost  # longer than every gap seen: production is not coming back soon
        step = self.spacing
        saved_before = dist.at_least(expiry_age)
        best, paid = -math.inf, 0.0
        for k in range(1, most + 1):
            paid += self.ping_cost * dist.at_least(age + (k - 1) * step) / alive
            covered_to = age + (k - 1) * step + self.ttl
            saving = self.miss_penalty * (saved_before - dist.at_least(covered_to)) / alive
            best = max(best, saving - paid)
            if best > 0 or dist.at_least(covered_to) <= dist.never:
                break  # pays, or no gap seen lasts longer: more pings only add cost
        return best > 0, best

    def expected_saving(self, now: float) -> float:
        """The expected net saving (USD) of the next ping; what a budget ranks pairs by."""
        if self.last_refresh is None:
            return 0.0
        return self._worth_it(max(now, self._next_at(0.0)))[1]

    def _next_at(self, draw: float) -> float:
        assert self.last_refresh is not None
        anchor = self.last_refresh if self.last_ping is None else max(self.last_refresh, self.last_ping)
        return anchor + self.spacing + self.jitter * draw

    def describe(self, now: float) -> str:
        """`keeping warm, idle 12 m of an expected 40 m` or `letting lapse: idle 1 h 5 m`."""
        if self.last_refresh is None or self.idle_since is None:
            return "waiting for production's first request (never pre-warms)"
        idle = human_duration(now - self.idle_since)
        if self._decide(now, 0.0, provisional=False).at is None:
            return f"letting lapse: idle {idle}"
        dist = self._distribution(now - self.idle_since)
        expected = None if dist is None else dist.mean_above(now - self.idle_since)
        if expected is None:
            return f"keeping warm, idle {idle} (no gaps seen yet: until its pings cost one miss)"
        return f"keeping warm, idle {idle} of an expected {human_duration(expected)}"

    def next_ping(self, now: float, draw: float) -> Decision:
        """The next ping, or None with reason `idle` when the cache should lapse.

        A ping not yet due is an appointment, not a promise: whether it pays is weighed when it
        comes due (the scheduler asks again then, as it always does), with everything learnt by
        then. Weighing it at every production touch instead was most of what a busy pair cost.
        """
        return self._decide(now, draw, provisional=True)

    def _decide(self, now: float, draw: float, provisional: bool) -> Decision:
        if self.last_refresh is None:
            return Decision(None)  # never warmed: a ping now would be a pre-warm
        at = self._next_at(draw)
        if not cache_alive(self.last_refresh, self.ttl, max(at, now)) or not self.pings_left:
            # Already cold (a failed ping, a late wake): never pre-warm. Or the cap is reached.
            return Decision(None, "idle")
        by_production = self.last_ping is None or self.last_refresh > self.last_ping
        if provisional and at > now:
            return Decision(at, "production_touch" if by_production else None)
        worth, _ = self._worth_it(at)
        if not worth:
            return Decision(None, "idle")
        return Decision(at, "production_touch" if by_production else None)


class SkiRentalPolicy(AdaptivePolicy):
    """Ski rental alone, learning nothing: ping an idle cache until the pings of the idle period
    would cost one miss penalty, then let it lapse. A reference row of `keepwarm simulate`
    (`--policy ski-rental`): what the adaptive policy's learning adds over its fallback."""

    def _distribution(self, age: float) -> _Mixture | None:
        return None
