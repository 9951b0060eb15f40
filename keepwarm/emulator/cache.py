"""The emulated prompt cache: entries keyed by (workspace or provider place, model, prefix hash), their TTLs, and the
usage a request is billed when it reads and writes them."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from keepwarm.emulator.prompt import Prompt

# How far before a breakpoint the API looks for an earlier entry, in block positions.
LOOKBACK_BLOCKS = 20
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
# Expired entries are swept after this many writes, so a long run does not grow without bound.
_SWEEP_EVERY = 1024

Scope = tuple[str, str]  # (workspace or place, model): each has a cache of its own


@dataclass(slots=True)
class _Entry:
    readable_from: float  # when the writing response began; requests started earlier miss
    expires: float  # start of the last request that wrote or read it, plus its TTL
    ttl: float  # seconds, already scaled


class PromptCache:
    """Thread-safe cache state; `settle` does one request's reads and writes atomically."""

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.time_scale = time_scale
        self._lock = threading.Lock()
        self._entries: dict[Scope, dict[bytes, _Entry]] = {}
        self._writes_since_sweep = 0

    def ttl_seconds(self, ttl: str) -> float:
        """The scaled lifetime of a `5m` or `1h` entry, in seconds."""
        return TTL_SECONDS[ttl] * self.time_scale

    def clear(self) -> None:
        """Forget every entry, as if all had expired."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(entries) for entries in self._entries.values())

    def settle(
        self, scope: Scope, prompt: Prompt, min_tokens: int, *, started: float, responding: float
    ) -> dict[str, Any]:
        """Read the longest live prefix, write every breakpoint after it, and return the usage.

        `started` is when the request arrived (TTLs run from it, and entries written later are
        invisible to it); `responding` is when its response begins (its own writes become
        readable then).
        """
        total = prompt.total_tokens
        breakpoints = prompt.breakpoints
        cumulative = prompt.cumulative_tokens
        if not breakpoints or cumulative[breakpoints[-1].position] < min_tokens:
            return _usage(input_tokens=total)
        last = breakpoints[-1].position
        digests = prompt.prefix_digests

        # Each breakpoint is a lookup point with its own window of earlier block positions.
        candidates: set[int] = set()
        for breakpoint in breakpoints:
            start = max(0, breakpoint.position - LOOKBACK_BLOCKS)
            candidates.update(range(start, breakpoint.position + 1))

        written = {"5m": 0, "1h": 0}
        with self._lock:
            entries = self._entries.setdefault(scope, {})
            read_at = -1
            for position in sorted(candidates, reverse=True):
                entry = entries.get(digests[position])
                if entry is not None and entry.readable_from <= started < entry.expires:
                    read_at = position
                    # A read refreshes the entry; never shorten a 1h entry read under a 5m marker.
                    covering = next(b.ttl for b in breakpoints if b.position >= position)
                    entry.ttl = max(entry.ttl, self.ttl_seconds(covering))
                    entry.expires = max(entry.expires, started + entry.ttl)
                    break

            covered = cumulative[read_at] if read_at >= 0 else 0
            for breakpoint in breakpoints:
                position = breakpoint.position
                # A breakpoint below the minimum caches nothing; its tokens are written as part
                # of the next breakpoint's entry, at that breakpoint's TTL.
                if position <= read_at or cumulative[position] < min_tokens:
                    continue
                written[breakpoint.ttl] += cumulative[position] - covered
                covered = cumulative[position]
                self._write(entries, digests[position], breakpoint.ttl, started, responding)

        return _usage(
            input_tokens=total - cumulative[last],
            read=cumulative[read_at] if read_at >= 0 else 0,
            written_5m=written["5m"],
            written_1h=written["1h"],
        )

    def _write(
        self, entries: dict[bytes, _Entry], digest: bytes, ttl: str, started: float, responding: float
    ) -> None:
        seconds = self.ttl_seconds(ttl)
        existing = entries.get(digest)
        if existing is not None and started < existing.expires:
            # A parallel request wrote it but its response had not begun when this one started:
            # both wrote (and both pay); the entry is readable from the earlier response.
            existing.readable_from = min(existing.readable_from, responding)
            existing.ttl = max(existing.ttl, seconds)
            existing.expires = max(existing.expires, started + seconds)
        else:
            entries[digest] = _Entry(responding, started + seconds, seconds)
        self._writes_since_sweep += 1
        if self._writes_since_sweep >= _SWEEP_EVERY:
            self._sweep(started)

    def _sweep(self, now: float) -> None:
        self._writes_since_sweep = 0
        for entries in self._entries.values():
            for digest in [d for d, entry in entries.items() if entry.expires <= now]:
                del entries[digest]


def _usage(
    *, input_tokens: int, read: int = 0, written_5m: int = 0, written_1h: int = 0
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": written_5m + written_1h,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": written_5m,
            "ephemeral_1h_input_tokens": written_1h,
        },
    }
