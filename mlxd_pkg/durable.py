"""Durable atomic writes: a file or folder appears whole at its path after a crash, or not at all."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "TEMP_SUFFIX",
    "fsync_dir",
    "full_fsync",
    "publish_folder",
    "temp_name",
    "write_all",
    "write_atomic",
]

TEMP_SUFFIX = ".tmp"  # every temp file or folder ends so: a start-up sweep can find leftovers
_WRITE_CHUNK = 8 * 1024 * 1024  # os.write may write less than asked; large writes go in pieces


def full_fsync(fd: int) -> None:
    """Flush `fd` to the drive itself."""
    # On macOS fsync() only reaches the drive's cache; F_FULLFSYNC asks it to flush.
    # Some filesystems (network, FAT) reject it; plain fsync is the best they offer.
    if hasattr(fcntl, "F_FULLFSYNC"):
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        full_fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a folder; the rename is as durable as they allow.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A fresh hidden name beside `path` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    if not view.nbytes:  # (cast refuses a view with a zero in its shape)
        return
    view = view.cast("B")  # slices below count bytes, whatever the items are
    while view:
        written = os.write(fd, view[:_WRITE_CHUNK])
        view = view[written:]


def write_atomic(
    path: Path,
    data: bytes | Sequence[bytes | memoryview],
    *,
    mode: int = 0o600,
    exclusive: bool = False,
    before_write: Callable[[int, Path], None] | None = None,
) -> None:
    """Write `data` (bytes, or pieces written one after another) to `path`: temp file,
    write, fsync, rename, fsync the folder.

    The temp file has `mode` from creation (0600 by default: never readable by others,
    not even for a moment). On any error it is removed and the old file at `path` is
    untouched. `exclusive`: never replace a file at `path` (FileExistsError instead).
    `before_write(fd, temp)` runs first (a test seam for injected faults).
    """
    path = Path(path)
    tmp = temp_name(path)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; `mode` is what is asked
            if before_write is not None:
                before_write(fd, tmp)
            for piece in [data] if isinstance(data, bytes) else data:
                write_all(fd, piece)
            full_fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)  # atomic, and fails where a file already is
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def publish_folder(tmp: Path, target: Path, complete: Callable[[Path], bool]) -> None:
    """Rename the filled folder `tmp` to `target`, durably; `tmp` is gone afterwards.

    Every file in it is flushed before the rename, so a published folder is whole. When
    another process published `target` first (`complete(target)` holds), theirs stays.
    """
    try:
        for f in tmp.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                full_fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(target.parent)
