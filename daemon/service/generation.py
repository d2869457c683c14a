"""The `generate` method: tokenize, admit, resume the session, stream deltas, one reply.

Updates from the engine are coalesced while the client is slow to read, so the engine
never waits for a socket and memory stays bounded by the request's own output.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from mlxd import faults, rpc

from ..engine.engine import Job, Outcome, Update
from ..engine.sampling import Sampling
from ..transport.server import RequestContext

if TYPE_CHECKING:
    from .service import Daemon

__all__ = ["generate"]

log = structlog.get_logger("mlxd.generation")


class _Pending:
    """Updates delivered by the engine and not yet sent to the client."""

    def __init__(self, want_logprobs: bool) -> None:
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if want_logprobs else None
        self.outcome: Outcome | None = None
        self.coalesced = 0  # updates merged because the client had not read the last
        self._event = anyio.Event()
        self._waiting = 0

    def push(self, update: Update) -> None:
        if self.text or self.tokens:
            self.coalesced += 1
        if update.text:
            self.text.append(update.text)
        self.tokens.extend(update.tokens)
        if self.logprobs is not None and update.logprobs:
            self.logprobs.extend(update.logprobs)
        if update.outcome is not None:
            self.outcome = update.outcome
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = anyio.Event()

    def take(self) -> tuple[str, list[int], list[float] | None]:
        text, tokens, lps = "".join(self.text), self.tokens, self.logprobs
        self.text, self.tokens = [], []
        self.logprobs = [] if lps is not None else None
        return text, tokens, lps


def _usage(outcome: Outcome) -> rpc.Usage:
    return rpc.Usage(outcome.prompt_tokens, outcome.cached_tokens, len(outcome.tokens))


def _timings(outcome: Outcome, t_arrival: float) -> rpc.Timings:
    total = outcome.t_end - t_arrival
    decode = outcome.t_end - (outcome.t_first or outcome.t_end)
    rate = (len(outcome.tokens) - 1) / decode if decode > 0 and len(outcome.tokens) > 1 else 0.0
    return rpc.Timings(
        queued_ms=round((outcome.t_start - t_arrival) * 1000, 3),
        ttft_ms=round(((outcome.t_first or outcome.t_end) - t_arrival) * 1000, 3),
        total_ms=round(total * 1000, 3),
        tokens_per_s=round(rate, 2),
    )


async def generate(daemon: Daemon, params: rpc.GenerateParams, ctx: RequestContext) -> Any:
    t_arrival = time.perf_counter()
    # Cancelled before it produced anything: still the data PROTOCOL.md promises.
    ctx.cancelled_data = rpc.CancelledData("", rpc.Usage())
    prompt = await daemon.encode(params.prompt, params.messages)
    if not prompt:
        raise rpc.RpcError(rpc.ErrorCode.INVALID_PARAMS, "the prompt encodes to no tokens")
    requested = len(prompt) + params.max_tokens
    limit = daemon.model.context_length
    if requested > limit:
        raise rpc.RpcError(
            rpc.ErrorCode.CONTEXT_TOO_LONG,
            f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
            f"model's context of {limit} tokens",
            {"limit": limit, "requested": requested},
        )
    ctx.summary.update(session=params.session, prompt_tokens=len(prompt))
    try:
        job, pending = await _admit(daemon, params, prompt, t_arrival)
    except anyio.get_cancelled_exc_class():
        if not ctx.cancel_requested:
            raise
        # Cancelled while it waited for its turn, a slot or blocks: nothing generated, but
        # the reply still says how long the prompt was.
        data = rpc.CancelledData("", rpc.Usage(prompt_tokens=len(prompt)))
        raise rpc.RpcError(rpc.ErrorCode.REQUEST_CANCELLED, "request cancelled", data) from None
    ctx.cancel_hook = lambda: daemon.engine.cancel(job)
    return await _follow(daemon, params, ctx, job, pending, t_arrival)


async def _admit(
    daemon: Daemon, params: rpc.GenerateParams, prompt: list[int], t_arrival: float
) -> tuple[Job, _Pending]:
    """The session's turn, a compute slot and the pool's blocks, then the job submitted;
    from then on the job's outcome gives them all back."""
    requested = len(prompt) + params.max_tokens
    sessions = daemon.sessions
    session = None
    if params.session:
        session = await sessions.begin(params.session, create=True)
    elif sessions.prefix_cache:
        session = sessions.anonymous(prompt)  # kept for whoever resends this prompt
    turn_passed = slot_taken = False
    try:
        await _compute_slot(daemon)
        slot_taken = True
        # The session's blocks count toward the need and stay its own until granted.
        held = session.reservation if session is not None else None
        reservation = await daemon.pool.reserve(requested, sessions.make_room, held)
        if session is not None:
            sessions.detach_blocks(session)  # the request's now, back with its outcome
        try:
            cache, cached = (None, 0)
            if session is not None:
                cache, cached = await sessions.checkout(session, prompt)
        except BaseException:
            reservation.release()
            raise
        pending = _Pending(params.logprobs)

        def deliver(update: Update) -> None:
            pending.push(update)  # first: whatever fails below, the reply has its outcome
            outcome = update.outcome
            if outcome is None:
                return
            # Runs even when the client is gone: the session and pool stay consistent.
            try:
                daemon.pool.mean_hold_s = 0.9 * daemon.pool.mean_hold_s + 0.1 * (
                    outcome.t_end - outcome.t_start
                )
                if session is not None:
                    faults.check("COMMIT")  # test-only fault seam
                    sessions.commit(session, outcome.cache, outcome.cache_tokens, reservation)
            except Exception:
                log.exception("recording a turn's outcome failed", session=params.session)
            finally:
                if session is None or session.reservation is not reservation:
                    reservation.release()  # not kept by the session (or commit failed)
                daemon.slots.release()
                if session is not None:
                    sessions.end(session)

        job = Job(
            prompt=prompt,
            max_tokens=params.max_tokens,
            deliver=deliver,
            sampling=Sampling(
                params.temperature, params.top_p, params.top_k, params.min_p, params.seed
            ),
            stop=list(params.stop),
            logprobs=params.logprobs,
            prefix_cache=cache,
            cached=cached,
            keep_cache=session is not None,
            # Anonymous entries stay exact: a sessionless client expects a cold run's output.
            kv_bits=daemon.config.kv_bits if session is not None and not session.anonymous else 0,
            t_arrival=t_arrival,
        )
        daemon.engine.submit(job)
        turn_passed = True
    finally:
        if slot_taken and not turn_passed:
            daemon.slots.release()
        if session is not None and not turn_passed:
            sessions.end(session)
    return job, pending


async def _compute_slot(daemon: Daemon) -> None:
    """One of the engine's `--max-batch` slots, in arrival order; ServerBusy at once when
    `--max-queue` requests already wait, so an overloaded daemon says so instead of
    queueing without bound inside the batch generator."""
    slots = daemon.slots
    if slots.busy and slots.waiting >= daemon.config.max_queue:
        raise rpc.RpcError(
            rpc.ErrorCode.SERVER_BUSY,
            f"server busy: {slots.waiting} requests wait for the engine (limit {daemon.config.max_queue})",
            {"retry_after_ms": daemon.pool.retry_after_ms(), "queue_depth": slots.waiting},
        )
    await slots.acquire()


async def _follow(
    daemon: Daemon,
    params: rpc.GenerateParams,
    ctx: RequestContext,
    job: Job,
    pending: _Pending,
    t_arrival: float,
) -> rpc.GenerateResult:
    try:
        while True:
            await pending.wait()
            # Read before sending: the last update may land while a delta is being sent,
            # and its text must still go out as a delta before the reply.
            finished = pending.outcome is not None
            text, tokens, lps = pending.take()
            if params.stream and (text or tokens):
                delta = rpc.GenerateDelta(
                    ctx.id,  # type: ignore[arg-type]
                    text,
                    tokens,
                    lps if lps is not None else msgspec.UNSET,
                )
                await ctx.notify(rpc.DELTA_NOTIFICATION, delta)
            if finished:
                break
    finally:
        if pending.outcome is None:
            daemon.engine.cancel(job)  # we are being cancelled: free the sequence
    outcome = pending.outcome
    assert outcome is not None  # the loop ends only once the engine's outcome is in
    usage = _usage(outcome)
    ctx.summary.update(
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        finish=outcome.finish_reason,
        coalesced=pending.coalesced,
    )
    if outcome.finish_reason == "cancelled":
        data = rpc.CancelledData(outcome.text, usage)
        raise rpc.RpcError(rpc.ErrorCode.REQUEST_CANCELLED, "request cancelled", data)
    if outcome.finish_reason == "error":
        raise rpc.RpcError(rpc.ErrorCode.INTERNAL_ERROR, f"generation failed: {outcome.error}")
    timings = _timings(outcome, t_arrival)
    ctx.summary.update(ttft_ms=timings.ttft_ms, tokens_per_s=timings.tokens_per_s)
    return rpc.GenerateResult(
        text=outcome.text,
        finish_reason=outcome.finish_reason,  # type: ignore[arg-type]
        usage=usage,
        timings=timings,
        session=params.session,
        tokens=outcome.tokens,
        logprobs=outcome.logprobs if outcome.logprobs is not None else msgspec.UNSET,
    )
