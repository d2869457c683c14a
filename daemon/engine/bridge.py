"""Engine thread → event loop: post callables without blocking the engine.

The engine never waits for the loop: callables are queued and one drain is scheduled on
the loop (FIFO on asyncio and trio), so order is kept.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from anyio.lowlevel import EventLoopToken, current_token

__all__ = ["LoopBridge"]

log = logging.getLogger(__name__)


def _call_soon(token: EventLoopToken, fn: Callable[[], object]) -> None:
    """Schedule `fn` on the loop of `token` from any thread, without waiting for it.

    anyio (4.11+) has no public non-blocking form: `from_thread.run_sync(..., token=...)`
    waits for the result, which would make the engine wait for the loop. This is the
    backend hook anyio's own BlockingPortal uses (asyncio `call_soon_threadsafe`, trio
    `TrioToken.run_sync_soon`); it is the one internal the daemon relies on.
    """
    token.backend_class.run_sync_soon(fn, (), token.native_token)


class LoopBridge:
    """Create on the event loop; call `post` from any thread."""

    def __init__(self) -> None:
        self._token = current_token()
        self._pending: deque[Callable[[], Any]] = deque()
        self._scheduled = False

    def post(self, fn: Callable[[], Any]) -> None:
        self._pending.append(fn)
        if self._scheduled:
            return
        self._scheduled = True  # a race here only costs one extra, empty drain
        # If the loop is gone there is nobody left to deliver to.
        with contextlib.suppress(anyio.RunFinishedError):
            _call_soon(self._token, self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        while self._pending:
            fn = self._pending.popleft()
            try:
                fn()
            except Exception:
                log.exception("callback from the engine failed")

    async def run(self, fn: Callable[[], Any], submit: Callable[..., None]) -> Any:
        """Run `fn` on the engine thread through `submit(fn, done)` and await its result."""
        done = anyio.Event()
        box: list[Any] = []

        def finished(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                box[:] = [result, error]
                done.set()

            self.post(settle)

        submit(fn, finished)
        await done.wait()
        result, error = box
        if error is not None:
            raise error
        return result
