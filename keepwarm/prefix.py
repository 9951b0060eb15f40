"""The cacheable request prefix of an expert, built in one place for keepwarm and production.

A cache hit needs the prefix (tools, then system, up to the breakpoint) to be
byte-identical between the keepalive ping and the application's real requests. The
safest way to get that is for both to build it here:

    from keepwarm.prefix import load_prefix
    prefix = load_prefix("/etc/keepwarm/keepwarm.yaml", "chief-economist")
    client.messages.create(model="claude-sonnet-4-6", max_tokens=1024,
                           messages=[...], **prefix.params())

The pieces (`Prefix`, `build_prefix`, `fingerprint`, `cache_marker`) live in
`keepwarm.cachekey`, below the config; this module adds reading them from a config file.
"""

from __future__ import annotations

from pathlib import Path

from keepwarm.cachekey import Prefix, build_prefix, cache_marker, fingerprint
from keepwarm.config import load_config

__all__ = ["Prefix", "UnknownExpertError", "build_prefix", "cache_marker", "fingerprint", "load_prefix"]


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
    config = load_config(Path(config_path), all_shards=True)
    for pair in config.pairs:
        if pair.expert == expert:
            return pair.prefix
    known = list(dict.fromkeys(p.expert for p in config.pairs))
    shown = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
    raise UnknownExpertError(f"no expert named {expert!r} in {config_path}; known experts: {shown}")
