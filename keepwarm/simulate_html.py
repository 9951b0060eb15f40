"""`keepwarm simulate --html FILE`: the replay drawn, so a user sees why one policy beats another.

Per pair, one timeline: production's requests on top, then per policy a band that is green
while the cache is warm (a TTL from the last request or ping) and grey where it lapsed, with
the policy's pings as blue ticks and the requests that found the cache cold as red dots. The
figures beside each band are the simulation's own (the table's MISSES, PINGS and EXTRA).

One self-contained HTML file: inline SVG and CSS, no script, nothing fetched.
"""

from __future__ import annotations

import bisect
import html
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from keepwarm.pricing import format_usd

WIDTH = 1000.0  # the SVG's user units across the time axis; it scales to the page
LABEL = 230.0  # room on the left for the row names
ROW = 22.0
MAX_MARKS = 4000  # marks per row: past this, marks closer than a unit apart are drawn once

COLOURS = {"warm": "#2e9e44", "lapsed": "#d9d9d9", "ping": "#1f5fbf", "miss": "#c62828", "request": "#333"}

_STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h2{font-size:16px;margin:1.6em 0 .3em}table{border-collapse:collapse;margin:.5em 0}
td,th{padding:.2em .7em;border-bottom:1px solid #ddd;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
svg{width:100%;height:auto;display:block}svg text{font:12px system-ui,sans-serif;fill:#222}
.key span{display:inline-block;width:1em;height:.8em;margin:0 .3em 0 1em;vertical-align:middle}
.best{font-weight:600}
"""


class _Sim(Protocol):
    start: float
    until: float
    setups: list[Any]
    results: dict[str, dict[str, Any]]


def _utc(when: float, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return time.strftime(fmt, time.gmtime(when))


def lapses(touches: Sequence[float], ttl: float, start: float, end: float) -> list[tuple[float, float]]:
    """The spans of [start, end] with no touch in the TTL before: where the cache was cold."""
    out: list[tuple[float, float]] = []
    cold_from = start
    for t in sorted(touches):
        if t > cold_from:
            out.append((cold_from, min(t, end)))
        cold_from = max(cold_from, t + ttl)
        if cold_from >= end:
            break
    if cold_from < end:
        out.append((cold_from, end))
    return [(a, b) for a, b in out if b > a]


def misses(requests: Sequence[float], pings: Sequence[float], ttl: float) -> list[float]:
    """The requests that found the cache cold: no request or ping in the TTL before them."""
    touches = sorted([*requests, *pings])
    out = []
    for t in requests:
        i = bisect.bisect_left(touches, t)  # the touches strictly before t
        if i == 0 or t - touches[i - 1] >= ttl:
            out.append(t)
    return out


class _Axis:
    def __init__(self, start: float, end: float) -> None:
        self.start, self.span = start, max(end - start, 1.0)

    def x(self, when: float) -> float:
        return LABEL + (when - self.start) / self.span * (WIDTH - LABEL)


def _ticks(axis: _Axis, whens: Sequence[float], y: float, h: float, colour: str) -> str:
    # Marks on the same spot are drawn once: a month of requests stays a few thousand lines.
    xs = sorted({round(axis.x(w), 1 if len(whens) < MAX_MARKS else 0) for w in whens})
    return "".join(f'<line x1="{x}" x2="{x}" y1="{y}" y2="{y + h}" stroke="{colour}" stroke-width="1.2"/>' for x in xs)


def _time_axis(axis: _Axis, start: float, end: float, y: float) -> str:
    parts = [f'<line x1="{LABEL}" x2="{WIDTH}" y1="{y}" y2="{y}" stroke="#999"/>']
    span = end - start
    fmt = "%H:%M" if span <= 2 * 86400 else "%m-%d %H:%M"
    for i in range(6):
        t = start + span * i / 5
        x = axis.x(t)
        anchor = "start" if i == 0 else ("end" if i == 5 else "middle")
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + 4}" stroke="#999"/>'
                     f'<text x="{x:.1f}" y="{y + 16}" text-anchor="{anchor}">{_utc(t, fmt)}</text>')
    return "".join(parts)


def _merged(spans: list[tuple[float, float]], gap: float = 0.5) -> list[tuple[float, float]]:
    """Spans (in drawing units) closer than `gap` drawn as one: a month's thousands of lapses stay a few hundred shapes."""
    out: list[tuple[float, float]] = []
    for a, b in spans:
        if out and a - out[-1][1] < gap:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def pair_svg(key: str, ttl: float, start: float, end: float, requests: Sequence[float],
             pings: dict[str, list[float]], policies: Sequence[str], tallies: dict[str, Any]) -> str:
    """One pair's timeline: production's requests, then a band per policy."""
    axis = _Axis(start, end)
    rows = len(policies) + 1
    height = rows * ROW + 28
    out = [f'<svg viewBox="0 0 {WIDTH:.0f} {height:.0f}" role="img" aria-label="{html.escape(key)}: cache per policy">']
    out.append(f'<text x="0" y="{ROW * 0.7}">production ({len(requests)})</text>')
    out.append(_ticks(axis, requests, 3, ROW - 6, COLOURS["request"]))
    for i, name in enumerate(policies, start=1):
        y = i * ROW
        tally = tallies.get(name)
        label = name if tally is None else f"{name}: {tally.misses} cold, {tally.pings} pings, {format_usd(tally.extra_usd, 4)}"
        out.append(f'<text x="0" y="{y + ROW * 0.7}">{html.escape(label)}</text>')
        out.append(f'<rect x="{LABEL}" y="{y + 4}" width="{WIDTH - LABEL}" height="{ROW - 8}" fill="{COLOURS["warm"]}"/>')
        mine = pings.get(name, [])
        for x0, x1 in _merged([(axis.x(a), axis.x(b)) for a, b in lapses([*requests, *mine], ttl, start, end)]):
            out.append(f'<rect x="{x0:.1f}" y="{y + 4}" width="{max(x1 - x0, 0.5):.1f}" height="{ROW - 8}"'
                       f' fill="{COLOURS["lapsed"]}"/>')
        out.append(_ticks(axis, mine, y + 2, ROW - 4, COLOURS["ping"]))
        for x in sorted({round(axis.x(t)) for t in misses(requests, mine, ttl)}):  # one dot per unit of width
            out.append(f'<circle cx="{x}" cy="{y + ROW / 2}" r="3" fill="{COLOURS["miss"]}"/>')
    out.append(_time_axis(axis, start, end, rows * ROW + 4))
    out.append("</svg>")
    return "".join(out)


def render(sim: _Sim, requests: Iterable[Any], pings: Iterable[tuple[float, str, str, str]],
           shown: Iterable[str]) -> str:
    """The whole page: a legend, the policies' totals, and a timeline per pair."""
    policies = [p for p in sim.results if p in set(shown)]
    by_pair: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        if sim.start <= r.at <= sim.until:
            by_pair[r.key].append(r.at)
    pinged: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for at, expert, model, policy in pings:
        pinged[f"{expert}/{model}"][policy].append(at)
    longest = max((s.pair.ttl_seconds for s in sim.setups), default=0.0)
    end = sim.until + longest  # past the last request, to show how each policy lets go
    totals = []
    extras = {name: sum(t.extra_usd for t in sim.results[name].values()) for name in policies}
    online = [n for n in policies if n != "optimum"]
    best = min(online, key=lambda n: extras[n]) if online else None
    for name in policies:
        t = list(sim.results[name].values())
        totals.append(
            f'<tr class="{"best" if name == best else ""}"><td>{html.escape(name)}</td>'
            f"<td class=n>{sum(x.misses for x in t)}</td><td class=n>{sum(x.pings for x in t)}</td>"
            f"<td class=n>{format_usd(sum(x.keepalive_usd for x in t), 4)}</td>"
            f"<td class=n>{format_usd(sum(x.premiums_usd for x in t), 4)}</td>"
            f"<td class=n>{format_usd(extras[name], 4)}</td></tr>"
        )
    sections = []
    for setup in sim.setups:
        key = setup.pair.key
        tallies = {name: sim.results[name].get(key) for name in policies}
        sections.append(
            f"<h2>{html.escape(key)} <small>(TTL {html.escape(setup.pair.ttl)})</small></h2>"
            + pair_svg(key, setup.pair.ttl_seconds, sim.start, end, sorted(by_pair.get(key, [])),
                       pinged.get(key, {}), policies, tallies)
        )
    key = "".join(f'<span style="background:{COLOURS[c]}"></span>{w}' for c, w in (
        ("request", "production request"), ("warm", "cache warm"), ("lapsed", "cache lapsed"),
        ("ping", "keepalive ping"), ("miss", "request that found it cold")))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content=\"width=device-width\"><title>keepwarm simulate</title>"
        f"<style>{_STYLE}</style></head><body>"
        "<h1>keepwarm simulate</h1>"
        f"<p>Replayed {_utc(sim.start)} to {_utc(sim.until)} UTC, {sum(len(v) for v in by_pair.values())}"
        f" production requests over {len(sim.setups)} pair(s). Each band is one policy: green while the cache"
        " is warm, grey where it lapsed.</p>"
        f'<p class="key">{key}</p>'
        "<table><tr><th>policy</th><th>cold requests</th><th>pings</th><th>keepalive</th><th>write premiums</th>"
        "<th>extra (keepalive + premiums)</th></tr>" + "".join(totals) + "</table>"
        + (f"<p>Cheapest policy on this traffic: <b>{html.escape(best)}</b>"
           + (" (optimum is hindsight: what knowing every request in advance would cost)" if "optimum" in policies else "")
           + ".</p>" if best else "")
        + "".join(sections) + "</body></html>"
    )


def write_html(path: Path, sim: _Sim, requests: Iterable[Any], pings: Iterable[tuple[float, str, str, str]],
               shown: Iterable[str]) -> None:
    """Write the page to `path`."""
    path.write_text(render(sim, requests, pings, shown), encoding="utf-8")
