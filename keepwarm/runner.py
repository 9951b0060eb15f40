"""The life of one ping: bounded retries, classification, cost, metrics and the log line.

The scheduler decides *when*; `ping.py` does the HTTP call; this module owns everything in
between. Retry decisions are a pure function (`retry_delay`) so they can be tested alone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from keepwarm.classify import API_MISS_CAUSES, Result, Usage, classify
from keepwarm.config import Pair
from keepwarm.gate import Gate
from keepwarm.logs import event
from keepwarm.metrics import Metrics
from keepwarm.ping import TRANSIENT, PingAttempt, PingError, count_tail, send_ping
from keepwarm.pricing import PriceTable

log = logging.getLogger("keepwarm.ping")

MAX_ATTEMPTS = 5
BASE_BACKOFF = 1.0
MAX_BACKOFF = 30.0
GATE_HOLD_MAX = 5.0  # seconds a worker may wait at the shared gate before deferring the ping
# Error types whose answer concerns the key, not the pair: only a refused key (401) is key-wide.
# A 403 is often one model or resource the key may not use: only that pair stops.
KEY_WIDE_ERRORS = frozenset({"authentication"})


class LedgerLike(Protocol):
    """What the runner needs of a ledger: one call per finished ping, and a close at the end."""

    def record(self, outcome: PingOutcome) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)  # one per pair: no per-instance __dict__
class PairState:
    """What the daemon knows about one pair between pings. Guarded by `lock`."""

    pair: Pair
    max_tokens: int
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    last_start: float = 0.0  # wall time the last ping began (0: never)
    expires_at: float = 0.0  # wall time the cache entry expires if untouched (0: unknown)
    next_due: float = 0.0  # wall time of the next scheduled ping (0: none)
    last_result: Result | None = None
    last_error: str | None = None
    pings: int = 0
    spend: float = 0.0
    spend_unknown: bool = False
    prefix_tokens: int = 0
    tail_tokens: int | None = None  # the ping message alone, counted once when the pair is uncached
    parked: bool = False  # not pinged again until its config changes
    park_reason: str | None = None  # the API's message that parked it
    last_message_id: str | None = None  # for the cache-diagnostics beta
    miss_hint: str | None = None  # a known reason the next ping will miss (a changed prefix)
    # The last ping cached something, but most of the prefix was sent uncached (a marker too
    # early): the pair looks warm while production pays full price for most of its prompt.
    mostly_uncached: bool = False
    # A reload removed the pair: a ping still in flight records nothing (no metric series, no
    # ledger row) for it.
    removed: bool = False
    holds_past_expiry: int = 0  # pings a hold on every pair deferred past this pair's expiry


@dataclass(frozen=True)
class PingOutcome:
    """Everything worth knowing about one finished ping."""

    pair: Pair
    result: Result
    started: float
    duration: float
    attempts: tuple[PingAttempt, ...]
    usage: Usage | None
    cost: dict[str, float] | None
    expires_at: float
    scheduled_at: float | None = None
    miss_cause: str | None = None

    @property
    def final(self) -> PingAttempt:
        """The attempt whose answer counts."""
        return self.attempts[-1]

    @property
    def error(self) -> PingError | None:
        """The final attempt's error, if the ping failed."""
        return self.final.error

    @property
    def total_cost(self) -> float | None:
        """USD for the whole ping, or None when the model has no price."""
        return None if self.cost is None else math.fsum(self.cost.values())




def miss_cause(state: PairState, result: Result, started: float, api_reason: str | None) -> str | None:
    """Why this ping found the cache (wholly or partly) cold, or None if it did not.

    `started` is when the ping that missed began; `state` still holds what was known before it.
    """
    if result not in (Result.REWARMED, Result.PARTIAL):
        return None
    if state.miss_hint:
        return state.miss_hint
    if not state.last_start:
        return "cold_start"
    if state.expires_at and started >= state.expires_at:
        # The last touch was longer ago than the TTL: the ping came late, or failed before.
        return "ttl_lapsed"
    if api_reason in API_MISS_CAUSES:
        return api_reason
    return "unexplained"


def is_max_tokens_refusal(error: PingError) -> bool:
    """Whether a 400 refuses the request's `max_tokens` (the API names the field first)."""
    return error.error_type == "invalid_request" and "max_tokens" in error.message.lower()


def retry_delay(error: PingError, attempt: int, now: float, deadline: float) -> float | None:
    """Seconds to wait before trying again, or None to give up on this ping.

    Only transient errors are retried, with exponential backoff or the server's
    `retry-after`, and never so late that the retry would land after `deadline` (when the
    cache expires): a ping after expiry cannot keep anything warm.
    """
    if error.error_type not in TRANSIENT or error.spend_cap or attempt >= MAX_ATTEMPTS:
        return None
    delay = error.retry_after if error.retry_after is not None else min(BASE_BACKOFF * 2 ** (attempt - 1), MAX_BACKOFF)
    if now + delay >= deadline:
        return None
    return delay


class Runner:
    """Runs pings for pairs and records what they found."""

    def __init__(
        self,
        client: Any,  # an SDK client, or keepwarm.providers.clients.Clients (one per account)
        prices: PriceTable,
        metrics: Metrics,
        stop: threading.Event,
        key_source: str = "",
        ledger: LedgerLike | None = None,
        diagnostics: bool = False,
        clock: Callable[[], float] = time.time,
        wait: Callable[[float], bool] | None = None,
        gate: Gate | None = None,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.prices = prices
        self.metrics = metrics
        self.stop = stop
        self.key_source = key_source
        self.ledger = ledger
        self.diagnostics = diagnostics
        self.clock = clock
        self._said_uncached: set[str] = set()  # pairs whose uncached pings were already a WARNING
        self.mono = mono
        # Backoff waits on the stop event, so SIGTERM cuts a retry short; tests inject it.
        self.wait = wait if wait is not None else stop.wait
        self.gate = gate if gate is not None else Gate()
        # The gates of accounts other than `default`, made from `gate` when first needed.
        self._gates_of = self.gate
        self._account_gates: dict[str, Gate] = {}

    def gate_for(self, pair: Pair) -> Gate:
        """The gate of the pair's account: a 429 or a dead key in one account holds only its own pairs.

        The `default` account (every pair of a config without `accounts:`) uses `gate` itself.
        """
        if pair.account == "default":
            return self.gate
        if self._gates_of is not self.gate:  # a reload replaced the gate: every account's opens anew
            self._gates_of, self._account_gates = self.gate, {}
        gate = self._account_gates.get(pair.account)
        if gate is None:
            rpm = 60.0 / self.gate.spacing if self.gate.spacing else None
            gate = self._account_gates.setdefault(pair.account, Gate(rpm, self.gate.clock))
        return gate

    def ping(self, state: PairState, scheduled_at: float | None = None) -> PingOutcome | None:
        """Ping one pair (retrying within bounds) and record the outcome.

        Returns None when nothing was sent because the shared gate stays shut past the
        point where this ping could still help (the API asked every pair to wait).
        """
        pair = state.pair
        started = self.clock()
        if scheduled_at is not None and not state.removed:
            self.metrics.lateness.observe(max(started - scheduled_at, 0.0))
        deadline = state.expires_at if state.expires_at > started else started + pair.interval
        attempts: list[PingAttempt] = []
        t0 = self.mono()
        gate = self.gate_for(pair)
        latest = gate.clock() + (deadline - started)  # the deadline on the gate's monotonic clock
        while True:
            # A first attempt facing a long hold gives its worker back and is re-armed for when
            # the gate opens; a retry already under way may wait up to its deadline.
            turn = gate.reserve(latest, GATE_HOLD_MAX if not attempts else float("inf"))
            if turn is None or (turn > 0 and self.wait(turn)):
                if not attempts:
                    return None
                break  # give up with the last attempt's error
            previous = state.last_message_id if self.diagnostics else None
            attempt = send_ping(self.client, pair, state.max_tokens, previous, self.clock, self.mono)
            attempts.append(attempt)
            if attempt.error is None:
                gate.succeeded()
                break
            err = attempt.error
            if not state.removed:
                self.metrics.errors.labels(pair.expert, pair.model, err.error_type).inc()
            if self._fallback_from_zero(state, attempt):
                continue
            held = self._hold_gate(pair, err)
            delay = retry_delay(err, len(attempts), self.clock(), deadline)
            self._log_failed_attempt(state, attempt, delay, held)
            if delay is None or self.wait(delay):
                break
        outcome = self._outcome(state, attempts, started, self.mono() - t0, scheduled_at)
        if outcome.result is Result.UNCACHED and state.tail_tokens is None:
            state.tail_tokens = count_tail(self.client, pair)
        self._record(state, outcome)
        return outcome

    def _hold_gate(self, pair: Pair, err: PingError) -> float | None:
        """Make every pair wait when the API's answer concerns the key, not this pair.

        Returns how long the gate is now held for, if this error held it. A 403 holds only its
        own pair: it is not retried, and its next ping comes an interval later as scheduled.
        """
        gate = self.gate_for(pair)
        if err.spend_cap:
            return gate.spend_cap_hit()
        if err.error_type in ("rate_limit", "overloaded") and err.retry_after:
            gate.close_for(err.retry_after, err.error_type)
            return err.retry_after
        if err.error_type in KEY_WIDE_ERRORS:
            # Every pair of the account shares the key: one refusal is enough to know. Back off up
            # to the interval rather than have every pair hammer the API with a dead key.
            gate.close_for(pair.interval, err.error_type)
            return pair.interval
        return None

    def _fallback_from_zero(self, state: PairState, attempt: PingAttempt) -> bool:
        """`max_tokens: 0` is a newer API feature; if it is refused, fall back to 1 for good.

        Only a refusal that names `max_tokens` counts: any other 400 (a mistyped model, a bad
        block) would fail with 1 too, and must park the pair with the API's own message.
        """
        err = attempt.error
        if attempt.max_tokens == 0 and err is not None and is_max_tokens_refusal(err):
            state.max_tokens = 1
            event(
                log,
                logging.WARNING,
                "max_tokens 0 rejected; falling back to 1",
                expert=state.pair.expert,
                model=state.pair.model,
                api_message=err.message,
            )
            return True
        return False

    def _log_failed_attempt(
        self, state: PairState, attempt: PingAttempt, delay: float | None, held: float | None = None
    ) -> None:
        err = attempt.error
        assert err is not None
        fields = {
            "expert": state.pair.expert,
            "model": state.pair.model,
            "error_type": err.error_type,
            "status": err.status,
            "api_message": err.message,
            "request_id": attempt.request_id,
            "retry_in_s": None if delay is None else round(delay, 3),
            "all_pairs_wait_s": None if held is None else round(held, 3),
        }
        if err.spend_cap:
            event(log, logging.ERROR, "SPEND CAP: 429, the workspace's monthly spend limit"
                  " is reached; every pair pauses (all_pairs_wait_s, doubling up to 1h) until the limit is"
                  " raised in the Console or the month resets", **fields)
        elif err.error_type in KEY_WIDE_ERRORS:
            event(log, logging.ERROR, f"the API refused the key from {self.key_source or 'unknown source'}",
                  **fields)
        elif err.error_type == "permission":
            event(log, logging.ERROR, f"the key from {self.key_source or 'unknown source'} may not use this"
                  " pair's model or resource; this pair waits an interval, the others go on", **fields)
        elif err.error_type == "invalid_request":
            event(log, logging.ERROR, "the API rejected the ping; the pair is parked until its config changes",
                  **fields)
        else:
            event(log, logging.WARNING, "ping attempt failed", **fields)

    def _outcome(
        self,
        state: PairState,
        attempts: list[PingAttempt],
        started: float,
        duration: float,
        scheduled_at: float | None,
    ) -> PingOutcome:
        pair = state.pair
        final = attempts[-1]
        usage = final.usage
        result = classify(usage)
        expires = state.expires_at
        if usage is not None and (usage.cache_read or usage.cache_write):
            # The TTL runs from the start of the request that read or wrote the entry.
            expires = final.started_wall + pair.ttl_seconds
        elif result is Result.UNCACHED:
            expires = 0.0
        cost = None if usage is None else self.prices.cost(pair.price_key, usage)
        cause = miss_cause(state, result, final.started_wall, final.miss_reason)
        return PingOutcome(pair, result, started, duration, tuple(attempts), usage, cost, expires, scheduled_at, cause)

    def _record(self, state: PairState, outcome: PingOutcome) -> None:
        """Everything a finished ping changes: the pair's state, its metrics, the ledger, the log."""
        self._update_state(state, outcome)
        self._check_parked(state, outcome)
        self._check_uncached_share(state, outcome)
        if state.removed:
            # A reload removed the pair while this ping was in flight: its series are gone and
            # must stay gone, and the ledger's rows are for configured pairs only.
            event(log, logging.DEBUG, "ping finished after its pair was removed; not recorded",
                  expert=outcome.pair.expert, model=outcome.pair.model, result=outcome.result.value)
            return
        self._count(state, outcome)
        if self.ledger is not None:
            self.ledger.record(outcome)
        self._log_outcome(outcome)

    @staticmethod
    def _update_state(state: PairState, outcome: PingOutcome) -> None:
        state.last_start = outcome.started
        state.expires_at = outcome.expires_at
        state.last_result = outcome.result
        state.pings += 1
        state.last_error = None if outcome.error is None else f"{outcome.error.error_type}: {outcome.error.message}"
        if outcome.final.message_id:
            state.last_message_id = outcome.final.message_id
        if outcome.result is not Result.ERROR:
            state.miss_hint = None
        usage = outcome.usage
        if usage is not None:
            if outcome.result is not Result.UNCACHED:
                state.prefix_tokens = usage.cache_read + usage.cache_write
            else:  # nothing cached: the prefix is the input less the ping's own message, as `check` counts it
                state.prefix_tokens = max(usage.input - (state.tail_tokens or 0), 0)
            if outcome.cost is None:
                state.spend_unknown = True
            else:
                state.spend += math.fsum(outcome.cost.values())

    @staticmethod
    def _check_parked(state: PairState, outcome: PingOutcome) -> None:
        """A 400 is not retried until the config changes: the pair is parked with the API's reason."""
        if outcome.error is not None and outcome.error.error_type == "invalid_request":
            state.parked, state.park_reason = True, outcome.error.message

    @staticmethod
    def _check_uncached_share(state: PairState, outcome: PingOutcome) -> None:
        """Flag a pair that caches only a small part of its prefix, and say so once when it starts."""
        usage = outcome.usage
        if usage is None or outcome.result not in (Result.WARM, Result.REWARMED, Result.PARTIAL):
            return
        cached = usage.cache_read + usage.cache_write
        mostly = usage.input > cached
        if mostly and not state.mostly_uncached and not state.removed:
            event(
                log,
                logging.WARNING,
                "most of this pair's prefix is sent uncached: the cache holds only the part before the"
                " first cache_control marker; move the marker to the end of the shared prefix",
                expert=outcome.pair.expert,
                model=outcome.pair.model,
                uncached_input=usage.input,
                cached=cached,
            )
        state.mostly_uncached = mostly

    def _count(self, state: PairState, outcome: PingOutcome) -> None:
        pair, m = outcome.pair, self.metrics
        labels = (pair.expert, pair.model)
        m.pings.labels(*labels, outcome.result.value).inc()
        m.duration.labels(*labels).observe(outcome.duration)
        m.last_ping.labels(*labels).set(outcome.started)
        m.expires.labels(*labels).set(outcome.expires_at)
        if outcome.miss_cause:
            m.misses.labels(*labels, outcome.miss_cause).inc()
        usage = outcome.usage
        if usage is None:
            return
        for kind, n in usage.by_kind().items():
            m.tokens.labels(*labels, kind).inc(n)
        m.prefix_tokens.labels(*labels).set(state.prefix_tokens)
        penalty = self.prices.miss_penalty(pair.price_key, state.prefix_tokens, pair.ttl)
        m.miss_penalty.labels(*labels).set(math.nan if penalty is None else penalty)
        if outcome.cost is None:
            m.unpriced.labels(*labels).inc()
        else:
            for kind, usd in outcome.cost.items():
                m.cost.labels(*labels, kind).inc(usd)

    def _log_outcome(self, outcome: PingOutcome) -> None:
        pair, usage, final = outcome.pair, outcome.usage, outcome.final
        level = logging.WARNING if outcome.result in (Result.ERROR, Result.UNCACHED, Result.PARTIAL) else logging.INFO
        reason = None
        if outcome.result is Result.UNCACHED:
            # A pair that cannot cache says so once, with why; every ping after is the same news.
            minimum = self.prices.get(pair.model).min_cacheable_tokens
            sent = 0 if usage is None else usage.input
            reason = (f"cannot cache: {sent:,} input tokens, below this model's minimum of {minimum:,}; each ping is"
                      " billed as plain input" if minimum is not None and sent < minimum else
                      "cannot cache: no cache_control breakpoint reached the model's minimum")
            if pair.key in self._said_uncached:
                level = logging.INFO
            self._said_uncached.add(pair.key)
        else:
            self._said_uncached.discard(pair.key)
        expires_in = outcome.expires_at - self.clock() if outcome.expires_at else None
        event(
            log,
            level,
            "ping",
            expert=pair.expert,
            model=pair.model,
            result=outcome.result.value,
            read=None if usage is None else usage.cache_read,
            written=None if usage is None else usage.cache_write,
            input=None if usage is None else usage.input,
            output=None if usage is None else usage.output,
            cost_usd=outcome.total_cost if usage is not None else None,
            cost="unknown" if usage is not None and outcome.cost is None else None,
            latency_ms=round(final.latency * 1000, 1),
            attempts=len(outcome.attempts) if len(outcome.attempts) > 1 else None,
            expires_in_s=None if expires_in is None else round(expires_in, 1),
            miss_cause=outcome.miss_cause,
            reason=reason,
            error_type=None if final.error is None else final.error.error_type,
            fingerprint=pair.fingerprint[:12],
            request_id=final.request_id,
        )
