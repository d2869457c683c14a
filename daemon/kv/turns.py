"""FIFO turns: a session's requests run one at a time, in order of arrival; the engine's
compute slots (`--max-batch`) are handed out the same way.

Unlike a lock, a turn can be passed on from any code on the event loop: a generate hands
its turn to the engine's outcome callback, so a request whose client vanished still
records its session's cache before the next turn starts.
"""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["Turn"]


class Turn:
    def __init__(self, slots: int = 1) -> None:
        self.free = slots
        self._waiters: deque[anyio.Event] = deque()

    @property
    def busy(self) -> bool:
        return self.free == 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """The turn if it is free and nobody waits for it, without waiting."""
        if self.free and not self._waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # handed the turn while leaving: pass it on
            else:
                self._waiters.remove(event)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # ownership passes straight to the next waiter
        else:
            self.free += 1
