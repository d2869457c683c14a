"""The daemon's settings, with defaults a user would expect on this machine."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

from mlxd.paths import cache_dir, state_dir
from mlxd.rpc import (
    DEFAULT_MAX_FRAME_BYTES,
    SocketPathTooLong,
    check_socket_path,
    default_socket_path,
)

__all__ = ["Config", "ConfigError", "default_kv_budget", "parse_bytes"]

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
    prefix_cache: bool = True  # reuse any cached prefix; keep sessionless caches
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
    distributed: bool = False  # rank 0 of an mlx.launch group (distributed.py)
    rank_timeout_s: float = 30.0  # a step the group does not finish by then: a rank is lost
    http: tuple[str, int] | None = None  # --http HOST:PORT: a TCP listener (token required)
    http_cors: str | None = None  # the one browser origin allowed to call the HTTP API
    activation_socket: str | None = None  # launchd Sockets key / systemd FileDescriptorName
    idle_exit_s: float | None = None  # exit (sessions saved) after this long with nothing to do
    idle_exit_keep_connections: bool = False  # an open connection counts as something to do

    def validate(self) -> None:
        """Refuse settings the daemon cannot serve with (ConfigError, one clear line): a
        zero batch or prefill chunk would make every request wait forever."""
        for f in fields(self):
            value = getattr(self, f.name)
            low, high = _RANGES.get(f.name, (None, None))
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{_option(f.name)} must be a finite number, not {value}")
            if low is not None and value < low:
                raise ConfigError(f"{_option(f.name)} must be at least {low}, not {value}")
            if high is not None and value > high:
                raise ConfigError(f"{_option(f.name)} must be at most {high}, not {value}")
        if self.kv_bits not in (0, 4, 8):
            raise ConfigError(f"--kv-bits must be 0, 4 or 8, not {self.kv_bits}")
        if self.backend not in ("asyncio", "trio"):
            raise ConfigError(f"--backend must be asyncio or trio, not {self.backend!r}")
        try:
            check_socket_path(self.socket)
        except SocketPathTooLong as exc:
            raise ConfigError(str(exc)) from None
        _writable_folder(self.state_dir, "--state-dir")


class ConfigError(ValueError):
    """A setting the daemon cannot run with; the message names the option."""


# (least, most) for each numeric setting; None: no bound on that side.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "kv_budget_bytes": (1, None),
    "disk_budget_bytes": (0, None),
    "block_tokens": (1, None),
    "max_queue": (0, None),
    "max_inflight_per_connection": (1, None),
    "max_frame_bytes": (1024, None),
    "idle_frame_timeout_s": (0.001, None),
    "drain_timeout_s": (0, 86_400),
    "persist_timeout_s": (0, 86_400),
    "prefill_step_size": (1, None),
    "max_batch": (1, None),
    "rank_timeout_s": (1, 86_400),
}
_OPTIONS = {
    "kv_budget_bytes": "--kv-budget",
    "disk_budget_bytes": "--disk-budget",
    "prefill_step_size": "--prefill-chunk",
    "drain_timeout_s": "--drain-timeout",
    "idle_frame_timeout_s": "--idle-frame-timeout",
    "rank_timeout_s": "--rank-timeout",
}


def _option(name: str) -> str:
    return _OPTIONS.get(name, "--" + name.replace("_", "-"))


def _writable_folder(folder: Path, option: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        with tempfile.TemporaryFile(dir=folder):
            pass  # as root, permission bits do not stop writes: only trying tells
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{option} {folder} is not a writable folder: {reason}") from None
