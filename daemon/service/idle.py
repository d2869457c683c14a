"""Idle exit: return once nothing has been in flight for a while, fed by the server's events."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

import anyio

__all__ = ["IdleWatcher", "add_activation_options", "parse_duration"]

_DURATION_RE = re.compile(r"(?i)\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|)\s*")
_SECONDS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """'15m', '900s', '2', '1.5h', '500ms' -> seconds (a positive number)."""
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (try 15m, 900s or 2h)")
    seconds = float(match[1]) * _SECONDS[match[2].lower()]
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {text!r}")
    return seconds


class IdleWatcher:
    """`wait()` returns after `timeout_s` with `busy()` false throughout.

    `activity()` is called on every request start and end (and connection open and close):
    it restarts the clock, so the idle time counts from the last request's end.
    """

    def __init__(self, timeout_s: float, busy: Callable[[], bool]) -> None:
        self.timeout_s = timeout_s
        self.busy = busy
        self.last = time.monotonic()
        self._changed = anyio.Event()

    def activity(self) -> None:
        self.last = time.monotonic()
        self._changed.set()

    async def wait(self) -> None:
        while True:
            self._changed = anyio.Event()
            if self.busy():
                await self._changed.wait()
                continue
            remaining = self.last + self.timeout_s - time.monotonic()
            with anyio.move_on_after(remaining):
                await self._changed.wait()
                continue
            if not self.busy():
                return


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_activation_options(serve: argparse.ArgumentParser) -> None:
    """`mlxd serve` options for running on demand under launchd or systemd."""
    serve.add_argument(
        "--idle-exit",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="save every session and exit 0 after this long with no request in flight, "
        "e.g. 15m (default: never; the installed on-demand service passes 15m)",
    )
    serve.add_argument(
        "--idle-exit-keep-connections",
        action="store_true",
        help="an open connection, even with nothing in flight, keeps the daemon alive",
    )
    serve.add_argument(
        "--activation-socket",
        metavar="NAME",
        help="the plist's Sockets key to take from launchd (macOS); on Linux a socket "
        "passed by systemd (LISTEN_FDS) is used whether or not this names it",
    )
