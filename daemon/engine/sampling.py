"""Per-request samplers: temperature, top-p/k, min-p, with a private seeded random key.

A per-request key (not MLX's global random state) makes a seeded request reproducible
whatever else shares its batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import mlx.core as mx
import msgspec

__all__ = ["Sampler", "Sampling", "make_sampler"]

Sampler = Callable[[mx.array], mx.array]


class Sampling(msgspec.Struct, array_like=True):
    """A request's sampling settings: held by its job, and sent as they are to other ranks."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


# mlx-lm's apply_top_p/apply_min_p are mx.compile'd with the threshold as a Python
# constant: every new value compiled again on the engine thread (~1.5 s on CPU, stalling
# the whole batch) and stayed in the compile cache. These filters are a few array ops per
# step, next to a whole forward pass; they run uncompiled, with thresholds as arrays.


def _top_k(logprobs: mx.array, k: int) -> mx.array:
    drop = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, drop, mx.array(-math.inf, logprobs.dtype), axis=-1)


def _top_p(logprobs: mx.array, top_p: mx.array) -> mx.array:
    sorted_logprobs = mx.sort(logprobs, axis=-1)
    sorted_probs = mx.exp(sorted_logprobs.astype(mx.float32))
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    total_mass = mass_above[..., :1] + sorted_probs[..., :1]
    num_dropped = (mass_above >= top_p * total_mass).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logprobs, num_dropped, axis=-1)
    return mx.where(logprobs < threshold, -math.inf, logprobs)


def _min_p(logprobs: mx.array, log_min_p: mx.array) -> mx.array:
    top = mx.max(logprobs, axis=-1, keepdims=True)
    return mx.where(logprobs < top + log_min_p, -math.inf, logprobs)


def make_sampler(settings: Sampling) -> Sampler | None:
    """None means greedy, which BatchGenerator runs as one argmax over the whole batch."""
    temperature, top_p, top_k, min_p = (
        settings.temperature, settings.top_p, settings.top_k, settings.min_p
    )  # fmt: skip
    if temperature == 0:
        return None
    seed = settings.seed
    key = mx.random.key(seed if seed is not None else secrets.randbits(63))
    top_p_arr = mx.array(top_p, mx.float32)
    log_min_p = mx.array(math.log(min_p) if min_p > 0 else 0.0, mx.float32)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        # A top_k of the vocabulary or more keeps every token. mlx-lm raises for it, and a
        # sampler that raises fails the whole batch's step, not just this request.
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = _top_k(logprobs, top_k)
        if 0 < top_p < 1:
            logprobs = _top_p(logprobs, top_p_arr)
        if min_p > 0:
            logprobs = _min_p(logprobs, log_min_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=sub)

    return sample
