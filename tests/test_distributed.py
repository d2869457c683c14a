"""`mlxd serve --distributed` under mlx.launch: two localhost ranks, ring backend, builtin:small."""

from __future__ import annotations

import contextlib
import json
import os
import re
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


# Two conversations (nothing like PROMPTS: no prefix of theirs is cached by another entry).
TURNS = {
    "s1": "A session about the sea, the tides and the ships that sail on it:",
    "s2": "Another session, this one on mountains and the people who climb them:",
}
FOLLOW_UP = " And then, the next day,"


def group(folder: Path, cache: Path, *args: str, ranks: int = 2, **kw: Any) -> DaemonProcess:
    """`mlx.launch -n RANKS --backend ring -- mlxd serve --distributed ...` (not yet started)."""
    launch = launch_command(ranks, "--verbose")
    return DaemonProcess(
        folder, cache, "--distributed", *args, model="builtin:small", launcher=launch, **kw
    )


def one_process(folder: Path, cache: Path, state: Path) -> DaemonProcess:
    """builtin:small in one process, no prefix cache: a request without a session runs cold."""
    return DaemonProcess(
        folder, cache, "--prefix-cache", "off", model="builtin:small", env=ENV, state_dir=state
    )


def sigterm_rank0(proc: DaemonProcess, pids: list[int]) -> dict[int, str]:
    """Stop the group as a service manager does (SIGTERM to rank 0); how each rank ended."""
    os.kill(pids[0], signal.SIGTERM)
    proc.wait(60)
    return rank_exits(proc)


def twins_left(proc: DaemonProcess) -> tuple[int, int]:
    """What rank 1 said as it stopped: the caches it held, and how many rank 0 held."""
    found = [re.search(r'\{[^{}]*"event": "rank stopped"[^{}]*\}', x) for x in proc.lines]
    (event,) = [json.loads(m.group(0)) for m in found if m]  # mlx.launch may share its line
    return event["twins"], event["rank0_caches"]


def session_files(state: Path, session: str) -> dict[str, Path]:
    """Every file of `session` under `state`, by the shard it says it holds."""
    from mlxd.daemon.kv.cachefile import read_metadata

    files = (state / "sessions").glob(f"*/{session}.safetensors")
    return {read_metadata(f).get("shard", ""): f for f in files}


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
        line = re.sub(r"\{[^{}]*\}", "", line)  # a rank's log line may land inside it
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


def cold_runs(
    folder: Path, cache: Path, state: Path, prompts: list[str]
) -> tuple[list[list[int]], dict[str, Any], dict[str, list[int]], Path]:
    """One process: `prompts` greedy, each session's first turn and its second run cold;
    and the folder its session files go to."""
    one = one_process(folder, cache, state).start()
    try:
        expected = greedy(one.socket, prompts) if prompts else []
        with Client(one.socket) as c:
            firsts = {s: c.generate(p, max_tokens=12) for s, p in TURNS.items()}
            cold = {
                s: list(c.generate(second(s, r), max_tokens=12).tokens) for s, r in firsts.items()
            }
        single = state / "sessions" / str(one.events("model loaded")[0]["fingerprint"])
    finally:
        assert one.stop() == 0
    return expected, firsts, cold, single


def second(session: str, first: Any) -> str:
    """The prompt of a session's second turn: the conversation so far and more."""
    return TURNS[session] + first.text + FOLLOW_UP


def first_turns(sock: Path, firsts: dict[str, Any]) -> list[int]:
    """Each session's first turn through the group (== one process's); the ranks' pids."""
    with Client(sock) as c:
        for s, p in TURNS.items():
            assert c.generate(p, session=s, max_tokens=12).tokens == firsts[s].tokens
        return list(c.status().details["distributed"]["pids"])


def test_two_ranks_match_one_process_then_sigterm_saves_sessions_on_both(
    model_cache: Path, folders: tuple[Path, Path]
) -> None:
    state = folders[0] / "state"
    expected, firsts, cold, single = cold_runs(folders[0], model_cache, state, PROMPTS)
    proc = group(folders[1], model_cache, "--drain-timeout", "1", state_dir=state)
    proc.start(timeout=180)
    pids: list[int] = []
    try:
        assert greedy(proc.socket, PROMPTS) == expected  # 8 concurrent, token for token
        pids = first_turns(proc.socket, firsts)
        with Client(proc.socket) as c:
            # Prefix reuse on every rank: a request without a session starts from s1's
            # cache, and a fork of s2 shares s2's.
            borrowed = c.generate(second("s1", firsts["s1"]), max_tokens=12)
            c.sessions_fork("s2", "s2-fork")
            forked = c.generate(second("s2", firsts["s2"]), session="s2-fork", max_tokens=12)
            status = c.status()
            dist = status.details["distributed"]
            assert dist["world_size"] == 2 and dist["rank"] == 0 and dist["lost"] is None
            assert dist["plans_sent"] > 0 and dist["plan_bytes_sent"] > 0
        started = threading.Barrier(5)
        results, threads = streams_in_flight(proc.socket, 4, started)
        wait_started(started, results)
        os.kill(pids[0], signal.SIGTERM)
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
    twins, held = twins_left(proc)
    assert twins == held > 0  # rank 1 holds the twins of rank 0's caches, no more
    assert list(borrowed.tokens) == cold["s1"] and borrowed.usage.cached_tokens > 0
    assert list(forked.tokens) == cold["s2"] and forked.usage.cached_tokens > 0
    # The drain saved each session on both ranks: one file per rank, in its own folder.
    for s in TURNS:
        assert set(session_files(state, s)) == {"tensor 0/2", "tensor 1/2"}, s

    # A 2-rank file offered to one process is refused (quarantined with its reason) at start-up.
    single.mkdir(parents=True, exist_ok=True)
    shutil.copy(session_files(state, "s1")["tensor 0/2"], single / "s1.safetensors")
    one = one_process(folders[0], model_cache, state).start()
    try:
        with Client(one.socket) as c:
            assert "s1" not in [x.id for x in c.sessions_list()]
            fresh = c.generate(second("s1", firsts["s1"]), session="s1", max_tokens=12)
    finally:
        assert one.stop() == 0
    assert list(fresh.tokens) == cold["s1"] and fresh.usage.cached_tokens == 0
    (note,) = (state / "quarantine").glob("s1.safetensors.*.reason")
    assert (
        "written by rank 0 of a 2-rank tensor-parallel group, read by a single-process daemon"
        in note.read_text()
    )


@pytest.mark.stress  # ~80 s: one process and two groups
def test_sessions_saved_by_two_ranks_resume_after_the_group_restarts(
    model_cache: Path, folders: tuple[Path, Path]
) -> None:
    state = folders[0] / "state"
    _, firsts, cold, _ = cold_runs(folders[0], model_cache, state, [])
    proc = group(folders[1], model_cache, state_dir=state).start(timeout=180)
    pids: list[int] = []
    try:
        pids = first_turns(proc.socket, firsts)
        ends = sigterm_rank0(proc, pids)  # the drain persists them on every rank
    finally:
        reap(proc, pids)
    assert ends == {0: "completed", 1: "completed"}, proc.lines[-20:]
    assert twins_left(proc)[0] == twins_left(proc)[1] > 0
    session_files(state, "s2")["tensor 1/2"].unlink()  # rank 1's part of s2 is lost

    proc = group(folders[1], model_cache, state_dir=state).start(timeout=180)
    pids = []
    try:
        with Client(proc.socket) as c:
            pids = c.status().details["distributed"]["pids"]
            resumed = c.generate(second("s1", firsts["s1"]), session="s1", max_tokens=12)
            restarted = c.generate(second("s2", firsts["s2"]), session="s2", max_tokens=12)
        ends = sigterm_rank0(proc, pids)
    finally:
        reap(proc, pids)
    assert list(resumed.tokens) == cold["s1"] and resumed.usage.cached_tokens > 0
    # Half a session is no session: s2 starts cold, and the log says why.
    assert list(restarted.tokens) == cold["s2"] and restarted.usage.cached_tokens == 0
    assert any(
        "quarantined a bad session cache" in x and "rank 1 could not load its part" in x
        for x in proc.lines
    ), proc.lines[-20:]
    assert ends == {0: "completed", 1: "completed"}, proc.lines[-20:]
    assert twins_left(proc)[0] == twins_left(proc)[1] > 0


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
