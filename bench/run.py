"""Run the benchmarks and write bench/results/<date>/report.md with PNG plots.

python3 dev.py bench [--quick] [--suite throughput,resume,latency] [--model builtin:small]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from bench import latency, resume, throughput
from bench.common import machine

SUITES = {"throughput": throughput.run, "resume": resume.run, "latency": latency.run}


def _plot(results: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = []
    if "throughput" in results:
        rows = results["throughput"]["rows"]
        xs = [r["clients"] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        w = 0.38
        ax.bar(
            [i - w / 2 for i in range(len(xs))],
            [r["daemon_tps"] for r in rows],
            w,
            label="mlxd (socket, streaming)",
        )
        ax.bar(
            [i + w / 2 for i in range(len(xs))],
            [r["batch_generate_tps"] for r in rows],
            w,
            label="mlx-lm batch_generate",
        )
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("generated tokens/s")
        ax.set_title("Aggregate throughput")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        pngs.append("throughput.png")
    if "resume" in results:
        rows = results["resume"]["rows"]
        xs = [f"{r['cached_tokens']}" for r in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        w = 0.27
        for k, (key, label) in enumerate(
            [
                ("cold_ttft_ms", "cold"),
                ("disk_ttft_ms", "from disk after restart"),
                ("hot_ttft_ms", "hot"),
            ]
        ):
            ax.bar(
                [i + (k - 1) * w for i in range(len(xs))], [r[key] for r in rows], w, label=label
            )
        ax.set_yscale("log")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel("cached tokens")
        ax.set_ylabel("time to first token (ms, log)")
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
    plt.close("all")
    return pngs


def _report(
    results: dict[str, Any], info: dict[str, Any], pngs: list[str], args: argparse.Namespace
) -> str:
    lines = [f"# mlxd benchmark report ({dt.datetime.now():%Y-%m-%d %H:%M})", ""]
    lines += [f"Command: `python3 dev.py bench {' '.join(sys.argv[1:])}`", ""]
    lines += ["Machine: " + ", ".join(f"{k}: {v}" for k, v in info.items()), ""]
    lines += ["Every comparison below was measured in this run, on the same model and prompts.", ""]
    if "throughput" in results:
        t = results["throughput"]
        lines += [
            f"## Throughput (greedy, max_tokens {t['max_tokens']})",
            "",
            "| clients | mlxd tok/s | batch_generate tok/s | ratio | mlxd TTFT p50 ms |",
            "|---|---|---|---|---|",
        ]
        for r in t["rows"]:
            lines.append(
                f"| {r['clients']} | {r['daemon_tps']:.1f} | {r['batch_generate_tps']:.1f} | "
                f"{r['ratio']:.2f}x | {r['daemon_ttft_ms_p50']:.0f} |"
            )
        s = t["single"]
        lines += [
            "",
            f"Single stream decode: mlxd {s['daemon_decode_tps']:.1f} tok/s vs stream_generate "
            f"{s['stream_generate_decode_tps']:.1f} tok/s = **{s['ratio']:.2f}x** "
            f"(TTFT {s['daemon_ttft_ms']:.0f} ms vs {s['stream_generate_ttft_ms']:.0f} ms).",
            "Targets: ≥ 0.9x batch_generate at 16 clients; single stream ≥ 0.95x.",
            "",
        ]
    if "resume" in results:
        lines += [
            "## Resume: TTFT of a follow-up turn",
            "",
            "| cached tokens | cold ms | hot ms | disk ms | hot speed-up | disk speed-up | exact | file MB/1K tok | save ms/1K | load ms/1K |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["resume"]["rows"]:
            lines.append(
                f"| {r['cached_tokens']} | {r['cold_ttft_ms']:.0f} | {r['hot_ttft_ms']:.0f} | {r['disk_ttft_ms']:.0f} | "
                f"{r['hot_speedup']:.0f}x | {r['disk_speedup']:.0f}x | {r['exact']} | {r['file_mb_per_1k']:.1f} | "
                f"{r['save_ms_per_1k']:.0f} | {r['load_ms_per_1k']:.0f} |"
            )
        lines += [
            "",
            "Targets: from disk at 4K ≥ 30x faster than cold; hot ≥ 100x. `exact`: the greedy "
            "tokens of the cold, hot and disk turns are identical.",
            "",
        ]
    if "latency" in results:
        lat = results["latency"]
        lines += [
            "## Latency under load (closed loop, exponential think time 0.5 s)",
            "",
            "| clients | requests | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | e2e p50/p95/p99 ms |",
            "|---|---|---|---|---|",
        ]
        for r in lat["rows"]:
            f = lambda d: f"{d['p50']:.0f} / {d['p95']:.0f} / {d['p99']:.0f}"  # noqa: E731
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
    lines += [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="short settings (under 5 minutes on 2 cores)"
    )
    parser.add_argument(
        "--suite", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES)
    )
    parser.add_argument("--model", default="builtin:small")
    parser.add_argument(
        "--out", type=Path, help="folder for the report (default bench/results/<date>)"
    )
    args = parser.parse_args(argv)
    out = args.out or Path(__file__).parent / "results" / f"{dt.datetime.now():%Y-%m-%d-%H%M}"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for name in args.suite.split(","):
        t0 = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        result = SUITES[name](args.model, args.quick)
        status = result.pop("status", None)
        if status is not None or not info:
            info = machine(status) if status is not None else machine()
        results[name] = result
        print(f"bench: {name} done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    pngs = _plot(results, out)
    (out / "results.json").write_bytes(
        msgspec.json.format(msgspec.json.encode({"machine": info, **results}))
    )
    (out / "report.md").write_text(_report(results, info, pngs, args))
    print(out / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
