"""Prefill and decode tokens/s of one model in each weights mode (`--weights native`: the
quantized weights as stored; `float32`: dequantized), with mlx-lm in-process and through
the daemon. Meant for a quantized model such as builtin:smollm2 (4-bit GGUF); on an
unquantized model both modes are the same weights.

In-process: `mlx_lm.stream_generate` on `load_model(..., weights=MODE)` in a worker process
(OpenBLAS loaded first, as in the daemon); its own prompt_tps and generation_tps. Daemon:
one greedy `generate` at a time; prefill = prompt tokens / TTFT, decode = (completion - 1)
/ (total - TTFT). Each figure is the median over the rounds; one mode runs at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .common import MODEL_CACHE, ROOT, Daemon, loadavg, median

MODES = ("native", "float32")
# Real text, so a real model keeps writing instead of stopping at once.
TEXT = (
    "The history of the city begins with a small fishing village on the banks of the river. "
    "Over the centuries, merchants arrived from distant lands, bringing spices, silk and new "
    "ideas. The village grew into a town, and the town into a busy port with markets, "
    "churches, schools and a great library that scholars visited from across the continent. "
)

WORKER = r"""
import json, os, sys, time
from pathlib import Path
import mlxd.daemon  # OpenBLAS before mlx
from mlx_lm import stream_generate
from mlxd.daemon.models.model import load_model
spec, mode, prompt, max_tokens, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
m = load_model(spec, Path(os.environ["MLXD_CACHE_DIR"]), weights=mode)
tokens = m.tokenizer.encode(prompt)
for _ in stream_generate(m.model, m.tokenizer, tokens[:16], max_tokens=4):  # warm-up
    pass
out = []
for _ in range(rounds):
    last = None
    for last in stream_generate(m.model, m.tokenizer, tokens, max_tokens=max_tokens):
        pass
    out.append({"prompt_tokens": last.prompt_tokens, "prefill_tps": last.prompt_tps,
                "generated": last.generation_tokens, "decode_tps": last.generation_tps})
print(json.dumps({"weights": m.weights, "dtype": m.dtype, "rounds": out}))
"""


def _prompt(quick: bool) -> str:
    return TEXT * (2 if quick else 6)  # ~140 or ~420 tokens


def _in_process(model: str, mode: str, prompt: str, max_tokens: int, rounds: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, model, mode, prompt, str(max_tokens), str(rounds)],
        capture_output=True, text=True, timeout=3600, cwd=ROOT,
        env=dict(os.environ, MLXD_CACHE_DIR=str(MODEL_CACHE)),
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"mlx-lm worker ({mode}) failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    rs = res["rounds"]
    return {
        "weights": res["weights"],
        "prompt_tokens": rs[0]["prompt_tokens"],
        "generated": median([r["generated"] for r in rs]),
        "prefill_tps": median([r["prefill_tps"] for r in rs]),
        "decode_tps": median([r["decode_tps"] for r in rs]),
    }


def _daemon(model: str, mode: str, prompt: str, max_tokens: int, rounds: int) -> dict[str, Any]:
    with Daemon(model, "--weights", mode) as daemon, Client(daemon.socket) as client:
        weights = client.models_current().weights
        client.generate(prompt[:64], max_tokens=4)  # warm-up
        rs = []
        for _ in range(rounds):
            r = client.generate(prompt, max_tokens=max_tokens, temperature=0.0)
            ttft, total = r.timings.ttft_ms / 1000, r.timings.total_ms / 1000
            decode = (r.usage.completion_tokens - 1) / (total - ttft) if total > ttft else 0.0
            rs.append(
                (
                    r.usage.prompt_tokens,
                    r.usage.completion_tokens,
                    r.usage.prompt_tokens / ttft,
                    decode,
                )
            )
        status = client.status()
    return {
        "weights": weights,
        "prompt_tokens": rs[0][0],
        "generated": median([x[1] for x in rs]),
        "prefill_tps": median([x[2] for x in rs]),
        "decode_tps": median([x[3] for x in rs]),
        "status": status,
    }


def run(model: str, quick: bool, log: Any = None) -> dict[str, Any]:
    prompt, max_tokens, rounds = _prompt(quick), 32 if quick else 64, 1 if quick else 3
    res: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "rounds": rounds}
    for mode in MODES:
        if log:
            log(f"weights {mode}: mlx-lm in-process")
        res[f"mlx_lm_{mode}"] = _in_process(model, mode, prompt, max_tokens, rounds)
        if log:
            log(f"weights {mode}: through the daemon")
        d = _daemon(model, mode, prompt, max_tokens, rounds)
        res["status"] = d.pop("status")
        res[f"daemon_{mode}"] = d
    res["load"] = loadavg()
    return res


# -- report ------------------------------------------------------------------------------


def headline(res: dict[str, Any]) -> list[str]:
    n, f = res.get("daemon_native"), res.get("daemon_float32")
    if not (n and f):
        return []
    return [
        f"| weights ({res['model']}): prefill / decode tok/s through the daemon, native vs float32 "
        f"(reported) | native {n['prefill_tps']:.0f} / {n['decode_tps']:.1f}; float32 "
        f"{f['prefill_tps']:.0f} / {f['decode_tps']:.1f} | - |"
    ]


def section(res: dict[str, Any]) -> list[str]:
    lines = [
        "## Weights modes",
        "",
        f"{res['model']}: one greedy request at a time, max_tokens {res['max_tokens']}, "
        f"median of {res['rounds']} round(s); load average {res['load']}.",
        "",
        "| side | weights | prompt tokens | prefill tok/s | generated | decode tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for side in ("mlx_lm", "daemon"):
        for mode in MODES:
            r = res.get(f"{side}_{mode}")
            if r:
                lines.append(
                    f"| {'mlx-lm in-process' if side == 'mlx_lm' else 'mlxd'} | {r['weights']} | "
                    f"{r['prompt_tokens']} | {r['prefill_tps']:.1f} | {r['generated']:.0f} | "
                    f"{r['decode_tps']:.1f} |"
                )
    return [*lines, ""]


def plot(res: dict[str, Any], out: Path, plt: Any) -> str:
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    for k, metric in enumerate(("prefill_tps", "decode_tps")):
        labels, values = [], []
        for side in ("mlx_lm", "daemon"):
            for mode in MODES:
                r = res.get(f"{side}_{mode}")
                if r:
                    labels.append(f"{'mlx-lm' if side == 'mlx_lm' else 'mlxd'}\n{mode}")
                    values.append(r[metric])
        ax[k].bar(labels, values)
        ax[k].set_title(metric.replace("_tps", " tok/s"))
    fig.tight_layout()
    fig.savefig(out / "weights.png", dpi=110)
    return "weights.png"
