"""Test-only fault injection: `MLXD_FAULT_<POINT>=N` makes the next N passes through a point fail.

Read once from the environment at import; unset (every real run) costs one dict lookup.
Points: ENGINE_STEPS (a whole batch step), TOKEN (per-token handling on the engine
thread), DELIVER (handing an update to its request on the loop), COMMIT (a session's
commit after its turn), PREFIX_COLLIDE (read once at start-up: every prefix index key is
the same, so only the token comparison tells prefixes apart), and for the session cache
files WRITE_ENOSPC (a full disk, halfway through the data), WRITE_EROFS (a read-only
folder, creating the temp file) and UNLINK_EROFS (a removal). Tests run as root, where
chmod cannot stop writes. Standard library only, so the no-MLX modules can use it too.
"""

from __future__ import annotations

import os
import threading

__all__ = ["InjectedFault", "check", "take"]

_PREFIX = "MLXD_FAULT_"
_counts: dict[str, int] = {
    key[len(_PREFIX) :]: int(value or 0)
    for key, value in os.environ.items()
    if key.startswith(_PREFIX)
}
_lock = threading.Lock()  # points are passed on the engine, loop and writer threads


class InjectedFault(RuntimeError):
    pass


def take(point: str) -> bool:
    """True (and one fewer left) when `point` is armed."""
    if not _counts.get(point):
        return False
    with _lock:
        if _counts[point] <= 0:
            return False
        _counts[point] -= 1
        return True


def check(point: str) -> None:
    """Raise InjectedFault when `point` is armed."""
    if take(point):
        raise InjectedFault(f"injected fault ({_PREFIX}{point})")
