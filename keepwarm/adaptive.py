"""`policy: adaptive`: keep an idle cache warm only while that is expected to pay (SPEC §9).

The unit of decision is the *idle period*: the time since the pair's last production request.
A ping at age `a` of an idle period, followed by up to k - 1 more every `spacing` seconds, keeps
the cache warm until age `a + (k - 1) * spacing + ttl`. If production comes back within that
stretch (and after the cache would have expired without it) the pings saved one miss penalty;
each ping is paid only if production has not come back before it. So with the idle-gap
distribution G of this pair, conditioned on the gap being longer than `a`:

    saving(k) = miss_penalty * P(expiry_without_ping < G <= a + (k - 1) * spacing + ttl | G > a)
    cost(k)   = ping_cost * sum(P(G > a + i * spacing | G > a) for i in 0 .. k - 1)

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

It never pre-warms: with no touch that refreshed the cache, or once the cache has expired, it
answers None and waits for the next production request (which writes the cache whoever makes it).
Pure and online like every policy: time and the jitter draw are passed in.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable

from keepwarm.policy import Decision, Source, Touch, human_duration

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
MAX_LOOKAHEAD = 5000  # pings considered ahead; a week of 5-minute pings is ~2,000


class SortedWindow:
    """The last `size` values, kept sorted too: counts above a value in O(log n)."""

    __slots__ = ("order", "values", "added")

    def __init__(self, size: int) -> None:
        self.order: deque[float] = deque(maxlen=size)
        self.values: list[float] = []
        self.added = 0  # values ever added: tells a cached answer it is stale

    def add(self, value: float) -> None:
        """Add a value, forgetting the oldest when full."""
        if len(self.order) == self.order.maxlen:
            del self.values[bisect.bisect_left(self.values, self.order[0])]
        self.order.append(value)
        bisect.insort(self.values, value)
        self.added += 1

    def __len__(self) -> int:
        return len(self.values)


class SharedPrior(SortedWindow):
    """Idle gaps of every pair together: what a pair with little history of its own starts from."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(PRIOR_GAPS)


class _Mixture:
    """A weighted mixture of empirical distributions of idle gaps (sorted lists, not copied)."""

    __slots__ = ("parts", "longest")

    def __init__(self, parts: list[tuple[list[float], float]]) -> None:
        self.parts = [(values, w) for values, w in parts if w > 0 and values]
        self.longest = max((values[-1] for values, _ in self.parts), default=0.0)

    def above(self, x: float) -> float:
        """Weight of the gaps longer than x."""
        return sum(w * (len(values) - bisect.bisect_right(values, x)) for values, w in self.parts)

    def mean_above(self, x: float) -> float | None:
        """The mean of the gaps longer than x (None: none is)."""
        weight = self.above(x)
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
    ) -> None:
        self.ttl = ttl
        self.interval = interval
        self.jitter = jitter
        self.ping_cost = ping_cost
        self.miss_penalty = miss_penalty
        self.prior = prior if prior is not None else SharedPrior()
        self.default_margin = default_margin
        self.hour = hour  # scaled with the TTL against a time-scaled emulator
        self.last_refresh = 0.0  # start of the latest request that read or wrote the cache
        self.last_ping = 0.0
        self.last_production = 0.0  # start of the latest production request, cached or not
        self.idle_since = 0.0  # start of the current idle period (0: nothing seen yet)
        self.pings_this_idle = 0
        self.gaps = SortedWindow(PAIR_GAPS)
        self.by_hour: dict[int, SortedWindow] = {}
        self.latencies: deque[float] = deque(maxlen=200)
        self._memo: tuple[tuple[float, float, float, int, int], tuple[bool, float]] | None = None

    # --- feeding ---------------------------------------------------------------------------

    def observe(self, touch: Touch) -> None:
        """Record a touch; a production request ends the idle period and adds its gap."""
        if touch.refreshed:
            self.last_refresh = max(self.last_refresh, touch.at)
        if not self.idle_since:
            self.idle_since = touch.at
        if touch.source is Source.PING:
            self.last_ping = max(self.last_ping, touch.at)
            if touch.at >= self.idle_since:
                self.pings_this_idle += 1
            return
        if touch.at <= self.last_production:
            return  # a late, older observation: its gap is unknown, its refresh is counted above
        if self.last_production:
            self._add_gap(touch.at - self.last_production, self.last_production)
        self.last_production = touch.at
        self.idle_since = touch.at
        self.pings_this_idle = 0

    def replay(self, touches: Iterable[Touch]) -> None:
        """Rebuild the state from history (the ledger's pings and observations) at start."""
        for touch in sorted(touches, key=lambda t: t.at):
            self.observe(touch)

    def observe_latency(self, seconds: float) -> None:
        """Record one ping attempt's latency: the safety margin follows their p99."""
        if seconds >= 0 and math.isfinite(seconds):
            self.latencies.append(seconds)

    def _add_gap(self, gap: float, started: float) -> None:
        self.gaps.add(gap)
        self.by_hour.setdefault(self._hour_of_week(started), SortedWindow(HOUR_GAPS)).add(gap)
        self.prior.add(gap)

    def _hour_of_week(self, t: float) -> int:
        return int(t // self.hour) % WEEK_HOURS

    # --- deciding --------------------------------------------------------------------------

    @property
    def margin(self) -> float:
        """Seconds before expiry the ping must start: p99 latency, one retry, slack."""
        if len(self.latencies) < 5:
            return self.default_margin
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
        return 2 * p99 + RETRY_BACKOFF + SCHEDULING_SLACK

    @property
    def spacing(self) -> float:
        """Seconds from one touch to the next ping (before jitter)."""
        return max(self.interval, self.ttl - self.margin - self.jitter)

    def _distribution(self, age: float) -> _Mixture | None:
        """The idle-gap distribution beyond `age` for the current idle period; None: no history.

        Levels from the most specific to the most general, each shrunk towards the next:
        P_level = (n F_level + K P_next) / (n + K), where F is the level's empirical
        distribution and K its pseudo-count; an empty level passes straight on. n counts only
        the level's gaps longer than `age`: the decision is about the tail beyond it, and a
        level with a thousand short gaps but three long ones knows little about that tail.
        """
        if not self.gaps and not self.prior:
            return None
        how = self._hour_of_week(self.idle_since)
        week = [w.values for d in (-1, 0, 1) if (w := self.by_hour.get((how + d) % WEEK_HOURS))]
        day = [w.values for day in range(7) for d in (-1, 0, 1)
               if (w := self.by_hour.get((how % 24 + d) % 24 + 24 * day))]
        levels = [(week, K_HOUR), (day, K_DAY), ([self.gaps.values], K_PAIR), ([self.prior.values], 0.0)]
        parts: list[tuple[list[float], float]] = []
        mass = 1.0  # of the distribution still to hand out to the more general levels
        for lists, k in levels:
            n = sum(len(v) - bisect.bisect_right(v, age) for v in lists)
            if not n:
                continue
            share = n / (n + k)
            parts += [(v, mass * share / n) for v in lists]
            mass *= 1.0 - share
        if mass > 0 and parts:  # the most general level present takes the rest
            parts = [(v, w / (1.0 - mass)) for v, w in parts]
        return _Mixture(parts)

    def _worth_it(self, at: float) -> tuple[bool, float]:
        """Whether a ping at `at` is expected to pay, and its expected net saving in USD."""
        memo_key = (self.idle_since, self.last_refresh, at, self.prior.added, self.pings_this_idle)
        if self._memo is not None and self._memo[0] == memo_key:
            return self._memo[1]
        age = at - self.idle_since
        dist = self._distribution(age)
        if dist is None:
            # Ski rental: the pings of this idle period stop where they would cost one miss.
            net = self.miss_penalty - (self.pings_this_idle + 1) * self.ping_cost
            answer = (net >= 0, net)
        else:
            answer = self._lookahead(dist, age, self.last_refresh + self.ttl - self.idle_since)
        self._memo = (memo_key, answer)
        return answer

    def _lookahead(self, dist: _Mixture, age: float, expiry_age: float) -> tuple[bool, float]:
        alive = dist.above(age)
        if alive <= 0:
            return False, -self.ping_cost  # longer than every gap seen: production is not coming back soon
        step = self.spacing
        saved_before = dist.above(expiry_age)
        best, paid = -math.inf, 0.0
        for k in range(1, MAX_LOOKAHEAD + 1):
            paid += self.ping_cost * dist.above(age + (k - 1) * step) / alive
            covered_to = age + (k - 1) * step + self.ttl
            saving = self.miss_penalty * (saved_before - dist.above(covered_to)) / alive
            best = max(best, saving - paid)
            if best > 0 or covered_to >= dist.longest:
                break
        return best > 0, best

    def expected_saving(self, now: float) -> float:
        """The expected net saving (USD) of the next ping; what a budget ranks pairs by."""
        if not self.last_refresh:
            return 0.0
        return self._worth_it(max(now, self._next_at(0.0)))[1]

    def _next_at(self, draw: float) -> float:
        return max(self.last_refresh, self.last_ping) + self.spacing + self.jitter * draw

    def describe(self, now: float) -> str:
        """`keeping warm, idle 12 m of an expected 40 m` or `letting lapse: idle 1 h 5 m`."""
        if not self.last_refresh:
            return "waiting for production's first request (never pre-warms)"
        idle = human_duration(now - self.idle_since)
        if self.next_ping(now, 0.0).at is None:
            return f"letting lapse: idle {idle}"
        dist = self._distribution(now - self.idle_since)
        expected = None if dist is None else dist.mean_above(now - self.idle_since)
        if expected is None:
            return f"keeping warm, idle {idle} (no gaps seen yet: until its pings cost one miss)"
        return f"keeping warm, idle {idle} of an expected {human_duration(expected)}"

    def next_ping(self, now: float, draw: float) -> Decision:
        """The next ping, or None with reason `idle` when the cache should lapse."""
        if not self.last_refresh:
            return Decision(None)  # never warmed: a ping now would be a pre-warm
        at = self._next_at(draw)
        expires = self.last_refresh + self.ttl
        if at >= expires or now >= expires:
            return Decision(None, "idle")  # already cold (a failed ping, a late wake): never pre-warm
        worth, _ = self._worth_it(at)
        if not worth:
            return Decision(None, "idle")
        return Decision(at, "production_touch" if self.last_refresh > self.last_ping else None)
