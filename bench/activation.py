"""On demand: first connection to first token under systemd-socket-activate, cold and from disk.

    .venv/bin/python bench/run.py --suite activation [--model builtin:tiny]
    .venv/bin/python bench/activation.py [--model M] [--runs N]

Each run starts the daemon with the real `systemd-socket-activate -l SOCK` (it execs the
daemon on the first connection, as systemd's .socket units do), times a client's first
token from its connect(), lets `--idle-exit` end the process, checks that no process is
left, and connects again: that turn continues the saved session from disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Daemon, median
from bench.resume import conversation
from mlxd.client import Client

IDLE_EXIT_S = 2.0
PROMPT_TOKENS = 2000  # a conversation worth keeping: its prefill is what the disk saves
MAX_TOKENS = 16


def _activate_tool() -> str:
    for path in (
        shutil.which("systemd-socket-activate"),
        "/usr/lib/systemd/systemd-socket-activate",
    ):
        if path and os.path.exists(path):
            return path
    raise RuntimeError("systemd-socket-activate not found (Debian package: systemd)")


class Activated(Daemon):
    """The daemon under systemd-socket-activate: nothing runs until someone connects."""

    def __init__(self, model: str) -> None:
        super().__init__(model, "--idle-exit", f"{IDLE_EXIT_S}s")
        self.launcher = [_activate_tool(), "-l", str(self.socket)]
        self.ready = lambda line: line.startswith("Listening on")

    def start(self, timeout: float = 60.0) -> Activated:
        """Listen (the stand-in manager binds anew each start); the daemon starts later."""
        self.socket.unlink(missing_ok=True)
        super().start(timeout)
        return self

    def event(self, name: str) -> dict[str, Any]:
        (record, *_) = self.events(name) or [{}]
        return record


def _turn(path: Path, prompt: str) -> dict[str, Any]:
    """Connect, stream one turn on the session; times from just before connect()."""
    wall, t0 = time.time(), time.perf_counter()
    with Client(path, wait=60) as client:
        stream = client.stream(prompt, session="bench", max_tokens=MAX_TOKENS)
        first = None
        for _ in stream:
            if first is None:
                first = time.perf_counter() - t0
        result = stream.result
        status = client.status()
    assert result is not None and first is not None
    return {
        "connect_wall": wall,
        "first_token_ms": first * 1000,
        "total_ms": (time.perf_counter() - t0) * 1000,
        "daemon_ttft_ms": result.timings.ttft_ms,
        "cached_tokens": result.usage.cached_tokens,
        "prompt_tokens": result.usage.prompt_tokens,
        "text": result.text,
        "rss_bytes": status.memory.rss_bytes,
        "status": status,
    }


def _idle_out(daemon: Activated) -> dict[str, Any]:
    t0 = time.perf_counter()
    assert daemon.proc is not None
    code = daemon.proc.wait(IDLE_EXIT_S + 60)
    pid_alive = os.path.exists(f"/proc/{daemon.proc.pid}")
    saved = daemon.event("sessions persisted").get("saved")
    if code != 0 or pid_alive:
        print(f"unclean exit {code}:\n{daemon.describe()}", file=sys.stderr, flush=True)
    return {
        "exit_code": code,
        "exit_after_ms": (time.perf_counter() - t0) * 1000,
        "process_left": pid_alive,
        "rss_bytes_idle": 0 if not pid_alive else None,
        "saved": saved,
    }


def run_once(model: str, prompt_tokens: int) -> dict[str, Any]:
    daemon = Activated(model)
    prompt = conversation(prompt_tokens, "on demand")
    try:
        cold = _turn(daemon.start().socket, prompt)
        status = cold.pop("status")
        cold |= _spans(daemon, cold.pop("connect_wall"))
        first_exit = _idle_out(daemon)
        restored = _turn(daemon.start().socket, prompt + cold.pop("text") + " And tomorrow?")
        restored.pop("text")
        restored.pop("status")
        restored |= _spans(daemon, restored.pop("connect_wall"))
        exits = [first_exit, _idle_out(daemon)]
        return {"cold": cold, "restored": restored, "exits": exits, "status": status}
    finally:
        daemon.kill()
        shutil.rmtree(daemon.folder, ignore_errors=True)


def _spans(daemon: Activated, connect_wall: float) -> dict[str, float]:
    """From the log's timestamps: connect → the interpreter up (imports), → serving."""
    from datetime import datetime

    def ts(name: str) -> float:
        record = daemon.event(name)
        assert record, name
        return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()

    return {
        "startup_ms": (ts("loading model") - connect_wall) * 1000,
        "load_ms": (ts("serving") - ts("loading model")) * 1000,
    }


def run(model: str, quick: bool, log: Any = None, runs: int | None = None) -> dict[str, Any]:
    n = runs or (1 if quick else 3)
    prompt_tokens = 500 if quick else PROMPT_TOKENS
    results = []
    for i in range(n):
        if log:
            log(f"activation run {i + 1}/{n}")
        results.append(run_once(model, prompt_tokens))

    def med(kind: str, key: str) -> float:
        return median([r[kind][key] for r in results])

    exits = [e for r in results for e in r["exits"]]
    status = [r.pop("status") for r in results][-1]
    return {
        "status": status,  # run.py reads the machine from it
        "model": model,
        "runs": n,
        "idle_exit_s": IDLE_EXIT_S,
        "max_tokens": MAX_TOKENS,
        "prompt_tokens": results[0]["cold"]["prompt_tokens"],
        "cold_first_token_ms": med("cold", "first_token_ms"),
        "cold_load_ms": med("cold", "load_ms"),
        "cold_startup_ms": med("cold", "startup_ms"),
        "restored_startup_ms": med("restored", "startup_ms"),
        "restored_load_ms": med("restored", "load_ms"),
        "restored_first_token_ms": med("restored", "first_token_ms"),
        "restored_daemon_ttft_ms": med("restored", "daemon_ttft_ms"),
        "cold_daemon_ttft_ms": med("cold", "daemon_ttft_ms"),
        "restored_cached_tokens": min(r["restored"]["cached_tokens"] for r in results),
        "rss_serving_bytes": med("cold", "rss_bytes"),
        "all_exits_clean": all(e["exit_code"] == 0 and not e["process_left"] for e in exits),
        "idle_exit_after_ms": median([e["exit_after_ms"] for e in exits]),
        "raw": results,
    }


def headline(res: dict[str, Any]) -> list[str]:
    return [
        f"| on demand ({res['model']}): first connection → first token, cold start / session from "
        f"disk | {res['cold_first_token_ms']:.0f} / {res['restored_first_token_ms']:.0f} ms "
        f"({res['restored_cached_tokens']} tokens from disk); RSS after idle exit 0 | "
        f"{'yes' if res['all_exits_clean'] else '**no**'} |"
    ]


def section(res: dict[str, Any]) -> list[str]:
    mib = res["rss_serving_bytes"] / 2**20
    return [
        "## On demand (socket activation)",
        "",
        f"`systemd-socket-activate -l SOCK` execs the daemon on the first connection; "
        f"`--idle-exit {res['idle_exit_s']:g}s`; {res['runs']} run(s), medians. A session turn of "
        f"{res['prompt_tokens']} prompt tokens; after the idle exit the next connection continues "
        "it. Times run from the client's connect() (before any process exists) to its first "
        "streamed token.",
        "",
        "| | first token (ms) | interpreter start, imports (ms) | model load (ms) | "
        "daemon TTFT (ms) | cached tokens |",
        "|---|---|---|---|---|---|",
        f"| cold start | {res['cold_first_token_ms']:.0f} | {res['cold_startup_ms']:.0f} | "
        f"{res['cold_load_ms']:.0f} | {res['cold_daemon_ttft_ms']:.1f} | 0 |",
        f"| restart, session from disk | {res['restored_first_token_ms']:.0f} | "
        f"{res['restored_startup_ms']:.0f} | {res['restored_load_ms']:.0f} | "
        f"{res['restored_daemon_ttft_ms']:.1f} | {res['restored_cached_tokens']} |",
        "",
        f"RSS while serving {mib:.0f} MiB; after the idle exit no process is left (RSS 0): "
        f"{'every exit clean (code 0)' if res['all_exits_clean'] else 'NOT every exit was clean'}.",
        "",
    ]


def plot(res: dict[str, Any], out: Path, plt: Any) -> str:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    bars = ax.bar(
        ["cold start", "from disk"],
        [res["cold_first_token_ms"], res["restored_first_token_ms"]],
        color=["C1", "C0"],
    )
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_ylabel("connect → first token, ms")
    ax.set_title(f"On demand, {res['model']}")
    fig.tight_layout()
    fig.savefig(out / "activation.png", dpi=110)
    return "activation.png"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    res = run(args.model, False, lambda m: print(m, file=sys.stderr), runs=args.runs)
    print("\n".join(section(res)))
    print(json.dumps({k: v for k, v in res.items() if k not in ("raw", "status")}, indent=2))
    return 0 if res["all_exits_clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
