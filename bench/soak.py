"""Soak: a steady mixed load on one daemon for a given number of minutes, sampling its RSS,
open file descriptors, MLX active memory and TTFT over time, to see whether anything grows.

Load (three client threads, seeded, each request bounded by max_tokens and a timeout):
- sessions: turns on a ring of sessions whose conversations grow by a message and a reply
  per turn; a conversation past `max_session` tokens is deleted and starts again, so the
  working set is steady. The daemon runs with its default `--kv-budget`, so nothing spills;
  `kv_budget="tight"` sets one that holds about half the sessions at their longest, so
  they spill and come back from disk all along. The hot KV is sampled too (`status`
  sessions.hot_bytes: the sessions and the prefix cache's anonymous entries, which plain
  generates leave behind until they are evicted): it grows with the conversations and
  fills with anonymous entries by design, so RSS net of it is what the growth target is
  judged on; raw RSS is reported beside it.
- plain: generates without a session, distinct prompts.
- chaos: a stream cancelled after its first delta (the client's `$/cancelRequest`), or a
  raw connection that sends a streaming generate and closes after its first line, or
  before reading anything.
A sampler reads /proc/<pid>/status (VmRSS), /proc/<pid>/fd and `status` every few seconds,
and sends a probe (a fixed plain prompt, 4 tokens) whose client-side TTFT is the TTFT
series (a probe that times out counts as a stall). Growth is measured after the warm-up (the first 20% of the time): the median of
the samples in the last 10% of the run against the median of those in the 20-30% window.
Open fds are also counted at rest, before the load starts and once it has stopped and the
daemon has closed its connections: they must be equal. Target: RSS growth < 5% net of the
hot KV, fds flat, 0 client errors, 0 stalls.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mlxd.client import Client, RpcError

from .common import Daemon, loadavg, median, percentiles, run_python
from .memory import (
    BLOCK_TOKENS,
    KV_PER_TOKEN,
    MAPPING_KINDS,
    open_fds,
    proc_status,
    rss_by_mapping,
)

__all__ = ["run"]

WARMUP = 0.2
REQUEST_TIMEOUT_S = 60.0  # a client gives up (and reconnects) after this long without a byte
STALL_MS = 10_000.0  # a probe TTFT past this counts as a stall
BASE_WINDOW = (0.2, 0.3)
END_WINDOW = 0.9
MAPPING_LABELS = {
    "heap": "glibc's main heap",
    "arenas": "other threads' malloc arenas",
    "big_anonymous": "anonymous mappings >= 1 MiB (big mallocs: MLX's buffers)",
    "small_anonymous": "smaller anonymous mappings",
    "files": "file mappings (model, libraries)",
}


def _fill(text: str, n: int) -> str:
    return (text * (n // len(text) + 1))[:n]


def _raw_disconnect(path: Path, prompt: str, read_first: bool) -> None:
    """A client that goes away: send a streaming generate, maybe read one line, close."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(REQUEST_TIMEOUT_S)
    try:
        s.connect(str(path))
        msg = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "generate",
            "params": {"prompt": prompt, "max_tokens": 64, "stream": True},
        }
        s.sendall(json.dumps(msg).encode() + b"\n")
        if read_first:
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        s.close()


class Load:
    def __init__(self, path: Path, stop_at: float, sessions: int, max_session: int) -> None:
        self.path, self.stop_at = path, stop_at
        self.sessions, self.max_session = sessions, max_session
        self.counts = {"turns": 0, "plain": 0, "cancels": 0, "disconnects": 0, "resets": 0,
                       "errors": 0}  # fmt: skip
        self.error_kinds: dict[str, int] = {}
        self.ttft: list[tuple[float, float, str]] = []  # (time, ms, kind)
        self.lock = threading.Lock()

    def _error(self, exc: BaseException) -> None:
        with self.lock:
            self.counts["errors"] += 1
            name = type(exc).__name__
            self.error_kinds[name] = self.error_kinds.get(name, 0) + 1

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def _timed(self, client: Client, prompt: str, kind: str, **kw: Any) -> str:
        t0 = time.perf_counter()
        first = None
        stream = client.stream(prompt, **kw)
        for delta in stream:
            if first is None and delta.text:
                first = time.perf_counter()
        r = stream.result
        assert r is not None
        with self.lock:
            self.ttft.append((time.monotonic(), ((first or time.perf_counter()) - t0) * 1000, kind))
        return r.text

    def _loop(self, step: Any) -> None:
        """Call step(client) until the end; a broken connection is replaced by a new one."""
        client: Client | None = None
        try:
            while time.monotonic() < self.stop_at:
                try:
                    if client is None:
                        client = Client(self.path, timeout=REQUEST_TIMEOUT_S)
                    step(client)
                except RpcError as exc:
                    self._error(exc)
                except OSError as exc:  # ConnectionError and timeouts: the client is spent
                    self._error(exc)
                    if client is not None:
                        client.close()
                    client = None
                    time.sleep(0.5)
        finally:
            if client is not None:
                client.close()

    def sessions_worker(self) -> None:
        rng = random.Random(1)
        convs = {i: self._opening(i, 0) for i in range(self.sessions)}
        gen = dict.fromkeys(convs, 0)

        def step(c: Client) -> None:
            i = rng.randrange(self.sessions)
            name = f"soak-{i}"
            if len(convs[i]) > self.max_session:
                c.sessions_delete(name)
                gen[i] += 1
                convs[i] = self._opening(i, gen[i])
                self._count("resets")
            reply = self._timed(c, convs[i], "session", session=name, max_tokens=16)
            convs[i] += reply + _fill(f"\n[tool result {rng.randrange(10**6)}] ok. ", 48)
            self._count("turns")

        self._loop(step)

    def _opening(self, i: int, gen: int) -> str:
        return _fill(f"<soak agent {i}.{gen}> Plan the change, then make it. ", 160)

    def plain_worker(self) -> None:
        rng = random.Random(2)

        def step(c: Client) -> None:
            prompt = _fill(f"Question {rng.randrange(10**9)}: why? ", 64)
            self._timed(c, prompt, "plain", max_tokens=16)
            self._count("plain")
            time.sleep(rng.uniform(0, 0.5))

        self._loop(step)

    def chaos_worker(self) -> None:
        rng = random.Random(3)
        while time.monotonic() < self.stop_at:
            k = rng.randrange(3)
            prompt = _fill(f"Chaos {rng.randrange(10**9)}. ", 96)
            try:
                if k == 0:
                    with Client(self.path, timeout=REQUEST_TIMEOUT_S) as c:
                        stream = c.stream(prompt, max_tokens=64)
                        for _ in stream:
                            break
                        stream.close()  # $/cancelRequest, then read the cancelled reply
                    self._count("cancels")
                else:
                    _raw_disconnect(self.path, prompt, read_first=k == 1)
                    self._count("disconnects")
            except (RpcError, OSError) as exc:
                self._error(exc)
            time.sleep(rng.uniform(0.2, 1.0))


def _ms(value: float | None) -> str:
    return "timeout" if value is None else f"{value:.0f}"


def _growth(samples: list[dict[str, Any]], key: str, minutes: float) -> dict[str, Any]:
    total = minutes * 60
    vals = [(s["t_s"], s[key]) for s in samples if s.get(key) is not None]
    base = [v for t, v in vals if BASE_WINDOW[0] * total <= t < BASE_WINDOW[1] * total]
    end = [v for t, v in vals if t >= END_WINDOW * total]
    after = [v for t, v in vals if t >= WARMUP * total]
    if not base or not end:
        return {"base": None, "end": None, "growth_pct": None}
    b, e = median(base), median(end)
    return {
        "base": b,
        "end": e,
        "max_after_warmup": max(after),
        "growth": e - b,
        "growth_pct": (e - b) / b * 100 if b else None,
        "max_growth_pct": (max(after) - b) / b * 100 if b else None,
    }


def run(model: str, quick: bool, log: Any = None, **opts: Any) -> dict[str, Any]:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    minutes = float(opts.get("minutes") or (1.0 if quick else 5.0))
    sessions = int(opts.get("sessions", 8))
    max_session = int(opts.get("max_session", 1300))  # 6 blocks: turns cross block boundaries
    # kv_budget="tight": about half the sessions fit at their longest, so they spill and
    # come back from disk all along; default: the daemon's own budget (nothing spills).
    tight = opts.get("kv_budget") == "tight"
    args: list[str] = []
    budget = None
    per_token = int(run_python(KV_PER_TOKEN, model))
    if tight:
        blocks = -(-(max_session + 64) // BLOCK_TOKENS)
        budget = (sessions // 2) * blocks * per_token * BLOCK_TOKENS
        args = ["--kv-budget", str(budget)]
    if opts.get("allocator"):
        args += ["--allocator", opts["allocator"]]
    every = max(2.0, minutes * 60 / 120)
    log(
        f"  {minutes:g} min, {sessions} sessions, "
        + (f"--kv-budget {budget / 2**20:.0f} MiB" if budget else "default --kv-budget")
        + f", a sample every {every:.0f} s"
    )
    samples: list[dict[str, Any]] = []
    with Daemon(model, *args) as daemon:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        allocator = next((e.get("allocator") for e in daemon.events("heap")), None)
        with Client(daemon.socket, timeout=REQUEST_TIMEOUT_S) as admin:
            admin.generate("warm up", max_tokens=4)
            status = admin.status()
            fds_before = _fds_at_rest(pid, None)
            t0 = time.monotonic()
            stop_at = t0 + minutes * 60
            load = Load(daemon.socket, stop_at, sessions, max_session)
            threads = [
                threading.Thread(target=fn, daemon=True)
                for fn in (load.sessions_worker, load.plain_worker, load.chaos_worker)
            ]
            for t in threads:
                t.start()
            next_log = t0
            probe: Client | None = None
            while time.monotonic() < stop_at:
                tick = time.monotonic()
                st = admin.status()  # answered at once, whatever the pool is doing
                ps = proc_status(pid)
                rss = ps.get("VmRSS", st.memory.rss_bytes)
                # The hot KV (sessions, anonymous prefix entries) grows with the conversations
                # and the prefix cache by design; RSS net of it is what would show a leak.
                session_kv = st.sessions.hot_bytes
                ttft_ms: float | None
                try:
                    probe = probe or Client(daemon.socket, timeout=REQUEST_TIMEOUT_S)
                    t1 = time.perf_counter()
                    first = None
                    for _ in probe.stream("Probe: what is the time?", max_tokens=4):
                        first = first or time.perf_counter()
                    ttft_ms = ((first or time.perf_counter()) - t1) * 1000
                except OSError:  # timed out: a stall; a new connection for the next probe
                    ttft_ms = None
                    if probe is not None:
                        probe.close()
                    probe = None
                mlx = st.memory.mlx_active_bytes + st.memory.mlx_cache_bytes
                samples.append(
                    {
                        "t_s": tick - t0,
                        "rss_bytes": rss,
                        "session_kv_bytes": session_kv,
                        "rss_net_bytes": rss - session_kv,
                        "peak_rss_bytes": ps.get("VmHWM"),
                        "fds": open_fds(pid),
                        "mlx_active_bytes": st.memory.mlx_active_bytes,
                        "mlx_cache_bytes": st.memory.mlx_cache_bytes,
                        "rss_outside_mlx_bytes": rss - mlx,
                        **{f"rss_{k}_bytes": v for k, v in rss_by_mapping(pid).items()},
                        "hot": st.sessions.hot,
                        "disk": st.sessions.disk,
                        "active": st.active,
                        "queue": st.queue.depth,
                        "connections": st.connections,
                        "probe_ttft_ms": ttft_ms,
                    }
                )
                if tick >= next_log:
                    x = samples[-1]
                    log(
                        f"  {x['t_s']:.0f} s: RSS {x['rss_bytes'] / 2**20:.0f} MiB, fds {x['fds']}, "
                        f"MLX active {x['mlx_active_bytes'] / 2**20:.0f} MiB, probe TTFT "
                        f"{_ms(x['probe_ttft_ms'])} ms, {load.counts}, load {loadavg()}"
                    )
                    next_log = tick + max(30.0, minutes * 60 / 10)
                time.sleep(max(0.0, every - (time.monotonic() - tick)))
            if probe is not None:
                probe.close()
            for t in threads:
                t.join(REQUEST_TIMEOUT_S * 2)
            final = _settled(admin)
            held = _held_blocks(admin, per_token * BLOCK_TOKENS)
            fds_after = _fds_at_rest(pid, fds_before)
        stuck = [t for t in threads if t.is_alive()]
    total = minutes * 60
    ttft = load.ttft
    windows = []
    for k in range(10):
        lo, hi = t0 + k * total / 10, t0 + (k + 1) * total / 10
        windows.append(percentiles([ms for t, ms, _ in ttft if lo <= t < hi]))
    return {
        "status": status,
        "allocator": allocator,  # the daemon's malloc: jemalloc or glibc (its "heap" event)
        "minutes": minutes,
        "sessions": sessions,
        "max_session_tokens": max_session,
        "kv_budget_bytes": budget,
        "stalls": sum((x["probe_ttft_ms"] or float("inf")) > STALL_MS for x in samples),
        "sample_every_s": every,
        "samples": samples,
        "counts": load.counts,
        "error_kinds": load.error_kinds,
        "threads_stuck": len(stuck),
        "fds_at_rest": {"before": fds_before, "after": fds_after},
        "growth": {
            k: _growth(samples, k, minutes)
            for k in (
                "rss_bytes",
                "session_kv_bytes",
                "rss_net_bytes",
                "fds",
                "mlx_active_bytes",
                "mlx_cache_bytes",
                "rss_outside_mlx_bytes",
                *(f"rss_{k}_bytes" for k in MAPPING_KINDS),
                "probe_ttft_ms",
            )
        },
        "ttft_ms": percentiles([ms for _, ms, _ in ttft]),
        "ttft_ms_by_tenth": windows,
        "totals": {
            "requests": final.totals.requests,
            "completed": final.totals.completed,
            "cancelled": final.totals.cancelled,
            "rejected": final.totals.rejected,
            "errors": final.totals.errors,
        },
        "spilled": final.details.get("sessions_spilled"),
        "restored": final.details.get("sessions_restored"),
        "blocks_used": final.pool.blocks_used,
        "blocks_held": held,
    }


def _settled(admin: Client) -> Any:
    """The status once nothing runs or waits (the load has stopped)."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while True:
        st = admin.status()
        if (st.active == 0 and st.queue.depth == 0) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def _held_blocks(admin: Client, block_bytes: int) -> int:
    """Pool blocks the hot sessions and anonymous entries hold; with nothing running, the
    pool must hold just these."""
    held = sum(-(-x.bytes // block_bytes) or 1 for x in admin.sessions_list() if x.state == "hot")
    st = admin.status()
    held += int(st.details["prefix_cache"]["anonymous_blocks"])
    if st.pool.blocks_used != held:
        raise AssertionError(
            f"the pool has {st.pool.blocks_used} blocks used, the caches hold {held}"
        )
    return held


def _fds_at_rest(pid: int, expect: int | None) -> int | None:
    """Open fds with no client but the admin connected; after the load, wait (up to the
    request timeout) for the daemon to close what the clients left, until `expect`."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while True:
        n = open_fds(pid)
        if expect is None or n is None or n <= expect or time.monotonic() > deadline:
            return n
        time.sleep(0.5)


# -- report ------------------------------------------------------------------------------

TARGET_RSS_GROWTH_PCT = 5.0


def _pct(g: dict[str, Any]) -> str:
    return "n/a" if g.get("growth_pct") is None else f"{g['growth_pct']:+.1f}%"


def headline(res: dict[str, Any]) -> list[str]:
    raw, net = res["growth"]["rss_bytes"], res["growth"]["rss_net_bytes"]
    pct = net.get("growth_pct")
    fds = res["fds_at_rest"]
    errors = res["counts"]["errors"]
    ok = (
        pct is not None
        and pct < TARGET_RSS_GROWTH_PCT
        and fds["before"] is not None
        and fds["after"] is not None
        and fds["after"] <= fds["before"]
        and errors == 0
        and res["stalls"] == 0
        and res["threads_stuck"] == 0
    )
    return [
        f"| soak ({res['minutes']:g} min mixed load): RSS growth after warm-up < "
        f"{TARGET_RSS_GROWTH_PCT:.0f}% net of the hot KV, fds flat, 0 errors, 0 stalls | "
        f"{_pct(net)} net ({(net.get('base') or 0) / 2**20:.0f} -> "
        f"{(net.get('end') or 0) / 2**20:.0f} MiB); raw RSS {_pct(raw)} while the hot KV went "
        f"{_pct(res['growth']['session_kv_bytes'])}; fds at rest {fds['before']} -> "
        f"{fds['after']} (under load {_pct(res['growth']['fds'])}); errors {errors}; "
        f"stalls {res['stalls']} | {'yes' if ok else '**no**'} |"
    ]


def section(res: dict[str, Any]) -> list[str]:
    c = res["counts"]
    budget = res["kv_budget_bytes"]
    lines = [
        f"## Soak: {res['minutes']:g} minutes of mixed load",
        "",
        f"{res['sessions']} sessions growing to {res['max_session_tokens']} tokens then starting over, "
        "plain generates, cancels and disconnects, on three client threads; "
        + (f"`--kv-budget {budget}` (sessions spill)" if budget else "the default `--kv-budget`")
        + f". A sample every {res['sample_every_s']:.0f} s. Growth: median of the last 10% of the "
        "samples against the median of the 20-30% window (after the warm-up, the first 20%).",
        "",
        f"Load: {c['turns']} session turns ({c['resets']} conversations restarted), {c['plain']} plain "
        f"generates, {c['cancels']} cancelled streams, {c['disconnects']} disconnects; client errors "
        f"{c['errors']} {res['error_kinds'] or ''}; probe stalls (no first token within "
        f"{STALL_MS / 1000:.0f} s) {res['stalls']}; client threads still running at the end "
        f"{res['threads_stuck']}; open fds at rest before the load {res['fds_at_rest']['before']}, after it {res['fds_at_rest']['after']}. Daemon totals: {res['totals']}; sessions spilled {res['spilled']}, "
        f"restored {res['restored']}. The daemon's malloc: {res.get('allocator') or 'not logged'}"
        " (the RSS rows by kind of mapping read glibc's layout: on jemalloc its memory counts"
        " as anonymous mappings). Pool blocks used once the load stopped: "
        f"{res['blocks_used']}, exactly what the hot sessions and anonymous entries hold "
        f"({res['blocks_held']}).",
        "",
        "| metric | after warm-up (20-30%) | end (last 10%) | growth | max after warm-up |",
        "|---|---|---|---|---|",
    ]
    names = {
        "rss_bytes": ("RSS MiB", 2**20),
        "session_kv_bytes": ("hot KV (sessions + anonymous entries) MiB", 2**20),
        "rss_net_bytes": ("RSS net of the hot KV, MiB", 2**20),
        "fds": ("open fds", 1),
        "mlx_active_bytes": ("MLX active MiB", 2**20),
        "mlx_cache_bytes": ("MLX cache MiB", 2**20),
        "rss_outside_mlx_bytes": ("RSS outside MLX (RSS - MLX active - MLX cache) MiB", 2**20),
        **{f"rss_{k}_bytes": (f"RSS in {MAPPING_LABELS[k]} MiB", 2**20) for k in MAPPING_KINDS},
        "probe_ttft_ms": ("probe TTFT ms", 1),
    }
    for key, (label, unit) in names.items():
        g = res["growth"].get(key, {})
        if g.get("base") is None:
            lines.append(f"| {label} | n/a | n/a | n/a | n/a |")
            continue
        lines.append(
            f"| {label} | {g['base'] / unit:.1f} | {g['end'] / unit:.1f} | {_pct(g)} | "
            f"{g['max_after_warmup'] / unit:.1f} |"
        )
    t = res["ttft_ms"]
    lines += [
        "",
        f"TTFT of every load request (client side): p50 {t['p50']:.0f}, p95 {t['p95']:.0f}, p99 "
        f"{t['p99']:.0f} ms over {t['n']}; p50 by tenth of the run: "
        + ", ".join(f"{w['p50']:.0f}" for w in res["ttft_ms_by_tenth"])
        + " ms.",
        "",
    ]
    return lines


def plot(res: dict[str, Any], out: Path, plt: Any) -> str:
    samples = res["samples"]
    ts = [s["t_s"] / 60 for s in samples]

    def mib(key: str) -> list[float]:
        return [float("nan") if s.get(key) is None else s[key] / 2**20 for s in samples]

    fig, axes = plt.subplots(3, 2, figsize=(11, 9), sharex=True)
    series = [
        ("RSS (MiB)", {"RSS": mib("rss_bytes"), "net of the hot KV": mib("rss_net_bytes")}),
        ("open fds", {"": [s["fds"] for s in samples]}),
        ("MLX (MiB)", {"active": mib("mlx_active_bytes"), "hot KV": mib("session_kv_bytes")}),
        ("probe TTFT (ms)", {"": [s["probe_ttft_ms"] for s in samples]}),
        ("RSS by mapping (MiB)", {k: mib(f"rss_{k}_bytes") for k in MAPPING_KINDS}),
        ("RSS outside MLX: RSS - active - cache (MiB)", {"": mib("rss_outside_mlx_bytes")}),
    ]
    for ax, (title, lines) in zip(axes.flat, series, strict=True):
        for label, ys in lines.items():
            ys = [float("nan") if y is None else y for y in ys]
            ax.plot(ts, ys, marker=".", markersize=3, linewidth=1, label=label or None)
        ax.axvspan(0, res["minutes"] * WARMUP, color="grey", alpha=0.15)
        ax.set_title(title, fontsize=10)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("minutes (grey: warm-up)")
    growth = res["growth"]
    fig.suptitle(
        f"Soak, {res['minutes']:g} min: RSS growth after warm-up {_pct(growth['rss_bytes'])}, "
        f"net of the hot KV {_pct(growth['rss_net_bytes'])}"
    )
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=110)
    return "soak.png"
