"""A Messages request body read the way the cache sees it: validated, flattened into blocks
in `tools` -> `system` -> `messages` order, each with its token count and the hash of the
prefix ending at it, and the breakpoints (`cache_control` markers) among them.

Pure functions: no clock, no state, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from keepwarm.cachekey import fingerprint as prefix_fingerprint
from keepwarm.emulator.errors import invalid

MAX_BREAKPOINTS = 4
TTLS = ("5m", "1h")
# Block types that can never carry a breakpoint, so automatic caching skips past them.
_UNMARKABLE_TYPES = frozenset({"thinking", "redacted_thinking"})
# Request settings the API folds into the system and messages levels of the cache key
# (but not the tools level): changing them invalidates everything after the tools.
_PREFIX_SETTINGS = ("tool_choice", "thinking", "speed")


def count_text_tokens(text: str) -> int:
    """The emulator's token count for a piece of text: one token per started 4 UTF-8 bytes."""
    return (len(text.encode("utf-8")) + 3) // 4


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(body: Mapping[str, Any]) -> str:
    """The prefix fingerprint of a request, by keepwarm's own definition (`keepwarm.prefix`)."""
    return prefix_fingerprint(body.get("model"), body.get("system", []), body.get("tools"))


@dataclass(frozen=True, slots=True)
class Breakpoint:
    """A block carrying `cache_control`: where it sits in the block sequence and its TTL."""

    position: int
    ttl: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """The cache's view of one request."""

    model: str
    prefix_digests: tuple[bytes, ...]  # [i]: hash of blocks 0..i
    cumulative_tokens: tuple[int, ...]  # [i]: tokens of blocks 0..i
    breakpoints: tuple[Breakpoint, ...]  # in block order

    @property
    def total_tokens(self) -> int:
        """Tokens of the whole input: tools, system and messages."""
        return self.cumulative_tokens[-1] if self.cumulative_tokens else 0


@dataclass(frozen=True, slots=True)
class _RawBlock:
    section: str  # "tool", "system" or "message"
    role: str  # the message role; "" outside messages
    block: Mapping[str, Any]
    where: str  # the block's path in the request, for error messages


def validate_common(body: Mapping[str, Any]) -> str:
    """Check the fields every endpoint needs (`model`, `messages`); return the model."""
    model = body.get("model")
    if model is None:
        raise invalid("model: Field required")
    if not isinstance(model, str) or not model:
        raise invalid("model: Input should be a valid string")
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages: Field required")
    if not isinstance(messages, list):
        raise invalid("messages: Input should be a valid list")
    if not messages:
        raise invalid("messages: at least one message is required")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise invalid(f"{where}: Input should be a valid dictionary")
        if "role" not in message:
            raise invalid(f"{where}.role: Field required")
        if message["role"] not in ("user", "assistant"):
            raise invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        if "content" not in message:
            raise invalid(f"{where}.content: Field required")
        content = message["content"]
        if isinstance(content, str):
            _require_text(content, f"{where}.content")
        elif not isinstance(content, list):
            raise invalid(f"{where}.content: Input should be a valid string or list")
    return model


def validate_generation(body: Mapping[str, Any]) -> int:
    """Check the fields only generation needs (`max_tokens` and what `0` excludes); return it."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise invalid("max_tokens: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 0:
        raise invalid("max_tokens: Input should be greater than or equal to 0")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream: Input should be a valid boolean")
    if max_tokens == 0:
        # Pre-warming (max_tokens 0) refuses anything that would need an output.
        if stream:
            raise invalid("max_tokens: 0 cannot be used together with `stream: true`.")
        thinking = body.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") == "enabled":
            raise invalid("max_tokens: 0 cannot be used together with extended thinking.")
        tool_choice = body.get("tool_choice")
        if isinstance(tool_choice, dict) and tool_choice.get("type") in ("tool", "any"):
            raise invalid("max_tokens: 0 cannot be used together with a forced `tool_choice`.")
        output_config = body.get("output_config")
        if body.get("output_format") or (
            isinstance(output_config, dict) and output_config.get("format")
        ):
            raise invalid("max_tokens: 0 cannot be used together with structured outputs.")
    return max_tokens


def read_prompt(body: Mapping[str, Any], model: str) -> Prompt:
    """Flatten a validated body into blocks with tokens, prefix hashes and breakpoints."""
    raw_blocks = list(_blocks(body))
    markers = [_marker(raw.block, raw.where) for raw in raw_blocks]

    automatic = body.get("cache_control")
    if automatic is not None:
        ttl = _ttl_of(automatic, "cache_control")
        target = _last_markable(raw_blocks)
        # A marker already on the last block is the same breakpoint, not a second one.
        if target is not None and markers[target] is None:
            markers[target] = ttl

    found = sum(1 for marker in markers if marker is not None)
    if found > MAX_BREAKPOINTS:
        raise invalid(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
            f"Found {found}."
        )
    seen_5m = False
    for raw, marker in zip(raw_blocks, markers):
        if marker == "5m":
            seen_5m = True
        elif marker == "1h" and seen_5m:
            raise invalid(
                f"{raw.where}.cache_control.ttl: a ttl='1h' cache_control block cannot come "
                "after a ttl='5m' cache_control block. Blocks with a longer ttl must come "
                "before blocks with a shorter ttl (in tools, system, messages order)."
            )

    hasher = hashlib.sha256()
    digests: list[bytes] = []
    cumulative: list[int] = []
    running = 0
    settings_mixed = False
    for raw in raw_blocks:
        if raw.section != "tool" and not settings_mixed:
            settings_mixed = True
            settings = {name: body[name] for name in _PREFIX_SETTINGS if name in body}
            if settings:
                hasher.update(b"settings\x1f" + canonical_json(settings).encode("utf-8") + b"\x1e")
        canon = _block_json(raw.block)
        # The separators are control characters, which canonical JSON always escapes, so two
        # different block sequences can never hash the same bytes.
        hasher.update(f"{raw.section}\x1f{raw.role}\x1f{canon}\x1e".encode())
        digests.append(hasher.copy().digest())
        running += _block_tokens(raw, canon)
        cumulative.append(running)

    breakpoints = tuple(
        Breakpoint(position, ttl) for position, ttl in enumerate(markers) if ttl is not None
    )
    return Prompt(model, tuple(digests), tuple(cumulative), breakpoints)


def _blocks(body: Mapping[str, Any]) -> Iterator[_RawBlock]:
    """Every block of the request in cache order; strings become one text block."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise invalid("tools: Input should be a valid list")
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                raise invalid(f"tools.{index}.name: Field required")
            yield _RawBlock("tool", "", tool, f"tools.{index}")

    system = body.get("system")
    if isinstance(system, str):
        if system:
            yield _RawBlock("system", "", {"type": "text", "text": system}, "system")
    elif isinstance(system, list):
        for index, block in enumerate(system):
            where = f"system.{index}"
            if not isinstance(block, dict) or block.get("type") != "text":
                raise invalid(f"{where}.type: Input should be 'text'")
            if not isinstance(block.get("text"), str):
                raise invalid(f"{where}.text: Field required")
            yield _RawBlock("system", "", block, where)
    elif system is not None:
        raise invalid("system: Input should be a valid string or list")

    for m_index, message in enumerate(body["messages"]):
        role = message["role"]
        content = message["content"]
        if isinstance(content, str):
            yield _RawBlock(
                "message", role, {"type": "text", "text": content}, f"messages.{m_index}.content"
            )
            continue
        for b_index, block in enumerate(content):
            where = f"messages.{m_index}.content.{b_index}"
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise invalid(f"{where}.type: Field required")
            if block["type"] == "text":
                if not isinstance(block.get("text"), str):
                    raise invalid(f"{where}.text: Field required")
                _require_text(block["text"], where)
            yield _RawBlock("message", role, block, where)


def _require_text(text: str, where: str) -> None:
    # The API refuses empty and blank text in messages (the pre-warm placeholder must say something).
    if not text:
        raise invalid(f"{where}: text content blocks must be non-empty")
    if text.isspace():
        raise invalid(f"{where}: text content blocks must contain non-whitespace text")


def _marker(block: Mapping[str, Any], where: str) -> str | None:
    """The TTL of a block's `cache_control`, or None when it has none."""
    control = block.get("cache_control")
    if control is None:
        return None
    return _ttl_of(control, f"{where}.cache_control")


def _ttl_of(control: Any, where: str) -> str:
    if not isinstance(control, dict):
        raise invalid(f"{where}: Input should be a valid dictionary")
    if control.get("type") != "ephemeral":
        raise invalid(f"{where}.type: Input should be 'ephemeral'")
    ttl = control.get("ttl", "5m")
    if ttl not in TTLS:
        raise invalid(f"{where}.ttl: Input should be '5m' or '1h'")
    return str(ttl)


def _last_markable(raw_blocks: list[_RawBlock]) -> int | None:
    for index in range(len(raw_blocks) - 1, -1, -1):
        if raw_blocks[index].block.get("type") not in _UNMARKABLE_TYPES:
            return index
    return None


def _block_json(block: Mapping[str, Any]) -> str:
    """A block's canonical JSON without its `cache_control`: moving a marker keeps the prefix."""
    if "cache_control" in block:
        block = {key: value for key, value in block.items() if key != "cache_control"}
    return canonical_json(block)


def _block_tokens(raw: _RawBlock, canon: str) -> int:
    # Text counts its text; a tool definition or any other block counts its canonical JSON.
    if raw.section != "tool" and raw.block.get("type") == "text":
        return count_text_tokens(raw.block["text"])
    return count_text_tokens(canon)

