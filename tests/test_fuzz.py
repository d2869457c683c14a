"""Hostile input: the codec and the dispatcher under fuzzing, then a corpus of bad frames
sent to a real daemon. Every request gets one JSON-RPC reply, broken framing gets an
error and a clean close, and nothing a client sends stops the daemon serving others."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxd import rpc
from mlxd.client import Client

from .daemon_proc import DaemonProcess, RawConnection, blocks_beyond_anonymous, daemon_in_short_dir

CODEC_CODES = {rpc.ErrorCode.PARSE_ERROR, rpc.ErrorCode.INVALID_REQUEST}
ALL_CODES = set(rpc.ErrorCode)


FRAME_CAP = 1024 * 1024  # --max-frame-bytes: big enough for the corpus, quick to exceed
IDLE_S = 1.0  # --idle-frame-timeout


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def daemon(request: pytest.FixtureRequest, model_cache: Path) -> Iterator[DaemonProcess]:
    """This module's daemon: the tiny model, a 1 MiB frame cap and a 1 s idle timeout."""
    limits = ("--max-frame-bytes", str(FRAME_CAP), "--idle-frame-timeout", str(IDLE_S))
    yield from daemon_in_short_dir(model_cache, *limits, backend=str(request.param))


# -- the codec: properties over arbitrary and mutated bytes ------------------------------


def _check_error(error: rpc.ErrorObject, id: Any) -> None:
    """A proper JSON-RPC error: a codec code, a message, a usable id; it encodes to a line."""
    assert error.code in CODEC_CODES, error
    assert isinstance(error.message, str) and error.message
    assert id is None or isinstance(id, str) or (isinstance(id, int) and not isinstance(id, bool))
    line = rpc.Connection(rpc.Framing.NDJSON).send(rpc.error_response(id, error))
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    back = json.loads(line)
    assert back["jsonrpc"] == "2.0" and back["id"] == id and back["error"]["code"] == error.code


def _check_event(event: Any) -> None:
    if isinstance(event, rpc.Invalid):
        _check_error(event.error, event.id)
    elif isinstance(event, rpc.FramingError):
        _check_error(event.error, None)
    elif isinstance(event, rpc.Batch):
        assert event.items
        for item in event.items:
            assert not isinstance(item, rpc.Batch | rpc.FramingError)
            _check_event(item)
    elif isinstance(event, rpc.Request | rpc.Notification):
        assert isinstance(event.method, str)
        assert event.params is None or isinstance(event.params, msgspec.Raw)
    else:
        assert isinstance(event, rpc.Response), event


def _pump(conn: rpc.Connection, chunks: list[bytes], eof: bool) -> list[Any]:
    """Feed every chunk and take every event; next_event() must never raise or spin."""
    events: list[Any] = []
    broken = False
    for chunk in [*chunks, b""] if eof else chunks:
        conn.receive_data(chunk)
        for _ in range(100_000):
            event = conn.next_event()
            if event is rpc.NEED_DATA or event is rpc.CLOSED:
                if broken:
                    assert event is rpc.CLOSED, "a FramingError is the end of the stream"
                break
            assert not broken, "no event after a FramingError"
            broken = isinstance(event, rpc.FramingError)
            _check_event(event)
            events.append(event)
        else:
            raise AssertionError("next_event() never asked for more data")
    if eof:
        assert conn.next_event() is rpc.CLOSED
    return events


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return [p for p in pieces if p]  # b"" would mean EOF


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    eof=st.booleans(),
    max_frame=st.sampled_from([64, 1024, rpc.DEFAULT_MAX_FRAME_BYTES]),
)
def test_arbitrary_bytes_never_raise_out_of_the_codec(
    data: bytes, cuts: list[int], eof: bool, max_frame: int
) -> None:
    _pump(rpc.Connection(max_frame_bytes=max_frame), _chunked(data, cuts), eof)


# JSON values, valid messages built from them, and byte-level mutations of those.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
message_ids = st.one_of(
    st.integers(-(2**70), 2**70), st.text(max_size=8), st.none(), st.floats(), st.booleans()
)
METHOD_NAMES = [*sorted(rpc.METHODS), "no/such", "", "generate/delta"]


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    env: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2]))}
    if draw(st.booleans()):
        env["method"] = draw(st.sampled_from(METHOD_NAMES) | st.text(max_size=8))
    if draw(st.integers(0, 3)):
        env["id"] = draw(message_ids)
    if draw(st.booleans()):
        env["params"] = draw(json_values)
    for extra in ("result", "error"):
        if draw(st.integers(0, 5)) == 0:
            env[extra] = draw(json_values)
    return env


frame_bodies = st.one_of(
    envelopes(),
    st.lists(envelopes(), max_size=5),  # batches, the empty one too
    json_values,
).map(lambda value: json.dumps(value).encode())

INTERESTING = b'"{}[],:\\\n\r \t\x00\x7f\xc3\xff0-eE.uU'


@st.composite
def mutated(draw: st.DrawFn, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "repeat", "truncate"]))
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[pos:pos] = draw(st.sampled_from([bytes([b]) for b in INTERESTING]))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 4))]
        elif kind == "repeat":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del data[pos:]
    return bytes(data)


def _framed(body: bytes, lsp: bool) -> bytes:
    if lsp:
        return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    return body.replace(b"\n", b" ") + b"\n"


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(frame_bodies.flatmap(mutated), min_size=1, max_size=4),
    lsp=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
    eof=st.booleans(),
)
def test_mutated_valid_messages_never_raise_out_of_the_codec(
    bodies: list[bytes], lsp: bool, cuts: list[int], eof: bool
) -> None:
    data = b"".join(_framed(b, lsp) for b in bodies)
    events = _pump(rpc.Connection(), _chunked(data, cuts), eof)
    if not lsp and not eof:  # one line each: one event per non-blank line
        assert len(events) == sum(1 for b in bodies if b.replace(b"\n", b" ").strip())


@settings(max_examples=200, deadline=None)
@given(body=frame_bodies.flatmap(mutated), lie=st.integers(-5, 5), lsp_cut=st.integers(0, 200))
def test_lsp_content_length_lies_never_raise(body: bytes, lie: int, lsp_cut: int) -> None:
    header = b"Content-Length: %d\r\n\r\n" % (len(body) + lie)
    data = (header + body)[: len(header) + lsp_cut] if lsp_cut < 100 else header + body
    _pump(rpc.Connection(), [data], eof=True)


def test_numbers_out_of_range_are_invalid_requests_not_parse_errors() -> None:
    for raw_id in (b"9" * 5000, b"1e999"):
        conn = rpc.Connection()
        conn.receive_data(b'{"jsonrpc":"2.0","id":%s,"method":"status"}\n' % raw_id)
        event = conn.next_event()
        assert isinstance(event, rpc.Invalid)
        assert (event.id, event.error.code) == (None, rpc.ErrorCode.INVALID_REQUEST)


# -- the dispatcher: random and mutated messages on one connection of a live daemon -------


def _expected_replies(line: bytes) -> Counter[Any]:
    """What the daemon owes for one line: a reply per request or invalid message, by id.

    A batch is answered by one array (keyed ("batch", ids)); notifications and responses
    get nothing. The codec itself is tested above; here it is the oracle."""
    codec = rpc.Connection(rpc.Framing.NDJSON)
    codec.receive_data(line)
    event = codec.next_event()
    owed: Counter[Any] = Counter()
    if isinstance(event, rpc.Request | rpc.Invalid):
        owed[_key(event.id)] += 1
    elif isinstance(event, rpc.Batch):
        ids = [_key(m.id) for m in event.items if isinstance(m, rpc.Request | rpc.Invalid)]
        if ids:
            owed[("batch", tuple(sorted(ids, key=repr)))] += 1
    return owed


def _key(id: Any) -> Any:
    return (type(id).__name__, id)


def _answered(event: Any) -> Any:
    """The key of a reply as `_expected_replies` spells it; checks every reply is proper."""
    if isinstance(event, rpc.Batch):
        ids = []
        for item in event.items:
            assert isinstance(item, rpc.Response), item
            _check_reply(item)
            ids.append(_key(item.id))
        return ("batch", tuple(sorted(ids, key=repr)))
    assert isinstance(event, rpc.Response), event
    _check_reply(event)
    return _key(event.id)


def _check_reply(reply: rpc.Response) -> None:
    assert (reply.result is None) != (reply.error is None)
    if reply.error is not None:
        assert reply.error.code in ALL_CODES, reply.error
        assert isinstance(reply.error.message, str)


PARAM_NAMES = [
    "prompt", "messages", "session", "max_tokens", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stream", "logprobs", "text", "add_generation_prompt", "new_session",
    "id", "client", "protocol",
]  # fmt: skip
plausible = st.one_of(
    st.sampled_from(["hi", "fuzz me", "a\u2028b", "\u00e9\u4e2d", ""]),
    st.integers(-3, 20),
    st.floats(0, 2),
    st.sampled_from(["fz-a", "fz-b", "bad name", [{"role": "user", "content": "hi"}], ["x"]]),
    st.booleans(),
    json_values,
)
FUZZ_METHODS = [m for m in rpc.METHODS if m not in ("shutdown", "models/swap")] + ["no/such"]
texts = st.sampled_from(["hi", "fuzz me", "a\u2028b", "\u00e9\u4e2d", ""]) | st.text(max_size=16)
names = st.sampled_from(["fz-a", "fz-b", "fz-c"])
# Well-formed params per method, so that the fuzzer also reaches the handlers.
WELL_FORMED = {
    "generate": st.fixed_dictionaries(
        {"prompt": texts, "max_tokens": st.integers(1, 8)},  # short: replies, not text
        optional={
            "session": names,
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.01, 1),
            "top_k": st.integers(0, 100_000),
            "min_p": st.floats(0, 1),
            "seed": st.integers(0, 2**63 - 1),
            "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
            "stream": st.booleans(),
            "logprobs": st.booleans(),
        },
    ),
    "tokenize": st.fixed_dictionaries({"text": texts}),
    "sessions/get": st.fixed_dictionaries({"session": names}),
    "sessions/delete": st.fixed_dictionaries({"session": names}),
    "sessions/fork": st.fixed_dictionaries({"session": names, "new_session": names}),
    "sessions/save": st.fixed_dictionaries({}, optional={"session": names}),
    "$/cancelRequest": st.fixed_dictionaries({"id": st.integers(0, 10)}),
}


@st.composite
def daemon_messages(draw: st.DrawFn) -> dict[str, Any] | list[Any]:
    def one() -> dict[str, Any]:
        method = draw(st.sampled_from(FUZZ_METHODS) | st.just("generate"))
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if draw(st.integers(0, 4)):
            msg["id"] = draw(st.integers(0, 10**6) | st.text(max_size=6) | st.none())
        kind = draw(st.integers(0, 5))
        if kind >= 2 and method in WELL_FORMED:
            msg["params"] = draw(WELL_FORMED[method])
        elif kind == 1:
            params = draw(st.dictionaries(st.sampled_from(PARAM_NAMES), plausible, max_size=5))
            if method == "generate":
                params["max_tokens"] = draw(st.integers(1, 8))
            msg["params"] = params
        elif kind == 0:
            msg["params"] = draw(json_values)
        return msg

    if draw(st.integers(0, 5)) == 0:
        return [one() for _ in range(draw(st.integers(0, 4)))]
    return one()


def _session_cleanup(socket_path: Path) -> None:
    with Client(socket_path) as client:
        for info in client.sessions_list():
            client.sessions_delete(info.session)


def test_dispatcher_answers_every_fuzzed_request_and_keeps_serving(daemon: DaemonProcess) -> None:
    conn = RawConnection(daemon.socket, timeout=60)
    conn.request("hello", "initialize", {})
    assert conn.reply("hello").error is None  # type: ignore[union-attr]
    mutate = st.booleans()

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(message=daemon_messages(), data=st.data(), do_mutate=mutate)
    def run(message: Any, data: st.DataObject, do_mutate: bool) -> None:
        body = json.dumps(message).encode()
        if do_mutate:
            body = data.draw(mutated(body))
        line = body.replace(b"\n", b" ") + b"\n"
        owed = _expected_replies(line)
        conn.send_bytes(line)
        got: Counter[Any] = Counter()
        while got != owed:
            event = conn.next()
            if isinstance(event, rpc.Notification):
                assert event.method == rpc.DELTA_NOTIFICATION
                continue
            key = _answered(event)
            got[key] += 1
            assert got[key] <= owed[key], (line, event, owed)

    try:
        run()
        assert daemon.proc is not None and daemon.proc.poll() is None
        conn.request("after", "status")
        assert conn.reply("after").error is None  # type: ignore[union-attr]
        with Client(daemon.socket) as other:
            assert other.generate("another client", max_tokens=3).usage.completion_tokens == 3
    finally:
        conn.close()
        _session_cleanup(daemon.socket)


# -- a corpus of hostile input against the real daemon -----------------------------------

E = rpc.ErrorCode
GEN = b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":"x","max_tokens":2,'
DEEP = b"[" * 100_000 + b"]" * 100_000

CORPUS: dict[str, tuple[bytes, list[tuple[Any, int | None]]]] = {
    # name: (one line, [(reply id, error code or None for a result)])
    "invalid utf-8 in a param": (
        b'{"jsonrpc":"2.0","id":1,"method":"tokenize","params":{"text":"\xff\xfe"}}',
        [(1, E.PARSE_ERROR)],
    ),
    "invalid utf-8 in the method": (b'{"jsonrpc":"2.0","id":1,"method":"st\xc3"}', [(None, E.PARSE_ERROR)]),
    "lone high surrogate": (
        b'{"jsonrpc":"2.0","id":1,"method":"tokenize","params":{"text":"\\ud800"}}',
        [(None, E.PARSE_ERROR)],
    ),
    "lone low surrogate in the id": (
        b'{"jsonrpc":"2.0","id":"\\udc00","method":"status"}',
        [(None, E.PARSE_ERROR)],
    ),
    "surrogate pair is fine": (
        b'{"jsonrpc":"2.0","id":1,"method":"tokenize","params":{"text":"\\ud83d\\ude00"}}',
        [(1, None)],
    ),
    "100k-deep nesting": (DEEP, [(None, E.PARSE_ERROR)]),
    "100k-deep nesting in params": (
        b'{"jsonrpc":"2.0","id":1,"method":"status","params":' + DEEP + b"}",
        [(None, E.PARSE_ERROR)],
    ),
    "5000-digit id": (
        b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"status"}',
        [(None, E.INVALID_REQUEST)],
    ),
    "5000-digit max_tokens": (
        b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":"x","max_tokens":'
        + b"9" * 5000
        + b"}}",
        [(1, E.INVALID_PARAMS)],
    ),
    "40-digit id is echoed": (
        b'{"jsonrpc":"2.0","id":-' + b"9" * 40 + b',"method":"status"}',
        [(-int("9" * 40), None)],
    ),
    "NaN": (GEN + b'"temperature":NaN}}', [(None, E.PARSE_ERROR)]),
    "Infinity": (GEN + b'"temperature":Infinity}}', [(None, E.PARSE_ERROR)]),
    "-Infinity": (GEN + b'"temperature":-Infinity}}', [(None, E.PARSE_ERROR)]),
    "1e999": (GEN + b'"temperature":1e999}}', [(1, E.INVALID_PARAMS)]),
    "duplicate id: the last wins": (b'{"jsonrpc":"2.0","id":1,"id":2,"method":"status"}', [(2, None)]),
    "duplicate method: the last wins": (
        b'{"jsonrpc":"2.0","id":1,"method":"status","method":"no/such"}',
        [(1, E.METHOD_NOT_FOUND)],
    ),
    "duplicate param: the last wins": (GEN + b'"top_k":1,"top_k":-1}}', [(1, E.INVALID_PARAMS)]),
    "empty batch": (b"[]", [(None, E.INVALID_REQUEST)]),
    "batch of garbage": (b"[1, 2, 3]", [("batch", E.INVALID_REQUEST)] * 3),
    "params not an object": (b'{"jsonrpc":"2.0","id":1,"method":"status","params":[]}', [(1, E.INVALID_PARAMS)]),
    "params null": (b'{"jsonrpc":"2.0","id":1,"method":"status","params":null}', [(1, E.INVALID_PARAMS)]),
    "float id": (b'{"jsonrpc":"2.0","id":1.5,"method":"status"}', [(None, E.INVALID_REQUEST)]),
    "bool id": (b'{"jsonrpc":"2.0","id":true,"method":"status"}', [(None, E.INVALID_REQUEST)]),
    "NUL byte": (b'{"jsonrpc":"2.0","id":1,"method":"status\x00"}', [(None, E.PARSE_ERROR)]),
    "not JSON at all": (b"\x00\x01\x02 hello", [(None, E.PARSE_ERROR)]),
    "cancel as a request": (b'{"jsonrpc":"2.0","id":1,"method":"$/cancelRequest","params":{"id":5}}', [(1, E.METHOD_NOT_FOUND)]),
    "huge top_k keeps every token": (GEN + b'"top_k":100000,"temperature":1}}', [(1, None)]),
    "seed at its limit": (GEN + b'"seed":9223372036854775807,"temperature":1}}', [(1, None)]),
}  # fmt: skip


def _replies(conn: RawConnection, count: int) -> list[tuple[Any, int | None]]:
    """The next `count` replies as (id, code or None), batch items as ("batch", code)."""
    out: list[tuple[Any, int | None]] = []
    while len(out) < count:
        event = conn.next()
        if isinstance(event, rpc.Notification):
            continue
        items = event.items if isinstance(event, rpc.Batch) else (event,)
        for item in items:
            assert isinstance(item, rpc.Response), event
            code = item.error.code if item.error is not None else None
            out.append(("batch" if isinstance(event, rpc.Batch) else item.id, code))
    return out


def _still_serving(socket_path: Path) -> None:
    with Client(socket_path) as client:
        assert client.tokenize("still here").count > 0


@pytest.mark.parametrize("name", list(CORPUS))
def test_hostile_line_gets_the_right_error_and_the_connection_lives(
    daemon: DaemonProcess, name: str
) -> None:
    line, expected = CORPUS[name]
    conn = RawConnection(daemon.socket)
    try:
        conn.send_bytes(line + b"\n")
        assert sorted(_replies(conn, len(expected)), key=repr) == sorted(expected, key=repr)
        conn.request("next", "tokenize", {"text": "ok"})
        assert _replies(conn, 1) == [("next", None)]
    finally:
        conn.close()
    _still_serving(daemon.socket)


BAD_GENERATE_PARAMS: dict[str, list[Any]] = {
    "prompt": [1, ["a"], {"a": 1}, True],
    "messages": ["hi", [1], [{"role": "user"}], [{"role": 1, "content": "x"}], [], [{"role": "", "content": "x"}], [{"role": "user", "content": "x", "extra": 1}]],
    "session": [1, "", "bad name!", "x" * 129, [1]],
    "max_tokens": ["5", 1.5, True, 0, -1, None, 10**6 + 1],
    "temperature": ["hot", -1, True, 101, [1]],
    "top_p": [0, 1.5, "x", -0.1],
    "top_k": [-1, 1.5, "x", False],
    "min_p": [2, -1, "x"],
    "seed": [-1, "x", 2**64, 1.5],
    "stop": ["x", [1], [""], ["x"] * 17, ["y" * 257], None],
    "stream": ["yes", 1, None],
    "logprobs": ["no", 0, []],
    "no_such_param": [1],
}  # fmt: skip


@pytest.mark.parametrize("param", list(BAD_GENERATE_PARAMS))
def test_wrong_types_for_generate_params_are_invalid_params(
    daemon: DaemonProcess, param: str
) -> None:
    conn = RawConnection(daemon.socket)
    try:
        values = BAD_GENERATE_PARAMS[param]
        for i, value in enumerate(values):
            params: dict[str, Any] = {"max_tokens": 2}
            if param not in ("prompt", "messages"):
                params["prompt"] = "x"
            params[param] = value
            conn.request(i, "generate", params)
        replies = _replies(conn, len(values))
        assert sorted(replies, key=repr) == sorted(
            [(i, E.INVALID_PARAMS) for i in range(len(values))], key=repr
        )
    finally:
        conn.close()


def test_a_batch_of_only_notifications_gets_no_reply_at_all(daemon: DaemonProcess) -> None:
    conn = RawConnection(daemon.socket)
    try:
        conn.send_bytes(
            b'[{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}},'
            b'{"jsonrpc":"2.0","method":"no/such"},{"jsonrpc":"2.0","method":"status"}]\n'
        )
        conn.sock.shutdown(socket.SHUT_WR)  # half-close: the daemon answers, then closes
        assert conn.next() is rpc.CLOSED
    finally:
        conn.close()
    _still_serving(daemon.socket)


def test_a_frame_split_byte_by_byte_is_one_message(daemon: DaemonProcess) -> None:
    for framing in (rpc.Framing.NDJSON, rpc.Framing.LSP):
        conn = RawConnection(daemon.socket, framing=framing)
        try:
            data = conn.codec.send(rpc.request(7, "tokenize", {"text": "split \u00e9 up"}))
            for i in range(len(data)):
                conn.send_bytes(data[i : i + 1])
            reply = conn.reply(7)
            assert isinstance(reply, rpc.Response) and reply.error is None
        finally:
            conn.close()


def test_the_frame_cap_is_configured_and_advertised(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as client:
        assert client.initialize().capabilities.max_frame_bytes == FRAME_CAP


def test_per_connection_limit_counts_null_ids_and_batch_items(daemon: DaemonProcess) -> None:
    """64 requests in flight per connection, however they are sent; the rest: ServerBusy."""
    holder = RawConnection(daemon.socket)
    null_ids = RawConnection(daemon.socket)
    batched = RawConnection(daemon.socket)
    try:
        holder.request(1, "generate", {"prompt": "hold", "max_tokens": 3000, "stream": True, "session": "fz-held"})  # fmt: skip
        assert isinstance(holder.next(), rpc.Notification)  # running: it holds the turn
        # Requests on a busy session wait for its turn: they stay in flight.
        one = {"prompt": "x", "max_tokens": 1, "session": "fz-held"}
        null_ids.send_bytes(
            b"".join(null_ids.codec.send(rpc.request(None, "generate", one)) for _ in range(100))  # type: ignore[arg-type]
        )
        batched.send([rpc.request(i, "generate", one) for i in range(100)])
        busy = _replies(null_ids, 36)
        assert busy == [(None, E.SERVER_BUSY)] * 36
        holder.send(rpc.notification("$/cancelRequest", {"id": 1}))
        assert _replies(holder, 1) == [(1, E.REQUEST_CANCELLED)]
        assert _replies(null_ids, 64) == [(None, None)] * 64
        items = Counter(code for _, code in _replies(batched, 100))
        assert items == {None: 64, E.SERVER_BUSY: 36}
    finally:
        for conn in (holder, null_ids, batched):
            conn.close()
        _session_cleanup(daemon.socket)


def test_a_huge_top_k_does_not_fail_the_rest_of_the_batch(daemon: DaemonProcess) -> None:
    long = RawConnection(daemon.socket)
    try:
        long.request(1, "generate", {"prompt": "long", "max_tokens": 60, "stream": True})
        assert isinstance(long.next(), rpc.Notification)
        with Client(daemon.socket) as client:
            sampled = client.generate("k", max_tokens=4, top_k=100_000, temperature=1.0, seed=1)
            assert sampled.usage.completion_tokens == 4
        assert _replies(long, 1) == [(1, None)]
    finally:
        long.close()


# -- framing limits: a daemon with a small frame cap and a 1 s idle timeout ---------------


def _until_closed(conn: RawConnection) -> tuple[list[tuple[Any, int | None]], float]:
    """Every reply until the daemon closes the connection, and how long that took."""
    started = time.monotonic()
    replies: list[tuple[Any, int | None]] = []
    while (event := conn.next()) is not rpc.CLOSED:
        if isinstance(event, rpc.Response):
            replies.append((event.id, event.error.code if event.error else None))
    return replies, time.monotonic() - started


BODY = b'{"jsonrpc":"2.0","id":1,"method":"tokenize","params":{"text":"hi"}}'
GOOD_LSP = b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
# Read before the framing broke: it still gets a reply (cancelled) before the close.
LONG = b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":"x","max_tokens":3000}}'
LONG_LSP = b"Content-Length: %d\r\n\r\n%s" % (len(LONG), LONG)

BREAKING: dict[str, tuple[bytes, rpc.Framing, list[tuple[Any, int | None]], bool]] = {
    # name: (bytes, framing of the replies, replies before the close, closed by the idle timeout)
    "ndjson line over the cap": (b"x" * (FRAME_CAP + 10), rpc.Framing.NDJSON, [(None, E.INVALID_REQUEST)], False),
    "ndjson line over the cap, after a good one": (
        LONG + b"\n" + b"y" * (FRAME_CAP + 10) + b"\n", rpc.Framing.NDJSON,
        [(1, E.REQUEST_CANCELLED), (None, E.INVALID_REQUEST)], False,
    ),
    "lsp body over the cap": (b"Content-Length: %d\r\n\r\n" % (FRAME_CAP + 1), rpc.Framing.LSP, [(None, E.INVALID_REQUEST)], False),
    "content-length negative": (b"Content-Length: -5\r\n\r\n" + BODY, rpc.Framing.LSP, [(None, E.PARSE_ERROR)], False),
    "content-length huge": (b"Content-Length: 99999999999999999999\r\n\r\n" + BODY, rpc.Framing.LSP, [(None, E.PARSE_ERROR)], False),
    "content-length 12 digits": (b"Content-Length: 999999999999\r\n\r\n" + BODY, rpc.Framing.LSP, [(None, E.INVALID_REQUEST)], False),
    "content-length not a number": (b"Content-Length: abc\r\n\r\n" + BODY, rpc.Framing.LSP, [(None, E.PARSE_ERROR)], False),
    "content-length too short": (
        b"Content-Length: 10\r\n\r\n" + BODY + GOOD_LSP, rpc.Framing.LSP,
        [(None, E.PARSE_ERROR), (None, E.PARSE_ERROR)], False,
    ),
    "lsp frame without content-length, after a good one": (
        LONG_LSP + b"X-Other: 1\r\n\r\n" + BODY, rpc.Framing.LSP,
        [(1, E.REQUEST_CANCELLED), (None, E.PARSE_ERROR)], False,
    ),
    "lsp header never terminated": (b"Content-Length: 5\r\n" + b"X: y\r\n" * 2000, rpc.Framing.LSP, [(None, E.PARSE_ERROR)], False),
    "content-length too long, then idle": (b"Content-Length: 1000\r\n\r\n" + BODY, rpc.Framing.LSP, [], True),
    "partial ndjson frame, then idle": (b'{"jsonrpc":"2.0","id":1,', rpc.Framing.NDJSON, [], True),
    "partial lsp header, then idle": (b"Content-Len", rpc.Framing.NDJSON, [], True),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BREAKING))
def test_broken_framing_gets_an_error_and_a_clean_close(daemon: DaemonProcess, name: str) -> None:
    data, framing, expected, idle = BREAKING[name]
    conn = RawConnection(daemon.socket, framing=framing)
    bystander = RawConnection(daemon.socket)  # connected, silent: no partial frame to time out
    try:
        conn.send_bytes(data)
        replies, elapsed = _until_closed(conn)
        assert sorted(replies, key=repr) == sorted(expected, key=repr)
        if idle:
            assert elapsed >= IDLE_S * 0.9
        bystander.request(1, "status")
        assert _replies(bystander, 1) == [(1, None)]
    finally:
        conn.close()
        bystander.close()
    _still_serving(daemon.socket)


def test_idle_close_answers_the_requests_in_flight(daemon: DaemonProcess) -> None:
    conn = RawConnection(daemon.socket)
    try:
        conn.request(1, "generate", {"prompt": "then stall", "max_tokens": 3000, "stream": True})
        assert isinstance(conn.next(), rpc.Notification)
        conn.send_bytes(b'{"jsonrpc":"2.0",')  # a partial frame, never finished
        replies, elapsed = _until_closed(conn)
        assert replies == [(1, E.REQUEST_CANCELLED)]
        assert elapsed >= IDLE_S * 0.9
    finally:
        conn.close()
    with Client(daemon.socket) as client:
        deadline = time.monotonic() + 30
        while (status := client.status()).active:
            assert time.monotonic() < deadline
        assert blocks_beyond_anonymous(status) == 0


def test_new_top_p_and_min_p_values_do_not_stall_the_engine(daemon: DaemonProcess) -> None:
    # Each new value used to compile mlx-lm's filter again on the engine thread (~1.5 s
    # per value on CPU, the whole batch waiting); six values now take well under that.
    with Client(daemon.socket) as client:
        client.generate("warm", max_tokens=2, temperature=1.0, top_p=0.5, min_p=0.05)
        started = time.monotonic()
        for i in range(6):
            p, m = 0.31 + i / 97, 0.011 + i / 89  # values no other test uses
            client.generate("s", max_tokens=2, temperature=1.0, top_p=p, min_p=m, seed=i)
        assert time.monotonic() - started < 4.0
