"""The daemon's settings, with defaults a user would expect on this machine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mlxd.rpc import DEFAULT_MAX_FRAME_BYTES, default_socket_path

from .paths import cache_dir, state_dir

__all__ = ["Config", "default_kv_budget", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_bytes(text: str) -> int:
    """'512M', '2GiB', '1000' -> bytes."""
    raw = text.strip().lower().replace(" ", "")
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(digits) :]
    if unit not in _UNITS or not digits:
        raise ValueError(f"not a size: {text!r} (try 512M or 2G)")
    return int(float(digits) * _UNITS[unit])


def total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 1024**3


def default_kv_budget() -> int:
    """A quarter of system memory, at most 8 GiB: leaves room for the weights and the editor."""
    return min(total_memory() // 4, 8 * 1024**3)


@dataclass
class Config:
    model: str = "builtin:tiny"
    weights: str = "auto"  # "native" | "float32" | "auto" (float32 on CPU)
    socket: Path = field(default_factory=default_socket_path)
    backend: str = "asyncio"
    cache_dir: Path = field(default_factory=cache_dir)
    state_dir: Path = field(default_factory=state_dir)
    kv_budget_bytes: int = field(default_factory=default_kv_budget)
    disk_budget_bytes: int = 20 * 1024**3
    kv_bits: int = 0
    block_tokens: int = 256
    max_queue: int = 64
    max_inflight_per_connection: int = 64
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    idle_frame_timeout_s: float = 30.0
    drain_timeout_s: float = 20.0
    persist_timeout_s: float = 10.0
    prefill_step_size: int = 256
    max_batch: int = 32
    stdio: bool = False
