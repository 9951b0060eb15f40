"""`keepwarm report` and the TTL advisor: figures from a real ledger, checked by hand arithmetic."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from keepwarm.advisor import prefix_cost_per_day, ttl_advice, usd
from keepwarm.classify import Usage, classify
from keepwarm.config import Pair, parse_config
from keepwarm.ping import PingAttempt, PingError
from keepwarm.pricing import MILLION, PriceTable, builtin_table
from keepwarm.report import TOTAL, build_report, pair_report, render_json, render_table, run_report
from keepwarm.runner import PingOutcome
from keepwarm.store import Ledger, LedgerRow, read_ledger

ROOT = Path(__file__).resolve().parent.parent
PRICES = builtin_table()
PROMPT = "You are the chief economist. Answer with numbers and sources. " * 50
T0 = 1_790_000_000.0
DAY = 86400.0
SONNET_IN = 3 / MILLION  # claude-sonnet-4-6 input, USD per token, per the shipped table


def make_pairs() -> dict[str, Pair]:
    config = parse_config(
        {
            "experts": [
                {"name": "economist", "system": [{"text": PROMPT}], "models": ["claude-sonnet-4-6", "claude-unpriced-9"]},
                {"name": "historian", "system": [{"text": PROMPT}], "models": ["claude-sonnet-4-6"], "ttl": "1h"},
            ]
        },
        Path("."),
    )
    return {p.key: p for p in config.pairs}


PAIRS = make_pairs()
ECON = PAIRS["economist/claude-sonnet-4-6"]
UNPRICED = PAIRS["economist/claude-unpriced-9"]
HIST_1H = PAIRS["historian/claude-sonnet-4-6"]


def outcome(pair: Pair, usage: Usage | None, started: float) -> PingOutcome:
    error = None if usage is not None else PingError("overloaded", "Overloaded", 529)
    attempt = PingAttempt(started_wall=started, latency=0.3, usage=usage, request_id="req_x", error=error)
    cost = None if usage is None else PRICES.cost(pair.model, usage)
    return PingOutcome(pair, classify(usage), started, 0.3, (attempt,), usage, cost, started + pair.ttl_seconds)


def ledger_rows(path: Path, outcomes: list[PingOutcome]) -> list[LedgerRow]:
    with Ledger(path) as ledger:
        for o in outcomes:
            ledger.record(o)
        return ledger.rows()


def day_of_pings() -> list[PingOutcome]:
    """24 hours of a 5m pair (mostly warm, some misses and errors), a 1h pair and an unpriced one."""
    out = []
    for i in range(360):
        t = T0 + 240 * i
        if i % 97 == 0:
            usage: Usage | None = Usage(input=9, cache_write_5m=1731 + i, output=1)  # rewarmed
        elif i % 101 == 0:
            usage = Usage(input=9, cache_read=1200, cache_write_5m=531 + i, output=1)  # partial
        elif i % 89 == 0:
            usage = None  # failed
        else:
            usage = Usage(input=9, cache_read=1731 + i % 7, output=1)
        out.append(outcome(ECON, usage, t))
    for i in range(26):
        usage = Usage(input=9, cache_write_1h=1731, output=1) if i == 0 else Usage(input=9, cache_read=1731, output=1)
        out.append(outcome(HIST_1H, usage, T0 + 3300 * i))
    for i in range(10):
        out.append(outcome(UNPRICED, Usage(input=9, cache_read=1731, output=1), T0 + 240 * i))
    return out


@pytest.fixture(scope="module")
def day_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "ledger.db"
    ledger_rows(path, day_of_pings())
    return path


def report_of(path: Path, fmt: str, since: float | None = DAY, now: float = T0 + DAY) -> str:
    out = io.StringIO()
    assert run_report(path, PRICES, since, fmt, out, now=now) == 0
    return out.getvalue()


def raw_costs(path: Path, expert: str | None = None, model: str | None = None) -> list[float]:
    """Every cost cell of the ledger, read with plain SQL rather than through keepwarm."""
    query = "SELECT cost_input, cost_cache_read, cost_cache_write_5m, cost_cache_write_1h, cost_output FROM pings"
    with sqlite3.connect(path) as db:
        rows = db.execute(query + " WHERE expert = ? AND model = ?", (expert, model)).fetchall() if expert else \
            db.execute(query).fetchall()
    return [c for row in rows for c in row if c is not None]


# --- the figures ---------------------------------------------------------------------------


def test_hit_rate_is_read_over_read_plus_write(tmp_path: Path) -> None:
    rows = ledger_rows(tmp_path / "l.db", [
        outcome(ECON, Usage(input=9, cache_write_5m=2000, output=1), T0),
        outcome(ECON, Usage(input=9, cache_read=2000, output=1), T0 + 240),
        outcome(ECON, Usage(input=9, cache_read=2000, output=1), T0 + 480),
        outcome(ECON, Usage(input=9, cache_read=2000, output=1), T0 + 720),
        outcome(ECON, None, T0 + 960),
    ])
    report = pair_report(rows, PRICES, now=T0 + 960)
    assert report.hit_rate == 6000 / 8000
    assert report.pings == {"warm": 3, "rewarmed": 1, "partial": 0, "uncached": 0, "error": 1}


def test_hit_rate_is_none_without_any_cached_token(tmp_path: Path) -> None:
    rows = ledger_rows(tmp_path / "l.db", [
        outcome(ECON, Usage(input=900, output=1), T0),
        outcome(ECON, None, T0 + 240),
    ])
    report = pair_report(rows, PRICES, now=T0 + 240)
    assert report.hit_rate is None
    # It cannot cache: the penalty is priced on what it sent (what caching would save a
    # request once it caches), never a break-even, since no keepalive of it pays.
    assert report.cannot_cache and report.break_even is None
    assert report.miss_penalty == pytest.approx(PRICES.miss_penalty("claude-sonnet-4-6", 900, "5m"))


def test_spend_per_day_over_the_since_window(day_ledger: Path) -> None:
    report = build_report(read_ledger(day_ledger), PRICES, since_seconds=DAY, now=T0 + DAY)
    econ = next(p for p in report.pairs if p.model == "claude-sonnet-4-6" and p.expert == "economist")
    assert econ.spend == math.fsum(raw_costs(day_ledger, "economist", "claude-sonnet-4-6"))
    assert econ.window_seconds == DAY
    assert econ.spend_per_day == pytest.approx(econ.spend)  # a full day of pings is a day's spend
    assert sum(econ.pings.values()) == 360
    assert econ.pings["error"] == 4 and econ.pings["rewarmed"] == 4 and econ.pings["partial"] == 3


def test_window_without_since_is_the_span_of_the_rows(tmp_path: Path) -> None:
    rows = ledger_rows(tmp_path / "l.db", [outcome(ECON, Usage(input=9, cache_read=2000, output=1), T0 + 240 * i)
                                           for i in range(31)])  # 30 intervals: two hours
    report = pair_report(rows, PRICES, now=T0 + 10 * DAY)
    spend = math.fsum(c for r in rows for c in (r.costs or {}).values())
    assert report.window_seconds == 7200
    assert report.spend_per_day == pytest.approx(spend * 12)


def test_the_window_never_starts_before_the_pairs_first_row(tmp_path: Path) -> None:
    rows = ledger_rows(tmp_path / "l.db", [outcome(ECON, Usage(input=9, cache_read=2000, output=1), T0 + 240 * i)
                                           for i in range(15)])  # an hour old pair
    report = pair_report(rows, PRICES, now=T0 + 3600, since_seconds=DAY)
    assert report.window_seconds == 3600
    assert report.spend_per_day == pytest.approx(report.spend * 24)


def test_no_per_day_figure_is_scaled_from_minutes(tmp_path: Path) -> None:
    # One `once`: a single cold write, ten minutes old. Scaled to a day it read $2,974.
    rows = ledger_rows(tmp_path / "l.db", [outcome(ECON, Usage(input=9, cache_write_5m=200_000, output=1), T0)])
    young = build_report(rows, PRICES, since_seconds=DAY, now=T0 + 600)
    econ = young.pairs[0]
    assert econ.spend > 0 and econ.spend_per_day is None and econ.break_even is None and econ.per_day_refused
    table = render_table(young)
    row = next(line for line in table.splitlines() if line.startswith("economist"))
    assert "n/a (10m covered)" in row and "misses/day" not in row
    assert "no per-day figures below 1h of history" in table and "economist/claude-sonnet-4-6 (10m)" in table
    doc = json.loads(render_json(young, PRICES))
    assert doc["pairs"][0]["spend_per_day_usd"] is None and doc["pairs"][0]["window_seconds"] == 600
    assert doc["total"]["spend_per_day_usd"] is None


def test_a_pair_older_than_the_window_is_judged_on_the_whole_window(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    rows = ledger_rows(path, [outcome(HIST_1H, Usage(input=9, cache_read=2000, output=1), T0 - DAY + 3300 * i)
                              for i in range(53)])  # two days of pings
    now = T0 + DAY - 1000  # the window's first ping comes up to an interval after its start
    in_window = math.fsum(c for r in rows if r.time >= now - DAY for c in (r.costs or {}).values())
    doc = json.loads(report_of(path, "json", since=DAY, now=now))
    (pair,) = doc["pairs"]
    assert pair["window_seconds"] == DAY and pair["spend_usd"] == in_window
    assert pair["spend_per_day_usd"] == in_window / DAY * 86400
    assert build_report(rows, PRICES, since_seconds=DAY, now=now).pairs[0].window_seconds == DAY


def test_break_even_uses_the_latest_prefix_and_the_miss_penalty(tmp_path: Path) -> None:
    rows = ledger_rows(tmp_path / "l.db", [
        outcome(ECON, Usage(input=9, cache_read=1500, output=1), T0),
        outcome(ECON, Usage(input=9, cache_read=1800, cache_write_5m=200, output=1), T0 + 240),  # the prompt grew
        outcome(ECON, None, T0 + 480),
        outcome(ECON, Usage(input=900, output=1), T0 + 720),  # uncached: no prefix figure in it
    ])
    report = pair_report(rows, PRICES, now=T0 + DAY, since_seconds=DAY)
    assert report.prefix_tokens == 2000
    penalty = 2000 * SONNET_IN * (1.25 - 0.1)
    assert report.miss_penalty == pytest.approx(penalty)
    assert report.spend_per_day == pytest.approx(report.spend)
    assert report.break_even == pytest.approx(report.spend / penalty)


def test_failed_pings_cost_nothing_and_are_not_unknown(tmp_path: Path) -> None:
    rows = ledger_rows(tmp_path / "l.db", [outcome(ECON, None, T0), outcome(ECON, None, T0 + 240)])
    report = pair_report(rows, PRICES, now=T0 + 3600, since_seconds=3600)
    assert report.spend == 0 and not report.spend_unknown and report.spend_per_day == 0


def test_an_unpriced_model_makes_spend_unknown_not_zero(day_ledger: Path) -> None:
    report = build_report(read_ledger(day_ledger), PRICES, since_seconds=DAY, now=T0 + DAY)
    unpriced = next(p for p in report.pairs if p.model == "claude-unpriced-9")
    assert unpriced.spend_unknown
    assert unpriced.spend_per_day is None and unpriced.miss_penalty is None and unpriced.break_even is None
    assert report.total.spend_unknown and report.total.spend_per_day is None
    table = render_table(report)
    line = next(row for row in table.splitlines() if "claude-unpriced-9" in row)
    assert "unknown" in line and "$0.0000" not in line


# --- the formats ---------------------------------------------------------------------------


def test_csv_money_is_full_precision_and_sums_the_ledger_exactly(day_ledger: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(report_of(day_ledger, "csv"))))
    assert [r["expert"] for r in rows] == ["economist", "economist", "historian", TOTAL]
    for row in rows[:-1]:
        expected = math.fsum(raw_costs(day_ledger, row["expert"], row["model"]))
        assert float(row["spend_known_usd"]) == expected  # exactly: not rounded on the way out
        assert round(float(row["spend_known_usd"]), 2) == round(expected, 2)
        if row["spend_unknown"] == "false":
            assert float(row["spend_usd"]) == expected
    unpriced = rows[1]
    assert unpriced["model"] == "claude-unpriced-9" and unpriced["spend_usd"] == ""  # unknown, not 0
    total = rows[-1]
    assert float(total["spend_known_usd"]) == math.fsum(raw_costs(day_ledger))
    assert total["spend_unknown"] == "true" and total["spend_usd"] == "" and total["spend_per_day_usd"] == ""
    econ = rows[0]
    assert int(econ["pings"]) == 360 and int(econ["warm"]) == 349
    assert float(econ["hit_rate"]) == int(econ["cache_read_tokens"]) / (
        int(econ["cache_read_tokens"]) + int(econ["cache_write_tokens"]))


def test_json_money_is_full_precision_and_sums_the_ledger_exactly(day_ledger: Path) -> None:
    doc = json.loads(report_of(day_ledger, "json"))
    for pair in doc["pairs"]:
        assert pair["spend_known_usd"] == math.fsum(raw_costs(day_ledger, pair["expert"], pair["model"]))
        assert pair["spend_usd"] == (None if pair["spend_unknown"] else pair["spend_known_usd"])
    assert doc["total"]["spend_known_usd"] == math.fsum(raw_costs(day_ledger))
    assert doc["total"]["spend_usd"] is None  # one pair has no price
    hist = next(p for p in doc["pairs"] if p["expert"] == "historian")
    assert hist["ttl"] == "1h" and hist["hit_rate"] == 25 / 26
    assert hist["break_even_misses_per_day"] == hist["spend_per_day_usd"] / hist["miss_penalty_usd"]
    by_kind = math.fsum(hist[f"spend_{k}_usd"] for k in ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output"))
    assert by_kind == pytest.approx(hist["spend_usd"])


def test_table_is_rounded_for_people(day_ledger: Path) -> None:
    table = report_of(day_ledger, "table")
    lines = table.splitlines()
    assert lines[0].startswith("window: last 24h")
    assert lines[1].split()[:3] == ["EXPERT", "MODEL", "PINGS"]
    econ = next(line for line in lines if line.startswith("economist") and "sonnet" in line)
    assert "97.2%" in econ or "%" in econ
    assert "misses/day" in econ
    assert any(line.startswith(TOTAL) for line in lines)
    assert all(len(cell.split(".")[-1]) <= 6 for cell in econ.split() if cell.startswith("$"))


def test_empty_window_reports_no_pings(day_ledger: Path) -> None:
    assert "no pings and no production requests in the window" in report_of(day_ledger, "table", since=60, now=T0 + 10 * DAY)
    doc = json.loads(report_of(day_ledger, "json", since=60, now=T0 + 10 * DAY))
    assert doc["pairs"] == [] and doc["total"]["spend_usd"] == 0


@pytest.mark.parametrize("content", [None, b"garbage, not sqlite\n" * 50])
def test_an_unusable_ledger_exits_78_naming_the_path(tmp_path: Path, content: bytes | None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.db"
    if content is not None:
        path.write_bytes(content)
    assert run_report(path, PRICES, DAY, "table", io.StringIO()) == 78
    assert str(path) in capsys.readouterr().err
    assert content is not None or not path.exists()


# --- 1h writes cost 2x input, wherever they are priced --------------------------------------


def test_one_hour_writes_cost_twice_input_in_every_path(tmp_path: Path) -> None:
    prefix = 2000
    write_1h = prefix * SONNET_IN * 2
    usage = Usage(input=9, cache_write_1h=prefix, output=1)
    cost = PRICES.cost("claude-sonnet-4-6", usage)
    assert cost is not None and cost["cache_write_1h"] == pytest.approx(write_1h)
    (row,) = ledger_rows(tmp_path / "l.db", [outcome(HIST_1H, usage, T0)])
    assert row.cost_cache_write_1h == pytest.approx(write_1h)
    report = pair_report([row], PRICES, now=T0 + 60, since_seconds=60)
    assert report.miss_penalty == pytest.approx(write_1h - prefix * SONNET_IN * 0.1)
    advice = ttl_advice(PRICES, "claude-sonnet-4-6", prefix, 9)
    assert advice.miss_penalty_1h == pytest.approx(write_1h - prefix * SONNET_IN * 0.1)
    assert advice.miss_penalty_5m == pytest.approx(prefix * SONNET_IN * (1.25 - 0.1))


# --- the TTL advisor -----------------------------------------------------------------------


def test_advisor_daily_costs_by_hand() -> None:
    advice = ttl_advice(PRICES, "claude-sonnet-4-6", 5000, 9, interval_5m=240, interval_1h=3300)
    ping = 5000 * SONNET_IN * 0.1 + 9 * SONNET_IN + 1 * 15 / MILLION
    penalty_5m = 5000 * SONNET_IN * (1.25 - 0.1)
    daily_5m = 360 * ping + penalty_5m
    daily_1h = 86400 / 3300 * ping + 5000 * SONNET_IN * (2 - 0.1)
    assert advice.ping_cost == pytest.approx(ping)
    assert advice.daily_5m == pytest.approx(daily_5m)
    assert advice.daily_1h == pytest.approx(daily_1h)
    # Break-even is the pair's own keepalive (its TTL, 5m by default) over its own miss penalty.
    assert advice.break_even_cold_per_day == pytest.approx(daily_5m / penalty_5m)
    one_hour = ttl_advice(PRICES, "claude-sonnet-4-6", 5000, 9, interval_5m=240, interval_1h=3300, ttl="1h")
    assert one_hour.break_even_cold_per_day == pytest.approx(daily_1h / (5000 * SONNET_IN * (2 - 0.1)))
    assert advice.daily_none is None and advice.recommended == "1h"
    assert advice.miss_penalty_5m is not None
    assert advice.lines[1] == (
        f"5m keepalive: 360 pings/day × {usd(ping)} = {usd(360 * ping)}/day,"
        f" + 1 cold start/day × {usd(advice.miss_penalty_5m)} (a write at 1.25× input instead of a read)"
        f" = {usd(daily_5m)}/day"
    )
    assert advice.lines[-1] == "recommended: 1h keepalive"


def test_advisor_recommends_none_when_few_requests_would_be_cold() -> None:
    few = ttl_advice(PRICES, "claude-sonnet-4-6", 5000, 9, cold_requests_per_day=1)
    assert few.daily_none == pytest.approx(5000 * SONNET_IN * 1.15)
    assert few.recommended == "none"
    many = ttl_advice(PRICES, "claude-sonnet-4-6", 5000, 9, cold_requests_per_day=50)
    assert many.recommended == "1h"


def test_advisor_prefers_5m_when_the_cache_is_rewritten_all_day() -> None:
    advice = ttl_advice(PRICES, "claude-sonnet-4-6", 5000, 9, cold_starts_per_day=200)
    assert advice.daily_5m is not None and advice.daily_1h is not None
    assert advice.daily_5m < advice.daily_1h and advice.recommended == "5m"


def test_advisor_with_an_unknown_price() -> None:
    advice = ttl_advice(PRICES, "claude-unpriced-9", 5000, 9, cold_requests_per_day=100)
    assert advice.recommended == "unknown (no price for claude-unpriced-9)"
    assert (advice.ping_cost, advice.daily_5m, advice.daily_1h, advice.daily_none,
            advice.miss_penalty_5m, advice.break_even_cold_per_day) == (None,) * 6


def test_advisor_below_the_minimum_recommends_nothing() -> None:
    advice = ttl_advice(PRICES, "claude-haiku-4-5", 2000, 9, cold_requests_per_day=1000)
    assert advice.recommended == "none"
    assert any("below claude-haiku-4-5's minimum of 4,096" in line for line in advice.lines)


# --- the seed's worked example -------------------------------------------------------------


def test_the_seeds_worked_example() -> None:
    model, prompt, calls = "claude-sonnet-4-6", 2000, 400
    assert PRICES.get(model).input == 3.0  # the seed's $3 per million
    daily = prefix_cost_per_day(PRICES, model, prompt, calls)
    assert daily is not None
    assert daily.uncached == pytest.approx(2.40)  # 400 × 2000 × $3/M
    assert daily.cached == pytest.approx(0.24)  # read at 0.1×
    assert usd(daily.uncached) == "$2.40" and usd(daily.cached) == "$0.24"
    advice = ttl_advice(PRICES, model, prompt, 8)
    assert advice.pings_per_day_5m == 360
    assert advice.pings_per_day_1h == pytest.approx(26.2, abs=0.05)
    ping = 2000 * SONNET_IN * 0.1 + 8 * SONNET_IN + 15 / MILLION
    assert advice.ping_cost == pytest.approx(ping)
    assert advice.daily_5m == pytest.approx(360 * ping + 2000 * SONNET_IN * 1.15)  # $0.237
    assert advice.daily_1h == pytest.approx(86400 / 3300 * ping + 2000 * SONNET_IN * 1.9)  # $0.0281
    assert usd(advice.daily_5m or 0) == "$0.237" and usd(advice.daily_1h or 0) == "$0.0281"


def test_docs_pays_md_is_what_docs_pays_py_prints() -> None:
    spec = importlib.util.spec_from_file_location("pays", ROOT / "docs" / "pays.py")
    assert spec is not None and spec.loader is not None
    pays = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pays)
    text = pays.render()
    assert (ROOT / "docs" / "pays.md").read_text(encoding="utf-8") == text, "run: python3 docs/pays.py > docs/pays.md"
    assert "$2.40" in text and "$0.24" in text and "360 pings" in text and "26.2 pings" in text


# --- issue 10: items 15, 17 ------------------------------------------------------------------


def _as_a_user_who_cannot_write(task: Callable[[], str]) -> str:
    """Run `task` as a user without write access: `nobody` in a forked child when we are root."""
    import os

    if os.geteuid() != 0:
        return task()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run the already-imported code, report, leave
        try:
            os.setgid(65534)
            os.setuid(65534)
            out = task()
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            out = f"{type(exc).__name__}: {exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        data = pipe.read().decode()
    os.waitpid(pid, 0)
    return data


def test_report_reads_a_ledger_its_user_cannot_write(day_ledger: Path) -> None:
    """Item 17: a read-only user reports on a stopped daemon's ledger (no -wal, no -shm it may create)."""
    import shutil
    import tempfile

    place = Path(tempfile.mkdtemp(prefix="keepwarm-ro-"))
    try:
        ledger = place / "ledger.db"
        shutil.copy(day_ledger, ledger)
        assert not Path(f"{ledger}-wal").exists(), "a stopped daemon leaves no -wal"
        ledger.chmod(0o444)
        place.chmod(0o555)

        def report() -> str:
            out = io.StringIO()
            code = run_report(ledger, PRICES, None, "json", out)
            return f"exit {code}: {out.getvalue()}"

        answer = _as_a_user_who_cannot_write(report)
        assert answer.startswith("exit 0: "), answer
        assert json.loads(answer.removeprefix("exit 0: "))["total"]["pings"] == len(day_of_pings())
        assert sorted(p.name for p in place.iterdir()) == ["ledger.db"], "the report wrote nothing beside it"
    finally:
        place.chmod(0o755)
        shutil.rmtree(place)


def test_report_into_a_closed_pipe_exits_quietly(day_ledger: Path) -> None:
    """Item 15: `keepwarm report --format csv | head -1` must not end in a BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "keepwarm", "report", "--ledger", str(day_ledger), "--since", "all", "--format", "csv"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert err == "", err


# --- production without pings (an adaptive pair production keeps warm) ----------------------


def _production_only_ledger(tmp_path: Path) -> tuple[Path, PriceTable]:
    from conftest import basic_doc

    from keepwarm.metrics import Metrics
    from keepwarm.observations import Observer

    config = parse_config(basic_doc("http://127.0.0.1:9"), tmp_path)
    pair = config.pairs[0]
    path = tmp_path / "l.db"
    ledger = Ledger(path, clock=lambda: T0 + 1000)
    observer = Observer(config, Metrics(), ledger=lambda: ledger, clock=lambda: T0 + 1000)
    # Production wrote the cache, then read it five times: no ping was needed.
    items = [{"expert": pair.expert, "model": pair.model, "at": T0 + 30 * i,
              "usage": {"input_tokens": 20, "cache_read_input_tokens": 0 if i == 0 else 1500,
                        "cache_creation_input_tokens": 1500 if i == 0 else 0, "output_tokens": 100}}
             for i in range(6)]
    assert observer.accept(items)[0] == 202
    ledger.close()
    return path, observer.prices


def test_production_without_pings_is_listed_and_proves_nothing_either_way(tmp_path: Path) -> None:
    path, prices = _production_only_ledger(tmp_path)
    out = io.StringIO()
    assert run_report(path, prices, DAY, "json", out, now=T0 + 1000) == 0
    (p,) = json.loads(out.getvalue())["pairs"]
    assert p["pings"] == 0 and p["production_requests"] == 6
    assert p["production_hit_rate"] == pytest.approx(5 / 6)
    assert p["keepalive_spend_usd"] == 0 and p["saved_by_keepalive_usd"] == 0
    assert p["pays_for_itself"] is None, "nothing spent and nothing saved is no evidence, not a yes"
    out = io.StringIO()
    assert run_report(path, prices, DAY, "table", out, now=T0 + 1000) == 0
    text = out.getvalue()
    assert "no pings" not in text.splitlines()[1], "production's requests are not hidden behind 'no pings'"
    prod = next(line for line in text.split("production:")[1].splitlines() if line.startswith("analyst"))
    assert "83.3%" in prod and prod.split()[-2] == "unknown"


def test_negative_money_reads_minus_dollar_as_on_the_page() -> None:
    from keepwarm.page import render_headline
    from keepwarm.pricing import format_usd

    assert format_usd(-0.0065, 4) == "-$0.0065"
    assert format_usd(-1234.5, 2) == "-$1,234.50"
    assert format_usd(0.5, 4) == "$0.5000"
    from keepwarm.observations import Totals

    page = render_headline({"since": T0, "windows": {"24h": Totals(keepalive_usd=0.0065)}, "pairs": {}}, now=T0 + 60)
    assert "-$0.0065" in page and "$-" not in page


# --- accounts and providers ------------------------------------------------------------------

DATA = ROOT / "keepwarm" / "data"


def _mixed_ledger(tmp_path: Path) -> tuple[Path, Path]:
    """A config of seven places (test_providers' mix) and a ledger of 40 pings of each pair, each
    billed at its provider's price, plus production requests on the Vertex regional pair."""
    import yaml
    from test_observations import _obs
    from test_providers import _mixed_doc
    from test_store_places import billed

    from keepwarm.metrics import Metrics
    from keepwarm.observations import Observer

    doc = {**_mixed_doc(tmp_path), "ledger": {"path": "l.db"}}
    (tmp_path / "keepwarm.yaml").write_text(yaml.safe_dump(doc))
    config = parse_config(doc, tmp_path)
    cold, warm = Usage(input=9, cache_write_5m=5000, output=1), Usage(input=9, cache_read=5000, output=1)
    with Ledger(tmp_path / "l.db") as ledger:
        for pair in config.pairs:
            for i in range(40):
                ledger.record(billed(pair, config, T0 + 240 * i, cold if i == 0 else warm))
        observer = Observer(config, Metrics(), ledger=lambda: ledger, clock=lambda: T0 + DAY)
        # Production's own gaps are 20 minutes: every read is a miss the keepalive spared.
        observer.accept([_obs("gcp-eu/claude-sonnet-4-6", at=T0 + 600 + 1200 * i, read=5000) for i in range(10)])
    return tmp_path / "keepwarm.yaml", tmp_path / "l.db"


def test_report_keys_and_totals_pairs_by_account_and_provider(tmp_path: Path) -> None:
    config_path, ledger = _mixed_ledger(tmp_path)
    doc = json.loads(report_of(ledger, "json", since=None))
    places = {(p["account"], p["provider"], p["endpoint"], p["expert"], p["model"]) for p in doc["pairs"]}
    assert ("gcp-eu", "vertex", "regional", "gcp-eu", "claude-sonnet-4-6") in places
    assert ("aws-east", "bedrock", "global", "east", "global.anthropic.claude-sonnet-4-6-v1:0") in places
    assert ("ws-b", "anthropic", "default", "b", "claude-sonnet-4-6") in places
    assert [(p["account"], p["expert"]) for p in doc["pairs"]] == sorted((p["account"], p["expert"]) for p in doc["pairs"])
    accounts = {(a["account"], a["provider"]): a for a in doc["accounts"]}
    assert set(accounts) == {("ws-a", "anthropic"), ("ws-b", "anthropic"), ("aws-east", "bedrock"),
                             ("aws-west", "bedrock"), ("gcp", "vertex"), ("gcp-eu", "vertex"), ("azure", "foundry")}
    assert accounts[("aws-east", "bedrock")]["pings"] == 80, "two models in one account"
    for key, sub in accounts.items():
        mine = [p for p in doc["pairs"] if (p["account"], p["provider"]) == key]
        assert sub["spend_usd"] == pytest.approx(math.fsum(p["spend_usd"] for p in mine), rel=1e-12)
        assert sub["production_requests"] == sum(p["production_requests"] for p in mine)
    assert math.fsum(a["spend_usd"] for a in doc["accounts"]) == pytest.approx(doc["total"]["spend_usd"], rel=1e-12)
    assert doc["total"]["account"] is None and doc["total"]["provider"] is None

    table = report_of(ledger, "table", since=None)
    lines = table.splitlines()
    assert lines[1].split()[:4] == ["EXPERT", "MODEL", "ACCOUNT", "PROVIDER"]
    row = next(line for line in lines if line.startswith("gcp-eu"))
    assert row.split()[2:5] == ["gcp-eu", "vertex", "(regional)"]
    by_account = table.split("by account:")[1].splitlines()[1:]
    assert by_account[0].split()[:3] == ["ACCOUNT", "PROVIDER", "PAIRS"]
    assert next(line for line in by_account if line.startswith("aws-east")).split()[1:4] == ["bedrock", "2", "80"]
    csv_rows = list(csv.DictReader(io.StringIO(report_of(ledger, "csv", since=None))))
    assert {(r["account"], r["provider"]) for r in csv_rows[:-1]} == set(accounts)


def test_a_ledger_in_the_default_account_reports_as_before(day_ledger: Path) -> None:
    """One account, the default: no ACCOUNT column and no per-account table; JSON still names it."""
    table = report_of(day_ledger, "table")
    assert "ACCOUNT" not in table and "by account:" not in table
    doc = json.loads(report_of(day_ledger, "json"))
    assert {(p["account"], p["provider"], p["endpoint"]) for p in doc["pairs"]} == {("default", "anthropic", "default")}
    assert [(a["account"], a["provider"]) for a in doc["accounts"]] == [("default", "anthropic")]


@pytest.mark.parametrize("source", ["config", "ledger"])
def test_provider_pairs_are_priced_at_the_provider_s_price(tmp_path: Path, source: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A plain Vertex id on a regional endpoint costs the Claude API price times the regional
    multiplier: its miss penalty and production's savings follow, from the data, to 1e-9. With
    the config or with the ledger alone: the row says its endpoint."""
    import yaml

    from keepwarm import cli

    config_path, ledger = _mixed_ledger(tmp_path)
    models = yaml.safe_load((DATA / "models.yaml").read_text())
    providers = yaml.safe_load((DATA / "providers.yaml").read_text())["providers"]
    sonnet = models["models"]["claude-sonnet-4-6"]
    where = ["--config", str(config_path)] if source == "config" else ["--ledger", str(ledger)]
    assert cli.main(["report", *where, "--since", "all", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    pairs = {(p["account"], p["model"]): p for p in doc["pairs"]}
    for (account, model), route, provider in (
        (("gcp-eu", "claude-sonnet-4-6"), "regional", "vertex"),
        (("gcp", "claude-sonnet-4-6"), "global", "vertex"),
        (("aws-west", "us.anthropic.claude-sonnet-4-6-v1:0"), "geo", "bedrock"),
        (("ws-a", "claude-sonnet-4-6"), None, "anthropic"),
    ):
        factor = 1.0 if route is None else providers[provider]["endpoints"][route]
        per_token = sonnet["input"] * factor / 1e6
        penalty = 5000 * per_token * (models["write_5m_multiplier"] - sonnet["read_multiplier"])
        assert pairs[(account, model)]["miss_penalty_usd"] == pytest.approx(penalty, rel=1e-9, abs=0), (account, model)
    gcp_eu = pairs[("gcp-eu", "claude-sonnet-4-6")]
    per_token = sonnet["input"] * providers["vertex"]["endpoints"]["regional"] / 1e6
    # Each request read 5,000 tokens and sent 10 more: caching spared (1 - read multiplier) of the read.
    by_caching = 10 * 5000 * per_token * (1 - sonnet["read_multiplier"])
    assert gcp_eu["saved_by_caching_usd"] == pytest.approx(by_caching, rel=1e-9, abs=0)
    assert gcp_eu["saved_by_keepalive_usd"] == pytest.approx(10 * gcp_eu["miss_penalty_usd"], rel=1e-9, abs=0)
