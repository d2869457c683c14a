"""A short soak: a few hundred mixed requests (sessions whose conversations grow across
several pool blocks, cancels, vanishing clients, bad params) against one daemon; the pool
holds exactly the sessions' blocks, and memory and descriptors return to their warmed-up
baseline."""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlxd import rpc
from mlxd.client import Client

from .daemon_proc import DaemonProcess, RawConnection, block_bytes, daemon_in_short_dir

SESSIONS = [f"soak-{i}" for i in range(4)]
MORE = " more words " * 15  # ~180 tokens a turn: a conversation crosses a block every turn or two
MAX_CONVERSATION = 1500  # characters (about as many tokens, 6 blocks); then it restarts
KINDS = ["generate", "session", "cancel", "vanish", "tokenize", "bad"]
RSS_MARGIN = 24 * 1024**2
MLX_MARGIN = 1024**2


@pytest.fixture(scope="module")
def soaked(model_cache: Path) -> Iterator[DaemonProcess]:
    # Named sessions only: the baseline needs every cache gone, and anonymous prefix-cache
    # entries cannot be deleted by a client (tests/test_prefix_cache.py covers them).
    yield from daemon_in_short_dir(model_cache, "--prefix-cache", "off")


def _one(
    socket: Path, kind: str, rng: random.Random, lock: threading.Lock, convs: dict[str, str]
) -> str:
    """Run one request of `kind`; returns how it ended."""
    if kind in ("generate", "session", "tokenize", "bad"):
        with Client(socket) as client:
            if kind == "generate":
                client.generate(f"soak {rng.random()}", max_tokens=rng.randint(1, 12))
            elif kind == "session":
                session = rng.choice(SESSIONS)
                with lock:  # one turn per session at a time keeps the conversations whole
                    prompt = convs.get(session, f"{session}: ") + MORE
                    if len(prompt) > MAX_CONVERSATION:
                        client.sessions_delete(session)
                        prompt = f"{session}: " + MORE
                    reply = client.generate(prompt, session=session, max_tokens=rng.randint(1, 8))
                    convs[session] = prompt + reply.text
            elif kind == "tokenize":
                client.tokenize("soak " * rng.randint(1, 50))
            else:
                try:
                    client.generate("bad", max_tokens=0)
                except rpc.RpcError as exc:
                    assert exc.code == rpc.ErrorCode.INVALID_PARAMS
        return kind
    conn = RawConnection(socket)
    try:
        conn.request(1, "generate", {"prompt": f"{kind} me", "max_tokens": 500, "stream": True})
        assert isinstance(conn.next(), rpc.Notification)
        if kind == "cancel":
            conn.send(rpc.notification("$/cancelRequest", {"id": 1}))
            reply = conn.reply(1)
            assert isinstance(reply, rpc.Response) and reply.error is not None
            assert reply.error.code == rpc.ErrorCode.REQUEST_CANCELLED
    finally:
        conn.close()  # "vanish": gone mid-stream
    return kind


@dataclass
class Usage:
    rss: int
    mlx_active: int
    mlx_cache: int  # freed buffers MLX keeps for reuse: bounded, sized by the largest shapes
    fds: int


def _settle_and_measure(proc: DaemonProcess, per_block: int) -> Usage:
    """Wait until nothing runs; the pool holds just the sessions' blocks; delete them all,
    then read memory and descriptors."""
    assert proc.proc is not None
    with Client(proc.socket) as client:
        deadline = time.monotonic() + 60
        while True:
            status = client.status()
            idle = status.active == 0 and status.queue.depth == 0 and status.connections == 1
            if idle:
                held = sum(
                    max(1, math.ceil(s.bytes / per_block))
                    for s in client.sessions_list()
                    if s.state == "hot"
                )
                assert status.pool.blocks_used == held, (status.pool, client.sessions_list())
                for info in client.sessions_list():
                    client.sessions_delete(info.session)
                status = client.status()
                if status.pool.blocks_used == 0 and status.sessions.hot == 0:
                    break
            assert time.monotonic() < deadline, status
        # The engine samples MLX memory after each step: one small step refreshes it.
        client.generate("measure", max_tokens=2)
        status = client.status()
        fds = len(os.listdir(f"/proc/{proc.proc.pid}/fd")) - 1  # not this client's socket
    memory = status.memory
    return Usage(memory.rss_bytes, memory.mlx_active_bytes, memory.mlx_cache_bytes, fds)


def _run_mix(
    proc: DaemonProcess, count: int, seed: int, convs: dict[str, str], workers: int = 6
) -> Counter[str]:
    rng = random.Random(seed)
    kinds = [rng.choice(KINDS) for _ in range(count)]
    done: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = iter(enumerate(kinds))
    take = threading.Lock()

    def worker() -> None:
        while True:
            with take:
                item = next(todo, None)
            if item is None or errors:
                return
            i, kind = item
            try:
                outcome = _one(proc.socket, kind, random.Random(seed * 1000 + i), lock, convs)
            except BaseException as exc:
                errors.append(exc)
                return
            with take:
                done[outcome] += 1

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    return done


def test_a_few_hundred_mixed_requests_leave_no_residue(
    soaked: DaemonProcess, model_cache: Path
) -> None:
    per_block = block_bytes(model_cache)
    # Warm-up: allocator pools, kernels, thread pools, and conversations at their longest.
    convs: dict[str, str] = {}
    _run_mix(soaked, 300, seed=1, convs=convs)
    baseline = _settle_and_measure(soaked, per_block)
    done = _run_mix(soaked, 300, seed=2, convs=convs)
    assert sum(done.values()) == 300 and set(done) == set(KINDS), done
    assert max(len(c) for c in convs.values()) > 3 * 256  # conversations crossed blocks
    after = _settle_and_measure(soaked, per_block)
    assert soaked.proc is not None and soaked.proc.poll() is None
    assert after.fds == baseline.fds, (baseline, after)
    assert after.mlx_active <= baseline.mlx_active + MLX_MARGIN, (baseline, after)
    net = after.rss - after.mlx_cache - (baseline.rss - baseline.mlx_cache)
    assert net <= RSS_MARGIN, (baseline, after)
