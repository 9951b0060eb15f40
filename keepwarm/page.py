"""The status page at `/`: pure rendering from the pairs' states and the observations' headline.

Kept apart from `keepwarm.web` (the HTTP server) so the page can change without touching the server.
The pictures are inline SVG drawn here: no script, nothing fetched.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keepwarm import __version__
from keepwarm.classify import Result
from keepwarm.durations import format_duration
from keepwarm.observations import BUCKET, Totals
from keepwarm.pricing import PriceTable, format_usd
from keepwarm.runner import PairState, PingOutcome

DAY = 86400.0
HEALTHY, BROKEN = 0.85, 0.60  # production hit rate: the shipped alerts' warning and critical lines


def cache_state(state: PairState, now: float) -> str:
    """A word for the page: warm, cold, uncached, error, parked or pending."""
    if state.parked:
        return "parked"
    if state.last_result is None:
        # No ping yet, but production may have read or written the cache (an adaptive pair
        # skips its pings then): its expiry says so.
        return "warm" if state.expires_at > now else "pending"
    if state.last_result.value == "uncached":
        return "uncached"
    if state.expires_at > now:
        return "warm"
    return "error" if state.last_result.value == "error" else "cold"


COLOURS = {"warm": "#2e9e44", "cold": "#d3d3d3", "rewritten": "#e08a00", "failing": "#c62828", "uncached": "#8d6e00",
           "none": "#f3f3f3", "spent": "#d9822b", "saved": "#2e9e44"}
_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse}td,th{padding:.3em .6em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}td:last-child{white-space:normal;min-width:9em;max-width:16em}
tr.has-why td{border-bottom:none}td.why{white-space:normal;max-width:none;padding-top:0;color:#7a3b00}td.why b{color:#b00}
.warm{color:#080;font-weight:600}.cold,.error,.parked{color:#b00;font-weight:600}
.uncached{color:#a60;font-weight:600}.pending{color:#666}code{font-size:12px}
code.fp{display:inline-block;max-width:7em;overflow:hidden;text-overflow:ellipsis;vertical-align:bottom;cursor:text}
.banner{background:#fee;border:1px solid #b00;padding:.5em 1em}span[title]{border-bottom:1px dotted #999}
svg text{font:11px system-ui,sans-serif;fill:#333}.key span{display:inline-block;width:.9em;height:.7em;margin:0 .3em 0 .9em}
small{color:#555}svg.strip{width:160px;height:14px;display:block}
""" + "".join(f".s-{k}{{fill:{COLOURS[k]}}}" for k in ("warm", "cold", "rewritten", "failing", "uncached", "none"))
STATES = ("warm", "cold", "uncached", "error", "parked", "pending")  # the order of the header's counts


class History:
    """Per pair, what its 24 h strip draws: when its cache was warm, and when it was rewritten,
    failed or answered uncached. Fed by every finished ping and every production touch.

    Warm spans that overlap are merged, so a pair kept warm all day holds one span; the
    moments are capped per pair, so memory stays bounded whatever happens.
    """

    MARKS = 2000  # per pair: a ping failing every 12 s for a day is 7,200; the strip shows the first thousands

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.since = clock()  # before this the strip has no data (the daemon was not running)
        self._lock = threading.Lock()
        # Plain lists: a pair kept warm holds one span and a mark or two, and a deque's first
        # block alone is some 600 bytes (14 MB at 10,000 pairs, where lists take about 3).
        self._warm: dict[str, list[list[float]]] = {}
        self._marks: dict[str, list[tuple[float, str]]] = {}
        # Each strip as last drawn: one pixel is 9 minutes of a day, so redrawing 10,000 of them
        # on every 5 s refresh (0.7 s of CPU) would change nothing visible; a new mark redraws.
        self._drawn: dict[str, tuple[float, float, str]] = {}

    def warm(self, key: str, start: float, end: float) -> None:
        """The pair's cache was warm from `start` to `end`."""
        with self._lock:
            spans = self._warm.setdefault(key, [])
            if spans and start <= spans[-1][1] + 1.0 and start >= spans[-1][0]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end])
                if spans[0][1] < end - DAY:
                    spans[:] = [s for s in spans if s[1] >= end - DAY]

    def mark(self, key: str, at: float, kind: str) -> None:
        """The pair's cache was `rewritten`, its ping `failing` or `uncached`, at `at`."""
        with self._lock:
            marks = self._marks.setdefault(key, [])
            marks.append((at, kind))
            self._drawn.pop(key, None)
            if len(marks) > self.MARKS or marks[0][0] < at - DAY - 3600:  # an hour's slack: pruned now and then
                # Trimmed in one go, a quarter at a time past the cap: appends stay cheap.
                kept = [m for m in marks if m[0] >= at - DAY]
                marks[:] = kept[-(self.MARKS * 3 // 4):] if len(kept) > self.MARKS else kept

    def ping(self, outcome: PingOutcome) -> None:
        """Record one finished ping."""
        key, result, at = outcome.pair.key, outcome.result, outcome.final.started_wall
        if result in (Result.WARM, Result.REWARMED, Result.PARTIAL) and outcome.expires_at > at:
            self.warm(key, at, outcome.expires_at)
        kind = {Result.REWARMED: "rewritten", Result.PARTIAL: "rewritten", Result.ERROR: "failing",
                Result.UNCACHED: "uncached"}.get(result)
        if kind is not None:
            self.mark(key, at, kind)

    def touches(self, touches: Sequence[tuple[str, Any]], states: Mapping[str, PairState]) -> None:
        """Record production's requests (the scheduler's `Touch`es): each that read or wrote the cache warms it a TTL."""
        for key, touch in touches:
            state = states.get(key)
            if state is None or not touch.refreshed:
                continue
            self.warm(key, touch.at, touch.at + state.pair.ttl_seconds)
            if touch.result is Result.REWARMED:
                self.mark(key, touch.at, "rewritten")

    def drawn(self, key: str, now: float, span: float = DAY) -> str:
        """The pair's strip as SVG, redrawn once a pixel's worth of time has passed or a mark came."""
        with self._lock:
            hit = self._drawn.get(key)
        if hit is not None and hit[1] == span and 0 <= now - hit[0] < span / STRIP_W:
            return hit[2]
        svg = strip_svg(self, key, now, span)
        with self._lock:
            self._drawn[key] = (now, span, svg)
        return svg

    def strip(self, key: str, now: float, span: float = DAY) -> tuple[list[tuple[float, float]], list[tuple[float, str]]]:
        """The pair's warm spans and moments over the last `span` seconds (at most 24 h are kept)."""
        start = now - span
        with self._lock:
            spans = [(max(a, start), min(b, now)) for a, b in self._warm.get(key, ()) if b > start and a < now]
            marks = [(t, k) for t, k in self._marks.get(key, ()) if start <= t <= now]
        return spans, marks


@dataclass(frozen=True)
class PageInfo:
    """What the status page shows beyond the pairs' states."""

    time_scale: float | None = None  # the emulator's (or a scaled run's) time factor; None: real time
    reload_ok: bool = True  # False after a rejected SIGHUP reload
    prices: PriceTable | None = None  # for the minimum behind an `uncached`
    policy: Callable[[str, float], str] | None = None  # a pair's policy in words (Scheduler.describe)
    history: History | None = None  # the pairs' last 24 h, for the strips
    daily: Callable[[float], list[tuple[float, Totals]]] | None = None  # spend and saved per UTC day (daily_totals)


def daily_totals(buckets: Mapping[int, Totals], now: float, days: int = 7) -> list[tuple[float, Totals]]:
    """The hourly sums over every pair (the observer's windows) added up per UTC day, oldest first."""
    today = int(now // DAY)
    out = {today - i: Totals() for i in range(days)}
    for hour, totals in list(buckets.items()):  # a copy: the observer adds hours meanwhile
        day = int(hour * BUCKET // DAY)
        if day in out:
            out[day].add(totals)
    return [(d * DAY, out[d]) for d in sorted(out)]


def _at(when: float, text: str) -> str:
    """`text` with the absolute UTC time on hover."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
    return f'<span title="{stamp}">{html.escape(text)}</span>'


def _hm(when: float) -> str:
    return time.strftime("%H:%M", time.gmtime(when))


def _place(s: PairState) -> str:
    """` · account (provider)` for a pair whose cache lives elsewhere than the default Anthropic account."""
    if s.pair.account == "default" and s.pair.provider == "anthropic":
        return ""
    return f" · {html.escape(s.pair.account)} ({html.escape(s.pair.provider)})"


def _why(s: PairState, word: str, prices: PriceTable | None) -> str:
    """The problem column: the error, why the pair is parked, or why it does not cache."""
    if s.parked:
        return f"parked: {s.park_reason}"
    if word == "uncached":
        minimum = prices.get(s.pair.price_key).min_cacheable_tokens if prices is not None else None
        if minimum is not None and s.prefix_tokens < minimum:
            return (f"cannot cache: the prefix is {s.prefix_tokens:,} tokens, below this model's minimum of {minimum:,};"
                    " lengthen the prompt past it or drop the pair")
        return "cannot cache: caching did not activate (no cache_control breakpoint reached the model's minimum)"
    if s.mostly_uncached and not s.last_error:
        return "most of the prefix is sent uncached: move the cache_control marker to the end of the shared prefix"
    return s.last_error or ""


def _policy(s: PairState, word: str, info: PageInfo, now: float) -> str:
    """The policy column; for a pair that cannot cache, what its pings really buy: nothing, at a price."""
    if word == "uncached":
        each = "unknown" if s.spend_unknown or not s.pings else format_usd(s.spend / s.pings, 6)
        return f"pinging, but no ping can warm it: each costs {each}, all of it plain input"
    return info.policy(s.pair.key, now) if info.policy else s.pair.policy


def _money(value: float, unknown: bool = False) -> str:
    text = format_usd(value, 4)
    return f"&ge; {text}" if unknown else text


def _rate(totals: Totals) -> str:
    """Production's hit rate, marked as the shipped alerts judge it (< 60 % critical, < 85 % warning)."""
    rate = totals.hit_rate
    if rate is None:
        return "<td class=n>—</td>"
    if rate < BROKEN:
        return (f'<td class="n error" title="below {BROKEN:.0%}: the KeepwarmProductionHitRateLow alert calls this'
                f' critical">{rate:.1%} ⚠</td>')
    if rate < HEALTHY:
        return f'<td class="n uncached" title="below {HEALTHY:.0%}: not healthy yet">{rate:.1%}</td>'
    return f"<td class=n>{rate:.1%}</td>"


DRIFT_FIX = ("production sent a prefix other than the one keepwarm warms, so it pays to write its own: build the"
             " prompt with keepwarm.prefix from the same config (the daemon's log names both fingerprints)")


def _drift(t: Totals) -> str:
    if not t.drift:
        return "<td class=n>0</td>"
    return f'<td class="n error" title="{html.escape(DRIFT_FIX)}">{t.drift} ⚠</td>'


def render_headline(headline: dict[str, object] | None, now: float | None = None) -> str:
    """What the keepalive spent and saved over 24 h and 7 d, and production's hit rate per pair."""
    if headline is None:
        return ""
    now = time.time() if now is None else now
    windows = headline["windows"]
    pairs = headline["pairs"]
    since = headline["since"]
    assert isinstance(windows, dict) and isinstance(pairs, dict) and isinstance(since, float)
    cells = []
    for name, t in windows.items():
        net = t.net
        cells.append(
            f"<tr><td>last {html.escape(name)}</td><td class=n>{_money(t.keepalive_usd, t.keepalive_unknown)}</td>"
            f"<td class=n>{_money(t.saved_usd)}</td>"
            f'<td class="n {"warm" if net >= 0 else "error"}">{_money(net)}</td>'
            f"<td class=n>{t.requests}</td>{_rate(t)}</tr>"
        )
    rows = [
        f"<tr><td>{html.escape(key)}</td><td class=n>{t.requests}</td>{_rate(t)}"
        f"{_drift(t)}<td class=n>{_money(t.saved_usd)}</td></tr>"
        for key, t in pairs.items()
        if t.requests
    ]
    drifting = [key for key, t in pairs.items() if t.drift]
    fix = (f'<p class="banner"><b class=error>drift</b> in {html.escape(", ".join(drifting))}: {html.escape(DRIFT_FIX)}.</p>'
           if drifting else "")
    started = now - since < 7 * 86400
    covers = (f"Figures held in memory, since the daemon started {format_duration(round(now - since))} ago (or since"
              " the first row of its ledger): they cover only that. " if started else "")
    note = (f"<p><small>{covers}Sums are kept by clock hour, so a window starts at the top of an hour"
            " (the last 24 h are the current hour and the 23 before it).</small></p>")
    return (
        "<h2>Does the keepalive pay?</h2>"
        "<table><tr><th>window</th><th>keepalive spent</th><th>saved</th><th>net</th>"
        "<th>production requests</th><th>production hit rate</th></tr>" + "".join(cells) + "</table>" + note
        + ("<h2>Production, last 24 h</h2><table><tr><th>pair</th><th>requests</th><th>hit rate</th>"
           "<th>drift</th><th>saved</th></tr>" + "".join(rows) + "</table>" + fix if rows else
           "<p>No production observations in the last 24 h (POST them to /v1/observations).</p>")
    )


# --- pictures ------------------------------------------------------------------------------

STRIP_W, STRIP_H = 160.0, 14.0


def strip_svg(history: History, key: str, now: float, span: float = DAY) -> str:
    """A pair's last 24 h (`span`) as one bar: green warm, grey cold, ticks where it was rewritten, failed or uncached.

    Colours come from the page's style sheet (classes `s-warm`, ...): a strip is drawn for every
    pair on every refresh, so its markup is kept short.
    """
    start = now - span

    def x(when: float) -> float:
        return round((when - start) / span * STRIP_W, 1)

    spans, marks = history.strip(key, now, span)
    parts = [f'<svg class=strip viewBox="0 0 {STRIP_W:.0f} {STRIP_H:.0f}" role=img aria-label="last 24 h">']
    known = max(history.since, start)
    if known > start:
        parts.append(f'<rect class=s-none width="{x(known)}" height=14><title>no data: the daemon was not running</title></rect>')
    parts.append(f'<rect class=s-cold x="{x(known)}" width="{round(STRIP_W - x(known), 1)}" height=14><title>cold</title></rect>')
    for a, b in spans:
        parts.append(f'<rect class=s-warm x="{x(a)}" width="{max(round(x(b) - x(a), 1), 0.5)}" height=14>'
                     f"<title>warm {_hm(a)}–{_hm(b)} UTC</title></rect>")
    drawn: set[tuple[float, str]] = set()
    for at, kind in marks:
        spot = (x(at), kind)
        if spot in drawn:
            continue  # one tick per spot and kind: a day of failures is a few hundred, not thousands
        drawn.add(spot)
        parts.append(f'<rect class=s-{kind} x="{max(round(spot[0] - 0.75, 1), 0)}" width=1.5 height=14>'
                     f"<title>{kind} {_hm(at)} UTC</title></rect>")
    parts.append("</svg>")
    return "".join(parts)


def daily_svg(days: Sequence[tuple[float, Totals]]) -> str:
    """Spend against saved per UTC day, with the day's net written above its bars."""
    width, height, top, bottom = 560.0, 170.0, 22.0, 24.0
    peak = max((max(t.keepalive_usd, t.saved_usd) for _, t in days), default=0.0) or 1.0
    slot = width / max(len(days), 1)
    bar = slot * 0.3
    plot = height - top - bottom

    def h(value: float) -> float:
        return round(max(value, 0.0) / peak * plot, 1)

    parts = [f'<svg width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img"'
             ' aria-label="keepalive spend against saved per day, last 7 days">',
             f'<line x1="0" x2="{width}" y1="{top + plot}" y2="{top + plot}" stroke="#999"/>']
    for i, (day, t) in enumerate(days):
        x0 = i * slot + slot * 0.15
        spent, saved = h(t.keepalive_usd), h(t.saved_usd)
        label = time.strftime("%a %d", time.gmtime(day))
        net = t.net
        parts.append(
            f'<rect x="{x0:.1f}" y="{top + plot - spent}" width="{bar:.1f}" height="{spent}" fill="{COLOURS["spent"]}">'
            f"<title>{label}: keepalive spent {format_usd(t.keepalive_usd, 4)}</title></rect>"
            f'<rect x="{x0 + bar:.1f}" y="{top + plot - saved}" width="{bar:.1f}" height="{saved}" fill="{COLOURS["saved"]}">'
            f"<title>{label}: saved {format_usd(t.saved_usd, 4)}</title></rect>"
            f'<text x="{x0 + bar:.1f}" y="{height - 8}" text-anchor="middle">{label}</text>'
        )
        if t.keepalive_usd or t.saved_usd:
            colour = "#080" if net >= 0 else "#b00"
            parts.append(f'<text x="{x0 + bar:.1f}" y="{top + plot - max(spent, saved) - 5}" text-anchor="middle"'
                         f' style="fill:{colour};font-weight:600">net {format_usd(net, 4)}</text>')
    parts.append("</svg>")
    key = "".join(f'<span style="background:{COLOURS[c]}"></span>{w}' for c, w in (("spent", "keepalive spent"),
                                                                                   ("saved", "saved")))
    return f'<h3>Spent against saved, per UTC day</h3><p class="key"><small>{key}</small></p>' + "".join(parts)


def _strip_key(span: float) -> str:
    words = (("warm", "warm"), ("cold", "cold"), ("rewritten", "rewritten"), ("failing", "failing"),
             ("uncached", "uncached"), ("none", "no data"))
    scaled = "" if span == DAY else f" (24 h of emulated time: {format_duration(round(span))})"
    return (f'<p class="key"><small>The strips: the last 24 h{scaled}, oldest on the left:'
            + "".join(f'<span style="background:{COLOURS[c]}"></span>{w}' for c, w in words) + "</small></p>")


def render_page(
    states: list[PairState], healthy: tuple[bool, str], now: float | None = None, info: PageInfo | None = None,
    headline: str = "",
) -> str:
    """The landing page: counts by state on top, then one row per pair; the page an operator opens first."""
    now = time.time() if now is None else now
    info = info or PageInfo()
    # With the emulator's scaled time, 24 h of the pairs' time pass in minutes: the strips span that.
    span = DAY * (info.time_scale or 1.0)
    columns = 10 + (info.history is not None)
    rows = []
    counts = dict.fromkeys(STATES, 0)
    for s in sorted(states, key=lambda s: s.pair.key):
        word = cache_state(s, now)
        counts[word] += 1
        expires = _at(s.expires_at, format_duration(round(s.expires_at - now))) if s.expires_at > now else "—"
        last = _at(s.last_start, f"{format_duration(round(now - s.last_start))} ago") if s.last_start else "never"
        spend = "unknown" if s.spend_unknown else format_usd(s.spend, 6)
        nxt = _at(s.next_due, f"in {format_duration(max(round(s.next_due - now), 0))}") if s.next_due else "—"
        result = s.last_result.value if s.last_result else ("— (production keeps it warm)" if word == "warm" else "—")
        strip = f"<td>{info.history.drawn(s.pair.key, now, span)}</td>" if info.history is not None else ""
        why = _why(s, word, info.prices)
        rows.append(
            f'<tr{" class=has-why" if why else ""}>'
            # Where the cache lives: the account and provider, when not the default Anthropic one.
            f"<td>{html.escape(s.pair.expert)}<br><small>{html.escape(s.pair.model)}{_place(s)}</small></td>"
            f'<td class="{word}">{word}</td>{strip}<td class="n">{expires}</td>'
            f"<td>{html.escape(result)}</td>"
            f"<td>{last}</td><td>{nxt}</td><td class=\"n\">{s.pings}</td><td class=\"n\">{spend}</td>"
            # The whole fingerprint, shown cut short: hover shows it, a double-click copies all 64 characters.
            f'<td><code class=fp title="{s.pair.fingerprint}">{s.pair.fingerprint}</code></td>'
            f"<td>{html.escape(_policy(s, word, info, now))}</td>"
            "</tr>"
        )
        if why:
            # Its own full-width row: the only place that says why a pair is not warm must never be cut off.
            rows.append(f'<tr><td></td><td class="why" colspan={columns - 1}><b>problem:</b> {html.escape(why)}</td></tr>')
    ok, why = healthy
    # Green only when every pair is warm or on its way: a healthy scheduler with parked or
    # cold pairs still needs the operator.
    trouble = counts["cold"] + counts["error"] + counts["parked"]
    health_class = "error" if not ok else ("uncached" if trouble else "warm")
    # Zero counts in grey: a red "0 cold" would draw the eye to nothing.
    summary = " · ".join(
        f'<span class="{w if counts[w] else "pending"}">{counts[w]} {w}</span>' for w in STATES if counts[w] or w != "error"
    )
    mode = "" if info.time_scale is None else f" · <b>emulator, time ×{info.time_scale:g}</b>"
    banner = (
        ""
        if info.reload_ok
        else '<p class="banner error">The last reload was rejected: the previous config keeps running'
        " (the log says why; keepwarm_config_last_reload_successful is 0).</p>"
    )
    chart = daily_svg(info.daily(now)) if info.daily is not None else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=5>"
        f"<title>keepwarm</title><style>{_STYLE}</style></head><body>"
        f"<h1>keepwarm {html.escape(__version__)}</h1>{banner}"
        f"<p>{len(states)} pairs: {summary}{mode}</p>"
        f"<p>Scheduler: <b class=\"{health_class}\">{html.escape(why)}</b> · "
        "<a href=/metrics>/metrics</a> · <a href=/healthz>/healthz</a> · <a href=/readyz>/readyz</a></p>"
        + headline
        + chart
        + "<h2>Pairs</h2>"
        + (_strip_key(span) if info.history is not None else "")
        + "<table><tr><th>expert<br><small>model</small></th><th>state</th>"
        + ("<th>last 24 h</th>" if info.history is not None else "")
        + "<th>expires in</th><th>last result</th>"
        "<th>last ping</th><th>next ping</th><th>pings</th><th>spend</th><th>fingerprint</th><th>policy</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
