"""A short soak (bench/soak.py at test size), and docs/reliability.md kept in step with its script.

The full soak is 24 simulated hours and ~3 minutes; this is a little over one simulated hour
with four outages that touch most of the daemon: a closed port (the emulator restarts and
forgets every cache), a 529 storm (retries and back-off), a 400 that parks every pair until
the operator edits the prompts and reloads, and a stopped process. At time scale 0.004 a 5m
TTL is 1.2 s, and the gaps between outages (about 3 real seconds) are long enough for
keepwarm's real-time retry back-off to finish, as it always would against the real API.
(The full soak covers every kind; tests/test_reliability_faults.py covers each one alone.)
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import ROOT

KINDS = ("overloaded_529", "connection_refused", "invalid_400", "process_stopped")


def load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    soak = load_script(ROOT / "bench" / "soak.py")
    args = soak.parse_args([
        "--hours", "1.2", "--time-scale", "0.004", "--seed", "3", "--gap", "12", "14", "--length", "1", "3",
        "--kinds", *KINDS,
    ])
    args.output = None  # the committed figures are the full run's, not this one's
    return dict(soak.run(args))


def test_the_short_soak_meets_every_outage_kind_it_asked_for(figures: dict[str, Any]) -> None:
    assert set(figures["by_kind"]) == set(KINDS)
    assert figures["answered"] > 50


def test_no_crash_and_every_outage_recovered(figures: dict[str, Any]) -> None:
    assert figures["crashes"] == 0, figures["crash_details"]
    late = [o for o in figures["schedule"] if not o["recovered"]]
    assert late == [], f"outages after which some pair was not warm again before the next: {late}"


def test_no_cache_lapse_outside_an_outage(figures: dict[str, Any]) -> None:
    assert figures["cache_lapses_outside_outages"] == 0, figures["lapse_details"]


def test_one_catch_up_ping_per_pair_after_a_stop(figures: dict[str, Any]) -> None:
    assert figures["catch_up_pings_max"] is not None and figures["catch_up_pings_max"] <= 1


def test_every_failed_request_is_counted_by_the_daemon(figures: dict[str, Any]) -> None:
    assert figures["errors_counted_before_any_outage"] == {}, "nothing fails outside an outage"
    for outage in figures["schedule"]:
        if outage["kind"] in ("overloaded_529", "invalid_400"):
            assert sum(outage["errors_counted"].values()) == outage["failed_requests"], outage
        if outage["kind"] == "overloaded_529" and outage["failed_requests"]:
            assert set(outage["errors_counted"]) == {"overloaded"}, outage


def test_a_clean_stop_with_pings_in_flight_loses_no_row_and_the_key_never_leaks(figures: dict[str, Any]) -> None:
    assert figures["shutdown"]["exit"] == 0 and figures["shutdown"]["pings_in_flight"] >= 1
    assert figures["rows_lost"] == 0
    assert figures["ledger_rows"] >= figures["answered"]
    assert figures["key_leaks"] == 0, figures["key_leak_places"]
    assert figures["places_searched_for_the_key"] >= 5


def test_docs_reliability_md_is_what_docs_reliability_py_prints() -> None:
    """The page is generated from the committed figures; it cannot drift from them."""
    docs = load_script(ROOT / "docs" / "reliability.py")
    figures = json.loads((ROOT / "bench" / "results" / "soak.json").read_text(encoding="utf-8"))
    text = docs.render(figures)
    assert (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8") == text, (
        "run: python3 docs/reliability.py > docs/reliability.md"
    )
    # The committed figures are a full day's, and say what a day of faults did.
    assert figures["settings"]["simulated_hours"] >= 24 and figures["outages"] >= len(figures["by_kind"]) >= 10
