"""The cache-diagnostics beta in the emulator, and keepwarm's use of it (api.cache_diagnostics)."""

from __future__ import annotations

import threading
from pathlib import Path

import anthropic
import pytest
from conftest import LONG_PROMPT

from keepwarm.config import parse_config
from keepwarm.emulator import Emulator
from keepwarm.emulator.diagnostics import BETA
from keepwarm.metrics import Metrics
from keepwarm.ping import make_client
from keepwarm.runner import PairState, Runner

MODEL = "claude-sonnet-4-6"


def _ask(client: anthropic.Anthropic, system: str, previous: str | None = None, model: str = MODEL):  # type: ignore[no-untyped-def]
    extra = {"diagnostics": {"previous_message_id": previous}} if previous else {}
    return client.messages.create(
        model=model,
        max_tokens=1,
        system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "ping"}],
        extra_headers={"anthropic-beta": BETA},
        **extra,
    )


def test_reasons(emulator: Emulator) -> None:
    client = anthropic.Anthropic(api_key="sk-test-diag", base_url=emulator.base_url, max_retries=0)
    first = _ask(client, LONG_PROMPT)
    same = _ask(client, LONG_PROMPT, first.id)
    assert same.diagnostics is not None and same.diagnostics.cache_miss_reason is None, "everything was read"
    changed = _ask(client, LONG_PROMPT + " changed", same.id)
    reason = changed.diagnostics.cache_miss_reason  # type: ignore[union-attr]
    assert reason is not None and reason.type == "system_changed"
    assert reason.cache_missed_input_tokens == changed.usage.cache_creation_input_tokens  # type: ignore[union-attr]
    other_model = _ask(client, LONG_PROMPT, first.id, model="claude-opus-4-8")
    assert other_model.diagnostics.cache_miss_reason.type == "model_changed"  # type: ignore[union-attr]
    unknown = _ask(client, LONG_PROMPT, "msg_never_seen")
    assert unknown.diagnostics.cache_miss_reason.type == "previous_message_not_found"  # type: ignore[union-attr]
    emulator.expire_all()
    expired = _ask(client, LONG_PROMPT, same.id)
    assert expired.diagnostics.cache_miss_reason.type == "unavailable"  # type: ignore[union-attr]


def test_diagnostics_without_the_beta_header_is_a_400(emulator: Emulator) -> None:
    client = anthropic.Anthropic(api_key="sk-test-diag", base_url=emulator.base_url, max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="anthropic-beta"):
        client.messages.create(
            model=MODEL,
            max_tokens=1,
            system=LONG_PROMPT,
            messages=[{"role": "user", "content": "ping"}],
            diagnostics={"previous_message_id": "msg_x"},
        )


def test_the_runner_asks_and_counts_the_apis_reason(emulator: Emulator) -> None:
    doc = {"defaults": {"models": [MODEL]}, "experts": [{"name": "e", "system": [{"text": LONG_PROMPT}]}]}
    pair = parse_config(doc, Path(".")).pairs[0]
    metrics = Metrics()
    metrics.add_pair(pair)
    runner = Runner(
        make_client(emulator.base_url, "sk-test-diag", 5), parse_config(doc, Path(".")).prices, metrics,
        threading.Event(), diagnostics=True,
    )
    state = PairState(pair=pair, max_tokens=1)
    runner.ping(state)
    assert "diagnostics" not in emulator.log[-1].body, "nothing to compare the first ping with"
    first_id = state.last_message_id
    runner.ping(state)
    assert emulator.log[-1].body["diagnostics"] == {"previous_message_id": first_id}
    # A cache evicted early, with the same prefix: keepwarm alone would say "unexplained";
    # the API says it cannot tell ("unavailable"), and that is what gets counted.
    emulator.expire_all()
    outcome = runner.ping(state)
    assert outcome.miss_cause == "unavailable"
    value = metrics.registry.get_sample_value(
        "keepwarm_cache_misses_total", {"expert": "e", "model": MODEL, "cause": "unavailable"}
    )
    assert value == 1
