"""HTTP at the daemon's limits: a flooded engine answers 429 (Anthropic: 529 overloaded) with
Retry-After, and SIGTERM ends every in-flight HTTP stream with a final error event."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from mlxd.client import Client

from .daemon_proc import (
    DaemonProcess,
    blocks_beyond_anonymous,
    daemon_in_short_dir,
    free_port,
    short_tmpdir,
)

LONG = {"model": "x", "prompt": "count", "max_tokens": 4000, "stream": True}


def uds(proc: DaemonProcess) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(proc.socket)), timeout=60)


class Stream(threading.Thread):
    """One streamed request read to its end in a thread; `events` holds what arrived."""

    def __init__(self, proc: DaemonProcess, path: str, body: dict[str, object]) -> None:
        super().__init__(daemon=True)
        self.proc, self.path, self.body = proc, path, body
        self.events: list[str] = []
        self.status = 0
        self.first = threading.Event()
        self.stop = False

    def run(self) -> None:
        with (
            uds(self.proc) as http,
            http.stream("POST", "http://mlxd" + self.path, json=self.body) as r,
        ):
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line.removeprefix("data: "))
                    self.first.set()
                if self.stop:
                    break
        self.first.set()


def wait_status(proc: DaemonProcess, check: object, timeout: float = 30) -> None:
    with Client(proc.socket) as client:
        deadline = time.monotonic() + timeout
        while not check(client.status()):  # type: ignore[operator]
            assert time.monotonic() < deadline, client.status()
            time.sleep(0.05)


@pytest.fixture(scope="module")
def flooded(model_cache: Path) -> Iterator[DaemonProcess]:
    args = ("--max-batch", "1", "--max-queue", "1")
    yield from daemon_in_short_dir(model_cache, *args, clean_exit=True)


def test_flooded_daemon_is_rate_limited_with_retry_after(flooded: DaemonProcess) -> None:
    running = Stream(flooded, "/v1/completions", LONG)
    running.start()
    assert running.first.wait(30)
    queued = Stream(flooded, "/v1/completions", LONG)
    queued.start()
    wait_status(flooded, lambda s: s.active == 1 and s.queue.depth >= 1)
    client = openai.OpenAI(
        base_url="http://mlxd/v1",
        api_key="none",
        max_retries=0,
        http_client=uds(flooded),
    )
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="x", prompt="hi", max_tokens=2)
    assert int(info.value.response.headers["retry-after"]) >= 1
    with uds(flooded) as http:
        anth = http.post(
            "http://mlxd/v1/messages",
            json={"model": "x", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
            headers={"origin": "http://localhost:5173"},
        )
    assert anth.status_code == 529 and anth.json()["error"]["type"] == "overloaded_error"
    assert "access-control-allow-origin" not in anth.headers  # no --http-cors: no CORS at all
    assert int(anth.headers["retry-after"]) >= 1
    running.stop = queued.stop = True  # leaving cancels both; the engine empties
    running.join(30)
    queued.join(30)
    wait_status(flooded, lambda s: s.active == 0 and blocks_beyond_anonymous(s) == 0)
    client.close()


def test_sigterm_ends_every_http_stream(model_cache: Path) -> None:
    folder = short_tmpdir()
    port = free_port()
    proc = DaemonProcess(
        folder,
        model_cache,
        "--drain-timeout", "1", "--http", f"localhost:{port}",
        env={"MLXD_API_KEY": "my-own-key"},
    ).start()  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://localhost:{port}", timeout=30) as http:
            assert http.get("/v1/models", headers={"x-api-key": "my-own-key"}).status_code == 200
            assert http.get("/health", headers={"x-api-key": "wrong"}).status_code == 401
        assert not (proc.state_dir / "api-token").exists()  # MLXD_API_KEY overrides the file
        chat = {
            "model": "x",
            "messages": [{"role": "user", "content": "count"}],
            "max_tokens": 4000,
            "stream": True,
        }
        streams = [
            Stream(proc, "/v1/completions", LONG),
            Stream(proc, "/v1/chat/completions", chat),
            Stream(proc, "/v1/messages", chat),
        ]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(30)
        proc.signal()
        for s in streams:
            s.join(30)
            assert not s.is_alive()
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        shutil.rmtree(folder, ignore_errors=True)
    for s in streams[:2]:  # OpenAI: an error chunk, then [DONE]
        assert s.status == 200 and s.events[-1] == "[DONE]", s.events[-3:]
        error = json.loads(s.events[-2])["error"]
        assert error["code"] == "shutting_down", error
    last = json.loads(streams[2].events[-1])  # Anthropic: an error event ends it
    assert last["type"] == "error" and last["error"]["type"] == "api_error", last
    deltas = [json.loads(e) for e in streams[2].events if "content_block_delta" in e]
    assert deltas  # it was cut mid-stream, not refused
