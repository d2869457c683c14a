"""A small GGUF writer for tests: metadata, F32 / F16 / Q4_0 / Q8_0 tensors, any raw type."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "F16",
    "F32",
    "Q4_0",
    "Q4_K",
    "Q8_0",
    "byte_level_tokens",
    "llama_permute",
    "q4_0_dequantize",
    "q8_0_dequantize",
    "tiny_llama_gguf",
    "write_gguf",
]

F32, F16, Q4_0, Q8_0, Q4_K = 0, 1, 2, 8, 12
_ALIGN = 32


def write_gguf(
    path: Path,
    metadata: dict[str, Any],
    tensors: dict[str, tuple[int, tuple[int, ...], bytes]],
) -> Path:
    """tensors: name -> (ggml type, GGUF dims (fastest first), raw data bytes)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        out += _string(key) + _value(value)
    offset, blobs = 0, []
    for name, (ggml_type, dims, data) in tensors.items():
        out += _string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        out += struct.pack("<IQ", ggml_type, offset)
        pad = -len(data) % _ALIGN
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    out += b"\0" * (-len(out) % _ALIGN)
    path.write_bytes(bytes(out) + b"".join(blobs))
    return path


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(v: Any) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _string(v)
    if isinstance(v, list) and v and isinstance(v[0], str):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_string(x) for x in v)
    if isinstance(v, list):
        return struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)
    raise TypeError(type(v))


# -- tensor encodings (rows of 32-element blocks, as ggml stores them) ---------------


def f32(w: np.ndarray) -> tuple[int, tuple[int, ...], bytes]:
    return F32, tuple(reversed(w.shape)), np.ascontiguousarray(w, np.float32).tobytes()


def q8_0(w: np.ndarray) -> tuple[int, tuple[int, ...], bytes]:
    blocks = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    d16 = d.astype(np.float16)
    q = np.round(blocks / np.where(d16 == 0, 1, d16.astype(np.float32))).astype(np.int8)
    raw = np.concatenate([d16.view(np.uint8), q.view(np.uint8)], axis=1)
    return Q8_0, tuple(reversed(w.shape)), raw.tobytes()


def q8_0_dequantize(w: np.ndarray) -> np.ndarray:
    _, _, raw = q8_0(w)
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(w.shape)


def q4_0(w: np.ndarray) -> tuple[int, tuple[int, ...], bytes]:
    blocks = w.reshape(-1, 32).astype(np.float32)
    idx = np.abs(blocks).argmax(axis=1)
    mx_ = blocks[np.arange(len(blocks)), idx][:, None]
    d16 = (mx_ / -8.0).astype(np.float16)
    inv = np.where(d16 == 0, 0, 1 / np.where(d16 == 0, 1, d16.astype(np.float32)))
    q = np.clip(np.floor(blocks * inv + 8.5), 0, 15).astype(np.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)
    raw = np.concatenate([d16.view(np.uint8), packed], axis=1)
    return Q4_0, tuple(reversed(w.shape)), raw.tobytes()


def q4_0_dequantize(w: np.ndarray) -> np.ndarray:
    _, _, raw = q4_0(w)
    blocks = np.frombuffer(raw, np.uint8).reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    packed = blocks[:, 2:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
    return ((q - 8) * d).reshape(w.shape)


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# -- a tiny Llama -------------------------------------------------------------------


def byte_level_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2


def tiny_llama(seed: int = 0) -> dict[str, np.ndarray]:
    """HF-layout weights of a 2-layer Llama (the layout mlx-lm wants), by mlx-lm name."""
    rng = np.random.default_rng(seed)
    vocab, head_dim = len(SPECIALS) + 256 + 5, HIDDEN // HEADS

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = {"model.embed_tokens.weight": r(vocab, HIDDEN), "model.norm.weight": 1 + r(HIDDEN)}
    for n in range(LAYERS):
        p = f"model.layers.{n}"
        w |= {
            f"{p}.input_layernorm.weight": 1 + r(HIDDEN),
            f"{p}.post_attention_layernorm.weight": 1 + r(HIDDEN),
            f"{p}.self_attn.q_proj.weight": r(HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.k_proj.weight": r(KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.v_proj.weight": r(KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.o_proj.weight": r(HIDDEN, HEADS * head_dim),
            f"{p}.mlp.gate_proj.weight": r(FFN, HIDDEN),
            f"{p}.mlp.up_proj.weight": r(FFN, HIDDEN),
            f"{p}.mlp.down_proj.weight": r(HIDDEN, FFN),
        }
    return w


def tiny_llama_gguf(
    path: Path,
    seed: int = 0,
    arch: str = "llama",
    linear_type: int = Q4_0,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """The tiny Llama as llama.cpp's converter writes it: q/k rows permuted, an 8-bit
    embedding and 4-bit linears (like SmolLM2's Q4_1 file), F32 norms, byte-level BPE."""
    hf = tiny_llama(seed)
    tokens = SPECIALS + byte_level_tokens() + ["Ġt", "he", "Ġthe", "in", "Ġa"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.alignment": _ALIGN,
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.block_count": LAYERS,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.context_length": 512,
        f"{arch}.vocab_size": len(tokens),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": TEMPLATE,
        **(extra_meta or {}),
    }
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    encode = {Q4_0: q4_0, Q8_0: q8_0, F32: f32}.get(linear_type)
    tensors: dict[str, tuple[int, tuple[int, ...], bytes]] = {
        "token_embd.weight": q8_0(hf["model.embed_tokens.weight"]),
        "output_norm.weight": f32(hf["model.norm.weight"]),
    }
    for n in range(LAYERS):
        for hf_name, gg in names.items():
            w = hf[f"model.layers.{n}.{hf_name}.weight"]
            if gg == "attn_q":
                w = llama_permute(w, HEADS)
            elif gg == "attn_k":
                w = llama_permute(w, KV_HEADS)
            if w.ndim == 1:
                tensors[f"blk.{n}.{gg}.weight"] = f32(w)
            elif encode is None:  # a type this writer cannot encode: raw bytes, right size
                tensors[f"blk.{n}.{gg}.weight"] = (linear_type, tuple(reversed(w.shape)),
                                                   b"\0" * (w.size // 256 * 144))  # fmt: skip
            else:
                tensors[f"blk.{n}.{gg}.weight"] = encode(w)
    return write_gguf(path, meta, tensors)
