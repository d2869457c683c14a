"""The core over a real socket with the built-in model: exactness, cancellation, framing."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import msgspec
import pytest

from mlxd import rpc
from mlxd.client import Client, RequestCancelled

from .daemon_proc import DaemonProcess, RawConnection

PROMPTS = [
    "The quick brown fox",
    "a",
    "Once upon a time, in a land far away, there lived",
    "def fibonacci(n):",
    "12345 67890",
    "Ünïcødé and 中文 text",
    "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz" * 3,
    "Hello",
]


def _generate(path, prompt: str, **kw: object) -> rpc.GenerateResult:
    with Client(path) as client:
        return client.generate(prompt, **kw)  # type: ignore[arg-type]


def test_batched_greedy_equals_one_at_a_time(daemon: DaemonProcess) -> None:
    alone = [_generate(daemon.socket, p, max_tokens=24) for p in PROMPTS]
    together: dict[int, rpc.GenerateResult] = {}
    start = threading.Barrier(len(PROMPTS))

    def run(i: int) -> None:
        start.wait()
        together[i] = _generate(daemon.socket, PROMPTS[i], max_tokens=24)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, single in enumerate(alone):
        assert together[i].tokens == single.tokens, f"prompt {i} differs when batched"
        assert together[i].text == single.text
        assert single.usage.completion_tokens == len(single.tokens)
    with Client(daemon.socket) as client:
        steps = client.status().details["engine_steps"]
    assert steps > 0


def test_cancel_stops_within_a_step_and_replies_with_partial_text(daemon: DaemonProcess) -> None:
    conn = RawConnection(daemon.socket)
    conn.request(1, "generate", {"prompt": "count forever", "max_tokens": 2000, "stream": True})
    seen: list[int] = []
    text = ""
    while len(seen) < 3:
        event = conn.next()
        assert isinstance(event, rpc.Notification), event
        delta = msgspec.json.decode(bytes(event.params), type=rpc.GenerateDelta)  # type: ignore[arg-type]
        seen.extend(delta.tokens or [])
        text += delta.text
    conn.send(rpc.notification("$/cancelRequest", {"id": 1}))
    reply = conn.reply(1)
    assert isinstance(reply, rpc.Response) and reply.error is not None
    assert reply.error.code == rpc.ErrorCode.REQUEST_CANCELLED
    data = reply.error.data
    assert data["text"].startswith(text)
    # The engine drops the sequence at the next step boundary: at most a step or two late.
    assert len(seen) <= data["usage"]["completion_tokens"] <= len(seen) + 3
    conn.request(2, "generate", {"prompt": "next", "max_tokens": 5})
    after = conn.reply(2)
    assert isinstance(after, rpc.Response) and after.error is None
    conn.close()
    with Client(daemon.socket) as client:
        assert client.status().active == 0


def test_client_stream_left_early_cancels(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as client:
        stream = client.stream("stream then leave", max_tokens=2000)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()
        assert stream.cancelled
        assert client.generate("still usable", max_tokens=3).usage.completion_tokens == 3


def test_cancel_via_client_raises_request_cancelled(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as client:
        stream = client.stream("cancel me", max_tokens=2000)
        next(stream)
        client.cancel(stream.id)
        with pytest.raises(RequestCancelled) as info:
            for _ in stream:
                pass
        assert isinstance(info.value.text, str)


def test_streamed_deltas_concatenate_to_the_text(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as client:
        stream = client.stream("stream the text", max_tokens=40)
        parts = [d.text for d in stream]
        assert stream.result is not None
        assert "".join(parts) == stream.result.text
        assert stream.result.finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text(daemon: DaemonProcess) -> None:
    full = _generate(daemon.socket, "stop strings", max_tokens=40)
    if len(full.text) < 6:
        pytest.skip("model produced too little text to pick a stop string from")
    stop = full.text[3:5]
    cut = _generate(daemon.socket, "stop strings", max_tokens=40, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_seeded_sampling_is_reproducible(daemon: DaemonProcess) -> None:
    a = _generate(daemon.socket, "sample", max_tokens=20, temperature=1.0, seed=7)
    b = _generate(daemon.socket, "sample", max_tokens=20, temperature=1.0, seed=7, top_p=0.999)
    c = _generate(daemon.socket, "sample", max_tokens=20, temperature=1.0, seed=7)
    assert a.tokens == c.tokens
    assert len(b.tokens) > 0


def test_messages_use_the_chat_template(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as client:
        chat = client.tokenize(messages=[{"role": "user", "content": "hi"}])
        plain = client.tokenize("hi")
        assert chat.count > plain.count
        result = client.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert result.usage.prompt_tokens == chat.count
        # Without the generation prompt: the same rendering, less the assistant's opening.
        bare = client.tokenize(
            messages=[{"role": "user", "content": "hi"}], add_generation_prompt=False
        )
        assert 0 < bare.count < chat.count
        assert chat.tokens[: bare.count] == bare.tokens
        opening = client.tokenize("<|assistant|>").tokens
        assert chat.tokens[bare.count :] == opening[-(chat.count - bare.count) :]


@pytest.mark.skipif(
    shutil.which("socat") is None,
    reason="socat is not installed (python3 dev.py setup installs it)",
)
def test_socat_gets_a_json_line_back(daemon: DaemonProcess) -> None:
    line = b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":"hi","max_tokens":4}}\n'
    out = subprocess.run(
        ["socat", "-t", "60", "-", f"UNIX-CONNECT:{daemon.socket}"],
        input=line,
        capture_output=True,
        timeout=90,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert len(lines) == 1
    reply = json.loads(lines[0])
    assert reply["id"] == 1 and reply["result"]["usage"]["completion_tokens"] == 4


def test_lsp_framing_gets_lsp_replies(daemon: DaemonProcess) -> None:
    conn = RawConnection(daemon.socket, framing=rpc.Framing.LSP)
    conn.request(1, "tokenize", {"text": "hello"})
    conn.request(2, "generate", {"prompt": "hello", "max_tokens": 3, "stream": True})
    raw = b""
    while raw.count(b"Content-Length:") < 5:  # 1 tokenize + 3 deltas + 1 result
        raw += conn.sock.recv(65536)
    assert raw.startswith(b"Content-Length: ")
    conn.codec.receive_data(raw)
    replies = {}
    while (event := conn.codec.next_event()) is not rpc.NEED_DATA:
        if isinstance(event, rpc.Response):
            replies[event.id] = event
    assert set(replies) == {1, 2}
    conn.close()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (
            b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":',
            rpc.ErrorCode.PARSE_ERROR,
        ),
        (b'{"jsonrpc":"1.0","id":1,"method":"status"}', rpc.ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1,"method":"no/such"}', rpc.ErrorCode.METHOD_NOT_FOUND),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":1}}',
            rpc.ErrorCode.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":"x","max_tokens":0}}',
            rpc.ErrorCode.INVALID_PARAMS,
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"sessions/get","params":{"session":"nope"}}',
            rpc.ErrorCode.SESSION_NOT_FOUND,
        ),
        (
            b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":"x","max_tokens":999999}}',
            rpc.ErrorCode.CONTEXT_TOO_LONG,
        ),
    ],
)
def test_errors_leave_the_connection_usable(
    daemon: DaemonProcess, payload: bytes, code: int
) -> None:
    conn = RawConnection(daemon.socket)
    conn.send_bytes(payload + b"\n")
    event = conn.next()
    assert isinstance(event, rpc.Response) and event.error is not None, event
    assert event.error.code == code
    conn.request(2, "tokenize", {"text": "ok"})
    ok = conn.reply(2)
    assert isinstance(ok, rpc.Response) and ok.error is None
    conn.close()


def test_engine_failure_is_an_internal_error_and_the_engine_recovers(
    short_dir: Path, model_cache: Path
) -> None:
    proc = DaemonProcess(short_dir, model_cache, env={"MLXD_FAULT_ENGINE_STEPS": "1"}).start()
    try:
        conn = RawConnection(proc.socket)
        conn.request(1, "generate", {"prompt": "fails", "max_tokens": 4})
        failed = conn.reply(1)
        assert isinstance(failed, rpc.Response) and failed.error is not None
        assert failed.error.code == rpc.ErrorCode.INTERNAL_ERROR
        conn.request(2, "generate", {"prompt": "works", "max_tokens": 4})
        ok = conn.reply(2)
        assert isinstance(ok, rpc.Response) and ok.error is None
        conn.close()
        with Client(proc.socket) as client:
            assert client.status().totals.errors == 1
    finally:
        assert proc.stop() == 0


def test_a_batch_answers_each_item(daemon: DaemonProcess) -> None:
    # A batch with bad items: the good one is answered, each bad one gets its error.
    conn = RawConnection(daemon.socket)
    conn.send_bytes(
        b'[{"jsonrpc":"2.0","id":1,"method":"tokenize","params":{"text":"a"}},'
        b' {"jsonrpc":"2.0","id":2,"method":"status","params":{"x":1}}, 5]\n'
    )
    out = conn.next()
    assert isinstance(out, rpc.Batch)
    by_id = {m.id: m for m in out.items if isinstance(m, rpc.Response)}
    assert by_id[1].error is None
    assert by_id[2].error.code == rpc.ErrorCode.INVALID_PARAMS
    assert by_id[None].error.code == rpc.ErrorCode.INVALID_REQUEST
    conn.close()


def test_status_reports_the_essentials(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as client:
        client.generate("warm", max_tokens=8)
        status = client.status()
    assert status.state in ("ok", "degraded")
    assert status.model.id == "builtin:tiny"
    assert status.totals.completed >= 1
    assert status.latency_ms.ttft.p50 > 0
    assert status.pool.blocks_total > 0
    assert status.details["backend"] in ("asyncio", "trio")


def test_cancel_before_generation_starts_still_carries_data(daemon: DaemonProcess) -> None:
    conn = RawConnection(daemon.socket)
    # Both in one write: the cancel arrives while the request is still being admitted.
    conn.send_bytes(
        b'{"jsonrpc":"2.0","id":7,"method":"generate","params":{"prompt":"x","max_tokens":50}}\n'
        b'{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":7}}\n'
    )
    reply = conn.reply(7)
    assert isinstance(reply, rpc.Response) and reply.error is not None
    assert reply.error.code == rpc.ErrorCode.REQUEST_CANCELLED
    assert set(reply.error.data) == {"text", "usage"}
    conn.close()
