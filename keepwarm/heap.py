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
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_trim: Callable[[int], Any] | None = None
_looked_up = False


def _malloc_trim() -> Callable[[int], Any] | None:
    global _trim, _looked_up
    with _lock:
        if not _looked_up:
            _looked_up = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                trim = libc.malloc_trim
                trim.argtypes = [ctypes.c_size_t]
                trim.restype = ctypes.c_int
                _trim = trim
            except (OSError, AttributeError):  # not glibc: nothing to call
                _trim = None
        return _trim


def release_free_memory() -> bool:
    """Return the C allocator's free pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
