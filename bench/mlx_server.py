"""`mlx_lm.server` (mlx-lm's OpenAI-style HTTP server, with its LRU prompt cache) as a
baseline: start it on 127.0.0.1, talk to it with streaming requests, and measure its
aggregate tokens/s with N concurrent streaming clients against the daemon's.

The server runs in its own process, started the way `mlx_lm.server --model FOLDER` starts
it, except that the process imports `mlxd.daemon` first: that loads OpenBLAS before
mlx.core, as the daemon does, so both sides run the same matmul code (without it mlx's
bundled reference BLAS is ~30x slower on CPU and the comparison would mean nothing).

Throughput, like bench/throughput.py: the same prompts (`throughput.prompts`), max_tokens
and greedy decoding; each client on its own connection (mlxd: its socket; mlx_lm.server:
one HTTP request with `"stream": true`); aggregate = completion tokens of every client /
wall time from the first send to the last byte. Every mlx_lm.server measurement is paired
with the same daemon measurement just before or after it (the order alternating by round),
one of the two computing at a time, and the ratio daemon / mlx_lm.server is taken per
pair, then the median. mlxd is measured twice per pair: on its socket, and over HTTP
(`--http`, the very `/v1/completions` requests mlx_lm.server gets, with the API token):
the apples-to-apples ratio.

Cold and repeat: every round sends new prompts (cold: neither server has seen them), then
each side gets the socket's prompts of the round again (repeat: mlx_lm.server's LRU prompt
cache and mlxd's prefix cache can skip their prefill). Cold over HTTP needs prompts the
daemon's socket run has not cached, so it gets a second fresh set, and mlx_lm.server runs
that set too, just beside it: each HTTP ratio compares the same prompts. (Comparing
different prompts would not be fair on a real model, which stops early on some of them:
the wall is set by the longest stream, so fewer tokens meant a lower tok/s.)
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .common import MODEL_CACHE, ROOT, Daemon, at_once, loadavg, median, pairs
from .throughput import CLIENTS, QUICK_CLIENTS, _cpu_s, _through_daemon, prompts

__all__ = ["MlxServer", "complete", "run"]


# Resolve the model folder (generating a built-in model or importing a GGUF file on first
# use) and run mlx_lm.server's own main() on it, OpenBLAS loaded first. Where the daemon
# dequantizes (--weights auto on CPU), the server gets a float32 copy of a quantized
# model too, so both compute the same way.
LAUNCHER = r"""
import json, os, shutil, sys, tempfile
from pathlib import Path
import mlxd.daemon  # OpenBLAS before mlx.core, as in the daemon
from mlxd.daemon.models.model import resolve_folder, resolve_weights

spec = sys.argv[1]
folder = resolve_folder(spec, Path(os.environ["MLXD_CACHE_DIR"]))
config = json.loads((folder / "config.json").read_text())
if "quantization" in config and resolve_weights("auto") == "float32":
    out = folder.parent / f"{folder.name}-float32"
    if not out.exists():
        from mlx_lm.convert import convert
        tmp = Path(tempfile.mkdtemp(dir=folder.parent)) / "m"
        convert(str(folder), str(tmp), dequantize=True, dtype="float32")
        tmp.rename(out)
        shutil.rmtree(tmp.parent, ignore_errors=True)
    folder = out
sys.argv = ["mlx_lm.server", "--model", str(folder), *sys.argv[2:]]
from mlx_lm.server import main
main()
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlxServer:
    """`mlx_lm.server` on 127.0.0.1 and a free port. `start()` returns once `/health` says
    ok and one small completion went through (the model is loaded in the server's
    generation thread, after the socket opens); `stop()` ends the process."""

    name = "mlx_lm.server"
    health = "/health"  # the path that answers 200 once the server listens
    stdout: int = subprocess.DEVNULL  # where the process's stdout goes (stderr is read)

    def __init__(self, model: str, *args: str) -> None:
        self.model, self.args = model, list(args)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self.start_s = 0.0

    def command(self) -> list[str]:
        return [
            sys.executable, "-c", LAUNCHER, self.model, "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "WARNING", *self.args,
        ]  # fmt: skip

    def start(self, timeout: float = 600.0) -> MlxServer:
        self.port = _free_port()
        env = dict(os.environ, MLXD_CACHE_DIR=str(MODEL_CACHE), PYTHONPATH=str(ROOT))
        env["PYTHONUNBUFFERED"] = "1"
        cmd = self.command()
        self.lines = []
        t0 = time.perf_counter()
        self.proc = proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self.stdout, stderr=subprocess.PIPE,
            env=env, cwd=ROOT,
        )  # fmt: skip

        def read() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.on_line(line)
                self.lines.append(line)
                del self.lines[:-200]

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.lines[-30:]))
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} did not answer {self.health} in time")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", self.health)
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        complete(self.port, "warm up", max_tokens=2)  # waits for the model to load
        self.start_s = time.perf_counter() - t0
        return self

    def on_line(self, line: str) -> None:
        """Each line of the server's log as it comes (for a subclass that reads them)."""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()  # no drain to wait for: nothing is in flight when we stop
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        self.proc = None

    kill = stop

    def __enter__(self) -> MlxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def complete(
    port: int,
    prompt: str,
    max_tokens: int,
    timeout: float = 900.0,
    t0: float | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streaming `/v1/completions` request (greedy, usage included, `extra` fields
    added to the body); times measured by the client from `t0` (default: now): `ttft_s` to
    the first chunk carrying text, `end_s` to `[DONE]`."""
    body = json.dumps(
        {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **(extra or {}),
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter() if t0 is None else t0
    first = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    finish = None
    try:
        conn.request(
            "POST", "/v1/completions", body, {"Content-Type": "application/json", **(headers or {})}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"port {port} answered {resp.status}: {resp.read()[:500]!r}")
        for raw in resp:  # server-sent events; ": keepalive" comments during the prefill
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                text = choice.get("text") or ""
                if text:
                    if first is None:
                        first = time.perf_counter()
                    parts.append(text)
                finish = choice.get("finish_reason") or finish
    finally:
        conn.close()
    end = time.perf_counter()
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return {
        "text": "".join(parts),
        "ttft_s": (first or end) - t0,
        "end_s": end - t0,
        "sent": t0,
        "end": end,
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": cached,
        "completion_tokens": usage.get("completion_tokens"),
        "finish_reason": finish,
    }


def _through_server(
    port: int,
    n: int,
    max_tokens: int,
    texts: list[str],
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    usage: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """n concurrent streaming HTTP requests; wall = first send to last [DONE]. `usage`
    fills in a reply's token counts after the timing, for a server whose stream has none."""

    def one(i: int, go: Callable[[], None]) -> dict[str, Any]:
        go()
        return complete(port, texts[i], max_tokens, headers=headers, extra=extra)

    done = at_once(n, one)
    if usage is not None:
        for text, r in zip(texts[:n], done, strict=True):
            usage(text, r)
    wall = max(r["end"] for r in done) - min(r["sent"] for r in done)
    tokens = sum(int(r["completion_tokens"] or 0) for r in done)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tps": tokens / wall,
        "texts": [r["text"] for r in done],
        "stopped_early": sum(r["finish_reason"] == "stop" for r in done),
        "ttft_ms_p50": median([r["ttft_s"] * 1000 for r in done]),
    }


def _same_text(pairs: list[dict[str, Any]], a: str, b: str) -> str:
    """How many replies were identical between sides a and b, of how many."""
    same = [x == y for p in pairs for x, y in zip(p[a]["texts"], p[b]["texts"], strict=True)]
    return f"{sum(same)}/{len(same)}"


def _stopped_early(pairs: list[dict[str, Any]], a: str, b: str) -> str:
    """Replies that ended before max_tokens, side a / side b."""
    return " / ".join(str(sum(p[side]["stopped_early"] for p in pairs)) for side in (a, b))


def run(model: str, quick: bool, log: Any = None, **opts: Any) -> dict[str, Any]:
    """Aggregate tokens/s, mlxd vs mlx_lm.server, N concurrent streaming clients."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    counts = tuple(opts.get("clients", QUICK_CLIENTS if quick else CLIENTS))
    max_tokens = int(opts.get("max_tokens", 32 if quick else 128))
    rounds = int(opts.get("rounds", 1 if quick else 3))
    texts = prompts(max(counts), ".warm-up")
    log("  starting mlx_lm.server and the daemon")
    http_port = _free_port()
    with MlxServer(model) as server, Daemon(model, "--http", f"127.0.0.1:{http_port}") as daemon:
        assert daemon.proc is not None
        auth = {"Authorization": "Bearer " + (daemon.state_dir / "api-token").read_text().strip()}
        with Client(daemon.socket) as client:
            client.generate(texts[1], max_tokens=8)  # warm-up, like the server's
            status = client.status()
        complete(server.port, texts[1], max_tokens=8)
        complete(http_port, texts[1], max_tokens=8, headers=auth)
        pids = {"mlxd": daemon.proc.pid, "mlxd_http": daemon.proc.pid, "mlx_lm.server": server.pid}
        idle_cpu = {"mlxd": 0.0, "mlx_lm.server": 0.0}

        def measure(side: str, n: int, texts: list[str]) -> dict[str, Any]:
            other = "mlxd" if side == "mlx_lm.server" else "mlx_lm.server"
            before = _cpu_s(pids[other])
            if side == "mlxd":
                got = _through_daemon(daemon.socket, n, max_tokens, texts)
                got["texts"] = [r["result"].text for r in got.pop("client")]
            elif side == "mlxd_http":
                got = _through_server(http_port, n, max_tokens, texts, auth)
            else:
                got = _through_server(server.port, n, max_tokens, texts)
            idle_cpu[other] += _cpu_s(pids[other]) - before
            return got

        measured: list[dict[str, Any]] = []
        failed: list[str] = []
        for k in range(rounds):
            for n in counts:
                fresh = prompts(n, f".{n}.{k}")
                second = prompts(n, f".{n}.{k}.http")
                for kind in ("cold", "repeat"):
                    got: dict[str, Any] = {"round": k, "n": n, "kind": kind}
                    # (key, side, prompts); the HTTP side's own mlx_lm.server run, if any,
                    # beside it; the order alternates by round.
                    plan = [("mlx_lm.server", "mlx_lm.server", fresh), ("mlxd", "mlxd", fresh)]
                    if kind == "cold":
                        plan.append(("server_for_http", "mlx_lm.server", second))
                    plan.append(("mlxd_http", "mlxd_http", second if kind == "cold" else fresh))
                    try:
                        for key, side, mine in plan if k % 2 == 0 else plan[::-1]:
                            got[key] = measure(side, n, mine)
                    except OSError as exc:  # a server that drops connections loses this pair only
                        failed.append(f"round {k + 1}, {n} clients, {kind}, {side}: {exc!r}")
                        log(f"  {failed[-1]}")
                        continue
                    measured.append(got)
                    got.setdefault("server_for_http", got["mlx_lm.server"])
                    d_tps, s_tps = got["mlxd"]["tps"], got["mlx_lm.server"]["tps"]
                    h_tps, hs_tps = got["mlxd_http"]["tps"], got["server_for_http"]["tps"]
                    log(
                        f"  round {k + 1}/{rounds}, {n} clients, {kind}: mlxd {d_tps:.1f} vs "
                        f"mlx_lm.server {s_tps:.1f} tok/s = {d_tps / s_tps:.2f}x; HTTP "
                        f"{h_tps:.1f} vs {hs_tps:.1f} = {h_tps / hs_tps:.2f}x, load {loadavg()}"
                    )
    rows = []
    for n, kind in ((n, kind) for kind in ("cold", "repeat") for n in counts):
        ps = [p for p in measured if p["n"] == n and p["kind"] == kind]
        if not ps:
            continue
        d_tps = [p["mlxd"]["tps"] for p in ps]
        s_tps = [p["mlx_lm.server"]["tps"] for p in ps]
        ratios = [d / s for d, s in zip(d_tps, s_tps, strict=True)]
        h_tps = [p["mlxd_http"]["tps"] for p in ps]
        hs_tps = [p["server_for_http"]["tps"] for p in ps]
        http_ratios = [h / s for h, s in zip(h_tps, hs_tps, strict=True)]
        rows.append(
            {
                "clients": n,
                "kind": kind,
                "daemon_tps": median(d_tps),
                "server_tps": median(s_tps),
                "ratio": median(ratios),
                "ratios": ratios,
                "http_tps": median(h_tps),
                "http_ratio": median(http_ratios),
                "http_ratios": http_ratios,
                "http_server_tps": median(hs_tps),
                "http_ttft_ms_p50": median([p["mlxd_http"]["ttft_ms_p50"] for p in ps]),
                "http_same_text": _same_text(ps, "mlxd_http", "server_for_http"),
                "http_stopped_early": _stopped_early(ps, "mlxd_http", "server_for_http"),
                "daemon_tps_rounds": d_tps,
                "server_tps_rounds": s_tps,
                "daemon_ttft_ms_p50": median([p["mlxd"]["ttft_ms_p50"] for p in ps]),
                "server_ttft_ms_p50": median([p["mlx_lm.server"]["ttft_ms_p50"] for p in ps]),
                "daemon_tokens": ps[-1]["mlxd"]["tokens"],
                "server_tokens": ps[-1]["mlx_lm.server"]["tokens"],
                "stopped_early": _stopped_early(ps, "mlxd", "mlx_lm.server"),
                "same_text": _same_text(ps, "mlxd", "mlx_lm.server"),
            }
        )
    return {
        "status": status,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "idle_cpu_s": idle_cpu,
        "server_start_s": server.start_s,
        "server_args": "defaults (--decode-concurrency 32, --prompt-concurrency 8)",
        "rows": rows,
        "failed": failed,
    }


# -- report ------------------------------------------------------------------------------

TARGET = 1.0  # mlxd aggregate tok/s / mlx_lm.server's, at every client count


def headline(res: dict[str, Any]) -> list[str]:
    return [
        f"| mlxd ≥ {TARGET:.1f}x mlx_lm.server, {r['clients']} streaming client(s), "
        f"{r.get('kind', 'cold')}, socket / HTTP | {pairs(r['ratios'])} / {pairs(r['http_ratios'])} "
        f"({r['daemon_tps']:.1f} vs {r['server_tps']:.1f} / {r['http_tps']:.1f} vs "
        f"{r.get('http_server_tps', r['server_tps']):.1f} tok/s) | "
        f"{'yes' if min(r['ratio'], r['http_ratio']) >= TARGET else '**no**'} |"
        for r in res["rows"]
    ]


def section(res: dict[str, Any], throughput: dict[str, Any] | None = None) -> list[str]:
    suite = {r["clients"]: r for r in (throughput or {}).get("rows", [])}
    lines = [
        f"## mlx_lm.server throughput (greedy, max_tokens {res['max_tokens']}, median of "
        f"{res['rounds']} round(s))",
        "",
        "mlx_lm.server (mlx-lm's HTTP server, " + res["server_args"] + ", OpenBLAS loaded first as "
        "in the daemon) and mlxd run side by side, one computing at a time (CPU used by the idle "
        f"side meanwhile: mlxd {res['idle_cpu_s']['mlxd']:.1f} s, mlx_lm.server "
        f"{res['idle_cpu_s']['mlx_lm.server']:.1f} s). Same prompts as the throughput suite; each "
        "client streams on its own connection (HTTP `/v1/completions` with `stream: true`, or the "
        "socket). Aggregate = completion tokens / wall time from the first send to the last byte; "
        "each mlx_lm.server measurement is paired with the mlxd one just before or after it, the "
        "ratio taken per pair.",
        "",
        "Cold: new prompts in every round; mlxd over HTTP gets a second fresh set (the socket run "
        "has cached the first), and its ratio is to mlx_lm.server on that same set, measured beside "
        "it. Repeat: the round's first set again, to every side right after the cold measurement.",
        "",
        "| prompts | clients | mlxd tok/s | mlx_lm.server tok/s | ratio (per round) | mlxd over HTTP tok/s | "
        "mlx_lm.server tok/s, HTTP's prompts | HTTP ratio (per round) | mlxd TTFT p50 ms (HTTP) | "
        "mlx_lm.server TTFT p50 ms | same text (HTTP) | stopped early, mlxd / mlx_lm.server (HTTP) | "
        "mlxd tok/s in the throughput suite |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        rounds = ", ".join(f"{x:.2f}" for x in r["ratios"])
        http_rounds = ", ".join(f"{x:.2f}" for x in r.get("http_ratios", []))
        other = suite.get(r["clients"])
        lines.append(
            f"| {r.get('kind', 'cold')} | {r['clients']} | {r['daemon_tps']:.1f} | {r['server_tps']:.1f} | **{r['ratio']:.2f}x** "
            f"({rounds}) | {r.get('http_tps', 0):.1f} | {r.get('http_server_tps', r['server_tps']):.1f} | "
            f"**{r.get('http_ratio', 0):.2f}x** ({http_rounds}) | "
            f"{r['daemon_ttft_ms_p50']:.0f} ({r.get('http_ttft_ms_p50', 0):.0f}) | "
            f"{r['server_ttft_ms_p50']:.0f} | {r['same_text']} ({r.get('http_same_text', '-')}) | "
            f"{r['stopped_early']} ({r.get('http_stopped_early', '-')}) | "
            + (
                f"{other['daemon_tps' if r.get('kind') != 'repeat' else 'repeat_tps']:.1f}"
                if other
                else "-"
            )
            + " |"
        )
    lines += [
        "",
        "TTFT here is the client's (send to first text). `same text`: replies identical between the "
        "two servers. The throughput suite's mlxd column was measured at another time (other load); "
        "the ratio uses the paired numbers only."
        + (
            " Pairs lost (a side dropped its connections): " + "; ".join(res["failed"]) + "."
            if res.get("failed")
            else ""
        ),
        "",
    ]
    return lines


def plot(res: dict[str, Any], out: Path, plt: Any) -> str:
    rows = [r for r in res["rows"] if r.get("kind", "cold") == "cold"]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.38
    xs = list(range(len(rows)))
    d = ax.bar([i - w / 2 for i in xs], [r["daemon_tps"] for r in rows], w, label="mlxd")
    s = ax.bar([i + w / 2 for i in xs], [r["server_tps"] for r in rows], w, label="mlx_lm.server")
    ax.bar_label(d, labels=[f"{r['ratio']:.2f}x" for r in rows], fontsize=8)
    ax.bar_label(s, fmt="%.1f", fontsize=8)
    ax.set_xticks(xs, [str(r["clients"]) for r in rows])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("generated tokens/s (aggregate)")
    ax.set_title(f"mlxd vs mlx_lm.server, cold prompts, max_tokens {res['max_tokens']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "mlx_server.png", dpi=110)
    return "mlx_server.png"
