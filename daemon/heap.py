"""glibc's heap under a daemon that allocates and frees big buffers for hours.

MLX's CPU allocator takes every array from malloc. glibc serves a big request with its own
mmap and returns it to the system on free, but each such free raises the size below which
it serves from the heap instead (the dynamic mmap threshold, up to 32 MiB), and with it the
free space a heap keeps at its top before giving it back (the trim threshold, twice that).
After a few KV caches have come and gone, the next ones come from the heap, between blocks
that outlive them, and their pages stay in RSS after they are freed: a soak of
builtin:small grew RSS net of MLX's own memory by ~130 MiB in 12 minutes.

Two remedies, both needed. `malloc_trim` hands free pages in the middle of the heaps back
(it walks the free lists), but it leaves the free top of a thread's arena alone, and the
engine thread allocates from its own arena: up to 64 MiB stayed there between trims. So
`pin_heap_thresholds` fixes the thresholds at startup: big buffers from the heap at once
(the mmap threshold at its ceiling, where the dynamic one ends anyway), and any top over
4 MiB returned on free. Pinned there, a 15-minute soak's resident heap after each trim
stayed ~600 MiB instead of climbing to ~680, at no cost to throughput (paired, 4 and 16
clients: 1.00x and 1.01x). Pinning the mmap threshold low instead (128 KiB) cost 6-16% of
throughput at 8-16 clients: every step's temporaries came from fresh mmapped pages.
On other allocators (macOS) both are no-ops: they return big frees themselves.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["pin_heap_thresholds", "release_free_heap"]

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the dynamic threshold's ceiling on 64-bit glibc
TRIM_THRESHOLD = 4 << 20


def _glibc(name: str) -> ctypes._NamedFuncPointer | None:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")


def pin_heap_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds for the daemon's life (see the module's note);
    False where there is no glibc, or where the user's environment already sets them."""
    if (
        _MALLOPT is None
        or any(name.startswith("MALLOC_") and name.endswith("_THRESHOLD_") for name in os.environ)
        or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    # Either call alone ends the dynamic adjustment of both.
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        _MALLOPT(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release_free_heap() -> None:
    """Give the heap's free pages back to the system: what freed KV caches, prompt buffers
    and detokenizer state left in the middle of glibc's heaps, which it never trims itself."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
