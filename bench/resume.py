"""Time to first token of a follow-up turn: cold, hot (in memory), from disk after a restart."""

from __future__ import annotations

import time
from typing import Any

from mlxd.client import Client

from .common import Daemon

SIZES = (1024, 4096, 8192)
QUICK_SIZES = (1024, 2048)
TURN = 16


def conversation(n: int, tag: str) -> str:
    """About `n` tokens (the built-in tokenizer is byte-level: one ASCII char, one token)."""
    line = f"[{tag}] The agent reads a file, thinks about it, and writes a careful note. "
    return (line * (n // len(line) + 1))[:n]


def run(model: str, quick: bool) -> dict[str, Any]:
    rows = []
    daemon = Daemon(model)
    daemon.start()
    try:
        for n in QUICK_SIZES if quick else SIZES:
            conv = conversation(n, f"c{n}")
            with Client(daemon.socket) as c:
                first_hot = c.generate(conv, session=f"hot-{n}", max_tokens=TURN)
                first_disk = c.generate(conv, session=f"disk-{n}", max_tokens=TURN)
                follow = conv + first_hot.text + " And what next?"
                follow_disk = conv + first_disk.text + " And what next?"
                assert follow == follow_disk  # greedy: both sessions said the same
                cold = c.generate(follow, max_tokens=TURN)
                hot = c.generate(follow, session=f"hot-{n}", max_tokens=TURN)
                t0 = time.perf_counter()
                c.sessions_save(f"disk-{n}")
                save_s = time.perf_counter() - t0
                info = c.sessions_get(f"disk-{n}")
            daemon.restart()  # SIGTERM: drain and save; then a new process on the same state
            with Client(daemon.socket) as c:
                disk = c.generate(follow, session=f"disk-{n}", max_tokens=TURN)
            rows.append(
                {
                    "cached_tokens": hot.usage.cached_tokens,
                    "prompt_tokens": cold.usage.prompt_tokens,
                    "cold_ttft_ms": cold.timings.ttft_ms,
                    "hot_ttft_ms": hot.timings.ttft_ms,
                    "disk_ttft_ms": disk.timings.ttft_ms,
                    "hot_speedup": cold.timings.ttft_ms / hot.timings.ttft_ms,
                    "disk_speedup": cold.timings.ttft_ms / disk.timings.ttft_ms,
                    "disk_cached_tokens": disk.usage.cached_tokens,
                    "exact": cold.tokens == hot.tokens == disk.tokens,
                    "file_bytes": info.bytes,
                    "file_mb_per_1k": info.bytes / 1e6 / (info.tokens / 1000),
                    "save_ms_per_1k": save_s * 1000 / (info.tokens / 1000),
                    # restore from disk (read, validate, to MLX) beyond what a hot turn costs:
                    "load_ms_per_1k": max(0.0, disk.timings.ttft_ms - hot.timings.ttft_ms)
                    / (info.tokens / 1000),
                }
            )
    finally:
        daemon.stop()
    return {"rows": rows, "turn_tokens": TURN}
