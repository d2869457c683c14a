"""The session cache file format: numpy snapshots <-> validated safetensors files.

No MLX here: only file I/O and numpy, run on the writer thread (snapshot.py turns mlx-lm
caches into the `Snapshot`s written here, on the engine thread).

A file is an ordinary safetensors file. Tensors are `layers.{i}.keys` / `layers.{i}.values`
of shape [1, kv_heads, n_tokens, head_dim], or for a quantized snapshot
`layers.{i}.keys.weight|scales|biases` (and the same for values) as `mx.quantize` returns
them. numpy has no bfloat16, so bfloat16 data is carried as its raw uint16 bits (storage
dtype U16) and the `dtype` metadata says how to read it back; restoring is bit-exact.
Every metadata value is a string: format, version, fingerprint, session, tokens (a JSON
list), n_tokens, dtype, num_layers, kv_bits, group_size and checksum; a file written by one
rank of a tensor-parallel group also has `shard` ("tensor RANK/SIZE"): it holds that rank's
heads only, and only the same rank of a group of the same size may read it.

The checksum is sha256 over every other metadata item (so the token list, fingerprint and
layout are covered) followed by every tensor's name, dtype, shape and bytes in sorted name
order. Files are trusted only after `read_snapshot` has checked the header against the
file size, the metadata against the model, every tensor's shape, and the checksum; the
reader never instantiates anything a file names (unlike mlx-lm's `load_prompt_cache`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mlxd import faults
from mlxd.durable import TEMP_SUFFIX, write_all, write_atomic

__all__ = [
    "FORMAT",
    "GROUP_SIZE",
    "KV_BITS",
    "MODEL_DTYPES",
    "QPARTS",
    "TEMP_SUFFIX",
    "VERSION",
    "CacheFileError",
    "Snapshot",
    "check_shard",
    "compute_checksum",
    "header_tokens",
    "quarantine",
    "read_metadata",
    "read_snapshot",
    "remove",
    "remove_temp_files",
    "tensor_names",
    "write_snapshot",
]

FORMAT = "mlxd-kv"
VERSION = "1"
GROUP_SIZE = 64  # mx.quantize's default; head_dim is a multiple of it for common models
KV_BITS = (0, 4, 8)

_METADATA_KEYS = (
    "format",
    "version",
    "fingerprint",
    "session",
    "tokens",
    "n_tokens",
    "dtype",
    "num_layers",
    "kv_bits",
    "group_size",
    "checksum",
)
# The token list lives in the header, so the cap must fit long contexts (~8 bytes a
# token); it exists so a garbage length cannot make us allocate gigabytes.
_MAX_HEADER = 64 * 1024 * 1024


# numpy dtype <-> safetensors dtype code, for the only dtypes our files contain.
_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "U16": np.dtype("<u2"),  # bfloat16 bits
    "U32": np.dtype("<u4"),  # packed quantized weights
}
_ST_CODE = {dt: code for code, dt in _ST_DTYPES.items()}
MODEL_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "U16"}


def tensor_names(i: int, kv_bits: int) -> list[str]:
    """Layer `i`'s tensor names in a file (and a snapshot) of `kv_bits`."""
    if kv_bits == 0:
        return [f"layers.{i}.keys", f"layers.{i}.values"]
    return [f"layers.{i}.{kv}.{part}" for kv in ("keys", "values") for part in QPARTS]


QPARTS = ("weight", "scales", "biases")


class CacheFileError(ValueError):
    """A cache file that must not be used; `reason` says why, for logs and `.reason` files."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass
class Snapshot:
    """A session's KV cache as plain numpy arrays: what crosses from engine to writer thread."""

    tokens: list[int]
    arrays: dict[str, np.ndarray]
    kv_bits: int  # 0 = unquantized, else 8 or 4
    group_size: int  # quantization group size; 0 when unquantized
    dtype: str  # the model's activation dtype: float32, float16 or bfloat16
    num_layers: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)


def compute_checksum(metadata: Mapping[str, str], arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 hex over the metadata (checksum itself excluded) and the tensors, by name."""
    h = hashlib.sha256(f"{FORMAT}/{VERSION}\n".encode())
    # JSON-encoding each item keeps the fields unambiguous (no separator can be forged).
    for key in sorted(metadata):
        if key != "checksum":
            h.update(json.dumps([key, metadata[key]]).encode() + b"\n")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        code = _ST_CODE.get(a.dtype, a.dtype.str)
        h.update(json.dumps([name, code, list(a.shape)]).encode() + b"\n")
        h.update(a.data)
    return h.hexdigest()


def _metadata(snap: Snapshot, fingerprint: str, session: str, shard: str) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint,
        "session": session,
        "tokens": json.dumps(snap.tokens, separators=(",", ":")),
        "n_tokens": str(snap.n_tokens),
        "dtype": snap.dtype,
        "num_layers": str(snap.num_layers),
        "kv_bits": str(snap.kv_bits),
        "group_size": str(snap.group_size),
    }
    if shard:
        meta["shard"] = shard
    meta["checksum"] = compute_checksum(meta, snap.arrays)
    return meta


def _injected_fault(point: str, code: int, path: Path) -> None:
    if faults.take(point):
        raise OSError(code, f"{os.strerror(code)} (injected)", str(path))


def _half_write_fault(fd: int, tmp: Path) -> None:
    if faults.take("WRITE_ENOSPC"):  # a disk filling up mid-write
        write_all(fd, b"\0" * 4096)
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected)", str(tmp))


def remove(path: Path) -> None:
    """Delete a cache file (writer thread); a file already gone is not an error."""
    _injected_fault("UNLINK_EROFS", errno.EROFS, path)
    Path(path).unlink(missing_ok=True)


def write_snapshot(
    path: Path,
    snap: Snapshot,
    *,
    fingerprint: str,
    session: str,
    max_bytes: int | None = None,
    shard: str = "",
) -> int:
    """Write `snap` to `path` atomically and durably (writer thread); returns bytes written.

    On any error (ENOSPC, EIO...) the temp file is removed, the previous file at `path`
    is untouched, and the OSError propagates. A file larger than `max_bytes` (the whole
    disk budget) is not written: OSError EFBIG.
    """
    path = Path(path)
    meta = _metadata(snap, fingerprint, session, shard)
    header, tensors = _encode(snap.arrays, meta)
    size = len(header) + sum(a.nbytes for a in tensors)
    if max_bytes is not None and size > max_bytes:
        raise OSError(errno.EFBIG, f"{size} bytes exceed the disk budget of {max_bytes}", str(path))
    _injected_fault("WRITE_EROFS", errno.EROFS, path.parent)
    # 0600 from creation: KV caches reveal the conversation, so never world-readable.
    pieces: list[bytes | memoryview] = [header, *(a.data for a in tensors)]
    write_atomic(path, pieces, mode=0o600, before_write=_half_write_fault)
    return size


def _encode(
    arrays: Mapping[str, np.ndarray], metadata: dict[str, str]
) -> tuple[bytes, list[np.ndarray]]:
    """A safetensors file's header, and its tensors in file order.

    The file is written from the arrays themselves, piece by piece: building it as one
    bytes object first (`safetensors.numpy.save`) would hold a second copy of the whole
    cache in memory during every spill.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    tensors, offset = [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        if a.dtype not in _ST_CODE:
            raise ValueError(f"{name}: a cache file cannot hold dtype {a.dtype}")
        end = offset + a.nbytes
        header[name] = {
            "dtype": _ST_CODE[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, end],
        }
        tensors.append(a)
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the tensors start 8-byte aligned, as safetensors writes them
    return len(raw).to_bytes(8, "little") + raw, tensors


def _read_exact(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:  # the file shrank under us
        raise CacheFileError(path, f"truncated: file ended inside the {what}")
    return data


@dataclass
class _Header:
    metadata: dict[str, str]
    tensors: dict[str, tuple[str, list[int], int, int]]  # name -> (dtype, shape, begin, end)
    data_start: int
    data_len: int


def _parse_header(f: BinaryIO, path: Path) -> _Header:
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise CacheFileError(path, f"not a safetensors file: only {size} bytes")
    n = int.from_bytes(_read_exact(f, 8, path, "header length"), "little")
    if 8 + n > size:
        raise CacheFileError(
            path, f"header length {n} points past the end of the file ({size} bytes)"
        )
    if n > _MAX_HEADER:
        raise CacheFileError(path, f"header length {n} exceeds the {_MAX_HEADER}-byte limit")
    try:
        header = json.loads(_read_exact(f, n, path, "header"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CacheFileError(path, "garbage: the header is not JSON") from None
    if not isinstance(header, dict):
        raise CacheFileError(path, "garbage: the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CacheFileError(path, "no string metadata in the header")
    data_len = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        tensors[name] = _tensor_entry(path, name, entry, data_len)
    covered = sorted((b, e) for _, _, b, e in tensors.values())
    pos = 0
    for b, e in covered:
        if b != pos:
            raise CacheFileError(path, f"tensor data overlaps or leaves a gap at byte {pos}")
        pos = e
    if pos != data_len:
        raise CacheFileError(path, f"{data_len - pos} bytes after the last tensor")
    return _Header(meta, tensors, 8 + n, data_len)


def _tensor_entry(
    path: Path, name: str, entry: Any, data_len: int
) -> tuple[str, list[int], int, int]:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CacheFileError(path, f"tensor {name!r}: malformed header entry") from None
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise CacheFileError(path, f"tensor {name!r}: unexpected dtype {dtype!r}")
    ints = [*shape, begin, end] if isinstance(shape, list) else None
    if ints is None or not all(type(x) is int and x >= 0 for x in ints):
        raise CacheFileError(path, f"tensor {name!r}: malformed shape or offsets")
    if end > data_len:
        raise CacheFileError(
            path, f"truncated: tensor {name!r} ends at byte {end} of a {data_len}-byte data section"
        )
    if end - begin != math.prod(shape) * _ST_DTYPES[dtype].itemsize:
        raise CacheFileError(path, f"tensor {name!r}: byte length does not match its shape")
    return dtype, shape, begin, end


def _check_format(path: Path, meta: Mapping[str, str]) -> None:
    missing = [k for k in _METADATA_KEYS if k not in meta]
    if missing:
        raise CacheFileError(path, f"metadata lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise CacheFileError(path, f"not an mlxd KV cache (format {meta['format']!r})")
    if meta["version"] != VERSION:
        raise CacheFileError(path, f"unsupported version {meta['version']!r}")


def _shard_name(shard: str) -> str:
    if not shard:
        return "a single-process daemon"
    rank, _, size = shard.removeprefix("tensor ").partition("/")
    return f"rank {rank} of a {size}-rank tensor-parallel group"


def check_shard(path: Path, meta: Mapping[str, str], shard: str) -> None:
    """A shard's file holds that rank's heads only: any other reader would read garbage KV."""
    written = meta.get("shard", "")
    if written != shard:
        raise CacheFileError(
            path,
            f"written by {_shard_name(written)}, read by {_shard_name(shard)}: a session "
            "cache is only valid under the world size and sharding it was saved with",
        )


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a cache file, reading only its header (start-up listing).

    The header is checked against the file size and the format/version, not the data.
    """
    path = Path(path)
    with open(path, "rb") as f:
        meta = _parse_header(f, path).metadata
    _check_format(path, meta)
    return meta


def header_tokens(path: Path, meta: Mapping[str, str]) -> list[int]:
    """The tokens a cache file's header lists (CacheFileError if malformed)."""
    return _parse_tokens(path, meta)


def _int(path: Path, meta: Mapping[str, str], key: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise CacheFileError(path, f"metadata {key} is not an integer: {meta[key]!r}") from None


def _parse_tokens(path: Path, meta: Mapping[str, str]) -> list[int]:
    try:
        tokens = json.loads(meta["tokens"])
    except json.JSONDecodeError:
        tokens = None
    if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
        raise CacheFileError(path, "metadata tokens is not a JSON list of token ids")
    n_tokens = _int(path, meta, "n_tokens")
    if n_tokens != len(tokens):
        raise CacheFileError(path, f"n_tokens {n_tokens} but {len(tokens)} tokens listed")
    return tokens


def _expected(
    num_layers: int, kv_heads: int, head_dim: int, n: int, dtype: str, bits: int, gs: int
) -> dict[str, tuple[str, list[int]]]:
    code = MODEL_DTYPES[dtype]
    if bits == 0:
        per_layer = [(code, head_dim)] * 2
    else:
        per_layer = [
            ("U32", head_dim * bits // 32),
            (code, head_dim // gs),
            (code, head_dim // gs),
        ] * 2
    out = {}
    for i in range(num_layers):
        for name, (c, last) in zip(tensor_names(i, bits), per_layer, strict=True):
            out[name] = (c, [1, kv_heads, n, last])
    return out


def read_snapshot(
    path: Path,
    *,
    fingerprint: str,
    num_layers: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    shard: str = "",
) -> Snapshot:
    """Read and fully validate a cache file for this model (writer thread).

    Raises CacheFileError (with a reason) for anything unexpected, before any tensor is
    used; OSError if the file cannot be read at all.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = _parse_header(f, path)
        meta = head.metadata
        _check_format(path, meta)
        check_shard(path, meta, shard)
        if meta["fingerprint"] != fingerprint:
            raise CacheFileError(
                path,
                f"model fingerprint mismatch: file {meta['fingerprint'][:16]!r}, model {fingerprint[:16]!r}",
            )
        layers = _int(path, meta, "num_layers")
        if layers != num_layers:
            raise CacheFileError(path, f"file has {layers} layers, the model {num_layers}")
        if meta["dtype"] != dtype or dtype not in MODEL_DTYPES:
            raise CacheFileError(path, f"file dtype {meta['dtype']!r}, model dtype {dtype!r}")
        bits, gs = _int(path, meta, "kv_bits"), _int(path, meta, "group_size")
        if bits not in KV_BITS or (bits and (gs not in (32, 64, 128) or head_dim % gs)):
            raise CacheFileError(path, f"unsupported quantization kv_bits={bits} group_size={gs}")
        tokens = _parse_tokens(path, meta)
        _check_tensors(
            path, head, _expected(num_layers, kv_heads, head_dim, len(tokens), dtype, bits, gs)
        )
        # Checked before reading the data, so a wrong file costs a header read, not a GB.
        f.seek(head.data_start)
        data = bytearray(head.data_len)
        if f.readinto(data) != head.data_len:
            raise CacheFileError(path, "truncated: file ended inside the tensor data")
    arrays = {
        name: _view(data, _ST_DTYPES[dt], shape, begin)
        for name, (dt, shape, begin, _) in head.tensors.items()
    }
    if compute_checksum(meta, arrays) != meta["checksum"]:
        raise CacheFileError(path, "checksum mismatch: the data is corrupt")
    return Snapshot(tokens, arrays, bits, gs, dtype, num_layers)


def _view(data: bytearray, dtype: np.dtype[Any], shape: list[int], begin: int) -> np.ndarray:
    count = math.prod(shape)
    if count == 0:  # frombuffer rejects an offset at the very end of the buffer
        return np.zeros(shape, dtype)
    return np.frombuffer(data, dtype, count, begin).reshape(shape)


def _check_tensors(
    path: Path, head: _Header, expected: Mapping[str, tuple[str, list[int]]]
) -> None:
    missing = sorted(expected.keys() - head.tensors.keys())
    extra = sorted(head.tensors.keys() - expected.keys())
    if missing or extra:
        raise CacheFileError(path, f"tensor names: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, (code, shape) in expected.items():
        dt, got, _, _ = head.tensors[name]
        if dt != code:
            raise CacheFileError(path, f"tensor {name!r} has dtype {dt}, expected {code}")
        if got == shape:
            continue
        if len(got) == 4 and got[:2] + got[3:] == shape[:2] + shape[3:]:
            raise CacheFileError(
                path, f"tensor {name!r} holds {got[2]} tokens, metadata says {shape[2]}"
            )
        raise CacheFileError(path, f"tensor {name!r} has shape {got}, this model needs {shape}")


def quarantine(path: Path, quarantine_dir: Path, reason: str) -> Path:
    """Move a bad cache file into quarantine_dir with a `.reason` note; returns its new path."""
    path, quarantine_dir = Path(path), Path(quarantine_dir)
    quarantine_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = quarantine_dir / f"{path.name}.{stamp}.{secrets.token_hex(3)}"
    try:
        os.replace(path, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.move(path, dest)  # quarantine on another filesystem
    note = dest.with_name(dest.name + ".reason")
    fd = os.open(note, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{path}\n{reason}\n")
    return dest


def remove_temp_files(folder: Path) -> int:
    """Delete `*.tmp` leftovers of writers that died mid-write; call at start-up only."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.endswith(TEMP_SUFFIX) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed
