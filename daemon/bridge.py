"""Engine thread → event loop: post callables without blocking the engine.

The engine never waits for the loop: callables are queued and one drain is scheduled with
the backend's thread-safe `run_sync_soon` (FIFO on asyncio and trio), so order is kept.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
from anyio.lowlevel import current_token

__all__ = ["LoopBridge"]

log = logging.getLogger(__name__)


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
            self._token.backend_class.run_sync_soon(self._drain, (), self._token.native_token)

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
