"""The prefix cache over a real socket: sessionless requests resume from anonymous entries
(in memory, from disk after a restart), new sessions share a system prompt, a flood of
one-off prompts does not starve a named session, and a hash collision reuses nothing.
Every reused output is compared with a daemon that runs `--prefix-cache off`."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxd.client import Client

from .daemon_proc import DaemonProcess, assert_pool_is_the_sessions, block_bytes, short_tmpdir

TURN = 12  # generated tokens per request
BLOCK = 256  # the pool's block: the index matches whole blocks
SYSTEM = ("You are a careful assistant who answers in short plain sentences. " * 16)[:1000]


def _start(*args: str, model_cache: Path, **env: str) -> DaemonProcess:
    return DaemonProcess(short_tmpdir(), model_cache, *args, env=env).start()


def _finish(proc: DaemonProcess) -> None:
    assert proc.stop() == 0
    shutil.rmtree(proc.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cold(model_cache: Path) -> Iterator[DaemonProcess]:
    """Today's behaviour: every sessionless request runs cold."""
    proc = _start("--prefix-cache", "off", model_cache=model_cache)
    yield proc
    _finish(proc)


@pytest.fixture(scope="module")
def warm(model_cache: Path) -> Iterator[DaemonProcess]:
    proc = _start(model_cache=model_cache)
    yield proc
    _finish(proc)


def _run(path: Path, prompt: str, session: str | None = None):
    with Client(path) as client:
        return client.generate(prompt, session=session, max_tokens=TURN)


def _aligned(tokens: int) -> int:
    return tokens // BLOCK * BLOCK


def _prefix_status(client: Client) -> dict[str, float]:
    return client.status().details["prefix_cache"]  # type: ignore[no-any-return]


def _conversation(tag: str) -> str:
    return f"[{tag}] " + "Tell me about the weather in some far away city, and why. " * 10


def test_a_resent_conversation_resumes_exactly_and_keeps_one_entry(
    warm: DaemonProcess, cold: DaemonProcess, model_cache: Path
) -> None:
    with Client(warm.socket) as client:
        first = client.generate(_conversation("resend"), max_tokens=TURN)
        assert first.usage.prompt_tokens > BLOCK
        entries = _prefix_status(client)["anonymous_entries"]
        follow = _conversation("resend") + first.text + " And tomorrow?"
        second = client.generate(follow, max_tokens=TURN)
        assert second.usage.cached_tokens >= _aligned(first.usage.prompt_tokens)
        assert second.tokens == _run(cold.socket, follow).tokens
        third = client.generate(follow + second.text + " Thanks.", max_tokens=TURN)
        assert third.usage.cached_tokens >= _aligned(second.usage.prompt_tokens)
        stats = _prefix_status(client)
        assert stats["anonymous_entries"] == entries  # the conversation grew: replaced
        assert stats["hits_anonymous"] >= 2 and stats["hits_hot"] >= 2
        assert client.sessions_list() == []  # anonymous entries are not listed
        assert_pool_is_the_sessions(client, block_bytes(model_cache))


def test_a_sessionless_conversation_resumes_from_disk_after_a_restart(
    cold: DaemonProcess, model_cache: Path
) -> None:
    folder = short_tmpdir()
    try:
        proc = DaemonProcess(folder, model_cache).start()
        first = _run(proc.socket, _conversation("restart"))
        assert proc.stop() == 0  # SIGTERM: the anonymous entry is saved
        proc = DaemonProcess(folder, model_cache).start()
        follow = _conversation("restart") + first.text + " And tomorrow?"
        with Client(proc.socket) as client:
            assert _prefix_status(client)["anonymous_entries"] == 1  # found in the file headers
            second = client.generate(follow, max_tokens=TURN)
            assert second.usage.cached_tokens >= _aligned(first.usage.prompt_tokens)
            assert _prefix_status(client)["hits_disk"] == 1
            assert_pool_is_the_sessions(client, block_bytes(model_cache))
        assert second.tokens == _run(cold.socket, follow).tokens
        assert proc.stop() == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_new_sessions_sharing_a_system_prompt_prefill_it_once(
    warm: DaemonProcess, cold: DaemonProcess, model_cache: Path
) -> None:
    prompts = [f"{SYSTEM}\nUser {i}: what is {i} times {i + 3}?" for i in range(16)]
    with Client(warm.socket) as client:
        results = [
            client.generate(p, session=f"shared-{i}", max_tokens=TURN)
            for i, p in enumerate(prompts)
        ]
        system_tokens = len(SYSTEM) + 1  # bytes are tokens; <|bos|> first
        prefilled = sum(r.usage.prompt_tokens - r.usage.cached_tokens for r in results)
        suffixes = sum(r.usage.prompt_tokens - system_tokens for r in results)
        assert prefilled <= system_tokens + suffixes  # the system prompt once
        assert all(r.usage.cached_tokens >= system_tokens for r in results[1:])
        assert_pool_is_the_sessions(client, block_bytes(model_cache))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.tokens == _run(cold.socket, prompt).tokens


def test_requests_arriving_together_share_a_prefix_exactly(
    warm: DaemonProcess, cold: DaemonProcess, model_cache: Path
) -> None:
    prefix = _conversation("together") * 2
    _run(warm.socket, prefix, session="together-seed")  # a named cache they all borrow
    prompts = [f"{prefix} Question {i}: and the day after?" for i in range(8)]
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        with Client(warm.socket) as client:
            barrier.wait()
            session = f"together-{i}" if i % 2 else None  # named and sessionless mixed
            results[i] = client.generate(prompts[i], session=session, max_tokens=TURN)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == len(prompts)
    for i, prompt in enumerate(prompts):
        result = results[i]
        assert result.usage.cached_tokens >= _aligned(len(prefix))  # type: ignore[attr-defined]
        assert result.tokens == _run(cold.socket, prompt).tokens  # type: ignore[attr-defined]
    with Client(warm.socket) as client:
        assert_pool_is_the_sessions(client, block_bytes(model_cache))


def test_a_flood_of_one_off_prompts_does_not_starve_a_named_session(
    cold: DaemonProcess, model_cache: Path
) -> None:
    per_block = block_bytes(model_cache)
    budget, disk = 5 * per_block, 8 * per_block  # ~2 caches of 2 blocks in memory
    proc = _start("--kv-budget", str(budget), "--disk-budget", str(disk), model_cache=model_cache)
    try:
        with Client(proc.socket) as client:
            first = client.generate(_conversation("named"), session="named", max_tokens=TURN)
            for i in range(50):
                client.generate(f"{i:03d} one-off: " + "x y z " * 50, max_tokens=TURN)
                status = client.status()
                assert status.sessions.hot_bytes <= budget
                assert status.sessions.disk_bytes <= disk
            (named,) = client.sessions_list()
            assert named.state == "hot"  # anonymous entries were spilled first
            follow = _conversation("named") + first.text + " And tomorrow?"
            second = client.generate(follow, session="named", max_tokens=TURN)
            assert second.usage.cached_tokens >= _aligned(first.usage.prompt_tokens) > 0
            assert client.status().details["disk_errors"] == []
            assert_pool_is_the_sessions(client, per_block)
        assert second.tokens == _run(cold.socket, follow).tokens
    finally:
        _finish(proc)


def test_a_forced_hash_collision_reuses_no_wrong_cache(
    cold: DaemonProcess, model_cache: Path
) -> None:
    proc = _start(model_cache=model_cache, MLXD_FAULT_PREFIX_COLLIDE="1")
    try:
        proc.wait_for("prefix index keys forced to collide")
        with Client(proc.socket) as client:
            _run(proc.socket, _conversation("collide-a"))
            other = "Something else entirely, word after word after word. " * 12
            wrong = client.generate(other, max_tokens=TURN)
            # Every block key collides, the tokens do not: nothing reused, output exact.
            assert wrong.usage.cached_tokens == 0
            assert wrong.tokens == _run(cold.socket, other).tokens
            # A true prefix is still found among the colliding keys.
            longer = _conversation("collide-a") + " More, please."
            right = client.generate(longer, max_tokens=TURN)
            assert right.usage.cached_tokens >= _aligned(len(_conversation("collide-a")))
            assert right.tokens == _run(cold.socket, longer).tokens
            assert_pool_is_the_sessions(client, block_bytes(model_cache))
    finally:
        _finish(proc)


def test_a_short_sessionless_conversation_resumes_too(
    warm: DaemonProcess, cold: DaemonProcess
) -> None:
    """Less than a block in common: found by the scan of first blocks, not the index."""
    with Client(warm.socket) as client:
        first = client.generate("[short] What is the capital of France?", max_tokens=TURN)
        assert first.usage.prompt_tokens < BLOCK
        follow = "[short] What is the capital of France?" + first.text + " And Spain?"
        second = client.generate(follow, max_tokens=TURN)
        assert second.usage.cached_tokens >= first.usage.prompt_tokens
    assert second.tokens == _run(cold.socket, follow).tokens
