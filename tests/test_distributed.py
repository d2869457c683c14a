"""`mlxd serve --distributed` under mlx.launch: two localhost ranks, ring backend, builtin:small."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bench.distributed import launch_command
from mlxd.client import Client, RpcError
from mlxd.rpc import ErrorCode

from .daemon_proc import DaemonProcess, short_tmpdir

PROMPTS = [
    "The quick brown fox",
    "def fib(n):",
    "Once upon a time",
    "SELECT * FROM",
    "Hello there",
    "import numpy as np",
    "1, 2, 3, 5, 8,",
    "Dear Sir or Madam",
]
# The one-process side runs as the ranks do (mlx.launch gives them this).
ENV = {"OPENBLAS_NUM_THREADS": "1"}


def group(folder: Path, cache: Path, *args: str, ranks: int = 2) -> DaemonProcess:
    """`mlx.launch -n RANKS --backend ring -- mlxd serve --distributed ...` (not yet started)."""
    launch = launch_command(ranks, "--verbose")
    return DaemonProcess(
        folder, cache, "--distributed", *args, model="builtin:small", launcher=launch
    )


def reap(proc: DaemonProcess, pids: list[int]) -> None:
    """Kill the launcher and whatever rank is left: mlx.launch does not pass a kill on."""
    proc.kill()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def rank_exits(proc: DaemonProcess) -> dict[int, str]:
    """What mlx.launch said of each rank's end: "completed" (exit 0) or its warning."""
    ends: dict[int, str] = {}
    for line in proc.lines:
        for rank in range(8):
            tag = f"Node with rank {rank} "
            if tag in line:
                ends[rank] = line.split(tag, 1)[1].split("\033")[0].strip()
    return ends


def greedy(sock: Path, prompts: list[str], max_tokens: int = 12) -> list[list[int]]:
    def one(prompt: str) -> list[int]:
        with Client(sock) as c:
            return list(c.generate(prompt, max_tokens=max_tokens).tokens)

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def streams_in_flight(
    sock: Path, n: int, started: threading.Barrier
) -> tuple[list[Any], list[threading.Thread]]:
    """`n` streaming requests; each passes `started` after its first delta. Results: the final
    result, or the RpcError that ended it."""
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        reached = False
        try:
            with Client(sock) as c:
                stream = c.stream(PROMPTS[i], max_tokens=400)
                for _ in stream:
                    if not reached:
                        reached = True
                        started.wait(180)
                results[i] = stream.result
        except (RpcError, threading.BrokenBarrierError) as exc:
            results[i] = exc
        finally:
            if not reached:
                started.abort()  # no first delta: the test fails, it does not wait

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return results, threads


def wait_started(started: threading.Barrier, results: list[Any]) -> None:
    try:
        started.wait(180)
    except threading.BrokenBarrierError:
        raise AssertionError(f"a stream got no first delta: {results}") from None


@pytest.fixture
def folders(model_cache: Path) -> Iterator[tuple[Path, Path]]:
    a, b = short_tmpdir(), short_tmpdir()
    yield a, b
    shutil.rmtree(a, ignore_errors=True)
    shutil.rmtree(b, ignore_errors=True)


def test_two_ranks_match_one_process_then_sigterm_drains_both(
    model_cache: Path, folders: tuple[Path, Path]
) -> None:
    one = DaemonProcess(folders[0], model_cache, model="builtin:small", env=ENV).start()
    try:
        expected = greedy(one.socket, PROMPTS)
    finally:
        assert one.stop() == 0
    proc = group(folders[1], model_cache, "--drain-timeout", "1").start(timeout=180)
    pids: list[int] = []
    try:
        assert greedy(proc.socket, PROMPTS) == expected  # 8 concurrent, token for token
        with Client(proc.socket) as c:
            status = c.status()
            dist = status.details["distributed"]
            assert dist["world_size"] == 2 and dist["rank"] == 0 and dist["lost"] is None
            assert dist["plans_sent"] > 0 and dist["plan_bytes_sent"] > 0
            # A session would need every rank's shard of its cache: refused, not half-kept.
            with pytest.raises(RpcError) as refused:
                c.generate("Hi", session="s1", max_tokens=2)
            assert refused.value.code == ErrorCode.INVALID_PARAMS
            assert "--distributed" in refused.value.message
        pids = dist["pids"]
        rank0 = pids[0]
        started = threading.Barrier(5)
        results, threads = streams_in_flight(proc.socket, 4, started)
        wait_started(started, results)
        os.kill(rank0, signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(60) is not None
    finally:
        reap(proc, pids)
    # Each stream got its one reply: finished, or cut at the drain deadline with its usage
    # (its text may be empty: the random model's bytes can be held back as partial UTF-8).
    for r in results:
        assert r is not None
        if isinstance(r, RpcError):
            assert r.code == ErrorCode.REQUEST_CANCELLED, r
            assert r.data["usage"]["completion_tokens"] >= 1, r.data
    assert rank_exits(proc) == {0: "completed", 1: "completed"}, proc.lines[-20:]


@pytest.mark.stress  # ~35 s: a group of its own
def test_kill9_of_rank1_fails_inflight_requests_and_ends_rank0(
    model_cache: Path, folders: tuple[Path, Path]
) -> None:
    proc = group(folders[0], model_cache, "--rank-timeout", "5").start(timeout=180)
    pids: list[int] = []
    try:
        with Client(proc.socket) as c:
            pids = c.status().details["distributed"]["pids"]
        rank1 = pids[1]
        started = threading.Barrier(4)
        results, threads = streams_in_flight(proc.socket, 3, started)
        wait_started(started, results)
        t0 = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        for t in threads:
            t.join(30)
        proc.wait(30)  # the whole group is gone within the bound, not hung
        elapsed = time.monotonic() - t0
    finally:
        reap(proc, pids)
    assert elapsed < 30
    for r in results:
        assert isinstance(r, RpcError), r  # every in-flight request answered with an error
        assert r.code in (ErrorCode.INTERNAL_ERROR, ErrorCode.REQUEST_CANCELLED), r
    errors = [r for r in results if r.code == ErrorCode.INTERNAL_ERROR]
    assert all("distributed group was lost" in r.message for r in errors), errors
    ends = rank_exits(proc)
    assert ends[1] in ("exited with code -9", "was killed"), ends
    assert ends[0] != "completed", ends  # rank 0 never exits 0 after losing a rank


@pytest.mark.stress  # imports SmolLM2 (the unit test below checks the rule itself)
def test_model_that_cannot_be_split_is_one_line_on_every_rank(
    model_cache: Path, folders: tuple[Path, Path]
) -> None:
    proc = group(folders[0], model_cache)
    proc.args[proc.args.index("builtin:small")] = "builtin:smollm2"
    proc.spawn()
    try:
        proc.wait(180)
    finally:
        proc.kill()
    refusals = [
        x for x in proc.lines if x.startswith("mlxd: ") and "cannot split it over 2 ranks" in x
    ]
    # Each rank checks before loading anything; mlx.launch stops the others at the first
    # exit, so a slower rank may be stopped before it says so itself.
    assert refusals, proc.lines[-20:]
    assert "9 attention heads and 3 KV heads do not divide by 2" in refusals[0]
    # Neither serves nor hangs. The first to exit (1) makes mlx.launch stop the other (SIGTERM),
    # which ends it as a stop during a load does if it has not refused by then itself.
    ends = rank_exits(proc)
    assert set(ends) == {0, 1} and "exited with code 1" in ends.values(), ends
    assert not any("Traceback" in x for x in proc.lines)


def test_shardable_rule_names_what_does_not_divide(tmp_path: Path) -> None:
    from mlxd.daemon.models.sharding import check_shardable

    def config(heads: int, kv: int, mlp: int) -> Path:
        (tmp_path / "config.json").write_text(
            json.dumps(
                {"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": mlp}
            )
        )
        return tmp_path

    check_shardable(config(12, 4, 2560), 2)  # builtin:small
    with pytest.raises(ValueError, match="9 attention heads and 3 KV heads do not divide by 2"):
        check_shardable(config(9, 3, 1536), 2)  # SmolLM2-135M
    with pytest.raises(ValueError, match=r"^cannot split it over 4 ranks: 6 KV heads do not"):
        check_shardable(config(12, 6, 2560), 4)


@pytest.mark.stress  # ~30 s: a group of its own
def test_kill9_of_rank0_ends_rank1_within_the_bound(
    model_cache: Path, folders: tuple[Path, Path]
) -> None:
    proc = group(folders[0], model_cache, "--rank-timeout", "5").start(timeout=180)
    pids: list[int] = []
    try:
        with Client(proc.socket) as c:
            c.generate("Hello", max_tokens=4)
            pids = c.status().details["distributed"]["pids"]
        rank0 = pids[0]
        t0 = time.monotonic()
        os.kill(rank0, signal.SIGKILL)
        proc.wait(30)  # rank 1 does not wait for a plan that never comes
        elapsed = time.monotonic() - t0
    finally:
        reap(proc, pids)
    assert elapsed < 30
    ends = rank_exits(proc)
    assert ends[0] in ("exited with code -9", "was killed"), ends
    assert ends[1] != "completed", ends
