"""Hostile HTTP on the daemon's socket: every case gets a proper 4xx (or a correct answer)
and a clean close, and the daemon keeps serving a JSON-RPC client connected throughout."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxd.client import Client

from .daemon_proc import DaemonProcess, daemon_in_short_dir

FRAME_CAP = 64 * 1024  # --max-frame-bytes: also the largest HTTP body
IDLE_S = 1.0  # --idle-frame-timeout: a partial request idle this long is closed
STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")
COMPLETION = json.dumps({"model": "x", "prompt": "hi", "max_tokens": 2}).encode()


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def daemon(request: pytest.FixtureRequest, model_cache: Path) -> Iterator[DaemonProcess]:
    limits = ("--max-frame-bytes", str(FRAME_CAP), "--idle-frame-timeout", str(IDLE_S))
    yield from daemon_in_short_dir(
        model_cache, *limits, backend=str(request.param), clean_exit=True
    )


@pytest.fixture
def bystander(daemon: DaemonProcess) -> Iterator[Client]:
    """A JSON-RPC client on the same socket, which must be served during and after."""
    with Client(daemon.socket) as client:
        client.status()
        yield client
        assert client.generate("still here", max_tokens=3).usage.completion_tokens > 0


def exchange(daemon: DaemonProcess, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send `parts` (with `pause` between them) and read until the daemon closes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IDLE_S * 10)
    sock.connect(str(daemon.socket))
    out = b""
    try:
        for part in parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # it closed on us mid-send: what it said is already in the buffer
            time.sleep(pause)
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
    finally:
        sock.close()
    return out


def statuses(reply: bytes) -> list[int]:
    return [int(s) for s in STATUS.findall(reply)]


def post(path: str, body: bytes, *headers: bytes, close: bool = True) -> bytes:
    lines = [
        b"POST %s HTTP/1.1" % path.encode(),
        b"Host: mlxd",
        b"Content-Length: %d" % len(body),
        *headers,
    ]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


JSON = b"Content-Type: application/json"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET  HTTP/1.1\r\n\r\n", 400),  # no target
        (b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # a NUL in the target
        (b"POST /v1/models HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (post("/v1/completions", b"{not json", JSON), 400),
        (post("/v1/completions", b"", JSON), 400),
        (post("/v1/completions", b"[1, 2]", JSON), 400),
        (post("/v1/completions", COMPLETION, b"Content-Type: text/plain"), 415),
        (post("/v1/completions", COMPLETION, JSON, b"Content-Length: 5"), 400),  # two lengths
        (post("/v1/chat/completions", b'{"messages": 5}', JSON), 400),
        (post("/v1/messages", b'{"model": "x"}', JSON), 400),
        (post("/v1/completions", b"x" * (FRAME_CAP + 1), JSON), 413),
        (b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405),
        (b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    ],
)
def test_bad_requests_get_a_proper_4xx(
    daemon: DaemonProcess, bystander: Client, data: bytes, status: int
) -> None:
    reply = exchange(daemon, data)
    assert statuses(reply) == [status], reply[:300]
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert body.get("error")  # the API's own error shape


def test_endless_headers_are_cut_off(daemon: DaemonProcess, bystander: Client) -> None:
    start = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    reply = exchange(daemon, start, *[b"X-Pad: %d\r\n" % i for i in range(2000)])
    assert statuses(reply) == [431], reply[:200]


def test_huge_chunked_body_is_413(daemon: DaemonProcess, bystander: Client) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    chunk = b"%x\r\n%s\r\n" % (8192, b"x" * 8192)
    reply = exchange(daemon, head + JSON + b"\r\n\r\n", *[chunk] * (FRAME_CAP // 8192 + 4))
    assert statuses(reply) == [413], reply[:200]


def test_chunked_body_is_read(daemon: DaemonProcess, bystander: Client) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(COMPLETION), COMPLETION)
    reply = exchange(daemon, head + JSON + b"\r\nConnection: close\r\n\r\n" + body)
    assert statuses(reply) == [200], reply[:300]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["object"] == "text_completion"


@pytest.mark.parametrize(
    "partial",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\n",  # headers never end
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",  # body stalls
    ],
)
def test_slowloris_is_closed_after_the_idle_timeout(
    daemon: DaemonProcess, bystander: Client, partial: bytes
) -> None:
    started = time.monotonic()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IDLE_S * 10)
    sock.connect(str(daemon.socket))
    sock.sendall(partial)
    bystander.status()  # served while the slow one dangles
    reply = b""
    while data := sock.recv(65536):
        reply += data
    sock.close()
    assert statuses(reply) == [408], reply
    assert IDLE_S * 0.8 < time.monotonic() - started < IDLE_S * 8


def test_slow_but_steady_bytes_are_fine(daemon: DaemonProcess, bystander: Client) -> None:
    """The timeout is for silence, not for slowness: a byte every 0.1 s is served."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = exchange(daemon, *[request[i : i + 4] for i in range(0, len(request), 4)], pause=0.1)
    assert statuses(reply) == [200]


def test_http_1_0_is_answered_and_closed(daemon: DaemonProcess, bystander: Client) -> None:
    reply = exchange(daemon, b"GET /health HTTP/1.0\r\n\r\n")
    assert statuses(reply) == [200] and b"connection: close" in reply.lower()
    posted = exchange(
        daemon,
        post("/v1/completions", COMPLETION, JSON, close=False).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    )
    assert statuses(posted) == [200]
    assert json.loads(posted.partition(b"\r\n\r\n")[2])["usage"]["completion_tokens"] > 0


def test_pipelined_requests_are_answered_in_order(daemon: DaemonProcess, bystander: Client) -> None:
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    models = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    missing = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    pipeline = health + post("/v1/completions", COMPLETION, JSON, close=False) + models
    reply = exchange(daemon, pipeline + missing + last)
    assert statuses(reply) == [200, 200, 200, 404, 200], reply[:500]
    bodies = re.split(rb"HTTP/1\.1 \d{3} ", reply)[1:]
    assert b'"status"' in bodies[0] and b"text_completion" in bodies[1]
    assert b'"list"' in bodies[2] and b'"error"' in bodies[3] and b'"list"' in bodies[4]


def test_garbage_after_an_http_method_is_refused(daemon: DaemonProcess, bystander: Client) -> None:
    for junk in (b"GET \xff\xfe\r\n\r\n", b"POST " + b"/" * 30_000, b"PUT x y z\r\n\r\n"):
        reply = exchange(daemon, junk)
        assert statuses(reply) and 400 <= statuses(reply)[0] < 500, (junk[:20], reply[:200])


def test_jsonrpc_framing_still_detected(daemon: DaemonProcess, bystander: Client) -> None:
    """Text that only looks like a method name stays JSON-RPC: a parse error, not HTTP."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(b"GETTING {}\n")
        sock.shutdown(socket.SHUT_WR)  # half-closed: it answers, then closes
        reply = sock.makefile("rb").read()
    assert json.loads(reply)["error"]["code"] == -32700


def test_a_client_that_stops_reading_is_dropped(daemon: DaemonProcess, bystander: Client) -> None:
    """A stream nobody reads fills the socket; after the idle timeout the request ends."""
    body = json.dumps({"model": "x", "prompt": "go", "max_tokens": 4000, "stream": True})

    def dropped() -> int:
        return sum(e.get("outcome") == "disconnected" for e in daemon.events("request"))

    before = dropped()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(str(daemon.socket))
    sock.sendall(post("/v1/completions", body.encode(), JSON, close=False))
    deadline = time.monotonic() + 60
    while dropped() == before:
        assert time.monotonic() < deadline, "the stalled stream was never dropped"
        time.sleep(0.2)
    assert bystander.status().active == 0
    sock.close()
    daemon.wait_for("the client stopped reading")
