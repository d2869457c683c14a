"""mlxd.daemon.kv.persistence: exact round-trips on the tiny model, validation, atomic writes."""

from __future__ import annotations

import errno
import json
import os
import stat
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import mlxd.daemon  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split

import mlx.core as mx
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from mlx_lm import load
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from mlxd.daemon.kv import cachefile as P
from mlxd.daemon.kv import snapshot as KV
from mlxd.daemon.kv.cachefile import CacheFileError, Snapshot
from mlxd.daemon.models.builtin_model import ensure_builtin

FP = "fingerprint-of-the-test-model"
# <|bos|> then bytes: the built-in tokenizer maps bytes to ids 0..255.
PROMPT = [256, *b"The quick brown fox jumps over the lazy dog, then naps in the sun."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load(str(ensure_builtin("tiny", tmp_path_factory.mktemp("models"))))[0]


def layout(model: Any) -> dict[str, Any]:
    args = model.args
    return {
        "num_layers": len(model.layers),
        "kv_heads": args.num_key_value_heads,
        "head_dim": args.hidden_size // args.num_attention_heads,
        "dtype": "float32",
    }


def argmax(logits: mx.array) -> int:
    return cast(int, mx.argmax(logits).item())


def greedy(model: Any, cache: list[Any], tokens: list[int], steps: int) -> tuple[list[int], Any]:
    """Feed tokens, then decode `steps` argmax tokens; also returns the first logits."""
    logits = model(mx.array([tokens]), cache=cache)[0, -1]
    first = np.array(logits)
    out = [argmax(logits)]
    while len(out) < steps:  # the last token is never fed, as in the daemon
        logits = model(mx.array([out[-1:]]), cache=cache)[0, -1]
        out.append(argmax(logits))
    return out, first


def prefill(model: Any, tokens: list[int]) -> list[Any]:
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([tokens]), cache=cache))
    return cache


def round_trip(path: Path, snap: P.Snapshot, model: Any) -> P.Snapshot:
    P.write_snapshot(path, snap, fingerprint=FP, session="s1")
    return P.read_snapshot(path, fingerprint=FP, **layout(model))


# --- round trips --------------------------------------------------------------------


def test_round_trip_continues_exactly_like_the_original_and_a_cold_run(
    tiny: Any, tmp_path: Path
) -> None:
    split = len(PROMPT) - 7
    cold, _ = greedy(tiny, make_prompt_cache(tiny), PROMPT, 32)

    cache = prefill(tiny, PROMPT[:split])
    snap = KV.snapshot(cache, PROMPT[:split])
    path = tmp_path / "s1.safetensors"
    written = P.write_snapshot(path, snap, fingerprint=FP, session="s1")
    assert written == path.stat().st_size
    back = P.read_snapshot(path, fingerprint=FP, **layout(tiny))
    assert back.tokens == PROMPT[:split]
    assert back.arrays.keys() == snap.arrays.keys()
    for name, a in snap.arrays.items():
        assert a.shape == (1, 2, split, 64)
        assert np.array_equal(back.arrays[name], a)

    restored = KV.restore(back)
    assert all(type(c) is KVCache and c.offset == split for c in restored)
    from_original, logits_original = greedy(tiny, cache, PROMPT[split:], 32)
    from_restored, logits_restored = greedy(tiny, restored, PROMPT[split:], 32)
    assert np.array_equal(logits_original, logits_restored)  # bit for bit
    assert from_restored == from_original == cold


def test_second_turn_from_disk_matches_a_cold_run_of_the_whole_conversation(
    tiny: Any, tmp_path: Path
) -> None:
    cache = make_prompt_cache(tiny)
    reply, _ = greedy(tiny, cache, PROMPT, 16)
    # The last reply token was sampled but never fed, so the cache holds one fewer.
    held = PROMPT + reply[:-1]
    restored = KV.restore(round_trip(tmp_path / "s.safetensors", KV.snapshot(cache, held), tiny))
    turn2 = [reply[-1], *b" And then?"]
    warm, _ = greedy(tiny, restored, turn2, 24)
    cold, _ = greedy(tiny, make_prompt_cache(tiny), held + turn2, 24)
    assert warm == cold


def test_the_file_is_plain_safetensors(tiny: Any, tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    snap = KV.snapshot(prefill(tiny, PROMPT), PROMPT)
    P.write_snapshot(path, snap, fingerprint=FP, session="abc")
    loaded = safetensors.numpy.load_file(str(path))
    assert loaded.keys() == snap.arrays.keys()
    for name, a in snap.arrays.items():
        assert loaded[name].dtype == a.dtype and np.array_equal(loaded[name], a), name
    with safetensors.safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    assert meta == P.read_metadata(path)
    assert meta["session"] == "abc" and meta["n_tokens"] == str(len(PROMPT))
    assert json.loads(meta["tokens"]) == PROMPT
    assert meta["checksum"] == P.compute_checksum(meta, snap.arrays)


def test_writing_a_file_does_not_hold_a_second_copy_of_the_cache(tmp_path: Path) -> None:
    # A spill happens while the daemon is busy; the file goes out from the snapshot's own
    # arrays, not from a file-sized bytes object built first.
    keys = np.random.default_rng(0).standard_normal((1, 4, 2048, 64), dtype=np.float32)
    snap = Snapshot(list(range(2048)), {"layers.0.keys": keys, "layers.0.values": keys + 1},
                    kv_bits=0, group_size=0, dtype="float32", num_layers=1)  # fmt: skip
    tracemalloc.start()
    try:
        written = P.write_snapshot(tmp_path / "s.safetensors", snap, fingerprint=FP, session="s")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert written == (tmp_path / "s.safetensors").stat().st_size > snap.nbytes
    assert peak < snap.nbytes / 4, f"{peak} bytes allocated to write {snap.nbytes}"
    back = P.read_snapshot(tmp_path / "s.safetensors", fingerprint=FP, num_layers=1, kv_heads=4,
                           head_dim=64, dtype="float32")  # fmt: skip
    assert all(np.array_equal(back.arrays[k], a) for k, a in snap.arrays.items())


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_round_trips_bit_exactly(dtype: mx.Dtype, tmp_path: Path) -> None:
    cache, written = [], []
    for _ in range(2):
        k, v = (mx.random.normal((1, 2, 5, 64)).astype(dtype) for _ in range(2))
        c = KVCache()
        c.update_and_fetch(k, v)
        cache.append(c)
        written.append((k, v))
    name = str(dtype).rsplit(".", 1)[-1]
    P.write_snapshot(tmp_path / "s", KV.snapshot(cache, range(5)), fingerprint=FP, session="s")
    snap = P.read_snapshot(
        tmp_path / "s", fingerprint=FP, num_layers=2, kv_heads=2, head_dim=64, dtype=name
    )
    for (k, v), r in zip(written, KV.restore(snap), strict=True):
        assert r.keys is not None and r.values is not None
        assert r.keys.dtype == dtype and r.offset == 5
        assert mx.array_equal(r.keys, k).item() and mx.array_equal(r.values, v).item()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_round_trip_restores_a_mergeable_float_cache(
    tiny: Any, tmp_path: Path, bits: int
) -> None:
    cache = prefill(tiny, PROMPT)
    snap = KV.snapshot(cache, PROMPT, kv_bits=bits)
    assert snap.nbytes < KV.snapshot(cache, PROMPT).nbytes
    back = round_trip(tmp_path / "q.safetensors", snap, tiny)
    assert (back.kv_bits, back.group_size) == (bits, P.GROUP_SIZE)
    restored = KV.restore(back)
    for c in restored:
        assert c.keys is not None and c.values is not None
        assert type(c) is KVCache and c.offset == len(PROMPT)
        assert c.keys.shape == c.values.shape == (1, 2, len(PROMPT), 64)
        assert c.keys.dtype == mx.float32
    merged = BatchKVCache.merge([restored[0], prefill(tiny, PROMPT[:9])[0]])
    assert merged.keys.shape[:3] == (2, 2, len(PROMPT))
    tokens, _ = greedy(tiny, restored, [32], 16)
    assert len(tokens) == 16


def test_hot_quantized_cache_snapshots_as_is(tiny: Any) -> None:
    cache = prefill(tiny, PROMPT)
    hot = KV.quantize_cache(cache, 8)
    assert KV.cache_nbytes(hot) < KV.cache_nbytes(cache)
    direct = KV.snapshot(cache, PROMPT, kv_bits=8)
    from_hot = KV.snapshot(hot, PROMPT)
    assert from_hot.kv_bits == 8
    for name, a in direct.arrays.items():
        assert np.array_equal(from_hot.arrays[name], a)
    for c, d in zip(KV.dequantize_cache(hot), KV.restore(direct), strict=True):
        assert c.offset == d.offset and mx.array_equal(c.keys, d.keys).item()


def test_snapshot_refuses_a_token_list_that_does_not_match_the_cache(tiny: Any) -> None:
    cache = prefill(tiny, PROMPT)
    with pytest.raises(ValueError, match="holds"):
        KV.snapshot(cache, PROMPT[:-1])
    with pytest.raises(ValueError, match="kv_bits"):
        KV.snapshot(cache, PROMPT, kv_bits=3)


# --- validation ---------------------------------------------------------------------

LAYOUT = {"num_layers": 2, "kv_heads": 2, "head_dim": 64, "dtype": "float32"}
N = 10


def write_valid(path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        f"layers.{i}.{kv}": rng.standard_normal((1, 2, N, 64), dtype=np.float32)
        for i in range(2)
        for kv in ("keys", "values")
    }
    snap = P.Snapshot(list(range(N)), arrays, 0, 0, "float32", 2)
    P.write_snapshot(path, snap, fingerprint=FP, session="s")


def rewrite(path: Path, meta: dict[str, str] | None = None, **arrays: Any) -> None:
    """Re-save with changed metadata/tensors and a checksum that matches the change."""
    with safetensors.safe_open(str(path), framework="np") as f:
        old_meta = f.metadata()
    tensors = safetensors.numpy.load_file(str(path))
    tensors.update({k.replace("__", "."): v for k, v in arrays.items()})
    new = {**old_meta, **(meta or {})}
    new["checksum"] = P.compute_checksum(new, tensors)
    safetensors.numpy.save_file(tensors, str(path), metadata=new)


def flip_last_byte(path: Path) -> dict[str, Any]:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    return {}


def truncate(path: Path) -> dict[str, Any]:
    os.truncate(path, path.stat().st_size - 100)
    return {}


def tiny_garbage(path: Path) -> dict[str, Any]:
    path.write_bytes(b"abc")
    return {}


def garbage_header(path: Path) -> dict[str, Any]:
    path.write_bytes((64).to_bytes(8, "little") + b"\xff\xfe not json at all " * 8)
    return {}


def header_past_end(path: Path) -> dict[str, Any]:
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    return {}


def n_tokens_mismatch(path: Path) -> dict[str, Any]:
    rewrite(path, {"n_tokens": str(N + 1)})
    return {}


def token_dim_mismatch(path: Path) -> dict[str, Any]:
    rewrite(path, {"tokens": json.dumps(list(range(N - 1))), "n_tokens": str(N - 1)})
    return {}


def wrong_format(path: Path) -> dict[str, Any]:
    rewrite(path, {"format": "something-else"})
    return {}


def extra_tensor(path: Path) -> dict[str, Any]:
    rewrite(path, layers__9__keys=np.zeros((1, 2, N, 64), np.float32))
    return {}


CASES: dict[str, tuple[Callable[[Path], dict[str, Any]], str]] = {
    "corrupt byte": (flip_last_byte, "checksum mismatch"),
    "truncated": (truncate, "truncated"),
    "tiny garbage": (tiny_garbage, "only 3 bytes"),
    "garbage header": (garbage_header, "not JSON"),
    "header past end": (header_past_end, "points past the end"),
    "fingerprint": (lambda p: {"fingerprint": "another-model"}, "fingerprint mismatch"),
    "num_layers": (lambda p: {"num_layers": 3}, "2 layers, the model 3"),
    "head_dim": (lambda p: {"head_dim": 128}, "this model needs"),
    "dtype": (lambda p: {"dtype": "bfloat16"}, "model dtype"),
    "n_tokens": (n_tokens_mismatch, f"n_tokens {N + 1} but {N} tokens"),
    "token dim": (token_dim_mismatch, f"holds {N} tokens, metadata says {N - 1}"),
    "format": (wrong_format, "not an mlxd KV cache"),
    "extra tensor": (extra_tensor, "unexpected ['layers.9.keys']"),
}


def reason_for(tmp_path: Path, case: str) -> str:
    path = tmp_path / f"{case.replace(' ', '_')}.safetensors"
    write_valid(path)
    P.read_snapshot(path, fingerprint=FP, **LAYOUT)  # valid before the damage
    kwargs = {**LAYOUT, "fingerprint": FP, **CASES[case][0](path)}
    with pytest.raises(CacheFileError) as info:
        P.read_snapshot(path, **kwargs)
    assert info.value.path == path
    return info.value.reason


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_rejected_with_its_reason(tmp_path: Path, case: str) -> None:
    assert CASES[case][1] in reason_for(tmp_path, case)


def test_every_failure_has_a_distinct_reason(tmp_path: Path) -> None:
    reasons = [reason_for(tmp_path, case) for case in CASES]
    assert len(set(reasons)) == len(reasons)


@pytest.mark.parametrize("case", ["tiny garbage", "garbage header", "header past end", "format"])
def test_read_metadata_rejects_garbage(tmp_path: Path, case: str) -> None:
    path = tmp_path / "s.safetensors"
    write_valid(path)
    assert P.read_metadata(path)["n_tokens"] == str(N)
    CASES[case][0](path)
    with pytest.raises(CacheFileError, match=CASES[case][1]):
        P.read_metadata(path)


# --- durability ---------------------------------------------------------------------


def _enospc_on_second_write(real: Callable[[int, Any], int]) -> Callable[[int, Any], int]:
    calls = 0

    def write(fd: int, data: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real(fd, data[: len(data) // 2])  # a short write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def _raise(code: int) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("target", "code"), [("write", errno.ENOSPC), ("fsync", errno.EIO), ("replace", errno.EIO)]
)
def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, code: int
) -> None:
    path = tmp_path / "s.safetensors"
    write_valid(path)
    before = path.read_bytes()
    arrays = {
        f"layers.{i}.{kv}": np.ones((1, 2, 3, 64), np.float32)
        for i in range(2)
        for kv in ("keys", "values")
    }
    snap = P.Snapshot([1, 2, 3], arrays, 0, 0, "float32", 2)
    fake = _enospc_on_second_write(os.write) if target == "write" else _raise(code)
    with monkeypatch.context() as m, pytest.raises(OSError) as info:
        m.setattr(os, target, fake)
        P.write_snapshot(path, snap, fingerprint=FP, session="s")
    assert info.value.errno == code
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]
    assert P.read_snapshot(path, fingerprint=FP, **LAYOUT).tokens == list(range(N))


def test_a_shard_file_is_read_only_by_the_same_rank_of_a_group_of_that_size(
    tiny: Any, tmp_path: Path
) -> None:
    path = tmp_path / "s1.safetensors"
    snap = KV.snapshot(prefill(tiny, PROMPT), PROMPT)
    P.write_snapshot(path, snap, fingerprint=FP, session="s1", shard="tensor 0/2")
    assert P.read_metadata(path)["shard"] == "tensor 0/2"
    read = P.read_snapshot(path, fingerprint=FP, shard="tensor 0/2", **layout(tiny))
    assert read.tokens == PROMPT
    for shard, reader in [
        ("", "a single-process daemon"),
        ("tensor 1/2", "rank 1 of a 2-rank tensor-parallel group"),
        ("tensor 0/4", "rank 0 of a 4-rank tensor-parallel group"),
    ]:
        with pytest.raises(CacheFileError) as refused:
            P.read_snapshot(path, fingerprint=FP, shard=shard, **layout(tiny))
        assert refused.value.reason.startswith(
            f"written by rank 0 of a 2-rank tensor-parallel group, read by {reader}"
        )
    # A single process's file (no shard) is refused by a rank just as clearly.
    P.write_snapshot(path, snap, fingerprint=FP, session="s1")
    with pytest.raises(CacheFileError, match="written by a single-process daemon, read by rank 1"):
        P.read_snapshot(path, fingerprint=FP, shard="tensor 1/2", **layout(tiny))


def test_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_valid(tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s.safetensors").stat().st_mode) == 0o600


def test_quarantine_moves_the_file_aside_with_its_reason(tmp_path: Path) -> None:
    qdir = tmp_path / "quarantine"
    moved = []
    for _ in range(2):  # same name twice: both kept
        path = tmp_path / "s.safetensors"
        write_valid(path)
        moved.append(P.quarantine(path, qdir, "checksum mismatch: the data is corrupt"))
        assert not path.exists()
    assert moved[0] != moved[1] and all(p.parent == qdir and p.is_file() for p in moved)
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700
    note = moved[0].with_name(moved[0].name + ".reason").read_text()
    assert "checksum mismatch" in note


def test_remove_temp_files_deletes_only_leftovers(tmp_path: Path) -> None:
    write_valid(tmp_path / "s.safetensors")
    (tmp_path / ".s.safetensors.123.ab12cd34.tmp").write_bytes(b"half")
    (tmp_path / "other.tmp").write_bytes(b"")
    assert P.remove_temp_files(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    assert P.remove_temp_files(tmp_path / "missing") == 0
