"""What makes a cache key: the cacheable prefix (tools, then system blocks, with their
`cache_control` markers) and its fingerprint.

The building blocks below `keepwarm.config` (which builds every pair's prefix with them) and
the production wrapper (`keepwarm.observe`, which fingerprints what production sends).
Production code uses `keepwarm.prefix`, which re-exports these and reads a config file.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def cache_marker(ttl: str) -> dict[str, str]:
    """The `cache_control` value for a TTL; 5m is the API's default and is sent bare."""
    if ttl == "1h":
        return {"type": "ephemeral", "ttl": "1h"}
    return {"type": "ephemeral"}


@dataclass(frozen=True)
class Prefix:
    """The `system` blocks and `tools` of an expert, exactly as they are sent."""

    system: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None = None

    def params(self) -> dict[str, Any]:
        """Keyword arguments for `client.messages.create` (fresh copies each call)."""
        out: dict[str, Any] = {"system": copy.deepcopy(list(self.system))}
        if self.tools is not None:
            out["tools"] = copy.deepcopy(list(self.tools))
        return out

    def fingerprint(self, model: str) -> str:
        """The fingerprint of this prefix on one model."""
        return fingerprint(model, list(self.system), None if self.tools is None else list(self.tools))


def build_prefix(
    system: Sequence[str | dict[str, Any]],
    tools: Sequence[dict[str, Any]] | None = None,
    ttl: str = "5m",
) -> Prefix:
    """Build a prefix from system texts (or text blocks) and optional tool definitions.

    A block given as a dict is kept as it is, `cache_control` included. If no system block
    carries a `cache_control` marker, the last system block gets one for `ttl`, whatever the
    tools carry: a marker on a tool caches only the tools, never the system prompt after them.
    Only an expert without system blocks gets the default marker on its last tool.
    """
    blocks: list[dict[str, Any]] = [
        {"type": "text", "text": item} if isinstance(item, str) else copy.deepcopy(dict(item))
        for item in system
    ]
    tool_list = None if tools is None else [copy.deepcopy(dict(t)) for t in tools]
    if blocks:
        if not any("cache_control" in b for b in blocks):
            blocks[-1]["cache_control"] = cache_marker(ttl)
    elif tool_list and not any("cache_control" in t for t in tool_list):
        tool_list[-1]["cache_control"] = cache_marker(ttl)
    return Prefix(system=tuple(blocks), tools=None if tool_list is None else tuple(tool_list))


def fingerprint(model: str | None, system: Any, tools: Any = None) -> str:
    """sha256 of the canonical JSON of model, system and tools (docs/observations.md, The fingerprint)."""
    doc: dict[str, Any] = {"model": model, "system": system}
    if tools is not None:
        doc["tools"] = tools
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
