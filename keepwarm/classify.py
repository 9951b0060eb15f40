"""What a ping's usage object says about the cache: pure functions, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Result(str, enum.Enum):
    """The outcome of one ping (README: Metrics, `result`); the value is the metric label."""

    WARM = "warm"
    REWARMED = "rewarmed"
    PARTIAL = "partial"
    UNCACHED = "uncached"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


RESULTS = tuple(r.value for r in Result)  # every result's label value, in the order above


@dataclass(frozen=True)
class Usage:
    """Token counts of one response, with the cache write split by TTL."""

    input: int = 0
    cache_read: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    output: int = 0

    @property
    def cache_write(self) -> int:
        """All tokens written to the cache, whatever their TTL."""
        return self.cache_write_5m + self.cache_write_1h

    @property
    def total_input(self) -> int:
        """Every input token of the request, cached or not."""
        return self.input + self.cache_read + self.cache_write

    def by_kind(self) -> dict[str, int]:
        """Counts under the `kind` label values of `keepwarm_tokens_total`."""
        return {
            "input": self.input,
            "cache_read": self.cache_read,
            "cache_write_5m": self.cache_write_5m,
            "cache_write_1h": self.cache_write_1h,
            "output": self.output,
        }


def _count(source: Any, name: str) -> int:
    value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
    return int(value) if value else 0  # missing or null counts as 0


def usage_from_api(raw: Any, ttl: str) -> Usage:
    """Normalise an API usage object (SDK model or dict) into a `Usage`.

    When the response has no `cache_creation` split, the write is billed at the TTL the
    pair asked for. When the split covers less than the total, the rest goes there too.
    """
    created = _count(raw, "cache_creation_input_tokens")
    split = raw.get("cache_creation") if isinstance(raw, dict) else getattr(raw, "cache_creation", None)
    w5 = _count(split, "ephemeral_5m_input_tokens") if split is not None else 0
    w1 = _count(split, "ephemeral_1h_input_tokens") if split is not None else 0
    rest = max(created - w5 - w1, 0)
    if ttl == "1h":
        w1 += rest
    else:
        w5 += rest
    return Usage(
        input=_count(raw, "input_tokens"),
        cache_read=_count(raw, "cache_read_input_tokens"),
        cache_write_5m=w5,
        cache_write_1h=w1,
        output=_count(raw, "output_tokens"),
    )


def classify(usage: Usage | None) -> Result:
    """Classify a ping by its usage; `None` means the request failed."""
    if usage is None:
        return Result.ERROR
    read, written = usage.cache_read > 0, usage.cache_write > 0
    if read and written:
        return Result.PARTIAL
    if read:
        return Result.WARM
    if written:
        return Result.REWARMED
    return Result.UNCACHED


# Why a ping found the cache cold (keepwarm_cache_misses_total{cause}): what keepwarm knows
# itself first, then the API's own diagnosis (the cache-diagnostics beta), else unexplained.
LOCAL_MISS_CAUSES = ("cold_start", "prefix_changed", "ttl_lapsed", "unexplained")
API_MISS_CAUSES = (
    "model_changed",
    "system_changed",
    "tools_changed",
    "messages_changed",
    "previous_message_not_found",
    "unavailable",
)
MISS_CAUSES = LOCAL_MISS_CAUSES + API_MISS_CAUSES
