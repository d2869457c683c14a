"""`status.memory` is read when asked, not left from the last engine step."""

from __future__ import annotations

from pathlib import Path

from mlxd.client import Client

from .daemon_proc import DaemonProcess


def test_mlx_memory_is_fresh_after_deleting_sessions(short_dir: Path, model_cache: Path) -> None:
    proc = DaemonProcess(short_dir, model_cache).start()
    try:
        with Client(proc.socket, timeout=60) as client:
            long_prompt = "words that fill several pool blocks " * 60
            for i in range(4):
                client.generate(f"{i} {long_prompt}", session=f"s{i}", max_tokens=2)
            held = client.status().memory.mlx_active_bytes
            for i in range(4):
                assert client.sessions_delete(f"s{i}")
            # No engine step since the deletes: only a fresh read can see the memory freed.
            freed = client.status().memory.mlx_active_bytes
        assert freed < held - 4 * 2**20, (held, freed)
    finally:
        assert proc.stop() == 0
