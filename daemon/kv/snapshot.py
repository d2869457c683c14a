"""Session KV caches in memory: mlx-lm caches <-> numpy snapshots, on the engine thread.

These functions call MLX, so they run on the engine thread; they turn a list of mlx-lm
`KVCache` (one per layer) into a `Snapshot` of plain numpy arrays and back, quantize and
dequantize caches, and measure them. What a snapshot becomes on disk is cachefile.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from .cachefile import GROUP_SIZE, KV_BITS, MODEL_DTYPES, Snapshot, tensor_names

__all__ = [
    "cache_nbytes",
    "dequantize_cache",
    "is_quantized",
    "prefix_view",
    "quantize_cache",
    "restore",
    "snapshot",
]


def _dtype_name(dtype: mx.Dtype) -> str:
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in MODEL_DTYPES:
        raise ValueError(f"unsupported KV cache dtype {name}")
    return name


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x))


def _to_mx(a: np.ndarray, dtype: str) -> mx.array:
    x = mx.array(a)
    # uint16 in a bfloat16 snapshot are bfloat16 bits (see the module docstring).
    if dtype == "bfloat16" and a.dtype == np.uint16:
        x = x.view(mx.bfloat16)
    return x


def _layer_parts(c: Any, n: int, kv_bits: int, group_size: int) -> tuple[str, list[mx.array]]:
    keys, values = c.keys, c.values
    if isinstance(c, QuantizedKVCache):  # keys, values: [weight, scales, biases]
        return _dtype_name(keys[1].dtype), [x[..., :n, :] for x in (*keys, *values)]
    k, v = keys[..., :n, :], values[..., :n, :]
    if not kv_bits:
        return _dtype_name(k.dtype), [k, v]
    parts = [
        *mx.quantize(k, group_size=group_size, bits=kv_bits),
        *mx.quantize(v, group_size=group_size, bits=kv_bits),
    ]
    return _dtype_name(k.dtype), parts


def _dequantize(parts: Sequence[mx.array], group_size: int, bits: int) -> mx.array:
    w, scales, biases = parts
    return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)


def snapshot(cache: Sequence[Any], tokens: Sequence[int], kv_bits: int = 0) -> Snapshot:
    """Copy the first len(tokens) positions of every layer into numpy (engine thread).

    `cache` is a list of mlx-lm `KVCache`, quantized first when kv_bits is 4 or 8, or a
    list of `QuantizedKVCache` (from `quantize_cache`), stored as it is.
    """
    if kv_bits not in KV_BITS:
        raise ValueError(f"kv_bits must be one of {KV_BITS}, not {kv_bits}")
    if not cache:
        raise ValueError("empty cache list")
    n = len(tokens)
    quantized = isinstance(cache[0], QuantizedKVCache)
    group_size = 0
    if quantized:
        bits, group_size = cache[0].bits, cache[0].group_size
        if kv_bits not in (0, bits):
            raise ValueError(f"cache is {bits}-bit quantized; cannot store it as {kv_bits}-bit")
        kv_bits = bits
    elif kv_bits:
        group_size = GROUP_SIZE
    kind = QuantizedKVCache if quantized else KVCache
    pending: dict[str, mx.array] = {}
    dtype = ""
    for i, c in enumerate(cache):
        if type(c) is not kind:
            # Rotating and SSM caches are not prefix caches: their state is not
            # "the first n positions", so they cannot be reused this way.
            raise TypeError(f"layer {i}: cannot snapshot a {type(c).__name__}")
        if c.offset != n or c.keys is None:
            raise ValueError(f"layer {i} holds {c.offset} tokens, the token list has {n}")
        dtype, parts = _layer_parts(c, n, kv_bits, group_size)
        pending.update(zip(tensor_names(i, kv_bits), parts, strict=True))
    mx.eval(*pending.values())  # one evaluation for all layers, not one per array
    arrays = {name: _to_numpy(x) for name, x in pending.items()}
    return Snapshot(list(tokens), arrays, kv_bits, group_size, dtype, len(cache))


def _kv_cache(keys: mx.array, values: mx.array, offset: int) -> KVCache:
    c = KVCache()
    c.keys, c.values, c.offset = keys, values, offset
    return c


def restore(snap: Snapshot) -> list[KVCache]:
    """Fresh mlx-lm `KVCache`s holding the snapshot (engine thread).

    Quantized snapshots are dequantized to the model dtype, so the result is always a plain
    `KVCache` that mlx-lm's BatchGenerator can merge.
    """
    n = snap.n_tokens
    if n == 0:
        return [KVCache() for _ in range(snap.num_layers)]
    out = []
    for i in range(snap.num_layers):
        xs = [_to_mx(snap.arrays[name], snap.dtype) for name in tensor_names(i, snap.kv_bits)]
        if snap.kv_bits:
            gs, bits = snap.group_size, snap.kv_bits
            xs = [_dequantize(xs[:3], gs, bits), _dequantize(xs[3:], gs, bits)]
        out.append(_kv_cache(xs[0], xs[1], n))
    # Pay the copy here rather than in the first decode step, and let numpy memory go.
    mx.eval(*[a for c in out for a in (c.keys, c.values)])
    return out


def quantize_cache(
    cache: Sequence[Any], bits: int, group_size: int = GROUP_SIZE
) -> list[QuantizedKVCache]:
    """Quantize hot caches to keep in memory; only the `offset` valid positions are kept."""
    out = []
    for c in cache:
        q: Any = QuantizedKVCache(group_size=group_size, bits=bits)
        q.offset = c.offset
        if c.keys is not None:
            n = c.offset
            q.keys = mx.quantize(c.keys[..., :n, :], group_size=group_size, bits=bits)
            q.values = mx.quantize(c.values[..., :n, :], group_size=group_size, bits=bits)
        out.append(q)
    mx.eval([c.state[:2] for c in out if c.keys is not None])
    return out


def dequantize_cache(cache: Sequence[QuantizedKVCache]) -> list[KVCache]:
    """Plain `KVCache`s (model dtype) from `quantize_cache` output, for BatchGenerator."""
    out = []
    for q in cache:
        keys: Any = q.keys
        values: Any = q.values
        if keys is None:
            out.append(KVCache())
            continue
        n, gs, bits = q.offset, q.group_size, q.bits
        k, v = ([x[..., :n, :] for x in t] for t in (keys, values))
        out.append(_kv_cache(_dequantize(k, gs, bits), _dequantize(v, gs, bits), n))
    mx.eval(*[a for c in out if c.keys is not None for a in (c.keys, c.values)])
    return out


def is_quantized(cache: Sequence[Any]) -> bool:
    return bool(cache) and isinstance(cache[0], QuantizedKVCache)


def prefix_view(cache: Sequence[Any], n: int) -> list[KVCache]:
    """New KVCache objects over the same arrays, holding only the first `n` tokens.

    Nothing writes into a session's arrays (the batch merges a copy), so sharing is safe.
    """
    views = []
    for layer in cache:
        view = KVCache()
        view.keys, view.values, view.offset = layer.keys, layer.values, min(n, layer.offset)
        views.append(view)
    return views


def cache_nbytes(cache: Sequence[Any]) -> int:
    """Bytes the cache arrays occupy, allocated capacity included (what the pool pays)."""
    return sum(0 if c.empty() else int(c.nbytes) for c in cache)
