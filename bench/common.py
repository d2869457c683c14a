"""What every benchmark suite shares: the daemon as a process, the machine, timing helpers."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemon_proc import DaemonProcess, short_tmpdir  # noqa: E402  (one way to start it)

__all__ = ["ROOT", "Daemon", "machine", "percentiles", "run_python"]

MODEL_CACHE = Path(os.environ.get("MLXD_CACHE_DIR", "~/.cache/mlxd")).expanduser()


class Daemon:
    """A daemon process for one suite: `with Daemon("builtin:small") as d: d.socket`."""

    def __init__(self, model: str, *args: str, state_dir: Path | None = None) -> None:
        self.folder = short_tmpdir()
        self.model, self.args, self.state_dir = model, args, state_dir
        self.proc: DaemonProcess | None = None

    def start(self) -> DaemonProcess:
        self.proc = DaemonProcess(
            self.folder, MODEL_CACHE, *self.args, model=self.model, state_dir=self.state_dir
        ).start(timeout=600)
        return self.proc

    def restart(self) -> DaemonProcess:
        self.stop()
        return self.start()

    def stop(self) -> int:
        return self.proc.stop(120) if self.proc is not None else 0

    @property
    def socket(self) -> Path:
        assert self.proc is not None
        return self.proc.socket

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def run_python(code: str, *args: str) -> str:
    """Run `code` in a fresh interpreter (an in-process baseline that shares no cores with
    a running daemon) and return its stdout."""
    env = dict(os.environ, MLXD_CACHE_DIR=str(MODEL_CACHE))
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"baseline failed:\n{out.stderr[-3000:]}")
    return out.stdout


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]

    return {
        "p50": at(50),
        "p95": at(95),
        "p99": at(99),
        "mean": statistics.fmean(ordered),
        "n": len(ordered),
    }


def machine(status: Any | None = None) -> dict[str, Any]:
    import mlx.core as mx

    import mlxd.daemon  # noqa: F401  (OpenBLAS before mlx)

    info = {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", "?"),
        "mlx_device": str(mx.default_device()),
    }
    if status is not None:
        info["blas"] = status.details.get("blas")
        info["model"] = status.model.id
        info["model_path"] = status.model.path
    return info
