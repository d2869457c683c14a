"""Aggregate generated tokens/s through the daemon at 1, 4 and 16 concurrent streaming
clients, against mlx-lm's own `batch_generate` in-process on the same model and prompts,
and single-stream decode tokens/s through the socket against `mlx_lm.stream_generate`.

mlx-lm runs in a worker process next to the daemon; only one of the two computes at a
time (the other waits on a pipe or a socket, and the CPU it used meanwhile is recorded).
Every daemon measurement is paired with the same mlx-lm measurement right before or after
it, alternating the order by round, and ratios are taken per pair: on a shared machine the
load moves, and a pair sees about the same load. Greedy throughout. Token counts are what
each side actually computed (an end-of-sequence token counts once on both sides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .common import MODEL_CACHE, ROOT, Daemon, at_once, loadavg, median

CLIENTS = (1, 2, 4, 8, 16)
QUICK_CLIENTS = (1, 4, 16)
SINGLE_PER_ROUND = 2  # single-stream pairs per round


def prompts(n: int) -> list[str]:
    """Distinct prompts of ~50 tokens on which the random-weight model does not stop early."""
    return [f"Request {i}: write a long story about the number {i * 7919}. " for i in range(n)]


WORKER = r"""
# mlx-lm in-process on the same model: a worker that waits on stdin (idle, no CPU) for
# one JSON command a line and answers one JSON line on stdout.
import json, os, sys, time
from pathlib import Path
import mlxd.daemon  # OpenBLAS before mlx, as in the daemon
from mlx.utils import tree_flatten
from mlx_lm.generate import batch_generate, stream_generate
from mlxd.daemon.models.model import load_model

spec, max_tokens, texts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
m = load_model(spec, Path(os.environ["MLXD_CACHE_DIR"]))
tok = [list(m.tokenizer.encode(t)) for t in texts]
batch_generate(m.model, m.tokenizer, tok[:2], max_tokens=8)  # warm-up
for _ in stream_generate(m.model, m.tokenizer, tok[1], max_tokens=8):
    pass

def batch(n):
    t0 = time.perf_counter()
    r = batch_generate(m.model, m.tokenizer, tok[:n], max_tokens=max_tokens, return_token_ids=True)
    wall = time.perf_counter() - t0
    ids = [list(map(int, t)) for t in r.token_ids]
    # batch_generate drops the end-of-sequence token from its output: it was computed, count it
    computed = sum(len(t) + (len(t) < max_tokens) for t in ids)
    return {"tokens": computed, "wall_s": wall, "tps": computed / wall, "ids": ids,
            "stopped_early": sum(len(t) < max_tokens for t in ids)}

def single():
    t0 = time.perf_counter(); first = None; ids = []
    for resp in stream_generate(m.model, m.tokenizer, tok[0], max_tokens=max_tokens):
        ids.append(int(resp.token))  # the last response carries the last token (EOS included)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": len(ids), "ttft_ms": (first - t0) * 1000,
            "decode_tps": (len(ids) - 1) / (end - first), "ids": ids}

hello = {"params": sum(v.size for _, v in tree_flatten(m.model.parameters())),
         "prompt_tokens": [len(t) for t in tok]}
print(json.dumps(hello), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    out = batch(cmd["n"]) if cmd["op"] == "batch" else single()
    print(json.dumps(out), flush=True)
"""


class Baseline:
    """The mlx-lm worker process: `batch(n)` and `single()` run there, one at a time."""

    def __init__(self, model: str, max_tokens: int, texts: list[str]) -> None:
        env = dict(os.environ, MLXD_CACHE_DIR=str(MODEL_CACHE), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, model, str(max_tokens), json.dumps(texts)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        self.hello = self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the mlx-lm baseline worker died ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, **cmd: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _cpu_s(pid: int) -> float:
    """CPU seconds a process has used (Linux), to show the idle side stayed idle."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _through_daemon(socket: Path, n: int, max_tokens: int, texts: list[str]) -> dict[str, Any]:
    """n clients, each on its own connection, streaming at once; wall = first send to last reply."""

    def one(i: int, go: Callable[[], None]) -> dict[str, Any]:
        with Client(socket) as client:
            go()
            t0 = time.perf_counter()
            first = None
            stream = client.stream(texts[i], max_tokens=max_tokens)
            for _ in stream:
                if first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            r = stream.result
            assert r is not None
            return {"sent": t0, "first": first or end, "end": end, "result": r}

    done = at_once(n, one)
    wall = max(r["end"] for r in done) - min(r["sent"] for r in done)
    results = [r["result"] for r in done]
    tokens = sum(r.usage.completion_tokens for r in results)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tps": tokens / wall,
        # Without the end-of-sequence token, which batch_generate leaves out of its ids.
        "ids": [list(r.tokens[:-1] if r.finish_reason == "stop" else r.tokens) for r in results],
        "stopped_early": sum(r.finish_reason == "stop" for r in results),
        "ttft_ms_p50": median([r.timings.ttft_ms for r in results]),
        "client": done,
    }


def _single_daemon(socket: Path, max_tokens: int, text: str) -> dict[str, Any]:
    got = _through_daemon(socket, 1, max_tokens, [text])
    c = got["client"][0]
    r = c["result"]
    n = r.usage.completion_tokens
    t = r.timings
    return {
        "tokens": n,
        "ids": list(r.tokens),
        "ttft_ms": t.ttft_ms,
        # the brief's definition, from the daemon's own timings
        "decode_tps": (n - 1) / ((t.total_ms - t.ttft_ms) / 1000) if n > 1 else 0.0,
        # the same seen by the client: first delta to the final reply, socket included
        "client_ttft_ms": (c["first"] - c["sent"]) * 1000,
        "client_decode_tps": (n - 1) / (c["end"] - c["first"]) if n > 1 else 0.0,
    }


def run(model: str, quick: bool, log: Any = None) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    counts = QUICK_CLIENTS if quick else CLIENTS
    max_tokens = 32 if quick else 128
    rounds = 1 if quick else 4  # even: each order (mlx-lm first, daemon first) equally often
    texts = prompts(max(counts))
    # Both stay up; only one computes at a time. Each measurement on one side is paired with
    # the same measurement on the other right after it (the order alternating by round), so a
    # change in the shared machine's load hits both sides of a ratio alike.
    log("  starting the mlx-lm worker and the daemon")
    base = Baseline(model, max_tokens, texts)
    try:
        with Daemon(model) as daemon:
            assert daemon.proc is not None
            with Client(daemon.socket) as client:
                client.generate(texts[1], max_tokens=8)  # warm-up, like the worker's
                status = client.status()
                if [client.tokenize(t).count for t in texts] != base.hello["prompt_tokens"]:
                    raise RuntimeError("the daemon and mlx-lm tokenized the prompts differently")
            pids = {"daemon": daemon.proc.pid, "mlx-lm": base.proc.pid}
            idle_cpu = {"daemon": 0.0, "mlx-lm": 0.0}  # CPU s each used while the other measured

            def one(side: str, n: int | str) -> Any:
                if side == "mlx-lm":
                    return base.ask(op="single") if n == "single" else base.ask(op="batch", n=n)
                if n == "single":
                    return _single_daemon(daemon.socket, max_tokens, texts[0])
                assert isinstance(n, int)
                return _through_daemon(daemon.socket, n, max_tokens, texts)

            def measure(side: str, fn: Any) -> Any:
                other = "mlx-lm" if side == "daemon" else "daemon"
                before = _cpu_s(pids[other])
                got = fn()
                idle_cpu[other] += _cpu_s(pids[other]) - before
                return got

            pairs: list[dict[str, Any]] = []
            for k in range(rounds):
                order = ("mlx-lm", "daemon") if k % 2 == 0 else ("daemon", "mlx-lm")
                for n in (*counts, *["single"] * SINGLE_PER_ROUND):
                    got: dict[str, Any] = {"round": k, "n": n}
                    for side in order:
                        got[side] = measure(side, lambda side=side, n=n: one(side, n))
                    pairs.append(got)
                    if n == "single":
                        d, b = got["daemon"]["decode_tps"], got["mlx-lm"]["decode_tps"]
                    else:
                        d, b = got["daemon"]["tps"], got["mlx-lm"]["tps"]
                    log(
                        f"  round {k + 1}/{rounds}, {n}: mlxd {d:.1f} vs mlx-lm {b:.1f} tok/s = {d / b:.2f}x, load {loadavg()}"
                    )
    finally:
        base.close()

    rows = []
    for n in counts:
        ps = [p for p in pairs if p["n"] == n]
        d_tps = [p["daemon"]["tps"] for p in ps]
        b_tps = [p["mlx-lm"]["tps"] for p in ps]
        same = sum(
            a == b for p in ps for a, b in zip(p["daemon"]["ids"], p["mlx-lm"]["ids"], strict=True)
        )
        rows.append(
            {
                "clients": n,
                "daemon_tps": median(d_tps),
                "batch_generate_tps": median(b_tps),
                "ratio": median([d / b for d, b in zip(d_tps, b_tps, strict=True)]),
                "ratios": [d / b for d, b in zip(d_tps, b_tps, strict=True)],
                "daemon_tps_rounds": d_tps,
                "batch_generate_tps_rounds": b_tps,
                "daemon_tokens": ps[-1]["daemon"]["tokens"],
                "batch_tokens": ps[-1]["mlx-lm"]["tokens"],
                "daemon_wall_s": [p["daemon"]["wall_s"] for p in ps],
                "batch_wall_s": [p["mlx-lm"]["wall_s"] for p in ps],
                "daemon_stopped_early": sum(p["daemon"]["stopped_early"] for p in ps),
                "batch_stopped_early": sum(p["mlx-lm"]["stopped_early"] for p in ps),
                "same_tokens": f"{same}/{n * len(ps)}",
                "daemon_ttft_ms_p50": median([p["daemon"]["ttft_ms_p50"] for p in ps]),
            }
        )
    ps = [p for p in pairs if p["n"] == "single"]
    d_single = [p["daemon"] for p in ps]
    b_single = [p["mlx-lm"] for p in ps]
    ratios = [d["decode_tps"] / b["decode_tps"] for d, b in zip(d_single, b_single, strict=True)]
    single = {
        "daemon_decode_tps": median([s["decode_tps"] for s in d_single]),
        "daemon_client_decode_tps": median([s["client_decode_tps"] for s in d_single]),
        "stream_generate_decode_tps": median([s["decode_tps"] for s in b_single]),
        "ratio": median(ratios),
        "ratios": ratios,
        "client_ratio": median(
            [
                d["client_decode_tps"] / b["decode_tps"]
                for d, b in zip(d_single, b_single, strict=True)
            ]
        ),
        "daemon_ttft_ms": median([s["ttft_ms"] for s in d_single]),
        "daemon_client_ttft_ms": median([s["client_ttft_ms"] for s in d_single]),
        "stream_generate_ttft_ms": median([s["ttft_ms"] for s in b_single]),
        "tokens": d_single[0]["tokens"],
        "same_tokens": f"{sum(d['ids'] == b['ids'] for d, b in zip(d_single, b_single, strict=True))}/{len(ps)}",
        "samples": len(ps),
    }
    return {
        "status": status,
        "params": base.hello["params"],
        "max_tokens": max_tokens,
        "rounds": rounds,
        "prompt_tokens": base.hello["prompt_tokens"],
        "idle_cpu_s": idle_cpu,
        "rows": rows,
        "single": single,
    }
