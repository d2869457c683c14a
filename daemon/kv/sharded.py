"""Session KV caches under --distributed: every cache rank 0 keeps has a twin on every rank.

Tensor parallelism gives each rank its own heads of every KV cache, so whatever rank 0's
session store does to a cache (keep a finished turn's, take a prefix view, dequantize,
snapshot it to a file, restore it from one) must happen to the matching cache on every
other rank. Rank 0's caches are `Mirrored` lists naming a handle; each op on one is
recorded into the next plan (engine/lockstep.py) and the other ranks replay it on their
`Twins`. A twin is dropped once rank 0's list is garbage, so its lifetime follows rank 0's
references wherever the store lets go of one.

Files: every rank writes and reads its own file of a session, in its own folder (a shard
has its own fingerprint) and marked with its shard (cachefile.py). A restore asks every
rank whether its file loaded: a session is used only when every rank has its part.
"""

from __future__ import annotations

import itertools
import logging
import weakref
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import msgspec

from . import cachefile
from . import snapshot as kvsnap
from .sessions import SUFFIX, CacheOps, ModelShape

__all__ = [
    "CacheOp",
    "Leader",
    "Mirrored",
    "Twins",
    "leader_caches",
    "live_caches",
    "mirror",
]


class Leader(Protocol):
    """What rank 0's cache ops need of its lockstep engine (the engine imports this module)."""

    channel: Any  # lockstep.Channel: `record(op)` and `size`

    def ask(self) -> int: ...


log = logging.getLogger(__name__)


class Keep(msgspec.Struct, tag="k", array_like=True):
    """The cache of `uid`, just finished or removed, is kept as `handle` (quantized to kv_bits)."""

    uid: int
    handle: int
    kv_bits: int


class View(msgspec.Struct, tag="v", array_like=True):
    """`dst` is the first `n` tokens of `src`."""

    src: int
    dst: int
    n: int


class Full(msgspec.Struct, tag="f", array_like=True):
    """`dst` is `src` dequantized."""

    src: int
    dst: int


class Drop(msgspec.Struct, tag="d", array_like=True):
    handle: int


class Save(msgspec.Struct, tag="s", array_like=True):
    """Write `handle` (holding `tokens`) as session `name`'s file."""

    handle: int
    name: str
    tokens: list[int]
    kv_bits: int


class Load(msgspec.Struct, tag="l", array_like=True):
    """Read session `name`'s file as `handle`; it must hold what rank 0's holds. Answered."""

    handle: int
    name: str
    n_tokens: int
    tokens_crc: int


class Unlink(msgspec.Struct, tag="u", array_like=True):
    """Session `name`'s file is gone on rank 0 (deleted, evicted or quarantined)."""

    name: str


CacheOp = Keep | View | Full | Drop | Save | Load | Unlink

_handles = itertools.count(1)


class Mirrored(list[Any]):
    """Rank 0's KV cache (a list of layers) whose twin on every other rank is `handle`."""

    __slots__ = ("__weakref__", "handle")
    handle: int


_live: weakref.WeakValueDictionary[int, Mirrored] = weakref.WeakValueDictionary()


def mirror(cache: Sequence[Any], record: Callable[[Any], None]) -> Mirrored:
    """`cache` as a Mirrored list with a new handle; its twins are dropped when it is."""
    out = Mirrored(cache)
    out.handle = next(_handles)
    weakref.finalize(out, record, Drop(out.handle)).atexit = False
    _live[out.handle] = out
    return out


def live_caches() -> int:
    """Rank 0: the Mirrored caches alive (each has a twin on every other rank)."""
    return len(_live)


def _handle(cache: Sequence[Any]) -> int:
    if not isinstance(cache, Mirrored):
        raise TypeError("this KV cache has no twin on the other ranks")
    return cache.handle


def _tokens_crc(tokens: Sequence[int]) -> int:
    return zlib.crc32(b"".join(int(t).to_bytes(8, "little") for t in tokens))


def leader_caches(engine: Leader) -> CacheOps:
    """Rank 0's cache ops: MLX's on its own shard, each one recorded for the other ranks."""
    record = engine.channel.record

    def snapshot(
        cache: Sequence[Any], tokens: Sequence[int], kv_bits: int, name: str
    ) -> cachefile.Snapshot:
        snap = kvsnap.snapshot(cache, tokens, kv_bits)
        record(Save(_handle(cache), name, list(tokens), snap.kv_bits))
        return snap

    def restore(snap: cachefile.Snapshot, name: str) -> list[Any]:
        cache = mirror(kvsnap.restore(snap), record)
        record(Load(cache.handle, name, snap.n_tokens, _tokens_crc(snap.tokens)))
        failed = engine.ask()  # a bit per rank whose file did not load
        if failed:
            ranks = [r for r in range(1, engine.channel.size) if failed >> r & 1]
            raise cachefile.CacheFileError(
                name,
                f"rank {', '.join(map(str, ranks))} could not load its part of the session "
                "(missing or unusable: see that rank's log); the session is not restored",
            )
        return cache

    def prefix(cache: Sequence[Any], n: int) -> list[Any]:
        out = mirror(kvsnap.prefix_view(cache, n), record)
        record(View(_handle(cache), out.handle, n))
        return out

    def full(cache: Sequence[Any]) -> list[Any]:
        out = mirror(kvsnap.dequantize_cache(cache), record)
        record(Full(_handle(cache), out.handle))
        return out

    return CacheOps(
        nbytes=kvsnap.cache_nbytes,
        snapshot=snapshot,
        restore=restore,
        prefix=prefix,
        quantized=kvsnap.is_quantized,
        full=full,
        forget=lambda name: record(Unlink(name)),
    )


class Twins:
    """Any rank but 0: the twins of rank 0's caches, by handle, and this rank's session files."""

    def __init__(self, root: Path, shape: ModelShape, rank: int, disk_budget_bytes: int) -> None:
        self.folder = root / "sessions" / shape.fingerprint[:16]  # as SessionStore's
        self.quarantine_dir = root / "quarantine"
        self.shape = shape
        self.rank = rank
        self.disk_budget = disk_budget_bytes
        self.caches: dict[int, list[Any]] = {}
        self.finished: dict[int, list[Any]] = {}  # uid -> cache, until the next plan is done
        self.failed = False  # a Load of this plan failed: the answer says so
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        cachefile.remove_temp_files(self.folder)

    def get(self, handle: int) -> list[Any]:
        try:
            return self.caches[handle]
        except KeyError:
            raise LookupError(f"rank {self.rank} has no twin of cache {handle}") from None

    def apply(self, op: CacheOp) -> None:
        if isinstance(op, Keep):
            self._keep(op)
        elif isinstance(op, View):
            self.caches[op.dst] = kvsnap.prefix_view(self.get(op.src), op.n)
        elif isinstance(op, Full):
            self.caches[op.dst] = kvsnap.dequantize_cache(self.get(op.src))
        elif isinstance(op, Drop):
            self.caches.pop(op.handle, None)  # a twin never made (a failed Load) is fine
        elif isinstance(op, Save):
            self._save(op)
        elif isinstance(op, Load):
            self._load(op)
        else:
            self._unlink(op.name)

    def answer(self) -> int:
        """This rank's part of a plan's answer (a bit per failed rank); resets it."""
        failed, self.failed = self.failed, False
        return (1 << self.rank) if failed else 0

    def _keep(self, op: Keep) -> None:
        cache = self.finished.pop(op.uid, None)
        if cache is None:
            log.error("rank %d: no cache of sequence %d to keep", self.rank, op.uid)
            return  # an Insert naming it ends the group (the caller raises)
        if op.kv_bits:
            self.caches[op.handle] = kvsnap.quantize_cache(cache, op.kv_bits)
        else:
            mx.eval([c.state for c in cache])  # not the whole batch's arrays kept alive
            self.caches[op.handle] = cache

    def _path(self, name: str) -> Path:
        return self.folder / (name + SUFFIX)

    def _save(self, op: Save) -> None:
        # Rank 0 writes its file on its writer thread; a failure here shows at the restore.
        try:
            snap = kvsnap.snapshot(self.get(op.handle), op.tokens, op.kv_bits)
            cachefile.write_snapshot(
                self._path(op.name),
                snap,
                fingerprint=self.shape.fingerprint,
                session=op.name,
                max_bytes=self.disk_budget,
                shard=self.shape.shard,
            )
        except (OSError, LookupError, ValueError, TypeError) as exc:
            log.error("rank %d: cannot save session %s: %s", self.rank, op.name, exc)

    def _load(self, op: Load) -> None:
        path = self._path(op.name)
        try:
            snap = self.shape.read(path)
            if snap.n_tokens != op.n_tokens or _tokens_crc(snap.tokens) != op.tokens_crc:
                raise cachefile.CacheFileError(path, "holds other tokens than rank 0's file")
        except (cachefile.CacheFileError, OSError) as exc:
            self.failed = True
            log.error("rank %d: cannot load session %s: %s", self.rank, op.name, exc)
            if isinstance(exc, cachefile.CacheFileError):
                self._quarantine(path, exc.reason)
            return
        self.caches[op.handle] = kvsnap.restore(snap)

    def _quarantine(self, path: Path, reason: str) -> None:
        try:
            cachefile.quarantine(path, self.quarantine_dir, reason)
        except OSError as exc:
            log.error("rank %d: cannot quarantine %s: %s", self.rank, path, exc)

    def _unlink(self, name: str) -> None:
        try:
            cachefile.remove(self._path(name))
        except OSError as exc:
            log.error("rank %d: cannot remove session %s's file: %s", self.rank, name, exc)
