"""Time to first token of a follow-up turn on a session holding 1K, 4K and 8K tokens:
cold (no session, the whole conversation as the prompt), hot (the same session, in memory)
and from disk after a daemon restart; whether the three give the same greedy tokens; cache
file size, save and restore time per 1K tokens.

Per size: turn 1 on session S (the conversation). Before turn 2, S is forked: the `disk`
forks are saved (sessions/save, timed), the `hot` forks give extra hot samples. Turn 2
(conversation + turn-1 text + a short new message) then runs hot on S and its hot forks,
alternating with cold turns without a session. The daemon gets SIGTERM (it drains, saves,
exits 0), the saved files are dropped from the page cache, a new daemon starts on the same
state folder, and turn 2 runs on each disk fork, then (full mode) cold once more: the disk
ratio is taken against the cold turn of the same process.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from mlxd.client import Client

from .common import Daemon, loadavg, median, run_python

SIZES = (1024, 4096, 8192)
QUICK_SIZES = (1024, 2048)
TURN = 16  # tokens generated per turn
NEW_MESSAGE = " And what next?"


LOADER = r"""
# Read, validate and restore saved session files the way the daemon does (its persistence
# module), timed: with the file in the page cache, and after dropping it from there.
import json, os, sys, time
from pathlib import Path
import mlxd.daemon  # OpenBLAS before mlx
from mlxd.daemon.kv import cachefile
from mlxd.daemon.kv import snapshot as kvsnap
from mlxd.daemon.models.model import load_model

m = load_model(sys.argv[1], Path(os.environ["MLXD_CACHE_DIR"]))
out = {}
for name in sys.argv[2:]:
    path = Path(name)
    row = {"n_tokens": int(cachefile.read_metadata(path)["n_tokens"]), "bytes": path.stat().st_size,
           "page_cache_ms": [], "dropped_ms": []}
    for _ in range(3):
        for key in ("dropped_ms", "page_cache_ms"):
            if key == "dropped_ms":
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            t0 = time.perf_counter()
            snap = cachefile.read_snapshot(path, fingerprint=m.fingerprint, num_layers=m.num_layers,
                                             kv_heads=m.kv_heads, head_dim=m.head_dim, dtype=m.dtype)
            kvsnap.restore(snap)  # evaluates the mlx arrays
            row[key].append((time.perf_counter() - t0) * 1000)
    out[name] = row
print(json.dumps(out))
"""


def drop_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to forget these files' cached pages (theirs only; no root needed), so
    the next read comes from the device. Advice: a virtual disk may still cache below."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def conversation(n: int, tag: str) -> str:
    """`n` tokens of ASCII (the built-in tokenizer is byte-level: one char, one token)."""
    line = f"[{tag}] The agent reads a file, thinks about it, and writes a careful note. "
    return (line * (n // len(line) + 1))[:n]


def _turn(client: Client, prompt: str, session: str | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = None
    stream = client.stream(prompt, session=session, max_tokens=TURN)
    for _ in stream:
        if first is None:
            first = time.perf_counter()
    r = stream.result
    assert r is not None
    return {
        "ttft_ms": r.timings.ttft_ms,  # the daemon's: arrival to first token
        "client_ttft_ms": ((first or time.perf_counter()) - t0) * 1000,
        "prompt_tokens": r.usage.prompt_tokens,
        "cached_tokens": r.usage.cached_tokens,
        "tokens": list(r.tokens),
    }


def _size(
    daemon: Daemon,
    n: int,
    hot_repeats: int,
    disk_repeats: int,
    cold_before: int,
    cold_after: int,
    log: Any,
) -> dict[str, Any]:
    s = f"r{n}"
    conv = conversation(n, f"c{n}")
    with Client(daemon.socket) as c:
        t = time.perf_counter()
        first = c.generate(conv, session=s, max_tokens=TURN)
        log(
            f"  {n}: turn 1 ({first.usage.prompt_tokens} tokens) in {time.perf_counter() - t:.1f} s"
        )
        follow = conv + first.text + NEW_MESSAGE
        save_s = []
        for k in range(disk_repeats):
            c.sessions_fork(s, f"{s}-disk{k}")
            t = time.perf_counter()
            saved = c.sessions_save(f"{s}-disk{k}")
            save_s.append(time.perf_counter() - t)
            assert saved == 1, saved
        for k in range(1, hot_repeats):
            c.sessions_fork(s, f"{s}-hot{k}")
        info = c.sessions_get(f"{s}-disk0")
        files = list(daemon.state_dir.glob(f"sessions/*/{s}-disk0.safetensors"))
        file_bytes = files[0].stat().st_size if files else info.bytes
        # Hot and cold turns alternate, so a change in the machine's load hits both.
        hot, cold = [], []
        for k in range(max(hot_repeats, cold_before)):
            if k < hot_repeats:
                hot.append(_turn(c, follow, s if k == 0 else f"{s}-hot{k}"))
            if k < cold_before:
                cold.append(_turn(c, follow, None))
        log(f"  {n}: hot {[round(h['ttft_ms']) for h in hot]} ms")
        log(f"  {n}: cold {[round(x['ttft_ms']) for x in cold]} ms")
        for k in range(hot_repeats):  # nothing left for SIGTERM to save but the disk forks
            c.sessions_delete(s if k == 0 else f"{s}-hot{k}")
    t = time.perf_counter()
    code = daemon.stop()  # SIGTERM: drain, save what is dirty, exit
    if code != 0:
        raise RuntimeError(f"the daemon exited {code} on SIGTERM")
    disk_files = [
        p
        for k in range(disk_repeats)
        for p in daemon.state_dir.glob(f"sessions/*/{s}-disk{k}.safetensors")
    ]
    drop_page_cache(disk_files)
    daemon.start()
    restart_s = time.perf_counter() - t
    with Client(daemon.socket) as c:
        # A new process: its first request pays one-time costs that are not the restore's.
        warm = c.generate("warm up " + conv[:32], max_tokens=2).timings.ttft_ms
        disk = [_turn(c, follow, f"{s}-disk{k}") for k in range(disk_repeats)]
        restored = c.status().details.get("sessions_restored")
        log(
            f"  {n}: disk {[round(d['ttft_ms']) for d in disk]} ms (after a warm-up turn of {warm:.0f} ms)"
        )
        # the cold turn again, in this process and at about this load, for the disk ratio
        cold2 = [_turn(c, follow, None) for _ in range(cold_after)]
        if cold2:
            log(f"  {n}: cold again {[round(x['ttft_ms']) for x in cold2]} ms")
    every = [x["tokens"] for x in hot + cold + disk + cold2]
    cold_ms, hot_ms, disk_ms = (median([x["ttft_ms"] for x in xs]) for xs in (cold, hot, disk))
    cold2_ms = median([x["ttft_ms"] for x in cold2]) if cold2 else cold_ms
    per_1k = info.tokens / 1000
    return {
        "size": n,
        "session_tokens": info.tokens,
        "prompt_tokens": cold[0]["prompt_tokens"],
        "cached_tokens": hot[0]["cached_tokens"],
        "disk_cached_tokens": disk[0]["cached_tokens"],
        "prefilled_tokens": hot[0]["prompt_tokens"] - hot[0]["cached_tokens"],
        "cold_ttft_ms": cold_ms,
        "hot_ttft_ms": hot_ms,
        "disk_ttft_ms": disk_ms,
        "cold_after_ttft_ms": cold2_ms,
        "cold_ttft_ms_all": [x["ttft_ms"] for x in cold],
        "cold_after_ttft_ms_all": [x["ttft_ms"] for x in cold2],
        "hot_ttft_ms_all": [x["ttft_ms"] for x in hot],
        "disk_ttft_ms_all": [x["ttft_ms"] for x in disk],
        "client_ttft_ms": {
            k: median([x["client_ttft_ms"] for x in xs])
            for k, xs in (("cold", cold + cold2), ("hot", hot), ("disk", disk))
        },
        "hot_speedup": cold_ms / hot_ms,
        "disk_speedup": cold2_ms / disk_ms,  # against the cold turn of the same daemon
        "exact": all(t == every[0] for t in every),
        "distinct_outputs": len({tuple(t) for t in every}),
        "file_bytes": file_bytes,
        "file_mb_per_1k": file_bytes / 1e6 / per_1k,
        "save_ms": median(save_s) * 1000,
        "save_ms_per_1k": median(save_s) * 1000 / per_1k,
        # restoring from disk (read, validate, into MLX) beyond what the hot turn costs
        "restore_ms": disk_ms - hot_ms,
        "restore_ms_per_1k": (disk_ms - hot_ms) / per_1k,
        "restart_s": restart_s,
        "warmup_ttft_ms": warm,
        "sessions_restored": restored,
        "disk_file": str(disk_files[0]) if disk_files else None,
        "samples": {
            "cold": len(cold),
            "cold_after": len(cold2),
            "hot": len(hot),
            "disk": len(disk),
        },
    }


def run(model: str, quick: bool, log: Any = None) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = []
    with Daemon(model) as daemon:
        with Client(daemon.socket) as c:
            c.generate("warm up", max_tokens=4)
            status = c.status()
        for n in QUICK_SIZES if quick else SIZES:
            log(f" {n} tokens, load {loadavg()}")
            rows.append(
                _size(
                    daemon,
                    n,
                    hot_repeats=3,
                    disk_repeats=2 if quick else 3,
                    cold_before=2 if n <= 1024 else 1,
                    cold_after=0 if quick else 1,
                    log=log,
                )
            )
        code = daemon.stop()
        log(" reading the saved files back, timed (daemon stopped)")
        files = [r["disk_file"] for r in rows if r["disk_file"] and Path(r["disk_file"]).exists()]
        try:
            loads = run_python(LOADER, model, *files) if files else {}
        except Exception as exc:  # the persistence module is internal: report, do not fail
            log(f" could not time the reads: {exc}")
            loads = {}
        for r in rows:
            got = loads.get(r["disk_file"])
            if got:
                per_1k = got["n_tokens"] / 1000
                r["read_ms_per_1k"] = median(got["page_cache_ms"]) / per_1k
                r["read_dropped_ms_per_1k"] = median(got["dropped_ms"]) / per_1k
                r["read_samples"] = got
    return {
        "status": status,
        "rows": rows,
        "turn_tokens": TURN,
        "new_message": NEW_MESSAGE,
        "sigterm_exit_codes_ok": code == 0,
    }
