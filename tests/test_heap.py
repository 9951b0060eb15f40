"""keepwarm.heap: memory the process freed goes back to the OS, not only back to malloc."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest

from keepwarm.heap import keep_large_blocks_mapped, release_free_memory

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's"
)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@glibc
def test_freed_buffers_pinned_by_live_ones_return_to_the_os() -> None:
    # 64 kB buffers come from malloc's heap (below its mmap threshold), as a ping's request
    # bodies and a scrape's chunks do. Every tenth stays alive, so the freed ones lie between
    # live ones and malloc's own trimming of the heap's top cannot give them back.
    buffers = [b"x" * (64 * 1024) + bytes([i % 256]) for i in range(2_000)]
    kept = buffers[::10]
    del buffers
    before = _rss_mb()
    assert release_free_memory() is True
    after = _rss_mb()
    assert before - after > 50, (before, after)  # ~112 MB were freed
    assert len(kept) == 200 and all(len(b) == 64 * 1024 + 1 for b in kept)  # what is live is untouched


def test_it_is_safe_to_call_again_and_again() -> None:
    first = release_free_memory()
    assert all(release_free_memory() == first for _ in range(3))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mapped_mb() -> float:
    """Bytes in blocks that have a mapping of their own (glibc's mallinfo2().hblkhd), in MiB."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return float(libc.mallinfo2().hblkhd) / 2**20


@glibc
def test_large_blocks_keep_their_own_mapping_after_a_larger_one_was_freed() -> None:
    assert keep_large_blocks_mapped() is True
    big = b"y" * (8 * 1024 * 1024) + b"z"  # freed, it would lift glibc's own threshold past 8 MB
    del big
    # A scrape's 256 kB chunks: each in its own mapping, so freeing one unmaps it, rather than
    # in the heap (0.4 MB mapped here without the call).
    chunks = [b"c" * (256 * 1024) + bytes([i % 256]) for i in range(200)]
    assert _mapped_mb() > 45
    assert len(chunks) == 200
