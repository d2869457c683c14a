"""Sessions over a real socket: exact resumes from memory, from disk and after a restart."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxd.client import Client

from .daemon_proc import DaemonProcess, block_bytes, other_tiny_model, short_tmpdir

TURN = 12  # generated tokens per turn


@pytest.fixture
def folder() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _conversation(i: int) -> str:
    return f"Agent {i} says: " + "tell me about the weather in some far away city. " * 3


def _turn(client: Client, prompt: str, session: str | None):
    return client.generate(prompt, session=session, max_tokens=TURN)


def _cold(path: Path, prompt: str):
    with Client(path) as client:
        return client.generate(prompt, max_tokens=TURN)


def _quarantined(state: Path) -> list[Path]:
    q = state / "quarantine"
    return [p for p in q.iterdir() if not p.name.endswith(".reason")] if q.exists() else []


def test_hot_resume_is_exact_and_reuses_the_prefix(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as client:
        first = _turn(client, _conversation(0), "hot-a")
        assert first.usage.cached_tokens == 0
        follow = _conversation(0) + first.text + " And tomorrow?"
        hot = _turn(client, follow, "hot-a")
    cold = _cold(daemon.socket, follow)
    assert hot.usage.cached_tokens >= first.usage.prompt_tokens
    assert hot.tokens == cold.tokens
    with Client(daemon.socket) as client:
        info = client.sessions_get("hot-a")
        assert info.state == "hot" and info.tokens >= hot.usage.prompt_tokens
        # A diverging conversation reuses only the common prefix, and is still exact.
        other = _conversation(0)[:20] + " something else entirely"
        diverged = _turn(client, other, "hot-a")
        assert 0 < diverged.usage.cached_tokens <= 20 + 1
    assert diverged.tokens == _cold(daemon.socket, other).tokens


def test_fork_shares_the_prefix_and_leaves_the_original(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as client:
        first = _turn(client, _conversation(1), "fork-src")
        forked = client.sessions_fork("fork-src", "fork-dst")
        assert forked.tokens == client.sessions_get("fork-src").tokens
        follow = _conversation(1) + first.text + " Why?"
        from_fork = _turn(client, follow, "fork-dst")
        from_src = _turn(client, follow, "fork-src")
        assert from_fork.usage.cached_tokens > 0
        assert from_fork.tokens == from_src.tokens == _cold(daemon.socket, follow).tokens
        assert client.sessions_delete("fork-dst") is True
        assert client.sessions_delete("fork-dst") is False


def test_six_sessions_under_a_two_session_budget_all_resume_exactly(
    folder: Path, model_cache: Path
) -> None:
    _cold_start = DaemonProcess(folder, model_cache).start()  # generates the model if needed
    _cold_start.stop()
    budget = 2 * block_bytes(model_cache)
    proc = DaemonProcess(folder, model_cache, "--kv-budget", str(budget)).start()
    try:
        with Client(proc.socket) as client:
            assert client.status().pool.blocks_total == 2
            firsts = {i: _turn(client, _conversation(i), f"s{i}") for i in range(6)}
            listed = {s.session: s for s in client.sessions_list()}
            assert set(listed) == {f"s{i}" for i in range(6)}
            assert sum(1 for s in listed.values() if s.state == "hot") <= 2
            assert sum(1 for s in listed.values() if s.state == "disk") >= 4
            tiers = client.status().sessions
            assert tiers.hot <= 2 and tiers.disk >= 4 and tiers.disk_bytes > 0
            seconds = {}
            for i in range(6):
                follow = _conversation(i) + firsts[i].text + " Go on."
                seconds[i] = (follow, _turn(client, follow, f"s{i}"))
            details = client.status().details
        for follow, result in seconds.values():
            assert result.usage.cached_tokens > 0, "spilled sessions were restored from disk"
            assert result.tokens == _cold(proc.socket, follow).tokens
        assert details["sessions_spilled"] >= 4 and details["sessions_restored"] >= 4
        assert proc.stop() == 0
    finally:
        proc.kill()


def test_sessions_survive_a_restart_exactly(folder: Path, model_cache: Path) -> None:
    proc = DaemonProcess(folder, model_cache).start()
    with Client(proc.socket) as client:
        first = _turn(client, _conversation(7), "persist")
    assert proc.stop() == 0  # SIGTERM: drain, save every session, exit 0
    files = list((folder / "state" / "sessions").glob("*/persist.safetensors"))
    assert len(files) == 1 and (files[0].stat().st_mode & 0o777) == 0o600
    follow = _conversation(7) + first.text + " Then?"
    proc = DaemonProcess(folder, model_cache).start()
    try:
        with Client(proc.socket) as client:
            assert client.sessions_get("persist").state == "disk"
            resumed = _turn(client, follow, "persist")
        assert resumed.usage.cached_tokens >= first.usage.prompt_tokens
        assert resumed.tokens == _cold(proc.socket, follow).tokens
    finally:
        proc.stop()


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":  # a byte inside the tensor data: only the checksum notices
        data[-100] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = bytearray(b"\x00\x01not a safetensors file" * 10)
    elif how == "header":
        data[0:8] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "garbage", "header"])
def test_bad_cache_files_are_quarantined_and_the_turn_runs_cold(
    folder: Path, model_cache: Path, how: str
) -> None:
    proc = DaemonProcess(folder, model_cache).start()
    with Client(proc.socket) as client:
        first = _turn(client, _conversation(3), "fragile")
    assert proc.stop() == 0
    (path,) = (folder / "state" / "sessions").glob("*/fragile.safetensors")
    _corrupt(path, how)
    follow = _conversation(3) + first.text + " More."
    proc = DaemonProcess(folder, model_cache).start()
    try:
        with Client(proc.socket) as client:
            result = _turn(client, follow, "fragile")
            assert result.usage.cached_tokens == 0
            assert client.status().details["sessions_quarantined"] == 1
        assert result.tokens == _cold(proc.socket, follow).tokens
        assert not path.exists() or path.stat().st_size != 0
        assert len(_quarantined(folder / "state")) == 1
    finally:
        proc.stop()


def test_a_cache_from_another_model_is_never_used(folder: Path, model_cache: Path) -> None:
    proc = DaemonProcess(folder, model_cache).start()
    with Client(proc.socket) as client:
        first = _turn(client, _conversation(4), "cross")
    assert proc.stop() == 0
    other = other_tiny_model(model_cache, folder / "model-b")  # a fingerprint of its own
    (a_file,) = (folder / "state" / "sessions").glob("*/cross.safetensors")
    proc = DaemonProcess(folder, model_cache, model=str(other)).start()
    try:
        with Client(proc.socket) as client:
            fingerprint = client.models_current().fingerprint
            assert not a_file.parent.name.startswith(fingerprint[:16])
            follow = _conversation(4) + first.text + " Again."
            assert _turn(client, follow, "cross").usage.cached_tokens == 0
    finally:
        proc.stop()
    # A's file planted in B's folder is refused by its fingerprint, not trusted.
    (b_folder,) = [p for p in (folder / "state" / "sessions").iterdir() if p != a_file.parent]
    shutil.copy(a_file, b_folder / "cross.safetensors")
    proc = DaemonProcess(folder, model_cache, model=str(other)).start()
    try:
        with Client(proc.socket) as client:
            assert client.status().details["sessions_quarantined"] == 1
            assert _turn(client, follow, "cross").usage.cached_tokens == 0
    finally:
        proc.stop()


def test_kv_bits_keeps_sessions_smaller_in_memory_and_on_disk(
    folder: Path, model_cache: Path
) -> None:
    DaemonProcess(folder, model_cache).start().stop()  # the model exists before we size anything
    per_token = block_bytes(model_cache) // 256
    proc = DaemonProcess(folder, model_cache, "--kv-bits", "8").start()
    try:
        with Client(proc.socket) as client:
            first = _turn(client, _conversation(5), "q8")
            hot = client.sessions_get("q8")
            assert hot.state == "hot" and hot.bytes * 3 < hot.tokens * per_token
            follow = _conversation(5) + first.text + " Next."
            second = _turn(client, follow, "q8")
            assert second.usage.cached_tokens > 0 and second.usage.completion_tokens == TURN
        assert proc.stop() == 0
        (path,) = (folder / "state" / "sessions").glob("*/q8.safetensors")
        assert path.stat().st_size * 3 < second.usage.prompt_tokens * per_token
        proc = DaemonProcess(folder, model_cache, "--kv-bits", "8").start()
        with Client(proc.socket) as client:
            third = _turn(client, follow + second.text + " And?", "q8")
            assert third.usage.cached_tokens > 0
    finally:
        proc.stop()
