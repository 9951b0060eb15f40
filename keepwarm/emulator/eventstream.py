"""Bedrock's streamed answer: AWS event-stream frames, each carrying one Messages event.

Pure. A frame is: total length and headers length (4 bytes each, big-endian), the CRC-32 of
those 8 bytes, the headers, the payload, and the CRC-32 of everything before it. Headers are
`name length (1) | name | type (1; 7 = string) | value length (2) | value`. InvokeModel's
`chunk` event carries `{"bytes": base64(<the Messages event as JSON>)}`, which the SDK's
`AnthropicBedrock` decodes with botocore into the same events the Claude API streams.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

CONTENT_TYPE = "application/vnd.amazon.eventstream"
_STRING = 7


def _headers(headers: Mapping[str, str]) -> bytes:
    out = b""
    for name, value in headers.items():
        raw_name, raw_value = name.encode("utf-8"), value.encode("utf-8")
        out += struct.pack(">B", len(raw_name)) + raw_name + struct.pack(">BH", _STRING, len(raw_value)) + raw_value
    return out


def frame(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One event-stream message with its two CRCs."""
    head = _headers(headers)
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack(">II", total, len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + head + payload
    return body + struct.pack(">I", zlib.crc32(body))


def chunk(event: Mapping[str, Any]) -> bytes:
    """The `chunk` frame InvokeModelWithResponseStream sends for one Messages event."""
    data = json.dumps(event, separators=(",", ":")).encode("utf-8")
    payload = json.dumps({"bytes": base64.b64encode(data).decode("ascii")}).encode("utf-8")
    return frame({":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload)


def exception(name: str, message: str) -> bytes:
    """An exception frame (`throttlingException`, say) as Bedrock sends mid-stream."""
    payload = json.dumps({"message": message}).encode("utf-8")
    headers = {":exception-type": name, ":content-type": "application/json", ":message-type": "exception"}
    return frame(headers, payload)


def chunks(events: Sequence[Mapping[str, Any]]) -> list[bytes]:
    """One chunk frame per Messages event, in order."""
    return [chunk(event) for event in events]
