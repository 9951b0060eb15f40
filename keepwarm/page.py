"""The status page at `/`: pure rendering from the pairs' states and the observations' headline.

Kept apart from `keepwarm.web` (the HTTP server) so the page can change without touching the server.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import dataclass

from keepwarm import __version__
from keepwarm.durations import format_duration
from keepwarm.observations import Totals
from keepwarm.pricing import PriceTable, format_usd
from keepwarm.runner import PairState


def cache_state(state: PairState, now: float) -> str:
    """A word for the page: warm, cold, uncached, error, parked or pending."""
    if state.parked:
        return "parked"
    if state.last_result is None:
        return "pending"
    if state.last_result.value == "uncached":
        return "uncached"
    if state.expires_at > now:
        return "warm"
    return "error" if state.last_result.value == "error" else "cold"


_STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.why{white-space:normal;min-width:16em}
.warm{color:#080;font-weight:600}.cold,.error,.parked{color:#b00;font-weight:600}
.uncached{color:#a60;font-weight:600}.pending{color:#666}code{font-size:12px}
.banner{background:#fee;border:1px solid #b00;padding:.5em 1em}span[title]{border-bottom:1px dotted #999}
"""
STATES = ("warm", "cold", "uncached", "error", "parked", "pending")  # the order of the header's counts


@dataclass(frozen=True)
class PageInfo:
    """What the status page shows beyond the pairs' states."""

    time_scale: float | None = None  # the emulator's (or a scaled run's) time factor; None: real time
    reload_ok: bool = True  # False after a rejected SIGHUP reload
    prices: PriceTable | None = None  # for the minimum behind an `uncached`
    policy: Callable[[str, float], str] | None = None  # a pair's policy in words (Scheduler.describe)


def _at(when: float, text: str) -> str:
    """`text` with the absolute UTC time on hover."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))
    return f'<span title="{stamp}">{html.escape(text)}</span>'


def _why(s: PairState, word: str, prices: PriceTable | None) -> str:
    """The problem column: the error, why the pair is parked, or why it does not cache."""
    if s.parked:
        return f"parked: {s.park_reason}"
    if word == "uncached":
        minimum = prices.get(s.pair.model).min_cacheable_tokens if prices is not None else None
        if minimum is not None and s.prefix_tokens < minimum:
            return f"{s.prefix_tokens:,} tokens < minimum {minimum:,}"
        return "caching did not activate (no breakpoint reached the model's minimum)"
    if s.mostly_uncached and not s.last_error:
        return "most of the prefix is sent uncached: move the cache_control marker to the end of the shared prefix"
    return s.last_error or ""


def _money(value: float, unknown: bool = False) -> str:
    text = f"${value:,.4f}" if value >= 0 else f"-${-value:,.4f}"
    return f"&ge; {text}" if unknown else text


def _rate(totals: Totals) -> str:
    rate = totals.hit_rate
    return "—" if rate is None else f"{rate:.1%}"


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
            f"<td class=n>{t.requests}</td><td class=n>{_rate(t)}</td></tr>"
        )
    rows = [
        f"<tr><td>{html.escape(key)}</td><td class=n>{t.requests}</td><td class=n>{_rate(t)}</td>"
        f'<td class="n{" error" if t.drift else ""}">{t.drift}</td><td class=n>{_money(t.saved_usd)}</td></tr>'
        for key, t in pairs.items()
        if t.requests
    ]
    covers = f"since the daemon started {format_duration(round(now - since))} ago" if now - since < 7 * 86400 else ""
    note = f"<p><small>Figures held in memory, {covers}; whole hours.</small></p>" if covers else ""
    return (
        "<h2>Does the keepalive pay?</h2>"
        "<table><tr><th>window</th><th>keepalive spent</th><th>saved</th><th>net</th>"
        "<th>production requests</th><th>production hit rate</th></tr>" + "".join(cells) + "</table>" + note
        + ("<h2>Production, last 24 h</h2><table><tr><th>pair</th><th>requests</th><th>hit rate</th>"
           "<th>drift</th><th>saved</th></tr>" + "".join(rows) + "</table>" if rows else
           "<p>No production observations in the last 24 h (POST them to /v1/observations).</p>")
    )


def render_page(
    states: list[PairState], healthy: tuple[bool, str], now: float | None = None, info: PageInfo | None = None,
    headline: str = "",
) -> str:
    """The landing page: counts by state on top, then one row per pair; the page an operator opens first."""
    now = time.time() if now is None else now
    info = info or PageInfo()
    rows = []
    counts = dict.fromkeys(STATES, 0)
    for s in sorted(states, key=lambda s: s.pair.key):
        word = cache_state(s, now)
        counts[word] += 1
        expires = _at(s.expires_at, format_duration(round(s.expires_at - now))) if s.expires_at > now else "—"
        last = _at(s.last_start, f"{format_duration(round(now - s.last_start))} ago") if s.last_start else "never"
        spend = "unknown" if s.spend_unknown else format_usd(s.spend, 6)
        nxt = _at(s.next_due, f"in {format_duration(max(round(s.next_due - now), 0))}") if s.next_due else "—"
        rows.append(
            "<tr>"
            f"<td>{html.escape(s.pair.expert)}</td><td>{html.escape(s.pair.model)}</td>"
            f'<td class="{word}">{word}</td><td class="n">{expires}</td>'
            f"<td>{html.escape(s.last_result.value if s.last_result else '—')}</td>"
            f"<td>{last}</td><td>{nxt}</td><td class=\"n\">{s.pings}</td><td class=\"n\">{spend}</td>"
            f"<td><code>{s.pair.fingerprint[:12]}</code></td>"
            f"<td>{html.escape(info.policy(s.pair.key, now) if info.policy else s.pair.policy)}</td>"
            f'<td class="why">{html.escape(_why(s, word, info.prices))}</td>'
            "</tr>"
        )
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
    return (
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>"
        f"<title>keepwarm</title><style>{_STYLE}</style></head><body>"
        f"<h1>keepwarm {html.escape(__version__)}</h1>{banner}"
        f"<p>{len(states)} pairs: {summary}{mode}</p>"
        f"<p>Scheduler: <b class=\"{health_class}\">{html.escape(why)}</b> · "
        "<a href=/metrics>/metrics</a> · <a href=/healthz>/healthz</a> · <a href=/readyz>/readyz</a></p>"
        + headline
        + "<h2>Pairs</h2>"
        "<table><tr><th>expert</th><th>model</th><th>state</th><th>expires in</th><th>last result</th>"
        "<th>last ping</th><th>next ping</th><th>pings</th><th>spend</th><th>fingerprint</th><th>policy</th><th>problem</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
