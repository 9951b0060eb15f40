"""The cacheable request prefix of an expert, built in one place for keepwarm and production.

A cache hit needs the prefix (tools, then system, up to the breakpoint) to be
byte-identical between the keepalive ping and the application's real requests. The
safest way to get that is for both to build it here:

    from keepwarm.prefix import load_prefix
    prefix = load_prefix("/etc/keepwarm/keepwarm.yaml", "chief-economist")
    client.messages.create(model="claude-sonnet-4-6", max_tokens=1024,
                           messages=[...], **prefix.params())
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
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
        """The SPEC §1 fingerprint of this prefix on one model."""
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
    """sha256 of the canonical JSON of model, system and tools (SPEC §1)."""
    doc: dict[str, Any] = {"model": model, "system": system}
    if tools is not None:
        doc["tools"] = tools
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class UnknownExpertError(KeyError):
    """`load_prefix` was asked for an expert the config does not have."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would show the message in quotes


def load_prefix(config_path: str | Path, expert: str) -> Prefix:
    """The prefix keepwarm warms for `expert`, read from a keepwarm config file.

    Every expert of the file is found, whatever its `shard:` (production serves them all).
    Raises `keepwarm.config.ConfigError` if the config is invalid, `UnknownExpertError`
    (a `KeyError`) naming the known experts if it has no such expert.
    """
    from keepwarm.config import load_config  # late import: config imports this module

    config = load_config(Path(config_path), all_shards=True)
    for pair in config.pairs:
        if pair.expert == expert:
            return pair.prefix
    known = list(dict.fromkeys(p.expert for p in config.pairs))
    shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
    raise UnknownExpertError(f"no expert named {expert!r} in {config_path}; known experts: {shown}")
