"""Socket listeners: the private Unix socket, the accept loop, peer checks, and stdio."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream, TaskGroup

from mlxd.rpc import check_socket_path

from ..config import Config
from .activation import inherited_socket

__all__ = [
    "AlreadyRunning",
    "SocketSetupError",
    "StdioStream",
    "listening_socket",
    "peer_uid",
    "prepare_socket",
    "serve_listener",
    "serve_own_user",
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


async def serve_own_user(
    serve: Callable[[SocketStream], Awaitable[None]], stream: SocketStream
) -> None:
    """Serve a connection with `serve` if its peer is this user (the socket is private)."""
    uid = peer_uid(stream)
    if uid is not None and uid != os.getuid():
        log.warning("refused a connection from another user", peer_uid=uid)
        await stream.aclose()
        return
    try:
        await serve(stream)
    except Exception:  # one connection's bug must not stop the daemon serving the others
        log.exception("connection failed")


async def serve_listener(
    listener: SocketListener,
    tg: TaskGroup,
    handle: Callable[[SocketStream], Coroutine[Any, Any, None]],
) -> None:
    """Accept connections forever, each handled in its own task of `tg`."""
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


def listening_socket(config: Config) -> contextlib.AbstractContextManager[socket.socket]:
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
