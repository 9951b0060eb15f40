"""Print docs/reliability.md: what keepwarm does under each fault, with the figures measured.

    python3 bench/soak.py                        # ~3 minutes: writes bench/results/soak.json
    python3 docs/reliability.py --run-tests      # ~1.5 minutes: adds the scenario tests' outcomes
    python3 docs/reliability.py > docs/reliability.md

The figures come from bench/results/soak.json: a seeded, simulated day of outages against the
real daemon, and (with --run-tests, which stores them in the same file under `scenario_tests`)
the outcomes of the tests that check the faults the soak cannot simulate. A test checks that
docs/reliability.md is what this prints from the committed soak.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SOAK = REPO / "bench" / "results" / "soak.json"
# `python3 bench/soak.py --policy adaptive`: the same day with the adaptive policy and production.
SOAK_ADAPTIVE = REPO / "bench" / "results" / "soak-adaptive.json"

# What keepwarm does, in the README's words, for each outage kind the soak injects.
BEHAVIOUR = {
    "rate_limit_429": ("429 with `retry-after`", "retried after `retry-after`; every pair waits behind the shared gate"),
    "overloaded_529": ("529 overloaded", "retried with exponential back-off (1 s, 2 s, 4 s…), counted `overloaded`"),
    "server_5xx": ("500 / 502 / 503", "retried with exponential back-off, counted `server`"),
    "timeout_hang": ("API hangs past `api.timeout`",
                     "the client gives up at the timeout, counted `timeout` (not `connection`), retried"),
    "connection_drop": ("connection closed without an answer", "counted `connection`, retried"),
    "malformed_body": ("200 with a truncated body", "counted `other`, retried"),
    "connection_refused": ("API port closed", "counted `connection`, retried; the next ping after it reopens re-warms"),
    "auth_401": ("401: key refused", "not retried; every pair waits one interval; the log names where the key came from"),
    "invalid_400": ("400: request rejected",
                    "logged with the API's message; the pair is parked until its config changes"
                    " (here: the prompt is edited, SIGHUP)"),
    "process_stopped": ("process frozen (SIGSTOP … SIGCONT)",
                        "one catch-up ping per pair, skipped slots counted in `keepwarm_missed_pings_total`"),
    "slow_api": ("slow answers (100 s, under the timeout)", "waits; nothing fails"),
}

LIMITS = "tests/test_reliability_limits.py::"
ELSEWHERE = [
    ("spend-cap 429 (no `retry-after`)",
     "every pair pauses 1 min, doubling to 1 h, `SPEND CAP` logged; a reload opens the gate",
     ["tests/test_reliability_faults.py::test_the_spend_cap_is_rate_limit_logged_loudly_and_not_retried",
      LIMITS + "test_the_spend_cap_pauses_every_pair_loudly"]),
    ("429 with `retry-after`, several pairs", "no pair sends until the `retry-after` has passed",
     [LIMITS + "test_a_429_with_retry_after_holds_every_pair"]),
    ("`api.requests_per_minute`", "request starts spaced to the cap, all pairs together",
     [LIMITS + "test_requests_per_minute_is_validated", LIMITS + "test_requests_per_minute_caps_the_request_rate"]),
    ("wall clock stepped back or forward", "detected against the monotonic clock; each pair's schedule is shifted",
     [LIMITS + "test_a_wall_clock_step_back_does_not_stall_the_pings",
      LIMITS + "test_a_wall_clock_step_forward_makes_no_burst"]),
    ("SIGTERM with pings in flight", "they finish and are recorded; exit 0",
     ["tests/test_reliability_signals.py::test_sigterm_lets_in_flight_pings_finish_and_records_them"]),
    ("SIGTERM with a hung ping", "in-flight pings get `shutdown_timeout`, then the process exits 0",
     ["tests/test_reliability_signals.py::test_sigterm_abandons_a_hung_ping_at_the_shutdown_deadline"]),
    ("a second SIGTERM", "exits at once (1); committed ledger rows survive",
     [LIMITS + "test_a_second_sigterm_exits_at_once_and_keeps_the_ledger"]),
    ("SIGHUP with a bad config, then a good one",
     "the bad one is rejected with the start-up messages and the old one keeps running; the good one is applied as"
     " a diff: unchanged pairs keep their cadence, a changed prompt is pinged at once, removed pairs' series go",
     ["tests/test_reliability_signals.py::test_sighup_rejects_a_bad_config_then_applies_a_good_one_as_a_diff"]),
    ("SIGSTOP for several intervals, then SIGCONT", "one catch-up ping per pair, skipped slots counted",
     ["tests/test_reliability_signals.py::test_after_sigstop_for_four_intervals_each_pair_catches_up_once"]),
    ("a corrupt or unopenable ledger at start", "runs without it, logs it as an error, counts `keepwarm_ledger_errors_total`",
     [LIMITS + "test_a_ledger_that_cannot_be_opened_does_not_stop_the_pings"]),
    ("any YAML at all as a config", "a `ConfigError` whose every problem starts with its location: exit 78, no traceback",
     ["tests/test_reliability_config_fuzz.py"]),
    ("the key, anywhere", "never printed, served or stored; at most its last four characters",
     ["tests/test_reliability_secrets.py"]),
    ("every API fault, one at a time", "counted under its `error_type`, survived, every pair warm again without a restart",
     ["tests/test_reliability_faults.py"]),
]


def run_tests() -> dict[str, Any]:
    """Run the scenario tests once; their outcome by test id (parametrized cases together)."""
    files = sorted({test.split("::")[0] for _, _, tests in ELSEWHERE for test in tests})
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *files],
                       cwd=REPO, check=False, capture_output=True)
        outcomes: dict[str, dict[str, Any]] = {}
        for case in ET.parse(xml).iter("testcase"):
            path = case.get("classname", "").replace(".", "/") + ".py"
            test = f"{path}::{case.get('name', '').split('[')[0]}"
            failure = case.find("failure")
            if failure is None:
                failure = case.find("error")
            entry = outcomes.setdefault(test, {"passed": 0, "failed": 0, "first_failure": None})
            if failure is None:
                entry["passed"] += 1
            else:
                entry["failed"] += 1
                message = (failure.get("message") or "").strip().splitlines()
                entry["first_failure"] = entry["first_failure"] or (message[0][:140] if message else "failed")
    return {"run": datetime.date.today().isoformat(), "tests": outcomes}


def _outcome(tests: list[str], scenario: dict[str, Any] | None) -> str:
    if scenario is None:
        return "not run (`--run-tests`)"
    passed = failed = 0
    whys: list[str] = []
    for test in tests:
        for name, entry in scenario["tests"].items():
            # A test id, or a whole file when no test is named.
            if name == test or ("::" not in test and name.startswith(test + "::")):
                passed += entry["passed"]
                failed += entry["failed"]
                if entry["first_failure"] and entry["first_failure"] not in whys:
                    whys.append(entry["first_failure"])
    if not passed and not failed:
        return "not run"
    if not failed:
        return f"{passed} of {passed} pass"
    why = "; ".join(whys[:3]).replace("|", "\\|").replace("`", "'")
    return f"**{failed} of {passed + failed} fail**: {why}"


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _counted(errors: dict[str, float]) -> str:
    if not errors:
        return "—"
    return ", ".join(f"{int(n)} `{kind}`" for kind, n in sorted(errors.items(), key=lambda kv: -kv[1]))


def render_adaptive(a: dict[str, Any]) -> str:
    """The section on the soak with `policy: adaptive` and production traffic."""
    s = a["settings"]
    return f"""
## With the adaptive policy and production traffic

`python3 bench/soak.py --policy adaptive` runs the same kind of day ({s["simulated_hours"]:g} simulated
hours, seed {s["seed"]}, {a["outages"]} outages of {len(a["by_kind"])} kinds) with `policy: adaptive`, while a
production driver sends each pair seeded working sessions through the emulator and reports
every request to the daemon's observations endpoint. The policy lets idle caches lapse on
purpose; a lapse here is still a *ping* that found the cache cold, which only happens when a
cache the policy chose to keep warm expired. It took {a["real_seconds"]:g} real seconds.

| over the whole run, adaptive | measured |
| --- | ---: |
| production requests | {a["production_requests"]} |
| keepalive pings sent / answered | {a["requests"]} / {a["answered"]} |
| daemon crashes | {a["crashes"]} |
| outages after which every pair the policy kept warm was warm again before the next | {a["recoveries"]} of {a["outages"]} |
| cache lapses outside outages, of caches the policy kept warm | {a["cache_lapses_outside_outages"]} |
| ledger rows lost | {a["rows_lost"]} |
| key leaks | {a["key_leaks"]} |
"""


def render(figures: dict[str, Any]) -> str:
    """The Markdown page (with the adaptive soak's section when its figures are committed)."""
    adaptive = (render_adaptive(json.loads(SOAK_ADAPTIVE.read_text(encoding="utf-8")))
                if SOAK_ADAPTIVE.exists() else "")
    s = figures["settings"]
    scale = s["time_scale"]
    rows = []
    for kind, (fault, does) in BEHAVIOUR.items():
        k = figures["by_kind"].get(kind)
        if k is None:
            rows.append(f"| {fault} | {does} | not in this run | | | |")
            continue
        seen = "—" if kind in ("connection_refused", "process_stopped") else str(k["failed_requests"])
        rows.append(
            f"| {fault} | {does} | {k['outages']} | {seen} | {_counted(k['errors_counted'])} "
            f"| {k['recovered']}/{k['outages']}, at most {_minutes(k['recovery_simulated_s_max'])} |"
        )
    shutdown = figures["shutdown"]
    leaks = figures["key_leaks"]
    catch_up = "—" if figures["catch_up_pings_max"] is None else figures["catch_up_pings_max"]
    stop_how = (f"answered pings without a row, after SIGTERM with {shutdown['pings_in_flight']} pings in flight:"
                f" exit {shutdown['exit']} in {shutdown['seconds']:g} s")
    searched = (f"places the key was found, of {figures['places_searched_for_the_key']} searched:"
                " logs, pages, ledger, report, emulator log")
    scenario = figures.get("scenario_tests")
    elsewhere = "\n".join(
        f"| {fault} | {does} | {', '.join(sorted({t.split('::')[0].removeprefix('tests/') for t in tests}))} "
        f"| {_outcome(tests, scenario)} |"
        for fault, does, tests in ELSEWHERE
    )
    run_on = f" (run {scenario['run']})" if scenario else ""
    return f"""# Reliability: what keepwarm does when things go wrong, measured

<!-- Generated by docs/reliability.py from bench/results/soak.json. Edit the script, not this text;
     rerun with: python3 bench/soak.py && python3 docs/reliability.py > docs/reliability.md -->

`bench/soak.py` runs the real daemon (`keepwarm run`, {s["pairs"]} pairs, a distinctive API key) against
the emulator for **{s["simulated_hours"]:g} simulated hours**, with every TTL and interval scaled by
{scale:g}: a 5-minute TTL lasts {300 * scale:g} s, and each pair pings every {s["interval_simulated_s"] / 60:g} simulated
minutes plus up to {s["jitter_simulated_s"]:g} s of jitter. It took {figures["real_seconds"]:g} real seconds. A seeded
schedule (seed {s["seed"]}) throws {figures["outages"]} outages of {len(figures["by_kind"])} kinds at it, each
{s["length_simulated_min"][0]:g}–{s["length_simulated_min"][1]:g} simulated minutes long and
{s["gap_simulated_min"][0]:g}–{s["gap_simulated_min"][1]:g} minutes apart.

| over the whole run | measured |
| --- | ---: |
| requests sent / answered | {figures["requests"]} / {figures["answered"]} |
| requests failed by injected faults | {figures["faults_injected"]} |
| daemon crashes | {figures["crashes"]} |
| outages after which every pair was warm again before the next | {figures["recoveries"]} of {figures["outages"]} |
| cache lapses outside outages (a cold cache with no outage since the pair's last success) | {figures["cache_lapses_outside_outages"]} |
| most pings one pair sent right after a frozen process resumed | {catch_up} |
| ledger rows lost ({stop_how}) | {figures["rows_lost"]} |
| key leaks ({searched}) | {leaks} |

## By fault

"Requests failed" is what the emulator saw fail; "counted" is what the daemon's
`keepwarm_ping_errors_total` added over the same outage (retries included), by `error_type`.
Recovery time is simulated: from the end of the outage until every pair had a warm ping. It is
long because keepwarm's retry back-off runs on real seconds (1 s, 2 s, 4 s), which this time
scale stretches to {1 / scale / 60:.0f}, {2 / scale / 60:.0f} and {4 / scale / 60:.0f} simulated minutes; against the real API the
same recoveries take seconds.

| fault | what keepwarm does | outages | requests failed | counted by keepwarm | recovered |
| --- | --- | ---: | ---: | --- | --- |
{chr(10).join(rows)}

## Checked by the tests{run_on}

Faults the soak does not simulate, and behaviours better checked one at a time. The outcome
is the tests' when these figures were taken; a failing test is an open bug, described by its
first failed assertion.

| fault | what keepwarm does | tests | outcome |
| --- | --- | --- | --- |
{elsewhere}
{adaptive}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print docs/reliability.md from bench/results/soak.json.")
    parser.add_argument("--run-tests", action="store_true",
                        help="run the scenario tests and store their outcomes in soak.json first")
    args = parser.parse_args(argv)
    figures = json.loads(SOAK.read_text(encoding="utf-8"))
    if args.run_tests:
        figures["scenario_tests"] = run_tests()
        SOAK.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        print(f"stored the scenario tests' outcomes in {SOAK.relative_to(REPO)}", file=sys.stderr)
        return 0
    sys.stdout.write(render(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
