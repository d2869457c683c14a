"""Loading a model (built-in, folder or hub id) and fingerprinting it for cache files."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten, tree_map

from .builtin_model import BUILTIN_MODELS, ensure_builtin

__all__ = ["LoadedModel", "ModelLoadError", "fingerprint", "load_model"]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
)


class ModelLoadError(Exception):
    """The model could not be loaded; the message says why."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    id: str
    path: str
    fingerprint: str
    type: str
    vocab_size: int
    context_length: int
    dtype: str
    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def kv_bytes_per_token(self) -> int:
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}.get(self.dtype, 4)
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize


def _hash_file(h: Any, path: Path) -> None:
    h.update(path.name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)


def fingerprint(folder: Path) -> str:
    """sha256 of config, tokenizer and weights; memoised by (path, size, mtime) per file."""
    files = [folder / "config.json"]
    files += [folder / n for n in _TOKENIZER_FILES if (folder / n).exists()]
    files += sorted(folder.glob("*.safetensors"))
    stamp = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo = folder / ".mlxd-fingerprint.json"
    try:
        saved = json.loads(memo.read_text())
        if saved.get("stamp") == stamp:
            return str(saved["fingerprint"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for path in files:
        _hash_file(h, path)
    digest = h.hexdigest()
    try:
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "fingerprint": digest}))
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only model folder: hash again next time
    return digest


def _resolve(spec: str, cache_dir: Path) -> Path | str:
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise ModelLoadError(
                f"unknown built-in model {name!r}; choose from {sorted(BUILTIN_MODELS)}"
            )
        return ensure_builtin(name, cache_dir)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return folder.resolve()
    if spec.startswith((".", "/", "~")) or (os.sep in spec and spec.count("/") != 1):
        raise ModelLoadError(f"no model folder at {spec}")
    return spec  # a hub id


def load_model(spec: str, cache_dir: Path) -> LoadedModel:
    """Load on the calling thread (the engine thread: MLX streams are thread-local)."""
    where = _resolve(spec, cache_dir)
    try:
        model, tokenizer = mlx_lm.load(str(where))[:2]
    except Exception as exc:
        raise ModelLoadError(f"could not load model {spec!r}: {exc}") from exc
    folder = Path(where) if isinstance(where, Path) else _local_folder(model, where)
    if not mx.metal.is_available():
        # float16/bfloat16 matmuls are very slow on CPU; float32 is the fast path there.
        model.update(
            tree_map(
                lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                model.parameters(),
            )
        )
    mx.eval(model.parameters())
    config = json.loads((folder / "config.json").read_text())
    params = dict(tree_flatten(model.parameters()))
    dtype = str(
        next(v.dtype for v in params.values() if mx.issubdtype(v.dtype, mx.floating))
    ).split(".")[-1]
    heads = int(config.get("num_attention_heads", 1))
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        id=spec,
        path=str(folder),
        fingerprint=fingerprint(folder),
        type=str(config.get("model_type", "unknown")),
        vocab_size=int(config.get("vocab_size", 0)),
        context_length=int(config.get("max_position_embeddings") or 4096),
        dtype=dtype,
        num_layers=len(model.layers),
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
    )


def _local_folder(model: Any, hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hub_id, local_files_only=True))
