"""The KV block pool: admission by blocks of tokens, a bounded FIFO queue, busy refusals.

A request reserves ceil((prompt + max_tokens) / block_tokens) blocks; a hot session holds
the blocks of its cached tokens. A request that does not fit first asks `make_room`
(which spills idle sessions to disk), then waits in a bounded FIFO queue; a full queue
is refused at once with ServerBusy, and a request larger than the whole pool with
ContextTooLong. When blocks come back and the head of the queue still does not fit, it
asks `make_room` again: sessions that went idle since may hold the rest. Nothing waits
forever without being counted.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from mlxd import rpc

__all__ = ["BlockPool", "Reservation"]


@dataclass(eq=False)
class Reservation:
    """Blocks taken from a pool. They go back exactly once (`release`, `shrink`), or pass
    whole to another reservation (`absorb`): the pool's `used` is always the sum of the
    live reservations' blocks."""

    blocks: int
    pool: BlockPool
    released: bool = False

    def __post_init__(self) -> None:
        self.pool.live.add(self)

    def release(self) -> None:
        if not self.released:
            blocks, self.blocks, self.released = self.blocks, 0, True
            self.pool.live.discard(self)
            self.pool._give_back(blocks)

    def absorb(self, other: Reservation) -> None:
        """Take over `other`'s blocks; `other` ends released, holding none."""
        if other is self:
            return
        assert other.pool is self.pool and not self.released and not other.released
        self.blocks += other.blocks
        other.blocks, other.released = 0, True
        self.pool.live.discard(other)

    def shrink(self, blocks: int) -> None:
        """Keep at most `blocks` (a session keeping what its cache occupies); give back the rest."""
        excess = self.blocks - max(0, blocks)
        if excess > 0 and not self.released:
            self.blocks -= excess
            self.pool._give_back(excess)

    def grow(self, blocks: int) -> bool:
        """Reach `blocks` from the pool's free blocks, without waiting; False if they are not free."""
        if blocks <= self.blocks:
            return True
        extra = self.pool.try_reserve(blocks - self.blocks)
        if extra is None or self.released:
            if extra is not None:
                extra.release()
            return False
        self.absorb(extra)
        return True


@dataclass(eq=False)
class _Waiter:
    blocks: int
    event: anyio.Event  # set when granted, or when blocks came back but not enough
    granted: bool = False
    making_room: bool = False  # spilling for itself: not granted meanwhile, nor nudged


class BlockPool:
    def __init__(self, total_blocks: int, block_tokens: int = 256, max_queue: int = 64) -> None:
        self.total = max(1, total_blocks)
        self.block_tokens = block_tokens
        self.max_queue = max_queue
        self.used = 0  # always the sum of the live reservations' blocks
        self.live: set[Reservation] = set()
        self._queue: deque[_Waiter] = deque()
        self.mean_hold_s = 0.5  # running estimate, for retry_after_ms

    def blocks_for(self, tokens: int) -> int:
        return max(1, math.ceil(tokens / self.block_tokens))

    @property
    def free(self) -> int:
        return self.total - self.used

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def utilization(self) -> float:
        return self.used / self.total

    def try_reserve(self, blocks: int) -> Reservation | None:
        if blocks <= self.free and not self._queue:
            self.used += blocks
            return Reservation(blocks, self)
        return None

    async def reserve(
        self,
        tokens: int,
        make_room: Callable[[int], Awaitable[None]] | None = None,
        held: Reservation | None = None,
    ) -> Reservation:
        """Blocks for `tokens`, or ServerBusy / ContextTooLong at once.

        `held` (a session's blocks, about to become part of this request) counts toward
        the need and is absorbed into the result; on an error it is left as it was.
        """
        blocks = self.blocks_for(tokens)
        if blocks > self.total:
            raise rpc.RpcError(
                rpc.ErrorCode.CONTEXT_TOO_LONG,
                f"request needs {blocks} blocks of {self.block_tokens} tokens; "
                f"the whole pool has {self.total}",
                {"limit": self.total * self.block_tokens, "requested": tokens},
            )
        if held is None:
            return await self._reserve_blocks(blocks, make_room)
        extra = await self._reserve_blocks(max(0, blocks - held.blocks), make_room)
        held.absorb(extra)
        held.shrink(blocks)
        return held

    async def _reserve_blocks(
        self, blocks: int, make_room: Callable[[int], Awaitable[None]] | None
    ) -> Reservation:
        if blocks == 0:
            return Reservation(0, self)  # live, holding nothing: absorbed or released later
        reservation = self.try_reserve(blocks)
        if reservation is None and make_room is not None and not self._queue:
            await make_room(blocks)
            reservation = self.try_reserve(blocks)
        if reservation is not None:
            return reservation
        return await self._wait(blocks, make_room)

    async def _wait(
        self, blocks: int, make_room: Callable[[int], Awaitable[None]] | None
    ) -> Reservation:
        if len(self._queue) >= self.max_queue:
            raise rpc.RpcError(
                rpc.ErrorCode.SERVER_BUSY,
                f"server busy: {len(self._queue)} requests queued (limit {self.max_queue})",
                {"retry_after_ms": self.retry_after_ms(), "queue_depth": len(self._queue)},
            )
        waiter = _Waiter(blocks, anyio.Event())
        self._queue.append(waiter)
        try:
            while not waiter.granted:
                await waiter.event.wait()
                waiter.event = anyio.Event()
                if waiter.granted or make_room is None:
                    continue
                # At the head, still short: spill the sessions that went idle meanwhile.
                waiter.making_room = True
                try:
                    await make_room(blocks)
                finally:
                    waiter.making_room = False
                self._grant()  # not _wake: a nudge to itself would spin
        except BaseException:
            if waiter.granted:
                self._give_back(blocks)  # granted while being cancelled
            else:
                self._queue.remove(waiter)
                self._wake()  # a smaller request behind us may fit now
            raise
        return Reservation(blocks, self)

    def retry_after_ms(self) -> int:
        return int(max(50, self.mean_hold_s * 1000 * max(1, len(self._queue)) / 4))

    def _give_back(self, blocks: int) -> None:
        assert 0 <= blocks <= self.used, (blocks, self.used)  # a double count is a bug, not noise
        self.used -= blocks
        self._wake()

    def nudge(self) -> None:
        """A session went idle holding blocks: the queue's head may spill it to fit."""
        self._wake()

    def _wake(self) -> None:
        self._grant()
        if self._queue and not self._queue[0].making_room:
            self._queue[0].event.set()  # blocks came back, not enough: it may make room

    def _grant(self) -> None:
        # Strict FIFO: the head waits until it fits; nobody jumps the queue. A head making
        # room is granted when it is done, so that it does not spill more than it needs.
        while self._queue and not self._queue[0].making_room:
            waiter = self._queue[0]
            if waiter.blocks > self.free:
                return
            self._queue.popleft()
            self.used += waiter.blocks
            waiter.granted = True
            waiter.event.set()
