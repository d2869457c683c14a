"""Session bookkeeping over a real socket: conversations that grow past 256-token blocks,
deletes and forks racing running turns, forks under a small `--kv-budget`. After every
test the pool holds exactly the blocks of the sessions that remain."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mlxd import rpc
from mlxd.client import Client

from .daemon_proc import (
    DaemonProcess,
    RawConnection,
    assert_pool_is_the_sessions,
    block_bytes,
    short_tmpdir,
)

MORE = " more words " * 30  # ~60 tokens: four turns cross at least one block boundary
LONG = 400  # tokens of a turn that is still running while the test races it


@pytest.fixture
def folder() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _serving(
    folder: Path, model_cache: Path, *args: str, **env: str
) -> Iterator[tuple[DaemonProcess, Client, int]]:
    """A daemon, a client of it and the bytes of one pool block; a clean exit at the end."""
    proc = DaemonProcess(folder, model_cache, *args, env=env).start()
    try:
        with Client(proc.socket) as client:
            yield proc, client, block_bytes(model_cache)
    finally:
        assert proc.stop() == 0


def _budget(model_cache: Path, blocks: int) -> str:
    if not list((model_cache / "models").glob("builtin-tiny-*")):
        scratch = short_tmpdir()  # a first daemon generates the model
        DaemonProcess(scratch, model_cache).start().stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return str(blocks * block_bytes(model_cache))


def _wait_queued(client: Client, depth: int) -> None:
    """Until `depth` requests wait (for a session's turn or the pool)."""
    deadline = time.monotonic() + 30
    while client.status().queue.depth < depth:
        assert time.monotonic() < deadline, "requests never queued"
        time.sleep(0.01)


def _grow(client: Client, session: str, turns: int, prompt: str) -> str:
    for _ in range(turns):
        reply = client.generate(prompt, session=session, max_tokens=8)
        prompt = prompt + reply.text + MORE
    return prompt


def _running(socket: Path, session: str, prompt: str, id: int = 1) -> RawConnection:
    """A streaming turn on `session`, known to be running once this returns."""
    conn = RawConnection(socket)
    params = {"prompt": prompt, "session": session, "max_tokens": LONG, "stream": True}
    conn.request(id, "generate", params)
    assert isinstance(conn.next(), rpc.Notification)
    return conn


def _behind(
    client: Client, socket: Path, id: int, method: str, params: object, depth: int = 1
) -> RawConnection:
    """Send a request that must wait (for a session's turn); return once `depth` wait."""
    conn = RawConnection(socket)
    conn.request(id, method, params)
    _wait_queued(client, depth)
    return conn


def _error_code(conn: RawConnection, id: int) -> int | None:
    reply = conn.reply(id)
    assert isinstance(reply, rpc.Response)
    return None if reply.error is None else reply.error.code


def test_growing_turns_free_every_block_on_delete(folder: Path, model_cache: Path) -> None:
    with _serving(folder, model_cache) as (_, client, per_block):
        prompt = "A conversation that keeps growing." + MORE
        for _ in range(4):
            reply = client.generate(prompt, session="grow", max_tokens=8)
            assert_pool_is_the_sessions(client, per_block)
            prompt = prompt + reply.text + MORE
        assert client.sessions_get("grow").tokens > 2 * 256  # crossed block boundaries
        assert client.sessions_delete("grow") is True
        assert client.status().pool.blocks_used == 0


def test_delete_of_a_busy_session_discards_the_turn_and_refuses_the_queued_one(
    folder: Path, model_cache: Path
) -> None:
    budget = _budget(model_cache, 8)
    with _serving(folder, model_cache, "--kv-budget", budget) as (proc, client, per_block):
        for round in range(3):
            prompt = _grow(client, "busy", 3, f"Round {round} of a doomed conversation.")
            running = _running(proc.socket, "busy", prompt)
            queued = _behind(
                client, proc.socket, 2, "generate", {"prompt": prompt, "session": "busy"}
            )
            assert client.sessions_get("busy").state == "busy"
            assert client.sessions_delete("busy") is True  # at once, not after the turn
            assert [s.session for s in client.sessions_list()] == []
            # A turn arriving after the delete starts a new, empty session.
            fresh = client.generate(prompt, session="busy", max_tokens=4)
            assert fresh.usage.cached_tokens == 0
            assert _error_code(running, 1) is None  # the running turn finishes
            assert _error_code(queued, 2) == rpc.ErrorCode.SESSION_NOT_FOUND
            running.close()
            queued.close()
            assert client.sessions_delete("busy") is True
            assert_pool_is_the_sessions(client, per_block)
            assert client.status().pool.blocks_used == 0
        # Nothing leaked: a request needing most of the pool is served.
        big = client.generate("x " * 700, max_tokens=8)
        assert big.usage.prompt_tokens > 5 * 256 - 8
        assert_pool_is_the_sessions(client, per_block)


def test_fork_onto_a_name_created_while_it_waited_is_refused(
    folder: Path, model_cache: Path
) -> None:
    with _serving(folder, model_cache) as (proc, client, per_block):
        prompt = _grow(client, "src", 3, "A source conversation.")
        running = _running(proc.socket, "src", prompt)
        fork = _behind(
            client, proc.socket, 2, "sessions/fork", {"session": "src", "new_session": "dst"}
        )
        made = client.generate("Someone else's conversation.", session="dst", max_tokens=2)
        tokens = client.sessions_get("dst").tokens
        assert tokens == made.usage.prompt_tokens + 2
        assert _error_code(running, 1) is None
        assert _error_code(fork, 2) == rpc.ErrorCode.INVALID_PARAMS
        assert client.sessions_get("dst").tokens == tokens  # not replaced
        running.close()
        fork.close()
        assert_pool_is_the_sessions(client, per_block)
        for name in ("src", "dst"):
            assert client.sessions_delete(name) is True
        assert client.status().pool.blocks_used == 0


def test_two_identical_forks_at_once_one_wins(folder: Path, model_cache: Path) -> None:
    with _serving(folder, model_cache) as (proc, client, per_block):
        prompt = _grow(client, "twin-src", 3, "A conversation forked twice at once.")
        running = _running(proc.socket, "twin-src", prompt)
        params = {"session": "twin-src", "new_session": "twin"}
        forks = [_behind(client, proc.socket, i, "sessions/fork", params, i + 1) for i in (0, 1)]
        assert _error_code(running, 1) is None
        codes = sorted(_error_code(conn, i) or 0 for i, conn in enumerate(forks))
        assert codes == [rpc.ErrorCode.INVALID_PARAMS, 0]
        assert client.sessions_get("twin").tokens == client.sessions_get("twin-src").tokens
        for conn in (running, *forks):
            conn.close()
        assert_pool_is_the_sessions(client, per_block)
        for name in ("twin", "twin-src"):
            assert client.sessions_delete(name) is True
        assert client.status().pool.blocks_used == 0


def test_forks_stay_within_the_kv_budget(folder: Path, model_cache: Path) -> None:
    budget = _budget(model_cache, 4)
    with _serving(folder, model_cache, "--kv-budget", budget) as (_, client, per_block):
        # 2 < blocks < 4: no fork fits next to its source, so forks go to disk.
        prompt = _grow(client, "base", 1, "A conversation forked four times." + MORE)
        prompt = prompt[: -len(MORE) // 2]
        client.generate(prompt, session="base", max_tokens=8)
        base = client.sessions_get("base")
        assert 2 * 256 < base.tokens < 3 * 256 - 8
        for i in range(4):
            forked = client.sessions_fork("base", f"copy-{i}")
            assert forked.tokens == base.tokens
            status = client.status()
            assert status.pool.blocks_used <= status.pool.blocks_total
            assert status.sessions.hot_bytes <= 4 * per_block
            assert_pool_is_the_sessions(client, per_block)
        # Each copy resumes exactly, from memory or disk.
        follow = prompt + " And then?"
        cold = client.generate(follow, max_tokens=8)
        for i in range(4):
            warm = client.generate(follow, session=f"copy-{i}", max_tokens=8)
            assert warm.usage.cached_tokens >= base.tokens - 8
            assert warm.tokens == cold.tokens
            assert_pool_is_the_sessions(client, per_block)
        for name in ("base", *(f"copy-{i}" for i in range(4))):
            assert client.sessions_delete(name) is True
        assert client.status().pool.blocks_used == 0


def test_delete_on_a_read_only_folder_forgets_the_session_and_reports_the_file(
    folder: Path, model_cache: Path
) -> None:
    with _serving(folder, model_cache, MLXD_FAULT_UNLINK_EROFS="1") as (_, client, per_block):
        _grow(client, "stuck", 2, "A session whose file cannot be removed.")
        assert client.sessions_save("stuck") == 1
        assert client.sessions_delete("stuck") is True
        assert client.sessions_list() == []
        errors = client.status().details["disk_errors"]
        assert any("delete stuck" in e and "Read-only" in e for e in errors), errors
        assert client.status().pool.blocks_used == 0
        assert_pool_is_the_sessions(client, per_block)


def test_a_turn_waiting_for_its_session_counts_in_the_queue_and_reports_its_prompt(
    folder: Path, model_cache: Path
) -> None:
    with _serving(folder, model_cache) as (proc, client, per_block):
        prompt = _grow(client, "line", 2, "A session with a line of turns.")
        running = _running(proc.socket, "line", prompt)
        queued = _behind(client, proc.socket, 2, "generate", {"prompt": prompt, "session": "line"})
        assert client.status().queue.depth == 1
        queued.send(rpc.notification("$/cancelRequest", {"id": 2}))
        reply = queued.reply(2)
        assert isinstance(reply, rpc.Response) and reply.error is not None
        assert reply.error.code == rpc.ErrorCode.REQUEST_CANCELLED
        data = reply.error.data
        assert isinstance(data, dict)
        assert data["usage"]["prompt_tokens"] == client.tokenize(prompt).count
        assert _error_code(running, 1) is None
        running.close()
        queued.close()
        assert_pool_is_the_sessions(client, per_block)
        assert client.sessions_delete("line") is True
        assert client.status().pool.blocks_used == 0
