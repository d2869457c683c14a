"""Where the daemon's socket lives by default (PROTOCOL.md, Transport); no I/O."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["SUN_PATH_MAX", "SocketPathTooLong", "check_socket_path", "default_socket_path"]

# sun_path holds 104 bytes on macOS/BSD and 108 on Linux, including the NUL.
SUN_PATH_MAX = 104 if sys.platform == "darwin" else 108


class SocketPathTooLong(ValueError):
    """The socket path does not fit in sockaddr_un.sun_path; never truncate it."""


def default_socket_path(env: dict[str, str] | None = None, platform: str | None = None) -> Path:
    """$MLXD_SOCKET, else the platform's per-user runtime folder."""
    env = dict(os.environ) if env is None else env
    platform = sys.platform if platform is None else platform
    if env.get("MLXD_SOCKET"):
        return Path(env["MLXD_SOCKET"]).expanduser()
    if platform == "darwin":
        home = Path(env.get("HOME", "~")).expanduser()
        return home / "Library" / "Application Support" / "mlxd" / "mlxd.sock"
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "mlxd" / "mlxd.sock"
    return Path(f"/tmp/mlxd-{os.getuid()}") / "mlxd.sock"


def check_socket_path(path: str | os.PathLike[str]) -> str:
    """Return the path as str, or raise SocketPathTooLong with the limit in the message."""
    raw = os.fsencode(path)
    if len(raw) + 1 > SUN_PATH_MAX:
        raise SocketPathTooLong(
            f"socket path is {len(raw)} bytes; this platform allows at most "
            f"{SUN_PATH_MAX - 1}: {os.fsdecode(raw)!r} (set --socket or MLXD_SOCKET to a shorter path)"
        )
    return os.fsdecode(raw)
