"""Scripted misbehaviour: a queue of faults that the next matching requests suffer, in order."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

FAULT_KINDS = ("status", "latency", "hang", "drop", "malformed")
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
_PATH_ALIASES = {"messages": MESSAGES_PATH, "count_tokens": COUNT_TOKENS_PATH}


@dataclass(frozen=True)
class Fault:
    """What the next `count` matching requests suffer.

    status: the HTTP status a `status` fault answers (default 500; 429 with `spend_cap`).
    retry_after: seconds for its `retry-after` header.
    spend_cap: the monthly spend-limit 429, which has no `retry-after`.
    latency: seconds of real delay before the answer (for `hang`: how long to hold on).
    kind:
      status     answer `status` after `latency` seconds
      latency    wait `latency` seconds, then answer normally
      hang       hold the connection without answering for `latency` seconds (0: until the
                 emulator stops), then close it
      drop       close the connection without a response (after `latency` seconds)
      malformed  answer 200 with a body that is not valid JSON (after `latency` seconds)
    count: how many requests it applies to; None = every one until cleared.
    model, path: apply only to requests for this model / to this path (`messages`,
      `count_tokens`, a full path, or `*`). Without `path` only `/v1/messages` is affected.
    message: the error message, instead of the API-like default.
    """

    status: int | None = None
    retry_after: float | None = None
    spend_cap: bool = False
    latency: float = 0.0
    kind: str = "status"
    count: int | None = 1
    model: str | None = None
    path: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}, not {self.kind!r}")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599), not {self.status}")
        if self.spend_cap and self.status not in (None, 429):
            raise ValueError("spend_cap is a 429: leave status unset or 429")
        if self.spend_cap and self.retry_after is not None:
            raise ValueError("the spend-cap 429 has no retry_after")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")
        if self.latency < 0:
            raise ValueError("latency must be >= 0")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be >= 1, or None for every request until cleared")

    @property
    def effective_status(self) -> int:
        """The HTTP status a `status` fault answers with."""
        if self.status is not None:
            return self.status
        return 429 if self.spend_cap else 500

    def applies_to(self, path: str, model: str | None) -> bool:
        """Whether a request to `path` for `model` suffers this fault."""
        if self.model is not None and self.model != model:
            return False
        if self.path is None:
            return path == MESSAGES_PATH
        if self.path == "*":
            return True
        return _PATH_ALIASES.get(self.path, self.path) == path

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """A Fault from its JSON form (the field names as keys); TypeError or ValueError if
        malformed."""
        if not isinstance(data, Mapping):
            raise TypeError("a fault is a JSON object")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(unknown)}")
        numbers: dict[str, tuple[type, ...]] = {
            "status": (int,),
            "retry_after": (int, float),
            "latency": (int, float),
            "count": (int,),
        }
        for name, kinds in numbers.items():
            value = data.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise TypeError(f"{name} must be a number")
        for name in ("kind", "model", "path", "message"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string")
        if not isinstance(data.get("spend_cap", False), bool):
            raise TypeError("spend_cap must be true or false")
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        """The JSON form `from_json` reads."""
        return asdict(self)


class FaultQueue:
    """Faults in the order they were injected; each request takes the first that applies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[list[Any]] = []  # [fault, requests left (None = unlimited)]

    def inject(self, fault: Fault) -> None:
        """Queue a fault behind those already waiting."""
        with self._lock:
            self._queue.append([fault, fault.count])

    def clear(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._queue.clear()

    def take(self, path: str, model: str | None) -> Fault | None:
        """The fault this request suffers, consuming one of its uses; None for a clean request."""
        if not self._queue:  # the common case, checked without the lock: a list read is atomic
            return None
        with self._lock:
            for index, slot in enumerate(self._queue):
                fault, left = slot
                if not fault.applies_to(path, model):
                    continue
                if left is not None:
                    if left <= 1:
                        del self._queue[index]
                    else:
                        slot[1] = left - 1
                return fault  # type: ignore[no-any-return]
        return None

    def pending(self) -> list[dict[str, Any]]:
        """The queued faults with the number of requests each still applies to."""
        with self._lock:
            return [{**fault.to_json(), "remaining": left} for fault, left in self._queue]
