"""The cache model on its own (no HTTP): properties that must hold for any sequence of pings."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from keepwarm.emulator.cache import PromptCache
from keepwarm.emulator.prompt import read_prompt, validate_common

MODEL = "claude-sonnet-4-6"


def body(system_tokens: list[int], ttls: list[str | None]) -> dict[str, Any]:
    system = []
    for index, (tokens, ttl) in enumerate(zip(system_tokens, ttls)):
        block: dict[str, Any] = {"type": "text", "text": chr(97 + index) * (4 * tokens)}
        if ttl is not None:
            block["cache_control"] = {"type": "ephemeral", "ttl": ttl}
        system.append(block)
    return {"model": MODEL, "max_tokens": 1, "system": system, "messages": [{"role": "user", "content": "ping"}]}


@settings(max_examples=60, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0, max_value=700, allow_nan=False), min_size=1, max_size=12),
    ttl=st.sampled_from(["5m", "1h"]),
    scale=st.sampled_from([1.0, 0.02]),
)
def test_a_lone_keepalive_is_warm_exactly_when_inside_the_ttl(
    gaps: list[float], ttl: str, scale: float
) -> None:
    """Reference model: warm iff the previous ping (read or write) started less than one TTL ago."""
    request = body([1500], [ttl])
    prompt = read_prompt(request, validate_common(request))
    cache = PromptCache(time_scale=scale)
    lifetime = {"5m": 300.0, "1h": 3600.0}[ttl] * scale
    now, last = 0.0, None
    for gap in gaps:
        now += gap * scale
        usage = cache.settle(("key", MODEL), prompt, 1024, started=now, responding=now)
        warm = last is not None and now < last + lifetime
        assert (usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) == (
            (1500, 0) if warm else (0, 1500)
        )
        assert usage["input_tokens"] == 1
        last = now


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=900), min_size=1, max_size=4),
    marks=st.lists(st.sampled_from([None, "5m", "1h"]), min_size=4, max_size=4),
    changed=st.integers(min_value=0, max_value=3),
)
def test_usage_always_adds_up(sizes: list[int], marks: list[str | None], changed: int) -> None:
    """input + written + read = total, the write split sums to the written tokens, whatever the
    breakpoints, and a second identical request writes nothing."""
    # Keep the order rule (1h before 5m) so the request is valid.
    ttls = sorted(marks[: len(sizes)], key=lambda t: {"1h": 0, "5m": 1, None: 1}[t])
    first = body(sizes, ttls)
    cache = PromptCache()
    for request in (first, first, body([*sizes[:changed], *[s + 1 for s in sizes[changed:]]], ttls)):
        prompt = read_prompt(request, validate_common(request))
        usage = cache.settle(("key", MODEL), prompt, 1024, started=0.0, responding=0.0)
        split = usage["cache_creation"]
        assert usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage[
            "cache_read_input_tokens"
        ] == prompt.total_tokens
        assert split["ephemeral_5m_input_tokens"] + split["ephemeral_1h_input_tokens"] == usage[
            "cache_creation_input_tokens"
        ]
        if request is first and cache_was_written(usage):
            again = cache.settle(("key", MODEL), prompt, 1024, started=0.0, responding=0.0)
            assert again["cache_creation_input_tokens"] == 0


def cache_was_written(usage: dict[str, Any]) -> bool:
    return bool(usage["cache_creation_input_tokens"] or usage["cache_read_input_tokens"])
