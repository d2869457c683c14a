"""The shared-system-prompt workload: N agents start new conversations whose prompts begin
with the same long system prompt; how much of it each server prefills, and how long that
takes, against mlx_lm.server.

For each N (1, 4, 16; quick: 1, 4) a fresh system prompt (its first characters name the
run, so no cache holds any of it yet) of about 2048 tokens (quick: 512), measured with the
daemon's `tokenize`, then N agents one at a time, each the system prompt + its own short
task (distinct per agent) as raw text, greedy, a few tokens of reply. Three servers get the
same prompts, one computing at a time, the order alternating by N: mlxd with a new session
per agent (`session=crewN-agent-i`: a new session's first turn starts from any matching
prefix), mlxd with no `session` (the prefix cache's anonymous entries), and mlx_lm.server
with its default prompt cache (whose trie also serves the longest common prefix of a
cached prompt). Total prefill time = the sum over the N agents of the client's TTFT (send
to the first chunk with text: the prefill and one decode step). Prefilled tokens are each
server's usage: prompt_tokens - cached_tokens. The report counts the replies that are the
same text on every server.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .agents import mlxd_turn, server_turn, servers_up
from .common import loadavg
from .mlx_server import MlxServer

__all__ = ["run"]

FULL: dict[str, Any] = {"agents": (1, 4, 16), "system": 2048, "task": 96, "reply": 8}
QUICK: dict[str, Any] = {"agents": (1, 4), "system": 512, "task": 64, "reply": 4}

SESSIONS, SESSIONLESS, SERVER = "mlxd, sessions", "mlxd, no session", "mlx_lm.server"
SIDES = (SESSIONS, SESSIONLESS, SERVER)

RULES = (
    "Read every file you are given before you change it.",
    "Prefer the smallest change that fixes the bug, and say why it is enough.",
    "Write a test that fails before the fix and passes after it.",
    "Never invent an API: quote the function signature you rely on.",
    "Keep names short and plain; one module per concept.",
    "When unsure, ask one precise question instead of guessing.",
    "Report the command you ran and its exact output.",
    "Do not reformat code you did not otherwise touch.",
)


def system_prompt(client: Client, run: int, tokens: int) -> str:
    """About `tokens` tokens of rules (by the daemon's tokenizer), headed by the run's name
    so that no earlier run's cache shares any of it."""
    text = f"[crew {run}] You are one agent of crew {run}, working on project p{run * 131}.\n"
    k = 0
    while True:
        more = "".join(
            f"Rule {k + j + 1}: {RULES[(k + j) % len(RULES)]}\n" for j in range(len(RULES))
        )
        if client.tokenize(text + more).count > tokens:
            break
        text, k = text + more, k + len(RULES)
    while True:  # then rule by rule, to the last one that fits
        more = f"Rule {k + 1}: {RULES[k % len(RULES)]}\n"
        if client.tokenize(text + more).count > tokens:
            return text
        text, k = text + more, k + 1


def task(run: int, agent: int, n: int) -> str:
    line = f"[agent {agent} of crew {run}] Fix issue {agent * 7919 + run} in src/m{agent}.py. "
    return "\n" + (line * (n // len(line) + 1))[: n - 1]


def _total(turns: list[dict[str, Any]], key: str) -> float:
    return float(sum(t[key] for t in turns)) if all(t[key] is not None for t in turns) else -1.0


def run(model: str, quick: bool, log: Any = None, **opts: Any) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    p: dict[str, Any] = dict(QUICK if quick else FULL)
    p.update({k: v for k, v in opts.items() if k in p})
    server = MlxServer(model)
    rows: list[dict[str, Any]] = []
    with servers_up(model, [server]) as (a, b):
        status = a.status()
        for r, n in enumerate(p["agents"]):
            system = system_prompt(a, n, p["system"])
            system_tokens = a.tokenize(system).count
            prompts = [system + task(n, i, p["task"]) for i in range(n)]
            turns: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
            walls: dict[str, float] = {}
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                t0 = time.perf_counter()
                for i, prompt in enumerate(prompts):
                    if side == SESSIONS:
                        got = mlxd_turn(a, prompt, f"crew{n}-agent-{i}", p["reply"])
                    elif side == SESSIONLESS:
                        got = mlxd_turn(b, prompt, None, p["reply"])
                    else:
                        got = server_turn(server.port, prompt, p["reply"])
                    turns[side].append(got)
                walls[side] = time.perf_counter() - t0
            row = {
                "agents": n,
                "system_tokens": system_tokens,
                "load": loadavg(),
                "turns": turns,
                "wall_s": walls,
                "prefill_s": {s: _total(turns[s], "ttft_ms") / 1000 for s in SIDES},
                "prefilled": {s: _total(turns[s], "prefilled") for s in SIDES},
                "prompt_tokens": {s: _total(turns[s], "prompt_tokens") for s in SIDES},
                "first_ttft_ms": {s: turns[s][0]["ttft_ms"] for s in SIDES},
                "same_replies": sum(
                    len({turns[s][i]["text"] for s in SIDES}) == 1 for i in range(n)
                ),
                "same_replies_mlxd": sum(
                    turns[SESSIONS][i]["text"] == turns[SESSIONLESS][i]["text"] for i in range(n)
                ),
            }
            rows.append(row)
            log(
                f"  {n} agents, system prompt {system_tokens} tokens: total prefill "
                + ", ".join(
                    f"{s} {row['prefill_s'][s]:.1f} s ({row['prefilled'][s]:.0f} tokens)"
                    for s in SIDES
                )
                + f", load {row['load']}"
            )
        prefix_cache = b.status().details.get("prefix_cache")
    return {"status": status, "workload": p, "rows": rows, "prefix_cache": prefix_cache}


# -- report ------------------------------------------------------------------------------


def _tokens(x: float) -> str:
    return f"{x:.0f}" if x >= 0 else "n/a"


def headline(res: dict[str, Any]) -> list[str]:
    rows = res["rows"]

    def each(side: str) -> str:
        return " / ".join(
            f"{r['prefill_s'][side]:.1f} s ({_tokens(r['prefilled'][side])} tok)" for r in rows
        )

    ns = " / ".join(str(r["agents"]) for r in rows)
    ratios = " / ".join(
        f"{r['prefill_s'][SERVER] / r['prefill_s'][SESSIONLESS]:.2f}x" for r in rows
    )
    system = rows[0]["system_tokens"] if rows else 0
    return [
        f"| shared {system}-token system prompt, {ns} agents: total prefill time (prefilled "
        f"tokens), mlxd no session / sessions / mlx_lm.server (no target) | {each(SESSIONLESS)}; "
        f"{each(SESSIONS)}; {each(SERVER)}; mlx_lm.server / mlxd no session {ratios} | - |",
    ]


def section(res: dict[str, Any]) -> list[str]:
    w = res["workload"]
    lines = [
        "## Shared system prompt: N agents, one prefill",
        "",
        f"For each N, a fresh ~{w['system']}-token system prompt, then N agents one at a time, each "
        f"the system prompt + its own {w['task']}-character task, raw text, greedy, {w['reply']} "
        "tokens of reply; mlxd with a new session per agent, mlxd with no session, and mlx_lm.server "
        "with its default prompt cache, one computing at a time (order alternating by N). Total "
        "prefill = the sum of the client's TTFTs; prefilled = prompt_tokens - cached_tokens from each "
        "server's usage; ideal: the system prompt once plus every task.",
        "",
        "| agents | system tokens | server | total prefill s | first agent TTFT ms | later agents "
        "TTFT ms (mean) | prompt tokens | prefilled | wall s | same reply on all 3 | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        n = r["agents"]
        for side in SIDES:
            later = [t["ttft_ms"] for t in r["turns"][side][1:]]
            lines.append(
                f"| {n} | {r['system_tokens']} | {side} | {r['prefill_s'][side]:.1f} | "
                f"{r['first_ttft_ms'][side]:.0f} | "
                f"{f'{sum(later) / len(later):.0f}' if later else '-'} | "
                f"{_tokens(r['prompt_tokens'][side])} | {_tokens(r['prefilled'][side])} | "
                f"{r['wall_s'][side]:.1f} | {r['same_replies']}/{n} | {r['load'][0]} |"
            )
    lines += ["", f"mlxd (no session) prefix cache at the end: {res['prefix_cache']}", ""]
    return lines


def plot(res: dict[str, Any], out: Path, plt: Any) -> str:
    rows = res["rows"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    w = 0.27
    xs = list(range(len(rows)))
    for k, side in enumerate(SIDES):
        at = [x + (k - 1) * w for x in xs]
        bars = ax.bar(at, [r["prefill_s"][side] for r in rows], w, label=side)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax2.bar(at, [max(0.0, r["prefilled"][side]) for r in rows], w, label=side)
    for a in (ax, ax2):
        a.set_xticks(xs, [str(r["agents"]) for r in rows])
        a.set_xlabel("agents sharing the system prompt")
        a.legend(fontsize=7)
    ax.set_ylabel("total prefill time (s, sum of TTFT)")
    ax2.set_ylabel("prefilled tokens (usage)")
    system = rows[0]["system_tokens"] if rows else 0
    ax.set_title(f"{system}-token shared system prompt")
    ax2.set_title("tokens each server prefilled")
    fig.tight_layout()
    fig.savefig(out / "shared_prompt.png", dpi=110)
    return "shared_prompt.png"
