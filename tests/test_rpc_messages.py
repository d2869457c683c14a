"""Typed params and results: the method table, -32601 vs -32602, and result round trips."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from mlxd.rpc import (
    METHODS,
    Capabilities,
    ChatMessage,
    Connection,
    EmptyResult,
    ErrorCode,
    ErrorObject,
    Framing,
    GenerateDelta,
    GenerateParams,
    GenerateResult,
    InitializeResult,
    LatencyStatus,
    MemoryStatus,
    ModelInfo,
    Percentiles,
    PoolStatus,
    QueueStatus,
    Request,
    Response,
    RpcError,
    ServerInfo,
    SessionInfo,
    SessionSaveResult,
    SessionsDeleteResult,
    SessionsListResult,
    SessionTierStatus,
    StatusResult,
    Timings,
    TokenizeResult,
    Totals,
    Usage,
    decode_params,
    decode_result,
    request,
    response,
)


def params(method: str, value: Any) -> Any:
    raw = None if value is None else msgspec.Raw(msgspec.json.encode(value))
    return decode_params(method, raw)


def params_error(method: str, value: Any) -> RpcError:
    with pytest.raises(RpcError) as info:
        params(method, value)
    return info.value


# -- params -----------------------------------------------------------------------------


def test_unknown_method_is_method_not_found() -> None:
    error = params_error("generat", {"prompt": "x"})
    assert error.code == ErrorCode.METHOD_NOT_FOUND and error.name == "METHOD_NOT_FOUND"
    assert "generat" in error.message


def test_generate_defaults() -> None:
    p = params("generate", {"prompt": "hi"})
    assert p == GenerateParams(prompt="hi")
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (256, 0.0, 1.0, 0, 0.0)
    assert (p.seed, p.stop, p.stream, p.logprobs, p.session) == (None, [], False, False, None)


def test_generate_with_messages_and_everything() -> None:
    p = params(
        "generate",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "session": "chat-1.a_B",
            "max_tokens": 1_000_000,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.05,
            "seed": 7,
            "stop": ["\n\n"],
            "stream": True,
            "logprobs": True,
        },
    )
    assert p.messages == [ChatMessage("user", "hi")] and p.session == "chat-1.a_B"


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt": 5},  # wrong type
        {"prompt": "x", "max_tokens": "10"},  # no coercion from strings
        {"prompt": "x", "max_token": 10},  # unknown field (typo)
        {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},  # both
        {},  # neither
        {"messages": []},
        {"messages": [{"role": "user", "content": "y", "name": "n"}]},
        {"messages": [{"role": "", "content": "y"}]},
        {"prompt": "x", "session": "has space"},
        {"prompt": "x", "session": ""},
        {"prompt": "x", "session": "a" * 129},
        {"prompt": "x", "session": "../etc"},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": 1_000_001},
        {"prompt": "x", "max_tokens": 1.5},
        {"prompt": "x", "temperature": -0.1},
        {"prompt": "x", "top_p": 0},
        {"prompt": "x", "top_k": -1},
        {"prompt": "x", "min_p": 1.5},
        {"prompt": "x", "seed": -1},
        {"prompt": "x", "stop": [""]},
        {"prompt": "x", "stop": ["s"] * 17},
        {"prompt": "x", "stream": "yes"},
        [1, 2],  # positional params
        5,
    ],
)
def test_bad_generate_params_are_invalid_params(bad: Any) -> None:
    assert params_error("generate", bad).code == ErrorCode.INVALID_PARAMS


def test_session_pattern_accepts_the_longest_id() -> None:
    assert params("sessions/get", {"session": "a" * 128}).session == "a" * 128


def test_absent_params_mean_an_empty_object() -> None:
    assert params("status", None) == params("status", {})
    assert params("sessions/save", None).session is None
    assert params_error("sessions/get", None).code == ErrorCode.INVALID_PARAMS
    assert params_error("status", {"verbose": True}).code == ErrorCode.INVALID_PARAMS


def test_cancel_params_accept_int_and_string_ids() -> None:
    assert params("$/cancelRequest", {"id": 3}).id == 3
    assert params("$/cancelRequest", {"id": "a"}).id == "a"
    assert params_error("$/cancelRequest", {"id": None}).code == ErrorCode.INVALID_PARAMS


@pytest.mark.parametrize(
    ("method", "bad"),
    [
        ("tokenize", {}),
        ("tokenize", {"text": "a", "messages": [{"role": "user", "content": "b"}]}),
        ("sessions/fork", {"session": "a"}),
        ("sessions/fork", {"session": "a", "new_session": "b/c"}),
        ("models/swap", {"model": ""}),
        ("shutdown", {"drain_timeout_s": -1}),
        ("shutdown", {"drain_timeout_s": 86_401}),
        ("initialize", {"client": {"version": "1"}}),
    ],
)
def test_other_bad_params(method: str, bad: Any) -> None:
    assert params_error(method, bad).code == ErrorCode.INVALID_PARAMS


def test_invalid_utf8_in_params_is_a_parse_error_not_a_crash() -> None:
    event = Connection()
    event.receive_data(b'{"jsonrpc":"2.0","id":1,"method":"generate","params":{"prompt":"\xff"}}\n')
    request_event = event.next_event()
    assert isinstance(request_event, Request) and request_event.id == 1
    with pytest.raises(RpcError) as info:
        decode_params("generate", request_event.params)
    assert info.value.code == ErrorCode.PARSE_ERROR


def test_params_structs_reject_unknown_fields_but_results_accept_them() -> None:
    assert params_error("tokenize", {"text": "a", "extra": 1}).code == ErrorCode.INVALID_PARAMS
    raw = b'{"tokens":[1],"count":1,"added_in_v2":true}'
    assert decode_result("tokenize", raw) == TokenizeResult([1], 1)


# -- results ----------------------------------------------------------------------------

MODEL = ModelInfo("tiny", "/m/tiny", "sha256:ab", "llama", 32000, 4096, "bfloat16")
SESSION = SessionInfo("s1", tokens=12, bytes=4096, state="hot", last_used=1.7e9)
RESULTS: dict[str, Any] = {
    "initialize": InitializeResult(
        ServerInfo("mlxd", "0.1.0"),
        1,
        MODEL,
        Capabilities(methods=sorted(METHODS), framing=["ndjson", "lsp"], max_frame_bytes=8 << 20),
    ),
    "generate": GenerateResult(
        "Hello\n\u2028world",
        "stop",
        Usage(5, 3, 2),
        Timings(1.0, 20.5, 40.0, 50.0),
        session="s1",
        tokens=[1, 2],
        logprobs=[-0.5, -0.25],
    ),
    "tokenize": TokenizeResult([1, 2, 3], 3),
    "sessions/list": SessionsListResult([SESSION]),
    "sessions/get": SESSION,
    "sessions/delete": SessionsDeleteResult(True),
    "sessions/fork": SessionInfo("s2", 12, 4096, "busy", 1.7e9),
    "sessions/save": SessionSaveResult(2),
    "models/current": MODEL,
    "models/swap": MODEL,
    "status": StatusResult(
        "degraded",
        MODEL,
        12.5,
        PoolStatus(16, 1024, 1000, 0.977),
        QueueStatus(2, 64),
        3,
        SessionTierStatus(1, 2, 3, 4),
        LatencyStatus(Percentiles(1, 2, 3), Percentiles(4, 5, 6)),
        Totals(10, 7, 1, 1, 1),
        MemoryStatus(1, 2, 3),
        connections=2,
        details={"blas": "openblas"},
    ),
    "shutdown": EmptyResult(),
}


def test_every_method_with_a_result_has_a_sample() -> None:
    assert set(RESULTS) == {name for name, spec in METHODS.items() if spec.result is not None}
    assert METHODS["$/cancelRequest"].result is None


@pytest.mark.parametrize("method", sorted(RESULTS))
@pytest.mark.parametrize("framing", [Framing.NDJSON, Framing.LSP])
def test_results_round_trip_through_the_wire(method: str, framing: Framing) -> None:
    client, server = Connection(framing), Connection()
    server.receive_data(client.send(request(1, method, {})))
    assert isinstance(server.next_event(), Request)
    client.receive_data(server.send(response(1, RESULTS[method])))
    event = client.next_event()
    assert isinstance(event, Response) and event.result is not None
    decoded = decode_result(method, event.result)
    assert type(decoded) is type(RESULTS[method])
    assert decoded == RESULTS[method]


def test_results_send_every_protocol_field_and_omit_only_unset_extras() -> None:
    # PROTOCOL.md promises these fields, zeros and nulls included; tokens/logprobs are extras.
    result = GenerateResult("x", "length", Usage(), Timings())
    assert msgspec.json.decode(msgspec.json.encode(result)) == {
        "text": "x",
        "finish_reason": "length",
        "usage": {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0},
        "timings": {"queued_ms": 0.0, "ttft_ms": 0.0, "total_ms": 0.0, "tokens_per_s": 0.0},
        "session": None,
    }
    assert decode_result("generate", msgspec.json.encode(result)) == result


def test_decode_result_rejects_notifications_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="notification"):
        decode_result("$/cancelRequest", b"{}")
    with pytest.raises(msgspec.ValidationError):
        decode_result("generate", b'{"text":"x","finish_reason":"eos","usage":{},"timings":{}}')


def test_delta_payload_round_trip() -> None:
    delta = GenerateDelta(id=4, text="a\n", tokens=[9])
    assert msgspec.json.decode(msgspec.json.encode(delta), type=GenerateDelta) == delta
    assert b"logprobs" not in msgspec.json.encode(delta)


# -- errors -----------------------------------------------------------------------------


def test_rpc_error_to_and_from_the_wire_object() -> None:
    error = RpcError(ErrorCode.SERVER_BUSY, "busy", {"retry_after_ms": 100, "queue_depth": 3})
    obj = error.to_object()
    assert obj == ErrorObject(-32000, "busy", {"retry_after_ms": 100, "queue_depth": 3})
    back = RpcError.from_object(msgspec.json.decode(msgspec.json.encode(obj), type=ErrorObject))
    assert (back.code, back.message, back.data, back.name) == (
        -32000,
        "busy",
        obj.data,
        "SERVER_BUSY",
    )
    assert RpcError(-1, "x").name == "-1"
    assert msgspec.json.encode(ErrorObject(-32603, "boom")) == b'{"code":-32603,"message":"boom"}'


def test_error_codes_match_the_protocol() -> None:
    assert {c.name: int(c) for c in ErrorCode} == {
        "PARSE_ERROR": -32700,
        "INVALID_REQUEST": -32600,
        "METHOD_NOT_FOUND": -32601,
        "INVALID_PARAMS": -32602,
        "INTERNAL_ERROR": -32603,
        "SERVER_BUSY": -32000,
        "SHUTTING_DOWN": -32001,
        "SESSION_NOT_FOUND": -32003,
        "CONTEXT_TOO_LONG": -32004,
        "REQUEST_CANCELLED": -32800,
    }
