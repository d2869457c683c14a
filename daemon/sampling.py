"""Per-request samplers: temperature, top-p/k, min-p, with a private seeded random key.

A per-request key (not MLX's global random state) makes a seeded request reproducible
whatever else shares its batch.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

__all__ = ["Sampler", "make_sampler"]

Sampler = Callable[[mx.array], mx.array]


def make_sampler(
    temperature: float, top_p: float, top_k: int, min_p: float, seed: int | None
) -> Sampler | None:
    """None means greedy, which BatchGenerator runs as one argmax over the whole batch."""
    if temperature == 0:
        return None
    key = mx.random.key(seed if seed is not None else secrets.randbits(63))

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        # A top_k of the vocabulary or more keeps every token. mlx-lm raises for it, and a
        # sampler that raises fails the whole batch's step, not just this request.
        if 0 < top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, top_k)
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0:
            logprobs = apply_min_p(logprobs, min_p)
        return mx.random.categorical(logprobs * (1 / temperature), key=sub)

    return sample
