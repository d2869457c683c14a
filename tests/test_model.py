"""Built-in models, model loading and fingerprints; greedy exactness on the tiny model."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path

import mlxd.daemon  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split

import mlx_lm
import mlx_lm.utils
import pytest
from mlx_lm.generate import batch_generate, stream_generate
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from safetensors.numpy import load_file

from mlxd.daemon.models.builtin_model import BUILTIN_MODELS, VERSION, ensure_builtin
from mlxd.daemon.models.model import LoadedModel, ModelLoadError, fingerprint, load_model

# sha256 over (name, raw float32 bytes) of every tiny weight. If numpy ever changes
# the default_rng stream, this fails: then bump builtin_model.VERSION.
TINY_WEIGHTS_SHA256 = "4737dd83be313248408090c98a909dd0b9084110f06f53ffc90a048d5ac2fbff"

TEXTS = [
    "hello world",
    "a ,b  c\ttab\nnewline",
    "café naïve é",
    "中文 日本語",
    "emoji 🎉👍🏽 and ZWJ 👨‍👩‍👧",
    "mixed: x=1; 🎉é中 end",
]


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def tiny(tiny_cache: Path) -> LoadedModel:
    return load_model("builtin:tiny", tiny_cache)


def _chat(tok: TokenizerWrapper, text: str) -> list[int]:
    msgs = [{"role": "user", "content": text}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True))


def _greedy(m: LoadedModel, prompt: list[int], max_tokens: int, **kw: object) -> list[int]:
    out = stream_generate(m.model, m.tokenizer, prompt, max_tokens=max_tokens, **kw)
    return [r.token for r in out if r.finish_reason != "stop"]


def test_builtin_generation_is_deterministic(tmp_path: Path) -> None:
    a = ensure_builtin("tiny", tmp_path / "a")
    b = ensure_builtin("tiny", tmp_path / "b")
    assert a == tmp_path / "a" / "models" / f"builtin-tiny-v{VERSION}"
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert fingerprint(a) == fingerprint(b)
    weights = load_file(str(a / "model.safetensors"))
    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode() + b"\0" + weights[k].tobytes())
    assert h.hexdigest() == TINY_WEIGHTS_SHA256


def test_tiny_is_small_enough_for_tests() -> None:
    assert BUILTIN_MODELS["tiny"].num_params() < 5_000_000
    assert 80e6 < BUILTIN_MODELS["small"].num_params() < 100e6


def test_ensure_builtin_is_idempotent_and_race_safe(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_builtin("tiny", tmp_path)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    # Nothing but the published folder is left behind by the losers.
    assert [p.name for p in (tmp_path / "models").iterdir()] == [results[0].name]
    before = (results[0] / "model.safetensors").stat().st_mtime_ns
    assert ensure_builtin("tiny", tmp_path) == results[0]
    assert (results[0] / "model.safetensors").stat().st_mtime_ns == before


def test_damaged_builtin_folder_is_regenerated(tmp_path: Path) -> None:
    folder = ensure_builtin("tiny", tmp_path)
    good = fingerprint(folder)
    (folder / "model.safetensors").unlink()
    assert ensure_builtin("tiny", tmp_path) == folder
    assert fingerprint(folder) == good


def test_unknown_builtin_name() -> None:
    with pytest.raises(ValueError, match="small, smollm2, tiny"):
        ensure_builtin("huge", Path("/nonexistent"))


def test_loads_through_mlx_lm(tiny_cache: Path) -> None:
    folder = ensure_builtin("tiny", tiny_cache)
    for load in (mlx_lm.load, mlx_lm.utils.load):
        model, tok = load(str(folder))[:2]
        assert model.model_type == "llama"
        assert tok.eos_token_ids == {257, 262}
        assert len(tok) == 264


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(tiny: LoadedModel, text: str) -> None:
    tok = tiny.tokenizer
    ids = tok.encode(text)
    # Deliberate: token ids are the UTF-8 bytes, and encode() adds no <|bos|>.
    assert ids == list(text.encode())
    assert tok.decode(ids) == text
    detok = tok.detokenizer
    pieces = []
    for i in ids:
        detok.add_token(i)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == detok.text == text


def test_chat_template(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi é"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>be brief<|end|><|user|>hi é<|end|><|assistant|>"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids[0] == tok.bos_token_id == 256
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode(ids) == text
    no_prompt = tok.apply_chat_template(msgs, tokenize=False)
    assert no_prompt == text.removesuffix("<|assistant|>")


def test_fingerprint_follows_every_byte(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(ensure_builtin("tiny", tmp_path / "cache"), folder)
    memo = tmp_path / "fingerprints.json"
    first = fingerprint(folder, memo_file=memo)
    assert memo.exists() and fingerprint(folder, memo_file=memo) == first
    weights = folder / "model.safetensors"
    st = weights.stat()
    with weights.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    # Even with size and mtime put back, the memo must not hide the change.
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = fingerprint(folder, memo_file=memo)
    assert changed != first
    assert changed == fingerprint(folder)  # the memo agrees with a fresh hash
    (folder / "tokenizer_config.json").write_text("{}")
    assert fingerprint(folder, memo_file=memo) != changed


def test_load_model(tiny: LoadedModel, tiny_cache: Path) -> None:
    folder = ensure_builtin("tiny", tiny_cache)
    assert tiny.id == "builtin:tiny"
    assert tiny.path == str(folder)
    assert tiny.fingerprint == fingerprint(folder)
    assert (tiny.type, tiny.vocab_size, tiny.context_length) == ("llama", 264, 4096)
    assert (tiny.dtype, tiny.num_layers, tiny.kv_heads, tiny.head_dim) == ("float32", 4, 2, 64)
    assert tiny.kv_bytes_per_token == 2 * 4 * 2 * 64 * 4
    by_folder = load_model(str(folder), tiny_cache)
    assert (by_folder.id, by_folder.fingerprint) == (str(folder), tiny.fingerprint)


@pytest.mark.parametrize("spec", ["/nonexistent/model", "./no-such-folder", "builtin:huge"])
def test_load_model_errors(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ModelLoadError):
        load_model(spec, tmp_path)


def test_load_model_broken_folder(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelLoadError, match="broken"):
        load_model(str(tmp_path / "broken"), tmp_path)


def _prompts(tok: TokenizerWrapper) -> list[list[int]]:
    texts = [
        "Hi",
        "The quick brown fox jumps",
        TEXTS[1],
        TEXTS[4],
        "def f(x):\n    return x * 2\n" * 3,
        "lorem ipsum dolor " * 12,
        "x" * 300,
        "Once upon a time " * 40,
    ]
    return [_chat(tok, t) for t in texts]


def test_greedy_batch_equals_single(tiny: LoadedModel) -> None:
    prompts = _prompts(tiny.tokenizer)
    assert len({len(p) for p in prompts}) == 8
    batched = batch_generate(
        tiny.model, tiny.tokenizer, prompts, max_tokens=64, return_token_ids=True
    ).token_ids
    assert batched is not None
    single = [_greedy(tiny, p, 64) for p in prompts]
    assert batched == single
    # Full length (greedy never emits EOS) and not one token repeated.
    assert all(len(s) == 64 and len(set(s)) > 4 for s in single)


def test_resumed_cache_equals_cold_run(tiny: LoadedModel, tmp_path: Path) -> None:
    first = _chat(tiny.tokenizer, "tell me a story " * 10)
    cache = make_prompt_cache(tiny.model)
    reply = _greedy(tiny, first, 32, prompt_cache=cache)
    history = first + reply
    cached = cache[0].offset  # the last reply token may not have been fed back yet
    path = str(tmp_path / "kv.safetensors")
    save_prompt_cache(path, cache)
    follow = [*tiny.tokenizer.encode("<|end|><|user|>and then?<|end|>"), 261]
    warm = _greedy(tiny, history[cached:] + follow, 64, prompt_cache=load_prompt_cache(path))
    cold = _greedy(tiny, history + follow, 64)
    assert warm == cold


def test_output_depends_on_distant_context(tiny: LoadedModel) -> None:
    # A model that only looks at the last few tokens would let a wrong KV cache pass.
    base = _chat(tiny.tokenizer, "a" + "The quick brown fox jumps over the lazy dog. " * 6)
    other = list(base)
    other[3] ^= 1
    assert _greedy(tiny, base, 16) != _greedy(tiny, other, 16)
