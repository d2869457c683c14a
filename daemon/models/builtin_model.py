"""Built-in deterministic random-weight Llama models, generated offline into the cache folder."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxd.durable import publish_folder

from .tokenizer_files import added_token, bpe_tokenizer, byte_level, tokenizer_config

__all__ = [
    "BUILTIN_MODELS",
    "SPECIAL_TOKENS",
    "VERSION",
    "BuiltinSpec",
    "builtin_config",
    "ensure_builtin",
]

# Bump when anything generated changes (weights, tokenizer, template): the folder name
# carries it, so an old cache folder is never mistaken for the new model.
VERSION = 1

# Token ids 0..255 are the bytes themselves; the specials follow.
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
_BOS, _EOS, _PAD, _END = 256, 257, 258, 262
_VOCAB_SIZE = 264  # 256 bytes + 7 specials, rounded up to a multiple of 8 (id 263 unused)
# Output-head rows left at zero, so greedy decoding never emits them (the top logit is
# virtually always > 0): replies run to max_tokens, which keeps batch-vs-single tests
# comparing full-length outputs, and markers are not text. NUL too: mlx-lm's streaming
# byte-level detokenizer renders it as "\u0100" where decode() gives "\x00".
_SILENT_IDS = (0, *range(_BOS, _VOCAB_SIZE))
_SPECIAL_MAP = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Every message is wrapped in role markers and closed by <|end|>; the prompt starts
# with <|bos|> here because plain encode() never adds one (see _tokenizer_json).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('roles must be system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class BuiltinSpec:
    """Shape and init of one built-in model; init stds are multiples of 1/sqrt(fan_in)."""

    hidden_size: int
    num_layers: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    seed: int
    embed_std: float = 1.0
    qk_gain: float = 1.0
    v_gain: float = 1.0
    out_gain: float = 1.0
    mlp_gain: float = 1.0
    lm_head_gain: float = 1.0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        return sum(int(np.prod(shape)) for _, shape, _ in _tensor_plan(self))


# Init scales, tuned empirically so greedy tests are exact (batched == single, resumed
# cache == cold run). Output scale alone does not help: float32 rounding errors scale
# with the logits, so the flip risk is set by how much the network amplifies them.
# Sharper attention (qk_gain) makes outputs depend on distant context, which cache
# tests need (a bigram-like model would hide a wrong cache) but amplifies errors
# (qk_gain 3 on "small": ~60x larger than 1.5). These gains keep the top-2 margin error ~5e-6
# against a median margin ~1 with ~30% of argmaxes changed by a token 100+ back.
# lm_head_gain 4 makes logits std ~4, so sampling is peaked rather than near-uniform.
BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "tiny": BuiltinSpec(
        hidden_size=256,
        num_layers=4,
        intermediate_size=768,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=4096,
        seed=1,
        qk_gain=2.0,
        lm_head_gain=4.0,
    ),
    "small": BuiltinSpec(
        hidden_size=768,
        num_layers=12,
        intermediate_size=2560,
        num_heads=12,
        num_kv_heads=4,
        max_position_embeddings=16384,
        seed=2,
        qk_gain=1.5,
        lm_head_gain=4.0,
    ),
}


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """The folder of built-in model `name` under cache_dir, generated first if missing."""
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        valid = ", ".join(sorted([*BUILTIN_MODELS, "smollm2"]))  # smollm2: see smollm2.py
        raise ValueError(f"unknown built-in model {name!r}; valid names: {valid}")
    target = Path(cache_dir) / "models" / f"builtin-{name}-v{VERSION}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # Only a rename publishes the folder, so an incomplete one was damaged by hand.
        _move_aside(target)
    # Built beside the target so the final rename is atomic (same filesystem).
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _write_model(name, spec, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Another process may publish the same folder first; theirs is identical.
    publish_folder(tmp, target, _complete)
    return target


def builtin_config(name: str, spec: BuiltinSpec) -> dict[str, Any]:
    """The Hugging Face style config.json of a built-in model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # Untied: the output head gets its own scale, independent of the embedding.
        "tie_word_embeddings": False,
        "vocab_size": _VOCAB_SIZE,
        "bos_token_id": _BOS,
        "eos_token_id": [_EOS, _END],
        "pad_token_id": _PAD,
        "torch_dtype": "float32",
        "mlxd_builtin": {"name": name, "version": VERSION, **asdict(spec)},
    }


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _REQUIRED_FILES)


def _move_aside(folder: Path) -> None:
    aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".broken", dir=folder.parent))
    with contextlib.suppress(OSError):  # someone else moved or replaced it meanwhile
        folder.rename(aside / folder.name)
    shutil.rmtree(aside, ignore_errors=True)


def _write_model(name: str, spec: BuiltinSpec, folder: Path) -> None:
    from safetensors.numpy import save_file

    weights = {tname: _tensor(spec, tname, shape, std) for tname, shape, std in _tensor_plan(spec)}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", builtin_config(name, spec))
    _write_json(folder / "tokenizer.json", _tokenizer_json())
    _write_json(folder / "tokenizer_config.json", _tokenizer_config())
    _write_json(folder / "special_tokens_map.json", _SPECIAL_MAP)
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": _BOS, "eos_token_id": [_EOS, _END], "pad_token_id": _PAD},
    )
    folder.chmod(0o755)  # mkdtemp makes it 0700; the cache is not secret.


def _tensor_plan(spec: BuiltinSpec) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) of every weight; std 0 means a norm weight of ones."""
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    plan: list[tuple[str, tuple[int, ...], float]] = [
        ("model.embed_tokens.weight", (_VOCAB_SIZE, h), spec.embed_std),
    ]
    for n in range(spec.num_layers):
        p = f"model.layers.{n}"
        plan += [
            (f"{p}.input_layernorm.weight", (h,), 0.0),
            (f"{p}.self_attn.q_proj.weight", (q, h), spec.qk_gain / h**0.5),
            (f"{p}.self_attn.k_proj.weight", (kv, h), spec.qk_gain / h**0.5),
            (f"{p}.self_attn.v_proj.weight", (kv, h), spec.v_gain / h**0.5),
            (f"{p}.self_attn.o_proj.weight", (h, q), spec.out_gain / q**0.5),
            (f"{p}.post_attention_layernorm.weight", (h,), 0.0),
            (f"{p}.mlp.gate_proj.weight", (i, h), spec.mlp_gain / h**0.5),
            (f"{p}.mlp.up_proj.weight", (i, h), spec.mlp_gain / h**0.5),
            (f"{p}.mlp.down_proj.weight", (h, i), spec.out_gain / i**0.5),
        ]
    plan += [
        ("model.norm.weight", (h,), 0.0),
        ("lm_head.weight", (_VOCAB_SIZE, h), spec.lm_head_gain / h**0.5),
    ]
    return plan


def _tensor(spec: BuiltinSpec, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    if std == 0.0:
        return np.ones(shape, dtype=np.float32)
    # One stream per tensor, keyed by its name: independent of generation order.
    rng = np.random.default_rng([spec.seed, zlib.crc32(name.encode())])
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    if name == "lm_head.weight":
        w[list(_SILENT_IDS)] = 0.0
    return np.ascontiguousarray(w, dtype=np.float32)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _tokenizer_json() -> dict[str, Any]:
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    specials = (*SPECIAL_TOKENS, "<|unused0|>")
    added = [added_token(_BOS + k, tok, special=True) for k, tok in enumerate(specials)]
    # No regex split and no merges: every byte is its own token, so any UTF-8 text
    # round-trips exactly and token ids are the byte values. No post-processor: encode()
    # never adds <|bos|>. Raw prompts are taken as given, and a session's next prompt
    # extends the previous one token for token; the chat template writes <|bos|> itself.
    return bpe_tokenizer(vocab, [], added=added, pre_tokenizer=byte_level(), post_processor=None)


def _tokenizer_config() -> dict[str, Any]:
    config = tokenizer_config(_SPECIAL_MAP, add_bos=False, max_length=1_000_000)
    return config | {"chat_template": CHAT_TEMPLATE}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
