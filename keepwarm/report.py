"""`keepwarm report`: what the ledger says each pair cost and whether that pays. Pure functions.

Definitions, per (expert, model) pair, over the rows in the window:

- hit rate: the seed's `cache_read / (cache_read + cache_write)`, token sums; None when
  the pair read and wrote nothing at all (every ping failed or was uncached).
- spend: the exact sum (`math.fsum`) of every known cost in the ledger. A ping that got an
  answer but has no cost (its model had no price) makes the spend *unknown*: the known part
  is still shown, flagged, and nothing is extrapolated from it. Failed pings are not billed.
- window: with `--since`, from `now - since` to `now`, but never starting before the pair's
  first row in the whole ledger: a pair added an hour ago is judged on that hour, not
  diluted over a day it did not exist. Without `--since`, the span of the pair's rows.
- spend per day: `spend / window_seconds * 86400`, only when the window covers at least an
  hour (SHORT_WINDOW): scaled from minutes, one cold write reads as thousands of dollars a
  day. Below that it is None and the table says how much time the figures cover.
- miss penalty: what one production request pays extra when it finds the cache cold,
  from the price table, on the pair's latest prefix (cache_read + cache_write of its most
  recent cached ping) at that ping's TTL. A pair whose pings were all uncached has no cached
  prefix: its penalty is priced on the input of its latest answered ping (what caching would
  save a request once it caches), and it is flagged `cannot_cache`.
- break-even: spend per day / miss penalty: how many production misses a day the
  keepalive must prevent to pay for itself.

The total row sums counts, tokens and spend over all pairs, and spend per day as the sum
of the pairs' rates (what the whole keepalive costs a day); a penalty and a break-even have
no meaning across pairs, so the total has none.

The production view, from the observations production reported over the same window:

- production requests, and their hit rate (the same formula, over production's tokens).
- production spend: the exact sum of their costs (unknown as for pings).
- saved by caching at all: what those requests would have cost with every input token at
  the full input price, minus what their input actually cost (reads at the read price,
  writes at the write price); negative when production writes more than it reads.
- saved by the keepalive: the miss penalties attributed to it, request by request (a request
  that read the cache although production's own previous request to the pair was a TTL or
  more before it, or there was none).
- net: saved by the keepalive minus the keepalive's spend; the keepalive pays for itself
  over the window when net >= 0; unknown when its spend is, and unknown when it spent and
  saved nothing (no evidence either way, as with an adaptive pair production kept warm).
- drift: production requests whose prefix is not the one keepwarm warms.

A pair with observations but no pings in the window (an adaptive pair production kept warm)
is listed with zero pings, so production's side of it shows.

Accounts and providers: a pair is keyed by where its cache lives as well, (account, provider,
expert, model), since every row records its account, provider and endpoint (rows stored before
they did read as account `default`, provider `anthropic`: the one account of a config without
`accounts:`). Miss penalties and savings are priced at the provider's price for the row's endpoint
(a Vertex regional endpoint costs more than the Claude API for the same model id), from the same
data the daemon billed the pings by. With more than one account, a subtotal per account follows.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from keepwarm.classify import RESULTS, Result
from keepwarm.durations import format_duration
from keepwarm.exitcodes import EX_CONFIG, EX_OK, EX_USAGE
from keepwarm.pricing import COST_KINDS, MILLION, PriceTable, break_even_misses_per_day, format_usd
from keepwarm.providers.base import provider_facts, routed_price
from keepwarm.store import (
    LedgerError,
    LedgerRow,
    Location,
    ObservationRow,
    read_first_seen,
    read_ledger,
    read_observations,
    read_origins,
)

FORMATS = ("table", "json", "csv")
SHORT_WINDOW = 3600.0  # below this, a day's figures rest on a handful of pings
TOTAL = "TOTAL"  # upper case cannot be an expert name, so the total row is unambiguous
# A pair as the report keys it: (account, provider, expert, model). The same expert and model in
# another account is another cache, billed at another price.
PairId = tuple[str, str, str, str]


def price_key(provider: str, endpoint: str, model: str) -> str:
    """The price table row a ledger row was billed by: its provider's route's, else (the Claude
    API, or a provider this keepwarm does not know) its model's."""
    if provider == "anthropic" or provider not in provider_facts():
        return model
    return f"{provider}:{endpoint}:{model}"


def with_row_prices(prices: PriceTable, places: Iterable[tuple[str, str, str]]) -> PriceTable:
    """The table plus a row for each (provider, endpoint, model) the ledger's rows were billed at,
    computed from the table as the config computes a pair's (so a `pricing_file` counts too)."""
    facts = provider_facts()
    extra = {}
    for provider, endpoint, model in set(places):
        key = price_key(provider, endpoint, model)
        if key != model and key not in prices.models:
            extra[key] = routed_price(facts[provider], model, endpoint, prices)[1]
    return replace(prices, models={**prices.models, **extra}) if extra else prices


def _billed(prices: PriceTable, row: LedgerRow | ObservationRow) -> tuple[PriceTable, str]:
    """The table holding the row's price, and the key it is under."""
    place = (row.provider, row.endpoint, row.model)
    return with_row_prices(prices, [place]), price_key(*place)


@dataclass(frozen=True)
class ProductionReport:
    """What production's own requests did over the window, from its observations."""

    requests: int = 0
    cache_read: int = 0
    cache_write: int = 0
    spend: float = 0.0  # the known part when spend_unknown
    spend_unknown: bool = False
    saved_by_caching: float | None = 0.0  # None: some model has no price
    saved_by_keepalive: float = 0.0
    drift: int = 0

    @property
    def hit_rate(self) -> float | None:
        """Production's hit rate; None without reads or writes."""
        return hit_rate(self.cache_read, self.cache_write)


def production_report(observations: Sequence[ObservationRow], prices: PriceTable) -> ProductionReport:
    """Sum the observations of one pair (or of all) over the window."""
    known = [c for c in (o.costs for o in observations) if c is not None]
    unknown = len(known) < len(observations)
    prices = with_row_prices(prices, ((o.provider, o.endpoint, o.model) for o in observations))
    by_caching: list[float] = []
    for o in observations:
        price = prices.get(price_key(o.provider, o.endpoint, o.model)).input
        costs = o.costs
        if price is None or costs is None:
            by_caching = []
            break
        full = (o.input + o.cache_read + o.cache_write) * price / MILLION
        by_caching.append(full - math.fsum(costs[k] for k in ("input", "cache_read", "cache_write_5m", "cache_write_1h")))
    return ProductionReport(
        requests=len(observations),
        cache_read=sum(o.cache_read for o in observations),
        cache_write=sum(o.cache_write for o in observations),
        spend=math.fsum(v for c in known for v in c.values()),
        spend_unknown=unknown,
        saved_by_caching=None if observations and not by_caching else math.fsum(by_caching),
        saved_by_keepalive=math.fsum(o.saved_usd or 0.0 for o in observations),
        drift=sum(1 for o in observations if o.drift),
    )


@dataclass(frozen=True)
class PairReport:
    """One pair's figures over the window; money in USD at full precision."""

    expert: str
    model: str
    ttl: str
    pings: dict[str, int]  # by result, every result present
    cache_read: int
    cache_write: int
    hit_rate: float | None
    spend: float  # the known part when spend_unknown
    spend_by_kind: dict[str, float]
    spend_unknown: bool
    window_seconds: float
    spend_per_day: float | None
    prefix_tokens: int | None
    miss_penalty: float | None
    break_even: float | None  # production misses a day the keepalive must prevent
    production: ProductionReport = ProductionReport()
    cannot_cache: bool = False  # every answered ping was uncached: pings buy nothing
    account: str = "default"  # where the cache lives; "" on the total, which spans them
    provider: str = "anthropic"
    endpoint: str = "default"  # how the provider routes the model: what it is priced at

    @property
    def total_pings(self) -> int:
        """All pings, whatever their result."""
        return sum(self.pings.values())

    @property
    def net(self) -> float | None:
        """Saved by the keepalive minus its spend; None when the spend is unknown."""
        return None if self.spend_unknown else self.production.saved_by_keepalive - self.spend

    @property
    def pays_for_itself(self) -> bool | None:
        """Whether what the keepalive saved covers what it cost; None without evidence either way."""
        net = self.net
        if net is None or (self.spend == 0 and self.production.saved_by_keepalive == 0):
            return None
        return net >= 0

    @property
    def per_day_refused(self) -> bool:
        """The window is too short to scale its spend to a day."""
        return self.spend_per_day is None and not self.spend_unknown and self.window_seconds < SHORT_WINDOW


@dataclass(frozen=True)
class Report:
    """Every pair, the total, and the window they cover."""

    pairs: list[PairReport]
    total: PairReport
    since_seconds: float | None
    now: float
    accounts: list[PairReport] = field(default_factory=list)  # a subtotal per (account, provider), sorted

    @property
    def places(self) -> bool:
        """Whether the pairs live anywhere but the one default Anthropic account (the table then says where)."""
        return bool(self.accounts) and (len(self.accounts) > 1 or self.accounts[0].account != "default"
                                        or self.accounts[0].provider != "anthropic")


def span_text(seconds: float) -> str:
    """A stretch of time for people, to the minute above an hour: `45s`, `10m`, `5h23m`, `2d3h`."""
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m" + (f"{seconds % 60}s" if seconds % 60 and seconds < 600 else "")
    if seconds < 86400:
        return f"{seconds // 3600}h" + (f"{seconds % 3600 // 60}m" if seconds % 3600 >= 60 else "")
    return f"{seconds // 86400}d" + (f"{seconds % 86400 // 3600}h" if seconds % 86400 >= 3600 else "")


def hit_rate(cache_read: int, cache_write: int) -> float | None:
    """The seed's hit rate; None when nothing was read or written."""
    cached = cache_read + cache_write
    return None if cached == 0 else cache_read / cached


def spend_per_day(spend: float, window_seconds: float) -> float | None:
    """Spend scaled to 24 hours; None for a window under SHORT_WINDOW (minutes say nothing of a day)."""
    return None if window_seconds < SHORT_WINDOW else spend / window_seconds * 86400.0


def _is_cached(row: LedgerRow) -> bool:
    return bool((row.cache_read or 0) + (row.cache_write_5m or 0) + (row.cache_write_1h or 0))


def pair_report(
    rows: Sequence[LedgerRow],
    prices: PriceTable,
    now: float,
    since_seconds: float | None = None,
    first_seen: float | None = None,
) -> PairReport:
    """The figures of one pair from its rows in the window (one expert and model, oldest first).

    `first_seen` is the pair's first row in the whole ledger (default: its first row here):
    with `since_seconds`, the window starts there if that is later than `now - since_seconds`.
    """
    if not rows:
        raise ValueError("a pair report needs at least one row")
    first, last = rows[0], rows[-1]
    pings = dict.fromkeys(RESULTS, 0)
    for row in rows:
        pings[row.result] = pings.get(row.result, 0) + 1
    read = sum(r.cache_read or 0 for r in rows)
    written = sum((r.cache_write_5m or 0) + (r.cache_write_1h or 0) for r in rows)
    known = [c for c in (r.costs for r in rows) if c is not None]
    # An answered ping without a cost was billed at a price we do not know.
    unknown = any(r.costs is None and r.result != Result.ERROR.value for r in rows)
    spend = math.fsum(v for c in known for v in c.values())
    by_kind = {k: math.fsum(c[k] for c in known) for k in COST_KINDS}
    if since_seconds is None:
        window = last.time - first.time
    else:
        window = now - max(now - since_seconds, first.time if first_seen is None else first_seen)
    per_day = None if unknown else spend_per_day(spend, window)
    prices, billed = _billed(prices, last)
    latest = next((r for r in reversed(rows) if _is_cached(r)), None)
    prefix = penalty = None
    answered = [r for r in rows if r.result != Result.ERROR.value]
    cannot_cache = bool(answered) and all(r.result == Result.UNCACHED.value for r in answered)
    if latest is not None:
        prefix = (latest.cache_read or 0) + (latest.cache_write_5m or 0) + (latest.cache_write_1h or 0)
        penalty = prices.miss_penalty(billed, prefix, latest.ttl)
    elif cannot_cache and answered[-1].input:
        # Nothing was cached: the whole input went at the input price, prefix included.
        prefix = answered[-1].input
        penalty = prices.miss_penalty(billed, prefix, answered[-1].ttl)
    return PairReport(
        expert=last.expert,
        model=last.model,
        ttl=last.ttl,
        pings=pings,
        cache_read=read,
        cache_write=written,
        hit_rate=hit_rate(read, written),
        spend=spend,
        spend_by_kind=by_kind,
        spend_unknown=unknown,
        window_seconds=window,
        spend_per_day=per_day,
        prefix_tokens=prefix,
        miss_penalty=penalty,
        break_even=None if cannot_cache else break_even_misses_per_day(per_day, penalty),
        cannot_cache=cannot_cache,
        account=last.account,
        provider=last.provider,
        endpoint=last.endpoint,
    )


def production_only(key: PairId, observations: Sequence[ObservationRow], prices: PriceTable, now: float,
                    since_seconds: float | None) -> PairReport:
    """A pair with production requests but no pings in the window: the keepalive spent nothing."""
    observations = sorted(observations, key=lambda o: (o.time, o.id))
    first, last = observations[0], observations[-1]
    window = last.time - first.time if since_seconds is None else now - max(now - since_seconds, first.time)
    latest = next((o for o in reversed(observations) if o.cache_read + o.cache_write), None)
    prefix = None if latest is None else latest.cache_read + latest.cache_write
    table, billed = _billed(prices, last)
    penalty = None if latest is None or prefix is None else table.miss_penalty(billed, prefix, latest.ttl)
    return PairReport(
        account=key[0], provider=key[1], endpoint=last.endpoint, expert=key[2], model=key[3], ttl=last.ttl,
        pings=dict.fromkeys(RESULTS, 0), cache_read=0, cache_write=0,
        hit_rate=None, spend=0.0, spend_by_kind=dict.fromkeys(COST_KINDS, 0.0), spend_unknown=False,
        window_seconds=window, spend_per_day=spend_per_day(0.0, window), prefix_tokens=prefix, miss_penalty=penalty,
        break_even=None, production=production_report(observations, prices),
    )


def _total(pairs: Sequence[PairReport], rows: Sequence[LedgerRow], account: str = "", provider: str = "") -> PairReport:
    """The sum of some pairs: every pair (the total), or one account's (its subtotal)."""
    rates = [p.spend_per_day for p in pairs]
    known = [c for c in (r.costs for r in rows) if c is not None]
    read = sum(p.cache_read for p in pairs)
    written = sum(p.cache_write for p in pairs)
    return PairReport(
        account=account,
        provider=provider,
        endpoint="",
        expert=TOTAL if not account else "",
        model="",
        ttl="",
        pings={r: sum(p.pings.get(r, 0) for p in pairs) for r in RESULTS},
        cache_read=read,
        cache_write=written,
        hit_rate=hit_rate(read, written),
        # From the rows, not from the pairs' sums: a sum of rounded sums can differ in the
        # last bit from the exact sum a reader gets by adding every cost in the ledger.
        spend=math.fsum(v for c in known for v in c.values()),
        spend_by_kind={k: math.fsum(c[k] for c in known) for k in COST_KINDS},
        spend_unknown=any(p.spend_unknown for p in pairs),
        window_seconds=max((p.window_seconds for p in pairs), default=0.0),
        spend_per_day=None if not pairs or None in rates else math.fsum(r for r in rates if r is not None),
        prefix_tokens=None,
        miss_penalty=None,
        break_even=None,
    )


def build_report(
    rows: Iterable[LedgerRow],
    prices: PriceTable,
    since_seconds: float | None = None,
    now: float | None = None,
    first_seen: Mapping[tuple[str, str], float] | None = None,
    observations: Iterable[ObservationRow] = (),
) -> Report:
    """Group rows by pair (sorted by account, provider, expert, model) and compute every figure.

    Rows before the window are dropped here, after they have told when each pair started;
    a caller that reads only the window passes `first_seen` (see `read_first_seen`: by expert
    and model, whatever the account, as an expert belongs to one account at a time).
    """
    now = time.time() if now is None else now
    cutoff = None if since_seconds is None else now - since_seconds
    starts: dict[tuple[str, str], float] = dict(first_seen or {})
    groups: dict[PairId, list[LedgerRow]] = {}
    for row in sorted(rows, key=lambda r: (r.time, r.id)):
        starts[(row.expert, row.model)] = min(starts.get((row.expert, row.model), row.time), row.time)
        if cutoff is None or row.time >= cutoff:
            groups.setdefault((row.account, row.provider, row.expert, row.model), []).append(row)
    seen: dict[PairId, list[ObservationRow]] = {}
    for obs in observations:
        if cutoff is None or obs.time >= cutoff:
            seen.setdefault((obs.account, obs.provider, obs.expert, obs.model), []).append(obs)
    keys = sorted(groups.keys() | seen.keys())
    pairs = [
        replace(pair_report(groups[key], prices, now, since_seconds, starts[key[2:]]),
                production=production_report(seen.get(key, []), prices))
        if key in groups else production_only(key, seen[key], prices, now, since_seconds)
        for key in keys
    ]
    accounts = []
    for place in sorted({key[:2] for key in keys}):
        mine = [i for i, key in enumerate(keys) if key[:2] == place]
        sub = _total([pairs[i] for i in mine], [r for i in mine for r in groups.get(keys[i], [])], *place)
        accounts.append(replace(sub, production=production_report([o for i in mine for o in seen.get(keys[i], [])], prices)))
    kept = [row for key in sorted(groups) for row in groups[key]]
    total = replace(_total(pairs, kept), production=production_report([o for k in sorted(seen) for o in seen[k]], prices))
    return Report(pairs=pairs, total=total, since_seconds=since_seconds, now=now, accounts=accounts)


# --- output --------------------------------------------------------------------------------

CSV_FIELDS = (
    "expert",
    "model",
    "ttl",
    "pings",
    *RESULTS,
    "cache_read_tokens",
    "cache_write_tokens",
    "hit_rate",
    "spend_usd",
    "spend_known_usd",
    "spend_unknown",
    *(f"spend_{k}_usd" for k in COST_KINDS),
    "window_seconds",
    "spend_per_day_usd",
    "prefix_tokens",
    "miss_penalty_usd",
    "break_even_misses_per_day",
    "production_requests",
    "production_cache_read_tokens",
    "production_cache_write_tokens",
    "production_hit_rate",
    "production_spend_usd",
    "saved_by_caching_usd",
    "saved_by_keepalive_usd",
    "keepalive_spend_usd",
    "net_usd",
    "pays_for_itself",
    "prefix_drift",
    "cannot_cache",
    "account",
    "provider",
    "endpoint",
)


def _machine(p: PairReport) -> dict[str, Any]:
    """A pair's figures under the CSV/JSON field names, floats untouched."""
    out: dict[str, Any] = {"expert": p.expert, "model": p.model, "ttl": p.ttl, "pings": p.total_pings}
    out.update(p.pings)
    # An unknown spend is null, never a number a script could add up as if complete; the
    # known part stays available under its own name.
    unknown = p.spend_unknown
    out.update(
        cache_read_tokens=p.cache_read,
        cache_write_tokens=p.cache_write,
        hit_rate=p.hit_rate,
        spend_usd=None if unknown else p.spend,
        spend_known_usd=p.spend,
        spend_unknown=unknown,
    )
    out.update({f"spend_{k}_usd": None if unknown else p.spend_by_kind[k] for k in COST_KINDS})
    out.update(
        window_seconds=p.window_seconds,
        spend_per_day_usd=p.spend_per_day,
        prefix_tokens=p.prefix_tokens,
        miss_penalty_usd=p.miss_penalty,
        break_even_misses_per_day=p.break_even,
    )
    prod = p.production
    out.update(
        production_requests=prod.requests,
        production_cache_read_tokens=prod.cache_read,
        production_cache_write_tokens=prod.cache_write,
        production_hit_rate=prod.hit_rate,
        production_spend_usd=None if prod.spend_unknown else prod.spend,
        saved_by_caching_usd=prod.saved_by_caching,
        saved_by_keepalive_usd=prod.saved_by_keepalive,
        keepalive_spend_usd=None if unknown else p.spend,
        net_usd=p.net,
        pays_for_itself=p.pays_for_itself,
        prefix_drift=prod.drift,
        cannot_cache=p.cannot_cache,
        # None on the total, which spans every account
        account=p.account or None,
        provider=p.provider or None,
        endpoint=p.endpoint or None,
    )
    return out


def render_json(report: Report, prices: PriceTable) -> str:
    """The report as one JSON document; floats keep every bit (Python writes repr)."""
    doc = {
        "generated_at": report.now,
        "since_seconds": report.since_seconds,
        "prices_verified": prices.verified or None,
        "pairs": [_machine(p) for p in report.pairs],
        "accounts": [_account_machine(a) for a in report.accounts],
        "total": _machine(report.total),
    }
    return json.dumps(doc, indent=2) + "\n"


def _account_machine(a: PairReport) -> dict[str, Any]:
    """An account's subtotal: a pair's fields but those that name a pair or a price."""
    drop = {"expert", "model", "ttl", "endpoint", "prefix_tokens", "miss_penalty_usd", "break_even_misses_per_day",
            "cannot_cache"}
    return {k: v for k, v in _machine(a).items() if k not in drop}


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as the same float
    return str(value)


def render_csv(report: Report, out: TextIO) -> None:
    """One row per pair and a last row `TOTAL`; empty cells are unknown."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for p in [*report.pairs, report.total]:
        row = _machine(p)
        writer.writerow([_csv_cell(row[f]) for f in CSV_FIELDS])



def _spend_text(p: PairReport) -> str:
    if not p.spend_unknown:
        return format_usd(p.spend, 4)
    return "unknown" if p.spend == 0 else f">= {format_usd(p.spend, 4)} (some unpriced)"


def render_table(report: Report) -> str:
    """The human table: rounded money, percentages, a window line on top."""
    if report.since_seconds is None:
        head = "window: all rows in the ledger"
    else:
        start = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(report.now - report.since_seconds))
        head = f"window: last {format_duration(report.since_seconds)} (since {start})"
    if not report.pairs:
        return head + "\nno pings and no production requests in the window\n"
    headers = ["EXPERT", "MODEL", *_place_headers(report), "PINGS", *(r.upper() for r in RESULTS), "HIT RATE", "SPEND",
               "SPEND/DAY", "MISS PENALTY", "BREAK-EVEN"]
    rows = []
    for p in [*report.pairs, report.total]:
        rows.append(
            [
                p.expert,
                p.model,
                *_place(report, p),
                str(p.total_pings),
                *(str(p.pings[r]) for r in RESULTS),
                "-" if p.hit_rate is None else f"{p.hit_rate:.1%}",
                _spend_text(p),
                f"n/a ({span_text(p.window_seconds)} covered)" if p.per_day_refused
                else format_usd(p.spend_per_day, 4),
                "-" if p is report.total else format_usd(p.miss_penalty, 6),
                "-" if p is report.total else _break_even_text(p),
            ]
        )
    lines = _columns(headers, rows)
    foot = ["break-even: production misses a day the keepalive must prevent to pay for itself (spend/day / miss penalty)"]
    short = [f"{p.expert}/{p.model} ({span_text(p.window_seconds)})"
             for p in report.pairs if p.per_day_refused]
    if short:
        # Scaled from minutes, one cold write reads as thousands of dollars a day: refuse, and say why.
        foot.append(f"no per-day figures below {format_duration(SHORT_WINDOW)} of history (a day scaled from minutes"
                    " is mostly the first cache write): " + ", ".join(short))
    uncacheable = [f"{p.expert}/{p.model}" for p in report.pairs if p.cannot_cache]
    if uncacheable:
        foot.append("cannot cache (every ping uncached, each billed as plain input): " + ", ".join(uncacheable)
                    + "; its miss penalty is what caching would save a request once the prefix caches"
                    " (`keepwarm check` says why it does not)")
    return "\n".join([head, *lines, "", *foot, *_accounts_table(report), *_production_table(report)]) + "\n"


def _place_headers(report: Report) -> list[str]:
    """ACCOUNT and PROVIDER, when a pair lives anywhere but the default account (else the table is as it was)."""
    return ["ACCOUNT", "PROVIDER"] if report.places else []


def _place(report: Report, p: PairReport) -> list[str]:
    if not report.places:
        return []
    if p is report.total:
        return ["-", "-"]
    # A non-default route is part of the price: say it (`regional`, `geo`, `global`).
    route = "" if p.endpoint in ("default", "") else f" ({p.endpoint})"
    return [p.account, p.provider + route]


def _accounts_table(report: Report) -> list[str]:
    """What each account's pairs cost and saved together, when there is more than one."""
    if len(report.accounts) < 2:
        return []
    headers = ["ACCOUNT", "PROVIDER", "PAIRS", "PINGS", "SPEND", "SPEND/DAY", "PROD REQUESTS", "SAVED BY KEEPALIVE", "NET"]
    rows = []
    for a in report.accounts:
        n = sum(1 for p in report.pairs if (p.account, p.provider) == (a.account, a.provider))
        rows.append([a.account, a.provider, str(n), str(a.total_pings), _spend_text(a), format_usd(a.spend_per_day, 4),
                     str(a.production.requests), format_usd(a.production.saved_by_keepalive, 4), format_usd(a.net, 4)])
    return ["", "by account:", *_columns(headers, rows)]


def _break_even_text(p: PairReport) -> str:
    if p.cannot_cache:
        return "never (cannot cache)"
    if p.per_day_refused:
        return "n/a"
    if p.total_pings == 0:
        return "- (no pings)"
    return "unknown" if p.break_even is None else f"{p.break_even:.1f} misses/day"


def _columns(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [headers, *rows]]


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def _production_table(report: Report) -> list[str]:
    """Production's side: what its requests found, and whether the keepalive paid for itself."""
    if not report.total.production.requests:
        return ["", "production: no observations in the window (production POSTs them to /v1/observations);",
                "without them nothing proves the keepalive saved anything: pays for itself: no"]
    headers = ["EXPERT", "MODEL", *_place_headers(report), "PROD REQUESTS", "PROD HIT RATE", "PROD SPEND",
               "SAVED BY CACHING", "SAVED BY KEEPALIVE", "KEEPALIVE SPEND", "NET", "PAYS FOR ITSELF", "DRIFT"]
    rows = []
    for p in [*report.pairs, report.total]:
        prod = p.production
        rows.append([
            p.expert,
            p.model,
            *_place(report, p),
            str(prod.requests),
            "-" if prod.hit_rate is None else f"{prod.hit_rate:.1%}",
            format_usd(None if prod.spend_unknown else prod.spend, 4),
            format_usd(prod.saved_by_caching, 4),
            format_usd(prod.saved_by_keepalive, 4),
            format_usd(None if p.spend_unknown else p.spend, 4),
            format_usd(p.net, 4),
            _yes_no(p.pays_for_itself),
            str(prod.drift),
        ])
    foot = ["saved by the keepalive: the miss penalties of production requests that read the cache when production's",
            "own previous request was a TTL or more earlier; net = that - keepalive spend;",
            "pays for itself: unknown when the keepalive spent and saved nothing (no evidence either way)"]
    if report.total.production.drift:
        foot.append("drift: production requests whose prefix is not the one keepwarm warms (fix the prompt build)")
    return ["", "production:", *_columns(headers, rows), "", *foot]


def run_report(
    ledger_path: Location,
    prices: PriceTable,
    since_seconds: float | None,
    fmt: str,
    out: TextIO,
    now: float | None = None,
    origins: Sequence[str] | None = ("api",),
) -> int:
    """`keepwarm report`: read the ledger, write the report to `out`; return the exit code.

    `origins` says whose rows count (None: all): real pings by default, so a demo against the
    emulator or a time-scaled test run never mixes with real money.
    """
    if fmt not in FORMATS:
        print(f"keepwarm report: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}", file=sys.stderr)
        return EX_USAGE
    now = time.time() if now is None else now
    try:
        since = None if since_seconds is None else now - since_seconds
        rows = read_ledger(ledger_path, since, origins)
        first_seen = read_first_seen(ledger_path, origins)
        observations = read_observations(ledger_path, since, origins)
        left_out = {o: n for o, n in read_origins(ledger_path, since).items() if origins is not None and o not in origins}
    except LedgerError as exc:
        print(f"keepwarm report: {exc}", file=sys.stderr)
        return EX_CONFIG
    if left_out:
        # On stderr: the report itself (json, csv) stays what a machine expects.
        print("keepwarm report: left out " + ", ".join(f"{n} row(s) from {o} runs" for o, n in sorted(left_out.items()))
              + "; --origin all (or --origin NAME) includes them", file=sys.stderr)
    report = build_report(rows, prices, since_seconds, now, first_seen, observations)
    if fmt == "json":
        out.write(render_json(report, prices))
    elif fmt == "csv":
        render_csv(report, out)
    else:
        out.write(render_table(report))
    return EX_OK
