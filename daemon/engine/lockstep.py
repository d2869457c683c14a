"""Lockstep ranks: rank 0's engine sends each step's plan through mx.distributed, the others replay it.

Every rank holds a tensor-parallel shard of the model, so every rank must run the same
BatchGenerator calls in the same order: the model's own all_sums pair up only then. Rank 0
records what its engine does to its generator (inserts with their prompt tokens, sampling
parameters, seed and prefix cache; removals; resets) and to its KV caches (kv/sharded.py)
and, before each `next()`, sends the ops recorded since the last one: a header (plan
length, checksum of the last step's tokens, flags) and then the plan's msgpack bytes, both
as all_sum broadcasts (the other ranks add zeros). A plan flagged for an answer is
followed by one more all_sum to which every other rank adds its answer (did its file load).

Sampled tokens agree because every rank computes the same logits (the head is not
sharded, and the row-parallel layers end in an all_sum that leaves every rank the same
sums) and samples with the same per-request key: rank 0 chooses the seed of an unseeded
request and sends it. Each header carries a checksum of rank 0's last step, which every
other rank compares with its own: a divergence ends the group instead of serving wrong text.

All collectives run on mlx-lm's generation stream, the one the model's all_sums run on, so
that a step's forward pass still in flight (BatchGenerator overlaps the next step with its
caller) is ordered before the next plan on every rank. Rank 0 only sends, so it does not
wait for a plan to arrive: its sends are scheduled asynchronously.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import queue
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import msgspec
import numpy as np
from mlx_lm.generate import BatchGenerator, StopSequences, generation_stream

from ..kv.sharded import CacheOp, Keep, Twins, live_caches, mirror
from .engine import Engine, Job, KVCacheList, Outcome, Update
from .sampling import Sampling, make_sampler

__all__ = ["Channel", "GroupLost", "LockstepEngine", "follow"]

log = logging.getLogger(__name__)

_HEARTBEAT_S = 1.0  # an idle rank 0 still talks to the group, so a lost rank is noticed
_STEP, _ANSWER = 1, 2  # a plan's flags


class GroupLost(RuntimeError):
    """A rank left, failed or diverged: the group cannot go on (the service manager restarts it)."""


class Insert(msgspec.Struct, tag="i", array_like=True):
    uid: int
    tokens: list[int]  # those to prefill: after the prefix cache's
    cache: int  # the prefix cache's handle (kv/sharded.py); 0: none
    max_tokens: int
    sampling: Sampling


class Remove(msgspec.Struct, tag="r", array_like=True):
    uids: list[int]
    keep: bool  # their caches are kept (a `Keep` op follows)


class Reset(msgspec.Struct, tag="z", array_like=True):
    pass


class Exit(msgspec.Struct, tag="x", array_like=True):
    caches: int  # how many KV caches rank 0 holds: every other rank holds their twins


Op = Insert | Remove | Reset | Exit | CacheOp
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[Op]).decode


def checksum(responses: Sequence[Any]) -> int:
    """A step's (uid, token) pairs as a 31-bit number (exact in an all_sum of int32)."""
    data = b"".join(
        int(r.uid).to_bytes(8, "little") + int(r.token).to_bytes(8, "little") for r in responses
    )
    return zlib.crc32(data) & 0x7FFFFFFF


class Channel:
    """Rank 0's plans to every other rank, over the group's all_sum (no sockets of our own)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        # Rank 0: recorded since the last send, from the engine thread, the event loop (a
        # prefix view) and any thread a cache is garbage-collected on (reentrant-safe).
        self._ops: queue.SimpleQueue[Op] = queue.SimpleQueue()
        self.sent_bytes = 0  # rank 0: plan bytes put on the wire, headers included
        self.sends = 0
        self.send_s = 0.0  # rank 0: time spent scheduling plans (they are not waited for)
        self._inflight: list[mx.array] = []
        self.received_at = time.monotonic()  # any other rank: when the last plan came

    def _all_sum(self, x: mx.array) -> mx.array:
        with mx.stream(generation_stream):
            return mx.distributed.all_sum(x, group=self.group)

    def record(self, op: Op) -> None:
        """Rank 0: `op` goes out with the next plan (any thread)."""
        self._ops.put(op)

    def send(self, check: int, step: bool, wait: bool = False, answer: bool = False) -> None:
        """Rank 0: the ops recorded so far, then forget them. `wait` makes a lost peer raise
        here; `answer`: every other rank answers it (`collect` reads the sum)."""
        t0 = time.perf_counter()
        ops = []
        while True:
            try:
                ops.append(self._ops.get_nowait())
            except queue.Empty:
                break
        data = _encode(ops) if ops else b""
        run = mx.eval if wait else mx.async_eval
        flags = (_STEP if step else 0) | (_ANSWER if answer else 0)
        # One evaluation each, in order: evaluated together, MLX may run the data's all_sum
        # first, and another rank would read its first bytes as the header.
        arrays = [self._all_sum(mx.array([len(data), check, flags], mx.int32))]
        run(arrays[0])
        if data:
            arrays.append(self._all_sum(mx.array(np.frombuffer(data, np.uint8))))
            run(arrays[1])
        self._inflight = arrays  # held until the next send: scheduled, maybe not yet run
        self.sent_bytes += 12 + len(data)
        self.sends += 1
        self.send_s += time.perf_counter() - t0

    def receive(self) -> tuple[list[Op], int, int]:
        """Any other rank: the next plan, rank 0's last checksum and the plan's flags."""
        header = self._all_sum(mx.zeros((3,), mx.int32))
        n, check, flags = (int(v) for v in np.array(header))
        ops: list[Op] = []
        if n:
            data = self._all_sum(mx.zeros((n,), mx.uint8))
            ops = _decode(np.array(data).tobytes())
        self.received_at = time.monotonic()
        return ops, check, flags

    def collect(self, mine: int = 0) -> int:
        """The sum of every rank's answer to a plan sent with `answer` (each adds `mine`)."""
        total = self._all_sum(mx.array([mine], mx.int32))
        mx.eval(total)
        return int(np.array(total)[0])


class _LeaderGenerator:
    """Rank 0's BatchGenerator, recording every call the other ranks must replay."""

    def __init__(self, gen: BatchGenerator, engine: LockstepEngine) -> None:
        self._gen = gen
        self._engine = engine

    def insert(self, prompts: list[list[int]], **kw: Any) -> list[int]:
        job = self._engine.inserting
        assert job is not None  # only the engine's _insert calls this
        caches = kw.get("caches")
        handle = 0
        if caches is not None:
            handle = getattr(caches[0], "handle", 0)
            if not handle:
                raise ValueError("this prefix cache has no twin on the other ranks")
        uids = self._gen.insert(prompts, **kw)
        self._engine.channel.record(
            Insert(
                uids[0],
                list(prompts[0]),
                handle,
                job.max_tokens,
                job.sampling,
            )
        )
        return uids

    def remove(self, uids: list[int], return_prompt_caches: bool = False) -> Any:
        self._engine.channel.record(Remove(list(uids), return_prompt_caches))
        return self._gen.remove(uids, return_prompt_caches=return_prompt_caches)

    def next(self) -> Any:
        engine = self._engine
        try:
            with engine.talking():
                engine.channel.send(engine.last_check, step=True)
                result = self._gen.next()
        except Exception as exc:
            # The other ranks may have stepped or not: the group's state is unknown.
            raise engine.lose(exc) from exc
        engine.last_check = checksum(result[1])
        engine.last_step = time.monotonic()
        return result

    def close(self) -> None:
        self._engine.channel.record(Reset())
        self._gen.close()


class LockstepEngine(Engine):
    """Rank 0's engine: the same Engine, its generator calls recorded and sent before each step.

    `on_lost(error)` runs on the engine thread once the group is lost; from then on every
    request fails at once and `stop` raises GroupLost, so the daemon exits non-zero."""

    def __init__(
        self,
        emit: Callable[[list[tuple[Job, Update]]], None],
        channel: Channel,
        on_lost: Callable[[GroupLost], None],
        *,
        rank_timeout_s: float = 30.0,
        **kw: Any,
    ) -> None:
        super().__init__(emit, **kw)
        self.rank_timeout_s = rank_timeout_s
        self._busy_since: float | None = None  # a step or send under way on the group since
        self._lost_lock = threading.Lock()
        self.channel = channel
        self.inserting: Job | None = None
        self.last_check = 0
        self.last_step = time.monotonic()
        self.lost: GroupLost | None = None
        self._on_lost = on_lost
        self._ticker_stop = threading.Event()

    def start(self) -> None:
        super().start()
        threading.Thread(target=self._tick, name="mlxd-heartbeat", daemon=True).start()

    def _tick(self) -> None:
        while not self._ticker_stop.wait(_HEARTBEAT_S):
            busy = self._busy_since
            if busy is not None and time.monotonic() - busy > self.rank_timeout_s:
                self._abandon()
            elif self.lost is None:
                self.call(self._heartbeat, _log_error)

    @contextlib.contextmanager
    def talking(self) -> Iterator[None]:
        """Mark work that may wait on the group, which the watchdog bounds (engine thread).

        Not only the collectives: once a peer is gone, any evaluation that depends on the
        step still in flight (a removal slicing the batch) can block as well."""
        outer = self._busy_since is None
        if outer:
            self._busy_since = time.monotonic()
        try:
            yield
        finally:
            if outer:
                self._busy_since = None

    def step(self) -> None:
        with self.talking():
            super().step()

    def _cancel(self, job: Job, error: BaseException | None = None) -> None:
        with self.talking():
            super()._cancel(job, error)

    def _abandon(self) -> None:
        """The engine thread has waited on the group past the bound (watchdog thread).

        A collective whose peer died can block for good instead of raising (seen with the
        ring backend when the peer is killed mid-step), so the engine thread may never come
        back: every request it holds or has yet to take is failed from here."""
        error = GroupLost(
            f"the distributed group was lost: no rank answered for {self.rank_timeout_s:g} s "
            "(a rank died or hangs); every rank must be restarted"
        )
        if not self._set_lost(error):
            return
        updates = [
            (s.job, self._finish(s, "error", "", [], None, None, error=error))
            for s in list(self._running.values())
        ]
        while True:  # submitted, not yet taken by the stuck thread
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                updates.append((arg, Update(outcome=_error_outcome(arg, error))))
        self._emit(updates)

    def call(
        self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        if self.lost is not None:  # the engine thread may never take it: answer now
            done(None, self.lost)
            return
        super().call(fn, done)

    def submit(self, job: Job) -> None:
        if self.lost is not None:
            self._emit([(job, Update(outcome=_error_outcome(job, self.lost)))])
            return
        super().submit(job)

    def _set_lost(self, error: GroupLost) -> bool:
        with self._lost_lock:
            if self.lost is not None:
                return False
            self.lost = error
        log.error("%s", error)
        self._on_lost(error)
        return True

    def _heartbeat(self) -> None:
        if self.lost is not None or self.model is None:
            return
        if time.monotonic() - self.last_step < _HEARTBEAT_S / 2:
            return  # steps (or a beat) talked to the group just now; beats queued by a load
        self.last_step = time.monotonic()
        try:
            with self.talking():
                self.channel.send(self.last_check, step=False, wait=True)
        except Exception as exc:
            self.lose(exc)

    def ask(self) -> int:
        """Send the plan so far now and return the sum of the other ranks' answers (engine thread)."""
        try:
            with self.talking():
                self.channel.send(self.last_check, step=False, wait=True, answer=True)
                answer = self.channel.collect()
        except Exception as exc:
            raise self.lose(exc) from exc
        self.last_step = time.monotonic()
        return answer

    def _materialise(self, cache: KVCacheList, job: Job) -> KVCacheList:  # type: ignore[override]
        """The kept cache, and its twin on every rank: theirs are the same sequence's."""
        out = mirror(Engine._materialise(cache, job), self.channel.record)
        self.channel.record(Keep(self._by_job[id(job)].uid, out.handle, job.kv_bits))
        return out

    def lose(self, exc: BaseException) -> GroupLost:
        """Record that the group is gone (engine thread); the first time, tell the daemon."""
        self._set_lost(
            exc
            if isinstance(exc, GroupLost)
            else GroupLost(
                f"the distributed group was lost ({type(exc).__name__}: {exc}); "
                "every rank must be restarted"
            )
        )
        assert self.lost is not None
        return self.lost

    def _generator(self) -> Any:
        if self._gen is None:
            self._gen = _LeaderGenerator(super()._generator(), self)  # type: ignore[assignment]
        return self._gen

    def _insert(self, job: Job) -> None:
        if self.lost is not None:
            self._emit([(job, Update(outcome=_error_outcome(job, self.lost)))])
            return
        if job.sampling.temperature and job.sampling.seed is None:
            # Chosen here and sent: every rank samples alike.
            job.sampling.seed = secrets.randbits(63)
        self.inserting = job
        try:
            with self.talking():
                super()._insert(job)
        finally:
            self.inserting = None

    def stop(self, timeout: float | None = None) -> None:
        """Tell every rank to exit, then stop; raises GroupLost if the group was lost."""
        self._ticker_stop.set()
        self.call(self._send_exit, _log_error)
        # A lost group's engine thread may be stuck in a collective for good: do not wait.
        super().stop(1.0 if self.lost is not None else timeout)
        if self.lost is not None:
            raise self.lost

    def _send_exit(self) -> None:
        if self.lost is not None or self.model is None:
            return
        self._close_generator()
        gc.collect()  # caches only a reference cycle holds: dropped before they are counted
        self.channel.record(Exit(live_caches()))
        try:
            with self.talking():
                self.channel.send(self.last_check, step=False, wait=True)
        except Exception as exc:
            self.lose(exc)


def _error_outcome(job: Job, error: BaseException) -> Outcome:
    now = time.perf_counter()
    return Outcome("error", "", [], None, len(job.prompt), 0, now, None, now, error=error)


def _log_error(result: Any, error: BaseException | None) -> None:
    if error is not None and not isinstance(error, GroupLost):
        log.error("lockstep call failed", exc_info=error)


def follow(
    channel: Channel,
    model: Any,
    tokenizer: Any,
    twins: Twins,
    *,
    max_batch: int,
    prefill_batch: int,
    prefill_step_size: int,
) -> int:
    """Any rank but 0: replay rank 0's plans on this rank's shard until told to exit;
    returns how many caches rank 0 held then (`twins` should hold as many).

    Raises GroupLost when rank 0 is gone or this rank's tokens differ from rank 0's."""
    eos = StopSequences([(t,) for t in tokenizer.eos_token_ids])

    def generator() -> BatchGenerator:
        return BatchGenerator(
            model,
            stop_tokens=[[t] for t in tokenizer.eos_token_ids],
            completion_batch_size=max_batch,
            prefill_batch_size=prefill_batch,
            prefill_step_size=prefill_step_size,
        )

    def insert(op: Insert) -> None:
        sampler = make_sampler(op.sampling)
        try:
            caches = [twins.get(op.cache)] if op.cache else None
        except LookupError as exc:
            raise GroupLost(f"{exc}: it cannot compute what rank 0 does") from None
        (uid,) = gen.insert(
            [op.tokens],
            max_tokens=[op.max_tokens],
            caches=caches,
            all_tokens=[[]],
            samplers=[sampler],  # type: ignore[list-item]
            stop_sequences=[eos],
        )
        if uid != op.uid:
            raise GroupLost(f"rank {channel.rank} gave uid {uid} where rank 0 gave {op.uid}")

    gen = generator()
    mine = 0
    steps = 0
    while True:
        try:
            ops, check, flags = channel.receive()
        except Exception as exc:
            raise GroupLost(f"rank 0 is gone ({type(exc).__name__}: {exc})") from exc
        if check != mine:
            raise GroupLost(
                f"rank {channel.rank} diverged from rank 0 after step {steps} "
                f"(token checksum {mine}, rank 0's {check})"
            )
        for op in ops:
            if isinstance(op, Insert):
                insert(op)
            elif isinstance(op, Remove):
                removed = gen.remove(op.uids, return_prompt_caches=op.keep)
                twins.finished.update((uid, cache) for uid, (cache, _) in removed.items())
            elif isinstance(op, Reset):
                gen.close()
                gen = generator()
            elif isinstance(op, Exit):
                gen.close()
                return op.caches
            else:
                twins.apply(op)
        twins.finished.clear()  # rank 0 keeps a cache in the plan after it finished, or never
        if flags & _ANSWER:
            channel.collect(twins.answer())
        if flags & _STEP:
            _, responses = gen.next()
            mine = checksum(responses)
            steps += 1
            twins.finished.update(
                (r.uid, r.prompt_cache) for r in responses if r.prompt_cache is not None
            )
