"""Running the daemon: listeners started, signals watched, idle exit, and a bounded drain.

SIGTERM (launchd's stop) or the `shutdown` method: stop accepting, refuse new requests
with ShuttingDown, let in-flight requests finish until the drain deadline, cancel the rest
with a reply, persist every hot session in a shielded scope, remove the socket, exit 0.
A second signal exits at once.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import (
    SocketListener,
    SocketStream,
    TaskGroup,
    TaskStatus,
)

from ..config import Config
from ..transport.listeners import (
    StdioStream,
    listening_socket,
    serve_listener,
    serve_own_user,
)
from .handlers import methods
from .idle import IdleWatcher
from .service import Daemon, State

__all__ = ["run_daemon", "run_stdio"]

log = structlog.get_logger("mlxd")


async def _watch_signals(
    daemon: Daemon, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    # SIGHUP too: `mlxd serve &` in a terminal that closes must drain and save, not vanish.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if daemon.shutdown_requested.is_set():
                log.warning("second signal: exiting now", signal=name)
                os._exit(128 + signum)
            if daemon.state is State.LOADING:
                log.info("signal during model load: stopping", signal=name)
            else:
                log.info("signal: draining", signal=name)
            daemon.shutdown_requested.set()


async def _start(daemon: Daemon) -> bool:
    """Load the model; False if a signal asked to stop first (nothing to drain or save)."""
    error: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def load() -> None:
            try:
                await daemon.start()
            except Exception as exc:  # raised below as itself, not in the group's group
                error.append(exc)
            finally:
                tg.cancel_scope.cancel()

        tg.start_soon(load)
        await daemon.shutdown_requested.wait()
        tg.cancel_scope.cancel()
    if error:
        raise error[0]
    return daemon.state is not State.LOADING


async def _run(daemon: Daemon, serve: Callable[[TaskGroup], Awaitable[None]]) -> None:
    """Serve until drained (below), then close the daemon, whatever happened."""
    try:
        await _serve_until_drained(daemon, serve)
    finally:
        with anyio.CancelScope(shield=True):
            await daemon.close()
        log.info("stopped")


async def _serve_until_drained(
    daemon: Daemon, serve: Callable[[TaskGroup], Awaitable[None]]
) -> None:
    """Watch signals, load the model, `serve` (start the listener tasks in the group) until
    asked to stop, then drain. The daemon still accepts while draining: a new client gets
    ShuttingDown, not a hang."""
    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        await tg.start(_watch_signals, daemon)
        try:
            if await _start(daemon):
                await serve(tg)
                await daemon.shutdown_requested.wait()
                timeout = daemon.shutdown_drain_s  # from `shutdown`, else the configured one
                await daemon.drain(daemon.config.drain_timeout_s if timeout is None else timeout)
        except Exception as exc:  # raised as itself below, not inside the group's group
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _exit_when_idle(daemon: Daemon, watcher: IdleWatcher) -> None:
    await watcher.wait()
    log.info("idle: exiting", idle_exit_s=watcher.timeout_s)
    daemon.enter(State.DRAINING)  # from now on a request is refused (retry), not cut short
    daemon.shutdown_requested.set()


def _watch_idle(daemon: Daemon, tg: TaskGroup) -> None:
    config, server = daemon.config, daemon.server
    if config.idle_exit_s is None:
        return
    keep = config.idle_exit_keep_connections
    watcher = IdleWatcher(
        config.idle_exit_s, lambda: bool(server.inflight or (keep and server.connections))
    )
    server.on_activity = watcher.activity
    tg.start_soon(_exit_when_idle, daemon, watcher)


def _daemon(config: Config) -> Daemon:
    daemon = Daemon(config)
    daemon.server.handlers.update(methods(daemon))
    return daemon


async def run_daemon(
    config: Config, *, task_status: TaskStatus[Path] = anyio.TASK_STATUS_IGNORED
) -> None:
    config.validate()
    daemon = _daemon(config)
    with listening_socket(config) as sock:

        async def serve(tg: TaskGroup) -> None:
            # The listener owns a duplicate: prepare_socket closes and unlinks the original.
            listener = await SocketListener.from_socket(sock.dup())

            async def serve_connections(
                listener: SocketListener,
                handle: Callable[[SocketStream], Coroutine[Any, Any, None]],
            ) -> None:
                async with listener:
                    await serve_listener(listener, tg, handle)

            tg.start_soon(
                serve_connections,
                listener,
                functools.partial(serve_own_user, daemon.server.serve_stream),
            )
            if config.http:  # a TCP port too (each address of it); open while draining too
                tcp = await daemon.http.listen()
                for one in getattr(tcp, "listeners", [tcp]):
                    tg.start_soon(serve_connections, one, daemon.http.serve_tcp)
            _watch_idle(daemon, tg)
            log.info("serving", socket=str(config.socket), pid=os.getpid())
            task_status.started(config.socket)

        await _run(daemon, serve)


async def run_stdio(config: Config) -> None:
    """Serve one peer on stdin/stdout (an editor that spawns its sidecar); exit at its EOF."""
    config.validate()
    daemon = _daemon(config)

    async def serve(tg: TaskGroup) -> None:
        async def serve_peer() -> None:
            await daemon.server.serve_stream(StdioStream())
            daemon.shutdown_requested.set()

        tg.start_soon(serve_peer)
        log.info("serving", stdio=True, pid=os.getpid())

    await _run(daemon, serve)
