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

Even pinned, a trim every 10 s leaves what was freed since the last one resident, and the
one-hour soak's RSS net of the hot KV still grew 15.5%; trimming every 2 s cost ~1.3% of the
engine's time (25 ms a trim over GiBs of arenas, the engine's malloc locked meanwhile).
`--allocator jemalloc` is the other trade: `restart_on_jemalloc` execs the same command
again with jemalloc preloaded, whose background thread returns pages freed for a second.
In the one-hour soak RSS net of the hot KV then stayed flat once the KV budget had filled
(1017 -> 1018 MiB from the 4th tenth to the end, against 736 -> 822 on glibc), but ~200 MiB
higher than glibc's, and requests with 1200-token prompts ran 0.93x as fast (paired, pairs
0.82-1.06; likely, freed pages come back as fresh page faults). So glibc stays the default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Mapping

__all__ = [
    "allocator",
    "find_jemalloc",
    "jemalloc_env",
    "pin_heap_thresholds",
    "release_free_heap",
    "restart_on_jemalloc",
]

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the dynamic threshold's ceiling on 64-bit glibc
TRIM_THRESHOLD = 4 << 20

# Pages freed for a second go back to the system, from jemalloc's own thread.
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"


def _libc(name: str) -> ctypes._NamedFuncPointer | None:
    """A symbol of the allocator this process runs on (a preloaded one comes first)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not there
        return None


_JEMALLOC = _libc("mallctl") is not None
_MALLOC_TRIM = None if _JEMALLOC else _libc("malloc_trim")
_MALLOPT = None if _JEMALLOC else _libc("mallopt")


def allocator() -> str:
    """Which malloc the process runs on: "jemalloc", "glibc", or "system" (another libc)."""
    return "jemalloc" if _JEMALLOC else "glibc" if _MALLOPT is not None else "system"


def find_jemalloc() -> str | None:
    """jemalloc's library as the dynamic linker knows it (its cache), for LD_PRELOAD."""
    return ctypes.util.find_library("jemalloc")


def jemalloc_env(environ: Mapping[str, str], lib: str) -> dict[str, str] | None:
    """`environ` with `lib` preloaded (and configured, unless the user configured it), or
    None where jemalloc is preloaded already."""
    preload = environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        return None
    env = dict(environ, LD_PRELOAD=f"{lib} {preload}".strip())
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def restart_on_jemalloc() -> str | None:
    """Exec this same command again on jemalloc (see the module's note). Returns once it
    runs on it, or with why it cannot: not Linux, or no jemalloc installed. The process keeps
    its pid and its inherited descriptors, so a service manager's socket activation survives."""
    lib = find_jemalloc()
    if not sys.platform.startswith("linux") or lib is None:
        return "needs Linux and libjemalloc.so.2 (Debian: apt-get install libjemalloc2)"
    env = jemalloc_env(os.environ, lib)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
    return None


def pin_heap_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds for the daemon's life (see the module's note);
    False off glibc's malloc, or where the user's environment already sets them."""
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
    and detokenizer state left in the middle of glibc's heaps, which it never trims itself.
    Nothing to do on jemalloc, whose background thread does it."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
