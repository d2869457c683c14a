"""The agent workload: more agents than mlx_lm.server keeps prompt-cache entries, each
taking several turns over a conversation that grows, interleaved (agent 1 turn 1, agent 2
turn 1, ..., agent 1 turn 2, ...), one request at a time. mlxd keeps each agent's KV cache
in a session (`session=agent-i`); mlx_lm.server has its LRU prompt cache of
`--prompt-cache-size` entries, one entry per conversation here: one server with the
default (10 entries, room for every agent of the full run) and one with a reduced cache,
fewer entries than agents. A second mlxd gets the same prompts with no `session` at all
(what an OpenAI-style client sends): its prefix cache keeps each conversation as an
anonymous entry.

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

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .common import Daemon, loadavg, percentiles
from .mlx_server import MlxServer, complete

__all__ = ["compare", "converse", "mlxd_turn", "openings", "run", "server_turn", "servers_up"]

# Sized for a 2-core CPU, where mlx_lm.server's full prefills dominate the run: about 6-8
# minutes for the full workload, 1 for the quick one. `cache_size` is the reduced
# mlx_lm.server's `--prompt-cache-size`, smaller than the number of agents.
# `first_tokens` (0: off) sizes turn 1 in tokens instead of `first` characters.
FULL = {"agents": 8, "turns": 5, "first": 256, "user": 160, "reply": 16, "cache_size": 4,
        "first_tokens": 0}  # fmt: skip
QUICK = {"agents": 6, "turns": 3, "first": 128, "user": 64, "reply": 8, "cache_size": 4,
         "first_tokens": 0}  # fmt: skip
DEFAULT_CACHE_SIZE = 10  # mlx_lm.server's own default for --prompt-cache-size


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
DEFAULT_SIDE = "mlx_lm.server, default cache"


@contextlib.contextmanager
def servers_up(model: str, servers: list[MlxServer]) -> Iterator[tuple[Client, Client]]:
    """Start the mlx_lm.servers, then two daemons; yield a client of each daemon (one for
    named sessions, one for requests with no session), warmed up; stop them all after."""
    daemons = (Daemon(model), Daemon(model))
    try:
        for server in servers:
            server.start()
        for d in daemons:
            d.start()
        with Client(daemons[0].socket) as named, Client(daemons[1].socket) as anonymous:
            named.generate("warm up", max_tokens=4)
            anonymous.generate("warm up", max_tokens=4)
            yield named, anonymous
    finally:
        for d in daemons:
            d.kill()
            d.__exit__(None, None, None)
        for server in servers:
            server.stop()


def mlxd_turn(client: Client, prompt: str, session: str | None, max_tokens: int) -> dict[str, Any]:
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


def server_turn(
    port: int,
    prompt: str,
    max_tokens: int,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    usage: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One turn over HTTP (`complete`); `usage` fills in the token counts after the
    timing, for a server whose stream reports none."""
    got = complete(port, prompt, max_tokens, headers=headers, extra=extra)
    t0 = time.perf_counter()
    if usage is not None:
        usage(prompt, got)
    untimed = time.perf_counter() - t0
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
        "usage_s": untimed,  # left out of the wall time
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


Turn = Callable[[int, str], dict[str, Any]]  # (agent, prompt) -> the turn's figures


def openings(client: Client, p: dict[str, Any]) -> list[str]:
    """Every agent's turn 1: `first` characters, or with `first_tokens` at least that many
    tokens by the daemon's tokenizer (a real one makes fewer tokens than characters)."""
    want = int(p.get("first_tokens") or 0)
    texts = []
    for i in range(p["agents"]):
        n = want or p["first"]
        while want and (count := client.tokenize(opening(i, n)).count) < want:
            n = n * want // count + 8  # by the measured characters per token
        texts.append(opening(i, n))
    return texts


def converse(
    sides: dict[str, Turn], prompts: list[str], p: dict[str, Any], log: Any
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[float]]]:
    """Turn k of every agent on each side in turn (the order alternating by round), one
    request at a time; the first side's replies grow the conversations. Returns each
    side's turns and its wall time per round (less a turn's `usage_s`: counting after it)."""
    names = list(sides)
    turns: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
    walls: dict[str, list[float]] = {s: [] for s in names}
    for k in range(p["turns"]):
        replies: list[str] = []
        for side in names if k % 2 == 0 else names[::-1]:
            t0, untimed = time.perf_counter(), 0.0
            for i, prompt in enumerate(prompts):
                got = sides[side](i, prompt)
                if side == names[0]:
                    replies.append(got["text"])
                untimed += got.get("usage_s", 0.0)
                turns[side].append({"agent": i, "turn": k, **got})
            walls[side].append(time.perf_counter() - t0 - untimed)
        log(
            f"  turn {k + 1}/{p['turns']} (prompts ~{len(prompts[0])} characters): "
            + ", ".join(f"{s} {walls[s][-1]:.1f} s" for s in names)
            + f", load {loadavg()}"
        )
        prompts = [
            prompt + replies[i] + user_message(i, k + 2, p["user"])
            for i, prompt in enumerate(prompts)
        ]
    return turns, walls


def compare(turns: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Per side after the first: the turns whose prompt token count and reply text equal
    the first side's."""
    base, *others = turns
    return {
        s: {
            "prompt_tokens": sum(
                a["prompt_tokens"] == b["prompt_tokens"]
                for a, b in zip(turns[base], turns[s], strict=True)
            ),
            "reply_text": sum(
                a["text"] == b["text"] for a, b in zip(turns[base], turns[s], strict=True)
            ),
        }
        for s in others
    }


def run(model: str, quick: bool, log: Any = None, **opts: Any) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    p = dict(QUICK if quick else FULL)
    p.update({k: v for k, v in opts.items() if k in p})
    n_agents, n_turns, reply = p["agents"], p["turns"], p["reply"]
    sides = ["mlxd", "mlx_lm.server", DEFAULT_SIDE, SESSIONLESS]
    log(
        f"  {n_agents} agents x {n_turns} turns, prompts {p['first']} -> "
        f"~{p['first'] + (n_turns - 1) * (p['user'] + reply)} characters, replies of {reply} "
        f"tokens, mlx_lm.server --prompt-cache-size {p['cache_size']} and its default"
    )
    # mlx_lm.server reduced, then with no --prompt-cache-size (its default): sides[1:3]
    servers = [MlxServer(model, "--prompt-cache-size", str(p["cache_size"])), MlxServer(model)]
    with servers_up(model, servers) as (client, sessionless):
        status = client.status()
        turns, walls = converse(
            {
                "mlxd": lambda i, prompt: mlxd_turn(client, prompt, f"agent-{i}", reply),
                "mlx_lm.server": lambda i, prompt: server_turn(servers[0].port, prompt, reply),
                DEFAULT_SIDE: lambda i, prompt: server_turn(servers[1].port, prompt, reply),
                SESSIONLESS: lambda i, prompt: mlxd_turn(sessionless, prompt, None, reply),
            },
            openings(client, p),
            p,
            log,
        )
        mlxd_sessions = client.status().sessions
        prefix_cache = sessionless.status().details.get("prefix_cache")

    summary = {s: _summary(turns[s], walls[s], n_turns) for s in sides}
    same = compare(turns)
    wall = {side: summary[side]["wall_s"] for side in sides}
    return {
        "status": status,
        "workload": p,
        "default_cache_size": DEFAULT_CACHE_SIZE,
        "sides": sides,
        "summary": summary,
        "speedup": wall["mlx_lm.server"] / wall["mlxd"],
        "speedup_default": wall[DEFAULT_SIDE] / wall["mlxd"],
        "sessionless_speedup": wall["mlx_lm.server"] / wall[SESSIONLESS],
        "sessionless_speedup_default": wall[DEFAULT_SIDE] / wall[SESSIONLESS],
        "sessionless_vs_sessions": wall[SESSIONLESS] / wall["mlxd"],
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
    x = res["summary"]
    d, s, sl, sd = x["mlxd"], x["mlx_lm.server"], x[SESSIONLESS], x[DEFAULT_SIDE]
    size = res["default_cache_size"]

    def row(who: str, against: str, ratio: float, a: dict[str, Any], b: dict[str, Any]) -> str:
        return (
            f"| agents: {who} ≥ {TARGET:.0f}x faster end to end than mlx_lm.server, {against} "
            f"({w['agents']} agents x {w['turns']} turns) | {ratio:.2f}x ({a['wall_s']:.0f} vs "
            f"{b['wall_s']:.0f} s; TTFT p50 after turn 1 {a['ttft_ms_after_turn1']['p50']:.0f} vs "
            f"{b['ttft_ms_after_turn1']['p50']:.0f} ms) | {'yes' if ratio >= TARGET else '**no**'} |"
        )

    reduced = f"its prompt cache {w['cache_size']} entries"
    default = f"its default cache ({size} entries)"
    return [
        row("mlxd, sessions,", reduced, res["speedup"], d, s),
        row("mlxd, sessions,", default, res["speedup_default"], d, sd),
        row("mlxd, no session,", reduced, res["sessionless_speedup"], sl, s),
        row("mlxd, no session,", default, res["sessionless_speedup_default"], sl, sd),
        f"| agents: sessionless mlxd within 10% of mlxd with sessions | "
        f"{res['sessionless_vs_sessions']:.2f}x its wall time ({sl['wall_s']:.0f} vs "
        f"{d['wall_s']:.0f} s) | {'yes' if res['sessionless_vs_sessions'] <= 1.1 else '**no**'} |",
    ]


def _pq(p: dict[str, Any]) -> str:
    return f"{p['p50']:.0f} / {p['p95']:.0f}"


def tables(res: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Each side's wall time (against the first side's), TTFT and tokens; then TTFT by turn."""
    sides = res["sides"]
    lines = [
        "| server | wall s | wall / " + labels[sides[0]] + " | TTFT p50 / p95 ms, all turns | "
        "after turn 1 | prompt tokens | prefilled | cached | turns mostly cached |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = res["summary"][sides[0]]["wall_s"]
    for side in sides:
        x = res["summary"][side]
        speedup = "-" if side == sides[0] else f"**{x['wall_s'] / base:.2f}x**"
        lines.append(
            f"| {labels[side]} | {x['wall_s']:.1f} | {speedup} | "
            f"{_pq(x['ttft_ms'])} | {_pq(x['ttft_ms_after_turn1'])} | {x['prompt_tokens']} | "
            f"{x['prefilled_tokens'] if x['prefilled_tokens'] is not None else 'n/a'} | "
            f"{x['cached_tokens']} | {x['cache_hits']}/{res['turns_total']} |"
        )
    lines += [
        "",
        "TTFT p50 / p95 ms by turn (across agents):",
        "",
        "| turn | prompt tokens (mean) | " + " | ".join(labels[s] for s in sides) + " |",
        "|---|---|" + "---|" * len(sides),
    ]
    for k in range(res["workload"]["turns"]):
        at = [t["prompt_tokens"] for t in res["turns"][sides[0]] if t["turn"] == k]
        lines.append(
            f"| {k + 1} | {sum(at) / max(1, len(at)):.0f} | "
            + " | ".join(_pq(res["summary"][s]["ttft_ms_by_turn"][k]) for s in sides)
            + " |"
        )
    return lines


def agreement(res: dict[str, Any]) -> str:
    """Per side after the first: the turns whose prompt token count and reply agree with it."""
    return "; ".join(
        f"{s}: prompt token counts equal on {v['prompt_tokens']}/{res['turns_total']} turns, "
        f"same reply text on {v['reply_text']}/{res['turns_total']}"
        for s, v in res["same"].items()
    )


def section(res: dict[str, Any]) -> list[str]:
    w = res["workload"]
    size = res["default_cache_size"]
    last = w["first"] + (w["turns"] - 1) * (w["user"] + w["reply"])
    lines = [
        "## Agent workload: sessions vs mlx_lm.server's prompt cache",
        "",
        f"{w['agents']} agents x {w['turns']} turns, interleaved (agent 1 turn 1, agent 2 turn 1, "
        "..., agent 1 turn 2, ...), one request at a time, greedy. Turn 1 is a "
        f"{w['first']}-character opening (distinct per agent); each later turn adds mlxd's reply "
        f"({w['reply']} tokens) and a {w['user']}-character user message, so prompts grow from "
        f"{w['first']} to ~{last} characters (one character, one token on the built-in byte-level "
        "models; a real tokenizer makes fewer: see the prompt tokens). mlxd: `generate` with the "
        "raw prompt and `session=agent-i`, and a second mlxd with no `session` (its prefix cache); "
        "mlx_lm.server: streaming `/v1/completions` with the same prompt text, once with "
        f"`--prompt-cache-size {w['cache_size']}` (fewer entries than agents) and once with its "
        f"default ({size} entries). The servers alternate by round (turn k of every agent on one, "
        "then on the others), one computing at a time. TTFT is the client's, send to first text.",
        "",
    ]
    labels = {
        "mlxd": "mlxd, sessions",
        "mlx_lm.server": f"mlx_lm.server, {w['cache_size']} entries",
        DEFAULT_SIDE: f"mlx_lm.server, {size} entries (default)",
        SESSIONLESS: "mlxd, no session (prefix cache)",
    }
    lines += tables(res, labels)
    same = agreement(res)
    lines += [
        "",
        f"Prefilled = prompt_tokens - cached_tokens as each server's usage reports them "
        f"(mlx_lm.server: `usage.prompt_tokens_details.cached_tokens`). {same}. mlxd sessions at the "
        f"end: {res['mlxd_sessions']['hot']} hot, {res['mlxd_sessions']['disk']} on disk. "
        '"Mostly cached": more than half the prompt served from cache. On the built-in random '
        "models a reply can hold bytes that are not valid UTF-8; its text carries U+FFFD, so it "
        "re-tokenizes differently and every server prefills it again on the next turn.",
        "",
    ]
    return lines


def wall_bars(ax: Any, res: dict[str, Any], colors: dict[str, str] | None = None) -> None:
    """Each side's wall time for all turns, a bar each (`colors`: a side's colour, where
    another panel of the figure already gave it one)."""
    sides = res["sides"]
    walls = [res["summary"][s]["wall_s"] for s in sides]
    colors = colors or {}
    bars = ax.bar(
        range(len(sides)), walls, color=[colors.get(s, f"C{i}") for i, s in enumerate(sides)]
    )
    ax.bar_label(bars, labels=[f"{x:.0f} s" for x in walls], fontsize=8)
    ax.set_xticks(range(len(sides)), [s.replace(", ", "\n") for s in sides], fontsize=8)
    ax.set_ylabel("wall time, all turns (s)")


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
    wall_bars(ax2, res)
    ax2.set_title(f"end to end: mlxd {res['speedup']:.2f}x faster")
    fig.tight_layout()
    fig.savefig(out / "agents.png", dpi=110)
    return "agents.png"
