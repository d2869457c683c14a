"""Faults injected at each engine callback: every request still gets one reply, the failed
job's slot, turn and blocks are freed, and the daemon keeps serving."""

from __future__ import annotations

import threading
from pathlib import Path

import msgspec
import pytest

from mlxd import rpc
from mlxd.client import Client

from .daemon_proc import DaemonProcess, RawConnection, blocks_beyond_anonymous

# Long enough to cross a 256-token block, so the sessions hold more than one block.
_PROMPT = "a conversation that grows past one pool block " * 40


def _replies(proc: DaemonProcess, count: int, max_tokens: int = 8) -> list[rpc.Response]:
    """`count` concurrent generates, each on its own session and connection."""
    out: list[rpc.Response | BaseException] = [RuntimeError("no reply")] * count

    def one(i: int) -> None:
        try:
            conn = RawConnection(proc.socket, timeout=30)
            params = {
                "prompt": f"{i} {_PROMPT}",
                "max_tokens": max_tokens,
                "stream": True,
                "session": f"s{i}",
            }
            conn.request(1, "generate", params)
            reply = conn.reply(1)
            assert isinstance(reply, rpc.Response)
            out[i] = reply
            conn.close()
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for result in out:
        if isinstance(result, BaseException):
            raise AssertionError(f"a request got no reply: {result!r}")
    return out  # type: ignore[return-value]


def _still_serving(proc: DaemonProcess, count: int) -> None:
    with Client(proc.socket, timeout=30) as client:
        for i in range(count):  # every session's turn was released
            result = client.generate(f"{i} {_PROMPT} and more", max_tokens=4, session=f"s{i}")
            assert result.finish_reason in ("stop", "length")
        plain = client.generate("a normal request", max_tokens=4)
        assert plain.finish_reason in ("stop", "length")
        for i in range(count):
            client.sessions_delete(f"s{i}")
        status = client.status()
    assert status.state == "ok", status.state
    assert status.active == 0
    assert blocks_beyond_anonymous(status) == 0, status.pool
    assert status.queue.depth == 0


@pytest.mark.parametrize(
    ("point", "failed"),
    [
        ("TOKEN", 1),  # per-token handling on the engine thread
        ("DELIVER", 1),  # handing an update to its request on the loop
        ("COMMIT", 0),  # a session's commit after its turn: the reply is already in
        ("ENGINE_STEPS", 3),  # a whole batch step: every running job fails
    ],
)
def test_a_fault_at_each_callback_still_replies_to_everyone(
    short_dir: Path, model_cache: Path, point: str, failed: int
) -> None:
    proc = DaemonProcess(short_dir, model_cache, env={f"MLXD_FAULT_{point}": "1"}).start()
    try:
        replies = _replies(proc, 3)
        errors = [r.error for r in replies if r.error is not None]
        if point == "ENGINE_STEPS":  # the first step may hold fewer than all three
            assert 1 <= len(errors) <= 3
        else:
            assert len(errors) == failed, errors
        for error in errors:
            assert error.code == rpc.ErrorCode.INTERNAL_ERROR, error
            assert "injected fault" in error.message
        _still_serving(proc, 3)
    finally:
        assert proc.stop() == 0


def test_repeated_token_faults_fail_each_job_alone(short_dir: Path, model_cache: Path) -> None:
    # Two faults: two of four concurrent jobs fail, the other two complete normally.
    proc = DaemonProcess(short_dir, model_cache, env={"MLXD_FAULT_TOKEN": "2"}).start()
    try:
        replies = _replies(proc, 4, max_tokens=16)
        assert sum(r.error is not None for r in replies) == 2
        ok = [r for r in replies if r.error is None]
        assert all(msgspec.json.decode(r.result)["usage"]["completion_tokens"] > 0 for r in ok)
        _still_serving(proc, 4)
    finally:
        assert proc.stop() == 0


def test_a_fault_on_the_final_token_still_replies(short_dir: Path, model_cache: Path) -> None:
    # max_tokens 1: the faulty step is each job's last, whose outcome was lost with it.
    proc = DaemonProcess(short_dir, model_cache, env={"MLXD_FAULT_TOKEN": "1"}).start()
    try:
        replies = _replies(proc, 3, max_tokens=1)
        assert sum(r.error is not None for r in replies) == 1
        _still_serving(proc, 3)
    finally:
        assert proc.stop() == 0


def test_kv_bits_4_on_a_head_dim_quantize_refuses_fails_only_that_request(
    short_dir: Path, model_cache: Path
) -> None:
    # A real per-token failure: head_dim 32 is not a multiple of the quantization group
    # (64), so quantizing a session's cache at the end of its turn raises in mx.quantize.
    from mlxd.daemon.models.builtin_model import BuiltinSpec, _write_model

    folder = short_dir / "head-dim-32"
    spec = BuiltinSpec(
        hidden_size=128, num_layers=2, intermediate_size=256, num_heads=4, num_kv_heads=2,
        max_position_embeddings=2048, seed=3,
    )  # fmt: skip
    folder.mkdir()
    _write_model("head-dim-32", spec, folder)
    proc = DaemonProcess(short_dir, model_cache, "--kv-bits", "4", model=str(folder)).start()
    try:
        with Client(proc.socket, timeout=30) as client:
            with pytest.raises(rpc.RpcError) as failure:
                client.generate("a session turn", max_tokens=4, session="q")
            assert failure.value.code == rpc.ErrorCode.INTERNAL_ERROR
            plain = client.generate("no session, nothing to quantize", max_tokens=4)
            assert plain.usage.completion_tokens == 4
            status = client.status()
        assert status.state == "ok" and status.active == 0
    finally:
        assert proc.stop() == 0
