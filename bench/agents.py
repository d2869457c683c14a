"""The agent workload: more agents than mlx_lm.server keeps prompt-cache entries, each
taking several turns over a conversation that grows, interleaved (agent 1 turn 1, agent 2
turn 1, ..., agent 1 turn 2, ...), one request at a time. mlxd keeps each agent's KV cache
in a session (`session=agent-i`); mlx_lm.server has its LRU prompt cache of
`--prompt-cache-size` entries (default 10), one entry per conversation here. A second
mlxd gets the same prompts with no `session` at all (what an OpenAI-style client sends):
its prefix cache keeps each conversation as an anonymous entry.

The transcripts are the same for every server: turn 1 is an agent's opening text (distinct
per agent from its first characters), and each later turn is the previous prompt + the
reply mlxd gave to it (greedy) + a new user message. Every server gets each prompt as raw
text (mlxd: `generate` with `prompt`; mlx_lm.server: `/v1/completions` with `prompt`), so
both tokenize the same string; the report counts the turns whose prompt token counts agree
and whose replies are the same text.

The servers run side by side, one computing at a time: round k (turn k of every agent) runs
on one server, then the same prompts on the other, the order alternating by round, so a
change in a shared machine's load hits both. Wall time = the sum of a server's rounds.
TTFT is taken by the client (send to the first chunk that carries text) on every server;
mlxd's own (arrival to first token) is kept too. Prefilled tokens: mlxd's
usage.prompt_tokens - usage.cached_tokens; mlx_lm.server's usage.prompt_tokens -
usage.prompt_tokens_details.cached_tokens, which its stream reports with
`stream_options.include_usage`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .common import Daemon, loadavg, percentiles
from .mlx_server import MlxServer, complete

__all__ = ["run"]

# Sized for a 2-core CPU, where mlx_lm.server's full prefills dominate the run: about 6-8
# minutes for the full workload, 1 for the quick one. The prompt cache is set explicitly
# smaller than the number of agents (mlx_lm.server's default is 10 entries).
FULL = {"agents": 8, "turns": 5, "first": 256, "user": 160, "reply": 16, "cache_size": 4}
QUICK = {"agents": 6, "turns": 3, "first": 128, "user": 64, "reply": 8, "cache_size": 4}


def _fill(text: str, n: int) -> str:
    """`text` repeated to exactly n characters (the built-in tokenizer is byte-level: one
    ASCII character, one token)."""
    return (text * (n // len(text) + 1))[:n]


def opening(agent: int, n: int) -> str:
    return _fill(
        f"#{agent:02d} You are agent {agent}, fixing bug {agent * 7919} in module m{agent}. "
        "Read the files you are given, reason step by step, then answer. ",
        n,
    )


def user_message(agent: int, turn: int, n: int) -> str:
    return "\n" + _fill(
        f"[user, turn {turn}] Here is file src/m{agent}/part{turn}.py; what changes now? ",
        n - 1,
    )


SESSIONLESS = "mlxd, sessionless"


def _mlxd_turn(client: Client, prompt: str, session: str | None, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = None
    stream = client.stream(prompt, session=session, max_tokens=max_tokens)
    for delta in stream:
        if first is None and delta.text:
            first = time.perf_counter()
    end = time.perf_counter()
    r = stream.result
    assert r is not None
    return {
        "text": r.text,
        "ttft_ms": ((first or end) - t0) * 1000,
        "server_ttft_ms": r.timings.ttft_ms,
        "total_ms": (end - t0) * 1000,
        "prompt_tokens": r.usage.prompt_tokens,
        "cached_tokens": r.usage.cached_tokens,
        "prefilled": r.usage.prompt_tokens - r.usage.cached_tokens,
        "completion_tokens": r.usage.completion_tokens,
    }


def _server_turn(port: int, prompt: str, max_tokens: int) -> dict[str, Any]:
    got = complete(port, prompt, max_tokens)
    prompt_tokens = got["prompt_tokens"]
    cached = got["cached_tokens"]
    return {
        "text": got["text"],
        "ttft_ms": got["ttft_s"] * 1000,
        "total_ms": got["end_s"] * 1000,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached,
        "prefilled": prompt_tokens - cached
        if prompt_tokens is not None and cached is not None
        else None,
        "completion_tokens": got["completion_tokens"],
    }


def _summary(turns: list[dict[str, Any]], walls: list[float], n_turns: int) -> dict[str, Any]:
    prefilled = [t["prefilled"] for t in turns if t["prefilled"] is not None]
    return {
        "wall_s": sum(walls),
        "round_wall_s": walls,
        "ttft_ms": percentiles([t["ttft_ms"] for t in turns]),
        "ttft_ms_by_turn": [
            percentiles([t["ttft_ms"] for t in turns if t["turn"] == k]) for k in range(n_turns)
        ],
        "ttft_ms_after_turn1": percentiles([t["ttft_ms"] for t in turns if t["turn"] > 0]),
        "prompt_tokens": sum(t["prompt_tokens"] or 0 for t in turns),
        "prefilled_tokens": sum(prefilled) if len(prefilled) == len(turns) else None,
        "cached_tokens": sum(t["cached_tokens"] or 0 for t in turns),
        "completion_tokens": sum(t["completion_tokens"] or 0 for t in turns),
        "cache_hits": sum((t["cached_tokens"] or 0) > t["prompt_tokens"] // 2 for t in turns),
    }


def run(model: str, quick: bool, log: Any = None, **opts: Any) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    p = dict(QUICK if quick else FULL)
    p.update({k: v for k, v in opts.items() if k in p})
    # A second mlx_lm.server with room for every agent shows what the entry limit costs.
    # (off by default: it adds about mlxd's time again; measured once, it matched mlxd)
    big = bool(opts.get("big_cache", False))
    n_agents, n_turns, reply = p["agents"], p["turns"], p["reply"]
    sides = ["mlxd", "mlx_lm.server"] + (["mlx_lm.server, big cache"] if big else [])
    sides.append(SESSIONLESS)
    log(
        f"  {n_agents} agents x {n_turns} turns, prompts {p['first']} -> "
        f"~{p['first'] + (n_turns - 1) * (p['user'] + reply)} tokens, replies of {reply} tokens, "
        f"mlx_lm.server --prompt-cache-size {p['cache_size']}"
    )
    servers = [MlxServer(model, "--prompt-cache-size", str(p["cache_size"]))]
    if big:
        servers.append(MlxServer(model, "--prompt-cache-size", str(4 * n_agents)))
    daemon, anonymous = Daemon(model), Daemon(model)
    try:
        for s in servers:
            s.start()
        daemon.start()
        anonymous.start()
        with Client(daemon.socket) as client, Client(anonymous.socket) as sessionless:
            client.generate("warm up", max_tokens=4)
            sessionless.generate("warm up", max_tokens=4)
            status = client.status()
            prompts = [opening(i, p["first"]) for i in range(n_agents)]
            turns: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
            walls: dict[str, list[float]] = {s: [] for s in sides}
            for k in range(n_turns):
                order = sides if k % 2 == 0 else sides[::-1]
                replies: list[str] = []
                for side in order:
                    t0 = time.perf_counter()
                    for i in range(n_agents):
                        if side == "mlxd":
                            got = _mlxd_turn(client, prompts[i], f"agent-{i}", reply)
                            replies.append(got["text"])
                        elif side == SESSIONLESS:
                            got = _mlxd_turn(sessionless, prompts[i], None, reply)
                        else:
                            port = servers[sides.index(side) - 1].port
                            got = _server_turn(port, prompts[i], reply)
                        turns[side].append({"agent": i, "turn": k, **got})
                    walls[side].append(time.perf_counter() - t0)
                log(
                    f"  turn {k + 1}/{n_turns} (prompts ~{len(prompts[0])} tokens): "
                    + ", ".join(f"{s} {walls[s][-1]:.1f} s" for s in sides)
                    + f", load {loadavg()}"
                )
                prompts = [
                    prompts[i] + replies[i] + user_message(i, k + 2, p["user"])
                    for i in range(n_agents)
                ]
            mlxd_sessions = client.status().sessions
            prefix_cache = sessionless.status().details.get("prefix_cache")
    finally:
        for d in (daemon, anonymous):
            d.kill()
            d.__exit__(None, None, None)
        for s in servers:
            s.stop()

    summary = {s: _summary(turns[s], walls[s], n_turns) for s in sides}
    base = turns["mlxd"]
    same = {
        s: {
            "prompt_tokens": sum(
                a["prompt_tokens"] == b["prompt_tokens"]
                for a, b in zip(base, turns[s], strict=True)
            ),
            "reply_text": sum(a["text"] == b["text"] for a, b in zip(base, turns[s], strict=True)),
        }
        for s in sides[1:]
    }
    d, s = summary["mlxd"], summary["mlx_lm.server"]
    return {
        "status": status,
        "workload": p,
        "big_cache_size": 4 * n_agents if big else None,
        "sides": sides,
        "summary": summary,
        "speedup": s["wall_s"] / d["wall_s"],
        "speedup_big": summary[sides[2]]["wall_s"] / d["wall_s"] if big else None,
        "sessionless_vs_sessions": summary[SESSIONLESS]["wall_s"] / d["wall_s"],
        "sessionless_prefix_cache": prefix_cache,
        "same": same,
        "turns_total": n_agents * n_turns,
        "mlxd_sessions": {"hot": mlxd_sessions.hot, "disk": mlxd_sessions.disk},
        "turns": turns,
    }


# -- report ------------------------------------------------------------------------------

TARGET = 3.0  # mlx_lm.server wall time / mlxd's


def headline(res: dict[str, Any]) -> list[str]:
    w = res["workload"]
    d, s = res["summary"]["mlxd"], res["summary"]["mlx_lm.server"]
    return [
        f"| agents: mlxd ≥ {TARGET:.0f}x faster end to end than mlx_lm.server ({w['agents']} agents x "
        f"{w['turns']} turns, its prompt cache {w['cache_size']} entries) | {res['speedup']:.2f}x "
        f"({d['wall_s']:.0f} vs {s['wall_s']:.0f} s; TTFT p50 after turn 1 "
        f"{d['ttft_ms_after_turn1']['p50']:.0f} vs {s['ttft_ms_after_turn1']['p50']:.0f} ms) | "
        f"{'yes' if res['speedup'] >= TARGET else '**no**'} |",
        f"| agents: sessionless mlxd within 10% of mlxd with sessions | "
        f"{res['sessionless_vs_sessions']:.2f}x its wall time | "
        f"{'yes' if res['sessionless_vs_sessions'] <= 1.1 else '**no**'} |",
    ]


def _pq(p: dict[str, Any]) -> str:
    return f"{p['p50']:.0f} / {p['p95']:.0f}"


def section(res: dict[str, Any]) -> list[str]:
    w = res["workload"]
    sides = res["sides"]
    big = res.get("big_cache_size")
    last = w["first"] + (w["turns"] - 1) * (w["user"] + w["reply"])
    lines = [
        "## Agent workload: sessions vs mlx_lm.server's prompt cache",
        "",
        f"{w['agents']} agents x {w['turns']} turns, interleaved (agent 1 turn 1, agent 2 turn 1, "
        "..., agent 1 turn 2, ...), one request at a time, greedy. Turn 1 is a "
        f"{w['first']}-token opening (distinct per agent); each later turn adds mlxd's reply "
        f"({w['reply']} tokens) and a {w['user']}-token user message, so prompts grow from "
        f"{w['first']} to ~{last} tokens. mlxd: `generate` with the raw prompt and "
        "`session=agent-i`; mlx_lm.server: streaming `/v1/completions` with the same prompt text and "
        f"`--prompt-cache-size {w['cache_size']}`"
        + (" (its default)" if w["cache_size"] == 10 else " (set explicitly; its default is 10)")
        + ", fewer entries than agents"
        + (
            f"; and a second mlx_lm.server with `--prompt-cache-size {big}`, room for every agent"
            if big
            else ""
        )
        + ". The servers alternate by round (turn k of every agent on one, then on the other), one "
        "computing at a time. TTFT is the client's, send to first text.",
        "",
        "| server | wall s | mlxd speed-up | TTFT p50 / p95 ms, all turns | after turn 1 | prompt tokens | "
        "prefilled | cached | turns mostly cached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    d_wall = res["summary"]["mlxd"]["wall_s"]
    for side in sides:
        x = res["summary"][side]
        label = {
            "mlxd": "mlxd, sessions",
            "mlx_lm.server": f"mlx_lm.server, {w['cache_size']} entries",
            SESSIONLESS: "mlxd, no session (prefix cache)",
        }.get(side, f"mlx_lm.server, {big} entries")
        speedup = "-" if side == "mlxd" else f"**{x['wall_s'] / d_wall:.2f}x**"
        lines.append(
            f"| {label} | {x['wall_s']:.1f} | {speedup} | "
            f"{_pq(x['ttft_ms'])} | {_pq(x['ttft_ms_after_turn1'])} | {x['prompt_tokens']} | "
            f"{x['prefilled_tokens'] if x['prefilled_tokens'] is not None else 'n/a'} | "
            f"{x['cached_tokens']} | {x['cache_hits']}/{res['turns_total']} |"
        )
    lines += [
        "",
        "TTFT p50 / p95 ms by turn (across agents):",
        "",
        "| turn | prompt tokens (mean) | " + " | ".join(sides) + " |",
        "|---|---|" + "---|" * len(sides),
    ]
    for k in range(w["turns"]):
        mean_prompt = sum(t["prompt_tokens"] for t in res["turns"]["mlxd"] if t["turn"] == k) / max(
            1, w["agents"]
        )
        lines.append(
            f"| {k + 1} | {mean_prompt:.0f} | "
            + " | ".join(_pq(res["summary"][s]["ttft_ms_by_turn"][k]) for s in sides)
            + " |"
        )
    same = "; ".join(
        f"{s}: prompt token counts equal on {v['prompt_tokens']}/{res['turns_total']} turns, "
        f"same reply text on {v['reply_text']}/{res['turns_total']}"
        for s, v in res["same"].items()
    )
    lines += [
        "",
        f"Prefilled = prompt_tokens - cached_tokens as each server's usage reports them "
        f"(mlx_lm.server: `usage.prompt_tokens_details.cached_tokens`). {same}. mlxd sessions at the "
        f"end: {res['mlxd_sessions']['hot']} hot, {res['mlxd_sessions']['disk']} on disk. "
        '"Mostly cached": more than half the prompt served from cache. The random model\'s replies '
        "hold bytes that are not valid UTF-8; their text carries U+FFFD, so a reply re-tokenizes "
        "differently and both servers prefill it again on the next turn.",
        "",
    ]
    return lines


def plot(res: dict[str, Any], out: Path, plt: Any) -> str:
    w = res["workload"]
    sides = res["sides"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    turns = list(range(1, w["turns"] + 1))
    for side in sides:
        by = res["summary"][side]["ttft_ms_by_turn"]
        p50 = [b["p50"] for b in by]
        p95 = [b["p95"] for b in by]
        line = ax.plot(turns, p50, marker="o", label=f"{side} p50")[0]
        ax.plot(turns, p95, linestyle="--", color=line.get_color(), alpha=0.6, label=f"{side} p95")
    ax.set_yscale("log")
    ax.set_xticks(turns)
    ax.set_xlabel("turn (prompt grows each turn)")
    ax.set_ylabel("TTFT ms (log)")
    ax.set_title(
        f"{w['agents']} agents, interleaved; mlx_lm.server cache {w['cache_size']} entries"
    )
    ax.legend(fontsize=7)
    walls = [res["summary"][s]["wall_s"] for s in sides]
    bars = ax2.bar(range(len(sides)), walls, color=[f"C{i}" for i in range(len(sides))])
    ax2.bar_label(bars, labels=[f"{x:.0f} s" for x in walls], fontsize=8)
    ax2.set_xticks(range(len(sides)), [s.replace(", ", "\n") for s in sides], fontsize=8)
    ax2.set_ylabel("wall time, all turns (s)")
    ax2.set_title(f"end to end: mlxd {res['speedup']:.2f}x faster")
    fig.tight_layout()
    fig.savefig(out / "agents.png", dpi=110)
    return "agents.png"
