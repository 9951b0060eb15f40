"""Production observations: what production's own requests found in the cache.

Production POSTs the usage of its requests to `/v1/observations` on the metrics listener,
one observation or `{"observations": [...]}` at a time. Each accepted observation is
classified like a ping, priced, counted in the `keepwarm_production_*` families, kept in the
ledger, fed to the pair's policy as a touch, and attributed:

- **saved**: a production request that read the cache although production's own previous
  request to that pair started a TTL or more earlier (or there was none) would, without the
  keepalive, have written the prefix instead: it adds `min(cache_read, the pair's prefix tokens)
  x (write price - read price)` at the pair's TTL to `keepwarm_saved_usd_total`. Only the warmed
  prefix counts: the rest of a read is production's own conversation, which it kept warm itself.
- **drift**: a request whose fingerprint differs from the pair's, or that read less than the
  warmed prefix while keepwarm held it warm (the last ping that read or wrote it started less
  than a TTL earlier): production is sending a prefix nobody keeps warm. A request that read the
  whole prefix is no drift, whatever it wrote after it.
- **duplicates**: an observation whose `request_id` was seen before (a client's retry) is
  answered as accepted and counts nowhere a second time (a bounded window here, a unique key in
  the ledger).

Order. Attribution is a pure per-pair component (`PairAttribution`) that keeps the pair's
latest production starts (a bounded window) in time order, whatever order they were reported
in. Production's requests closer together than the TTL form an episode; its first request, if
it read the cache, is the episode's one saving. A report that lands before a known request within
the TTL makes that one no longer first, so a saving is not credited when its report arrives but
`SETTLE` seconds later (`Observer.settle`, scaled by --time-scale), with its ledger row: a report
of an earlier request arriving meanwhile takes it back. Reports out of order within that time
credit exactly what arrival in time order credits. A counter cannot go down, so a report later
than that does not withdraw a saving already credited; it takes none itself, and neither does
anything before it in the same episode. A report older than every start the window keeps is
counted and checked for drift but never credited (production's request before it is no longer
known). In a fleet, whose members learn of each other's requests from stored rows only, a
request is judged when it arrives (no settling), against the store's latest request of the pair.

The HTTP edge (`Observer.post`) checks the token before it reads anything, and the
Content-Length before it reads the body, so an unauthenticated or oversized request costs a
header parse, nothing more.
"""

from __future__ import annotations

import bisect
import hmac
import ipaddress
import json
import logging
import math
import operator
import os
import re
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from keepwarm.classify import Result, Usage, classify, usage_from_api
from keepwarm.config import Config, ConfigError, Pair
from keepwarm.driftlog import DriftLog
from keepwarm.fleetcount import StoredProduction
from keepwarm.logs import event
from keepwarm.metrics import Metrics, ProductionSeries
from keepwarm.policy import Source, Touch
from keepwarm.pricing import COST_KINDS, PriceTable
from keepwarm.shard import shard_of
from keepwarm.store import Recent

log = logging.getLogger("keepwarm.observations")

PATH = "/v1/observations"
MAX_ITEMS = 1000
MAX_BYTES = 1024 * 1024
# How far ahead of the daemon's clock an `at` may lie, in real seconds (scaled with --time-scale):
# two machines' clocks disagree by milliseconds under NTP; more is a fabricated or broken report,
# and taken as a touch it would push the next ping past the real expiry.
MAX_FUTURE_SKEW = 5.0
# The largest count accepted: what a float (the counters) holds exactly, far below SQLite's 2^63.
MAX_COUNT = 2**53
REJECT_REASONS = ("malformed", "unknown_pair", "unauthorized", "too_large", "misdirected")
# Per-item reasons of the answer beyond the metric's label values, and the label they count under.
_REASON_LABEL = {"future": "malformed"}
PRODUCTION_RESULTS = ("warm", "rewarmed", "partial", "uncached")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_USAGE_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
_SPLIT_FIELDS = ("ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens")
_ITEM_KEYS = {"expert", "model", "at", "usage", "fingerprint", "request_id", "account", "provider"}
_MAX_REQUEST_ID = 256
# A batch is handled in chunks, giving the interpreter lock (and the observer's own) back in
# between: pings must not wait behind a batch of 1,000 (docs/performance.md).
CHUNK = 64
_AT = operator.attrgetter("at")
# Recent pings kept per pair: enough to find the one before a late observation.
_PING_HISTORY = 16
# Recent production starts kept per pair to attribute savings in time order: a report older than
# all of them is counted but never credited (its predecessor is no longer known).
_PRODUCTION_WINDOW = 32
# Seconds (scaled by --time-scale) a saving waits after its report arrived before it is credited:
# a report of an earlier request within the TTL that arrives meanwhile takes it back. The wrapper
# sends within a second or two; this covers a client's retry after a 503 as well.
SETTLE = 10.0
# Requests held for their saving at most: beyond it the oldest are settled early (a flood of
# fabricated out-of-order reports must not grow memory).
MAX_HELD = 10_000
# request_ids remembered to count a retried observation once (~100 bytes each); the ledger's
# unique key catches a copy that comes later than this many others.
DEDUP_WINDOW = 100_000
# Seconds a client is asked to wait when the ledger cannot keep what it would accept.
RETRY_AFTER = 5


def _yield() -> None:
    """Let other threads (the pings) run: sleep(0) releases the interpreter lock."""
    time.sleep(0)


# --- parsing and validation: pure --------------------------------------------------------


class BadRequest(Exception):
    """The request as a whole is refused: `status` and the metric `reason`."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Observation:
    """One validated production request."""

    pair: Pair
    at: float
    usage: Usage
    result: Result
    fingerprint: str | None
    request_id: str | None


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one item of a request was refused (`reason` is the metric label)."""

    index: int
    reason: str
    message: str
    shard: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The item as the 202 answer lists it."""
        out: dict[str, Any] = {"index": self.index, "reason": self.reason, "message": self.message}
        if self.shard is not None:
            out["shard"] = self.shard
        return out


def parse_body(body: bytes) -> tuple[list[Any], bool]:
    """The items of a request body and whether it was a batch; raise BadRequest (400/413)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(400, "malformed", f"the body is not JSON: {exc}") from None
    except RecursionError:  # nesting deeper than the parser's stack: no observation is that deep
        raise BadRequest(400, "malformed", "the body is not JSON of the expected shape: nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadRequest(400, "malformed", "expected a JSON object: one observation or {\"observations\": [...]}")
    if "observations" not in doc:
        return [doc], False
    items = doc["observations"]
    if set(doc) != {"observations"}:
        extra = sorted(set(doc) - {"observations"})
        raise BadRequest(400, "malformed", f"a batch has only the key \"observations\", got also {extra}")
    if not isinstance(items, list):
        raise BadRequest(400, "malformed", "\"observations\" must be a list")
    if len(items) > MAX_ITEMS:
        raise BadRequest(413, "too_large", f"{len(items)} observations in one request; at most {MAX_ITEMS}")
    return items, True


def _count(value: Any, where: str) -> int:
    if value is None:
        return 0  # missing or null counts as 0, as in an API response
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        shown = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a larger integer"
        raise ValueError(f"{where}: expected an integer from 0 to 2^53, got {shown}")
    return value


def _check_usage(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError("usage: expected an object with the response's usage")
    clean: dict[str, Any] = {name: _count(raw.get(name), f"usage.{name}") for name in _USAGE_FIELDS}
    split = raw.get("cache_creation")
    if split is not None:
        if not isinstance(split, dict):
            raise ValueError("usage.cache_creation: expected an object")
        clean["cache_creation"] = {n: _count(split.get(n), f"usage.cache_creation.{n}") for n in _SPLIT_FIELDS}
    return clean


def validate(
    item: Any,
    index: int,
    pairs: Mapping[str, Pair],
    now: float,
    other_shards: Callable[[str], int | None] = lambda key: None,
    skew: float = MAX_FUTURE_SKEW,
) -> Observation | Rejection:
    """Check one observation against the configured pairs; never raises.

    `skew`: how many seconds past `now` an `at` may lie (MAX_FUTURE_SKEW scaled by --time-scale).
    """
    # Nearly every item is well formed and for a configured pair: `_well_formed` takes those
    # with a few exact type checks and builds no message (checking every item the long way was
    # a good part of a batch's cost). It only ever accepts, and only what the full check would,
    # with the same result; everything else, or anything it is unsure of, goes the long way,
    # which finds what is wrong and says so (tests/test_observations.py fuzzes one against the other).
    observation = _well_formed(item, pairs, now, skew)
    if observation is not None:
        return observation
    return _validate_in_full(item, index, pairs, now, other_shards, skew)


def _plain_count(value: Any) -> int:
    """A usage count as the fast path takes it: None is 0, an int >= 0 itself; -1 for anything else."""
    if value is None:
        return 0
    return value if type(value) is int and 0 <= value <= MAX_COUNT else -1  # exact type: a bool is no count


def _well_formed(item: Any, pairs: Mapping[str, Pair], now: float, skew: float = MAX_FUTURE_SKEW) -> Observation | None:
    """The observation of a plainly valid item (what JSON gives: exact types), else None."""
    if type(item) is not dict or not _ITEM_KEYS.issuperset(item):
        return None
    expert, model = item.get("expert"), item.get("model")
    if type(expert) is not str or type(model) is not str:
        return None
    pair = pairs.get(f"{expert}/{model}")
    at = item.get("at", now)
    usage = item.get("usage")
    fingerprint = item.get("fingerprint")
    request_id = item.get("request_id")
    if (
        pair is None
        or (type(at) is not float and type(at) is not int)
        or not 0 < at <= now + skew  # False for NaN and both infinities too
        or type(usage) is not dict
        or (fingerprint is not None and (type(fingerprint) is not str or not _FINGERPRINT.fullmatch(fingerprint)))
        or (request_id is not None and (type(request_id) is not str or len(request_id) > _MAX_REQUEST_ID
                                        or not request_id.isascii()))  # anything else: the full check
        or item.get("account", pair.account) != pair.account  # sent elsewhere: the long way rejects it
        or item.get("provider", pair.provider) != pair.provider
    ):
        return None
    fresh = _plain_count(usage.get("input_tokens"))
    created = _plain_count(usage.get("cache_creation_input_tokens"))
    read = _plain_count(usage.get("cache_read_input_tokens"))
    output = _plain_count(usage.get("output_tokens"))
    w5 = w1 = 0
    split = usage.get("cache_creation")
    if split is not None:
        if type(split) is not dict:
            return None
        w5 = _plain_count(split.get("ephemeral_5m_input_tokens"))
        w1 = _plain_count(split.get("ephemeral_1h_input_tokens"))
    if min(fresh, created, read, output, w5, w1) < 0:
        return None
    # What `usage_from_api` makes of it: a write the split does not cover is billed at the pair's TTL.
    rest = max(created - w5 - w1, 0)
    if pair.ttl == "1h":
        w1 += rest
    else:
        w5 += rest
    counts = Usage(input=fresh, cache_read=read, cache_write_5m=w5, cache_write_1h=w1, output=output)
    return Observation(pair, float(at), counts, classify(counts), fingerprint, request_id)


def _validate_in_full(
    item: Any,
    index: int,
    pairs: Mapping[str, Pair],
    now: float,
    other_shards: Callable[[str], int | None],
    skew: float = MAX_FUTURE_SKEW,
) -> Observation | Rejection:
    """Every check in order, with the message of the first that fails."""

    def reject(reason: str, message: str, shard: int | None = None) -> Rejection:
        return Rejection(index, reason, message, shard)

    if not isinstance(item, dict):
        return reject("malformed", "expected an object")
    unknown = sorted(str(k) for k in item if k not in _ITEM_KEYS)
    if unknown:
        return reject("malformed", f"unknown key(s) {unknown}; allowed: {sorted(_ITEM_KEYS)}")
    expert, model = item.get("expert"), item.get("model")
    if not isinstance(expert, str) or not isinstance(model, str):
        return reject("malformed", "expert and model: expected strings")
    if not _utf8(expert) or not _utf8(model):
        return reject("malformed", "expert and model: expected text that encodes as UTF-8 (no lone surrogates)")
    key = f"{expert}/{model}"
    pair = pairs.get(key)
    if pair is None:
        owner = other_shards(key)
        if owner is not None:
            return reject("misdirected", f"{key} is kept warm by shard {owner}", owner)
        return reject("unknown_pair", f"{key} is not a configured pair")
    # A request sent to another workspace, account or provider cannot have read this
    # pair's cache; counting it would call a cache warm that production never reads. The pair
    # is (expert, model) in one place, so elsewhere it is an unknown pair (no new metric label).
    # Either is optional (an observation in the shape of §8 has neither): only what is said is checked.
    account, provider = item.get("account"), item.get("provider")
    if (account is not None and account != pair.account) or (provider is not None and provider != pair.provider):
        where = f"account {account!r}" if account is not None and account != pair.account else f"provider {provider!r}"
        return reject(
            "unknown_pair",
            f"{key} is warmed in account {pair.account!r} ({pair.provider}); this request went to {where}",
        )
    at = item.get("at", now)
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        return reject("malformed", f"at: expected unix seconds, got {at!r}")
    if isinstance(at, int) and not 0 < at < 2**53:  # JSON's integers are unbounded, floats not
        return reject("malformed", "at: expected unix seconds, got an integer out of range")
    if not math.isfinite(at) or at <= 0:
        return reject("malformed", f"at: expected unix seconds, got {at!r}")
    if at > now + skew:
        return reject("future", f"at: {at} is {at - now:.3f}s ahead of this daemon's clock; at most {skew:g}s is allowed")
    fingerprint = item.get("fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint)):
        return reject("malformed", "fingerprint: expected 64 lower-case hex digits (sha256)")
    request_id = item.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > _MAX_REQUEST_ID):
        return reject("malformed", f"request_id: expected a string of at most {_MAX_REQUEST_ID} characters")
    if request_id is not None and not _utf8(request_id):
        return reject("malformed", "request_id: expected text that encodes as UTF-8 (no lone surrogates)")
    try:
        raw = _check_usage(item.get("usage"))
    except ValueError as exc:
        return reject("malformed", str(exc))
    usage = usage_from_api(raw, pair.ttl)
    return Observation(pair, float(at), usage, classify(usage), fingerprint, request_id)


def _utf8(text: str) -> bool:
    """Whether a string can be stored as UTF-8 text (JSON lets through lone surrogates, SQLite not)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# --- attribution: pure, per pair, fed in time order ---------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one production request says about the keepalive."""

    saved: bool  # the keepalive spared this request a write (credited)
    drift: str | None  # "fingerprint" or "short_read", or None
    late: bool  # older than the latest production request already attributed
    saved_tokens: int = 0  # what the saving is counted on: the read, at most the warmed prefix
    # Saved as far as is known so far: credited (`saved`) once SETTLE seconds have passed with no
    # report of an earlier request within the TTL before it (Observer.settle).
    pending: bool = False


# A production start's part in the pair's savings: the first request of an episode (production's
# own requests closer together than the TTL) that read the cache is its one saving.
_PENDING, _CREDITED = 1, 2


class PairAttribution:
    """Saved and drift for one pair; fed pings and production requests (see module docstring)."""

    __slots__ = ("dropped", "fingerprint", "heads", "known_since", "pings", "prefix_tokens", "times", "ttl")

    def __init__(self, fingerprint: str, ttl: float, known_since: float = 0.0) -> None:
        self.fingerprint = fingerprint
        self.ttl = ttl
        # Every ping that refreshed the cache since this time is in `pings`: before it, whether
        # keepwarm held the cache warm is for the ledger to say.
        self.known_since = known_since
        # The latest _PRODUCTION_WINDOW production starts, in time order whatever order they were
        # reported in, and the latest start forgotten (or known only from the ledger): before it,
        # production's previous request is unknown, so nothing older is credited.
        self.times: list[float] = []
        self.dropped = 0.0
        # Starts that hold (or wait to hold) their episode's saving: _PENDING or _CREDITED.
        self.heads: dict[float, int] = {}
        # The latest _PING_HISTORY pings' starts: an array, as a deque is ~760 bytes a pair.
        self.pings = array("d")
        self.prefix_tokens = 0  # the warmed prefix, as the last ping that read or wrote it measured (0: unknown)

    @property
    def last_production(self) -> float:
        """Start of the latest production request known (0: none)."""
        return self.times[-1] if self.times else self.dropped

    def ping(self, at: float, refreshed: bool, prefix_tokens: int = 0) -> None:
        """A keepalive ping that started at `at`; only one that read or wrote the cache counts."""
        if refreshed:
            self.pings.append(at)
            if len(self.pings) > _PING_HISTORY:
                self.known_since = max(self.known_since, self.pings[0])
                del self.pings[0]
            if prefix_tokens:
                self.prefix_tokens = prefix_tokens

    def held_warm(self, at: float) -> bool | None:
        """Whether a ping that read or wrote the cache started within a TTL before `at`; None
        when that lies before what the kept pings cover (a report an hour late: ask the ledger)."""
        if any(at - self.ttl < p <= at for p in self.pings):
            return True
        return False if at - self.ttl >= self.known_since else None

    def short_read(self, usage: Usage) -> bool:
        """Whether a request read less than the warmed prefix (prefix unknown: read nothing and wrote)."""
        prefix = self.prefix_tokens
        return usage.cache_read < prefix if prefix else usage.cache_read == 0 and usage.cache_write > 0

    def known(self, at: float) -> None:
        """A production request known from elsewhere (the ledger, another fleet member): never
        credited here, but it keeps the cache warm for what follows it."""
        if at not in self.times and at != self.dropped:
            self._insert(at, False)

    def forget_until(self, at: float) -> None:
        """Production's latest request as a ledger remembers it: what came before is not kept
        here, so no request older than it is credited."""
        self.dropped = max(self.dropped, at)
        while self.times and self.times[0] <= self.dropped:
            oldest = self.times.pop(0)
            if self.heads.get(oldest) == _CREDITED:
                del self.heads[oldest]

    def _insert(self, at: float, read: bool) -> bool:
        """Place one production start among the known ones; return whether it opens an episode
        and read the cache (a saving, pending until settled)."""
        times, heads, ttl = self.times, self.heads, self.ttl
        i = bisect.bisect_right(times, at)
        kept = at > self.dropped  # else its predecessor may be among the forgotten: never credited
        previous = times[i - 1] if i else (self.dropped or None)
        head = kept and read and (previous is None or at - previous >= ttl)
        carried = False
        if i < len(times) and times[i] - at < ttl:
            # It precedes the next known request within the TTL, which no longer opens its
            # episode. A saving still pending there is withdrawn (this one takes it if it read).
            # One already credited stays (a counter cannot go down) and stands for the episode:
            # this request takes none, and the mark moves here so an earlier one takes none either.
            following = times[i]
            state = heads.get(following)
            if state == _PENDING:
                del heads[following]
            elif state == _CREDITED:
                head = False
                if kept:
                    del heads[following]
                    carried = True
        if not kept:
            return False  # not kept: the window holds only what lies after every start it forgot
        times.insert(i, at)
        if head:
            heads[at] = _PENDING
        elif carried:
            heads[at] = _CREDITED
        if len(times) > _PRODUCTION_WINDOW:
            oldest = times.pop(0)
            self.dropped = max(self.dropped, oldest)
            if heads.get(oldest) == _CREDITED:
                del heads[oldest]  # a pending one stays until settled: nothing can withdraw it now
        return head

    def settle(self, at: float) -> bool:
        """Credit the pending saving of the request that started at `at`; False when an earlier
        request reported since took it (or the pair was reset)."""
        if self.heads.get(at) != _PENDING:
            return False
        if self.times and at >= self.times[0]:
            self.heads[at] = _CREDITED
        else:
            del self.heads[at]
        return True

    def production(self, at: float, usage: Usage, fingerprint: str | None, warm: bool | None = None) -> Verdict:
        """Attribute one production request that started at `at`, whatever order it arrives in.

        Production often caches its own conversation behind the warmed prefix: a request that
        read the whole prefix and wrote its history after it is a hit on what keepwarm keeps, not
        drift, and only the prefix's part of its read is the keepalive's saving.
        """
        drift = None
        prefix = self.prefix_tokens
        if fingerprint is not None and fingerprint != self.fingerprint:
            drift = "fingerprint"
        elif self.short_read(usage) and (warm if warm is not None else self.held_warm(at)):
            # Less than the warmed prefix read while keepwarm held it warm (prefix not measured
            # yet, since a restart: nothing read and something written). `warm`: the ledger's
            # answer for a request older than the pings kept here.
            drift = "short_read"
        late = at < self.last_production
        pending = self._insert(at, usage.cache_read > 0)
        tokens = (min(usage.cache_read, prefix) if prefix else usage.cache_read) if pending else 0
        return Verdict(False, drift, late, tokens, pending)


def saved_usd(prices: PriceTable, pair: Pair, tokens: int) -> float | None:
    """What a saved request would have paid extra: `tokens` x (write - read price) at the pair's TTL."""
    return prices.miss_penalty(pair.price_key, tokens, pair.ttl)


# --- in-memory windows for the status page -------------------------------------------------

BUCKET = 3600.0  # the status page's windows are whole hours
WINDOWS = {"24h": 86400.0, "7d": 7 * 86400.0}


@dataclass(slots=True)
class Totals:
    """Sums over a window, for the status page."""

    keepalive_usd: float = 0.0
    keepalive_unknown: bool = False
    saved_usd: float = 0.0
    requests: int = 0
    cache_read: int = 0
    cache_write: int = 0
    drift: int = 0

    def add(self, other: Totals) -> None:
        """Add another window's sums into this one."""
        self.keepalive_usd += other.keepalive_usd
        self.keepalive_unknown |= other.keepalive_unknown
        self.saved_usd += other.saved_usd
        self.requests += other.requests
        self.cache_read += other.cache_read
        self.cache_write += other.cache_write
        self.drift += other.drift

    @property
    def hit_rate(self) -> float | None:
        """Production hit rate (cache_read / (cache_read + cache_write)); None without traffic."""
        cached = self.cache_read + self.cache_write
        return None if not cached else self.cache_read / cached

    @property
    def net(self) -> float:
        """Saved minus what the keepalive spent."""
        return self.saved_usd - self.keepalive_usd


# The windows' key for sums over every pair: a pair's key is always expert/model.
ALL = "all pairs"


@dataclass
class Windows:
    """Hourly sums for the status page's headline: over every pair for a week, per pair a day.

    The page shows per pair only production's figures over 24 h, so that is all a pair's hours
    hold, and only a pair with observations has any. (Every pair's spend by the hour for a week
    was 1.7 million buckets at 10,000 pairs, a few hundred MB.) The sums over every pair keep a
    removed or changed pair's money: it was spent or saved all the same.
    """

    buckets: dict[str, dict[int, Totals]] = field(default_factory=dict)
    since: float = field(default_factory=time.time)  # first time these sums cover

    def add(self, key: str | None, when: float, sums: Totals) -> None:
        """Add `sums` at time `when` to every pair's hours, and to pair `key`'s when given."""
        hour = int(when // BUCKET)
        self._bucket(ALL, hour, WINDOWS["7d"]).add(sums)
        if key is not None:
            self._bucket(key, hour, WINDOWS["24h"]).add(sums)

    def add_pair(self, key: str, when: float, sums: Totals) -> None:
        """Add `sums` at time `when` to pair `key`'s hours only (a restart restores every pair's apart)."""
        self._bucket(key, int(when // BUCKET), WINDOWS["24h"]).add(sums)

    def _bucket(self, key: str, hour: int, keep: float) -> Totals:
        per = self.buckets.setdefault(key, {})
        found = per.get(hour)
        if found is not None:
            return found
        span = int(keep // BUCKET)
        newest = max(per, default=hour)  # at most span + 1 hours: pruning below keeps it so
        if hour < newest - span:
            return Totals()  # older than any window shows (a report days late): counted nowhere here
        found = per[hour] = Totals()
        if hour > newest:
            for old in [h for h in per if h < hour - span]:
                del per[old]
        return found

    def total(self, key: str | None, span: float, now: float) -> Totals:
        """Sums over the last `span` seconds for one pair (or over every pair when None)."""
        first = int((now - span) // BUCKET) + 1  # whole hours only: a bucket is in or out
        out = Totals()
        for hour, totals in list(self.buckets.get(ALL if key is None else key, {}).items()):
            if hour >= first:
                out.add(totals)
        return out

    def drop(self, key: str) -> None:
        """Forget a pair's own hours (removed or changed by a reload); the sums over all keep it."""
        self.buckets.pop(key, None)


# --- the HTTP edge and the bookkeeping ---------------------------------------------------


class ObservationLedger(Protocol):
    """What the observer needs of a ledger."""

    def record_observations(self, rows: list[ObservationRecord]) -> None: ...

    def can_keep(self) -> bool: ...

    def refreshed_between(self, expert: str, model: str, start: float, end: float) -> bool: ...


@dataclass(frozen=True, slots=True)
class ObservationRecord:
    """One accepted observation with what keepwarm made of it: a ledger row."""

    observation: Observation
    cost: dict[str, float] | None
    saved_usd: float | None  # None: not saved, or the model has no price
    saved: bool
    drift: str | None
    late: bool


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# The token's file name in $CREDENTIALS_DIRECTORY (systemd's LoadCredential=, or a Kubernetes
# Secret mounted there), used when observe.token_file is not set.
TOKEN_CREDENTIAL = "observe_token"


def load_token(config: Config, env: Mapping[str, str] | None = None) -> bytes | None:
    """The bearer token from `observe.token_file`, else `$CREDENTIALS_DIRECTORY/observe_token`
    when that file exists (None: no token); raise ConfigError."""
    path: Path | None = config.observe_token_file
    where = "observe.token_file"
    if path is None:
        creds = (os.environ if env is None else env).get("CREDENTIALS_DIRECTORY")
        candidate = Path(creds) / TOKEN_CREDENTIAL if creds else None
        if candidate is None or not candidate.exists():
            return None
        path, where = candidate, f"$CREDENTIALS_DIRECTORY/{TOKEN_CREDENTIAL}"
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read {path}: {exc.strerror or exc}"]) from None
    if not token:
        raise ConfigError([f"{where}: {path} is empty"])
    return token


class _HourSums:
    """What one request adds to one pair's hour on the status page (`Windows`)."""

    __slots__ = ("cache_read", "cache_write", "drift", "requests", "saved_read")

    def __init__(self) -> None:
        self.requests = self.cache_read = self.cache_write = self.drift = 0
        self.saved_read = 0  # cache_read of the requests credited as saved


class _Sums:
    """What one request's observations add to one pair: token counts, summed, priced once.

    Cost is linear in tokens (`PriceTable.cost` and `saved_usd` are count x price, kind by kind),
    so pricing the sums equals summing the prices within float rounding, at a fraction of the
    cost (tests/test_observations.py pins it). Ledger rows are still priced one by one.
    """

    __slots__ = ("cache_read", "cache_write_1h", "cache_write_5m", "drift", "hours", "input", "output", "pair",
                 "requests", "saved_read")

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.requests: dict[Result, int] = {}
        self.input = self.cache_read = self.cache_write_5m = self.cache_write_1h = self.output = 0
        self.saved_read = 0  # cache_read of the requests credited as saved
        self.drift = 0
        self.hours: dict[int, _HourSums] = {}

    def add(self, obs: Observation, verdict: Verdict) -> None:
        """Add one attributed observation."""
        usage = obs.usage
        self.requests[obs.result] = self.requests.get(obs.result, 0) + 1
        self.input += usage.input
        self.cache_read += usage.cache_read
        self.cache_write_5m += usage.cache_write_5m
        self.cache_write_1h += usage.cache_write_1h
        self.output += usage.output
        hour = int(obs.at // BUCKET)
        window = self.hours.get(hour)
        if window is None:
            window = self.hours[hour] = _HourSums()
        window.requests += 1
        window.cache_read += usage.cache_read
        window.cache_write += usage.cache_write_5m + usage.cache_write_1h
        if verdict.saved:
            self.saved_read += verdict.saved_tokens
            window.saved_read += verdict.saved_tokens
        if verdict.drift is not None:
            self.drift += 1
            window.drift += 1

    def usage(self) -> Usage:
        """The summed counts, to price as one response."""
        return Usage(self.input, self.cache_read, self.cache_write_5m, self.cache_write_1h, self.output)



class Observer:
    """Takes observations over HTTP and turns them into metrics, ledger rows and touches."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        token: bytes | None = None,
        *,
        touch: Callable[[str, Touch], None] | None = None,
        touch_many: Callable[[Sequence[tuple[str, Touch]]], None] | None = None,
        ledger: Callable[[], ObservationLedger | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        settle: float = 0.0,
    ) -> None:
        """`touch_many` (the scheduler's) takes a chunk of touches at once; else `touch`, one by one.
        `settle`: real seconds a saving waits for reports of earlier requests (the daemon's is
        SETTLE); 0 judges each request when it arrives, a request's batch still in time order."""
        self.metrics = metrics
        self.touch = touch
        self.touch_many = touch_many
        # In a fleet: each pair's latest production request any member stored (keepwarm.fleet).
        self.fleet_history: Callable[[list[tuple[str, str]]], dict[tuple[str, str], float]] | None = None
        # In a fleet the pair's owner counts what any member stored (`count_stored`): the
        # receiving member judges and stores an observation but leaves its series alone.
        self.counted_by_owner = False
        self.ledger = ledger
        self.clock = clock
        self.windows = Windows(since=clock())
        self.drift_log = DriftLog(clock)  # a WARNING the first time a pair drifts, then hourly
        self._lock = threading.Lock()
        self._attribution: dict[str, PairAttribution] = {}
        self._series_of: dict[str, ProductionSeries] = {}  # pairs whose production series exist
        self._seen: dict[str, None] = {}  # recent request_ids, oldest first (a dict keeps insertion order)
        # Requests whose saving waits to be settled, by when: (due, observation, verdict).
        self._held: deque[tuple[float, Observation, Verdict]] = deque()
        self._settle = settle
        self.settle_delay = settle
        self._unauth_warned = False
        self.pairs: dict[str, Pair] = {}
        self.apply(config, token)
        for reason in REJECT_REASONS:
            metrics.observations_rejected.labels(reason)

    def apply(self, config: Config, token: bytes | None) -> None:
        """Take a (re)loaded config: pairs, prices, token; forget pairs that changed."""
        with self._lock:
            pairs = {p.key: p for p in config.pairs}
            for key, old in self.pairs.items():
                if pairs.get(key) == old:
                    pairs[key] = old  # the object the scheduler keeps for an unchanged pair
                else:
                    self._attribution.pop(key, None)
                    self._series_of.pop(key, None)  # the scheduler removed its series
                    self.windows.drop(key)
            for key, pair in pairs.items():
                if key not in self._attribution:
                    self._attribution[key] = PairAttribution(pair.fingerprint, pair.ttl_seconds, self.clock())
            self.pairs = pairs
            self.prices = config.prices
            self.token = token
            self.open = token is None and (is_loopback(config.metrics_host) or config.observe_allow_unauthenticated)
            self.shards = config.shard
            self.other_shard_pairs = config.other_shard_pairs
            self.skew = MAX_FUTURE_SKEW * config.time_scale
            self.settle_delay = self._settle * config.time_scale

    # --- what pings tell us ------------------------------------------------------------

    def ping(self, pair: Pair, started: float, result: Result, cost: float | None, usage: Usage | None = None) -> None:
        """A finished keepalive ping (from the scheduler): for drift, saved and the page's spend."""
        with self._lock:
            if self.pairs.get(pair.key) != pair:
                return  # removed or changed meanwhile
            attribution = self._attribution[pair.key]
            tokens = usage.cache_read + usage.cache_write if usage is not None else 0
            attribution.ping(started, result in (Result.WARM, Result.REWARMED, Result.PARTIAL), tokens)
            if cost is None:
                self.windows.add(None, started, Totals(keepalive_unknown=result is not Result.ERROR))
            else:
                self.windows.add(None, started, Totals(keepalive_usd=cost))
        self.settle()  # the pings' rhythm settles savings even while no observation arrives

    # --- the endpoint --------------------------------------------------------------------

    def _owner(self, key: str) -> int | None:
        if self.shards is None or key not in self.other_shard_pairs:
            return None
        return shard_of(key, self.shards[1])

    def _authorized(self, header: str | None) -> bool:
        if self.token is None:
            return self.open
        scheme, _, given = (header or "").partition(" ")
        # compare_digest on the whole header value: no early exit that leaks the token's prefix.
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token)

    def post(
        self, authorization: str | None, content_length: str | None, read: Callable[[int], bytes]
    ) -> tuple[int, dict[str, Any]]:
        """Answer one POST /v1/observations from its two headers and the body's reader: (status, JSON)."""
        rejected = self.metrics.observations_rejected
        if not self._authorized(authorization):
            rejected.labels("unauthorized").inc()
            if self.token is None:
                if not self._unauth_warned:
                    self._unauth_warned = True
                    event(log, logging.WARNING, "observations refused: the metrics listener is not on loopback and"
                          " no observe.token_file is set (or set observe.allow_unauthenticated: true)")
                return 401, {"error": "observations need observe.token_file on a listener that is not loopback"}
            return 401, {"error": "missing or wrong bearer token"}
        try:
            length = int(content_length) if content_length is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            rejected.labels("malformed").inc()
            return 411, {"error": "Content-Length is required"}
        if length > MAX_BYTES:
            rejected.labels("too_large").inc()
            return 413, {"error": f"body of {length} bytes; at most {MAX_BYTES}"}
        try:
            items, _ = parse_body(read(length))
            return self.accept(items)
        except BadRequest as exc:
            rejected.labels(exc.reason).inc()
            return exc.status, {"error": exc.message}

    def accept(self, items: list[Any]) -> tuple[int, dict[str, Any]]:
        """Validate, attribute and record the items of one request: (status, JSON document)."""
        now = self.clock()
        with self._lock:
            pairs = self.pairs
        checked: list[Observation | Rejection] = []
        for i, item in enumerate(items):
            checked.append(validate(item, i, pairs, now, self._owner, self.skew))
            if i % CHUNK == CHUNK - 1:
                _yield()
        good = [c for c in checked if isinstance(c, Observation)]
        bad = [c for c in checked if isinstance(c, Rejection)]
        for rejection in bad:
            self.metrics.observations_rejected.labels(_REASON_LABEL.get(rejection.reason, rejection.reason)).inc()
        shards = {r.shard for r in bad}
        if bad and not good and len(shards) == 1 and None not in shards:
            return 421, {"shard": bad[0].shard, "rejected": [r.to_json() for r in bad]}
        ledger = self.ledger() if good else None
        if ledger is not None and not ledger.can_keep():
            # The ledger holds rows it could not write: a 202 now would be a promise kept in
            # memory only. Nothing of the request is counted; the client retries.
            return 503, {"error": "the ledger cannot be written; nothing was accepted, retry later",
                         "retry_after": RETRY_AFTER}
        self.settle(now)
        fresh = self._first_copies(good)
        judged = self._judge(fresh)
        if judged:
            ready = [j for j in judged if not j[1].pending]
            if ledger is not None and ready:
                ledger.record_observations(self._ledger_rows(ready))
            # A fleet's members learn of each other's requests from stored rows only: a held row
            # would keep the pair's owner from the touch (a needless ping) and the others from
            # production's history. There, a request is judged when it arrives, as the store knows it.
            wait = 0.0 if self.fleet_history is not None else self.settle_delay
            self._hold([j for j in judged if j[1].pending], now + wait)
            self.settle(now)  # with no settling time (or past MAX_HELD), what was just held
            self._touch(judged, now)
        answer: dict[str, Any] = {"accepted": len(good), "rejected": [r.to_json() for r in bad]}
        if len(fresh) < len(good):
            answer["duplicates"] = len(good) - len(fresh)
        return 202, answer

    def _first_copies(self, observations: list[Observation]) -> list[Observation]:
        """The observations whose request_id was not seen before (one without counts as new)."""
        fresh = []
        with self._lock:
            seen = self._seen
            for obs in observations:
                rid = obs.request_id
                if rid is not None:
                    if rid in seen:
                        continue
                    seen[rid] = None
                    if len(seen) > DEDUP_WINDOW:
                        del seen[next(iter(seen))]
                fresh.append(obs)
        return fresh

    def record(self, observations: Iterable[Observation]) -> list[ObservationRecord]:
        """Attribute observations in time order and count them, savings credited at once (no
        report can take them back afterwards); return what was decided."""
        return self._ledger_rows(self._credit(self._judge(observations)))

    # --- savings: credited once no earlier report can take them back ---------------------

    def _hold(self, judged: list[tuple[Observation, Verdict]], due: float) -> None:
        """Keep requests whose saving is pending until `due` (their ledger rows too: a row says saved or not)."""
        if judged:
            with self._lock:
                self._held.extend((due, obs, verdict) for obs, verdict in judged)

    def settle(self, now: float | None = None, everything: bool = False) -> int:
        """Credit the pending savings whose time has come (all of them at shutdown) and write
        their ledger rows; return how many requests were settled. Cheap when none is due."""
        held = self._held
        if not held:
            return 0
        now = self.clock() if now is None else now
        with self._lock:
            due = []
            while held and (everything or held[0][0] <= now or len(held) > MAX_HELD):
                _, obs, verdict = held.popleft()
                due.append((obs, verdict))
        if not due:
            return 0
        # In a fleet, another member may have stored an earlier request of the same episode
        # while these waited: what the store knows now is taken in before crediting.
        self._fleet_previous([obs for obs, _ in due])
        done = self._credit(due)
        ledger = self.ledger()
        if ledger is not None:
            ledger.record_observations(self._ledger_rows(done))
        return len(done)

    def _credit(self, judged: list[tuple[Observation, Verdict]]) -> list[tuple[Observation, Verdict]]:
        """The final verdicts: each pending saving credited unless an earlier request reported
        meanwhile took it; what is credited is counted in the saved series and the hours."""
        out = []
        with self._lock:
            for obs, verdict in judged:
                if not verdict.pending:
                    out.append((obs, verdict))
                    continue
                pair = obs.pair
                attribution = self._attribution.get(pair.key)
                credited = attribution is not None and self.pairs.get(pair.key) is pair and attribution.settle(obs.at)
                tokens = verdict.saved_tokens if credited else 0
                out.append((obs, Verdict(credited, verdict.drift, verdict.late, tokens)))
                if credited and not self.counted_by_owner:  # in a fleet the owner counts it from the store
                    usd = saved_usd(self.prices, pair, tokens) or 0.0
                    self._series(pair).add({}, {}, {}, usd, 0)
                    self.windows.add(pair.key, obs.at, Totals(saved_usd=usd))
        return out

    def _touch(self, judged: list[tuple[Observation, Verdict]], now: float) -> None:
        """Feed the pairs' policies a touch per observation, in time order, a chunk at a time."""
        touches = []
        production = Source.PRODUCTION  # looked up once: an enum member's lookup is not free
        for obs, verdict in judged:
            # A drifted request touched some other prefix's entry, not the pair's: its ping
            # must still come (a skipped ping there would let the real cache lapse).
            if verdict.drift is None:
                usage = obs.usage
                tokens = usage.cache_read + usage.cache_write_5m + usage.cache_write_1h
                # Never later than now: a clock a little ahead must not push the next ping past the expiry.
                touches.append((obs.pair.key, Touch(min(obs.at, now), production, obs.result, tokens or usage.input)))
        if self.touch_many is not None:
            for start in range(0, len(touches), CHUNK):
                if start:
                    _yield()
                self.touch_many(touches[start:start + CHUNK])
        elif self.touch is not None:
            for key, touch in touches:
                self.touch(key, touch)

    def _ledger_rows(self, judged: list[tuple[Observation, Verdict]]) -> list[ObservationRecord]:
        """The ledger's rows: each observation priced on its own, as the ledger keeps them."""
        prices = self.prices
        return [
            ObservationRecord(
                obs,
                prices.cost(obs.pair.price_key, obs.usage),
                saved_usd(prices, obs.pair, verdict.saved_tokens) if verdict.saved else None,
                verdict.saved,
                verdict.drift,
                verdict.late,
            )
            for obs, verdict in judged
        ]

    def _series(self, pair: Pair) -> ProductionSeries:
        """The pair's production series, looked up once."""
        found = self._series_of.get(pair.key)
        if found is None:
            found = self._series_of[pair.key] = self.metrics.production(pair.expert, pair.model)
        return found

    def _judge(self, observations: Iterable[Observation]) -> list[tuple[Observation, Verdict]]:
        """Attribute observations in time order, a chunk at a time, then count them per pair."""
        judged: list[tuple[Observation, Verdict]] = []
        # Summed per pair first, then priced and counted once per pair: a batch of 1,000 costs a
        # few hundred counter updates instead of eleven thousand, and a few hundred prices.
        sums: dict[str, _Sums] = {}
        ordered = sorted(observations, key=_AT)
        self._fleet_previous(ordered)
        warm = self._warm_from_ledger(ordered)
        for start in range(0, len(ordered), CHUNK):
            if start:
                _yield()
            self._attribute(ordered[start:start + CHUNK], sums, judged, warm)
        with self._lock:
            if not self.counted_by_owner:
                for key, total in sums.items():
                    if self.pairs.get(key) is total.pair:  # else a reload removed or changed it meanwhile
                        self._count(key, total)
            self.drift_log.judged(judged)
        return judged

    def count_stored(self, rows: Iterable[StoredProduction], owns: Callable[[str], bool]) -> int:
        """In a fleet: count observations read back from the shared store, whichever member
        received them, for the pairs this member owns and exports now; return how many.

        As the store holds them: the receiving member judged the saving against the fleet's
        history and priced each row, so the series add up to the ledger's figures.
        """
        per_pair: dict[str, list[StoredProduction]] = {}
        for row in rows:
            per_pair.setdefault(row.key, []).append(row)
        counted = 0
        with self._lock:
            for key, pair_rows in per_pair.items():
                pair = self.pairs.get(key)
                series = self.metrics.kept_production(pair.expert, pair.model) if pair is not None else None
                if series is None or not owns(key):
                    continue  # not this member's: its owner counts it
                requests: dict[str, int] = {}
                tokens = dict.fromkeys(COST_KINDS, 0)
                cost = dict.fromkeys(COST_KINDS, 0.0)
                saved = 0.0
                drift = 0
                for row in pair_rows:
                    if row.result not in PRODUCTION_RESULTS:
                        continue  # not a production request's result (no such row is stored)
                    requests[row.result] = requests.get(row.result, 0) + 1
                    for kind, n in row.tokens.items():
                        tokens[kind] += n
                    for kind, usd in (row.cost or {}).items():
                        cost[kind] += usd
                    saved += row.saved_usd
                    drift += row.drift
                    written = row.tokens["cache_write_5m"] + row.tokens["cache_write_1h"]
                    self.windows.add(key, row.at, Totals(requests=1, cache_read=row.tokens["cache_read"],
                                                         cache_write=written, saved_usd=row.saved_usd,
                                                         drift=int(row.drift)))
                series.add(requests, tokens, cost, saved, drift)
                counted += len(pair_rows)
        return counted

    def _fleet_previous(self, observations: list[Observation]) -> None:
        """In a fleet, production's previous request to a pair may have reached another member:
        take each pair's latest stored request from the shared store before judging savings, so
        no split of traffic between members credits a saving another request already earned.
        A later request stored already makes these `late`: never overstated, at worst uncredited."""
        history = self.fleet_history
        if history is None or not observations:
            return
        try:
            latest = history(sorted({(o.pair.expert, o.pair.model) for o in observations}))
        except Exception as exc:  # noqa: BLE001 - judged on this member's own history, as alone
            event(log, logging.WARNING, "cannot read the fleet's production history to judge savings", error=str(exc))
            return
        with self._lock:
            for (expert, model), at in latest.items():
                a = self._attribution.get(f"{expert}/{model}")
                if a is not None:
                    a.known(at)

    def _warm_from_ledger(self, observations: list[Observation]) -> dict[int, bool]:
        """Whether keepwarm held the cache warm, by id(observation), for the requests whose drift
        depends on pings older than those kept in memory: asked of the ledger, outside the lock."""
        unknown = []
        with self._lock:
            for obs in observations:
                a = self._attribution.get(obs.pair.key)
                if (a is not None and (obs.fingerprint is None or obs.fingerprint == a.fingerprint)
                        and a.short_read(obs.usage) and a.held_warm(obs.at) is None):
                    unknown.append((obs, a.ttl))
        ledger = self.ledger() if unknown else None
        found: dict[int, bool] = {}
        if ledger is None:
            return found
        for obs, ttl in unknown:
            try:
                found[id(obs)] = ledger.refreshed_between(obs.pair.expert, obs.pair.model, obs.at - ttl, obs.at)
            except Exception as exc:  # noqa: BLE001 - unreadable: not judged, as without a ledger
                event(log, logging.WARNING, "cannot read pings back from the ledger to judge drift", error=str(exc))
                break
        return found

    def _attribute(self, chunk: list[Observation], sums: dict[str, _Sums],
                   out: list[tuple[Observation, Verdict]], warm: dict[int, bool]) -> None:
        """Attribute one chunk of a request's observations under the lock."""
        with self._lock:
            for obs in chunk:
                pair = obs.pair
                key = pair.key
                attribution = self._attribution.get(key)
                if attribution is None or self.pairs.get(key) is not pair:
                    continue  # a reload removed it between validation and here
                verdict = attribution.production(obs.at, obs.usage, obs.fingerprint, warm.get(id(obs)))
                total = sums.get(key)
                if total is None:
                    total = sums[key] = _Sums(pair)
                total.add(obs, verdict)
                out.append((obs, verdict))

    def _count(self, key: str, total: _Sums) -> None:
        """Price one pair's sums and add them to its series and its hours. Caller holds the lock."""
        pair = total.pair
        usage = total.usage()
        # The very arithmetic of one observation (`PriceTable.cost`, `saved_usd`), on the sums.
        cost = self.prices.cost(pair.price_key, usage) or {}
        saved = 0.0
        if total.saved_read:
            saved = saved_usd(self.prices, pair, total.saved_read) or 0.0
        requests = {result.value: n for result, n in total.requests.items()}
        self._series(pair).add(requests, usage.by_kind(), cost, saved, total.drift)
        for hour, sums in total.hours.items():
            hour_saved = 0.0
            if sums.saved_read:
                hour_saved = saved_usd(self.prices, pair, sums.saved_read) or 0.0
            self.windows.add(key, hour * BUCKET, Totals(
                requests=sums.requests, cache_read=sums.cache_read, cache_write=sums.cache_write,
                saved_usd=hour_saved, drift=sums.drift,
            ))

    def restore(self, recent: Recent, now: float | None = None) -> None:
        """Take back what a ledger remembers after a restart: the page's hourly sums, and the
        touches attribution judges the next requests against (so a restart credits no saving
        that production's own previous request had already earned)."""
        now = self.clock() if now is None else now
        with self._lock:
            keys = {(p.expert, p.model): p.key for p in self.pairs.values()}
            # Every pair's hours, as recorded: a removed pair's money was spent or saved all the same.
            for hour, (usd, unpriced, n, read, written, saved, drift) in recent.all_hours.items():
                self.windows.add(None, hour * BUCKET, Totals(
                    keepalive_usd=usd, keepalive_unknown=unpriced > 0,
                    requests=n, cache_read=read, cache_write=written, saved_usd=saved, drift=drift,
                ))
            for (expert, model, hour), (n, read, written, saved, drift) in recent.pair_hours.items():
                key = keys.get((expert, model))
                if key is not None:
                    self.windows.add_pair(key, hour * BUCKET, Totals(
                        requests=n, cache_read=read, cache_write=written, saved_usd=saved, drift=drift,
                    ))
            for pair_labels, at in recent.last_production.items():
                key = keys.get(pair_labels)
                if key is not None:
                    self._attribution[key].forget_until(at)
            for pair_labels, starts in recent.pings.items():
                key = keys.get(pair_labels)
                if key is not None:
                    for at in starts:
                        self._attribution[key].ping(at, refreshed=True)
            if recent.first is not None:
                self.windows.since = min(self.windows.since, recent.first)

    def headline(self, now: float | None = None) -> dict[str, Any]:
        """The status page's figures: per window in total, and per pair over the longest window."""
        now = self.clock() if now is None else now
        with self._lock:
            totals = {name: self.windows.total(None, span, now) for name, span in WINDOWS.items()}
            per_pair = {key: self.windows.total(key, WINDOWS["24h"], now) for key in sorted(self.pairs)}
        return {"since": self.windows.since, "windows": totals, "pairs": per_pair}

