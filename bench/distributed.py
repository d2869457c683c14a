"""Tokens/s at 1, 4 and 16 clients: one process vs `serve --distributed` over 2 ranks
(mlx.launch, ring backend, localhost), with what the group costs on the wire per step.

Both daemons serve the same model; one runs at a time. Rank 0's plan bytes and steps come
from its status (`details.distributed`, `engine_steps`). The model's own traffic is two
all_sums per layer (after the attention and MLP row-parallel projections) of
batch x hidden float32 each decode step; a probe under mlx.launch times exactly those
collectives alone on this machine ("comm ms per step"), and the bytes a ring all_sum makes
each rank send (2(N-1)/N of the array) give "bytes per rank per step".
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .common import MODEL_CACHE, Daemon, loadavg
from .throughput import _through_daemon, prompts

CLIENTS = (1, 4, 16)
RANKS = 2
# Two ranks on one host's cores: OpenBLAS's spinning threads would starve the other rank
# (measured: 4x slower without this). The one-process side keeps its default threads.
RANK_ENV = "OPENBLAS_NUM_THREADS=1"

PROBE = r"""
import json, sys, time
import mlxd.daemon  # OpenBLAS before mlx
import mlx.core as mx
from mlx_lm.generate import generation_stream
layers, hidden, reps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
g = mx.distributed.init(strict=True)
out = {}
with mx.stream(generation_stream):
    for batch in (1, 4, 16):
        x = mx.ones((batch, 1, hidden), mx.float32)
        mx.eval(mx.distributed.all_sum(x, group=g))  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            y = x
            for _ in range(2 * layers):  # chained, as the layers are
                y = mx.distributed.all_sum(y, group=g) * 0.5
            mx.eval(y)
        out[batch] = (time.perf_counter() - t0) / reps * 1000
if g.rank() == 0:
    print("PROBE " + json.dumps(out), flush=True)
"""


def free_ports(n: int) -> int:
    """The first of `n` consecutive free loopback ports (the ring listens on one per rank)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        try:
            for p in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return first
    raise RuntimeError("no free ports")


def launch_command(ranks: int = RANKS, *options: str) -> list[str]:
    """`mlx.launch` on localhost ranks (ring backend), up to the `--` before the command."""
    return [
        str(Path(sys.executable).parent / "mlx.launch"),
        "-n", str(ranks), "--backend", "ring", "--env", RANK_ENV,
        "--starting-port", str(free_ports(ranks)), *options, "--",
    ]  # fmt: skip


def _probe(layers: int, hidden: int, reps: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PROBE)
    out = subprocess.run(
        [*launch_command(), sys.executable, f.name, str(layers), str(hidden), str(reps)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MLXD_CACHE_DIR": str(MODEL_CACHE)},
    )
    Path(f.name).unlink()
    line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
    if line is None:
        raise RuntimeError("the probe printed nothing:\n" + out.stderr[-2000:])
    return {int(k): v for k, v in json.loads(line[6:]).items()}


def _side(
    daemon: Daemon, counts: tuple[int, ...], max_tokens: int, texts: list[str]
) -> dict[str, Any]:
    rows = {}
    with Client(daemon.socket) as c:
        c.generate(texts[0], max_tokens=4)  # warm-up
        model = c.status().model
    for n in counts:
        with Client(daemon.socket) as c:
            before = c.status()
        got = _through_daemon(daemon.socket, n, max_tokens, texts)
        with Client(daemon.socket) as c:
            after = c.status()
        steps = after.details["engine_steps"] - before.details["engine_steps"]
        row = {
            "tps": got["tps"],
            "tokens": got["tokens"],
            "wall_s": got["wall_s"],
            "steps": steps,
            "ids": got["ids"],
        }
        d0, d1 = before.details.get("distributed"), after.details.get("distributed")
        if d0 and d1 and steps:
            row["plan_bytes_per_step"] = (d1["plan_bytes_sent"] - d0["plan_bytes_sent"]) / steps
            row["plan_ms_per_step"] = (d1["plan_send_ms"] - d0["plan_send_ms"]) / steps
        rows[n] = row
    return {"rows": rows, "model": model.id}


def _stop_group(group: Daemon) -> None:
    """SIGTERM to rank 0, which ends every rank: mlx.launch does not pass a signal on, so
    stopping the launcher would leave the ranks running."""
    with Client(group.socket) as c:
        pids = c.status().details["distributed"]["pids"]
    os.kill(pids[0], signal.SIGTERM)
    assert group.proc is not None
    group.proc.wait(300)
    for pid in pids:  # the launcher is gone; so must they be
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run(model: str, quick: bool, log: Any = None) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    counts = CLIENTS
    max_tokens = 16 if quick else 64
    texts = prompts(max(counts))
    log("  one process")
    with Daemon(model) as one:
        single = _side(one, counts, max_tokens, texts)
    log(f"  {RANKS} ranks (mlx.launch, ring)")
    group = Daemon(model, "--distributed")
    group.launcher = launch_command()
    with group:
        sharded = _side(group, counts, max_tokens, texts)
        _stop_group(group)
    config = (
        json.loads(
            next((MODEL_CACHE / "models").glob(f"builtin-{model.split(':')[-1]}-*"))
            .joinpath("config.json")
            .read_text()
        )
        if model.startswith("builtin:")
        else {}
    )
    layers, hidden = int(config.get("num_hidden_layers", 0)), int(config.get("hidden_size", 0))
    log("  probing the collectives alone")
    probe = _probe(layers, hidden, 5 if quick else 20) if layers else {}
    ring = 2 * (RANKS - 1) / RANKS  # of an all_sum's array, each rank sends this share
    rows = []
    for n in counts:
        a, b = single["rows"][n], sharded["rows"][n]
        rows.append(
            {
                "clients": n,
                "one_tps": a["tps"],
                "ranks_tps": b["tps"],
                "ratio": b["tps"] / a["tps"] if a["tps"] else 0.0,
                "same_tokens": a["ids"] == b["ids"],
                "plan_bytes_per_step": b.get("plan_bytes_per_step", 0.0),
                "plan_ms_per_step": b.get("plan_ms_per_step", 0.0),
                "model_bytes_per_step": 2 * layers * n * hidden * 4 * ring,
                "comm_ms_per_step": probe.get(n, 0.0),
                "steps": b["steps"],
            }
        )
    return {
        "model": model,
        "ranks": RANKS,
        "max_tokens": max_tokens,
        "layers": layers,
        "hidden": hidden,
        "rows": rows,
        "load": loadavg(),
        "bytes_per_token": 2 * layers * hidden * 4 * ring,
    }


def headline(res: dict[str, Any]) -> list[str]:
    r = res["rows"][-1]
    return [
        f"| {res['ranks']} ranks vs one process at {r['clients']} clients (reported) | "
        f"{r['ranks_tps']:.1f} vs {r['one_tps']:.1f} tok/s ({r['ratio']:.2f}x) | - |"
    ]


def section(res: dict[str, Any]) -> list[str]:
    lines = [
        f"## Beyond one machine: {res['ranks']} ranks on this machine",
        "",
        f"{res['model']}, greedy, max_tokens {res['max_tokens']}; each client streams on its own "
        f"connection; load average {res['load']}. Ranks run with {RANK_ENV}. Model traffic per "
        f"decode step: 2 all_sums x {res['layers']} layers of batch x {res['hidden']} float32 "
        f"({res['bytes_per_token'] / 1024:.0f} KiB per token per rank); comm ms = those collectives "
        "timed alone under mlx.launch. Plan bytes = rank 0's step plans (header 12 B + msgpack).",
        "",
        "| clients | one process tok/s | 2 ranks tok/s | ratio | same tokens | plan B/step | plan ms/step | model B/step/rank | comm ms/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['clients']} | {r['one_tps']:.1f} | {r['ranks_tps']:.1f} | {r['ratio']:.2f}x | "
            f"{r['same_tokens']} | {r['plan_bytes_per_step']:.0f} | {r['plan_ms_per_step']:.2f} | "
            f"{r['model_bytes_per_step']:.0f} | {r['comm_ms_per_step']:.1f} |"
        )
    return [*lines, ""]


def plot(res: dict[str, Any], out: Path, plt: Any) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = list(range(len(res["rows"])))
    ax.bar([x - 0.2 for x in xs], [r["one_tps"] for r in res["rows"]], 0.4, label="one process")
    ax.bar(
        [x + 0.2 for x in xs],
        [r["ranks_tps"] for r in res["rows"]],
        0.4,
        label=f"{res['ranks']} ranks",
    )
    ax.set_xticks(xs, [str(r["clients"]) for r in res["rows"]])
    ax.set_xlabel("clients")
    ax.set_ylabel("tok/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "distributed.png", dpi=110)
    return "distributed.png"
