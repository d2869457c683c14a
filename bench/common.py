"""What the benchmark suites share: the daemon as a process, the machine, small helpers."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "MODEL_CACHE",
    "ROOT",
    "Daemon",
    "at_once",
    "loadavg",
    "machine",
    "median",
    "percentiles",
    "run_python",
]

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import mlxd.daemon  # noqa: E402, F401  (loads OpenBLAS before mlx, as the daemon does)
from mlxd.paths import cache_dir  # noqa: E402

# Where the built-in models are generated on first use: $MLXD_CACHE_DIR, else the daemon's
# default, so the benchmark and the daemon share one copy.
MODEL_CACHE = cache_dir()


class Daemon:
    """`mlxd.daemon serve` as a user starts it, on its own socket and state folder.

    `start()` returns once the daemon logs its "serving" event (readiness, not a sleep);
    `stop()` sends SIGTERM (drain, save every hot session, exit 0) and returns the exit
    code; `restart()` is stop + start on the same state folder.
    """

    def __init__(self, model: str, *args: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))  # short: sun_path
        self.socket = self.folder / "d.sock"
        self.state_dir = self.folder / "state"
        self.model, self.args = model, list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.start_s = 0.0  # how long the last start took, until "serving"
        self.launcher: list[str] = []  # e.g. systemd-socket-activate -l SOCK
        # start() returns at the first log line this accepts: by default, the daemon serves.
        self.ready: Callable[[str], bool] = lambda line: _event(line) == "serving"

    def start(self, timeout: float = 900.0) -> Daemon:
        env = dict(os.environ, MLXD_CACHE_DIR=str(MODEL_CACHE), PYTHONUNBUFFERED="1")
        env.pop("MLXD_SOCKET", None)
        cmd = [
            *self.launcher, sys.executable, "-m", "mlxd.daemon", "serve", "--model", self.model,
            "--socket", str(self.socket), "--state-dir", str(self.state_dir), *self.args,
        ]  # fmt: skip
        self.lines = []
        ready = threading.Event()
        t0 = time.perf_counter()
        self.proc = proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, cwd=ROOT,
        )  # fmt: skip

        def read() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.lines.append(line)
                if self.ready(line):
                    ready.set()
            ready.set()  # the process ended: let start() see it

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or proc.poll() is not None:
            self.kill()
            raise RuntimeError("the daemon did not start:\n" + "\n".join(self.lines[-30:]))
        self.start_s = time.perf_counter() - t0
        return self

    def stop(self, timeout: float = 300.0) -> int:
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self.proc = None
        return proc.returncode

    def restart(self) -> Daemon:
        code = self.stop()
        if code != 0:
            raise RuntimeError(
                f"the daemon exited {code} on SIGTERM:\n" + "\n".join(self.lines[-30:])
            )
        return self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    def __enter__(self) -> Daemon:
        return self.start()

    def describe(self) -> str:
        """Whether the process still runs, and its last log lines: for a failure report."""
        proc = self.proc
        state = (
            "not started"
            if proc is None
            else ("running" if proc.poll() is None else f"exited with {proc.returncode}")
        )
        return f"daemon (pid {proc.pid if proc else '-'}) {state}; last log lines:\n" + "\n".join(
            self.lines[-25:]
        )

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            print(self.describe(), file=sys.stderr, flush=True)
        try:
            self.stop()
        finally:
            self.kill()
            shutil.rmtree(self.folder, ignore_errors=True)


def _event(line: str) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("event") if isinstance(record, dict) else None


def run_python(code: str, *args: str, timeout: float = 3600) -> Any:
    """Run `code` in a fresh interpreter and return the JSON its last stdout line holds.

    The in-process baselines run this way while no daemon is running, so the two never
    share the cores at the same time.
    """
    env = dict(os.environ, MLXD_CACHE_DIR=str(MODEL_CACHE), PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, env=env, check=False, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"baseline failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


T = TypeVar("T")


def at_once(n: int, work: Callable[[int, Callable[[], None]], T]) -> list[T]:
    """`work(i, go)` in n threads; each calls `go()` when ready (connected), and all
    proceed together. Returns the n results in order; the first error is raised."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    ready = threading.Barrier(n + 1)

    def one(i: int) -> None:
        try:
            results[i] = work(i, ready.wait)
        except BaseException as exc:
            errors.append(exc)
            ready.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


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


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def machine(status: Any | None = None) -> dict[str, Any]:
    """The machine, the MLX build and (from a daemon's `status`) BLAS and the model."""
    import mlx.core as mx

    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "mlx_device": str(mx.default_device()),
    }
    if status is not None:
        info["blas"] = status.details.get("blas")
        info["model"] = status.model.id
        info["model_dtype"] = status.model.dtype
        info["model_fingerprint"] = status.model.fingerprint[:16]
        info["context_length"] = status.model.context_length
    return info
