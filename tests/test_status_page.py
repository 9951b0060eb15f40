"""The status page (issue 10 item 22): what an operator sees first must not hide trouble."""

from __future__ import annotations

from pathlib import Path

from keepwarm.classify import Result
from keepwarm.config import parse_config
from keepwarm.pricing import builtin_table
from keepwarm.runner import PairState
from keepwarm.page import PageInfo, render_page

NOW = 1_796_112_000.0


def _states() -> list[PairState]:
    config = parse_config(
        {
            "defaults": {"models": ["claude-sonnet-4-6"]},
            "experts": [{"name": n, "system": [{"text": "x"}]} for n in ("a-warm", "b-parked", "c-parked", "d-short")],
        },
        Path("."),
    )
    warm, parked1, parked2, short = (PairState(pair=p, max_tokens=1) for p in config.pairs)
    warm.last_result, warm.last_start, warm.expires_at, warm.next_due = Result.WARM, NOW - 60, NOW + 240, NOW + 180
    for s in (parked1, parked2):
        s.last_result, s.last_start = Result.ERROR, NOW - 30
        s.parked, s.park_reason = True, "model: claude-sonnet-4-6 is not available"
    short.last_result, short.last_start, short.prefix_tokens = Result.UNCACHED, NOW - 10, 184
    return [warm, parked1, parked2, short]


def test_the_header_counts_states_and_is_not_green_with_parked_pairs() -> None:
    page = render_page(_states(), (True, "ok"), NOW, PageInfo(prices=builtin_table()))
    assert "4 pairs: " in page
    for count in ('<span class="warm">1 warm</span>', '<span class="pending">0 cold</span>',
                  '<span class="uncached">1 uncached</span>', '<span class="parked">2 parked</span>',
                  '<span class="pending">0 pending</span>'):
        assert count in page
    assert '<b class="warm">ok</b>' not in page, "two parked pairs are not a green ok"
    assert "Health:" not in page


def test_uncached_pairs_say_why_and_parked_ones_what_parked_them() -> None:
    page = render_page(_states(), (True, "ok"), NOW, PageInfo(prices=builtin_table()))
    assert "the prefix is 184 tokens, below this model&#x27;s minimum of 1,024" in page
    assert "parked: model: claude-sonnet-4-6 is not available" in page


def test_emulator_mode_and_a_failed_reload_are_shown() -> None:
    page = render_page(_states(), (True, "ok"), NOW, PageInfo(time_scale=0.05, reload_ok=False))
    assert "emulator, time ×0.05" in page
    assert "The last reload was rejected" in page
    plain = render_page(_states(), (True, "ok"), NOW, PageInfo())
    assert "emulator" not in plain and "reload was rejected" not in plain


def test_times_show_the_absolute_time_on_hover_and_cells_do_not_wrap() -> None:
    page = render_page(_states(), (True, "ok"), NOW)
    assert '<span title="2026-12-01 08:04:00 UTC">4m</span>' in page, "expires in 4m, at 08:04:00"
    assert '<span title="2026-12-01 07:59:00 UTC">1m ago</span>' in page
    assert "white-space:nowrap" in page


def test_a_pair_whose_prefix_is_mostly_uncached_says_so() -> None:
    # Issue 10 item 4: such a pair looks warm while most of its prompt is paid at full price.
    warm = _states()[0]
    warm.mostly_uncached = True
    page = render_page([warm], (True, "ok"), NOW, PageInfo(prices=builtin_table()))
    assert "most of the prefix is sent uncached" in page


# --- issue 23: what the page shows rather than tells -----------------------------------------

import html as _html  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import zlib  # noqa: E402


import pytest  # noqa: E402

from keepwarm.classify import Usage  # noqa: E402
from keepwarm.observations import Totals  # noqa: E402
from keepwarm.page import DAY, History, daily_svg, daily_totals, render_headline, strip_svg  # noqa: E402
from keepwarm.ping import PingAttempt, PingError  # noqa: E402
from keepwarm.policy import Source, Touch  # noqa: E402
from keepwarm.runner import PingOutcome  # noqa: E402

PRICES = builtin_table()


def _outcome(state: PairState, result_usage: Usage | None, at: float) -> PingOutcome:
    from keepwarm.classify import classify

    pair = state.pair
    error = None if result_usage is not None else PingError("overloaded", "Overloaded", 529)
    attempt = PingAttempt(started_wall=at, latency=0.3, usage=result_usage, request_id="req_x", error=error)
    cost = None if result_usage is None else PRICES.cost(pair.model, result_usage)
    expires = at + pair.ttl_seconds if result_usage is not None and (result_usage.cache_read or result_usage.cache_write) \
        else 0.0
    return PingOutcome(pair, classify(result_usage), at, 0.3, (attempt,), result_usage, cost, expires)


def test_a_pair_production_keeps_warm_is_warm_not_pending() -> None:
    # An adaptive pair skips its pings while production reads and writes the cache.
    state = _states()[0]
    state.last_result, state.last_start, state.next_due = None, 0.0, 0.0
    state.expires_at = NOW + 200  # refreshed by a production request
    page = render_page([state], (True, "ok"), NOW, PageInfo())
    assert '<span class="warm">1 warm</span>' in page and '<span class="pending">0 pending</span>' in page
    assert "production keeps it warm" in page


def test_the_whole_fingerprint_is_on_the_page_to_hover_and_copy() -> None:
    state = _states()[0]
    fp = state.pair.fingerprint
    page = render_page([state], (True, "ok"), NOW, PageInfo())
    assert f'<code class=fp title="{fp}">{fp}</code>' in page and len(fp) == 64


def test_an_uncacheable_pair_tells_one_story_why_and_what_each_ping_costs() -> None:
    short = _states()[3]
    short.pings, short.spend = 4, 4 * 0.00057
    page = render_page([short], (True, "ok"), NOW, PageInfo(prices=PRICES, policy=lambda k, now: "keeping warm: a ping every 12 s"))
    assert "keeping warm" not in page, "a pair that cannot cache is not kept warm"
    assert "no ping can warm it: each costs $0.000570, all of it plain input" in page
    assert "cannot cache: the prefix is 184 tokens, below this model&#x27;s minimum of 1,024" in page


def test_the_problem_has_a_row_of_its_own_that_no_column_can_push_off_screen() -> None:
    page = render_page(_states(), (True, "ok"), NOW, PageInfo(prices=PRICES))
    row = re.search(r'<tr><td></td><td class="why" colspan=(\d+)><b>problem:</b> parked: model', page)
    assert row, "the problem spans the table below its pair"
    header = page.split("<h2>Pairs</h2>")[1].split("</tr>")[0]
    assert int(row.group(1)) + 1 == header.count("<th>")


def _headline(rate_read: int, rate_write: int, drift: int = 0) -> dict[str, object]:
    t = Totals(keepalive_usd=0.02, saved_usd=0.01, requests=10, cache_read=rate_read, cache_write=rate_write, drift=drift)
    return {"since": NOW - 3600.0, "windows": {"24h": t, "7d": t}, "pairs": {"a/claude-sonnet-4-6": t}}


def test_a_production_hit_rate_below_60_percent_is_marked_as_the_alert_judges_it() -> None:
    broken = render_headline(_headline(599, 401), NOW)
    assert re.search(r'<td class="n error" title="below 60%[^"]*critical">59.9% ⚠</td>', broken)
    healthy = render_headline(_headline(900, 100), NOW)
    assert "<td class=n>90.0%</td>" in healthy and "⚠" not in healthy
    middle = render_headline(_headline(700, 300), NOW)
    assert '<td class="n uncached" title="below 85%: not healthy yet">70.0%</td>' in middle


def test_drift_says_what_to_do() -> None:
    page = render_headline(_headline(900, 100, drift=3), NOW)
    assert "3 ⚠" in page
    assert "build the prompt with keepwarm.prefix from the same config" in page
    assert "drift</b> in a/claude-sonnet-4-6" in page


def test_the_headline_says_what_its_windows_are_in_words() -> None:
    page = render_headline(_headline(900, 100), NOW)
    assert "whole hours" not in page
    assert "since the daemon started 1h ago (or since the first row of its ledger): they cover only that" in page
    assert "a window starts at the top of an hour" in page


# --- the pictures ------------------------------------------------------------------------------


def test_the_strip_draws_warm_spans_rewrites_failures_and_production_touches() -> None:
    warm, _, _, short = _states()
    history = History(clock=lambda: NOW - DAY / 2)  # started 12 h ago
    history.ping(_outcome(warm, Usage(input=9, cache_write_5m=2000, output=1), NOW - 3 * 3600))
    history.ping(_outcome(warm, Usage(input=9, cache_read=2000, output=1), NOW - 3 * 3600 + 240))
    history.ping(_outcome(warm, None, NOW - 3600))
    history.touches([(warm.pair.key, Touch(NOW - 1800, Source.PRODUCTION, Result.WARM, 2000))], {warm.pair.key: warm})
    history.ping(_outcome(short, Usage(input=190, output=1), NOW - 600))
    svg = strip_svg(history, warm.pair.key, NOW)
    # One merged span for the two pings (a TTL each, overlapping), one for production's read.
    spans = re.findall(r'class=s-warm [^>]*><title>warm (\d\d:\d\d)–(\d\d:\d\d) UTC', svg)
    assert spans == [("05:00", "05:09"), ("07:30", "07:35")], spans
    assert "<title>rewritten 05:00 UTC</title>" in svg and "<title>failing 07:00 UTC</title>" in svg
    assert "no data: the daemon was not running" in svg
    assert "<title>uncached 07:50 UTC</title>" in strip_svg(history, short.pair.key, NOW)
    page = render_page([warm, short], (True, "ok"), NOW, PageInfo(history=history))
    assert page.count("<svg") == 2 and "<th>last 24 h</th>" in page


def test_the_strips_memory_is_bounded() -> None:
    warm = _states()[0]
    history = History(clock=lambda: NOW - 3 * DAY)
    for i in range(5000):  # three days of a ping failing every minute, warm in between
        at = NOW - 3 * DAY + 60 * i
        history.ping(_outcome(warm, None if i % 2 else Usage(input=9, cache_read=2000, output=1), at))
    spans, marks = history.strip(warm.pair.key, NOW)
    assert len(history._warm[warm.pair.key]) <= 1 + DAY / 120 + 1
    assert len(history._marks[warm.pair.key]) <= History.MARKS
    assert all(t >= NOW - DAY for t, _ in marks)


def test_spend_against_saved_per_day_marks_the_net() -> None:
    hour = int(NOW // 3600)
    buckets = {hour: Totals(keepalive_usd=0.5, saved_usd=0.2), hour - 1: Totals(keepalive_usd=0.25),
               hour - 30: Totals(keepalive_usd=0.1, saved_usd=0.4), hour - 24 * 8: Totals(keepalive_usd=99.0)}
    days = daily_totals(buckets, NOW)
    assert len(days) == 7 and days[-1][0] == (NOW // DAY) * DAY
    assert days[-1][1].keepalive_usd == 0.75 and days[-1][1].saved_usd == 0.2
    assert sum(t.keepalive_usd for _, t in days) == pytest.approx(0.85), "the 8-day-old hour is out"
    svg = daily_svg(days)
    assert "net -$0.5500" in svg and "net $0.3000" in svg
    assert svg.count("keepalive spent $") == 7 and svg.count(": saved $") == 7


# --- in a real browser -------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is needed to look at the pages (./scripts/test installs Debian's chromium)")
    return found


def _png_size_and_ink(path: Path) -> tuple[int, int, float]:
    """Width, height and the share of pixels that are not white, from the PNG itself."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, ctype = 8, b"", 0, 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, _, ctype = struct.unpack(">IIBB", body[:10])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    channels = {2: 3, 6: 4}[ctype]
    raw = zlib.decompress(idat)
    stride = width * channels
    ink = 0
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):  # undo the PNG filters
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], (prev[i - channels] if i >= channels else 0)
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        ink += sum(1 for x in range(0, stride, channels * 4) if line[x] < 200)
        prev = line
    return width, height, ink / (width * height / 4)


def look(page: str, tmp_path: Path, name: str, width: int = 1280) -> tuple[int, str, Path]:
    """Open `page` in headless Chromium at `width`: (document width, console output, screenshot).

    The document width comes from a probe script the test adds to a copy of the page (the
    page itself has none): wider than the window means something is cut off or scrolls.
    """
    chromium = _chromium()
    probe = tmp_path / f"{name}-probe.html"
    probe.write_text(page.replace("</body>", "<script>document.title='width:'+"
                                  "document.documentElement.scrollWidth</script></body>"), encoding="utf-8")
    plain = tmp_path / f"{name}.html"
    plain.write_text(page, encoding="utf-8")
    shot = tmp_path / f"{name}.png"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={width},1400", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"<title>width:(\d+)</title>", dom.stdout)
    assert found, dom.stderr[-2000:]
    snap = subprocess.run([*common, f"--screenshot={shot}", plain.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists(), snap.stderr[-2000:]
    keep = os.environ.get("KEEPWARM_SCREENSHOTS")
    if keep:
        shutil.copy(shot, Path(keep) / shot.name)
    return int(found.group(1)), snap.stderr + dom.stderr, shot


def _console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def _busy_page() -> str:
    """A page as a daemon with trouble shows it: every state, long problems, production, the pictures."""
    states = _states()
    extra = parse_config({"defaults": {"models": ["claude-sonnet-4-6", "claude-haiku-4-5"]},
                          "experts": [{"name": f"expert-with-a-long-name-{i}", "system": [{"text": "x"}]}
                                      for i in range(6)]}, Path(".")).pairs
    history = History(clock=lambda: NOW - DAY / 3)
    for i, pair in enumerate(extra):
        s = PairState(pair=pair, max_tokens=1)
        s.last_result, s.last_start, s.expires_at, s.next_due = Result.WARM, NOW - 60, NOW + 240, NOW + 180
        s.last_error = "authentication: invalid x-api-key " * (i % 2)
        states.append(s)
        for k in range(0, int(DAY / 3), 240):
            ok = (k // 240) % 40 != i
            history.ping(_outcome(s, Usage(input=9, cache_read=2000, output=1) if ok else None, NOW - DAY / 3 + k))
    headline = render_headline(_headline(599, 401, drift=2), NOW)
    hour = int(NOW // 3600)
    buckets = {hour - 24 * d: Totals(keepalive_usd=0.3 + 0.05 * d, saved_usd=0.5 - 0.1 * d) for d in range(7)}
    info = PageInfo(prices=PRICES, history=history, daily=lambda now: daily_totals(buckets, now),
                    policy=lambda key, now: "adaptive: next ping when production's gap exceeds 3m40s (learned)")
    return render_page(states, (True, "ok"), NOW, info, headline)


def test_the_status_page_in_a_browser_renders_without_errors_and_fits_1280_px(tmp_path: Path) -> None:
    page = _busy_page()
    assert "<script" not in page and "http://" not in page.replace("http-equiv", ""), "nothing fetched, no script"
    width, log, shot = look(page, tmp_path, "status-page", 1280)
    assert width <= 1280, f"the page is {width} px wide at a 1280 px window: something is cut off"
    assert not _console_errors(log), _console_errors(log)
    w, h, ink = _png_size_and_ink(shot)
    assert (w, h) == (1280, 1400) and ink > 0.02, "the screenshot shows the page, not a blank"
    assert _html.unescape("problem:") in page


def test_the_simulate_picture_in_a_browser_renders_without_errors_and_fits_1280_px(tmp_path: Path) -> None:
    from conftest import keepwarm_cmd

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "sim.html"
    result = subprocess.run(keepwarm_cmd("simulate", "--config", str(root / "docs" / "simulate-example.yaml"),
                                         "--trace", str(root / "docs" / "simulate-example.csv"), "--html", str(out)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page and page.count("<svg") == 2
    width, log, shot = look(page, tmp_path, "simulate", 1280)
    assert width <= 1280 and not _console_errors(log), (width, _console_errors(log))
    assert _png_size_and_ink(shot)[2] > 0.02


# --- drift in the log ----------------------------------------------------------------------------


def test_drift_is_logged_once_per_pair_with_both_fingerprints_and_the_fix_then_hourly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from keepwarm.metrics import Metrics
    from keepwarm.observations import Observer

    config = parse_config({"defaults": {"models": ["claude-sonnet-4-6"]},
                           "experts": [{"name": "a", "system": [{"text": "x" * 5000}]}]}, Path("."))
    pair = config.pairs[0]
    clock = [NOW]
    observer = Observer(config, Metrics(), clock=lambda: clock[0])
    other = "f" * 64

    def post(n: int) -> None:
        items = [{"expert": "a", "model": "claude-sonnet-4-6", "at": clock[0] - 1, "fingerprint": other,
                  "usage": {"input_tokens": 9, "cache_read_input_tokens": 1500, "output_tokens": 1}} for _ in range(n)]
        assert observer.accept(items)[0] == 202

    caplog.set_level(logging.WARNING, logger="keepwarm.observations")
    post(3)
    post(2)
    lines = [r for r in caplog.records if "prefix drift" in r.getMessage()]
    assert len(lines) == 1, "one WARNING, not one per request"
    fields = lines[0].keepwarm_fields  # type: ignore[attr-defined]
    assert fields["warmed"] == pair.fingerprint and fields["production"] == other
    assert "keepwarm.prefix" in fields["fix"] and fields["expert"] == "a" and fields["drifting_requests"] == 1
    clock[0] += 3601
    post(1)
    lines = [r for r in caplog.records if "prefix drift" in r.getMessage()]
    assert len(lines) == 2 and lines[1].keepwarm_fields["drifting_requests"] == 5  # type: ignore[attr-defined]




def test_a_strip_is_redrawn_when_a_pixel_of_time_passed_or_something_happened() -> None:
    warm = _states()[0]
    history = History(clock=lambda: NOW - DAY)
    history.ping(_outcome(warm, Usage(input=9, cache_read=2000, output=1), NOW - 600))
    first = history.drawn(warm.pair.key, NOW)
    assert history.drawn(warm.pair.key, NOW + 60) is first, "a minute is a fraction of a pixel: the same drawing"
    history.ping(_outcome(warm, None, NOW + 100))  # a failure is a mark: drawn at once
    assert "<title>failing" in history.drawn(warm.pair.key, NOW + 120)
    assert history.drawn(warm.pair.key, NOW + 120 + DAY / 160) != history.drawn(warm.pair.key, NOW + 120)


def test_a_month_of_traffic_draws_in_bounded_markup() -> None:
    from keepwarm.simulate_html import WIDTH, lapses, misses, pair_svg

    ttl, start = 300.0, 1_772_442_000.0
    requests = [start + 400 * i for i in range(30 * 86400 // 400)]  # every 400 s for a month: all lapse
    assert len(lapses(requests, ttl, start, requests[-1])) == len(requests) - 1
    assert len(misses(requests, [], ttl)) == len(requests)
    svg = pair_svg("a/m", ttl, start, requests[-1] + ttl, requests, {"none": []}, ["none"], {})
    assert svg.count("<circle") <= WIDTH and svg.count("<rect") <= WIDTH + 1
    assert len(svg) < 200_000, len(svg)


def test_a_pair_whose_cache_lives_elsewhere_says_where() -> None:
    """An account other than the default Anthropic one is named beside the model."""
    from dataclasses import replace

    states = _states()
    states[0].pair = replace(states[0].pair, account="eu-west", provider="bedrock")
    page = render_page(states, (True, "ok"), NOW, PageInfo(prices=builtin_table()))
    assert "claude-sonnet-4-6 · eu-west (bedrock)" in page
    assert page.count("(anthropic)") == 0, "the default account is not repeated on every row"
