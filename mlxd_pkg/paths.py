"""Where mlxd keeps its files, per platform: model cache, session state, the API token."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from mlxd.durable import write_atomic

__all__ = ["TOKEN_FILE", "cache_dir", "load_token", "state_dir"]

TOKEN_FILE = "api-token"


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


def load_token(state_dir: Path) -> str:
    """$MLXD_API_KEY, else the token in the state folder, made (0600) on first use."""
    if os.environ.get("MLXD_API_KEY"):
        return os.environ["MLXD_API_KEY"]
    path = state_dir / TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = "mlxd-" + secrets.token_urlsafe(32)
    try:
        write_atomic(path, (token + "\n").encode(), mode=0o600, exclusive=True)
    except FileExistsError:  # another process made it first: theirs is the token
        return path.read_text().strip()
    return token
