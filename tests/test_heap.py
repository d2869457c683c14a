"""The heap release the engine runs, the thresholds the daemon pins, and jemalloc when asked
for: freed big buffers leave RSS (Linux, glibc)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlxd.daemon.heap import find_jemalloc, jemalloc_env

from .daemon_proc import DaemonProcess, short_tmpdir

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap")

# What both scripts share: malloc'd blocks that are really touched, and the process's RSS.
_PRELUDE = r"""
import ctypes, sys, threading, time
from mlxd.daemon.heap import pin_heap_thresholds, release_free_heap
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
"""

# Raise glibc's dynamic mmap threshold (free a 16 MiB block), then allocate 128 x 1 MiB and
# free every other one: how much of the freed 64 MiB stays in RSS? (and how long a trim takes)
_HOLES_SCRIPT = r"""
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

# The engine thread's own arena: free 16 MiB, then 20 MiB into its top, under the dynamic
# thresholds (the first free lifts the trim threshold to 32 MiB). How much stays in RSS?
_THREAD_SCRIPT = r"""
pinned = pin_heap_thresholds() if sys.argv[1] == "pin" else False
kept = []

def engine_thread():
    base = rss_kib()
    libc.free(touched(16 << 20))
    for p in [touched(1 << 20) for _ in range(20)]:
        libc.free(p)
    release_free_heap()
    kept.append(rss_kib() - base)

thread = threading.Thread(target=engine_thread)
thread.start()
thread.join()
print(kept[0], pinned)
"""


# 64 MiB freed between live blocks with nothing else happening: how much is still resident
# once `seconds` have passed, and how long until under 8 MiB?
_DECAY_SCRIPT = r"""
pin_heap_thresholds()  # on glibc: the daemon's settings, the blocks from the heap
base = rss_kib()
blocks = [touched(1 << 20) for _ in range(128)]
for p in blocks[::2]:
    libc.free(p)
t0 = time.monotonic()
while (kept := rss_kib() - base - 64 * 1024) > 8 * 1024 and time.monotonic() - t0 < 5:
    time.sleep(0.1)
print(kept, time.monotonic() - t0)
"""


def _run(script: str, mode: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run `script` in a fresh process; (MiB it kept resident, its second output)."""
    out = subprocess.run(
        [sys.executable, "-c", _PRELUDE + script, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    kib, other = out.stdout.split()
    return int(kib) / 1024, other


def test_release_returns_the_holes_to_the_system() -> None:
    # The control shows the harm: glibc alone keeps the freed 64 MiB resident.
    assert _run(_HOLES_SCRIPT, "none")[0] > 48
    kept, seconds = _run(_HOLES_SCRIPT, "trim")
    assert kept < 8
    assert float(seconds) < 0.5  # the engine runs it between steps


def test_pinned_thresholds_return_a_thread_arenas_free_top() -> None:
    # The control: even after a trim, the thread's arena keeps the freed 20 MiB.
    kept, pinned = _run(_THREAD_SCRIPT, "none")
    assert kept > 16 and pinned == "False"
    kept, pinned = _run(_THREAD_SCRIPT, "pin")
    assert pinned == "True" and kept < 4


def test_the_users_own_malloc_settings_win() -> None:
    # Settings that keep a freed top of up to 64 MiB: glibc follows them, not the pin.
    env = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}
    kept, pinned = _run(_THREAD_SCRIPT, "pin", env)
    assert pinned == "False" and kept > 16


def test_jemalloc_returns_freed_holes_within_seconds_without_a_trim() -> None:
    lib = find_jemalloc()
    if lib is None:
        pytest.skip("no libjemalloc.so.2 here (python3 dev.py setup installs libjemalloc2)")
    # The control: glibc keeps the holes until a trim, however long it waits.
    kept, _ = _run(_DECAY_SCRIPT, "none")
    assert kept > 48
    env = jemalloc_env(os.environ, lib)
    assert env is not None
    kept, seconds = _run(_DECAY_SCRIPT, "none", env)
    assert kept < 8 and float(seconds) < 4, (kept, seconds)


def test_without_jemalloc_the_restart_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxd.daemon import heap

    monkeypatch.setattr(heap, "find_jemalloc", lambda: None)
    assert heap.restart_on_jemalloc() == (
        "needs Linux and libjemalloc.so.2 (Debian: apt-get install libjemalloc2)"
    )


@pytest.mark.parametrize("option", ["system", "jemalloc"])
def test_the_daemon_runs_on_the_allocator_asked_for(option: str, model_cache: Path) -> None:
    folder = short_tmpdir()
    daemon = DaemonProcess(folder, model_cache, "--allocator", option)
    try:
        if option == "jemalloc" and find_jemalloc() is None:  # refused, in one line
            daemon.spawn()
            assert daemon.wait() == 1
            assert "--allocator jemalloc needs Linux and libjemalloc.so.2" in daemon.lines[-1]
            return
        daemon.start()
        assert daemon.proc is not None
        maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()  # the same pid after the exec
        expected = "jemalloc" if option == "jemalloc" else "glibc"
        assert [e["allocator"] for e in daemon.events("heap")] == [expected]
        assert ("libjemalloc" in maps) == (option == "jemalloc")
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        shutil.rmtree(folder, ignore_errors=True)
