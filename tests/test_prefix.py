"""The prefix a ping sends is byte-identical to what an application sends with the SDK."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anthropic
from conftest import ROOT

from keepwarm.config import load_config
from keepwarm.emulator import Emulator
from keepwarm.ping import make_client, send_ping
from keepwarm.prefix import build_prefix, fingerprint, load_prefix

EXAMPLE = ROOT / "config" / "keepwarm.yaml"


def _prefix_bytes(body: dict) -> bytes:
    """The request's cacheable part, serialised in the order it was sent."""
    return json.dumps({k: body[k] for k in ("model", "tools", "system") if k in body}, ensure_ascii=False).encode()


def test_ping_and_application_request_share_the_prefix_byte_for_byte(emulator: Emulator) -> None:
    config = load_config(EXAMPLE)
    pair = next(p for p in config.pairs if p.expert == "support-triage")
    client = make_client(emulator.base_url, "sk-test-prefix", 10)
    assert send_ping(client, pair, 1).error is None

    # What an application would write: load the same expert, add its own conversation.
    prefix = load_prefix(EXAMPLE, "support-triage")
    app = anthropic.Anthropic(api_key="sk-test-prefix", base_url=emulator.base_url, max_retries=0)
    reply = app.messages.create(
        model=pair.model,
        max_tokens=512,
        messages=[{"role": "user", "content": "My invoices page shows a 500 error since this morning."}],
        **prefix.params(),
    )
    ping_body, app_body = emulator.log[0].body, emulator.log[1].body
    assert _prefix_bytes(ping_body) == _prefix_bytes(app_body)
    assert emulator.log[0].fingerprint == emulator.log[1].fingerprint == pair.fingerprint
    # And the cache agrees: the application's request reads what the ping wrote.
    assert reply.usage.cache_read_input_tokens and not reply.usage.cache_creation_input_tokens


def test_fingerprint_is_the_spec_formula() -> None:
    prefix = build_prefix(["rules"], [{"name": "t", "input_schema": {"type": "object"}}])
    doc = {"model": "m", "system": list(prefix.system), "tools": list(prefix.tools or ())}
    expected = hashlib.sha256(
        json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    assert prefix.fingerprint("m") == fingerprint("m", doc["system"], doc["tools"]) == expected
    no_tools = build_prefix(["rules"])
    assert '"tools"' not in json.dumps({"model": "m", "system": list(no_tools.system)})
    assert no_tools.fingerprint("m") != no_tools.fingerprint("other-model"), "each model its own cache"


def test_marker_goes_on_the_last_system_block_unless_blocks_carry_their_own() -> None:
    p = build_prefix(["a", "b"], ttl="1h")
    assert [b.get("cache_control") for b in p.system] == [None, {"type": "ephemeral", "ttl": "1h"}]
    own = build_prefix([{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}, "b"])
    assert [b.get("cache_control") for b in own.system] == [{"type": "ephemeral"}, None]


def test_params_are_fresh_copies() -> None:
    p = build_prefix(["a"])
    params = p.params()
    params["system"][0]["text"] = "changed"
    assert p.params()["system"][0]["text"] == "a"


def test_load_prefix_names_a_missing_expert(tmp_path: Path) -> None:
    try:
        load_prefix(EXAMPLE, "nobody")
    except KeyError as exc:
        assert "nobody" in str(exc)
    else:
        raise AssertionError("expected KeyError")
