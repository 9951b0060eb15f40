"""The cache-diagnostics beta: why a request could not reuse a previous request's prefix.

With `anthropic-beta: cache-diagnosis-2026-04-07` and `"diagnostics": {"previous_message_id":
...}` the API compares the request with that earlier one and answers
`diagnostics.cache_miss_reason` (SDK 2.14 types: `model_changed`, `system_changed`,
`tools_changed`, `messages_changed` with `cache_missed_input_tokens`,
`previous_message_not_found`, `unavailable`).

Approximations: only requests that themselves carry the beta header are remembered (so plain
traffic costs nothing), at most `limit` of them; `cache_control` markers are ignored in the
comparison, as in the cache key; when nothing differs but the request still wrote to the cache
(the entry expired or was evicted) the reason is `unavailable`; when it read everything,
`cache_miss_reason` is null.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keepwarm.emulator.errors import invalid
from keepwarm.emulator.prompt import canonical_json

BETA = "cache-diagnosis-2026-04-07"


def _strip_markers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_markers(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_strip_markers(v) for v in value]
    return value


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(_strip_markers(value)).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Seen:
    model: str
    tools: str
    system: str
    messages: tuple[str, ...]


def _summary(body: Mapping[str, Any]) -> _Seen:
    system = body.get("system")
    if isinstance(system, str):
        system = [{"type": "text", "text": system}]
    return _Seen(
        model=str(body.get("model")),
        tools=_digest(body.get("tools") or []),
        system=_digest(system or []),
        messages=tuple(_digest(m) for m in body.get("messages") or []),
    )


def requested(body: Mapping[str, Any], beta_header: str | None) -> str | None:
    """The previous message id a request asks about, or None; 400 when asked without the beta."""
    diagnostics = body.get("diagnostics")
    if diagnostics is None:
        return None
    if BETA not in {b.strip() for b in (beta_header or "").split(",")}:
        raise invalid(f"diagnostics: requires the anthropic-beta header {BETA}")
    if not isinstance(diagnostics, dict) or not isinstance(diagnostics.get("previous_message_id"), str):
        raise invalid("diagnostics.previous_message_id: Field required")
    return str(diagnostics["previous_message_id"])


class Diagnoser:
    """Remembers recent beta requests by message id and compares new ones against them."""

    def __init__(self, limit: int = 1000) -> None:
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self._lock = threading.Lock()
        self._limit = limit

    def remember(self, message_id: str, body: Mapping[str, Any]) -> None:
        """Keep what a beta request looked like, so a later one can name it."""
        summary = _summary(body)
        with self._lock:
            self._seen[message_id] = summary
            while len(self._seen) > self._limit:
                self._seen.popitem(last=False)

    def diagnose(self, previous_id: str, body: Mapping[str, Any], usage: Mapping[str, Any]) -> dict[str, Any]:
        """The `diagnostics` object of the response."""
        with self._lock:
            previous = self._seen.get(previous_id)
        if previous is None:
            return {"cache_miss_reason": {"type": "previous_message_not_found"}}
        written = int(usage.get("cache_creation_input_tokens") or 0)
        now = _summary(body)
        for kind, changed in (
            ("model_changed", now.model != previous.model),
            ("tools_changed", now.tools != previous.tools),
            ("system_changed", now.system != previous.system),
            ("messages_changed", now.messages[: len(previous.messages) - 1] != previous.messages[:-1]),
        ):
            if changed:
                return {"cache_miss_reason": {"type": kind, "cache_missed_input_tokens": written}}
        if written:
            return {"cache_miss_reason": {"type": "unavailable"}}
        return {"cache_miss_reason": None}
