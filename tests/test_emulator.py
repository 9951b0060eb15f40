"""The emulator's prompt cache and errors, driven through the real `anthropic` SDK.

Time is a fake clock advanced by hand: no test sleeps to wait out a TTL. Token counts follow
the emulator's rule (one token per started 4 UTF-8 bytes), so `"x" * (4 * n)` is n tokens.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from keepwarm.emulator import Emulator, Fault

SONNET = "claude-sonnet-4-6"  # minimum 1024 tokens
HAIKU = "claude-haiku-4-5"  # minimum 4096 tokens
KEY = "sk-test-alpha"
# Typed Any: the SDK's TypedDict parameters would reject plain dict literals under mypy.
PING: Any = [{"role": "user", "content": "ping"}]  # 1 token


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[FakeClock, Emulator, anthropic.Anthropic]]:
    """One emulator and client for the module (an SDK client takes ~40 ms to build)."""
    clock = FakeClock()
    with Emulator(clock=clock) as emu:
        yield clock, emu, sdk(emu)


@pytest.fixture
def clock(shared: tuple[FakeClock, Emulator, anthropic.Anthropic]) -> FakeClock:
    """The shared clock, wound back, with the shared emulator emptied: each test starts clean."""
    clock, emu, _ = shared
    clock.now = 1000.0
    emu.expire_all()
    emu.clear_faults()
    emu.clear_log()
    return clock


@pytest.fixture
def emulator(shared: tuple[FakeClock, Emulator, anthropic.Anthropic], clock: FakeClock) -> Emulator:
    return shared[1]


def sdk(emu: Emulator, key: str = KEY, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=emu.base_url, max_retries=0, **options)


@pytest.fixture
def client(shared: tuple[FakeClock, Emulator, anthropic.Anthropic], clock: FakeClock) -> anthropic.Anthropic:
    return shared[2]


def text(tokens: int, fill: str = "x") -> str:
    """A text of exactly `tokens` emulator tokens."""
    return fill * (4 * tokens)


def block(tokens: int, ttl: str | None = "5m", fill: str = "x") -> Any:
    """A system text block, with a breakpoint unless ttl is None."""
    result: dict[str, Any] = {"type": "text", "text": text(tokens, fill)}
    if ttl is not None:
        result["cache_control"] = {"type": "ephemeral", "ttl": ttl}
    return result


def usage_of(client: anthropic.Anthropic, model: str = SONNET, **request: Any) -> dict[str, Any]:
    request.setdefault("messages", PING)
    request.setdefault("max_tokens", 1)
    message = client.messages.create(model=model, **request)
    usage: dict[str, Any] = message.usage.model_dump()
    return usage


def counts(usage: dict[str, Any]) -> tuple[int, int, int]:
    """(input, written, read)."""
    return (
        usage["input_tokens"],
        usage["cache_creation_input_tokens"],
        usage["cache_read_input_tokens"],
    )


SYSTEM_2000: Any = [block(2000)]


# --- write, read, TTL ---------------------------------------------------------------------


def test_first_ping_writes_and_second_reads(client: anthropic.Anthropic) -> None:
    first = usage_of(client, system=SYSTEM_2000)
    assert counts(first) == (1, 2000, 0)
    assert first["cache_creation"] == {
        "ephemeral_5m_input_tokens": 2000,
        "ephemeral_1h_input_tokens": 0,
    }
    assert first["output_tokens"] == 1 and first["service_tier"] == "standard"
    second = usage_of(client, system=SYSTEM_2000)
    assert counts(second) == (1, 0, 2000)
    assert second["cache_creation"] == {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}


def test_response_body_looks_like_the_api(emulator: Emulator, client: anthropic.Anthropic) -> None:
    raw = client.messages.with_raw_response.create(
        model=SONNET, max_tokens=1, system=SYSTEM_2000, messages=PING
    )
    body = json.loads(raw.http_response.text)
    assert body["id"].startswith("msg_")
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == SONNET
    assert body["content"] == [{"type": "text", "text": "Emulated"}]
    assert body["stop_reason"] == "max_tokens" and body["stop_sequence"] is None
    assert set(body["usage"]) == {
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "cache_creation",
        "output_tokens",
        "service_tier",
    }
    long = client.messages.create(model=SONNET, max_tokens=100, messages=PING)
    assert long.stop_reason == "end_turn" and long.usage.output_tokens == 3
    assert long.content[0].text == "Emulated reply."  # type: ignore[union-attr]


@pytest.mark.parametrize(("ttl", "seconds"), [("5m", 300), ("1h", 3600)])
def test_entry_lives_until_just_before_its_ttl(
    client: anthropic.Anthropic, clock: FakeClock, ttl: str, seconds: int
) -> None:
    system = [block(2000, ttl)]
    usage_of(client, system=system)
    clock.advance(seconds - 0.5)
    assert counts(usage_of(client, system=system)) == (1, 0, 2000)


@pytest.mark.parametrize(("ttl", "seconds"), [("5m", 300), ("1h", 3600)])
def test_entry_expires_at_exactly_its_ttl(
    client: anthropic.Anthropic, clock: FakeClock, ttl: str, seconds: int
) -> None:
    system = [block(2000, ttl)]
    usage_of(client, system=system)
    clock.advance(seconds)
    assert counts(usage_of(client, system=system)) == (1, 2000, 0)


def test_every_read_refreshes_the_ttl(client: anthropic.Anthropic, clock: FakeClock) -> None:
    usage_of(client, system=SYSTEM_2000)
    for _ in range(5):  # 5 x 299 s: far past one TTL, but never 300 s without a read
        clock.advance(299)
        assert counts(usage_of(client, system=SYSTEM_2000)) == (1, 0, 2000)
    clock.advance(300)
    assert counts(usage_of(client, system=SYSTEM_2000)) == (1, 2000, 0)


def test_ttl_runs_from_the_start_of_the_request() -> None:
    """A response that takes long does not extend the entry: expiry = request start + TTL."""

    class SlowClock(FakeClock):
        # Each call is one "moment": arrival, then response start 10 s later (a slow request).
        def __call__(self) -> float:
            self.now += 5
            return self.now

    slow = SlowClock()
    with Emulator(clock=slow) as emu:
        client = sdk(emu)
        usage_of(client, system=SYSTEM_2000)  # arrives at 1005, responds at 1010
        slow.now = 1005 + 300 - 5  # the next call returns exactly 1305 = start + 300
        assert counts(usage_of(client, system=SYSTEM_2000)) == (1, 2000, 0)


def test_time_scale_shrinks_both_ttls(clock: FakeClock) -> None:
    with Emulator(time_scale=0.02, clock=clock) as emu:
        client = sdk(emu)
        five_minutes = [block(2000, "5m")]
        one_hour = [block(3000, "1h", fill="h")]
        usage_of(client, system=five_minutes)
        usage_of(client, system=one_hour)
        clock.advance(5.9)
        assert counts(usage_of(client, system=five_minutes)) == (1, 0, 2000)
        clock.advance(6.0)  # 6 s after the last read: the scaled 5m TTL is over
        assert counts(usage_of(client, system=five_minutes)) == (1, 2000, 0)
        clock.advance(71.9 - 11.9)  # 71.9 s after the 1h write
        assert counts(usage_of(client, system=one_hour)) == (1, 0, 3000)
        clock.advance(72)
        assert counts(usage_of(client, system=one_hour)) == (1, 3000, 0)


def test_expire_all_forgets_every_entry(emulator: Emulator, client: anthropic.Anthropic) -> None:
    usage_of(client, system=SYSTEM_2000)
    assert emulator.cache_entries == 1
    emulator.expire_all()
    assert emulator.cache_entries == 0
    assert counts(usage_of(client, system=SYSTEM_2000)) == (1, 2000, 0)


# --- isolation ----------------------------------------------------------------------------


def test_keys_of_one_workspace_share_its_cache(emulator: Emulator, client: anthropic.Anthropic) -> None:
    # The API isolates caches per workspace, not per key: a second key of the same workspace
    # reads what the first wrote (the emulator used to key caches by API key).
    usage_of(client, system=SYSTEM_2000)
    other = sdk(emulator, key="sk-test-beta")
    assert counts(usage_of(other, system=SYSTEM_2000)) == (1, 0, 2000)


def test_each_workspace_has_its_own_cache() -> None:
    with Emulator(workspaces={"sk-a-1": "alpha", "sk-a-2": "alpha", "sk-b-1": "beta"}) as emu:
        usage_of(sdk(emu, key="sk-a-1"), system=SYSTEM_2000)
        assert counts(usage_of(sdk(emu, key="sk-b-1"), system=SYSTEM_2000)) == (1, 2000, 0)
        assert counts(usage_of(sdk(emu, key="sk-a-2"), system=SYSTEM_2000)) == (1, 0, 2000)
        assert [e.cache for e in emu.log] == ["workspace:alpha", "workspace:beta", "workspace:alpha"]


def test_each_model_has_its_own_cache(client: anthropic.Anthropic) -> None:
    usage_of(client, system=SYSTEM_2000, model=SONNET)
    assert counts(usage_of(client, system=SYSTEM_2000, model="claude-opus-4-8")) == (1, 2000, 0)
    assert counts(usage_of(client, system=SYSTEM_2000, model=SONNET)) == (1, 0, 2000)


def test_one_changed_byte_is_a_different_prefix(client: anthropic.Anthropic) -> None:
    usage_of(client, system=SYSTEM_2000)
    changed = [{**SYSTEM_2000[0], "text": SYSTEM_2000[0]["text"][:-1] + "y"}]
    assert counts(usage_of(client, system=changed)) == (1, 2000, 0)


def test_moving_only_the_marker_keeps_the_prefix(client: anthropic.Anthropic) -> None:
    """cache_control is not part of the hashed block: a 1h marker reads a 5m-written entry."""
    usage_of(client, system=[block(2000, "5m")])
    assert counts(usage_of(client, system=[block(2000, "1h")])) == (1, 0, 2000)


# --- breakpoints --------------------------------------------------------------------------


def test_a_fifth_breakpoint_is_rejected(client: anthropic.Anthropic) -> None:
    system = [block(300, fill=f"{i}") for i in range(5)]
    with pytest.raises(anthropic.BadRequestError) as caught:
        usage_of(client, system=system)
    assert caught.value.body["error"]["message"] == (  # type: ignore[index]
        "A maximum of 4 blocks with cache_control may be provided. Found 5."
    )
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_automatic_caching_takes_a_breakpoint_slot(client: anthropic.Anthropic) -> None:
    system = [block(400, fill=f"{i}") for i in range(4)]
    with pytest.raises(anthropic.BadRequestError, match="Found 5"):
        usage_of(client, system=system, cache_control={"type": "ephemeral"})
    assert counts(usage_of(client, system=system[:3], cache_control={"type": "ephemeral"}))[1] > 0


def test_a_1h_marker_after_a_5m_marker_is_rejected(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="1h"):
        usage_of(client, system=[block(1500, "5m"), block(800, "1h", fill="b")])
    usage_of(client, system=[block(1500, "1h"), block(800, "5m", fill="b")])  # the allowed order


def test_the_order_rule_spans_tools_system_and_messages(client: anthropic.Anthropic) -> None:
    tool = {"name": "lookup", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}
    with pytest.raises(anthropic.BadRequestError):
        usage_of(client, tools=[tool], system=[block(2000, "1h")])


@pytest.mark.parametrize(
    "control",
    [{"type": "ephemeral", "ttl": "10m"}, {"type": "ephemeral", "ttl": 300}, {"type": "persistent"}],
)
def test_a_bad_cache_control_is_rejected(client: anthropic.Anthropic, control: dict[str, Any]) -> None:
    with pytest.raises(anthropic.BadRequestError, match="cache_control"):
        usage_of(client, system=[{"type": "text", "text": text(2000), "cache_control": control}])


def test_mixed_ttls_bill_each_segment_at_its_breakpoint_ttl(client: anthropic.Anthropic) -> None:
    system = [block(1500, "1h", fill="a"), block(800, "5m", fill="b")]
    first = usage_of(client, system=system)
    assert counts(first) == (1, 2300, 0)
    assert first["cache_creation"] == {"ephemeral_5m_input_tokens": 800, "ephemeral_1h_input_tokens": 1500}
    # The later (5m) block changes: the 1h part is read, the new 5m part written.
    changed = [system[0], block(700, "5m", fill="c")]
    second = usage_of(client, system=changed)
    assert counts(second) == (1, 700, 1500)
    assert second["cache_creation"] == {"ephemeral_5m_input_tokens": 700, "ephemeral_1h_input_tokens": 0}


def test_tools_level_survives_a_system_change(client: anthropic.Anthropic) -> None:
    tool = {"name": "lookup", "description": text(1200, "t"), "input_schema": {"type": "object"}}
    tool_tokens = -(-len(json.dumps(tool, sort_keys=True, separators=(",", ":"))) // 4)
    marked = {**tool, "cache_control": {"type": "ephemeral"}}
    usage_of(client, tools=[marked], system=[block(500, fill="a")])
    again = usage_of(client, tools=[marked], system=[block(500, fill="b")])
    assert counts(again) == (1, 500, tool_tokens)


def test_tool_choice_invalidates_system_but_not_tools(client: anthropic.Anthropic) -> None:
    tool = {"name": "lookup", "description": text(1200, "t"), "input_schema": {"type": "object"}}
    tool_tokens = -(-len(json.dumps(tool, sort_keys=True, separators=(",", ":"))) // 4)
    marked = {**tool, "cache_control": {"type": "ephemeral"}}
    usage_of(client, tools=[marked], system=[block(500)])
    again = usage_of(client, tools=[marked], system=[block(500)], tool_choice={"type": "none"})
    assert counts(again) == (1, 500, tool_tokens)


def test_below_the_model_minimum_nothing_is_cached(client: anthropic.Anthropic) -> None:
    for _ in range(2):
        usage = usage_of(client, model=HAIKU, system=[block(4095)])
        assert counts(usage) == (4096, 0, 0)
        assert usage["cache_creation"] == {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}


def test_exactly_the_model_minimum_caches(client: anthropic.Anthropic) -> None:
    """16,384 bytes of ASCII = 4,096 tokens: the Haiku 4.5 minimum is reached."""
    assert counts(usage_of(client, model=HAIKU, system=[block(4096)])) == (1, 4096, 0)


def test_without_a_breakpoint_nothing_is_cached(client: anthropic.Anthropic) -> None:
    for _ in range(2):
        assert counts(usage_of(client, system=[block(2000, ttl=None)])) == (2001, 0, 0)


def test_input_tokens_count_only_after_the_last_breakpoint(client: anthropic.Anthropic) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text(40), "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": text(7)},
            ],
        },
        {"role": "assistant", "content": text(5)},
        {"role": "user", "content": text(3)},
    ]
    first = usage_of(client, system=SYSTEM_2000, messages=messages)
    assert counts(first) == (15, 2040, 0)
    second = usage_of(client, system=SYSTEM_2000, messages=messages)
    assert counts(second) == (15, 0, 2040)
    assert sum(counts(second)) == 2055


def test_automatic_caching_marks_the_last_block(client: anthropic.Anthropic) -> None:
    auto = {"type": "ephemeral"}
    assert counts(usage_of(client, system=[block(2000, ttl=None)], cache_control=auto)) == (0, 2001, 0)
    longer = [*PING, {"role": "assistant", "content": "pong"}, {"role": "user", "content": "again"}]
    # The breakpoint moved forward; the previous end is found by the lookback.
    assert counts(usage_of(client, system=[block(2000, ttl=None)], messages=longer, cache_control=auto)) == (
        0,
        3,
        2001,
    )


def many_blocks_request(breakpoint_at: int) -> dict[str, Any]:
    """System (2000 tokens, position 0) then one user message of 40 small blocks (positions
    1..40), with the single breakpoint on the block at `breakpoint_at`."""
    content: list[dict[str, Any]] = []
    for index in range(40):
        item: dict[str, Any] = {"type": "text", "text": f"block {index:02d}"}  # 2 tokens each
        if index + 1 == breakpoint_at:
            item["cache_control"] = {"type": "ephemeral"}
        content.append(item)
    return {"system": [block(2000, ttl=None)], "messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(("distance", "found"), [(1, True), (20, True), (21, False)])
def test_lookback_reaches_20_blocks_back_and_no_further(
    client: anthropic.Anthropic, distance: int, found: bool
) -> None:
    earlier = 5
    assert counts(usage_of(client, **many_blocks_request(earlier)))[1:] == (2000 + 2 * earlier, 0)
    later = earlier + distance
    usage = usage_of(client, **many_blocks_request(later))
    if found:
        assert counts(usage) == (2 * (40 - later), 2 * distance, 2000 + 2 * earlier)
    else:
        assert counts(usage) == (2 * (40 - later), 2000 + 2 * later, 0)


def test_each_breakpoint_has_its_own_lookback_window(client: anthropic.Anthropic) -> None:
    usage_of(client, **many_blocks_request(5))
    request = many_blocks_request(35)  # 30 blocks past the entry: out of this window...
    request["messages"][0]["content"][9]["cache_control"] = {"type": "ephemeral"}  # ...not this one
    assert counts(usage_of(client, **request)) == (10, 60, 2010)


# --- max_tokens 0 (pre-warming) and other request rules -----------------------------------


def test_max_tokens_zero_prewarms(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=SONNET, max_tokens=0, system=SYSTEM_2000, messages=PING)
    assert message.content == []
    assert message.stop_reason == "max_tokens"
    assert counts(message.usage.model_dump()) == (1, 2000, 0)
    assert message.usage.output_tokens == 0
    assert counts(usage_of(client, system=SYSTEM_2000)) == (1, 0, 2000)


@pytest.mark.parametrize(
    "extra",
    [
        {"stream": True},
        {"thinking": {"type": "enabled", "budget_tokens": 1024}},
        {"tool_choice": {"type": "any"}},
        {"tool_choice": {"type": "tool", "name": "lookup"}},
    ],
)
def test_max_tokens_zero_refuses_what_needs_output(
    client: anthropic.Anthropic, extra: dict[str, Any]
) -> None:
    tools: Any = [{"name": "lookup", "input_schema": {"type": "object"}}]
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(
            model=SONNET, max_tokens=0, system=SYSTEM_2000, messages=PING, tools=tools, **extra
        )


def test_blank_placeholder_message_is_refused(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="non-whitespace"):
        usage_of(client, system=SYSTEM_2000, messages=[{"role": "user", "content": "  "}])


def test_unknown_model_is_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        usage_of(client, model="claude-nonesuch-9")
    assert caught.value.body["error"] == {  # type: ignore[index]
        "type": "not_found_error",
        "message": "model: claude-nonesuch-9",
    }


def test_every_model_in_the_data_file_is_known(client: anthropic.Anthropic) -> None:
    from importlib.resources import files

    import yaml

    models = yaml.safe_load(files("keepwarm").joinpath("data/models.yaml").read_text())["models"]
    for model, facts in models.items():
        minimum = facts["min_cacheable_tokens"]
        assert counts(usage_of(client, model=model, system=[block(minimum - 1)]))[1:] == (0, 0)
        assert counts(usage_of(client, model=model, system=[block(minimum)]))[1:] == (minimum, 0)


# --- count_tokens -------------------------------------------------------------------------


def test_count_tokens_totals_tools_system_and_messages(client: anthropic.Anthropic) -> None:
    tool: Any = {"name": "lookup", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}
    # The tool counts its canonical JSON without cache_control.
    tool_json = '{"input_schema":{"type":"object"},"name":"lookup"}'
    counted = client.messages.count_tokens(
        model=SONNET, tools=[tool], system=SYSTEM_2000, messages=[{"role": "user", "content": "héllo"}]
    )
    assert counted.input_tokens == -(-len(tool_json) // 4) + 2000 + 2  # "héllo" is 6 bytes


def test_count_tokens_caches_nothing(emulator: Emulator, client: anthropic.Anthropic) -> None:
    client.messages.count_tokens(model=SONNET, system=SYSTEM_2000, messages=PING)
    assert emulator.cache_entries == 0
    assert counts(usage_of(client, system=SYSTEM_2000)) == (1, 2000, 0)


def test_count_tokens_knows_models(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="claude-nonesuch-9", messages=PING)


# --- faults -------------------------------------------------------------------------------


def test_429_with_retry_after(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(status=429, retry_after=7))
    with pytest.raises(anthropic.RateLimitError) as caught:
        usage_of(client)
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.request_id and caught.value.request_id.startswith("req_")
    usage_of(client)  # count=1: the next request is clean


def test_spend_cap_429_has_no_retry_after(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(spend_cap=True))
    with pytest.raises(anthropic.RateLimitError) as caught:
        usage_of(client)
    assert "retry-after" not in caught.value.response.headers
    assert "monthly spend limit" in caught.value.body["error"]["message"]  # type: ignore[index]
    assert isinstance(caught.value, anthropic.EnforcedSpendLimitReachedError)


@pytest.mark.parametrize(
    ("status", "exception", "error_type"),
    [
        (500, anthropic.InternalServerError, "api_error"),
        (503, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
    ],
)
def test_status_faults_raise_the_sdk_exception(
    emulator: Emulator,
    client: anthropic.Anthropic,
    status: int,
    exception: type[Exception],
    error_type: str,
) -> None:
    emulator.inject(Fault(status=status))
    with pytest.raises(exception) as caught:
        usage_of(client)
    assert caught.value.body["error"]["type"] == error_type  # type: ignore[attr-defined]
    assert emulator.log[-1].status == status and emulator.log[-1].error_type == error_type


def test_hang_times_the_client_out(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(kind="hang", latency=10))
    began = time.monotonic()
    with pytest.raises(anthropic.APITimeoutError):
        usage_of(client, timeout=0.3)
    assert time.monotonic() - began < 5


def test_drop_is_a_connection_error(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(kind="drop"))
    with pytest.raises(anthropic.APIConnectionError) as caught:
        usage_of(client)
    assert not isinstance(caught.value, anthropic.APITimeoutError)
    usage_of(client)  # the SDK reconnects; the emulator serves on


def test_malformed_body_fails_to_decode(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(kind="malformed"))
    with pytest.raises(json.JSONDecodeError):
        usage_of(client)


def test_latency_is_real(clock: FakeClock) -> None:
    with Emulator(clock=clock) as emu:
        emu.inject(Fault(kind="latency", latency=0.2))
        began = time.monotonic()
        assert counts(usage_of(sdk(emu), system=SYSTEM_2000)) == (1, 2000, 0)
        assert time.monotonic() - began >= 0.2


def test_fault_count_and_clear(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(status=529, count=2))
    for _ in range(2):
        with pytest.raises(anthropic.OverloadedError):
            usage_of(client)
    usage_of(client)
    emulator.inject(Fault(status=500, count=None))
    for _ in range(3):
        with pytest.raises(anthropic.InternalServerError):
            usage_of(client)
    emulator.clear_faults()
    usage_of(client)


def test_faults_apply_in_order(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(status=529))
    emulator.inject(Fault(status=429))
    with pytest.raises(anthropic.OverloadedError):
        usage_of(client)
    with pytest.raises(anthropic.RateLimitError):
        usage_of(client)


def test_model_filter(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(status=529, model=HAIKU))
    usage_of(client, model=SONNET)
    with pytest.raises(anthropic.OverloadedError):
        usage_of(client, model=HAIKU)


def test_count_tokens_is_spared_unless_targeted(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(status=529))
    assert client.messages.count_tokens(model=SONNET, messages=PING).input_tokens == 1
    with pytest.raises(anthropic.OverloadedError):
        usage_of(client)  # the fault was still waiting for a messages request
    emulator.inject(Fault(status=529, path="count_tokens"))
    usage_of(client)
    with pytest.raises(anthropic.OverloadedError):
        client.messages.count_tokens(model=SONNET, messages=PING)


def test_a_failed_request_touches_no_cache(emulator: Emulator, client: anthropic.Anthropic) -> None:
    emulator.inject(Fault(status=500))
    with pytest.raises(anthropic.InternalServerError):
        usage_of(client, system=SYSTEM_2000)
    assert emulator.cache_entries == 0


def test_bad_fault_definitions_are_refused() -> None:
    with pytest.raises(ValueError):
        Fault(kind="explode")
    with pytest.raises(ValueError):
        Fault(spend_cap=True, retry_after=3)
    with pytest.raises(ValueError):
        Fault(count=0)
    with pytest.raises(ValueError):
        Fault.from_json({"status": 429, "colour": "red"})


# --- an entry is readable only once its writing response has begun ------------------------


def test_parallel_requests_sent_before_the_first_response_both_write() -> None:
    with Emulator() as emu:  # the real clock: this is about real overlap
        client = sdk(emu)
        emu.inject(Fault(kind="latency", latency=0.5, count=2))
        results: list[dict[str, Any]] = []
        lock = threading.Lock()
        together = threading.Barrier(2)  # both arrive well inside the other's 0.5 s delay

        def ping() -> None:
            together.wait()
            usage = usage_of(client, system=SYSTEM_2000)
            with lock:
                results.append(usage)

        threads = [threading.Thread(target=ping) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [counts(usage) for usage in results] == [(1, 2000, 0), (1, 2000, 0)]
        assert counts(usage_of(client, system=SYSTEM_2000)) == (1, 0, 2000)


def test_a_request_started_after_the_response_began_reads() -> None:
    with Emulator() as emu:
        client = sdk(emu)
        emu.inject(Fault(kind="latency", latency=0.3))
        writer = threading.Thread(target=usage_of, args=(client,), kwargs={"system": SYSTEM_2000})
        writer.start()
        writer.join()
        assert counts(usage_of(client, system=SYSTEM_2000)) == (1, 0, 2000)


# --- the request log ----------------------------------------------------------------------


def test_log_records_successes_and_failures(emulator: Emulator, client: anthropic.Anthropic, clock: FakeClock) -> None:
    usage_of(client, system=SYSTEM_2000)
    clock.advance(1)
    emulator.inject(Fault(status=429, retry_after=1))
    with pytest.raises(anthropic.RateLimitError):
        usage_of(client, system=SYSTEM_2000)
    ok, failed = emulator.log
    expected = hashlib.sha256(
        json.dumps(
            {"model": SONNET, "system": SYSTEM_2000}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    ).hexdigest()
    assert ok.fingerprint == failed.fingerprint == expected
    assert ok.time == 1000.0 and failed.time == 1001.0
    assert ok.status == 200 and ok.error_type is None
    assert ok.usage is not None and ok.usage["cache_creation_input_tokens"] == 2000
    assert failed.status == 429 and failed.error_type == "rate_limit_error" and failed.usage is None
    assert ok.model == SONNET and ok.body["system"] == SYSTEM_2000
    assert ok.request_id != failed.request_id and ok.request_id.startswith("req_")
    assert ok.key_suffix == KEY[-4:]
    emulator.clear_log()
    assert emulator.log == []


def test_fingerprint_includes_tools_only_when_sent(emulator: Emulator, client: anthropic.Anthropic) -> None:
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    usage_of(client, system="plain string system", tools=tools)
    document = {"model": SONNET, "system": "plain string system", "tools": tools}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert emulator.log[-1].fingerprint == hashlib.sha256(canonical.encode()).hexdigest()
