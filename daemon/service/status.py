"""The `status` method: the daemon's health, load, memory and latency in one report."""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

import anyio
import mlx.core as mx
import sniffio

from mlxd import rpc

from .. import BLAS
from ..transport.server import RequestContext
from . import distributed
from .service import Daemon, State

__all__ = ["status"]

_MEMORY_READ_S = 1.0


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # macOS: the peak is the best the stdlib offers
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def status(daemon: Daemon, params: rpc.EmptyParams, ctx: RequestContext) -> Any:
    pool, engine = daemon.pool, daemon.engine
    waiting = pool.queue_depth + daemon.slots.waiting + daemon.sessions.waiting
    # Anonymous entries are a cache any request may evict: they do not make it degraded.
    used = pool.used - daemon.sessions.anonymous_blocks()
    degraded = used > 0.9 * pool.total or waiting > 0
    if daemon.state in (State.DRAINING, State.STOPPED):
        state = "draining"
    else:
        state = "degraded" if degraded else "ok"
    ttft, itl = engine.ttft_ms.percentiles(), engine.itl_ms.percentiles()
    # Read now, on the engine thread: freed caches (deleted sessions) show at once. While
    # the engine is busy for long (a model load) the last reading answers instead.
    with anyio.move_on_after(_MEMORY_READ_S):
        daemon.mlx_memory = await daemon.on_engine(
            lambda: (mx.get_active_memory(), mx.get_cache_memory())
        )
    active, cached = daemon.mlx_memory
    return rpc.StatusResult(
        state=state,  # type: ignore[arg-type]
        model=daemon.model_info(),
        uptime_s=round(time.monotonic() - daemon.started, 3),
        pool=rpc.PoolStatus(pool.block_tokens, pool.total, pool.used, round(pool.utilization, 4)),
        queue=rpc.QueueStatus(waiting, pool.max_queue),
        active=engine.active,
        sessions=daemon.sessions.tier_status(),
        latency_ms=rpc.LatencyStatus(rpc.Percentiles(*ttft), rpc.Percentiles(*itl)),
        totals=daemon.totals,
        memory=rpc.MemoryStatus(_rss_bytes(), active, cached),
        connections=daemon.server.connections,
        details={
            "blas": BLAS,
            "backend": sniffio.current_async_library(),
            "pid": os.getpid(),
            "python": sys.version.split()[0],
            "engine_steps": engine.steps,
            "sessions_spilled": daemon.sessions.spilled,
            "sessions_restored": daemon.sessions.restored,
            "sessions_quarantined": daemon.sessions.quarantined,
            "disk_errors": list(daemon.sessions.disk_errors),
            "prefix_cache": daemon.sessions.prefix_status(),
            "socket": str(daemon.config.socket),
            **({"distributed": distributed.status(engine)} if daemon.config.distributed else {}),  # type: ignore[arg-type]
        },
    )
