"""Latency under load: TTFT, inter-token and end-to-end percentiles at N clients with
Poisson arrivals, and the arrival rate at which ServerBusy starts."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

from mlxd.client import Client, ServerBusy

from .common import Daemon, percentiles

CLIENTS = (1, 4, 8, 16)
QUICK_CLIENTS = (1, 4, 8)


class Samples:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.e2e: list[float] = []
        self.busy = 0
        self.done = 0
        self.lock = threading.Lock()


def _one_request(client: Client, prompt: str, max_tokens: int, out: Samples) -> None:
    t0 = time.perf_counter()
    last = None
    gaps: list[float] = []
    first = None
    try:
        for _ in client.stream(prompt, max_tokens=max_tokens):
            now = time.perf_counter()
            if first is None:
                first = now
            elif last is not None:
                gaps.append((now - last) * 1000)
            last = now
    except ServerBusy:
        with out.lock:
            out.busy += 1
        return
    end = time.perf_counter()
    with out.lock:
        out.done += 1
        out.ttft.append(((first or end) - t0) * 1000)
        out.itl.extend(gaps)
        out.e2e.append((end - t0) * 1000)


def closed_loop(
    socket: Path, clients: int, seconds: float, think_s: float, max_tokens: int
) -> Samples:
    """`clients` users, each sending its next request after an exponential think time."""
    out = Samples()
    stop_at = time.monotonic() + seconds

    def user(i: int) -> None:
        rng = random.Random(i)
        with Client(socket) as client:
            while time.monotonic() < stop_at:
                time.sleep(rng.expovariate(1 / think_s))  # Poisson arrivals per user
                _one_request(
                    client,
                    f"user {i} asks about item {rng.randrange(10**6)}. " * 3,
                    max_tokens,
                    out,
                )

    threads = [threading.Thread(target=user, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def open_loop(socket: Path, rate: float, seconds: float, max_tokens: int) -> Samples:
    """Requests arriving as a Poisson process of `rate` per second, each on its own connection."""
    out = Samples()
    rng = random.Random(int(rate * 1000))
    threads = []
    stop_at = time.monotonic() + seconds

    def one(k: int) -> None:
        with Client(socket) as client:
            _one_request(client, f"arrival {k}. " * 8, max_tokens, out)

    k = 0
    while time.monotonic() < stop_at:
        time.sleep(rng.expovariate(rate))
        t = threading.Thread(target=one, args=(k,))
        t.start()
        threads.append(t)
        k += 1
    for t in threads:
        t.join()
    return out


def run(model: str, quick: bool) -> dict[str, Any]:
    seconds = 20.0 if quick else 45.0
    max_tokens = 32 if quick else 64
    rows = []
    with Daemon(model, "--max-queue", "8") as daemon:
        with Client(daemon.socket) as c:
            c.generate("warm up", max_tokens=4)
        for n in QUICK_CLIENTS if quick else CLIENTS:
            s = closed_loop(daemon.socket, n, seconds, think_s=0.5, max_tokens=max_tokens)
            rows.append(
                {
                    "clients": n,
                    "requests": s.done,
                    "busy": s.busy,
                    "ttft_ms": percentiles(s.ttft),
                    "itl_ms": percentiles(s.itl),
                    "e2e_ms": percentiles(s.e2e),
                }
            )
        overload = []
        for rate in (2, 8, 32) if quick else (1, 2, 4, 8, 16, 32, 64):
            s = open_loop(daemon.socket, rate, seconds / 2, max_tokens)
            total = s.done + s.busy
            overload.append(
                {
                    "rate_per_s": rate,
                    "requests": total,
                    "busy": s.busy,
                    "busy_fraction": s.busy / total if total else 0.0,
                    "ttft_ms": percentiles(s.ttft),
                }
            )
            if s.busy / max(1, total) > 0.5:
                break  # well past the point where ServerBusy starts
    first_busy = next((o["rate_per_s"] for o in overload if o["busy"]), None)
    return {
        "rows": rows,
        "overload": overload,
        "overload_rate_per_s": first_busy,
        "max_queue": 8,
        "max_tokens": max_tokens,
    }
