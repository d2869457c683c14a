"""Sessions: KV caches kept warm in memory, spilled to disk under a budget, restored later.

A session holds the tokens its cache covers. A new turn reuses the longest common token
prefix (from memory, else from disk) and prefills only the rest. Hot caches hold blocks
of the pool; when a request does not fit, idle sessions are spilled to disk, least
recently used first. Disk files are keyed by the model's fingerprint and have their own
budget. MLX work (snapshot, restore) runs on the engine thread; file I/O on a writer thread.

A session's states: absent (not in the store) → empty / hot / disk while idle, busy while
something holds its turn → deleted. Everything that changes a session's cache, blocks or
file holds its turn: a generate (from admission to its outcome), a spill, a save, a fork
(the source's turn, and the new session's, claimed with its name). `delete` needs no turn:
it removes the session from the store at once and marks it deleted; whoever holds the turn
then discards the cache when it ends (`end`), and requests waiting for the turn get
SessionNotFound. So no turn ever runs on a deleted session, and no blocks stay behind.

With the prefix cache on, a request without a session keeps its cache too, as an anonymous
entry (`~anon-...`, not listed, never named by a client), and every request may start from
the longest cached prefix of any entry (found by `PrefixIndex`): its own, another hot idle
cache (shared, never written), or another entry's file (read into a cache for this request
only). Under pressure anonymous entries are spilled, and their files evicted, before
named sessions.
"""

from __future__ import annotations

import math
import secrets
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import anyio
import structlog

from mlxd import faults, rpc

from . import cachefile
from . import snapshot as kvsnap
from .pool import BlockPool, Reservation
from .prefix_index import PrefixIndex, common_prefix
from .turns import Turn

__all__ = [
    "MLX_CACHES",
    "CacheOps",
    "ModelShape",
    "Session",
    "SessionState",
    "SessionStore",
]

log = structlog.get_logger("mlxd.sessions")
SUFFIX = ".safetensors"
ANON_PREFIX = "~anon-"  # outside the session id pattern: no client can name one
SHORT_MATCH = 16  # tokens: a shorter common prefix (a BOS, a chat header) is not worth a view


@dataclass(frozen=True)
class CacheOps:
    """What the store does to KV caches: MLX's by default, every rank's under --distributed
    (kv/sharded.py), plain objects in the bookkeeping tests. `snapshot`, `restore` and
    `full` run on the engine thread. The session name given to `snapshot` (the file it is
    written as), `restore` (the file it came from) and `forget` (a file removed) lets
    every rank do the same to its own file of that name."""

    nbytes: Callable[[Sequence[Any]], int]
    snapshot: Callable[[Sequence[Any], Sequence[int], int, str], cachefile.Snapshot]
    # Raises CacheFileError when the session's file is unusable after all (another rank's).
    restore: Callable[[cachefile.Snapshot, str], list[Any]]
    prefix: Callable[[Sequence[Any], int], list[Any]]  # a view of the first n tokens
    quantized: Callable[[Sequence[Any]], bool]
    full: Callable[[Sequence[Any]], list[Any]]  # dequantized: the batch wants full precision
    forget: Callable[[str], None] = lambda name: None


MLX_CACHES = CacheOps(
    nbytes=kvsnap.cache_nbytes,
    snapshot=lambda cache, tokens, kv_bits, name: kvsnap.snapshot(cache, tokens, kv_bits),
    restore=lambda snap, name: kvsnap.restore(snap),
    prefix=kvsnap.prefix_view,
    quantized=kvsnap.is_quantized,
    full=kvsnap.dequantize_cache,
)


@dataclass(frozen=True)
class ModelShape:
    fingerprint: str
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    shard: str = ""  # "tensor RANK/SIZE" under --distributed: its files hold that shard

    @classmethod
    def of(cls, model: Any, shard: str = "") -> ModelShape:
        """A LoadedModel's (models/model.py) shape: its shard's, for a shard."""
        return cls(
            model.fingerprint, model.num_layers, model.kv_heads, model.head_dim, model.dtype, shard
        )

    def read(self, path: Path) -> cachefile.Snapshot:
        """A session file, validated against this shape (writer thread)."""
        return cachefile.read_snapshot(
            path,
            fingerprint=self.fingerprint,
            num_layers=self.num_layers,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype,
            shard=self.shard,
        )


class SessionState(Enum):
    EMPTY = "empty"  # known by name, nothing cached (not listed)
    HOT = "hot"
    DISK = "disk"
    BUSY = "busy"
    DELETED = "deleted"


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
    deleted: bool = False  # out of the store: its turn's holder discards what is left
    anonymous: bool = False  # kept for a sessionless request: not listed, evicted first
    # The file's tokens, for the prefix index; packed (4 bytes a token, not a list's 8 plus
    # an int object each) because files outnumber hot caches: thousands under a 20 GiB budget.
    disk_token_list: array[int] | None = None
    prompt_len: int = 0  # an anonymous entry's prompt: a prompt extending it continues it

    def set_file(self, tokens: Sequence[int], size: int) -> None:
        """Record what the file on disk holds now (no tokens: there is no file)."""
        self.disk_tokens, self.disk_bytes = len(tokens), size
        self.disk_token_list = array("I", tokens) if tokens else None

    @property
    def phase(self) -> SessionState:
        if self.deleted:
            return SessionState.DELETED
        if self.turn.busy:
            return SessionState.BUSY
        if self.cache is not None:
            return SessionState.HOT
        return SessionState.DISK if self.disk_tokens else SessionState.EMPTY

    @property
    def state(self) -> str:
        """The state as `sessions/list` shows it."""
        phase = self.phase
        return "disk" if phase in (SessionState.EMPTY, SessionState.DELETED) else phase.value

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
        caches: CacheOps = MLX_CACHES,
        prefix_cache: bool = True,
    ) -> None:
        self.folder = root / "sessions" / shape.fingerprint[:16]
        self.quarantine_dir = root / "quarantine"
        self.shape = shape
        self.pool = pool
        self._on_engine = on_engine
        self.disk_budget = disk_budget_bytes
        self.kv_bits = kv_bits
        self.block_bytes = block_bytes  # a pool block's KV bytes at the model's dtype
        self.caches = caches
        self._waiting = 0  # requests waiting for some session's turn
        self.sessions: dict[str, Session] = {}
        self._writer = anyio.CapacityLimiter(1)  # one writer thread: files written in order
        self.disk_errors: list[str] = []
        self.spilled = 0
        self.restored = 0
        self.quarantined = 0
        self.prefix_cache = prefix_cache
        # Test-only: a constant digest makes every block key collide.
        collide = faults.take("PREFIX_COLLIDE")
        if collide:
            log.warning("prefix index keys forced to collide (test fault)")
        self.index = PrefixIndex(
            shape.fingerprint,
            pool.block_tokens,
            **({"digest": lambda data: b"\0" * 16} if collide else {}),
        )
        self.prefix_stats = {
            "lookups": 0,
            "hits_hot": 0,
            "hits_disk": 0,
            "hits_named": 0,
            "hits_anonymous": 0,
        }

    @property
    def waiting(self) -> int:
        """Requests waiting for a session's turn (they count in `status.queue.depth`)."""
        return self._waiting

    # -- index ----------------------------------------------------------------------

    async def load_index(self) -> None:
        """Find the sessions saved by an earlier run (metadata only; tensors load on use)."""
        await anyio.to_thread.run_sync(self._scan, limiter=self._writer)

    def _scan(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        removed = cachefile.remove_temp_files(self.folder)
        if removed:
            log.warning("removed unfinished cache files", count=removed)
        for path in sorted(self.folder.glob("*" + SUFFIX)):
            try:
                meta = cachefile.read_metadata(path)
                cachefile.check_shard(path, meta, self.shape.shard)
                if meta.get("fingerprint") != self.shape.fingerprint:
                    raise cachefile.CacheFileError(path, "written for another model")
                session_id = meta["session"]
                if path.name != session_id + SUFFIX:
                    raise cachefile.CacheFileError(path, "file name and session differ")
                tokens = cachefile.header_tokens(path, meta)
            except (cachefile.CacheFileError, KeyError, OSError) as exc:
                self._quarantine(path, str(exc))
                continue
            stat = path.stat()
            session = self.sessions[session_id] = Session(
                session_id,
                last_used=stat.st_mtime,
                anonymous=session_id.startswith(ANON_PREFIX),
            )
            session.set_file(tokens, stat.st_size)
            self._reindex(session)

    def _path(self, session_id: str) -> Path:
        return self.folder / (session_id + SUFFIX)

    def _quarantine(self, path: Path, reason: str) -> None:
        self.quarantined += 1
        self.caches.forget(path.name.removesuffix(SUFFIX))
        try:
            moved = cachefile.quarantine(path, self.quarantine_dir, reason)
            log.warning(
                "quarantined a bad session cache", path=str(path), to=str(moved), reason=reason
            )
        except OSError as exc:
            log.error("could not quarantine a bad cache file", path=str(path), error=str(exc))

    # -- turns ----------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise rpc.RpcError(rpc.ErrorCode.SESSION_NOT_FOUND, f"no session {session_id!r}")
        return session

    async def begin(self, session_id: str, *, create: bool = False) -> Session:
        """Wait for the session's turn (FIFO) and hold it; pair with `end`.

        `create`: a session unknown by that name is made (a generate's first turn). A session
        deleted while this waited is SessionNotFound: its conversation was thrown away.
        """
        session = self.sessions.get(session_id)
        if session is None and create:
            session = self.sessions[session_id] = Session(session_id)
        if session is None:
            raise rpc.RpcError(rpc.ErrorCode.SESSION_NOT_FOUND, f"no session {session_id!r}")
        await self._hold(session)
        return session

    async def _hold(self, session: Session) -> None:
        self._waiting += 1
        try:
            await session.turn.acquire()
        finally:
            self._waiting -= 1
        if session.deleted:
            self.end(session)
            raise rpc.RpcError(
                rpc.ErrorCode.SESSION_NOT_FOUND,
                f"session {session.id!r} was deleted before this request's turn",
            )

    def _try_hold(self, session: Session) -> bool:
        return not session.deleted and session.turn.try_acquire()

    def end(self, session: Session) -> None:
        """Give up the turn: to the next waiter, else the session is idle."""
        if session.deleted:
            self._drop_hot(session)
        session.turn.release()
        if not session.turn.busy and session.phase is SessionState.EMPTY:
            self._forget(session)  # nothing to keep: a failed first turn leaves no trace
        self.pool.nudge()  # an idle session's blocks may be spilled for the queue

    def _forget(self, session: Session) -> None:
        session.deleted = True
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self.index.remove(session.id)

    def _reindex(self, session: Session) -> None:
        """The index follows what the session holds: its hot cache, else its file."""
        if session.deleted:
            return
        tokens: Sequence[int] | None = session.tokens if session.cache is not None else None
        if tokens is None and session.disk_tokens:
            tokens = session.disk_token_list
        if tokens:
            self.index.add(session.id, tokens)
        else:
            self.index.remove(session.id)

    # -- the prefix cache -------------------------------------------------------------

    def _tokens_of(self, own: Session | None) -> Callable[[str], Sequence[int] | None]:
        def tokens_of(entry: str) -> Sequence[int] | None:
            s = self.sessions.get(entry)
            if s is None or s.deleted:
                return None
            if s.cache is not None and (s is own or not s.turn.busy):
                return s.tokens  # a busy turn's cache may be being extended: not read
            return s.disk_token_list if s.disk_tokens else None

        return tokens_of

    def _prefer(self, own: Session | None) -> Callable[[str], float]:
        def prefer(entry: str) -> float:
            s = self.sessions[entry]
            tier = 3 if s is own else 2 if s.cache is not None and not s.turn.busy else 1
            return tier * 1e10 + s.last_used  # own, then hot, then disk; recent first

        return prefer

    def _lookup(self, prompt: list[int], own: Session | None) -> tuple[Session, int] | None:
        tokens_of, prefer = self._tokens_of(own), self._prefer(own)
        found = self.index.lookup(prompt, tokens_of, prefer)
        if found is None:
            found = self._short_match(prompt, tokens_of, prefer)
        if found is None:
            return None
        return self.sessions[found[0]], found[1]

    def _short_match(
        self,
        prompt: list[int],
        tokens_of: Callable[[str], Sequence[int] | None],
        prefer: Callable[[str], float],
    ) -> tuple[str, int] | None:
        """No whole block in common: the best match inside the first block, by a scan (the
        index has no key for less than a block; short conversations still resume)."""
        head = prompt[: self.index.block_tokens]
        best: tuple[int, float, str] | None = None
        for entry in list(self.sessions):
            tokens = tokens_of(entry)
            if not tokens:
                continue
            n = common_prefix(tokens, head)
            if n >= SHORT_MATCH and (best is None or (n, prefer(entry), entry) > best):
                best = (n, prefer(entry), entry)
        return (best[2], best[0]) if best is not None else None

    def anonymous(self, prompt: list[int]) -> Session:
        """A sessionless request's entry, its turn held: an idle anonymous entry this prompt
        continues (its whole prompt matches: the conversation grew), else a new one."""
        found = self._lookup(prompt, None)
        session = None
        if found is not None:
            entry, n = found
            if entry.anonymous and n >= entry.prompt_len and self._try_hold(entry):
                session = entry
        if session is None:
            session = Session(ANON_PREFIX + secrets.token_hex(6), anonymous=True)
            self.sessions[session.id] = session
            session.turn.try_acquire()
        session.prompt_len = len(prompt)
        return session

    def _hit(self, source: Session, tier: str) -> None:
        self.prefix_stats["hits_" + tier] += 1
        self.prefix_stats["hits_anonymous" if source.anonymous else "hits_named"] += 1

    async def _borrow(
        self, source: Session, prompt: list[int], n: int
    ) -> tuple[list[Any] | None, int]:
        """A view of `source`'s first n tokens, `source` untouched: its hot cache shared
        when idle, else its file read into a cache for this request only."""
        if source.cache is not None and not source.turn.busy:
            cache, tier = source.cache, "hot"
        else:
            snap = await self._read(source)
            if snap is None:
                if not source.turn.busy and source.phase is SessionState.EMPTY:
                    self._forget(source)
                return None, 0
            n = min(n, common_prefix(list(snap.tokens), prompt))  # the file may be newer
            restored = await self._restore(source, snap)
            if restored is None:
                return None, 0
            cache, tier = restored, "disk"
        n = min(n, len(prompt) - 1)
        if n <= 0:
            return None, 0
        self._hit(source, tier)
        return await self._view(cache, n), n

    async def _view(self, cache: list[Any], n: int) -> list[Any]:
        caches = self.caches
        if caches.quantized(cache):
            quantized = cache
            cache = await self._on_engine(lambda: caches.full(quantized))
        return caches.prefix(cache, n)

    def detach_blocks(self, session: Session) -> None:
        """The session's blocks were absorbed into its request's reservation: not its own now."""
        session.reservation = None

    async def checkout(self, session: Session, prompt: list[int]) -> tuple[list[Any] | None, int]:
        """The cache to start `prompt` from and how many of its tokens it covers.

        The hot cache passes to the request: the session gets a new one when it finishes.
        """
        session.last_used = time.time()
        if self.prefix_cache:
            self.prefix_stats["lookups"] += 1
            found = self._lookup(prompt, session)
            if found is not None and found[0] is not session:
                own = self._tokens_of(session)(session.id) or []
                if min(found[1], len(prompt) - 1) > common_prefix(own, prompt):
                    self._drop_hot(session)
                    return await self._borrow(found[0], prompt, found[1])
        tier = "hot" if session.cache is not None else "disk"
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
        if self.prefix_cache:
            self._hit(session, tier)
        return await self._view(cache, n), n

    def commit(
        self,
        session: Session,
        cache: list[Any] | None,
        tokens: list[int] | None,
        reservation: Reservation,
    ) -> None:
        """A turn ended: keep its cache hot and the blocks it occupies; release the rest.

        A deleted session keeps nothing, and a cache that would not fit the blocks the
        turn reserved (nor the pool's free ones) is dropped: hot bytes stay within budget.
        """
        session.last_used = time.time()
        kept = False
        try:
            if session.deleted or cache is None or not tokens:
                return
            hot_bytes = self.caches.nbytes(cache)
            blocks = self._blocks_for(hot_bytes)
            if not reservation.grow(blocks):
                return
            reservation.shrink(blocks)
            self._drop_hot(session)
            session.cache, session.tokens, session.dirty = cache, list(tokens), True
            session.hot_bytes, session.reservation = hot_bytes, reservation
            self._reindex(session)
            kept = True
        finally:
            if not kept:
                reservation.release()

    def _blocks_for(self, hot_bytes: int) -> int:
        """What a hot cache occupies, not what it covers: a quantized one holds fewer blocks."""
        return max(1, math.ceil(hot_bytes / self.block_bytes))

    def _drop_hot(self, session: Session) -> None:
        session.cache, session.hot_bytes = None, 0
        if session.reservation is not None:
            session.reservation.release()
            session.reservation = None
        self._reindex(session)

    async def _read(self, session: Session) -> cachefile.Snapshot | None:
        """The session's file, validated; None (quarantined, or a disk error noted) if unusable."""
        path = self._path(session.id)
        try:
            return await anyio.to_thread.run_sync(self.shape.read, path, limiter=self._writer)
        except (cachefile.CacheFileError, OSError) as exc:
            if isinstance(exc, cachefile.CacheFileError) or path.exists():
                await anyio.to_thread.run_sync(self._quarantine, path, str(exc))
            elif not session.deleted:  # deleted meanwhile: its file went with it
                self._note_disk_error(f"load {session.id}: {exc}")
            self._lose_file(session)
            return None

    def _lose_file(self, session: Session) -> None:
        session.set_file((), 0)
        self._reindex(session)

    async def _restore(self, session: Session, snap: cachefile.Snapshot) -> list[Any] | None:
        """`snap` as a cache; None (the file quarantined) when another rank's file of the
        session proves unusable: a session is whole on every rank or not at all."""
        restore = self.caches.restore
        try:
            return await self._on_engine(lambda: restore(snap, session.id))
        except cachefile.CacheFileError as exc:
            await anyio.to_thread.run_sync(
                self._quarantine, self._path(session.id), exc.reason, limiter=self._writer
            )
            self._lose_file(session)
            return None

    async def _load(self, session: Session) -> None:
        snap = await self._read(session)
        if snap is None:
            return
        cache = await self._restore(session, snap)
        if cache is None:
            return
        session.cache = cache
        session.tokens = list(snap.tokens)
        session.hot_bytes = snap.nbytes
        session.dirty = False
        session.set_file(snap.tokens, session.disk_bytes)
        self._reindex(session)
        self.restored += 1

    # -- spilling and saving ------------------------------------------------------------

    async def make_room(self, blocks: int) -> None:
        """Spill idle hot sessions, anonymous ones first, least recently used first within
        each, until `blocks` are free."""
        idle = sorted(
            (s for s in self.sessions.values() if s.cache is not None and not s.turn.busy),
            key=_eviction_order,
        )
        for session in idle:
            if self.pool.free >= blocks:
                return
            if not self._try_hold(session):
                continue  # busy since: its turn owns the cache now
            try:
                if session.cache is not None:
                    await self._spill(session)
            finally:
                self.end(session)

    async def _spill(self, session: Session) -> None:
        if session.dirty:
            await self._save(session)
        self._drop_hot(session)
        self.spilled += 1

    async def save(self, session_id: str) -> bool:
        """Write the session's hot cache to disk (if it changed), in its turn."""
        session = await self.begin(session_id)
        try:
            return await self._save(session)
        finally:
            self.end(session)

    async def _save(self, session: Session) -> bool:
        """Write the hot cache to disk (turn held); False if unchanged or not written."""
        if session.cache is None or not session.dirty:
            return False
        cache, tokens = session.cache, list(session.tokens)
        kv_bits = 0 if session.anonymous else self.kv_bits  # anonymous entries stay exact
        snapshot = self.caches.snapshot
        name = session.id
        snap = await self._on_engine(lambda: snapshot(cache, tokens, kv_bits, name))
        size = await self._write(session, name, snap)
        if size is None:
            return False
        if session.cache is cache:
            session.dirty = False
        session.set_file(tokens, size)
        self._reindex(session)
        await self._enforce_disk_budget(keep=session)
        return True

    async def _write(self, owner: Session, name: str, snap: cachefile.Snapshot) -> int | None:
        """Write `snap` as session `name`'s file; None on a disk error (noted) or once `owner`
        is deleted: the check runs on the writer thread, where files change in order, so a
        delete's removal either comes after this write or this write is not done."""
        path = self._path(name)

        def write() -> int | None:
            if owner.deleted:
                return None
            return cachefile.write_snapshot(
                path,
                snap,
                fingerprint=self.shape.fingerprint,
                session=name,
                max_bytes=self.disk_budget,
                shard=self.shape.shard,
            )

        try:
            return await anyio.to_thread.run_sync(write, limiter=self._writer)
        except OSError as exc:
            self._note_disk_error(f"save {name}: {exc}")
            return None

    async def save_all(self) -> int:
        saved = 0
        for session in list(self.sessions.values()):
            if session.deleted:
                continue
            try:
                await self._hold(session)
            except rpc.RpcError:
                continue  # deleted while we waited
            try:
                saved += await self._save(session)
            finally:
                self.end(session)
        return saved

    async def _enforce_disk_budget(self, keep: Session) -> None:
        on_disk = sorted(
            (s for s in self.sessions.values() if s.disk_bytes and s is not keep),
            key=_eviction_order,
        )
        total = sum(s.disk_bytes for s in on_disk) + keep.disk_bytes
        for session in on_disk:
            if total <= self.disk_budget:
                break
            total -= session.disk_bytes
            await self._delete_file(session)
            if session.cache is None and not session.turn.busy:
                self._forget(session)
            else:
                session.dirty = True  # only the hot copy is left

    async def _delete_file(self, session: Session) -> None:
        path = self._path(session.id)
        self.caches.forget(session.id)
        try:
            await anyio.to_thread.run_sync(cachefile.remove, path, limiter=self._writer)
        except OSError as exc:
            self._note_disk_error(f"delete {session.id}: {exc}")
        self._lose_file(session)

    def _note_disk_error(self, message: str) -> None:
        log.error("session cache disk error", error=message)
        self.disk_errors = [*self.disk_errors[-9:], message]

    # -- methods --------------------------------------------------------------------

    async def delete(self, session_id: str) -> bool:
        """Forget the session now. A running turn finishes and its cache is discarded;
        turns waiting for it get SessionNotFound. A file that cannot be removed is a disk
        error in `status`, and the session is gone all the same (until a restart finds it)."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        self._forget(session)
        if not session.turn.busy:
            self._drop_hot(session)  # idle: nobody holds or waits for its turn
        # Always, not only when a file is known: a write may be under way, and this removal
        # queues behind it on the writer thread.
        await self._delete_file(session)
        return True

    async def fork(self, source_id: str, new_id: str) -> Session:
        """A new session sharing the source's cache: in memory if the pool has (or can spill
        for) its blocks without waiting, else on disk only."""
        self._refuse_taken(new_id)
        source = await self.begin(source_id)
        try:
            self._refuse_taken(new_id)  # again: the name may have been taken while we waited
            forked = self.sessions[new_id] = Session(new_id)
            forked.turn.try_acquire()  # claimed with its name: busy until the copy is made
            try:
                await self._copy(source, forked)
            except BaseException:
                self._forget(forked)
                raise
            finally:
                self.end(forked)
            return forked
        finally:
            self.end(source)

    def _refuse_taken(self, new_id: str) -> None:
        if new_id in self.sessions:
            raise rpc.RpcError(rpc.ErrorCode.INVALID_PARAMS, f"session {new_id!r} exists already")

    async def _copy(self, source: Session, forked: Session) -> None:
        forked.last_used = time.time()
        if source.cache is None:
            if source.disk_tokens:
                snap = await self._read(source)
                if snap is not None:
                    await self._copy_to_disk(source, forked, snap)
            return
        blocks = self._blocks_for(source.hot_bytes)
        reservation = self.pool.try_reserve(blocks)
        if reservation is None and blocks <= self.pool.total:
            await self.make_room(blocks)
            reservation = self.pool.try_reserve(blocks)
        if reservation is None:
            cache, tokens, kv_bits = source.cache, list(source.tokens), self.kv_bits
            snapshot, name = self.caches.snapshot, forked.id
            snap = await self._on_engine(lambda: snapshot(cache, tokens, kv_bits, name))
            await self._copy_to_disk(source, forked, snap)
            return
        # The same list: nothing changes a session's cache in place (and under --distributed
        # the list names the other ranks' copies).
        forked.cache = source.cache
        forked.tokens = list(source.tokens)
        forked.hot_bytes = source.hot_bytes
        forked.dirty = True
        forked.reservation = reservation
        self._reindex(forked)

    async def _copy_to_disk(
        self, source: Session, forked: Session, snap: cachefile.Snapshot
    ) -> None:
        size = await self._write(forked, forked.id, snap)
        if size is None and not forked.deleted:
            raise rpc.RpcError(
                rpc.ErrorCode.SERVER_BUSY,
                f"a copy of {source.id!r} fits neither the pool nor the disk (see disk_errors)",
                {
                    "retry_after_ms": self.pool.retry_after_ms(),
                    "queue_depth": self.pool.queue_depth,
                },
            )
        forked.set_file(snap.tokens, size or 0)
        self._reindex(forked)
        if size:
            await self._enforce_disk_budget(keep=forked)

    def anonymous_blocks(self) -> int:
        """Pool blocks that anonymous entries hold: a cache the next request may evict."""
        return sum(
            s.reservation.blocks for s in self.sessions.values() if s.anonymous and s.reservation
        )

    def prefix_status(self) -> dict[str, Any]:
        stats = self.prefix_stats
        hits = stats["hits_hot"] + stats["hits_disk"]
        anonymous = [s for s in self.sessions.values() if s.anonymous]
        return {
            "enabled": self.prefix_cache,
            **stats,
            "hit_rate": round(hits / stats["lookups"], 4) if stats["lookups"] else 0.0,
            "anonymous_entries": len(anonymous),
            # What anonymous entries hold of the pool (they are not in `sessions/list`).
            "anonymous_blocks": self.anonymous_blocks(),
            "indexed": len(self.index),
        }

    def tier_status(self) -> rpc.SessionTierStatus:
        hot = [s for s in self.sessions.values() if s.cache is not None]
        return rpc.SessionTierStatus(
            hot=len(hot),
            disk=sum(1 for s in self.sessions.values() if s.disk_bytes),
            hot_bytes=sum(s.hot_bytes for s in hot),
            disk_bytes=sum(s.disk_bytes for s in self.sessions.values()),
        )


def _eviction_order(session: Session) -> tuple[bool, float]:
    """Anonymous entries go first: a flood of one-off prompts must not starve sessions."""
    return (not session.anonymous, session.last_used)
