"""The engine: one thread, the only caller of MLX, stepping mlx-lm's BatchGenerator.

The event loop hands it Jobs through a thread-safe inbox; every engine step produces at
most one Update per running job, and `emit` is called once per step with all of them
(one hop to the loop per step, not per token). Cancellation takes effect at the next step
boundary and frees the sequence's memory. Every job gets exactly one outcome, whatever
raises: a failed step fails the running jobs, a failure in one job's handling that job.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences

from mlxd import faults

from ..heap import release_free_heap
from ..kv.snapshot import quantize_cache
from ..metrics import LatencyWindow
from .sampling import Sampling, make_sampler
from .textstream import TextAssembler

__all__ = ["PREFILL_BATCH", "Engine", "Job", "Outcome", "Update"]

log = logging.getLogger(__name__)

KVCacheList = list[Any]
PREFILL_BATCH = 8  # prompts prefilled together (every rank's generator must use the same)


@dataclass(eq=False)
class Job:
    """One generation request as the engine sees it."""

    prompt: list[int]  # the whole prompt, cached prefix included
    max_tokens: int
    deliver: Callable[[Update], None]  # runs on the event loop, via the server's bridge
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    prefix_cache: KVCacheList | None = None  # a KV cache holding prompt[:cached]
    cached: int = 0
    keep_cache: bool = False  # hand the final KV cache back (sessions)
    kv_bits: int = 0  # quantize that cache (8 or 4) to keep more sessions in memory
    t_arrival: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class Outcome:
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    text: str
    tokens: list[int]
    logprobs: list[float] | None
    prompt_tokens: int
    cached_tokens: int
    t_start: float  # inserted into the batch
    t_first: float | None
    t_end: float
    cache: KVCacheList | None = None
    cache_tokens: list[int] | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class Update:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    outcome: Outcome | None = None


@dataclass(eq=False)
class _Running:
    job: Job
    uid: int
    text: TextAssembler
    t_start: float
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    t_first: float | None = None
    t_last: float = 0.0


HEAP_TRIM_EVERY_S = 10.0  # a trim takes ~25 ms with GiBs in the arenas: ~0.3% of the time


class _Stop:
    pass


class Engine:
    """Owns the model's BatchGenerator; every method but `step` is safe from any thread."""

    def __init__(
        self,
        emit: Callable[[list[tuple[Job, Update]]], None],
        *,
        prefill_step_size: int = 256,
        max_batch: int = 32,
        prefill_batch: int = PREFILL_BATCH,
    ) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self._emit = emit
        self._prefill_step_size = prefill_step_size
        self._max_batch = max_batch
        self._prefill_batch = prefill_batch
        self._eos = StopSequences()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._running: dict[int, _Running] = {}  # uid -> state
        self._trimmed_at = time.monotonic()
        self._by_job: dict[int, _Running] = {}  # id(job) -> state
        self._gen: BatchGenerator | None = None
        self._thread: threading.Thread | None = None
        self.ttft_ms = LatencyWindow()
        self.itl_ms = LatencyWindow()
        self.steps = 0

    # -- any thread -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mlxd-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    def fail(self, job: Job, error: BaseException) -> None:
        """End `job` with an "error" outcome (its update could not be handled)."""
        self._inbox.put(("fail", (job, error)))

    def call(
        self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run `fn` on the engine thread between steps; `done(result, error)` runs there too."""
        self._inbox.put(("call", (fn, done)))

    def stop(self, timeout: float | None = None) -> None:
        """Finish the current step and end the thread (running jobs are not replied to)."""
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        return len(self._running)

    # -- engine thread --------------------------------------------------------------

    def set_model(self, model: Any, tokenizer: Any) -> None:
        """Switch models (engine thread, no request running); mlx arrays stay on this thread."""
        self.cancel_running()
        self._close_generator()
        self.model, self.tokenizer = model, tokenizer
        self._eos = StopSequences([(t,) for t in tokenizer.eos_token_ids] if tokenizer else None)

    def _run(self) -> None:
        while True:
            try:
                if not self._drain_inbox(block=not self._running):
                    break
                was_running = bool(self._running)
                self.step()
                idle = was_running and not self._running
                if idle:
                    # Finished requests leave reference cycles (closures, caught
                    # cancellations) that hold KV arrays: big native buffers behind small
                    # Python objects, which the collector's object counts never notice.
                    gc.collect()
                now = time.monotonic()
                if idle or now - self._trimmed_at > HEAP_TRIM_EVERY_S:  # or a load never pauses
                    release_free_heap()
                    self._trimmed_at = now
            except Exception:  # never let one bad step kill the engine
                log.exception("engine step failed")

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued commands; False once asked to stop."""
        while True:
            try:
                kind, arg = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "submit":
                self._insert(arg)
            elif kind == "cancel":
                self._cancel(arg)
            elif kind == "fail":
                self._cancel(*arg)
            elif kind == "call":
                fn, done = arg
                try:
                    result = fn()
                except BaseException as exc:
                    done(None, exc)
                else:
                    done(result, None)
            elif kind == "stop":
                self._close_generator()
                return False

    def _generator(self) -> BatchGenerator:
        if self._gen is None:
            self._gen = BatchGenerator(
                self.model,
                stop_tokens=[[t] for t in self.tokenizer.eos_token_ids],
                completion_batch_size=self._max_batch,
                prefill_batch_size=self._prefill_batch,
                prefill_step_size=self._prefill_step_size,
            )
        return self._gen

    def _close_generator(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def _insert(self, job: Job) -> None:
        now = time.perf_counter()
        try:
            if job.cached >= len(job.prompt):
                raise ValueError("at least one prompt token must be left to prefill")
            sampler = make_sampler(job.sampling)
            (uid,) = self._generator().insert(
                [job.prompt[job.cached :]],
                max_tokens=[job.max_tokens],
                caches=[job.prefix_cache] if job.prefix_cache is not None else None,
                all_tokens=[list(job.prompt[: job.cached])],
                samplers=[sampler],  # type: ignore[list-item]  # None: the batch's greedy sampler
                stop_sequences=[self._eos],
            )
        except Exception as exc:
            outcome = Outcome("error", "", [], None, len(job.prompt), 0, now, None, now, error=exc)
            self._emit([(job, Update(outcome=outcome))])
            return
        job.prefix_cache = None  # the batch holds its own merged copy now
        state = _Running(job, uid, TextAssembler(self.tokenizer.detokenizer, job.stop), now)
        state.logprobs = [] if job.logprobs else None
        self._running[uid] = state
        self._by_job[id(job)] = state

    def cancel_running(self) -> None:
        """Cancel every running job (engine thread): stragglers whose clients left."""
        for state in list(self._running.values()):
            self._cancel(state.job)

    def _cancel(self, job: Job, error: BaseException | None = None) -> None:
        """Remove `job` from the batch with a "cancelled" outcome ("error" with `error`)."""
        state = self._by_job.get(id(job))
        if state is None:
            return  # finished already; its outcome is on its way
        try:
            cache, tokens = self._remove(state, keep=job.keep_cache and error is None)
            text = state.text.finish()
            reason = "cancelled" if error is None else "error"
            update = self._finish(state, reason, text, [], cache, tokens, error=error)
        except Exception as exc:
            update = self._fail_one(state, exc)
        self._emit([(job, update)])

    def _remove(self, state: _Running, keep: bool) -> tuple[KVCacheList | None, list[int] | None]:
        caches = self._generator().remove([state.uid], return_prompt_caches=keep)
        if not keep or state.uid not in caches:
            return None, None
        cache, tokens = caches[state.uid]
        return self._materialise(cache, state.job), list(tokens)

    @staticmethod
    def _materialise(cache: KVCacheList, job: Job) -> KVCacheList:
        # Evaluate now so the cache does not keep the whole batch's arrays alive.
        if job.kv_bits:
            return quantize_cache(cache, job.kv_bits)
        mx.eval([c.state for c in cache])
        return cache

    def step(self) -> None:
        """One decode step plus one prefill chunk, when anything is running."""
        if not self._running:
            return
        try:
            faults.check("ENGINE_STEPS")
            _, responses = self._generator().next()
        except Exception as exc:
            log.exception("batch step failed; failing %d running requests", len(self._running))
            self._fail_all(exc)
            return
        self.steps += 1
        now = time.perf_counter()
        updates = []
        for r in responses:
            state = self._running.get(r.uid)
            if state is None:
                continue
            try:
                update = self._on_token(state, r, now)
            except Exception as exc:  # one job's failure (say, quantizing its cache)
                log.exception("token handling failed; failing that request alone")
                update = self._fail_one(state, exc)
            updates.append((state.job, update))
        if updates:
            self._emit(updates)

    def _fail_one(self, state: _Running, exc: BaseException) -> Update:
        """An "error" outcome for one job; its sequence leaves the batch if still in it."""
        update = self._finish(state, "error", "", [], None, None, error=exc)
        try:
            self._generator().remove([state.uid])  # a uid no longer in the batch is ignored
        except Exception:
            log.exception("removing a failed sequence failed; resetting the batch")
            self._fail_all(exc)
        return update

    def _on_token(self, state: _Running, r: Any, now: float) -> Update:
        faults.check("TOKEN")
        token = int(r.token)
        if state.t_first is None:
            state.t_first = now
            self.ttft_ms.add((now - state.job.t_arrival) * 1000)
        else:
            self.itl_ms.add((now - state.t_last) * 1000)
        state.t_last = now
        state.tokens.append(token)
        logprob = None
        if state.logprobs is not None:
            logprob = float(r.logprobs[token].item())
            state.logprobs.append(logprob)
        lps = [logprob] if logprob is not None else None
        if r.finish_reason == "stop":  # an EOS token: it ends the text, it is not part of it
            text = state.text.finish()
            cache = self._materialise(r.prompt_cache, state.job) if state.job.keep_cache else None
            return self._finish(state, "stop", text, [token], cache, r.all_tokens, lps)
        text = state.text.add(token)
        if state.text.stopped:
            cache, tokens = self._remove(state, keep=state.job.keep_cache)
            return self._finish(state, "stop", text, [token], cache, tokens, lps)
        if r.finish_reason == "length":
            text += state.text.finish()
            cache = self._materialise(r.prompt_cache, state.job) if state.job.keep_cache else None
            return self._finish(state, "length", text, [token], cache, r.all_tokens, lps)
        return Update(text, [token], lps)

    def _finish(
        self,
        state: _Running,
        reason: str,
        text: str,
        tokens: list[int],
        cache: KVCacheList | None,
        cache_tokens: list[int] | None,
        logprobs: list[float] | None = None,
        error: BaseException | None = None,
    ) -> Update:
        self._running.pop(state.uid, None)
        self._by_job.pop(id(state.job), None)
        job = state.job
        outcome = Outcome(
            reason,
            state.text.text,
            state.tokens,
            state.logprobs,
            len(job.prompt),
            job.cached,
            state.t_start,
            state.t_first,
            time.perf_counter(),
            cache if job.keep_cache else None,
            list(cache_tokens) if (job.keep_cache and cache_tokens is not None) else None,
            error,
        )
        return Update(text, tokens, logprobs, outcome)

    def _fail_all(self, exc: BaseException) -> None:
        updates = [
            (s.job, self._finish(s, "error", "", [], None, None, error=exc))
            for s in list(self._running.values())
        ]
        self._close_generator()  # its state is unknown after a failed step
        self._emit(updates)
