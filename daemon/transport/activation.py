"""A listening socket handed over by the service manager: systemd's LISTEN_FDS, launchd's Sockets."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

__all__ = [
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "inherited_socket",
    "launchd_sockets",
    "systemd_sockets",
]

log = structlog.get_logger("mlxd")

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start here, in order
_SYSTEMD_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# int launch_activate_socket(const char *name, int **fds, size_t *cnt), from <launch.h>.
LaunchActivate = Callable[[bytes, Any, Any], int]
_ACTIVATE_PROTO = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.POINTER(ctypes.c_int)),
    ctypes.POINTER(ctypes.c_size_t),
)


class ActivationError(RuntimeError):
    """The service manager's hand-over is malformed or unusable; the message says how."""


def systemd_sockets(environ: MutableMapping[str, str] | None = None) -> list[tuple[str, int]]:
    """(name, fd) for each descriptor systemd passed to this process, as sd_listen_fds_with_names.

    The variables are removed either way, so processes started later do not claim the
    descriptors; each one is made close-on-exec for the same reason.
    """
    env = os.environ if environ is None else environ
    pid, count, names = (env.pop(name, None) for name in _SYSTEMD_VARS)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []  # meant for a parent that exec'd us without clearing them
        n = int(count)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={pid!r} LISTEN_FDS={count!r} are not numbers") from None
    if n < 0:
        raise ActivationError(f"LISTEN_FDS={count!r} is negative")
    labels = names.split(":") if names else []
    labels += ["unknown"] * (n - len(labels))  # systemd's name for an unnamed descriptor
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n))
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as exc:
            raise ActivationError(f"LISTEN_FDS={n} but descriptor {fd} is not open") from exc
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return list(zip(labels, fds, strict=False))


def _libsystem() -> tuple[LaunchActivate, Callable[[Any], None]]:
    lib = ctypes.CDLL("/usr/lib/libSystem.B.dylib", use_errno=True)
    free = lib.free
    free.argtypes, free.restype = [ctypes.c_void_p], None
    return _ACTIVATE_PROTO(("launch_activate_socket", lib)), free


def launchd_sockets(
    name: str,
    *,
    activate: LaunchActivate | None = None,
    free: Callable[[Any], None] | None = None,
) -> list[int]:
    """The descriptors launchd holds for the plist's Sockets entry `name`; [] if launchd did
    not start this process. `activate`/`free` default to libSystem's (tests inject fakes)."""
    if activate is None or free is None:
        activate, free = _libsystem()
    fds = ctypes.POINTER(ctypes.c_int)()
    count = ctypes.c_size_t(0)
    err = activate(name.encode(), ctypes.byref(fds), ctypes.byref(count))
    if err == errno.ESRCH:
        return []  # not a launchd job: started by hand
    if err:
        hint = " (no such key under Sockets in the plist)" if err == errno.ENOENT else ""
        raise ActivationError(f"launch_activate_socket({name!r}) failed: {os.strerror(err)}{hint}")
    try:
        return [int(fds[i]) for i in range(count.value)]
    finally:
        if fds:
            free(fds)  # launchd's array is malloc'd and ours to free


def _listening_unix_socket(fd: int) -> socket.socket:
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ActivationError(f"descriptor {fd} from the service manager is not a socket")
    sock = socket.socket(fileno=fd)
    listening = sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_ACCEPTCONN", 0x2))
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ActivationError(
            f"descriptor {fd} is not a listening Unix stream socket "
            "(use ListenStream=/path or SockType stream with SockPathName)"
        )
    sock.set_inheritable(False)
    return sock


def inherited_socket(name: str | None = None) -> socket.socket | None:
    """The listening Unix socket the service manager passed, or None to bind our own.

    Linux: LISTEN_FDS (the one named `name` in LISTEN_FDNAMES when several are passed);
    macOS: launch_activate_socket(`name`), only when a name is given.
    """
    if sys.platform == "darwin":
        fds = launchd_sockets(name) if name else []
    else:
        passed = systemd_sockets()
        chosen = [fd for label, fd in passed if label == name] if name and len(passed) > 1 else []
        fds = chosen or [fd for _, fd in passed]
    if not fds:
        return None
    if len(fds) > 1:
        log.warning("several sockets passed; serving the first", fds=fds)
    return _listening_unix_socket(fds[0])
