"""Memory against the number of sessions: a daemon with a small `--kv-budget`, sessions
added one by one (one turn each, the same prompt length), and after each one the daemon's
RSS and peak RSS (/proc/<pid>/status VmRSS / VmHWM), MLX active and cache memory (`status`
-> memory), hot and spilled sessions and the pool's blocks in use. The budget is set so
that about half the sessions fit: past that, adding a session spills the least recently
used one to disk, and hot KV memory should stay under the budget line. In full mode a
second turn on every session, in the same order, follows: each one comes back from disk
and pushes another out.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .common import Daemon, loadavg, run_python

__all__ = ["run"]

FULL = {"sessions": 16, "tokens": 480, "fit": 8, "reply": 8, "second_pass": True}
QUICK = {"sessions": 8, "tokens": 240, "fit": 4, "reply": 8, "second_pass": False}
BLOCK_TOKENS = 256  # the daemon's default pool block

KV_PER_TOKEN = r"""
import json, os, sys
from pathlib import Path
import mlxd.daemon  # OpenBLAS before mlx
from mlxd.daemon.models.model import load_model
m = load_model(sys.argv[1], Path(os.environ["MLXD_CACHE_DIR"]))
print(json.dumps(m.kv_bytes_per_token))
"""


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes (Linux; empty elsewhere)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


ARENA_BYTES = 64 * 2**20  # glibc reserves each thread's malloc arena as one 64 MiB region
BIG_BYTES = 2**20  # glibc serves a malloc this big with its own mmap (MLX's CPU buffers)
MAPPING_KINDS = ("heap", "arenas", "big_anonymous", "small_anonymous", "files")


def rss_by_mapping(pid: int) -> dict[str, int]:
    """Resident bytes of a process by kind of mapping (Linux; empty elsewhere): glibc's main
    heap, the other threads' malloc arenas, anonymous mappings of 1 MiB and more (big mallocs,
    hence MLX's buffers), smaller anonymous ones (stacks among them), and files (the model,
    libraries). A leak shows up as one kind that keeps growing."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {}
    maps: list[tuple[int, int, str, str, int]] = []  # start, end, perms, path, rss
    for line in text.splitlines():
        head = line.split(None, 5)
        if "-" in head[0] and not head[0].endswith(":"):
            lo, _, hi = head[0].partition("-")
            maps.append((int(lo, 16), int(hi, 16), head[1], head[5] if len(head) > 5 else "", 0))
        elif head[0] == "Rss:" and maps:
            start, end, perms, path, _ = maps[-1]
            maps[-1] = (start, end, perms, path, int(head[1]) * 1024)
    out = dict.fromkeys(MAPPING_KINDS, 0)
    for i, (start, end, _perms, path, rss) in enumerate(maps):
        if path == "[heap]":
            kind = "heap"
        elif path.startswith("/"):
            kind = "files"
        elif path and not path.startswith("[anon"):
            kind = "small_anonymous"  # [stack], [vdso], ...
        else:
            # An arena is a 64 MiB-aligned region: its used part, then PROT_NONE up to 64 MiB.
            nxt = maps[i + 1] if i + 1 < len(maps) else None
            reserved = end if nxt is None or nxt[0] != end or nxt[2] != "---p" else nxt[1]
            if start % ARENA_BYTES == 0 and reserved - start == ARENA_BYTES:
                kind = "arenas"
            else:
                kind = "big_anonymous" if end - start >= BIG_BYTES else "small_anonymous"
        out[kind] += rss
    return out


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def prompt(i: int, n: int, turn: int = 1) -> str:
    line = f"<session {i}> The agent reads a file, reasons, and writes a note. "
    return (line * (n // len(line) + 1))[:n]


def _sample(client: Client, pid: int, label: str, t0: float) -> dict[str, Any]:
    s = client.status()
    ps = proc_status(pid)
    return {
        "label": label,
        "t_s": time.perf_counter() - t0,
        "rss_bytes": ps.get("VmRSS", s.memory.rss_bytes),
        "peak_rss_bytes": ps.get("VmHWM"),
        "status_rss_bytes": s.memory.rss_bytes,
        "mlx_active_bytes": s.memory.mlx_active_bytes,
        "mlx_cache_bytes": s.memory.mlx_cache_bytes,
        "hot": s.sessions.hot,
        "disk": s.sessions.disk,
        "hot_bytes": s.sessions.hot_bytes,
        "blocks_used": s.pool.blocks_used,
        "blocks_total": s.pool.blocks_total,
        "spilled": s.details.get("sessions_spilled"),
        "restored": s.details.get("sessions_restored"),
    }


def run(model: str, quick: bool, log: Any = None, **opts: Any) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    p = dict(QUICK if quick else FULL)
    p.update({k: v for k, v in opts.items() if k in p})
    per_token = int(run_python(KV_PER_TOKEN, model))
    per_session_blocks = -(-(p["tokens"] + p["reply"]) // BLOCK_TOKENS)
    block_bytes = per_token * BLOCK_TOKENS
    budget = p["fit"] * per_session_blocks * block_bytes
    log(
        f"  {p['sessions']} sessions of {p['tokens']}+{p['reply']} tokens "
        f"({per_session_blocks} blocks of {block_bytes / 2**20:.1f} MiB), --kv-budget {budget} "
        f"({budget / 2**20:.0f} MiB, {p['fit']} sessions)"
    )
    samples: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    with Daemon(model, "--kv-budget", str(budget)) as daemon:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        t0 = time.perf_counter()
        with Client(daemon.socket) as c:
            c.generate("warm up", max_tokens=4)
            status = c.status()
            samples.append({"sessions": 0, **_sample(c, pid, "warm", t0)})
            texts: dict[int, str] = {}
            for i in range(p["sessions"]):
                texts[i] = prompt(i, p["tokens"])
                r = c.generate(texts[i], session=f"mem-{i}", max_tokens=p["reply"])
                texts[i] += r.text
                turns.append({"session": i, "turn": 1, "ttft_ms": r.timings.ttft_ms,
                              "cached": r.usage.cached_tokens})  # fmt: skip
                samples.append({"sessions": i + 1, **_sample(c, pid, "add", t0)})
                x = samples[-1]
                log(
                    f"  {i + 1} sessions: RSS {x['rss_bytes'] / 2**20:.0f} MiB (peak "
                    f"{(x['peak_rss_bytes'] or 0) / 2**20:.0f}), MLX active "
                    f"{x['mlx_active_bytes'] / 2**20:.0f} MiB, hot {x['hot']}, disk {x['disk']}, "
                    f"spilled {x['spilled']}, load {loadavg()}"
                )
            if p["second_pass"]:
                for i in range(p["sessions"]):
                    r = c.generate(texts[i] + " Next?", session=f"mem-{i}", max_tokens=p["reply"])
                    turns.append({"session": i, "turn": 2, "ttft_ms": r.timings.ttft_ms,
                                  "cached": r.usage.cached_tokens})  # fmt: skip
                    samples.append({"sessions": p["sessions"], **_sample(c, pid, "pass2", t0)})
                x = samples[-1]
                log(
                    f"  second turn on each: RSS {x['rss_bytes'] / 2**20:.0f} MiB (peak "
                    f"{(x['peak_rss_bytes'] or 0) / 2**20:.0f}), restored {x['restored']}, "
                    f"spilled {x['spilled']}"
                )
    adds = [s for s in samples if s["label"] in ("warm", "add")]
    base = adds[0]
    over = [s for s in samples if s["hot_bytes"] > budget]
    return {
        "status": status,
        "workload": p,
        "kv_bytes_per_token": per_token,
        "block_bytes": block_bytes,
        "kv_budget_bytes": budget,
        "samples": samples,
        "turns": turns,
        "first_spill_at": next((s["sessions"] for s in adds if (s["spilled"] or 0) > 0), None),
        "max_hot_bytes": max(s["hot_bytes"] for s in samples),
        "hot_over_budget_samples": len(over),
        "peak_rss_bytes": max(s["peak_rss_bytes"] or 0 for s in samples),
        "rss_growth_bytes": adds[-1]["rss_bytes"] - base["rss_bytes"],
        "mlx_active_growth_bytes": adds[-1]["mlx_active_bytes"] - base["mlx_active_bytes"],
        "final": samples[-1],
    }


# -- report ------------------------------------------------------------------------------


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def headline(res: dict[str, Any]) -> list[str]:
    ok = res["hot_over_budget_samples"] == 0
    return [
        f"| memory: hot KV stays within --kv-budget as sessions are added ({res['workload']['sessions']} "
        f"sessions, budget for {res['workload']['fit']}) | max hot KV {_mib(res['max_hot_bytes'])} of "
        f"{_mib(res['kv_budget_bytes'])} MiB; first spill at session {res['first_spill_at']}; peak RSS "
        f"{_mib(res['peak_rss_bytes'])} MiB | {'yes' if ok else '**no**'} |"
    ]


def section(res: dict[str, Any]) -> list[str]:
    w = res["workload"]
    lines = [
        "## Memory vs sessions",
        "",
        f"A daemon with `--kv-budget {res['kv_budget_bytes']}` ({_mib(res['kv_budget_bytes'])} MiB: "
        f"{w['fit']} sessions of {w['tokens']}+{w['reply']} tokens, {res['block_bytes'] / 2**20:.1f} MiB "
        "per 256-token block); sessions added one by one, one turn each, sequentially. RSS and peak "
        "RSS are the kernel's (VmRSS, VmHWM), MLX active / cache memory and the session counts come "
        "from `status`. `spilled` counts spills so far (a session written to disk and dropped from "
        "memory)."
        + (
            " Then a second turn on every session in the same order: each comes back from disk "
            "(`restored`) and pushes the least recently used one out."
            if w["second_pass"]
            else ""
        ),
        "",
        "| step | sessions | hot | on disk | spilled | restored | blocks used / total | hot KV MiB | "
        "MLX active MiB | MLX cache MiB | RSS MiB | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, s in enumerate(res["samples"]):
        step = {
            "warm": "start",
            "add": f"add {s['sessions']}",
            "pass2": f"turn 2, #{k - w['sessions']}",
        }
        lines.append(
            f"| {step[s['label']]} | {s['sessions']} | {s['hot']} | {s['disk']} | {s['spilled']} | "
            f"{s['restored']} | {s['blocks_used']} / {s['blocks_total']} | {_mib(s['hot_bytes'])} | "
            f"{_mib(s['mlx_active_bytes'])} | {_mib(s['mlx_cache_bytes'])} | {_mib(s['rss_bytes'])} | "
            f"{_mib(s['peak_rss_bytes'])} |"
        )
    lines += [
        "",
        f"From the start to the last session added: RSS +{_mib(res['rss_growth_bytes'])} MiB, MLX "
        f"active +{_mib(res['mlx_active_growth_bytes'])} MiB. MLX active memory includes the weights "
        "and the running request's cache; the budget bounds the hot sessions' KV.",
        "",
    ]
    return lines


def plot(res: dict[str, Any], out: Path, plt: Any) -> str:
    samples = res["samples"]
    xs = list(range(len(samples)))
    labels = [
        str(s["sessions"]) if s["label"] != "pass2" else f"t2:{k - res['workload']['sessions']}"
        for k, s in enumerate(samples)
    ]
    mib = 2**20
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax.plot(xs, [s["rss_bytes"] / mib for s in samples], marker="o", label="RSS")
    ax.plot(xs, [(s["peak_rss_bytes"] or 0) / mib for s in samples], marker=".", label="peak RSS")
    ax.plot(xs, [s["mlx_active_bytes"] / mib for s in samples], marker="s", label="MLX active")
    base = samples[0]["mlx_active_bytes"]
    ax.axhline(
        (base + res["kv_budget_bytes"]) / mib,
        color="red",
        linestyle="--",
        label="MLX active at start + KV budget",
    )
    ax.set_ylabel("MiB")
    ax.set_title("Process memory")
    ax.legend(fontsize=7)
    ax2.plot(
        xs,
        [s["hot_bytes"] / mib for s in samples],
        marker="o",
        color="C3",
        label="hot KV (sessions)",
    )
    ax2.plot(
        xs,
        [(s["mlx_active_bytes"] - base) / mib for s in samples],
        marker="s",
        color="C2",
        label="MLX active - at start",
    )
    ax2.axhline(res["kv_budget_bytes"] / mib, color="red", linestyle="--", label="--kv-budget")
    ax2.set_ylabel("MiB")
    twin = ax2.twinx()
    twin.step(
        xs, [s["hot"] for s in samples], where="mid", color="C0", alpha=0.5, label="hot sessions"
    )
    twin.step(
        xs,
        [s["spilled"] or 0 for s in samples],
        where="mid",
        color="C1",
        alpha=0.5,
        label="spilled (total)",
    )
    twin.set_ylabel("sessions")
    ax2.set_title("KV memory against the budget")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    step = max(1, len(xs) // 16)
    for a in (ax, ax2):
        a.set_xticks(xs[::step], labels[::step], fontsize=7)
        a.set_xlabel(
            "sessions created"
            + (" (t2: second turn on each)" if res["workload"]["second_pass"] else "")
        )
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    return "memory.png"
