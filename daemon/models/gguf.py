"""GGUF import: a llama.cpp model file -> an ordinary mlx-lm model folder in the cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, cast

import mlx.core as mx

from mlxd.durable import publish_folder

from .tokenizer_files import added_token, bpe_tokenizer, byte_level, tokenizer_config

__all__ = [
    "IMPORT_VERSION",
    "GGUFError",
    "import_gguf",
    "is_gguf",
    "permute_rows",
    "read_header",
    "unpermute_rows",
]

# Bump when the folder this writes changes: the folder name carries it.
IMPORT_VERSION = 1
_MAGIC = b"GGUF"
_GROUP_SIZE = 32  # every block format MLX reads natively (Q4_0, Q4_1, Q8_0)
_DEFAULT_ALIGNMENT = 32
_CHUNK = 1 << 20

# ggml tensor types: (name, elements per block, bytes per block) for those MLX reads.
_SUPPORTED_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    8: ("Q8_0", 32, 34),
    30: ("BF16", 1, 2),
}
_TYPE_NAMES = {
    6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
    14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
    27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0",
}  # fmt: skip

# GGUF metadata value types -> struct format (scalars); 8 is a string, 9 an array.
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9

# llama.cpp tensor names -> mlx-lm Llama module paths.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# tokenizer.ggml.pre -> the pre-tokenizer split that llama.cpp applies before byte-level BPE.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, tuple[bool, str]] = {  # name -> (digits one by one, split regex)
    "default": (False, _GPT2_SPLIT),
    "gpt-2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class GGUFError(Exception):
    """The file is not a GGUF model this importer can turn into an mlx-lm folder; says why."""


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


def import_gguf(path: Path, cache_dir: Path) -> Path:
    """The mlx-lm folder for GGUF file `path`, imported into cache_dir/models first if missing.

    The folder is keyed by the file's content hash, so a changed file gets a new one, and is
    only published by a rename, so a failed import leaves nothing behind.
    """
    path = Path(path)
    header = read_header(path)  # every check that needs no tensor data, before any work
    digest = _file_sha256(path)
    target = Path(cache_dir) / "models" / f"gguf-{digest[:24]}-v{IMPORT_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_folder(path, header, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is not secret
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Another process may publish the same import first; theirs is identical.
    publish_folder(tmp, target, lambda t: (t / "config.json").is_file())
    return target


# -- header -------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, Any]:
    """Metadata and tensor infos of a GGUF file, checked: magic, types, and that every
    tensor's bytes are inside the file (a truncated download fails here, not mid-load)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            return _parse_header(f, size, path)
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e}") from e
    except (struct.error, UnicodeDecodeError, OverflowError) as e:
        raise GGUFError(f"{path} is not a valid GGUF file (damaged header: {e})") from e


def _parse_header(f: BinaryIO, size: int, path: Path) -> dict[str, Any]:
    magic = f.read(4)
    if magic != _MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    version, n_tensors, n_kv = struct.unpack("<IQQ", _read(f, 20))
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    if n_tensors > size or n_kv > size:
        raise GGUFError(f"{path} is truncated or damaged (counts larger than the file)")
    meta = {}
    for _ in range(n_kv):
        key = _read_string(f)
        meta[key] = _read_value(f, struct.unpack("<I", _read(f, 4))[0])
    tensors = {}
    for _ in range(n_tensors):
        name = _read_string(f)
        (n_dims,) = struct.unpack("<I", _read(f, 4))
        dims = struct.unpack(f"<{n_dims}Q", _read(f, 8 * n_dims))
        ggml_type, offset = struct.unpack("<IQ", _read(f, 12))
        tensors[name] = (dims, ggml_type, offset)
    align = int(meta.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_start = -(-f.tell() // align) * align
    for name, (dims, ggml_type, offset) in tensors.items():
        if ggml_type not in _SUPPORTED_TYPES:
            kind = _TYPE_NAMES.get(ggml_type, f"type {ggml_type}")
            ok = ", ".join(n for n, _, _ in _SUPPORTED_TYPES.values())
            raise GGUFError(
                f"{path}: tensor {name} is {kind}, which MLX cannot load; supported: {ok} "
                "(re-quantize the model to Q4_0, Q4_1 or Q8_0)"
            )
        _, per_block, block_bytes = _SUPPORTED_TYPES[ggml_type]
        count = 1
        for d in dims:
            count *= d
        end = data_start + offset + count // per_block * block_bytes
        if end > size:
            raise GGUFError(
                f"{path} is truncated: tensor {name} ends at byte {end}, the file has {size}"
            )
    return {"metadata": meta, "tensors": tensors}


def _read(f: BinaryIO, n: int) -> bytes:
    if n > _CHUNK and n > os.fstat(f.fileno()).st_size:  # a damaged length: do not allocate it
        raise GGUFError(f"{getattr(f, 'name', 'file')} is truncated or damaged (a length of {n})")
    data = f.read(n)
    if len(data) != n:
        raise GGUFError(f"{getattr(f, 'name', 'file')} is truncated (header cut short)")
    return data


def _read_string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read(f, 8))
    return _read(f, n).decode("utf-8")


def _read_value(f: BinaryIO, vtype: int) -> Any:
    if vtype == _STRING:
        return _read_string(f)
    if vtype == _ARRAY:
        etype, n = struct.unpack("<IQ", _read(f, 12))
        if etype in _SCALARS:
            fmt = _SCALARS[etype]
            return list(struct.unpack(f"<{n}{fmt}", _read(f, n * struct.calcsize(fmt))))
        return [_read_value(f, etype) for _ in range(n)]
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(f"<{fmt}", _read(f, struct.calcsize(fmt)))[0]
    raise GGUFError(f"unknown GGUF metadata value type {vtype}")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# -- the folder ---------------------------------------------------------------------


def _write_folder(path: Path, header: dict[str, Any], folder: Path) -> None:
    meta = header["metadata"]
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(
            f"{path}: architecture {arch!r} is not supported (only 'llama' GGUF files are)"
        )
    config = _config(meta, header["tensors"], path)
    tokenizer_files = _tokenizer_files(meta, config, path)
    try:
        # The metadata was read by read_header; MLX reads the tensors (and its own copy of it).
        raw, _ = cast(
            tuple[dict[str, mx.array], dict[str, Any]], mx.load(str(path), return_metadata=True)
        )
    except Exception as e:
        raise GGUFError(f"{path}: MLX cannot read the tensors: {e}") from e
    weights = _weights(raw, config, path)
    config.update(_quantization(weights))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    _write_json(folder / "config.json", config)
    for name, content in tokenizer_files.items():
        _write_json(folder / name, content)


def _config(meta: dict[str, Any], tensors: dict[str, Any], path: Path) -> dict[str, Any]:
    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise GGUFError(f"{path}: metadata key llama.{key} is missing")
        return meta[f"llama.{key}"]

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rotary = int(meta.get("llama.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise GGUFError(
            f"{path}: partial rotary embeddings ({rotary} of {head_dim}) are not supported"
        )
    if "rope_freqs.weight" in tensors:
        raise GGUFError(f"{path}: Llama 3.1-style rope frequency scaling is not supported")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(meta.get("llama.context_length", 4096)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(meta.get("llama.vocab_size", len(tokens))),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "mlxd_gguf": {"source": path.name, "importer": IMPORT_VERSION},
    }
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported (linear is)")
        config["rope_scaling"] = {
            "type": "linear",
            "factor": float(meta["llama.rope.scaling.factor"]),
        }
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), _eos_ids(meta)
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos:
        config["eos_token_id"] = eos
    return config


def _eos_ids(meta: dict[str, Any]) -> list[int]:
    # llama.cpp stops on eos and on end-of-turn; both end a reply.
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = [int(meta[f"tokenizer.ggml.{k}"]) for k in keys if f"tokenizer.ggml.{k}" in meta]
    return list(dict.fromkeys(ids))


def _weights(raw: dict[str, mx.array], config: dict[str, Any], path: Path) -> dict[str, mx.array]:
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out = {}
    for name, value in raw.items():
        stem, _, part = name.rpartition(".")  # part: weight, scales or biases
        target = _target_name(stem)
        if target is None:
            raise GGUFError(f"{path}: tensor {name} has no place in a Llama model")
        if stem.endswith(".attn_q"):
            value = unpermute_rows(value, heads)
        elif stem.endswith(".attn_k"):
            value = unpermute_rows(value, kv_heads)
        out[f"{target}.{part}"] = value
    missing = {"model.embed_tokens.weight", "model.norm.weight"} - set(out)
    if missing:
        raise GGUFError(f"{path}: tensors missing: {', '.join(sorted(missing))}")
    return out


def _target_name(stem: str) -> str | None:
    if stem in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[stem]
    blk, _, rest = stem.partition(".")
    n, _, kind = rest.partition(".")
    if blk == "blk" and n.isdigit() and kind in _BLOCK_NAMES:
        return f"model.layers.{int(n)}.{_BLOCK_NAMES[kind]}"
    return None


def permute_rows(w: mx.array, n_head: int) -> mx.array:
    """llama.cpp's converter's reordering of q/k rows (HF's rotate-half -> interleaved)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """The inverse of permute_rows; rows are whole output features, so it applies alike to
    a float weight and to a quantized weight's packed rows, scales and biases."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any]:
    """config.json's `quantization`: the most common bits, and per module where they differ."""
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            packed = weights[f"{module}.weight"].shape[-1]  # uint32 words per row
            bits[module] = packed * 32 // (scales.shape[-1] * _GROUP_SIZE)
    if not bits:
        return {}
    common = Counter(bits.values()).most_common(1)[0][0]
    q: dict[str, Any] = {"group_size": _GROUP_SIZE, "bits": common}
    for module, b in bits.items():
        if b != common:
            q[module] = {"group_size": _GROUP_SIZE, "bits": b}
    return {"quantization": q, "quantization_config": q}


# -- tokenizer ----------------------------------------------------------------------


def _tokenizer_files(
    meta: dict[str, Any], config: dict[str, Any], path: Path
) -> dict[str, dict[str, Any]]:
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(
            f"{path}: tokenizer model {model!r} is not supported (byte-level BPE, 'gpt2', is)"
        )
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in _PRE_TOKENIZERS:
        known = ", ".join(sorted(_PRE_TOKENIZERS))
        raise GGUFError(f"{path}: pre-tokenizer {pre!r} is not supported ({known} are)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges: list[str] = meta.get("tokenizer.ggml.merges") or []

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, unk, pad = token("bos"), token("eos"), token("unknown"), token("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    tokenizer = _tokenizer_json(tokens, types, merges, pre, bos if add_bos else None)
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk),
                                 ("pad_token", pad)) if v is not None}  # fmt: skip
    tok_config = tokenizer_config(
        special, add_bos=add_bos, max_length=config["max_position_embeddings"]
    )
    if "tokenizer.chat_template" in meta:
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    generation: dict[str, Any] = {
        k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config
    }
    return {
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": tok_config,
        "special_tokens_map.json": special,
        "generation_config.json": generation,
    }


def _tokenizer_json(
    tokens: list[str], types: list[int], merges: list[str], pre: str, bos: str | None
) -> dict[str, Any]:
    digits, split = _PRE_TOKENIZERS[pre]
    steps: list[dict[str, Any]] = []
    if digits:
        steps.append({"type": "Digits", "individual_digits": True})
    steps.append({"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated",
                  "invert": False})  # fmt: skip
    steps.append(byte_level())
    added = [
        added_token(i, t, special=kind == _TOKEN_CONTROL)
        for i, (t, kind) in enumerate(zip(tokens, types, strict=False))
        if kind in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    post = None
    if bos is not None:
        bos_id = tokens.index(bos)
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }  # fmt: skip
    vocab = {t: i for i, t in enumerate(tokens)}
    pre_tokenizer = {"type": "Sequence", "pretokenizers": steps}
    return bpe_tokenizer(
        vocab, merges, added=added, pre_tokenizer=pre_tokenizer, post_processor=post
    )


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
