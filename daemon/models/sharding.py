"""Tensor-parallel shards: which models split over N ranks, loading one rank's shard, its fingerprint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["check_shardable", "shard", "shard_fingerprint"]


def check_shardable(folder: Path, size: int) -> None:
    """Tensor parallelism splits heads and the MLP over the ranks: each must divide by `size`."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config") or config
    counts = {
        "attention heads": text.get("num_attention_heads"),
        "KV heads": text.get("num_key_value_heads", text.get("num_attention_heads")),
        "MLP width": text.get("intermediate_size"),
    }
    bad = [f"{n} {name}" for name, n in counts.items() if isinstance(n, int) and n % size]
    if bad:
        raise ValueError(
            f"cannot split it over {size} ranks: {' and '.join(bad)} do not divide by {size} "
            "(tensor parallelism gives each rank an equal share of heads)"
        )


def shard(folder: Path, g: Any) -> tuple[Any, Any, dict[str, Any]]:
    """This rank's shard of the model in `folder` (check_shardable first), with its
    tokenizer and config."""
    from mlx_lm.utils import sharded_load

    return sharded_load(str(folder), tensor_group=g, return_config=True)


def shard_fingerprint(fp: str, g: Any) -> str:
    """A shard computes (and caches) other numbers than the whole model: its own fingerprint."""
    return hashlib.sha256(f"{fp}\0tensor-parallel={g.rank()}/{g.size()}".encode()).hexdigest()
