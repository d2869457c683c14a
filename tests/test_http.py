"""The OpenAI and Anthropic HTTP APIs, driven by the official SDKs (and curl) against a real
daemon, over the Unix socket and over the token-guarded TCP port. Greedy text must equal
what JSON-RPC `generate` gives for the same messages: one generation path."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from mlxd.client import Client

from .daemon_proc import DaemonProcess, blocks_beyond_anonymous, free_port, short_tmpdir

try:  # newer anthropic SDKs are built on httpx2 and refuse httpx objects
    import httpx2 as anthropic_httpx
except ImportError:
    anthropic_httpx = httpx

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]
MAX_TOKENS = 24
ORIGIN = "http://localhost:5173"  # --http-cors: the one browser origin allowed


class Served:
    def __init__(self, proc: DaemonProcess, port: int) -> None:
        self.proc, self.port = proc, port
        self.token = (proc.state_dir / "api-token").read_text().strip()
        self.base = f"http://127.0.0.1:{port}"

    def uds(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.proc.socket)), timeout=60)

    def openai_tcp(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.token, max_retries=0)

    def openai_uds(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url="http://mlxd/v1", api_key="none", http_client=self.uds(), max_retries=0
        )

    def anthropic_uds(self) -> anthropic.Anthropic:
        transport = anthropic_httpx.HTTPTransport(uds=str(self.proc.socket))
        http = anthropic_httpx.Client(transport=transport, timeout=60)
        return anthropic.Anthropic(
            base_url="http://mlxd", api_key="none", http_client=http, max_retries=0
        )

    def rpc_text(self, **kw: Any) -> str:
        with Client(self.proc.socket) as client:
            return client.generate(messages=MESSAGES, max_tokens=MAX_TOKENS, **kw).text

    def idle(self) -> None:
        """Every request has left the engine and the pool holds no blocks."""
        with Client(self.proc.socket) as client:
            deadline = time.monotonic() + 30
            while True:
                status = client.status()
                if status.active == 0 and blocks_beyond_anonymous(status) == 0:
                    return
                assert time.monotonic() < deadline, status
                time.sleep(0.05)


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def served(request: pytest.FixtureRequest, model_cache: Path) -> Iterator[Served]:
    folder = short_tmpdir()
    port = free_port()
    proc = DaemonProcess(
        folder,
        model_cache,
        "--http", f"127.0.0.1:{port}", "--http-cors", ORIGIN,
        backend=str(request.param),
    ).start()  # fmt: skip
    yield Served(proc, port)
    code = proc.stop()
    assert code == 0, "\n".join(proc.lines[-60:])
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["tcp", "uds"])
def oai(request: pytest.FixtureRequest, served: Served) -> Iterator[openai.OpenAI]:
    client = served.openai_tcp() if request.param == "tcp" else served.openai_uds()
    yield client
    client.close()


def test_chat_completion_equals_jsonrpc_generate(served: Served, oai: openai.OpenAI) -> None:
    expected = served.rpc_text()
    reply = oai.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    assert reply.model == "builtin:tiny"  # any name is accepted; the served one comes back
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    # The JSON-RPC call just before sent the same messages: its cache serves all but one token.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    served.idle()


def test_chat_stream_equals_plain(served: Served, oai: openai.OpenAI) -> None:
    expected = served.rpc_text()
    stream = oai.chat.completions.create(
        model="default",
        messages=MESSAGES,
        max_completion_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length") and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    served.idle()


def test_completions_and_models(served: Served, oai: openai.OpenAI) -> None:
    with Client(served.proc.socket) as client:
        expected = client.generate("Once upon a time", max_tokens=10).text
    reply = oai.completions.create(model="x", prompt="Once upon a time", max_tokens=10)
    assert reply.choices[0].text == expected and reply.model == "builtin:tiny"
    streamed = oai.completions.create(
        model="x", prompt="Once upon a time", max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    models = oai.models.list()
    assert [m.id for m in models.data] == ["builtin:tiny"]


def test_bad_parameters_are_400_naming_the_field(oai: openai.OpenAI) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "n"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"temperature": -1}, "temperature"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ]
    for extra, field in cases:
        with pytest.raises(openai.BadRequestError) as info:
            oai.chat.completions.create(
                model="x",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                **extra,
            )
        assert field in str(info.value), (field, info.value)
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError, match="image_url"):
        oai.chat.completions.create(model="x", messages=[{"role": "user", "content": image}])
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=999_999
        )
    assert too_long.value.code == "context_length_exceeded"


def test_anthropic_messages(served: Served) -> None:
    client = served.anthropic_uds()
    system, user = MESSAGES[0]["content"], MESSAGES[1:]
    expected = served.rpc_text()
    reply = client.messages.create(
        model="claude-sonnet-4-5",
        system=system,
        messages=user,
        max_tokens=MAX_TOKENS,
    )
    assert reply.model == "builtin:tiny" and reply.role == "assistant"
    assert [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == expected
    assert reply.stop_reason in ("end_turn", "max_tokens")
    # Served from the JSON-RPC call's cache but the last token (Anthropic counts it apart).
    assert reply.usage.output_tokens > 0 and reply.usage.input_tokens == 1
    assert reply.usage.cache_read_input_tokens > 0
    with client.messages.stream(
        model="x",
        system=[{"type": "text", "text": system}],
        messages=user,
        max_tokens=MAX_TOKENS,
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == expected and final.content[0].text == expected
    assert final.usage.output_tokens == reply.usage.output_tokens
    count = client.messages.count_tokens(model="x", system=system, messages=user)
    assert count.input_tokens == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    with Client(served.proc.socket) as rpc_client:
        assert count.input_tokens == rpc_client.tokenize(messages=MESSAGES).count
    stop = next(
        expected[i : i + 2] for i in range(4, len(expected)) if "\ufffd" not in expected[i : i + 2]
    )
    cut = client.messages.create(
        model="x",
        system=system,
        messages=user,
        max_tokens=MAX_TOKENS,
        stop_sequences=[stop, "\x00\x00"],
    )
    assert cut.content[0].text == expected[: expected.index(stop)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    oai = served.openai_uds()
    stopped = oai.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=MAX_TOKENS, stop=stop
    )
    assert stopped.choices[0].message.content == expected[: expected.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    oai.close()
    over_tcp = anthropic.Anthropic(base_url=served.base, api_key=served.token, max_retries=0)
    tcp_reply = over_tcp.messages.create(
        model="x", system=system, messages=user, max_tokens=MAX_TOKENS
    )
    assert tcp_reply.content[0].text == expected
    over_tcp.close()
    with pytest.raises(anthropic.BadRequestError, match="tools"):
        client.messages.create(
            model="x",
            messages=user,
            max_tokens=4,
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
        )
    client.close()
    served.idle()


def test_session_header_reuses_the_cache(served: Served) -> None:
    client = served.openai_uds()
    headers = {"X-Mlxd-Session": "http-session-1"}
    first = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=8,
        extra_headers=headers,
    )
    text = first.choices[0].message.content or ""
    follow = [
        *MESSAGES,
        {"role": "assistant", "content": text},
        {"role": "user", "content": "More."},
    ]
    second = client.chat.completions.create(
        model="x",
        messages=follow,
        max_tokens=8,
        extra_headers=headers,
    )
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    with Client(served.proc.socket) as rpc_client:
        assert rpc_client.sessions_delete("http-session-1")
    client.close()


def test_tcp_needs_the_token(served: Served) -> None:
    with httpx.Client(base_url=served.base, timeout=30) as http:
        assert http.get("/v1/models").status_code == 401
        wrong = http.get("/v1/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        anth = http.post("/v1/messages", headers={"x-api-key": "nope"}, json={})
        assert anth.status_code == 401
        assert anth.json()["error"]["type"] == "authentication_error"
        ok = http.get("/v1/models", headers={"x-api-key": served.token})
        assert ok.status_code == 200
        health = http.get("/health", headers={"authorization": f"Bearer {served.token}"})
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert "access-control-allow-origin" not in health.headers
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.base + "/v1", api_key="wrong", max_retries=0).models.list()
    token = subprocess.run(
        [sys.executable, "-m", "mlxd.daemon", "token", "--state-dir", str(served.proc.state_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert token.stdout.strip() == served.token
    assert (served.proc.state_dir / "api-token").stat().st_mode & 0o777 == 0o600


def test_curl_streams_sse_over_the_socket(served: Served) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is missing: python3 dev.py setup installs it")
    body = {"model": "x", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True}
    out = subprocess.run(
        [
            "curl", "-sN", "--unix-socket", str(served.proc.socket),
            "-H", "content-type: application/json", "-d", json.dumps(body),
            "http://mlxd/v1/chat/completions",
        ],
        capture_output=True, check=True, timeout=60,
    ).stdout.decode()  # fmt: skip
    events = [line.removeprefix("data: ") for line in out.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == served.rpc_text()


def test_health_and_unknown_paths(served: Served) -> None:
    with served.uds() as http:
        health = http.get("http://mlxd/health")
        assert health.status_code == 200 and health.json()["model"] == "builtin:tiny"
        missing = http.get("http://mlxd/v1/nothing")
        assert missing.status_code == 404 and "error" in missing.json()
        assert http.get("http://mlxd/v1/messages").status_code == 405
        gone = http.post("http://mlxd/v1/messages/nothing", json={})
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("over", ["uds", "tcp"])
def test_disconnect_mid_stream_frees_the_slot(served: Served, over: str) -> None:
    body = json.dumps(
        {"model": "x", "prompt": "count", "max_tokens": 4000, "stream": True}
    ).encode()
    if over == "uds":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(served.proc.socket))
    else:
        sock = socket.create_connection(("127.0.0.1", served.port))
    sock.settimeout(30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (served.token.encode(), len(body), body)
    )
    seen = b""
    while seen.count(b"data: ") < 3:
        seen += sock.recv(65536)
    with Client(served.proc.socket) as client:
        assert client.status().active == 1
    sock.close()
    started = time.monotonic()
    served.idle()
    assert time.monotonic() - started < 5
    gone = [e for e in served.proc.events("request") if e["outcome"] == "disconnected"]
    assert gone and gone[-1]["http"] == "openai"


def test_http_alongside_jsonrpc_on_one_socket(served: Served) -> None:
    """The same socket keeps serving NDJSON JSON-RPC while HTTP clients use it."""
    with Client(served.proc.socket) as client:
        assert client.models_current().id == "builtin:tiny"
    with served.uds() as http:
        assert http.get("http://mlxd/v1/models").status_code == 200


def test_non_loopback_address_is_refused_at_start(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "mlxd.daemon", "serve", "--socket", str(tmp_path / "s")]
    refused = subprocess.run([*args, "--http", "0.0.0.0:8080"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--http-allow-remote" in refused.stderr
    bad = subprocess.run([*args, "--http", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def test_cors_only_for_the_configured_origin(served: Served) -> None:
    auth = {"authorization": f"Bearer {served.token}"}
    with httpx.Client(base_url=served.base, timeout=30) as http:
        preflight = http.options(
            "/v1/chat/completions",
            headers={"origin": ORIGIN, "access-control-request-method": "POST"},
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in preflight.headers["access-control-allow-headers"]
        allowed = http.get("/v1/models", headers={**auth, "origin": ORIGIN})
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        other = http.get("/v1/models", headers={**auth, "origin": "http://evil.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
        stranger = http.options("/v1/models", headers={"origin": "http://evil.example"})
        assert stranger.status_code == 401 and "access-control-allow-origin" not in stranger.headers


def test_http_address_and_token_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlxd.daemon.transport.http import AddressError, load_token, parse_http_address

    assert parse_http_address("127.0.0.1:8080", False) == ("127.0.0.1", 8080)
    assert parse_http_address("[::1]:9", False) == ("::1", 9)
    assert parse_http_address("localhost:80", False) == ("localhost", 80)
    assert parse_http_address("0.0.0.0:80", True) == ("0.0.0.0", 80)
    for bad in (
        "0.0.0.0:80",
        "10.1.2.3:80",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        "host:80",
    ):
        with pytest.raises(AddressError):
            parse_http_address(bad, False)
    monkeypatch.delenv("MLXD_API_KEY", raising=False)
    token = load_token(tmp_path / "state")
    assert token == load_token(tmp_path / "state") and len(token) > 32  # made once, then kept
    assert (tmp_path / "state" / "api-token").stat().st_mode & 0o777 == 0o600
    assert load_token(tmp_path / "other") != token  # random, not derived
    monkeypatch.setenv("MLXD_API_KEY", "chosen")
    assert load_token(tmp_path / "state") == "chosen"
