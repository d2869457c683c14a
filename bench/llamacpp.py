"""llama.cpp as an anchor: llama-cpp-python's OpenAI-style server on the GGUF file
builtin:smollm2 is made from, against mlxd over HTTP on the same model.

Opt-in (`--suite llamacpp`): llama-cpp-python compiles llama.cpp from source when pip
installs it (the `anchor` extra: `python3 dev.py setup --anchor`). The server is started
as its documentation says (`python -m llama_cpp.server --model FILE --n_threads 2`), with
`--n_ctx` the daemon's context length (its default, 2048, is too short for the agents),
`--interrupt_requests false` (by default a waiting request cuts the running stream short,
and concurrent clients would get truncated replies), twice: its defaults (no prompt cache:
only the last prompt's KV stays, so a request reuses the prefix it shares with the one
before) and `--cache true --logits_all false` (its RAM cache of saved states, 2 GiB,
looked up by the longest token prefix). The second flag is what makes that cache usable:
with the server's default `logits_all`, every saved state copies the whole score matrix
(n_ctx x vocabulary float32: 1.6 GB at SmolLM2's 8192 x 49152), which the cache's capacity
does not count; the full agents run took that server to 19.5 GB and the kernel's OOM
killer in its 4th turn. Without it a reply's logits are computed for its last prompt token
only, which is all a completion without logprobs needs.

Both workloads reuse the other suites' clients: throughput (bench/mlx_server.py's
streaming `/v1/completions` clients at 1, 2, 4, 8, 16 concurrent, fresh prompts every
round, so cold on every side; llama.cpp serves one request at a time) and agents
(bench/agents.py's interleaved conversations, sized in tokens: 2K and more in the full
run), mlxd with `X-Mlxd-Session` and with no session. Every side gets the same raw text
as a completion prompt (no chat template on either side), greedy; llama.cpp gets
`repeat_penalty: 1.0` (its server's default, 1.1, would change the greedy tokens).
llama.cpp's stream carries no usage: its prompt tokens come from its own
`/extras/tokenize/count` (the tokenization its completion uses), its reused prefix from
its log ("N prefix-match hit"), its completion tokens are max_tokens unless it stopped
(then the reply re-tokenized, plus the end-of-sequence token); all taken after the timing.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .agents import (
    Turn,
    _summary,
    agreement,
    compare,
    converse,
    openings,
    server_turn,
    tables,
    wall_bars,
)
from .common import Daemon, loadavg, median, pairs
from .mlx_server import MlxServer, _free_port, _same_text, _through_server, complete
from .throughput import CLIENTS, prompts

__all__ = ["LlamaServer", "available", "run"]

MODEL = "builtin:smollm2"  # the model whose GGUF file llama.cpp can read
EXTRA = {"repeat_penalty": 1.0}  # greedy as on mlxd: no repetition penalty
INSTALL = "python3 dev.py setup --anchor (pip builds llama.cpp from source: ~7 min on 2 cores)"

# Full: the throughput suite's client counts and a conversation of 2K tokens at turn 1,
# growing by ~200 tokens a turn; quick: toy sizes.
FULL: dict[str, Any] = {
    "clients": CLIENTS, "max_tokens": 128, "rounds": 3,
    "agents": 8, "turns": 5, "first_tokens": 2048, "user": 600, "reply": 32,
}  # fmt: skip
QUICK: dict[str, Any] = {
    "clients": (1, 4), "max_tokens": 16, "rounds": 1,
    "agents": 3, "turns": 2, "first_tokens": 256, "user": 120, "reply": 8,
}  # fmt: skip

MLXD = "mlxd"
SESSIONS, SESSIONLESS = "mlxd, sessions", "mlxd, no session"
DEFAULTS, CACHED = "llama.cpp, defaults", "llama.cpp, --cache true --logits_all false"


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf() -> Path:
    from mlxd.daemon.models.smollm2 import DISTRIBUTION, smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        raise RuntimeError(f"{DISTRIBUTION} is not installed (python3 dev.py setup)")
    return path


# `python -m llama_cpp.server ARGS` with its stdout (uvicorn's access log, the barrier of
# `count`) sent to its stderr, the stream `start()` reads.
LAUNCHER = (
    "import os, runpy; os.dup2(2, 1); runpy.run_module('llama_cpp.server', run_name='__main__')"
)

_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit")
_COUNTED = "/extras/tokenize/count"  # in uvicorn's access log, once the count is answered


class LlamaServer(MlxServer):
    """`python -m llama_cpp.server` on 127.0.0.1 and a free port, with its log read for the
    prefix it reused; `usage(max_tokens)` fills in a reply's token counts."""

    name = "llama_cpp.server"
    health = "/v1/models"  # the model is loaded before the server listens

    def __init__(self, path: Path, n_ctx: int, *args: str) -> None:
        super().__init__(str(path), *args)
        self.n_ctx = n_ctx
        self.hits: list[int] = []  # prefix-match hits logged since the last clear
        self.counted = 0  # count requests answered, as the log shows them
        self.seen = threading.Condition()
        self.bos = -1

    def command(self) -> list[str]:
        return [
            sys.executable, "-c", LAUNCHER, "--model", self.model, "--n_threads", "2",
            "--n_ctx", str(self.n_ctx), "--interrupt_requests", "false",
            "--host", "127.0.0.1", "--port", str(self.port), *self.args,
        ]  # fmt: skip

    def start(self, timeout: float = 600.0) -> LlamaServer:
        super().start(timeout)  # its warm-up ran one completion
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = self.proc.wait(2)  # a build it cannot run dies on the first completion
            hint = (
                " (SIGILL: llama.cpp was compiled for instructions this CPU does not run, "
                "e.g. AMX under a VM: rebuild with CMAKE_ARGS=-DGGML_NATIVE=OFF)"
                if code == -4
                else ""
            )
            raise RuntimeError(f"{self.name} exited {code} on its first completion{hint}")
        return self

    def on_line(self, line: str) -> None:
        with self.seen:
            if m := _HIT.search(line):
                self.hits.append(int(m.group(1)))
            elif _COUNTED in line:
                self.counted += 1
                self.seen.notify_all()

    def count(self, text: str) -> int:
        """Tokens of `text` by the server's tokenizer (BOS included where the model adds it),
        once its log has caught up with the answer."""
        with self.seen:
            mark = self.counted
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            body = json.dumps({"input": text})
            conn.request("POST", _COUNTED, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            got = json.loads(resp.read())
        finally:
            conn.close()
        with self.seen:
            if not self.seen.wait_for(lambda: self.counted > mark, timeout=30):
                raise RuntimeError("llama_cpp.server's log did not show the count request")
        return int(got["count"])

    def usage(self, max_tokens: int) -> Callable[[str, dict[str, Any]], None]:
        def fill(prompt: str, got: dict[str, Any]) -> None:
            if self.bos < 0:
                self.bos = self.count("")
            got["prompt_tokens"] = self.count(prompt)  # its log has the completion's lines now
            with self.seen:
                got["cached_tokens"], self.hits = sum(self.hits), []
            stopped = got["finish_reason"] != "length"
            got["completion_tokens"] = (
                self.count(got["text"]) - self.bos + 1 if stopped else max_tokens
            )

        return fill


class Http:
    """A daemon with an HTTP listener on a loopback port, and its API token."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.daemon = Daemon(MODEL, "--http", f"127.0.0.1:{self.port}")
        self.auth: dict[str, str] = {}

    def start(self) -> None:
        self.daemon.start()
        token = (self.daemon.state_dir / "api-token").read_text().strip()
        self.auth = {"Authorization": "Bearer " + token}
        complete(self.port, "warm up", max_tokens=2, headers=self.auth)


@contextlib.contextmanager
def up() -> Iterator[tuple[Http, Http, LlamaServer, LlamaServer]]:
    """Two daemons with an HTTP listener (for sessions; for no session), then the two
    llama.cpp servers with the daemons' context length; stopped after."""
    path = gguf()
    daemons = (Http(), Http())
    llamas: list[LlamaServer] = []
    try:
        for d in daemons:
            d.start()
        with Client(daemons[0].daemon.socket) as client:
            n_ctx = int(client.status().model.context_length)
        llamas = [
            LlamaServer(path, n_ctx),
            LlamaServer(path, n_ctx, "--cache", "true", "--logits_all", "false"),
        ]
        for s in llamas:
            s.start()
        yield daemons[0], daemons[1], llamas[0], llamas[1]
    finally:
        for s in llamas:
            s.stop()
        for d in daemons:
            d.daemon.kill()
            d.daemon.__exit__(None, None, None)


def run(model: str, quick: bool, log: Any = None, **opts: Any) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not available():
        raise RuntimeError(f"llama-cpp-python is not installed: {INSTALL}")
    if model != MODEL:
        log(f"  llama.cpp reads SmolLM2's GGUF file: the suite runs {MODEL}, not {model}")
    p = dict(QUICK if quick else FULL)
    p.update({k: v for k, v in opts.items() if k in p})
    log("  starting two daemons and two llama.cpp servers")
    with up() as (named, anonymous, plain, cached):
        with Client(named.daemon.socket) as client:
            status = client.status()
            texts = openings(client, p)
        llamas = {DEFAULTS: plain, CACHED: cached}
        throughput = _throughput(named, llamas, p, log)
        reply = p["reply"]

        def mlxd(side: Http, session: bool) -> Turn:
            def turn(i: int, prompt: str) -> dict[str, Any]:
                name = {"X-Mlxd-Session": f"agent-{i}"} if session else {}
                return server_turn(side.port, prompt, reply, side.auth | name)

            return turn

        def llama(server: LlamaServer) -> Turn:
            def turn(i: int, prompt: str) -> dict[str, Any]:
                with server.seen:
                    server.hits = []  # what the warm-ups and the throughput run left
                return server_turn(server.port, prompt, reply, None, EXTRA, server.usage(reply))

            return turn

        sides = {
            SESSIONS: mlxd(named, True),
            SESSIONLESS: mlxd(anonymous, False),
            DEFAULTS: llama(plain),
            CACHED: llama(cached),
        }
        log(
            f"  agents: {p['agents']} x {p['turns']} turns, turn 1 of {p['first_tokens']}+ tokens, "
            f"user messages of {p['user']} characters, replies of {reply} tokens"
        )
        turns, walls = converse(sides, texts, p, log)
        with Client(named.daemon.socket) as client:
            sessions = client.status().sessions
    summary = {s: _summary(turns[s], walls[s], p["turns"]) for s in sides}
    wall = {s: summary[s]["wall_s"] for s in sides}
    return {
        "status": status,
        "workload": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
        "llama_cpp_python": version("llama-cpp-python"),
        "gguf": gguf().name,
        "n_ctx": plain.n_ctx,
        "mlxd_dtype": status.model.dtype,
        "throughput": throughput,
        "sides": list(sides),
        "summary": summary,
        "speedup": {
            f"{m} vs {s}": wall[s] / wall[m] for m in (SESSIONS, SESSIONLESS) for s in llamas
        },
        "same": compare(turns),
        "turns_total": p["agents"] * p["turns"],
        "mlxd_sessions": {"hot": sessions.hot, "disk": sessions.disk},
        "turns": turns,
    }


def _throughput(
    mlxd: Http, llamas: dict[str, LlamaServer], p: dict[str, Any], log: Any
) -> list[dict[str, Any]]:
    """Aggregate tokens/s at each client count, fresh prompts every round (the same to
    every side: each server is its own process, so they are new to each), one side
    computing at a time, the order alternating by round."""
    max_tokens, order = p["max_tokens"], [MLXD, *llamas]
    measured: list[dict[str, Any]] = []
    for k in range(p["rounds"]):
        for n in p["clients"]:
            texts = prompts(n, f".llama.{n}.{k}")
            got: dict[str, Any] = {"round": k, "n": n}
            for side in order if k % 2 == 0 else order[::-1]:
                if side == MLXD:
                    got[side] = _through_server(mlxd.port, n, max_tokens, texts, mlxd.auth)
                else:
                    s = llamas[side]
                    got[side] = _through_server(
                        s.port, n, max_tokens, texts, None, EXTRA, s.usage(max_tokens)
                    )
            measured.append(got)
            log(
                f"  round {k + 1}/{p['rounds']}, {n} clients: "
                + ", ".join(f"{s} {got[s]['tps']:.1f}" for s in order)
                + f" tok/s, load {loadavg()}"
            )
    rows = []
    for n in p["clients"]:
        ps = [m for m in measured if m["n"] == n]
        row: dict[str, Any] = {"clients": n, "mlxd_tps": median([m[MLXD]["tps"] for m in ps])}
        row["mlxd_ttft_ms_p50"] = median([m[MLXD]["ttft_ms_p50"] for m in ps])
        for side in llamas:
            ratios = [m[MLXD]["tps"] / m[side]["tps"] for m in ps]
            row[side] = {
                "tps": median([m[side]["tps"] for m in ps]),
                "ratio": median(ratios),
                "ratios": ratios,
                "ttft_ms_p50": median([m[side]["ttft_ms_p50"] for m in ps]),
                "same_text": _same_text(ps, MLXD, side),
                "stopped_early": sum(m[side]["stopped_early"] for m in ps),
            }
        row["mlxd_stopped_early"] = sum(m[MLXD]["stopped_early"] for m in ps)
        rows.append(row)
    return rows


# -- report ------------------------------------------------------------------------------

TARGET = 1.0  # llama.cpp's wall time (its defaults) / mlxd's, agents of 2K tokens and more


def headline(res: dict[str, Any]) -> list[str]:
    w, x = res["workload"], res["summary"]
    first = min(t["prompt_tokens"] for t in res["turns"][SESSIONS] if t["turn"] == 0)
    lines = []
    for m in (SESSIONS, SESSIONLESS):
        for s in (DEFAULTS, CACHED):
            ratio = res["speedup"][f"{m} vs {s}"]
            target = s == DEFAULTS
            lines.append(
                f"| agents: {m} (HTTP) "
                + (f"≥ {TARGET:.1f}x" if target else "vs")
                + f" {s} end to end ({w['agents']} agents x {w['turns']} turns, {first}+ tokens) | "
                f"{ratio:.2f}x ({x[m]['wall_s']:.0f} vs {x[s]['wall_s']:.0f} s) | "
                + (("yes" if ratio >= TARGET else "**no**") if target else "no target")
                + " |"
            )
    for r in res["throughput"]:
        lines.append(
            f"| mlxd (HTTP) vs {DEFAULTS}, {r['clients']} streaming client(s), cold | "
            f"{pairs(r[DEFAULTS]['ratios'])} ({r['mlxd_tps']:.1f} vs {r[DEFAULTS]['tps']:.1f} "
            "tok/s) | no target |"
        )
    return lines


def section(res: dict[str, Any]) -> list[str]:
    w, sides = res["workload"], res["sides"]
    lines = [
        f"## llama.cpp anchor (llama-cpp-python {res['llama_cpp_python']}, {res['gguf']})",
        "",
        f"`python -m llama_cpp.server --model {res['gguf']} --n_threads 2 --n_ctx {res['n_ctx']} "
        "--interrupt_requests false`, with its defaults (no prompt cache: the KV of the last "
        "prompt only) and with `--cache true --logits_all false` (RAM cache of saved states, "
        "2 GiB; the second flag keeps each state from copying the n_ctx x vocabulary logits); mlxd serves "
        f"{MODEL} from the same file ({res['mlxd_dtype']} on this machine) over HTTP "
        "(`--http`). Every side gets the same raw text on streaming `/v1/completions`, greedy "
        "(llama.cpp: `repeat_penalty: 1.0`), one server computing at a time, the order "
        "alternating by round. llama.cpp's token counts: `/extras/tokenize/count` and its log's "
        "prefix-match hits, taken after the timing (its stream has no usage).",
        "",
        f"Throughput (max_tokens {w['max_tokens']}, median of {w['rounds']} round(s), new prompts "
        "every round: cold everywhere; llama.cpp serves one request at a time):",
        "",
        f"| clients | mlxd tok/s | {DEFAULTS} tok/s | ratio (each round) | {CACHED} tok/s | ratio "
        "(each round) | TTFT p50 ms mlxd / defaults / cache | same text as mlxd (defaults / "
        "cache) | stopped early (mlxd / defaults / cache) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["throughput"]:
        d, c = r[DEFAULTS], r[CACHED]

        def each(x: dict[str, Any]) -> str:
            return ", ".join(f"{v:.2f}" for v in x["ratios"])

        lines.append(
            f"| {r['clients']} | {r['mlxd_tps']:.1f} | {d['tps']:.1f} | **{d['ratio']:.2f}x** "
            f"({each(d)}) | {c['tps']:.1f} | **{c['ratio']:.2f}x** ({each(c)}) | "
            f"{r['mlxd_ttft_ms_p50']:.0f} / {d['ttft_ms_p50']:.0f} / {c['ttft_ms_p50']:.0f} | "
            f"{d['same_text']} / {c['same_text']} | {r['mlxd_stopped_early']} / "
            f"{d['stopped_early']} / {c['stopped_early']} |"
        )
    lines += [
        "",
        f"Agents: {w['agents']} x {w['turns']} turns, interleaved, one request at a time; turn 1 "
        f"of at least {w['first_tokens']} tokens (mlxd's tokenizer), each later turn adding "
        f"mlxd's reply ({w['reply']} tokens) and a {w['user']}-character user message.",
        "",
        "",
    ]
    lines += tables(res, {s: s for s in sides})
    same = agreement(res)
    lines += [
        "",
        f"Against mlxd with sessions: {same}. mlxd sessions at the end: "
        f"{res['mlxd_sessions']['hot']} hot, {res['mlxd_sessions']['disk']} on disk. Replies "
        "can differ where mlxd computes in float32 and llama.cpp on the Q4_1 weights. Wall "
        "times leave out llama.cpp's token counting after each turn.",
        "",
    ]
    return lines


def plot(res: dict[str, Any], out: Path, plt: Any) -> str:
    rows = res["throughput"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.27
    xs = list(range(len(rows)))
    for j, (side, key) in enumerate(((MLXD, None), (DEFAULTS, DEFAULTS), (CACHED, CACHED))):
        ys = [r["mlxd_tps"] if key is None else r[key]["tps"] for r in rows]
        bars = ax.bar([i + (j - 1) * w for i in xs], ys, w, label=side)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(xs, [str(r["clients"]) for r in rows])
    ax.set_xlabel("concurrent streaming clients (cold prompts)")
    ax.set_ylabel("generated tokens/s (aggregate)")
    ax.set_title(f"mlxd vs llama.cpp server, max_tokens {res['workload']['max_tokens']}")
    ax.legend(fontsize=8)
    # The same colour for a server in both panels: mlxd (with sessions or without) and each llama.cpp.
    wall_bars(ax2, res, {SESSIONS: "C0", SESSIONLESS: "C0", DEFAULTS: "C1", CACHED: "C2"})
    ax2.set_title(f"agents, {res['workload']['agents']} x {res['workload']['turns']} turns")
    fig.tight_layout()
    fig.savefig(out / "llamacpp.png", dpi=110)
    return "llamacpp.png"
