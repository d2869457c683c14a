"""`mlxd serve --distributed`: the group, the model's tensor-parallel shard, and the ranks' roles.

Run under `mlx.launch`: every rank loads its shard (models/sharding.py); rank 0 is
the daemon (socket, admission, sessions, HTTP) and its engine drives the others in
lockstep (`lockstep.py`); every other rank only replays rank 0's plans, its share of every
session's KV cache included (kv/sharded.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
import structlog

from mlxd import rpc

if TYPE_CHECKING:
    from ..config import Config
    from ..engine.lockstep import LockstepEngine

__all__ = [
    "DistributedError",
    "attach",
    "group",
    "init_group",
    "make_engine",
    "run_follower",
    "shard_name",
]

log = structlog.get_logger("mlxd.distributed")

_state: dict[str, Any] = {}


class DistributedError(Exception):
    """The group cannot be formed or goes away; the message is the one line printed."""


def init_group() -> Any:
    """The group mlx.launch set up (its environment names the ranks); an error when alone."""
    try:
        g = mx.distributed.init(strict=True)
    except RuntimeError as exc:
        raise DistributedError(
            f"--distributed needs a group: run it under mlx.launch ({exc})"
        ) from None
    if g.size() < 2:
        raise DistributedError("--distributed needs at least 2 ranks: run it under mlx.launch -n 2")
    pids = mx.distributed.all_gather(mx.array([os.getpid()], mx.int32), group=g)
    _state.update(group=g, pids=[int(p) for p in np.array(pids)])
    return g


def group() -> Any:
    return _state["group"]


def run_follower(config: Config) -> int:
    """Any rank but 0: load the shard, replay rank 0's plans; 0 once rank 0 says exit."""
    from ..engine.engine import PREFILL_BATCH
    from ..engine.lockstep import Channel, GroupLost, follow
    from ..kv.sessions import ModelShape
    from ..kv.sharded import Twins
    from ..models.model import ModelLoadError, load_model

    g = group()
    # A stop is rank 0's to make (it drains and persists, then tells every rank): here a
    # signal only says so, a second one leaves at once.
    signals = {"n": 0}

    def on_signal(signum: int, frame: Any) -> None:
        signals["n"] += 1
        if signals["n"] > 1:
            os._exit(1)
        log.info("signal: waiting for rank 0 to end the group", rank=g.rank(), signal=signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        loaded = load_model(config.model, config.cache_dir, config.weights, group=g)
    except ModelLoadError as exc:
        print(f"mlxd: {exc}", file=sys.stderr, flush=True)
        return 1
    log.info("rank ready", rank=g.rank(), size=g.size(), fingerprint=loaded.fingerprint[:16])
    shape = ModelShape.of(loaded, shard_name(g))
    twins = Twins(config.state_dir, shape, g.rank(), config.disk_budget_bytes)
    channel = Channel(g)
    _watch_rank0(channel, config.rank_timeout_s)
    try:
        rank0_caches = follow(
            channel,
            loaded.model,
            loaded.tokenizer,
            twins,
            max_batch=config.max_batch,
            prefill_batch=PREFILL_BATCH,
            prefill_step_size=config.prefill_step_size,
        )
    except GroupLost as exc:
        print(f"mlxd: rank {g.rank()}: {exc}", file=sys.stderr, flush=True)
        return 1
    twins_left = len(twins.caches)
    # As many as rank 0's: a twin left over would be memory this rank never gets back.
    (log.info if twins_left == rank0_caches else log.warning)(
        "rank stopped", rank=g.rank(), twins=twins_left, rank0_caches=rank0_caches
    )
    return 0


def _watch_rank0(channel: Any, timeout_s: float) -> None:
    """Exit 1 when no plan comes for `timeout_s`: rank 0 sends one every second even when
    idle, and a collective whose peer died can block for good instead of failing."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            silent = time.monotonic() - channel.received_at
            if silent > timeout_s:
                print(
                    f"mlxd: rank {channel.rank}: no plan from rank 0 for {silent:.0f} s "
                    "(rank 0 died or hangs); every rank must be restarted",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=watch, name="mlxd-rank0-watch", daemon=True).start()


# `daemon` is service.Daemon, untyped here: service.py imports this module.
def make_engine(daemon: Any) -> LockstepEngine:
    """Rank 0's engine; a lost group fails every request and ends the daemon (non-zero)."""
    from ..engine.lockstep import Channel, LockstepEngine

    def on_lost(error: Exception) -> None:  # engine thread
        daemon.bridge.post(daemon.shutdown_requested.set)

    return LockstepEngine(
        daemon._emit,
        Channel(group()),
        on_lost,
        rank_timeout_s=daemon.config.rank_timeout_s,
        prefill_step_size=daemon.config.prefill_step_size,
        max_batch=daemon.config.max_batch,
    )


def shard_name(g: Any) -> str:
    """The shard a rank's session files hold (cachefile's `shard`)."""
    return f"tensor {g.rank()}/{g.size()}"


def attach(daemon: Any) -> None:
    """What rank 0 serves differently: no model swap (every rank would have to load)."""
    handlers = daemon.server.handlers

    async def refuse_swap(params: Any, ctx: Any) -> Any:
        raise rpc.RpcError(
            rpc.ErrorCode.INVALID_PARAMS,
            "models/swap is not available under --distributed: restart the group with --model",
        )

    handlers["models/swap"] = refuse_swap


def status(engine: LockstepEngine) -> dict[str, Any]:
    """status details.distributed: the group and what rank 0's plans cost on the wire."""
    channel = engine.channel
    return {
        "world_size": channel.size,
        "rank": channel.rank,
        "pids": list(_state.get("pids", [])),
        "sharding": "tensor",
        "plans_sent": channel.sends,
        "plan_bytes_sent": channel.sent_bytes,
        "plan_send_ms": round(channel.send_s * 1000, 3),
        "lost": str(engine.lost) if engine.lost is not None else None,
    }
