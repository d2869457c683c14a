"""The daemon: model, engine, pool, sessions and the method handlers, wired together."""

from __future__ import annotations

import dataclasses
import enum
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import mlx.core as mx
import sniffio
import structlog

import mlxd
from mlxd import rpc

from . import BLAS, distributed, faults
from .bridge import LoopBridge
from .config import Config
from .engine import Engine, Job, Update
from .generation import generate
from .http import HttpFront
from .model import LoadedModel, load_model
from .pool import BlockPool
from .server import RequestContext, RpcServer
from .sessions import ModelShape, SessionStore
from .turns import Turn

__all__ = ["Daemon", "State"]

log = structlog.get_logger("mlxd")


class State(enum.Enum):
    """The daemon's life: a drain, once begun, is never undone (not even by a swap)."""

    LOADING = "loading"
    OK = "ok"
    SWAPPING = "swapping"
    DRAINING = "draining"
    STOPPED = "stopped"


_MEMORY_READ_S = 1.0

_NEXT = {
    State.LOADING: {State.OK, State.DRAINING},
    State.OK: {State.SWAPPING, State.DRAINING},
    State.SWAPPING: {State.OK, State.DRAINING},
    State.DRAINING: {State.STOPPED},
    State.STOPPED: set(),
}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # macOS: the peak is the best the stdlib offers
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Daemon:
    """One model, one engine, many connections. Create and `start()` inside the event loop."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.monotonic()
        self.state = State.LOADING
        self._mlx_memory = (0, 0)  # MLX active and cache bytes, as last read
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
            self._handlers(),
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
        shape = ModelShape(
            self.model.fingerprint,
            self.model.num_layers,
            self.model.kv_heads,
            self.model.head_dim,
            self.model.dtype,
        )
        self.sessions = SessionStore(
            self.config.state_dir,
            shape,
            self.pool,
            self.on_engine,
            disk_budget_bytes=self.config.disk_budget_bytes,
            block_bytes=per_block,
            kv_bits=self.config.kv_bits,
            prefix_cache=self.config.prefix_cache,
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
            log.warning("delivery failed", error=str(exc), **job.tag)
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
            log.exception("delivering an engine update failed", **job.tag)
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

    async def encode(self, text: str | None, messages: list[rpc.ChatMessage] | None) -> list[int]:
        tokenizer = self.model.tokenizer

        def run() -> list[int]:
            if messages is not None:
                chat = [{"role": m.role, "content": m.content} for m in messages]
                rendered = tokenizer.apply_chat_template(
                    chat, add_generation_prompt=True, tokenize=False
                )
                return list(tokenizer.encode(rendered, add_special_tokens=False))
            return list(tokenizer.encode(text))

        # Tokenizers are not MLX: a worker thread keeps long prompts off the event loop.
        return await anyio.to_thread.run_sync(run)

    def _handlers(self) -> dict[str, Any]:
        return {
            "initialize": self.initialize,
            "generate": lambda p, ctx: generate(self, p, ctx),
            "tokenize": self.tokenize,
            "models/current": self.models_current,
            "status": self.status,
            "shutdown": self.shutdown,
            "sessions/list": self.sessions_list,
            "sessions/get": self.sessions_get,
            "sessions/delete": self.sessions_delete,
            "sessions/fork": self.sessions_fork,
            "sessions/save": self.sessions_save,
            "models/swap": self.models_swap,
        }

    def model_info(self) -> rpc.ModelInfo:
        m = self.model
        return rpc.ModelInfo(
            m.id, m.path, m.fingerprint, m.type, m.vocab_size, m.context_length, m.dtype, m.weights
        )

    async def initialize(self, params: rpc.InitializeParams, ctx: RequestContext) -> Any:
        if params.client is not None:
            ctx.summary["client"] = f"{params.client.name}/{params.client.version}"
        return rpc.InitializeResult(
            server=rpc.ServerInfo("mlxd", mlxd.__version__),
            protocol=rpc.PROTOCOL_VERSION,
            model=self.model_info(),
            capabilities=rpc.Capabilities(
                methods=sorted(self.server.handlers),
                framing=["ndjson", "lsp", "http"],
                max_frame_bytes=self.config.max_frame_bytes,
            ),
        )

    async def tokenize(self, params: rpc.TokenizeParams, ctx: RequestContext) -> Any:
        if params.messages is not None and not params.add_generation_prompt:
            tokenizer = self.model.tokenizer
            chat = [{"role": m.role, "content": m.content} for m in params.messages]

            def run() -> list[int]:
                text = tokenizer.apply_chat_template(
                    chat, add_generation_prompt=False, tokenize=False
                )
                return list(tokenizer.encode(text, add_special_tokens=False))

            tokens = await anyio.to_thread.run_sync(run)
        else:
            tokens = await self.encode(params.text, params.messages)
        return rpc.TokenizeResult(tokens, len(tokens))

    async def models_current(self, params: rpc.EmptyParams, ctx: RequestContext) -> Any:
        return self.model_info()

    async def status(self, params: rpc.EmptyParams, ctx: RequestContext) -> Any:
        pool, engine = self.pool, self.engine
        waiting = pool.queue_depth + self.slots.waiting + self.sessions.waiting
        # Anonymous entries are a cache any request may evict: they do not make it degraded.
        used = pool.used - self.sessions.anonymous_blocks()
        degraded = used > 0.9 * pool.total or waiting > 0
        if self.state in (State.DRAINING, State.STOPPED):
            state = "draining"
        else:
            state = "degraded" if degraded else "ok"
        ttft, itl = engine.ttft_ms.percentiles(), engine.itl_ms.percentiles()
        # Read now, on the engine thread: freed caches (deleted sessions) show at once. While
        # the engine is busy for long (a model load) the last reading answers instead.
        with anyio.move_on_after(_MEMORY_READ_S):
            self._mlx_memory = await self.on_engine(
                lambda: (mx.get_active_memory(), mx.get_cache_memory())
            )
        active, cached = self._mlx_memory
        return rpc.StatusResult(
            state=state,  # type: ignore[arg-type]
            model=self.model_info(),
            uptime_s=round(time.monotonic() - self.started, 3),
            pool=rpc.PoolStatus(
                pool.block_tokens, pool.total, pool.used, round(pool.utilization, 4)
            ),
            queue=rpc.QueueStatus(waiting, pool.max_queue),
            active=engine.active,
            sessions=self.sessions.tier_status(),
            latency_ms=rpc.LatencyStatus(rpc.Percentiles(*ttft), rpc.Percentiles(*itl)),
            totals=self.totals,
            memory=rpc.MemoryStatus(_rss_bytes(), active, cached),
            connections=self.server.connections,
            details={
                "blas": BLAS,
                "backend": sniffio.current_async_library(),
                "pid": os.getpid(),
                "python": sys.version.split()[0],
                "engine_steps": engine.steps,
                "sessions_spilled": self.sessions.spilled,
                "sessions_restored": self.sessions.restored,
                "sessions_quarantined": self.sessions.quarantined,
                "disk_errors": list(self.sessions.disk_errors),
                "prefix_cache": self.sessions.prefix_status(),
                "socket": str(self.config.socket),
                **({"distributed": distributed.status(engine)} if self.config.distributed else {}),  # type: ignore[arg-type]
            },
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

    async def shutdown(self, params: rpc.ShutdownParams, ctx: RequestContext) -> Any:
        self.shutdown_drain_s = params.drain_timeout_s
        self.shutdown_requested.set()
        return rpc.EmptyResult()

    async def sessions_list(self, params: rpc.EmptyParams, ctx: RequestContext) -> Any:
        infos = [
            s.info()
            for s in self.sessions.sessions.values()
            if (s.token_count or s.turn.busy) and not s.anonymous
        ]
        return rpc.SessionsListResult(sorted(infos, key=lambda i: i.session))

    async def sessions_get(self, params: rpc.SessionParams, ctx: RequestContext) -> Any:
        return self.sessions.get(params.session).info()

    async def sessions_delete(self, params: rpc.SessionParams, ctx: RequestContext) -> Any:
        return rpc.SessionsDeleteResult(await self.sessions.delete(params.session))

    async def sessions_fork(self, params: rpc.SessionForkParams, ctx: RequestContext) -> Any:
        return (await self.sessions.fork(params.session, params.new_session)).info()

    async def sessions_save(self, params: rpc.SessionSaveParams, ctx: RequestContext) -> Any:
        if params.session is None:
            return rpc.SessionSaveResult(await self.sessions.save_all())
        return rpc.SessionSaveResult(int(await self.sessions.save(params.session)))
