"""Helper for test_crash_save: write two versions of a session cache, over and over.

Run as `python tests/crash_writer.py PATH FINGERPRINT LAYERS KV_HEADS HEAD_DIM`. It forks
a writer per "fork" line on stdin and prints "child PID"; the child writes version K % 2
(K counting up from the number of earlier forks), printing "PID writing K" before each
write and "PID wrote K" after it, forever, until the test SIGKILLs it; then this process
prints "reaped PID SIGNAL" and waits for the next line.

The writers run daemon/kv/cachefile.py's own write_snapshot, loaded from its file alone:
the daemon package loads OpenBLAS, and mlx and mlx-lm take over a second (mlx-lm imports
transformers) and start thread pools; forking a process with those threads can hang.
Writing a file needs none of them (cachefile.py imports no MLX): numpy, safetensors, and
the standard-library-only mlxd.durable and mlxd.faults.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

PERSISTENCE = Path(__file__).resolve().parent.parent / "daemon" / "kv" / "cachefile.py"


def _load_persistence() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("crash_persistence", PERSISTENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TEXTS = (
    "The first version of this conversation, written again and again. " * 8,
    "The second version, a little longer, so the two files differ in size too. " * 9,
)


def snapshots(
    layers: int, kv_heads: int, head_dim: int, persistence: types.ModuleType
) -> list[Any]:
    """The two versions; the token ids are the texts' bytes, as the built-in tokenizer has it."""
    out = []
    for version, text in enumerate(TEXTS):
        tokens = list(text.encode())
        rng = np.random.default_rng(version)
        shape = (1, kv_heads, len(tokens), head_dim)
        arrays = {
            f"layers.{i}.{kv}": rng.standard_normal(shape, dtype=np.float32)
            for i in range(layers)
            for kv in ("keys", "values")
        }
        out.append(persistence.Snapshot(tokens, arrays, 0, 0, "float32", layers))
    return out


def say(line: str) -> None:
    # One write(2) per line: this process and its children share the pipe, and a write of
    # under PIPE_BUF bytes is never interleaved (print() may write a line in two).
    os.write(1, f"{line}\n".encode())


def write_forever(
    path: Path, fingerprint: str, snaps: list[Any], persistence: types.ModuleType, start: int
) -> None:
    pid = os.getpid()
    for k in range(start, 10**9):
        say(f"{pid} writing {k}")
        persistence.write_snapshot(path, snaps[k % 2], fingerprint=fingerprint, session=path.stem)
        say(f"{pid} wrote {k}")


def main() -> None:
    path, fingerprint = Path(sys.argv[1]), sys.argv[2]
    layers, kv_heads, head_dim = (int(x) for x in sys.argv[3:6])
    persistence = _load_persistence()
    snaps = snapshots(layers, kv_heads, head_dim, persistence)
    say("ready")
    for forks, line in enumerate(sys.stdin):
        if line.strip() != "fork":
            break
        child = os.fork()
        if child == 0:
            try:  # each writer starts with the other version than the one before
                write_forever(path, fingerprint, snaps, persistence, start=forks)
            finally:
                os._exit(1)
        say(f"child {child}")
        _, status = os.waitpid(child, 0)
        say(f"reaped {child} {os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}")


if __name__ == "__main__":
    main()
