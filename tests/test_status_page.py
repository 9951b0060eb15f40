"""The status page (issue 10 item 22): what an operator sees first must not hide trouble."""

from __future__ import annotations

from pathlib import Path

from keepwarm.classify import Result
from keepwarm.config import parse_config
from keepwarm.pricing import builtin_table
from keepwarm.runner import PairState
from keepwarm.web import PageInfo, render_page

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
    assert "184 tokens &lt; minimum 1,024" in page
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
