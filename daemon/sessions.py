"""Sessions: KV caches kept warm in memory, spilled to disk under a budget, restored later.

A session holds the tokens its cache covers. A new turn reuses the longest common token
prefix (from memory, else from disk) and prefills only the rest. Hot caches hold blocks
of the pool; when a request does not fit, idle sessions are spilled to disk, least
recently used first. Disk files are keyed by the model's fingerprint and have their own
budget. MLX work (snapshot, restore) runs on the engine thread; file I/O on a writer thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from mlxd import rpc

from . import persistence
from .pool import BlockPool, Reservation
from .turns import Turn

__all__ = ["ModelShape", "Session", "SessionStore", "common_prefix"]

log = structlog.get_logger("mlxd.sessions")
SUFFIX = ".safetensors"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_view(cache: list[Any], n: int) -> list[Any]:
    """New KVCache objects over the same arrays, holding only the first `n` tokens.

    Nothing writes into a session's arrays (the batch merges a copy), so sharing is safe.
    """
    views = []
    for layer in cache:
        view = KVCache()
        view.keys, view.values, view.offset = layer.keys, layer.values, min(n, layer.offset)
        views.append(view)
    return views


@dataclass(frozen=True)
class ModelShape:
    fingerprint: str
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str


@dataclass(eq=False)
class Session:
    id: str
    tokens: list[int] = field(default_factory=list)
    cache: list[Any] | None = None  # hot KV cache covering `tokens`
    reservation: Reservation | None = None
    hot_bytes: int = 0
    disk_tokens: int = 0  # what the file on disk holds (0: no file)
    disk_bytes: int = 0
    dirty: bool = False  # the hot cache differs from the file
    last_used: float = field(default_factory=time.time)
    turn: Turn = field(default_factory=Turn)

    @property
    def state(self) -> str:
        if self.turn.busy:
            return "busy"
        return "hot" if self.cache is not None else "disk"

    @property
    def token_count(self) -> int:
        return len(self.tokens) if self.cache is not None else self.disk_tokens

    def info(self) -> rpc.SessionInfo:
        nbytes = self.hot_bytes if self.cache is not None else self.disk_bytes
        return rpc.SessionInfo(self.id, self.token_count, nbytes, self.state, self.last_used)  # type: ignore[arg-type]


class SessionStore:
    def __init__(
        self,
        root: Path,
        shape: ModelShape,
        pool: BlockPool,
        on_engine: Callable[[Callable[[], Any]], Awaitable[Any]],
        *,
        disk_budget_bytes: int,
        block_bytes: int,
        kv_bits: int = 0,
    ) -> None:
        self.folder = root / "sessions" / shape.fingerprint[:16]
        self.quarantine_dir = root / "quarantine"
        self.shape = shape
        self.pool = pool
        self._on_engine = on_engine
        self.disk_budget = disk_budget_bytes
        self.kv_bits = kv_bits
        self.block_bytes = block_bytes  # a pool block's KV bytes at the model's dtype
        self.sessions: dict[str, Session] = {}
        self._writer = anyio.CapacityLimiter(1)  # one writer thread: files written in order
        self.disk_errors: list[str] = []
        self.spilled = 0
        self.restored = 0
        self.quarantined = 0

    # -- index ----------------------------------------------------------------------

    async def load_index(self) -> None:
        """Find the sessions saved by an earlier run (metadata only; tensors load on use)."""
        await anyio.to_thread.run_sync(self._scan, limiter=self._writer)

    def _scan(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        removed = persistence.remove_temp_files(self.folder)
        if removed:
            log.warning("removed unfinished cache files", count=removed)
        for path in sorted(self.folder.glob("*" + SUFFIX)):
            try:
                meta = persistence.read_metadata(path)
                if meta.get("fingerprint") != self.shape.fingerprint:
                    raise persistence.CacheFileError(path, "written for another model")
                session_id = meta["session"]
                if path.name != session_id + SUFFIX:
                    raise persistence.CacheFileError(path, "file name and session differ")
            except (persistence.CacheFileError, KeyError, OSError) as exc:
                self._quarantine(path, str(exc))
                continue
            stat = path.stat()
            self.sessions[session_id] = Session(
                session_id,
                disk_tokens=int(meta["n_tokens"]),
                disk_bytes=stat.st_size,
                last_used=stat.st_mtime,
            )

    def _path(self, session_id: str) -> Path:
        return self.folder / (session_id + SUFFIX)

    def _quarantine(self, path: Path, reason: str) -> None:
        self.quarantined += 1
        try:
            moved = persistence.quarantine(path, self.quarantine_dir, reason)
            log.warning(
                "quarantined a bad session cache", path=str(path), to=str(moved), reason=reason
            )
        except OSError as exc:
            log.error("could not quarantine a bad cache file", path=str(path), error=str(exc))

    # -- a turn ---------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise rpc.RpcError(rpc.ErrorCode.SESSION_NOT_FOUND, f"no session {session_id!r}")
        return session

    def open(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            session = self.sessions[session_id] = Session(session_id)
        return session

    def detach_blocks(self, session: Session) -> Reservation | None:
        """The session's pool blocks, to be absorbed into its next request's reservation."""
        held, session.reservation = session.reservation, None
        return held

    def attach_blocks(self, session: Session, held: Reservation | None) -> None:
        session.reservation = held

    async def checkout(self, session: Session, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """The cache to start `prompt` from and how many of its tokens it covers.

        The hot cache passes to the request: the session gets a new one when it finishes.
        """
        session.last_used = time.time()
        if session.cache is None and session.disk_tokens:
            await self._load(session)
        cache, tokens = session.cache, session.tokens
        self._drop_hot(session)
        if cache is None:
            return None, 0
        # Leave at least one token to prefill: its logits start the generation.
        n = min(common_prefix(tokens, prompt), len(prompt) - 1)
        if n <= 0:
            return None, 0
        if isinstance(cache[0], QuantizedKVCache):  # --kv-bits: the batch wants full precision
            quantized = cache
            cache = await self._on_engine(lambda: persistence.dequantize_cache(quantized))
        return prefix_view(cache, n), n

    def commit(
        self,
        session: Session,
        cache: list[Any] | None,
        tokens: list[int] | None,
        reservation: Reservation,
    ) -> None:
        """A turn ended: keep its cache hot and the blocks it needs; release the rest."""
        session.last_used = time.time()
        if cache is None or not tokens:
            reservation.release()
            return
        session.cache, session.tokens, session.dirty = cache, list(tokens), True
        session.hot_bytes = persistence.cache_nbytes(cache)
        reservation.resize(self._blocks(session))
        session.reservation = reservation

    def _blocks(self, session: Session) -> int:
        """What a hot cache occupies, not what it covers: a quantized one holds fewer blocks."""
        return max(1, math.ceil(session.hot_bytes / self.block_bytes))

    def _drop_hot(self, session: Session) -> None:
        session.cache, session.hot_bytes = None, 0
        if session.reservation is not None:
            session.reservation.release()
            session.reservation = None

    async def _load(self, session: Session) -> None:
        path = self._path(session.id)
        shape = self.shape
        try:
            snap = await anyio.to_thread.run_sync(
                lambda: persistence.read_snapshot(
                    path,
                    fingerprint=shape.fingerprint,
                    num_layers=shape.num_layers,
                    kv_heads=shape.kv_heads,
                    head_dim=shape.head_dim,
                    dtype=shape.dtype,
                ),
                limiter=self._writer,
            )
        except (persistence.CacheFileError, OSError) as exc:
            if isinstance(exc, persistence.CacheFileError) or path.exists():
                await anyio.to_thread.run_sync(self._quarantine, path, str(exc))
            else:
                self._note_disk_error(f"load {session.id}: {exc}")
            session.disk_tokens = session.disk_bytes = 0
            return
        session.cache = await self._on_engine(lambda: persistence.restore(snap))
        session.tokens = list(snap.tokens)
        session.hot_bytes = snap.nbytes
        session.dirty = False
        self.restored += 1

    # -- spilling and saving ------------------------------------------------------------

    async def make_room(self, blocks: int) -> None:
        """Spill idle hot sessions, least recently used first, until `blocks` are free."""
        idle = sorted(
            (s for s in self.sessions.values() if s.cache is not None and not s.turn.busy),
            key=lambda s: s.last_used,
        )
        for session in idle:
            if self.pool.free >= blocks:
                return
            await self.spill(session)

    async def spill(self, session: Session) -> None:
        if session.dirty:
            await self.save(session)
        self._drop_hot(session)
        self.spilled += 1

    async def save(self, session: Session) -> bool:
        """Write the hot cache to disk (if it changed); False if it could not be written."""
        if session.cache is None or not session.dirty:
            return False
        cache, tokens = session.cache, list(session.tokens)
        snap = await self._on_engine(lambda: persistence.snapshot(cache, tokens, self.kv_bits))
        path = self._path(session.id)
        try:
            size = await anyio.to_thread.run_sync(
                lambda: persistence.write_snapshot(
                    path,
                    snap,
                    fingerprint=self.shape.fingerprint,
                    session=session.id,
                    max_bytes=self.disk_budget,
                ),
                limiter=self._writer,
            )
        except OSError as exc:
            self._note_disk_error(f"save {session.id}: {exc}")
            return False
        if session.cache is cache:
            session.dirty = False
        session.disk_tokens, session.disk_bytes = len(tokens), size
        await self._enforce_disk_budget(keep=session)
        return True

    async def save_all(self) -> int:
        saved = 0
        for session in list(self.sessions.values()):
            if await self.save(session):
                saved += 1
        return saved

    async def _enforce_disk_budget(self, keep: Session) -> None:
        on_disk = sorted(
            (s for s in self.sessions.values() if s.disk_bytes and s is not keep),
            key=lambda s: s.last_used,
        )
        total = sum(s.disk_bytes for s in on_disk) + keep.disk_bytes
        for session in on_disk:
            if total <= self.disk_budget:
                break
            total -= session.disk_bytes
            await self._delete_file(session)
            if session.cache is None and not session.turn.busy:
                self.sessions.pop(session.id, None)
            else:
                session.dirty = True  # only the hot copy is left

    async def _delete_file(self, session: Session) -> None:
        path = self._path(session.id)
        await anyio.to_thread.run_sync(lambda: path.unlink(missing_ok=True), limiter=self._writer)
        session.disk_tokens = session.disk_bytes = 0

    def _note_disk_error(self, message: str) -> None:
        log.error("session cache disk error", error=message)
        self.disk_errors = [*self.disk_errors[-9:], message]

    # -- methods --------------------------------------------------------------------

    async def delete(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        await session.turn.acquire()
        try:
            self._drop_hot(session)
            await self._delete_file(session)
            self.sessions.pop(session_id, None)
        finally:
            session.turn.release()
        return True

    async def fork(self, source_id: str, new_id: str) -> Session:
        source = self.get(source_id)
        if new_id in self.sessions:
            raise rpc.RpcError(rpc.ErrorCode.INVALID_PARAMS, f"session {new_id!r} exists already")
        await source.turn.acquire()
        try:
            if source.cache is None and source.disk_tokens:
                await self._load(source)
                if source.cache is not None:
                    source.reservation = self.pool.try_reserve(self._blocks(source))
            forked = self.open(new_id)
            if source.cache is not None:
                # Shares the layers: nothing writes into a session's cache in place.
                forked.cache = list(source.cache)
                forked.tokens = list(source.tokens)
                forked.hot_bytes = source.hot_bytes
                forked.dirty = True
                forked.reservation = self.pool.try_reserve(self._blocks(forked))
            return forked
        finally:
            source.turn.release()

    def tier_status(self) -> rpc.SessionTierStatus:
        hot = [s for s in self.sessions.values() if s.cache is not None]
        return rpc.SessionTierStatus(
            hot=len(hot),
            disk=sum(1 for s in self.sessions.values() if s.disk_bytes),
            hot_bytes=sum(s.hot_bytes for s in hot),
            disk_bytes=sum(s.disk_bytes for s in self.sessions.values()),
        )
