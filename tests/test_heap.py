"""The heap release the engine runs: freed big buffers leave RSS (glibc only)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap")

# Raise glibc's dynamic mmap threshold (free a 16 MiB block), then allocate 128 x 1 MiB and
# free every other one: how much of the freed 64 MiB stays in RSS? (and how long a trim takes)
_SCRIPT = r"""
import ctypes, sys, time
from mlxd.daemon.heap import release_free_heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

def touched(n):
    p = libc.malloc(n)
    libc.memset(p, 1, n)
    return p

libc.free(touched(16 << 20))
base = rss_kib()
blocks = [touched(1 << 20) for _ in range(128)]
for p in blocks[::2]:  # the odd ones live on, between the holes
    libc.free(p)
t0 = time.perf_counter()
if sys.argv[1] == "trim":
    release_free_heap()
print(rss_kib() - base - 64 * 1024, time.perf_counter() - t0)
"""


def _kept_mib(mode: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True
    )
    kib, seconds = out.stdout.split()
    return int(kib) / 1024, float(seconds)


def test_release_returns_the_holes_to_the_system() -> None:
    # The control shows the harm: glibc alone keeps the freed 64 MiB resident.
    assert _kept_mib("none")[0] > 48
    kept, seconds = _kept_mib("trim")
    assert kept < 8
    assert seconds < 0.5  # the engine runs it between steps
