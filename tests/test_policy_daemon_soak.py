"""A short soak with `policy: adaptive` and production traffic (bench/soak.py --policy adaptive).

About two simulated hours with three outages: the policy lets some caches lapse on purpose, and
still no cache it chose to keep warm lapses outside an outage; production's own requests stay
out of the keepalive's counts.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ROOT
from test_reliability_soak import load_script

KINDS = ("overloaded_529", "connection_refused", "process_stopped")


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    soak = load_script(ROOT / "bench" / "soak.py")
    args = soak.parse_args([
        "--hours", "2", "--time-scale", "0.004", "--seed", "5", "--gap", "25", "30", "--length", "1", "3",
        "--kinds", *KINDS, "--policy", "adaptive",
    ])
    args.output = None
    return dict(soak.run(args))


def test_adaptive_soak_no_crash_no_lapse_of_a_cache_kept_warm(figures: dict[str, Any]) -> None:
    assert figures["settings"]["policy"] == "adaptive"
    assert figures["crashes"] == 0, figures["crash_details"]
    assert figures["cache_lapses_outside_outages"] == 0, figures["lapse_details"]
    assert figures["key_leaks"] == 0, figures["key_leak_places"]
    assert figures["rows_lost"] == 0


def test_adaptive_soak_pings_less_than_a_ping_every_interval(figures: dict[str, Any]) -> None:
    assert figures["production_requests"] > 50
    every_interval = figures["settings"]["pairs"] * figures["settings"]["simulated_hours"] * 3600 / (
        figures["settings"]["interval_simulated_s"])
    assert 0 < figures["requests"] < every_interval, "the policy let idle caches lapse"
