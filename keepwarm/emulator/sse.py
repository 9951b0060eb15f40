"""A Messages answer as the API streams it (`stream: true`): server-sent events.

Pure: a finished message in, the event bytes out. The sequence is the API's:
`message_start` (whose `message.usage` already carries the input and cache counts, with a small
`output_tokens`), then per content block `content_block_start`, `content_block_delta`...,
`content_block_stop`, a `ping` event along the way, then `message_delta` with the stop reason
and cumulative usage, then `message_stop`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

CONTENT_TYPE = "text/event-stream; charset=utf-8"
# The cumulative usage fields a message_delta carries; service_tier and the 5m/1h split are
# only in message_start, as on the API.
_DELTA_USAGE_FIELDS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
)


def event(name: str, data: Mapping[str, Any]) -> bytes:
    """One server-sent event: its `event:` line, its JSON `data:` line, a blank line."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def message_event_objects(message: Mapping[str, Any], pieces: Sequence[str]) -> list[dict[str, Any]]:
    """The events streaming `message` (a complete Messages answer), as objects, in order.

    Each has its `type`, which is also its SSE event name; Bedrock wraps the same objects in
    event-stream frames (keepwarm.emulator.eventstream).
    """
    usage: dict[str, Any] = dict(message["usage"])
    # The API reports a token or so of output at the start and the true count at the end.
    start_usage = {**usage, "output_tokens": min(1, int(usage.get("output_tokens") or 0))}
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    out: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message["content"]):
        out.append({"type": "content_block_start", "index": index, "content_block": {**block, "text": ""}})
        if index == 0:
            out.append({"type": "ping"})
        for piece in pieces:
            out.append({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}})
        out.append({"type": "content_block_stop", "index": index})
    delta_usage = {name: usage.get(name, 0) for name in _DELTA_USAGE_FIELDS}
    out.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
            "usage": delta_usage,
        }
    )
    out.append({"type": "message_stop"})
    return out


def message_events(message: Mapping[str, Any], pieces: Sequence[str]) -> list[bytes]:
    """The events streaming `message` (a complete Messages answer) with its text in `pieces`."""
    return [event(str(item["type"]), item) for item in message_event_objects(message, pieces)]
