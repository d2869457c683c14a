"""The daemon's wiring: model, engine, pool, sessions and server, its states, drain and swap."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from typing import Any

import anyio
import mlx.core as mx
import structlog

from mlxd import faults, rpc

from .. import BLAS
from ..config import Config
from ..engine.bridge import LoopBridge
from ..engine.engine import Engine, Job, Update
from ..kv.pool import BlockPool
from ..kv.sessions import MLX_CACHES, ModelShape, SessionStore
from ..kv.sharded import leader_caches
from ..kv.turns import Turn
from ..models.model import LoadedModel, load_model
from ..transport.http import HttpFront
from ..transport.server import RequestContext, RpcServer
from . import distributed

__all__ = ["Daemon", "State"]

log = structlog.get_logger("mlxd")


class State(enum.Enum):
    """The daemon's life: a drain, once begun, is never undone (not even by a swap)."""

    LOADING = "loading"
    OK = "ok"
    SWAPPING = "swapping"
    DRAINING = "draining"
    STOPPED = "stopped"


_NEXT = {
    State.LOADING: {State.OK, State.DRAINING},
    State.OK: {State.SWAPPING, State.DRAINING},
    State.SWAPPING: {State.OK, State.DRAINING},
    State.DRAINING: {State.STOPPED},
    State.STOPPED: set(),
}


class Daemon:
    """One model, one engine, many connections. Create and `start()` inside the event loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.monotonic()
        self.state = State.LOADING
        self.mlx_memory = (0, 0)  # MLX active and cache bytes, as the last status read them
        self.totals = rpc.Totals()
        self.engine: Engine = None  # type: ignore[assignment]
        self.bridge: LoopBridge = None  # type: ignore[assignment]
        self.model: LoadedModel = None  # type: ignore[assignment]
        self.pool: BlockPool = None  # type: ignore[assignment]
        self.sessions: SessionStore = None  # type: ignore[assignment]
        self.slots = Turn(config.max_batch)  # the engine's compute slots, handed out FIFO
        self.shutdown_requested = anyio.Event()
        self.shutdown_drain_s: float | None = None
        self.server = RpcServer(
            {},  # the method table: handlers.methods(daemon), installed by its runner
            max_frame_bytes=config.max_frame_bytes,
            idle_frame_timeout_s=config.idle_frame_timeout_s,
            max_inflight_per_connection=config.max_inflight_per_connection,
            refuse=self._refuse,
        )
        self.server.on_request_done = self._request_done
        self.http = HttpFront(self)  # OpenAI/Anthropic HTTP, on the socket and on --http
        self.server.http = self.http.serve_unix

    # -- start-up -------------------------------------------------------------------

    async def start(self) -> None:
        self.bridge = LoopBridge()
        if self.config.distributed:  # rank 0 of a group: the engine drives every rank
            self.engine = distributed.make_engine(self)
            distributed.attach(self)
        else:
            self.engine = Engine(
                self._emit,
                prefill_step_size=self.config.prefill_step_size,
                max_batch=self.config.max_batch,
            )
        self.engine.start()
        log.info("loading model", model=self.config.model)
        await self._load(self.config.model)
        log.info(
            "model loaded",
            model=self.model.id,
            fingerprint=self.model.fingerprint[:16],
            weights=self.model.weights,
            blas=BLAS,
            pool_blocks=self.pool.total,
            kv_budget=self.config.kv_budget_bytes,
        )
        self.enter(State.OK)

    def enter(self, state: State) -> bool:
        """Move to `state` if the life cycle allows it from here; False (and no change) if not."""
        if state not in _NEXT[self.state]:
            return False
        log.debug("state", old=self.state.value, new=state.value)
        self.state = state
        return True

    async def _load(self, spec: str) -> None:
        cache_dir = self.config.cache_dir

        def load() -> LoadedModel:
            self.engine.set_model(None, None)  # unload first: two models may not fit
            mx.clear_cache()
            group = distributed.group() if self.config.distributed else None
            loaded = load_model(spec, cache_dir, self.config.weights, group)
            self.engine.set_model(loaded.model, loaded.tokenizer)
            return loaded

        self.model = await self.on_engine(load)
        per_block = self.model.kv_bytes_per_token * self.config.block_tokens
        self.pool = BlockPool(
            self.config.kv_budget_bytes // per_block,
            self.config.block_tokens,
            self.config.max_queue,
        )
        shard, caches = "", MLX_CACHES
        if self.config.distributed:  # every rank holds its heads of each cache, and files
            shard = distributed.shard_name(distributed.group())
            caches = leader_caches(self.engine)  # type: ignore[arg-type]
        shape = ModelShape.of(self.model, shard)
        self.sessions = SessionStore(
            self.config.state_dir,
            shape,
            self.pool,
            self.on_engine,
            disk_budget_bytes=self.config.disk_budget_bytes,
            block_bytes=per_block,
            kv_bits=self.config.kv_bits,
            prefix_cache=self.config.prefix_cache,
            caches=caches,
        )
        await self.sessions.load_index()

    async def on_engine(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread (MLX streams are thread-local) and await it."""
        return await self.bridge.run(fn, self.engine.call)

    def _emit(self, updates: list[tuple[Job, Update]]) -> None:
        def deliver() -> None:
            for job, update in updates:
                self._deliver(job, update)

        self.bridge.post(deliver)

    def _deliver(self, job: Job, update: Update) -> None:
        """Hand one update to its request; a failure ends that job alone, with an error.

        A final update's `deliver` settles its job (slot, turn, reservation) even when it
        raises; a failed intermediate one leaves the job running, so the engine ends it."""
        try:
            faults.check("DELIVER")  # test-only: this delivery fails before `deliver` runs
        except faults.InjectedFault as exc:
            log.warning("delivery failed", error=str(exc))
            if update.outcome is None:
                self.engine.fail(job, exc)
                return
            failed = dataclasses.replace(
                update.outcome, finish_reason="error", cache=None, cache_tokens=None, error=exc
            )
            update = Update(outcome=failed)
        try:
            job.deliver(update)
        except Exception as exc:
            log.exception("delivering an engine update failed")
            if update.outcome is None:
                self.engine.fail(job, exc)

    async def close(self) -> None:
        if self.engine is not None:
            await anyio.to_thread.run_sync(self.engine.stop, 30.0)

    # -- requests -------------------------------------------------------------------

    def _refuse(self, method: str) -> rpc.RpcError | None:
        if self.state is State.OK or method in ("status", "initialize", "models/current"):
            return None
        if self.state is State.SWAPPING:
            return rpc.RpcError(
                rpc.ErrorCode.SHUTTING_DOWN, "mlxd is switching models; retry shortly"
            )
        return rpc.RpcError(rpc.ErrorCode.SHUTTING_DOWN, "mlxd is shutting down")

    async def drain_requests(self, timeout: float, exclude: RequestContext | None = None) -> None:
        """Let requests finish until `timeout`, then cancel the rest (each gets a reply)."""
        with anyio.move_on_after(timeout):
            await self.server.wait_idle(exclude)
        if self.server.inflight - {exclude}:
            log.warning("drain deadline: cancelling requests", count=len(self.server.inflight))
            self.server.cancel_all(exclude)
            with anyio.move_on_after(5.0):
                await self.server.wait_idle(exclude)
        # Jobs whose clients left are no request's any more; their outcomes (and session
        # caches) are delivered before this call returns, since the bridge keeps order.
        await self.on_engine(self.engine.cancel_running)

    async def persist_sessions(self) -> None:
        """Save every hot session, shielded and bounded: it must finish, but not hang."""
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(self.config.persist_timeout_s) as scope,
        ):
            saved = await self.sessions.save_all()
        log.info("sessions persisted", saved=saved, timed_out=scope.cancelled_caught)

    async def drain(self, timeout: float) -> None:
        """SIGTERM or `shutdown`: refuse new work, finish or cancel the rest, save sessions."""
        self.enter(State.DRAINING)
        await self.drain_requests(timeout)
        await self.persist_sessions()
        self.enter(State.STOPPED)

    def _request_done(self, ctx: RequestContext, outcome: str, elapsed_ms: float) -> None:
        totals = self.totals
        totals.requests += 1
        if outcome == "ok":
            totals.completed += 1
        elif outcome in ("request_cancelled", "cancelled", "disconnected"):
            totals.cancelled += 1
        elif outcome in ("server_busy", "shutting_down", "context_too_long"):
            totals.rejected += 1
        else:
            totals.errors += 1
        if ctx.method != "status" or outcome != "ok":
            log.info(
                "request",
                method=ctx.method,
                id=ctx.id,
                conn=ctx.connection_id,
                outcome=outcome,
                total_ms=round(elapsed_ms, 2),
                **ctx.summary,
            )

    async def encode(
        self,
        text: str | None,
        messages: list[rpc.ChatMessage] | None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The prompt's tokens: `text` as is, or `messages` through the chat template."""
        tokenizer = self.model.tokenizer

        def run() -> list[int]:
            if messages is not None:
                chat = [{"role": m.role, "content": m.content} for m in messages]
                rendered = tokenizer.apply_chat_template(
                    chat, add_generation_prompt=add_generation_prompt, tokenize=False
                )
                return list(tokenizer.encode(rendered, add_special_tokens=False))
            return list(tokenizer.encode(text))

        # Tokenizers are not MLX: a worker thread keeps long prompts off the event loop.
        return await anyio.to_thread.run_sync(run)

    def model_info(self) -> rpc.ModelInfo:
        m = self.model
        return rpc.ModelInfo(
            m.id, m.path, m.fingerprint, m.type, m.vocab_size, m.context_length, m.dtype, m.weights
        )

    async def models_swap(self, params: rpc.ModelsSwapParams, ctx: RequestContext) -> Any:
        """Drain, persist sessions, unload, load the new model; on failure reload the old."""
        if not self.enter(State.SWAPPING):
            raise rpc.RpcError(rpc.ErrorCode.SHUTTING_DOWN, f"cannot swap while {self.state.value}")
        old = self.model.id
        try:
            with anyio.CancelScope(shield=True):  # half a swap is worse than a slow one
                timeout = params.drain_timeout_s
                await self.drain_requests(
                    self.config.drain_timeout_s if timeout is None else timeout, ctx
                )
                await self.persist_sessions()
                try:
                    await self._load(params.model)
                except Exception as exc:
                    log.error(
                        "model swap failed; reloading the old model",
                        model=params.model,
                        error=str(exc),
                    )
                    await self._load(old)
                    raise rpc.RpcError(
                        rpc.ErrorCode.INVALID_PARAMS,
                        f"could not load {params.model!r} ({exc}); still serving {old!r}",
                    ) from None
        finally:
            if not self.enter(State.OK):  # a drain began meanwhile: it is not undone
                log.info("swap finished during a drain: still draining", state=self.state.value)
        log.info(
            "model swapped", old=old, new=self.model.id, fingerprint=self.model.fingerprint[:16]
        )
        return self.model_info()
