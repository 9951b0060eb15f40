"""Which pairs a shard keeps warm: a stable split of the pair keys over N processes.

One scheduler owns a set of pairs (an APScheduler job store cannot be shared between
processes), so scaling out means giving each process its own pairs. A pair belongs to the slot
with the highest weight `sha256(slot NUL key)` (rendezvous, or highest-random-weight, hashing):
the same on every machine, Python version and restart (unlike `hash()`, which is salted per
process), so N processes started with `--shard 0/N` … `--shard N-1/N` together ping every pair
exactly once, with no coordination between them.

Rendezvous rather than `sha256 mod N`: going from N to N + 1 shards moves only the pairs the new
shard wins, about 1/(N + 1) of them (mod N moved 80 % from 4 to 5), and each moved pair starts
without its history. The same function divides pairs among a fleet's live members (`owner`).
The weights hash the slot with the key, and the pair's phase (`keepwarm.scheduler.phase`) the
key alone, so the pairs of one shard are still spread evenly over the interval.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def weight(pair_key: str, slot: str) -> int:
    """The rendezvous weight of a pair for a slot (a shard number or a fleet member's id)."""
    digest = hashlib.sha256(f"{slot}\x00{pair_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def owner(pair_key: str, slots: Sequence[str]) -> str:
    """The slot that owns a pair: the highest weight (ties, vanishingly rare, to the larger name)."""
    if not slots:
        raise ValueError("no slot to own the pair")
    return max(slots, key=lambda slot: (weight(pair_key, slot), slot))


def shard_of(pair_key: str, shards: int) -> int:
    """The shard, in 0..shards-1, that owns a pair."""
    if shards < 1:
        raise ValueError(f"the number of shards must be at least 1, got {shards}")
    return int(owner(pair_key, [str(slot) for slot in range(shards)]))


def in_shard(pair_key: str, shard: int, shards: int) -> bool:
    """Whether shard `shard` of `shards` keeps this pair (`expert/model`) warm."""
    if not 0 <= shard < max(shards, 1):
        raise ValueError(f"shard {shard} is out of range for {shards} shard(s): use 0 to {shards - 1}")
    return shard_of(pair_key, shards) == shard


def parse_shard(text: str) -> tuple[int, int]:
    """`"K/N"` (this process is shard K of N, counting from 0) as `(K, N)`."""
    m = _SHARD.fullmatch(text)
    if not m:
        raise ValueError(f"expected K/N, such as 0/3 for the first of three shards, got {text!r}")
    shard, shards = int(m.group(1)), int(m.group(2))
    if shards < 1:
        raise ValueError(f"the number of shards must be at least 1, got {text!r}")
    if shard >= shards:
        raise ValueError(f"shard {shard} does not exist in {shards} shard(s): K counts from 0 to {shards - 1}")
    return shard, shards
