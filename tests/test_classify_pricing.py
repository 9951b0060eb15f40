"""classify() and the cost arithmetic: pure functions, checked against hand calculations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from keepwarm.classify import Result, Usage, classify, usage_from_api
from keepwarm.pricing import builtin_table, load_price_table


@pytest.mark.parametrize(
    ("raw", "result"),
    [
        ({"input_tokens": 3, "cache_read_input_tokens": 5000, "cache_creation_input_tokens": 0}, Result.WARM),
        ({"input_tokens": 3, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 5000}, Result.REWARMED),
        ({"input_tokens": 3, "cache_read_input_tokens": 4000, "cache_creation_input_tokens": 900}, Result.PARTIAL),
        ({"input_tokens": 900, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}, Result.UNCACHED),
        ({"input_tokens": 900, "cache_read_input_tokens": None, "cache_creation_input_tokens": None}, Result.UNCACHED),
        ({"input_tokens": 900}, Result.UNCACHED),
    ],
)
def test_classify(raw: dict, result: Result) -> None:
    assert classify(usage_from_api(raw, "5m")) is result


def test_no_usage_is_an_error() -> None:
    assert classify(None) is Result.ERROR


def test_write_split_and_its_absence() -> None:
    split = {
        "input_tokens": 2,
        "cache_creation_input_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
    }
    assert usage_from_api(split, "5m") == Usage(input=2, cache_write_5m=100, cache_write_1h=200)
    # Without the split, the write is billed at the TTL the pair asked for.
    bare = {"input_tokens": 2, "cache_creation_input_tokens": 300}
    assert usage_from_api(bare, "1h") == Usage(input=2, cache_write_1h=300)
    assert usage_from_api(bare, "5m") == Usage(input=2, cache_write_5m=300)


def test_cost_matches_a_hand_calculation() -> None:
    prices = builtin_table()
    usage = Usage(input=10, cache_read=4000, cache_write_5m=1000, cache_write_1h=500, output=1)
    cost = prices.cost("claude-sonnet-4-6", usage)
    assert cost is not None
    # $3 per million input, $15 output; read 0.1x, 5m write 1.25x, 1h write 2x.
    assert cost["input"] == pytest.approx(10 * 3e-6)
    assert cost["cache_read"] == pytest.approx(4000 * 3e-6 * 0.1)
    assert cost["cache_write_5m"] == pytest.approx(1000 * 3e-6 * 1.25)
    assert cost["cache_write_1h"] == pytest.approx(500 * 3e-6 * 2)
    assert cost["output"] == pytest.approx(1 * 15e-6)


def test_newer_models_have_their_own_read_multiplier() -> None:
    prices = builtin_table()
    cost = prices.cost("claude-sonnet-5-5", Usage(cache_read=1_000_000))
    assert cost is not None and cost["cache_read"] == pytest.approx(2 * 0.05)


def test_unknown_price_is_unknown_not_zero() -> None:
    prices = builtin_table()
    assert prices.cost("claude-made-up-9", Usage(input=5)) is None
    assert prices.cost("claude-fable-5", Usage(input=5)) is None, "listed for its minimum, no price"
    assert prices.miss_penalty("claude-made-up-9", 5000, "5m") is None
    assert prices.warm_ping_cost("claude-made-up-9", 5000, 1, 1) is None


def test_miss_penalty_is_write_minus_read_on_the_prefix() -> None:
    prices = builtin_table()
    assert prices.miss_penalty("claude-sonnet-4-6", 10_000, "5m") == pytest.approx(10_000 * 3e-6 * (1.25 - 0.1))
    assert prices.miss_penalty("claude-sonnet-4-6", 10_000, "1h") == pytest.approx(10_000 * 3e-6 * (2 - 0.1))


def test_every_priced_model_has_a_minimum() -> None:
    table = builtin_table()
    assert table.verified and table.source.startswith("https://")
    for name, price in table.models.items():
        assert price.min_cacheable_tokens in (512, 1024, 2048, 4096), name


def test_pricing_file_overrides_and_extends(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  claude-sonnet-4-6: {input: 3.3}\n  claude-in-house-1: {input: 1, output: 2, read_multiplier: 0.1}\n")
    table, problems = load_price_table(path)
    assert problems == []
    assert table.get("claude-sonnet-4-6").input == 3.3
    assert table.get("claude-sonnet-4-6").output == 15, "the rest of the built-in row is kept"
    assert table.get("claude-in-house-1").priced
    cost = table.cost("claude-in-house-1", Usage(input=1_000_000))
    assert cost is not None and math.isclose(cost["input"], 1.0)


def test_a_bad_pricing_file_names_its_problems(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  m: {input: -1, colour: red}\n  n: {output: cheap}\nwrite_1h_multiplier: 0\n")
    _, problems = load_price_table(path)
    assert any("m: unknown key(s) ['colour']" in p for p in problems)
    assert any("n.output: expected a number >= 0, got 'cheap'" in p for p in problems)
    assert any("write_1h_multiplier: expected a number > 0" in p for p in problems)


def test_a_read_multiplier_not_below_the_write_multipliers_is_refused(tmp_path: Path) -> None:
    # Every miss penalty and saving is (write - read) x tokens: a read priced like a write would
    # make them zero or negative, and a saved request a negative saving.
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  claude-in-house-1: {input: 1, output: 2, read_multiplier: 1.5}\n"
                    "  claude-sonnet-4-6: {read_multiplier: 0.1}\n")
    _, problems = load_price_table(path)
    assert problems == [f"pricing_file {path}.models.claude-in-house-1.read_multiplier: 1.5 is not below the"
                        " cache-write multipliers (1.25 for 5m, 2 for 1h)"]
