"""Handing freed memory back to the operating system (glibc's `malloc_trim`).

The C allocator keeps what Python frees for reuse instead of returning it, in the main heap
and in each thread's arena (glibc gives every thread that allocates an arena of its own, up
to 8 per core). Start-up (the YAML tree of a 10,000-pair config), each ping's request and
response buffers across some 60 worker threads, and each `/metrics` scrape (megabytes of text
made in 256 kB chunks, on a fresh thread) leave such free memory behind, and the process's
resident size only grows (docs/performance.md, "The daemon at 10,000 pairs").
`malloc_trim(0)` releases every whole free page of every arena: nothing in use moves, so it is
safe at any time and from any thread; it takes each arena's lock for a few milliseconds.

On a C library without it (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

_lock = threading.Lock()
_libc: Any = None
_looked_up = False

# glibc's mallopt parameter: blocks of at least this many bytes get a mapping of their own.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value


def _glibc() -> Any:
    """The C library if it is glibc (it has malloc_trim and mallopt), else None."""
    global _libc, _looked_up
    with _lock:
        if not _looked_up:
            _looked_up = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.malloc_trim.restype = ctypes.c_int
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.mallopt.restype = ctypes.c_int
                _libc = libc
            except (OSError, AttributeError):  # not glibc: nothing to call
                _libc = None
        return _libc


def keep_large_blocks_mapped() -> bool:
    """Give every block of 128 kB or more a mapping of its own, unmapped when it is freed.

    glibc starts so, but raises the threshold to the largest such block freed so far (up to
    32 MB): after the first scrape frees its 256 kB chunks, every later chunk comes from an
    arena instead, between the pings' buffers, and leaves a hole there when freed. Setting the
    threshold once keeps it where it starts. False where the C library is not glibc.
    """
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def release_free_memory() -> bool:
    """Return the C allocator's free pages to the OS; False where the C library cannot."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
