"""glibc's heap under a daemon that allocates and frees big buffers for hours.

MLX's CPU allocator takes every array from malloc. glibc serves a big request with its own
mmap and returns it to the system on free, but each such free raises the size below which
it serves from the heap instead (the dynamic mmap threshold, up to 32 MiB). After a few
KV caches have come and gone, the next ones come from the heap, between blocks that
outlive them, and their pages stay in RSS after they are freed: a soak of builtin:small
grew RSS net of MLX's own memory by ~130 MiB in 12 minutes. `malloc_trim` hands those
free pages back (it walks the free lists, not only the heap's top). Pinning the threshold
instead would keep big buffers on mmap, but it cost 6-16% of throughput at 8-16 clients:
every step's temporaries would come from fresh mmapped pages.
On other allocators (macOS) this is a no-op: they return big frees themselves.
"""

from __future__ import annotations

import ctypes

__all__ = ["release_free_heap"]


def _malloc_trim() -> ctypes._NamedFuncPointer | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def release_free_heap() -> None:
    """Give the heap's free pages back to the system: what freed KV caches, prompt buffers
    and detokenizer state left in the middle of glibc's heaps, which it never trims itself."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
