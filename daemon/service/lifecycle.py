"""Running the daemon: a private socket, one instance, signals, and a bounded drain.

SIGTERM (launchd's stop) or the `shutdown` method: stop accepting, refuse new requests
with ShuttingDown, let in-flight requests finish until the drain deadline, cancel the rest
with a reply, persist every hot session in a shielded scope, remove the socket, exit 0.
A second signal exits at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import signal
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import (
    ByteStream,
    SocketAttribute,
    SocketListener,
    SocketStream,
    TaskGroup,
    TaskStatus,
)

from mlxd.rpc import check_socket_path

from ..config import Config
from ..transport.activation import inherited_socket
from .handlers import methods
from .idle import IdleWatcher
from .service import Daemon, State

__all__ = [
    "AlreadyRunning",
    "SocketSetupError",
    "StdioStream",
    "prepare_socket",
    "run_daemon",
    "run_stdio",
]

log = structlog.get_logger("mlxd")

# accept() fails with these when the process or the system is out of descriptors or memory;
# the listener itself is fine. Like trio's serve_listeners: log, wait a little, go on.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_S = 0.1


class SocketSetupError(RuntimeError):
    """The socket cannot be created safely; the message says why and what to do."""


class AlreadyRunning(SocketSetupError):
    pass


def _private_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if info.st_uid != os.getuid():
        raise SocketSetupError(f"{folder} belongs to uid {info.st_uid}, not to you ({os.getuid()})")
    if info.st_mode & stat.S_ISVTX:
        # A shared folder such as /tmp: making it private would lock every other user out.
        raise SocketSetupError(
            f"{folder} is a shared folder; put the socket in a folder of its own "
            f"(e.g. {folder / f'mlxd-{os.getuid()}' / 'mlxd.sock'})"
        )
    if info.st_mode & 0o077:
        try:
            folder.chmod(0o700)
        except OSError as exc:
            raise SocketSetupError(
                f"{folder} is open to others and cannot be made private: {exc}"
            ) from exc


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def prepare_socket(path: Path) -> Iterator[socket.socket]:
    """A bound, listening, private Unix socket at `path`, owned by this process alone."""
    raw = check_socket_path(path)
    _private_folder(path.parent)
    lock_path = path.with_name(path.name + ".lock")
    lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"another mlxd is already serving {path}") from None
        os.ftruncate(lock_fd, 0)
        os.write(lock_fd, f"{os.getpid()}\n".encode())
        if path.exists() or path.is_symlink():
            if _answers(path):  # held no lock, yet answers: not ours to replace
                raise AlreadyRunning(f"something already answers on {path}")
            log.warning("replacing a stale socket", socket=raw)
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # born 0600: no window where others may connect
        try:
            sock.bind(raw)
        finally:
            os.umask(old_umask)
        sock.listen(128)
        try:
            yield sock
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
    finally:
        os.close(lock_fd)


def peer_uid(stream: SocketStream) -> int | None:
    sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
    try:
        if sys.platform == "darwin":
            # getpeereid(): LOCAL_PEERCRED (0x1) at SOL_LOCAL (0) gives a struct xucred.
            data = sock.getsockopt(0, 0x1, 76)
            return int(struct.unpack_from("=I", data, 4)[0])
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", data)[1])
    except OSError:
        return None


async def _accept(daemon: Daemon, stream: SocketStream) -> None:
    uid = peer_uid(stream)
    if uid is not None and uid != os.getuid():
        log.warning("refused a connection from another user", peer_uid=uid)
        await stream.aclose()
        return
    try:
        await daemon.server.serve_stream(stream)
    except Exception:  # one connection's bug must not stop the daemon serving the others
        log.exception("connection failed")


async def _serve_listener(
    listener: SocketListener,
    tg: TaskGroup,
    handle: Callable[[SocketStream], Coroutine[Any, Any, None]],
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except anyio.BrokenResourceError as exc:
            cause = exc.__cause__
            if not isinstance(cause, OSError) or cause.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            log.error("cannot accept a connection; retrying", error=str(cause))
            await anyio.sleep(_ACCEPT_RETRY_S)
            continue
        tg.start_soon(handle, stream)


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


def _listening_socket(config: Config) -> contextlib.AbstractContextManager[socket.socket]:
    """The service manager's socket if it passed one (it owns the path: no lock, no unlink),
    else our own, created and removed by prepare_socket."""
    inherited = inherited_socket(config.activation_socket)
    if inherited is None:
        return prepare_socket(config.socket)
    name = inherited.getsockname()
    if isinstance(name, str) and name:
        config.socket = Path(name)
    log.info("socket activated", socket=str(config.socket), fd=inherited.fileno())
    return contextlib.closing(inherited)


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
    with _listening_socket(config) as sock:

        async def serve(tg: TaskGroup) -> None:
            # The listener owns a duplicate: prepare_socket closes and unlinks the original.
            listener = await SocketListener.from_socket(sock.dup())

            async def serve_connections(
                listener: SocketListener,
                handle: Callable[[SocketStream], Coroutine[Any, Any, None]],
            ) -> None:
                async with listener:
                    await _serve_listener(listener, tg, handle)

            tg.start_soon(serve_connections, listener, functools.partial(_accept, daemon))
            if config.http:  # a TCP port too (each address of it); open while draining too
                tcp = await daemon.http.listen()
                for one in getattr(tcp, "listeners", [tcp]):
                    tg.start_soon(serve_connections, one, daemon.http.serve_tcp)
            _watch_idle(daemon, tg)
            log.info("serving", socket=str(config.socket), pid=os.getpid())
            task_status.started(config.socket)

        try:
            await _run(daemon, serve)
        finally:
            with anyio.CancelScope(shield=True):
                await daemon.close()
            log.info("stopped")


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

    try:
        await _run(daemon, serve)
    finally:
        with anyio.CancelScope(shield=True):
            await daemon.close()
        log.info("stopped")


class StdioStream(ByteStream):
    """Bytes over file descriptors 0 and 1, non-blocking and awaited on the event loop.

    No worker threads: a read or a write to a peer that stopped reading is cancellable and
    cannot hold the exit. The descriptors' blocking mode is restored on close.
    """

    def __init__(self, read_fd: int = 0, write_fd: int = 1) -> None:
        self._read_fd, self._write_fd = read_fd, write_fd
        self._eof = False
        self._blocking = {fd: os.get_blocking(fd) for fd in (read_fd, write_fd)}
        for fd in self._blocking:
            os.set_blocking(fd, False)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._eof:
            try:
                data = os.read(self._read_fd, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._read_fd)
                continue
            if data:
                return data
            self._eof = True
        raise anyio.EndOfStream

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            try:
                view = view[os.write(self._write_fd, view) :]
            except BlockingIOError:
                await anyio.wait_writable(self._write_fd)

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self._eof = True
        for fd, blocking in self._blocking.items():
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)
