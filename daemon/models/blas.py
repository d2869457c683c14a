"""Load a fast system BLAS into the process before MLX binds its bundled reference BLAS."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

__all__ = ["load_blas"]

# The Linux mlx wheel links a bundled reference BLAS (~5 GFLOP/s). Its libmlx.so
# resolves cblas_sgemm & co. through the global symbol scope, so a library loaded
# with RTLD_GLOBAL *before* mlx.core wins: OpenBLAS makes float32 matmul ~30x faster.
_SONAME = "libopenblas.so.0"
_KNOWN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-serial/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib/libopenblas.so.0",
)
_HINT = "install libopenblas0-pthread for ~30x faster float32 matmul"

_result: str | None = None
_handle: ctypes.CDLL | None = None  # kept referenced so the library is never unloaded


def load_blas() -> str:
    """Load OpenBLAS globally (Linux) once; describe the BLAS MLX will use, for the log."""
    global _result
    if _result is None:
        _result = _load()
    return _result


def _load() -> str:
    if sys.platform == "darwin":
        return "accelerate"
    if not sys.platform.startswith("linux"):
        return "reference BLAS from the mlx wheel"
    # Checked before loading: once libmlx.so is mapped, its BLAS symbols may already be bound.
    too_late = "mlx.core" in sys.modules
    path = _open_openblas()
    desc = f"openblas ({path})" if path else f"reference BLAS from the mlx wheel ({_HINT})"
    if too_late:
        desc += "; WARNING: mlx.core was imported first, so mlx keeps its slow reference BLAS"
    return desc


def _open_openblas() -> str | None:
    global _handle
    for name in (_SONAME, *_KNOWN_PATHS):
        try:
            _handle = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return _mapped_path("libopenblas") or name
    return None


def _mapped_path(fragment: str) -> str | None:
    """The file a loaded library came from (the soname alone does not say which one)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and fragment in parts[5]:
            return parts[5]
    return None
