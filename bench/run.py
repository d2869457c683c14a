"""Run the mlxd benchmarks; write <out>/report.md, results.json and PNG plots.

    .venv/bin/python bench/run.py [--quick] [--suite throughput,resume,...] [--soak MINUTES] [--allocator A] [--out DIR]

Default --out: bench/results/<YYYY-MM-DD-HHMM>/. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    activation,
    agents,
    distributed,
    latency,
    llamacpp,
    memory,
    mlx_server,
    resume,
    shared_prompt,
    soak,
    throughput,
    weights,
)
from bench.common import MODEL_CACHE, loadavg, machine, pairs

SUITES: dict[str, Any] = {
    "throughput": throughput.run,
    "resume": resume.run,
    "latency": lambda model, quick, log: latency.run(model, quick),
    "mlx_server": mlx_server.run,
    "agents": agents.run,
    "shared_prompt": shared_prompt.run,
    "memory": memory.run,
    "soak": soak.run,
    "activation": activation.run,
    "weights": weights.run,
    "distributed": distributed.run,
    "llamacpp": llamacpp.run,
}
# Suites whose report section, headline rows and plot live in their own module.
MODULES: dict[str, Any] = {
    "mlx_server": mlx_server,
    "agents": agents,
    "shared_prompt": shared_prompt,
    "memory": memory,
    "soak": soak,
    "activation": activation,
    "weights": weights,
    "distributed": distributed,
    "llamacpp": llamacpp,
}

# latency is slow (minutes even with --quick) and has no targets: run it by name; soak
# runs for --soak MINUTES, or by name (1 min with --quick, else 5); llamacpp needs the
# `anchor` extra (llama-cpp-python, compiled on install).
DEFAULT_SUITES = ("throughput", "mlx_server", "resume", "agents", "shared_prompt", "memory")

# Targets are reported against, never asserted.
TARGET_BATCH = 0.95  # daemon vs batch_generate at every client count
TARGET_SINGLE = 0.95  # single-stream decode vs stream_generate
TARGET_DISK_4K = 30.0  # cold TTFT / disk TTFT at 4K cached tokens
TARGET_HOT_FLOOR = 1.2  # hot TTFT / the in-process floor (new tokens + one decode step)
TARGET_ITL_SPREAD = 2.0  # inter-token p99 / p50 at 8 clients


def log(msg: str) -> None:
    print(f"[{dt.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# -- plots -------------------------------------------------------------------------------


def _plot(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = []
    if "throughput" in results:
        t = results["throughput"]
        rows = t["rows"]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
        w = 0.38
        xs = list(range(len(rows)))
        d = ax.bar(
            [i - w / 2 for i in xs],
            [r["daemon_tps"] for r in rows],
            w,
            label="mlxd (socket, streaming)",
        )
        b = ax.bar(
            [i + w / 2 for i in xs],
            [r["batch_generate_tps"] for r in rows],
            w,
            label="mlx-lm batch_generate",
        )
        ax.bar_label(d, labels=[f"{r['ratio']:.2f}x" for r in rows], fontsize=8)
        ax.bar_label(b, fmt="%.1f", fontsize=8)
        ax.set_xticks(xs, [str(r["clients"]) for r in rows])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("generated tokens/s (aggregate)")
        ax.set_title(f"Aggregate throughput, max_tokens {t['max_tokens']}")
        ax.legend()
        s = t["single"]
        bars = ax2.bar(
            ["mlxd", "stream_generate"],
            [s["daemon_decode_tps"], s["stream_generate_decode_tps"]],
            color=["C0", "C1"],
        )
        ax2.bar_label(bars, fmt="%.1f", fontsize=8)
        ax2.set_title(f"Single-stream decode ({s['ratio']:.2f}x)")
        ax2.set_ylabel("tokens/s")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        pngs.append("throughput.png")
    if "resume" in results:
        rows = results["resume"]["rows"]
        fig, ax = plt.subplots(figsize=(7, 4))
        w = 0.27
        for k, (key, label) in enumerate(
            [
                ("cold_ttft_ms", "cold (no session)"),
                ("disk_ttft_ms", "from disk after restart"),
                ("hot_ttft_ms", "hot (in memory)"),
            ]
        ):
            bars = ax.bar(
                [i + (k - 1) * w for i in range(len(rows))], [r[key] for r in rows], w, label=label
            )
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), [f"{r['cached_tokens']}" for r in rows])
        ax.set_xlabel("cached tokens")
        ax.set_ylabel("time to first token, ms (log)")
        ax.set_title("Follow-up turn on a session")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "resume.png", dpi=110)
        pngs.append("resume.png")
    if "latency" in results:
        rows = results["latency"]["rows"]
        xs = [r["clients"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for ax, key, title in zip(
            axes,
            ("ttft_ms", "itl_ms", "e2e_ms"),
            ("TTFT", "inter-token", "end-to-end"),
            strict=True,
        ):
            for q in ("p50", "p95", "p99"):
                ax.plot(xs, [r[key][q] for r in rows], marker="o", label=q)
            ax.set_title(f"{title} (ms)")
            ax.set_xlabel("clients")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        pngs.append("latency.png")
    for name, module in MODULES.items():
        if name in results:
            pngs.append(module.plot(results[name], out, plt))
    plt.close("all")
    return pngs


# -- report ------------------------------------------------------------------------------


def _met(value: float, target: float) -> str:
    return "yes" if value >= target else "**no**"


def _headline(results: dict[str, Any]) -> list[str]:
    lines = ["| target (reported, not asserted) | measured | met |", "|---|---|---|"]
    if "throughput" in results:
        t = results["throughput"]
        for kind, key in (("cold", ""), ("repeat", "repeat_")):
            for r in t["rows"]:
                if f"{key}ratio" not in r:
                    continue
                tps = r["daemon_tps" if kind == "cold" else "repeat_tps"]
                lines.append(
                    f"| mlxd ≥ {TARGET_BATCH}x batch_generate at {r['clients']} clients, {kind} | "
                    f"{pairs(r[f'{key}ratios'])} ({tps:.1f} vs {r['batch_generate_tps']:.1f} tok/s) | "
                    f"{_met(r[f'{key}ratio'], TARGET_BATCH)} |"
                )
        s = t["single"]
        lines.append(
            f"| single-stream decode ≥ {TARGET_SINGLE}x stream_generate | {pairs(s['ratios'])} "
            f"({s['daemon_decode_tps']:.1f} vs {s['stream_generate_decode_tps']:.1f} tok/s) | "
            f"{_met(s['ratio'], TARGET_SINGLE)} |"
        )
    if "resume" in results:
        rows = results["resume"]["rows"]
        r4 = next((r for r in rows if r["size"] == 4096), rows[-1])
        lines.append(
            f"| from disk at {r4['size'] // 1024}K ≥ {TARGET_DISK_4K:.0f}x faster than cold | {r4['disk_speedup']:.1f}x "
            f"({r4['disk_ttft_ms']:.0f} vs {r4['cold_after_ttft_ms']:.0f} ms) | {_met(r4['disk_speedup'], TARGET_DISK_4K)} |"
        )
        for r in rows:
            if "hot_floor_ratio" in r:
                ratio = r["hot_floor_ratio"]
                lines.append(
                    f"| hot TTFT at {r['size'] // 1024}K ≤ {TARGET_HOT_FLOOR}x the in-process floor "
                    f"({r['floor_new_tokens']} new tokens + 1 decode step) | {ratio:.2f}x ({r['hot_ttft_ms']:.0f} "
                    f"vs {r['floor_ms']:.0f} ms, floor {min(r['floor_ms_all']):.0f}-{max(r['floor_ms_all']):.0f}) | "
                    f"{'yes' if ratio <= TARGET_HOT_FLOOR else '**no**'} |"
                )
            if "disk_bound_ms" in r:
                lines.append(
                    f"| disk turn at {r['size'] // 1024}K ≤ hot + read-and-restore | {r['disk_ttft_ms']:.0f} vs "
                    f"{r['disk_bound_ms']:.0f} ms ({r['hot_ttft_ms']:.0f} + {r['disk_bound_ms'] - r['hot_ttft_ms']:.0f}) | "
                    f"{'yes' if r['disk_ttft_ms'] <= r['disk_bound_ms'] else '**no**'} |"
                )
        ok = all(r["exact"] for r in rows)
        each = ", ".join(
            f"{r['size'] // 1024}K: "
            + ("same" if r["exact"] else f"{r['distinct_outputs']} different outputs")
            for r in rows
        )
        lines.append(
            f"| turn-2 tokens identical cold / hot / disk (greedy) | {each} | {'yes' if ok else '**no**'} |"
        )
    if "latency" in results:
        rows = results["latency"]["rows"]
        r8 = next((r for r in rows if r["clients"] == 8), rows[-1])
        itl = r8["itl_ms"]
        if itl.get("p50"):
            spread = itl["p99"] / itl["p50"]
            met = "yes" if spread <= TARGET_ITL_SPREAD else "**no**"
            lines.append(
                f"| inter-token p99 ≤ {TARGET_ITL_SPREAD:.0f}x p50 at {r8['clients']} clients | {spread:.2f}x "
                f"({itl['p99']:.0f} vs {itl['p50']:.0f} ms) | {met} |"
            )
    for name, module in MODULES.items():
        if name in results:
            lines += module.headline(results[name])
    return lines


def _throughput_section(t: dict[str, Any]) -> list[str]:
    lines = [
        f"## Throughput (greedy, max_tokens {t['max_tokens']}, median of {t['rounds']} round(s))",
        "",
        "mlx-lm runs in a worker process beside the daemon, one of the two computing at a time "
        f"(CPU used by the idle side while the other measured: mlxd {t['idle_cpu_s']['daemon']:.1f} s, "
        f"mlx-lm {t['idle_cpu_s']['mlx-lm']:.1f} s). Each mlxd measurement is paired with the same "
        "mlx-lm one just before or after it (order alternating by round); ratios are per pair, then "
        "the median. Aggregate = generated tokens (every client) / wall time from the first send to the "
        "last reply; each client streams on its own connection. Prompts: "
        f"{min(t['prompt_tokens'])}-{max(t['prompt_tokens'])} tokens, distinct per client and new "
        "in every round (cold: no cache has seen them). Repeat: right after the pair, mlxd gets the "
        "round's prompts again (its prefix cache keeps sessionless prompts; batch_generate has no "
        "cache, so its cold figure of the pair is the reference).",
        "",
        "| clients | mlxd tok/s | batch_generate tok/s | cold ratio (each pair) | mlxd TTFT p50 ms | repeat: mlxd tok/s | repeat ratio (each pair) | repeat TTFT p50 ms | repeat tokens = cold | stopped early (mlxd / mlx-lm) | same tokens as batch_generate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t["rows"]:
        rounds = ", ".join(f"{x:.2f}" for x in r["ratios"])
        again = ", ".join(f"{x:.2f}" for x in r.get("repeat_ratios", []))
        lines.append(
            f"| {r['clients']} | {r['daemon_tps']:.1f} | {r['batch_generate_tps']:.1f} | **{r['ratio']:.2f}x** ({rounds}) | "
            f"{r['daemon_ttft_ms_p50']:.0f} | {r.get('repeat_tps', 0):.1f} | **{r.get('repeat_ratio', 0):.2f}x** ({again}) | "
            f"{r.get('repeat_ttft_ms_p50', 0):.0f} | {r.get('repeat_same_as_cold', '-')} | "
            f"{r['daemon_stopped_early']} / {r['batch_stopped_early']} | {r['same_tokens']} |"
        )
    s = t["single"]
    lines += [
        "",
        f"Single stream, {s['tokens']} tokens, median of {s['samples']} each (decode rate = (completion_tokens - 1) / (total - TTFT)):",
        "",
        "| | decode tok/s | TTFT ms |",
        "|---|---|---|",
        f"| mlxd, daemon timings | {s['daemon_decode_tps']:.1f} | {s['daemon_ttft_ms']:.0f} |",
        f"| mlxd, seen by the client (first delta to reply) | {s['daemon_client_decode_tps']:.1f} | {s['daemon_client_ttft_ms']:.0f} |",
        f"| mlx-lm stream_generate | {s['stream_generate_decode_tps']:.1f} | {s['stream_generate_ttft_ms']:.0f} |",
        f"| ratio | **{s['ratio']:.2f}x** (per pair: {', '.join(f'{x:.2f}' for x in s['ratios'])}); client-side {s['client_ratio']:.2f}x | |",
        "",
        f"Same tokens as stream_generate: {s['same_tokens']}. Ratios are the median of the per-pair ratios, "
        "so they can differ from the ratio of the median rates shown beside them.",
        "",
    ]
    return lines


def _ms(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, int | float) else "n/a"


def _resume_section(res: dict[str, Any]) -> list[str]:
    rows = res["rows"]
    lines = [
        "## Resume: TTFT of a follow-up turn",
        "",
        f"Turn 1: the conversation on a session ({res['turn_tokens']} tokens generated). Turn 2: conversation + "
        f"turn-1 text + {res['new_message']!r}, greedy. TTFT is the daemon's (arrival to first token), median of "
        "the samples. Hot speed-up = cold / hot, both in the first daemon, alternating; disk speed-up = cold / disk, "
        "both in the second daemon (quick mode: the first daemon's cold). Hot: the same session in memory (and forks of it taken before turn 2). Disk: forks saved with "
        "sessions/save, SIGTERM (drain, save, exit 0), the files dropped from the page cache (posix_fadvise), a new "
        "daemon on the same state folder, one warm-up request without a session, then turn 2.",
        "",
        "| cached tokens | turn-2 prompt | prefilled on hot/disk | cold ms (1st / 2nd daemon) | hot ms | floor ms | hot / floor | disk ms | hot speed-up | disk speed-up | identical tokens | samples cold/hot/disk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = r["samples"]
        lines.append(
            f"| {r['cached_tokens']} | {r['prompt_tokens']} | {r['prefilled_tokens']} | {r['cold_ttft_ms']:.0f} / "
            f"{_ms(r['cold_after_ttft_ms']) if r['cold_after_ttft_ms_all'] else '-'} | "
            f"{r['hot_ttft_ms']:.0f} | {_ms(r.get('floor_ms'))} | "
            + (f"**{r['hot_floor_ratio']:.2f}x**" if "hot_floor_ratio" in r else "n/a")
            + f" | {r['disk_ttft_ms']:.0f} | {r['hot_speedup']:.1f}x | "
            f"**{r['disk_speedup']:.1f}x** | {'yes' if r['exact'] else 'NO'} | {n['cold']}+{n['cold_after']}/{n['hot']}/{n['disk']} |"
        )
    lines += [
        "",
        "Cache files and their cost, per 1K session tokens:",
        "",
        "| session tokens | file MB | MB / 1K | save ms (sessions/save) | save ms / 1K | disk - hot TTFT ms / 1K | read+restore ms / 1K, page cache | same, dropped from page cache | restart s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['session_tokens']} | {r['file_bytes'] / 1e6:.1f} | {r['file_mb_per_1k']:.2f} | {r['save_ms']:.0f} | "
            f"{r['save_ms_per_1k']:.0f} | {r['restore_ms_per_1k']:.0f} | {_ms(r.get('read_ms_per_1k'))} | "
            f"{_ms(r.get('read_dropped_ms_per_1k'))} | {r['restart_s']:.1f} |"
        )
    lines += [
        "",
        "Floor: in-process mlx-lm (daemon stopped) with the turn's cached tokens already in a KV cache, "
        "timed: prefill the turn's new tokens onto it and one decode step, greedy, the cache trimmed back "
        "between repeats; the daemon's hot TTFT (arrival to first token) is judged against it. "
        "sessions/save is timed by the client (snapshot, checksum, write, fsync, rename). `disk - hot` is the "
        "restore cost as the brief defines it, a difference of two noisy medians; the read+restore columns time "
        "the daemon's own persistence code (read, validate, checksum, into MLX) on the saved file, in a separate "
        "process with the daemon stopped, median of 3.",
        "",
        "All samples (ms): "
        + "; ".join(
            f"{r['size']}: cold {[round(x) for x in r['cold_ttft_ms_all']]}, hot {[round(x) for x in r['hot_ttft_ms_all']]}, "
            f"disk {[round(x) for x in r['disk_ttft_ms_all']]}, cold in the 2nd daemon {[round(x) for x in r['cold_after_ttft_ms_all']]}"
            for r in rows
        ),
        "",
        "Turn 2 re-tokenizes the turn-1 *text*; where the random model emitted bytes that are not valid UTF-8, "
        "the text holds U+FFFD and the common prefix ends there, so `cached tokens` can be less than the session "
        "holds and hot/disk turns prefill the rest (`prefilled` column): that prefill, not the cache, is most of "
        "a hot turn's TTFT.",
        "",
    ]
    return lines


def _latency_section(lat: dict[str, Any]) -> list[str]:
    def f(d: dict[str, float]) -> str:
        return f"{d['p50']:.0f} / {d['p95']:.0f} / {d['p99']:.0f}"

    lines = [
        "## Latency under load (closed loop, exponential think time 0.5 s)",
        "",
        "| clients | requests | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | e2e p50/p95/p99 ms |",
        "|---|---|---|---|---|",
    ]
    for r in lat["rows"]:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {f(r['ttft_ms'])} | {f(r['itl_ms'])} | {f(r['e2e_ms'])} |"
        )
    lines += [
        "",
        f"Overload (open-loop Poisson arrivals, --max-queue {lat['max_queue']}): ServerBusy starts at "
        f"{lat['overload_rate_per_s']} requests/s.",
        "",
        "| arrivals/s | requests | busy | busy fraction | TTFT p50 ms |",
        "|---|---|---|---|---|",
    ]
    for o in lat["overload"]:
        lines.append(
            f"| {o['rate_per_s']} | {o['requests']} | {o['busy']} | {o['busy_fraction']:.2f} | {o['ttft_ms']['p50']:.0f} |"
        )
    lines.append("")
    return lines


def _report(
    results: dict[str, Any], info: dict[str, Any], pngs: list[str], meta: dict[str, Any]
) -> str:
    lines = [f"# mlxd benchmark report ({meta['started']})", ""]
    lines += [f"Command: `{meta['command']}`", ""]
    lines += [
        "Machine: " + ", ".join(f"{k}: {v}" for k, v in info.items() if k != "params"),
        "",
        f"Model parameters: {info.get('params', '?'):,}."
        if isinstance(info.get("params"), int)
        else "",
        f"Load average (1/5/15 min) at start {meta['load_start']}, at end {meta['load_end']}; the machine is shared, so "
        "absolute numbers move between runs: compare the ratios, each measured within this run. "
        f"Took {meta['elapsed_s'] / 60:.1f} min.",
        "",
        "## Headline",
        "",
        *_headline(results),
        "",
    ]
    if "throughput" in results:
        lines += _throughput_section(results["throughput"])
    if "resume" in results:
        lines += _resume_section(results["resume"])
    if "latency" in results:
        lines += _latency_section(results["latency"])
    for name, module in MODULES.items():
        if name == "mlx_server" and name in results:
            lines += module.section(results[name], results.get("throughput"))
        elif name in results:
            lines += module.section(results[name])
    lines += [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _command() -> str:
    exe = sys.executable
    if exe.startswith(os.getcwd() + os.sep):
        exe = os.path.relpath(exe)
    env = (
        f"MLXD_CACHE_DIR={shlex.quote(os.environ['MLXD_CACHE_DIR'])} "
        if os.environ.get("MLXD_CACHE_DIR")
        else ""
    )
    return env + shlex.join([exe, *sys.argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="short settings (a few minutes on 2 cores)"
    )
    parser.add_argument(
        "--suite",
        default=",".join(DEFAULT_SUITES),
        help=f"comma-separated, of: {', '.join(SUITES)} (default: {','.join(DEFAULT_SUITES)})",
    )
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument(
        "--soak",
        type=float,
        metavar="MINUTES",
        help="also run the soak suite (steady mixed load) for MINUTES (default: off)",
    )
    parser.add_argument(
        "--allocator",
        choices=["system", "jemalloc"],
        help="the soak's daemon runs with this `mlxd serve --allocator` (default: its default)",
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the report (default: bench/results/<date>)"
    )
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.suite.split(",") if s.strip()]
    if args.soak and "soak" not in names:
        names.append("soak")
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        parser.error(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    if "llamacpp" in names and not llamacpp.available():
        parser.error(f"the llamacpp suite needs llama-cpp-python: {llamacpp.INSTALL}")
    started = dt.datetime.now()
    out = args.out or Path(__file__).resolve().parent / "results" / f"{started:%Y-%m-%d-%H%M}"
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "started": f"{started:%Y-%m-%d %H:%M}",
        "command": _command(),
        "load_start": loadavg(),
        "quick": args.quick,
        "model_cache": str(MODEL_CACHE),
    }
    t_start = time.monotonic()
    results: dict[str, Any] = {}
    info: dict[str, Any] = {}
    failed: dict[str, str] = {}
    for name in names:
        t0 = time.monotonic()
        log(f"{name}{' (quick)' if args.quick else ''} ...")
        try:
            opts = {"minutes": args.soak, "allocator": args.allocator} if name == "soak" else {}
            result = SUITES[name](args.model, args.quick, log, **opts)
        except Exception:  # one suite failing must not lose the others' results
            failed[name] = traceback.format_exc()
            log(f"{name} FAILED after {time.monotonic() - t0:.0f} s:\n{failed[name]}")
            continue
        status = result.pop("status", None)
        if status is not None and "blas" not in info:
            info = machine(status) | ({"params": info["params"]} if "params" in info else {})
        if "params" in result:
            info["params"] = result["params"]
        results[name] = result
        log(f"{name} done in {time.monotonic() - t0:.0f} s")
        _write(out, results, info, meta, failed, t_start, plots=False)  # partial, in case
    report = _write(out, results, info, meta, failed, t_start, plots=True)
    print(report)
    return 1 if failed else 0


def _write(
    out: Path,
    results: dict[str, Any],
    info: dict[str, Any],
    meta: dict[str, Any],
    failed: dict[str, str],
    t_start: float,
    plots: bool,
) -> Path:
    meta["elapsed_s"] = time.monotonic() - t_start
    meta["load_end"] = loadavg()
    meta["failed"] = failed
    pngs = _plot(results, out) if plots else []
    (out / "results.json").write_text(
        json.dumps(_jsonable({"meta": meta, "machine": info, **results}), indent=1)
    )
    text = _report(results, info, pngs, meta)
    for name, tb in failed.items():
        text += f"\n## {name}: FAILED\n\n```\n{tb}```\n"
    (out / "report.md").write_text(text)
    return out / "report.md"


if __name__ == "__main__":
    sys.exit(main())
