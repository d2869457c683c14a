"""The JSON-RPC method handlers (but `generate`, `status` and the swap) and the method table."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import mlxd
from mlxd import rpc

from ..transport.server import Handler, RequestContext
from .generation import generate
from .status import status

if TYPE_CHECKING:
    from .service import Daemon

__all__ = ["methods"]


def methods(daemon: Daemon) -> dict[str, Handler]:
    """The method table the daemon's RpcServer serves: method name -> handler."""
    bound: dict[str, Callable[..., Awaitable[Any]]] = {
        "initialize": initialize,
        "generate": generate,
        "tokenize": tokenize,
        "models/current": models_current,
        "status": status,
        "shutdown": shutdown,
        "sessions/list": sessions_list,
        "sessions/get": sessions_get,
        "sessions/delete": sessions_delete,
        "sessions/fork": sessions_fork,
        "sessions/save": sessions_save,
    }
    table: dict[str, Handler] = {name: functools.partial(fn, daemon) for name, fn in bound.items()}
    table["models/swap"] = daemon.models_swap
    return table


async def initialize(daemon: Daemon, params: rpc.InitializeParams, ctx: RequestContext) -> Any:
    if params.client is not None:
        ctx.summary["client"] = f"{params.client.name}/{params.client.version}"
    return rpc.InitializeResult(
        server=rpc.ServerInfo("mlxd", mlxd.__version__),
        protocol=rpc.PROTOCOL_VERSION,
        model=daemon.model_info(),
        capabilities=rpc.Capabilities(
            methods=sorted(daemon.server.handlers),
            framing=["ndjson", "lsp", "http"],
            max_frame_bytes=daemon.config.max_frame_bytes,
        ),
    )


async def tokenize(daemon: Daemon, params: rpc.TokenizeParams, ctx: RequestContext) -> Any:
    tokens = await daemon.encode(params.text, params.messages, params.add_generation_prompt)
    return rpc.TokenizeResult(tokens, len(tokens))


async def models_current(daemon: Daemon, params: rpc.EmptyParams, ctx: RequestContext) -> Any:
    return daemon.model_info()


async def shutdown(daemon: Daemon, params: rpc.ShutdownParams, ctx: RequestContext) -> Any:
    daemon.shutdown_drain_s = params.drain_timeout_s
    daemon.shutdown_requested.set()
    return rpc.EmptyResult()


async def sessions_list(daemon: Daemon, params: rpc.EmptyParams, ctx: RequestContext) -> Any:
    infos = [
        s.info()
        for s in daemon.sessions.sessions.values()
        if (s.token_count or s.turn.busy) and not s.anonymous
    ]
    return rpc.SessionsListResult(sorted(infos, key=lambda i: i.session))


async def sessions_get(daemon: Daemon, params: rpc.SessionParams, ctx: RequestContext) -> Any:
    return daemon.sessions.get(params.session).info()


async def sessions_delete(daemon: Daemon, params: rpc.SessionParams, ctx: RequestContext) -> Any:
    return rpc.SessionsDeleteResult(await daemon.sessions.delete(params.session))


async def sessions_fork(daemon: Daemon, params: rpc.SessionForkParams, ctx: RequestContext) -> Any:
    return (await daemon.sessions.fork(params.session, params.new_session)).info()


async def sessions_save(daemon: Daemon, params: rpc.SessionSaveParams, ctx: RequestContext) -> Any:
    if params.session is None:
        return rpc.SessionSaveResult(await daemon.sessions.save_all())
    return rpc.SessionSaveResult(int(await daemon.sessions.save(params.session)))
