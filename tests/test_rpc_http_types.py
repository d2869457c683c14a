"""The OpenAI and Anthropic Structs and their translations to and from `generate`, without
sockets; and the codec's detection of an HTTP connection from its first bytes."""

from __future__ import annotations

import json

import msgspec
import pytest

from mlxd import rpc
from mlxd.rpc import anthropic as an
from mlxd.rpc import openai as oa


def chat(**fields: object) -> oa.ChatCompletionRequest:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields}
    return oa.decode_chat(json.dumps(body).encode())


def result(text: str = "ok", finish: str = "stop", cached: int = 0) -> rpc.GenerateResult:
    return rpc.GenerateResult(
        text=text,
        finish_reason=finish,  # type: ignore[arg-type]
        usage=rpc.Usage(prompt_tokens=10, cached_tokens=cached, completion_tokens=3),
        timings=rpc.Timings(),
        tokens=[1, 2, 3],
    )


def test_chat_request_translates_to_generate_params() -> None:
    req = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "x"},
        ],
        max_tokens=5,
        max_completion_tokens=7,
        temperature=0.5,
        top_p=0.9,
        stop="END",
        seed=3,
        n=1,
        stream=True,
    )
    params = oa.chat_params(req, session="s1")
    assert [(m.role, m.content) for m in params.messages or []] == [
        ("system", "be brief"),
        ("user", "a\nb"),
        ("assistant", "x"),
    ]
    assert params.max_tokens == 7  # max_completion_tokens wins, as OpenAI documents
    assert (params.temperature, params.top_p, params.seed) == (0.5, 0.9, 3)
    assert params.stop == ["END"] and params.stream and params.session == "s1"
    # the params survive the JSON-RPC decoder, the one the generate path validates with
    again = rpc.decode_params("generate", msgspec.Raw(msgspec.json.encode(params)))
    assert again == params


def test_defaults_are_generates_except_text_completions() -> None:
    params = oa.chat_params(chat())
    assert params.max_tokens == rpc.GenerateParams(prompt="x").max_tokens
    assert params.temperature == 0.0 and params.stop == [] and not params.stream
    text = oa.completion_params(oa.decode_completion(b'{"model": "m", "prompt": ["once"]}'))
    assert text.prompt == "once" and text.max_tokens == 16


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": []}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
            "messages[0].tool_calls",
        ),
    ],
)
def test_unsupported_chat_features_name_the_field(fields: dict[str, object], param: str) -> None:
    with pytest.raises(oa.Unsupported) as info:
        oa.chat_params(chat(**fields))
    assert info.value.param == param


def test_neutral_values_of_unsupported_fields_are_accepted() -> None:
    req = chat(n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=False, user="u")
    assert oa.chat_params(req).max_tokens > 0


def test_unknown_fields_are_refused_by_the_decoder() -> None:
    with pytest.raises(msgspec.ValidationError, match="frobnicate"):
        oa.decode_chat(b'{"model": "m", "messages": [], "frobnicate": 1}')
    with pytest.raises(msgspec.ValidationError, match="thinking_budget"):
        an.decode_messages(b'{"model": "m", "messages": [], "thinking_budget": 1}')


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"echo": True}, "echo"),
        ({"best_of": 2}, "best_of"),
        ({"logprobs": 1}, "logprobs"),
        ({"suffix": "x"}, "suffix"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_unsupported_completion_features(body: dict[str, object], param: str) -> None:
    req = oa.decode_completion(json.dumps({"model": "m", "prompt": "p", **body}).encode())
    with pytest.raises(oa.Unsupported) as info:
        oa.completion_params(req)
    assert info.value.param == param


def test_openai_responses_carry_usage_with_cached_tokens() -> None:
    done = oa.chat_completion("chatcmpl-1", 7, "served", result("hello", cached=4))
    wire = json.loads(msgspec.json.encode(done))
    assert wire["object"] == "chat.completion" and wire["model"] == "served"
    assert wire["choices"][0]["message"] == {
        "role": "assistant",
        "content": "hello",
        "refusal": None,
    }
    assert wire["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    chunk = json.loads(msgspec.json.encode(oa.chat_chunk("c", 1, "m", content="x")))
    assert chunk["object"] == "chat.completion.chunk" and "usage" not in chunk
    assert chunk["choices"][0]["delta"] == {"content": "x"}
    usage_only = oa.chat_chunk("c", 1, "m", usage=oa.usage(result().usage))
    assert usage_only.choices == [] and usage_only.usage is not None
    text = json.loads(
        msgspec.json.encode(oa.text_completion("cmpl", 1, "m", result("t", "length")))
    )
    assert text["object"] == "text_completion" and text["choices"][0]["finish_reason"] == "length"


def messages_request(**fields: object) -> an.MessagesRequest:
    body = {"model": "claude", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}
    return an.decode_messages(json.dumps({**body, **fields}).encode())


def test_anthropic_request_translates() -> None:
    req = messages_request(
        system=[{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "q"}]},
            {"role": "assistant", "content": "a"},
        ],
        stop_sequences=["\n\nHuman:"],
        temperature=0.2,
        top_k=5,
        stream=True,
    )
    params = an.message_params(req, "s")
    assert [(m.role, m.content) for m in params.messages or []] == [
        ("system", "sys"),
        ("user", "q"),
        ("assistant", "a"),
    ]
    assert params.max_tokens == 9 and params.stop == ["\n\nHuman:"] and params.top_k == 5
    assert params.stream and params.session == "s"
    count = an.count_params(
        an.decode_count(
            b'{"model": "m", "system": "s", "messages": [{"role": "user", "content": "x"}]}'
        )
    )
    assert count.add_generation_prompt and [m.role for m in count.messages or []] == [
        "system",
        "user",
    ]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"tools": [{"name": "f"}]}, "tools"),
        ({"thinking": {"type": "enabled"}}, "thinking"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0.type",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_unsupported_anthropic_features(fields: dict[str, object], param: str) -> None:
    body = {"model": "claude", "max_tokens": 9, "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    if body["max_tokens"] is None:
        del body["max_tokens"]
    req = an.decode_messages(json.dumps(body).encode())
    with pytest.raises(oa.Unsupported) as info:
        an.message_params(req)
    assert info.value.param == param


def test_anthropic_responses() -> None:
    msg = an.message("msg_1", "served", result("hi", cached=4), None)
    wire = json.loads(msgspec.json.encode(msg))
    assert wire["type"] == "message" and wire["role"] == "assistant" and wire["model"] == "served"
    assert wire["content"] == [{"type": "text", "text": "hi"}]
    assert wire["stop_reason"] == "end_turn" and wire["stop_sequence"] is None
    # Anthropic counts cache reads apart from input_tokens
    assert wire["usage"] == {
        "input_tokens": 6,
        "output_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }
    assert an.stop_reason(result(finish="length"), None) == "max_tokens"
    assert an.stop_reason(result(), "STOP") == "stop_sequence"
    event = json.loads(msgspec.json.encode(an.ContentBlockDelta(0, an.TextDelta("x"))))
    assert event == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "x"},
    }
    error = json.loads(msgspec.json.encode(an.error("overloaded_error", "busy")))
    assert error == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}


# -- the codec hands HTTP connections over ------------------------------------------------


@pytest.mark.parametrize(
    "head", [b"GET /health HTTP/1.1\r\n", b"POST /v1/messages HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1"]
)
def test_codec_detects_http(head: bytes) -> None:
    conn = rpc.Connection()
    for i in range(len(head)):  # byte by byte: it waits until the method is certain
        conn.receive_data(head[i : i + 1])
        event = conn.next_event()
        if event is rpc.HTTP:
            break
        assert event is rpc.NEED_DATA
    assert event is rpc.HTTP and conn.framing is rpc.Framing.HTTP
    assert conn.take_data() == head[: i + 1] and conn.pending_bytes == 0


@pytest.mark.parametrize("data", [b'{"jsonrpc"', b"Content-Length: 2\r\n", b"GETX", b"get /"])
def test_codec_keeps_jsonrpc_framing(data: bytes) -> None:
    conn = rpc.Connection()
    conn.receive_data(data)
    assert conn.next_event() is not rpc.HTTP
    assert conn.framing in (rpc.Framing.NDJSON, rpc.Framing.LSP, None)


def test_codec_short_method_prefix_then_eof_is_not_http() -> None:
    conn = rpc.Connection()
    conn.receive_data(b"GE")
    assert conn.next_event() is rpc.NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() is not rpc.HTTP
