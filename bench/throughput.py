"""Aggregate tokens/s through the daemon at N concurrent streaming clients, against mlx-lm's
own `batch_generate` and `stream_generate` on the same model and prompts, in the same run."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from mlxd.client import Client

from .common import Daemon, run_python

CLIENTS = (1, 4, 16)
QUICK_CLIENTS = (1, 4, 16)


def prompts(n: int) -> list[str]:
    return [f"Request {i}: write a long story about the number {i * 7919}. " for i in range(n)]


BASELINE = r"""
import json, sys, time
from pathlib import Path
import mlxd.daemon  # OpenBLAS before mlx
import os
from mlx_lm.generate import batch_generate, stream_generate
from mlxd.daemon.model import load_model
spec, max_tokens, counts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
texts = json.loads(sys.argv[4])
m = load_model(spec, Path(os.environ["MLXD_CACHE_DIR"]))
tok = [m.tokenizer.encode(t) for t in texts]
batch_generate(m.model, m.tokenizer, tok[:2], max_tokens=8)  # warm-up
out = {"batch": {}, "single": None}
for n in counts:
    t0 = time.perf_counter()
    r = batch_generate(m.model, m.tokenizer, tok[:n], max_tokens=max_tokens, return_token_ids=True)
    wall = time.perf_counter() - t0
    out["batch"][n] = {"tokens": sum(len(t) for t in r.token_ids), "wall_s": wall}
t0 = time.perf_counter(); first = None; n = 0
for resp in stream_generate(m.model, m.tokenizer, tok[0], max_tokens=max_tokens):
    n += 1
    if first is None: first = time.perf_counter()
end = time.perf_counter()
out["single"] = {"tokens": n, "ttft_ms": (first - t0) * 1000, "decode_tps": (n - 1) / (end - first)}
print(json.dumps(out))
"""


def _through_daemon(socket: Any, n: int, max_tokens: int, texts: list[str]) -> dict[str, float]:
    results: list[Any] = []
    start = threading.Barrier(n + 1)

    def one(i: int) -> None:
        with Client(socket) as client:
            start.wait()
            stream = client.stream(texts[i], max_tokens=max_tokens)
            for _ in stream:
                pass
            results.append(stream.result)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r.usage.completion_tokens for r in results)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tps": tokens / wall,
        "ttft_ms": sorted(r.timings.ttft_ms for r in results)[len(results) // 2],
        "decode_tps": sorted(r.timings.tokens_per_s for r in results)[len(results) // 2],
    }


def run(model: str, quick: bool) -> dict[str, Any]:
    counts = QUICK_CLIENTS if quick else CLIENTS
    max_tokens = 48 if quick else 128
    texts = prompts(max(counts))
    # The in-process baseline runs first, alone, so the two never share the 2 cores.
    base = json.loads(
        run_python(BASELINE, model, str(max_tokens), json.dumps(counts), json.dumps(texts))
    )
    rows = []
    with Daemon(model) as daemon:
        with Client(daemon.socket) as client:
            client.generate("warm up", max_tokens=8)
            status = client.status()
        for n in counts:
            got = _through_daemon(daemon.socket, n, max_tokens, texts)
            b = base["batch"][str(n)]
            b_tps = b["tokens"] / b["wall_s"]
            rows.append(
                {
                    "clients": n,
                    "daemon_tps": got["tps"],
                    "batch_generate_tps": b_tps,
                    "ratio": got["tps"] / b_tps,
                    "daemon_tokens": got["tokens"],
                    "batch_tokens": b["tokens"],
                    "daemon_ttft_ms_p50": got["ttft_ms"],
                }
            )
        single = _through_daemon(daemon.socket, 1, max_tokens, texts)
    s = base["single"]
    return {
        "status": status,
        "max_tokens": max_tokens,
        "rows": rows,
        "single": {
            "daemon_decode_tps": single["decode_tps"],
            "stream_generate_decode_tps": s["decode_tps"],
            "ratio": single["decode_tps"] / s["decode_tps"],
            "daemon_ttft_ms": single["ttft_ms"],
            "stream_generate_ttft_ms": s["ttft_ms"],
        },
    }
