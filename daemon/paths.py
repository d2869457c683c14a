"""The daemon's folders on disk: model cache and session state, per platform."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["cache_dir", "state_dir"]


def cache_dir() -> Path:
    """Regenerable files (the built-in models): $MLXD_CACHE_DIR, else the user cache folder."""
    if os.environ.get("MLXD_CACHE_DIR"):
        return Path(os.environ["MLXD_CACHE_DIR"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "mlxd"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlxd"


def state_dir() -> Path:
    """Durable state (session caches): $MLXD_STATE_DIR, else the user state folder."""
    if os.environ.get("MLXD_STATE_DIR"):
        return Path(os.environ["MLXD_STATE_DIR"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlxd"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "mlxd"
