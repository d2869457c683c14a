"""A model of the KV bookkeeping: random turns, forks, deletes, spills, saves, cancels and
engine outcomes against the real BlockPool, SessionStore and admission code, with plain
objects for caches and an engine that answers when told. After every step the pool's
blocks are exactly what sessions and running turns hold, hot bytes stay within the budget,
the cache files are exactly the sessions on disk, and deleting everything gives all back."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import numpy as np
import pytest
import structlog.testing
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mlxd import rpc
from mlxd.daemon.engine.engine import Job, Outcome, Update
from mlxd.daemon.kv import cachefile
from mlxd.daemon.kv.pool import BlockPool
from mlxd.daemon.kv.sessions import CacheOps, ModelShape, Session, SessionStore
from mlxd.daemon.kv.turns import Turn
from mlxd.daemon.service.generation import _admit

BLOCK = 256
HEAD_DIM = 2
PER_TOKEN = 2 * HEAD_DIM * 4  # keys and values, one layer, one head, float32
NAMES = ["a", "b", "c"]


@dataclass(eq=False)
class FakeLayer:
    """A cache layer: the tokens it covers, and whether measuring it should fail."""

    tokens: tuple[int, ...]
    boom: bool = False


def _nbytes(cache: Sequence[Any]) -> int:
    if any(layer.boom for layer in cache):
        raise RuntimeError("injected fault while recording a turn")
    return len(cache[0].tokens) * PER_TOKEN


def _snapshot(
    cache: Sequence[Any], tokens: Sequence[int], kv_bits: int, name: str
) -> cachefile.Snapshot:
    n = len(tokens)
    arrays = {
        "layers.0.keys": np.zeros((1, 1, n, HEAD_DIM), np.float32),
        "layers.0.values": np.zeros((1, 1, n, HEAD_DIM), np.float32),
    }
    return cachefile.Snapshot(list(tokens), arrays, 0, 0, "float32", 1)


FAKE = CacheOps(
    nbytes=_nbytes,
    snapshot=_snapshot,
    restore=lambda snap, name: [FakeLayer(tuple(snap.tokens))],
    prefix=lambda cache, n: [FakeLayer(cache[0].tokens[:n])],
    quantized=lambda cache: False,
    full=lambda cache: list(cache),
)


class FakeEngine:
    """Takes jobs; the state machine decides when and how each ends."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def submit(self, job: Job) -> None:
        if job.prefix_cache is not None:  # the cache handed over covers what it claims
            assert list(job.prefix_cache[0].tokens) == job.prompt[: job.cached]
        self.jobs.append(job)

    def cancel(self, job: Job) -> None:
        raise AssertionError("admission never cancels a job")


async def _inline(fn: Callable[[], Any]) -> Any:
    return fn()


async def _settle(store: SessionStore) -> None:
    """Until every task waits on a turn, a slot or the pool: no file I/O in flight."""
    while True:
        await anyio.wait_all_tasks_blocked()
        stats = store._writer.statistics()
        if stats.borrowed_tokens == 0 and stats.tasks_waiting == 0:
            await anyio.wait_all_tasks_blocked()
            if store._writer.statistics().borrowed_tokens == 0:
                return
        await anyio.sleep(0.001)


class Bookkeeping(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="mlxd-model-"))
        self._logs_cm = structlog.testing.capture_logs()  # injected faults are logged
        self.logs = self._logs_cm.__enter__()
        self._portal_cm = start_blocking_portal("asyncio")
        self.portal: BlockingPortal = self._portal_cm.__enter__()
        self.total = 8
        self.portal.call(self._build)
        self.tasks: list[tuple[str, Future[Any]]] = []
        self.seen: dict[int, Session] = {}  # every session object, deleted ones included
        self.conversations: dict[str, list[int]] = {name: [] for name in NAMES}
        self.next_token = 1

    async def _build(self) -> None:
        self.pool = BlockPool(self.total, BLOCK, max_queue=4)
        shape = ModelShape("f" * 64, 1, 1, HEAD_DIM, "float32")
        self.store = SessionStore(
            self.root,
            shape,
            self.pool,
            _inline,
            disk_budget_bytes=6 * BLOCK * PER_TOKEN,
            block_bytes=BLOCK * PER_TOKEN,
            caches=FAKE,
        )
        await self.store.load_index()
        self.engine = FakeEngine()
        self.daemon = SimpleNamespace(
            sessions=self.store,
            pool=self.pool,
            slots=Turn(2),
            engine=self.engine,
            config=SimpleNamespace(max_queue=4, kv_bits=0),
        )

    # -- helpers --------------------------------------------------------------------

    def _start(self, kind: str, fn: Callable[[], Any]) -> None:
        self.tasks.append((kind, self.portal.start_task_soon(fn)))
        self._settle()

    def _settle(self) -> None:
        self.portal.call(_settle, self.store)
        self.seen.update((id(s), s) for s in self.store.sessions.values())
        done = [(kind, f) for kind, f in self.tasks if f.done()]
        self.tasks = [(kind, f) for kind, f in self.tasks if not f.done()]
        for kind, future in done:
            if future.cancelled():
                continue
            error = future.exception()
            if error is None:
                continue
            assert isinstance(error, rpc.RpcError), (kind, error)
            allowed = {
                "generate": {
                    rpc.ErrorCode.SESSION_NOT_FOUND,
                    rpc.ErrorCode.SERVER_BUSY,
                    rpc.ErrorCode.CONTEXT_TOO_LONG,
                },
                "fork": {
                    rpc.ErrorCode.SESSION_NOT_FOUND,
                    rpc.ErrorCode.INVALID_PARAMS,
                    rpc.ErrorCode.SERVER_BUSY,
                },
                "save": {rpc.ErrorCode.SESSION_NOT_FOUND},
            }[kind]
            assert error.code in allowed, (kind, error)

    def _tokens(self, n: int) -> list[int]:
        out = list(range(self.next_token, self.next_token + n))
        self.next_token += n
        return out

    # -- rules ----------------------------------------------------------------------

    @rule(
        name=st.sampled_from([*NAMES, None]),
        grow=st.integers(1, 400),
        max_tokens=st.integers(1, 64),
        diverge=st.booleans(),
    )
    def generate(self, name: str | None, grow: int, max_tokens: int, diverge: bool) -> None:
        if name is None:
            prompt = self._tokens(grow)
        else:
            base = self.conversations[name]
            if diverge:
                base = base[: len(base) // 2]
            prompt = self.conversations[name] = base + self._tokens(grow)
        self._submit(name, prompt, max_tokens)

    def _submit(self, name: str | None, prompt: list[int], max_tokens: int) -> None:
        params = rpc.GenerateParams(prompt="-", session=name, max_tokens=max_tokens)
        daemon: Any = self.daemon
        self._start("generate", lambda: _admit(daemon, params, prompt, time.perf_counter()))

    @precondition(lambda self: self._cached())
    @rule(
        name=st.sampled_from([*NAMES, None]),
        pick=st.integers(0, 7),
        cut=st.integers(0, 40),  # a match needs a whole 256-token block in common
        grow=st.integers(1, 64),
    )
    def generate_sharing_a_prefix(self, name: str | None, pick: int, cut: int, grow: int) -> None:
        """A prompt starting with another entry's tokens (a shared system prompt, a resent
        sessionless conversation): the prefix cache may borrow or adopt that entry."""
        cached = self._cached()
        tokens = cached[pick % len(cached)]
        prompt = tokens[: max(1, len(tokens) - cut)] + self._tokens(grow)
        if name is not None:
            self.conversations[name] = prompt
        self._submit(name, prompt, 8)

    def _cached(self) -> list[list[int]]:
        sessions = self.store.sessions.values()
        return [
            s.tokens if s.cache is not None else list(s.disk_token_list or []) for s in sessions
        ]

    @precondition(lambda self: self.engine.jobs)
    @rule(
        pick=st.integers(0, 7),
        generated=st.integers(1, 64),
        how=st.sampled_from(["stop", "length", "cancelled", "error", "fault"]),
    )
    def engine_finishes(self, pick: int, generated: int, how: str) -> None:
        job = self.engine.jobs.pop(pick % len(self.engine.jobs))
        out = self._tokens(min(generated, job.max_tokens))
        cache = None
        if job.keep_cache and how != "error":
            cache = [FakeLayer(tuple(job.prompt + out), boom=how == "fault")]
        reason = "stop" if how == "fault" else how
        now = time.perf_counter()
        outcome = Outcome(
            reason, "", out, None, len(job.prompt), job.cached, now, now, now,
            cache=cache, cache_tokens=job.prompt + out if cache else None,
        )  # fmt: skip
        self.portal.call(lambda: _deliver(job, outcome))
        self._settle()

    @precondition(lambda self: any(kind == "generate" for kind, _ in self.tasks))
    @rule(pick=st.integers(0, 7))
    def cancel_waiting(self, pick: int) -> None:
        waiting = [f for kind, f in self.tasks if kind == "generate"]
        waiting[pick % len(waiting)].cancel()
        self._settle()

    @rule(name=st.sampled_from(NAMES))
    def delete(self, name: str) -> None:
        self.portal.call(self.store.delete, name)
        self._settle()

    @rule(source=st.sampled_from(NAMES), dest=st.sampled_from(NAMES))
    def fork(self, source: str, dest: str) -> None:
        self._start("fork", lambda: self.store.fork(source, dest))

    @precondition(lambda self: self._busy())
    @rule(pick=st.integers(0, 7), dest=st.sampled_from(NAMES), grow=st.integers(1, 300))
    def fork_a_busy_source_racing_a_turn(self, pick: int, dest: str, grow: int) -> None:
        """The fork waits for the source's turn while a turn on `dest` starts."""
        busy = self._busy()
        source = busy[pick % len(busy)]
        self._start("fork", lambda: self.store.fork(source, dest))
        self.generate(dest, grow, 8, False)

    def _busy(self) -> list[str]:
        return [s.id for s in self.store.sessions.values() if s.turn.busy]

    @rule(name=st.sampled_from([*NAMES, None]))
    def save(self, name: str | None) -> None:
        if name is None:
            self._start("save", self.store.save_all)
        else:
            self._start("save", lambda: self.store.save(name))

    @rule(blocks=st.integers(1, 8))
    def spill(self, blocks: int) -> None:
        self._start("save", lambda: self.store.make_room(blocks))

    # -- invariants -----------------------------------------------------------------

    @invariant()
    def blocks_are_what_sessions_and_turns_hold(self) -> None:
        pool, store = self.pool, self.store
        live = pool.live
        assert pool.used == sum(r.blocks for r in live) <= pool.total
        assert all(not r.released for r in live)
        for s in self.seen.values():
            if s.deleted and not s.turn.busy:  # nobody left to discard it: must be gone
                assert s.cache is None and s.reservation is None, s
        # A session deleted while busy keeps its blocks until its turn's holder ends.
        owners = [*store.sessions.values(), *(s for s in self.seen.values() if s.deleted)]
        held = {id(s.reservation) for s in owners if s.reservation is not None}
        unowned = [r for r in live if id(r) not in held]
        # A running job owns one reservation; anything else is a leak.
        assert len(unowned) <= len(self.engine.jobs), (unowned, pool.used)
        if not self.engine.jobs and not self.tasks:
            assert not unowned

    @invariant()
    def hot_sessions_fit_the_budget(self) -> None:
        store = self.store
        hot = [s for s in store.sessions.values() if s.cache is not None]
        assert sum(s.hot_bytes for s in hot) <= self.total * BLOCK * PER_TOKEN
        for s in hot:
            assert s.reservation is not None and not s.deleted
            assert s.reservation.blocks * BLOCK * PER_TOKEN >= s.hot_bytes
            assert list(s.cache[0].tokens) == s.tokens  # type: ignore[index]
        assert all(not s.deleted for s in store.sessions.values())

    @invariant()
    def files_are_the_sessions_on_disk(self) -> None:
        store = self.store
        files = {p.name.removesuffix(".safetensors") for p in store.folder.glob("*.safetensors")}
        on_disk = {s.id for s in store.sessions.values() if s.disk_bytes}
        assert files == on_disk, (files, on_disk)
        assert sum(s.disk_bytes for s in store.sessions.values()) <= store.disk_budget

    @invariant()
    def the_prefix_index_is_what_sessions_hold(self) -> None:
        store = self.store
        indexed = [
            s
            for s in store.sessions.values()
            if (s.cache is not None and s.tokens) or (s.disk_tokens and s.disk_token_list)
        ]
        assert all(s.id in store.index for s in indexed) and len(store.index) == len(indexed)
        for s in store.sessions.values():
            if s.disk_tokens:
                assert s.disk_token_list is not None and len(s.disk_token_list) == s.disk_tokens

    @invariant()
    def queue_depth_counts_turn_waiters(self) -> None:
        waiting_turns = sum(s.turn.waiting for s in self.store.sessions.values())
        assert self.store.waiting >= waiting_turns

    def teardown(self) -> None:
        try:
            for _, future in self.tasks:
                future.cancel()
            self._settle()
            while self.engine.jobs:
                self.engine_finishes(0, 1, "cancelled")
            self._settle()
            assert not self.tasks
            self.blocks_are_what_sessions_and_turns_hold()
            for name in list(self.store.sessions):
                assert self.portal.call(self.store.delete, name)
            self._settle()
            assert self.pool.used == 0 and not self.pool.live
            assert not self.store.sessions and self.store.waiting == 0
            assert not list(self.store.folder.glob("*.safetensors"))
            assert self.daemon.slots.free == 2
        finally:
            self._portal_cm.__exit__(None, None, None)
            self._logs_cm.__exit__(None, None, None)
            shutil.rmtree(self.root, ignore_errors=True)


def _deliver(job: Job, outcome: Outcome) -> None:
    job.deliver(Update(outcome=outcome))


def test_a_scripted_run_borrows_from_memory_and_disk() -> None:
    """The random runs seldom line up a whole shared block; this one does, step by step."""
    machine = Bookkeeping()
    checks = [getattr(machine, name) for name in dir(Bookkeeping) if name.startswith("the_")]
    checks += [
        machine.blocks_are_what_sessions_and_turns_hold,
        machine.files_are_the_sessions_on_disk,
    ]
    steps: list[Callable[[], None]] = [
        lambda: machine.generate(None, 300, 8, False),  # an anonymous entry
        lambda: machine.engine_finishes(0, 8, "stop"),
        lambda: machine.generate_sharing_a_prefix(None, 0, 0, 10),  # resent: adopts it
        lambda: machine.engine_finishes(0, 8, "stop"),
        lambda: machine.generate_sharing_a_prefix("a", 0, 0, 10),  # borrows the hot cache
        lambda: machine.engine_finishes(0, 8, "stop"),
        lambda: machine.save(None),
        lambda: machine.spill(8),  # every cache to disk
        lambda: machine.generate_sharing_a_prefix("b", 1, 0, 10),  # borrows a file
        lambda: machine.engine_finishes(0, 8, "stop"),
    ]
    try:
        for step in steps:
            step()
            for check in checks:
                check()
        stats = machine.store.prefix_stats
        assert stats["hits_anonymous"] >= 2 and stats["hits_hot"] >= 2, stats
        assert stats["hits_disk"] >= 1, stats
        assert sum(s.anonymous for s in machine.store.sessions.values()) == 1
    finally:
        machine.teardown()


TestBookkeeping = Bookkeeping.TestCase
TestBookkeeping.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.mark.stress
class TestBookkeepingLong(Bookkeeping.TestCase):  # type: ignore[name-defined,misc]
    settings = settings(
        max_examples=400,
        stateful_step_count=80,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
