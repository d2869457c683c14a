"""Anthropic's Messages API as msgspec Structs, translated to and from `generate`.

Requests forbid unknown fields: tools, images, thinking and the like are a 400 that names
the field, never silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct

from .messages import ChatMessage, GenerateParams, GenerateResult, TokenizeParams
from .openai import Unsupported, given, join_text

__all__ = [
    "ContentBlockDelta",
    "ContentBlockStart",
    "ContentBlockStop",
    "CountTokensRequest",
    "CountTokensResult",
    "Error",
    "ErrorBody",
    "InputBlock",
    "InputMessage",
    "Message",
    "MessageDelta",
    "MessageDeltaBody",
    "MessageStart",
    "MessageStop",
    "MessagesRequest",
    "Ping",
    "TextBlock",
    "TextDelta",
    "Usage",
    "count_params",
    "decode_count",
    "decode_messages",
    "error",
    "message",
    "message_params",
    "stop_reason",
    "usage",
]


class _Request(Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


# -- requests ---------------------------------------------------------------------------


class InputBlock(_Request):
    type: str
    text: str | None = None
    cache_control: dict[str, Any] | None = None  # a caching hint; mlxd caches by session
    citations: Any = None
    source: Any = UNSET
    id: Any = UNSET
    name: Any = UNSET
    input: Any = UNSET
    tool_use_id: Any = UNSET
    content: Any = UNSET
    is_error: Any = UNSET


class InputMessage(_Request):
    role: str
    content: str | list[InputBlock]


class Metadata(_Request):
    user_id: str | None = None


class _Prompt(_Request):
    model: str
    messages: list[InputMessage]
    system: str | list[InputBlock] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    thinking: Any = None


class MessagesRequest(_Prompt):
    max_tokens: Annotated[int, Meta(ge=1)] = 0  # required; 0 is refused by the translation
    stop_sequences: Annotated[list[str], Meta(max_length=16)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = None
    metadata: Metadata | None = None
    service_tier: str | None = None


class CountTokensRequest(_Prompt):
    pass


# -- responses --------------------------------------------------------------------------


class Usage(Struct):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class TextBlock(Struct, tag="text", tag_field="type"):
    text: str


class Message(Struct):
    id: str
    model: str
    content: list[TextBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage
    role: str = "assistant"
    type: str = "message"


class CountTokensResult(Struct):
    input_tokens: int


class MessageStart(Struct, tag="message_start", tag_field="type"):
    message: Message


class ContentBlockStart(Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: TextBlock


class Ping(Struct, tag="ping", tag_field="type"):
    pass


class TextDelta(Struct, tag="text_delta", tag_field="type"):
    text: str


class ContentBlockDelta(Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: TextDelta


class ContentBlockStop(Struct, tag="content_block_stop", tag_field="type"):
    index: int


class MessageDeltaBody(Struct):
    stop_reason: str | None
    stop_sequence: str | None


class MessageDelta(Struct, tag="message_delta", tag_field="type"):
    delta: MessageDeltaBody
    usage: Usage


class MessageStop(Struct, tag="message_stop", tag_field="type"):
    pass


class ErrorBody(Struct):
    type: str
    message: str


class Error(Struct, tag="error", tag_field="type"):
    error: ErrorBody


# -- translation ------------------------------------------------------------------------


def _text(content: str | list[InputBlock], where: str) -> str:
    if isinstance(content, str):
        return content
    return join_text(content, lambda j: f"{where}.{j}.type", "content block")


def _messages(req: _Prompt) -> list[ChatMessage]:
    for name in ("tools", "tool_choice", "thinking"):
        if getattr(req, name) is not None:
            raise Unsupported(name, f"`{name}` is not supported")
    if not req.messages:
        raise Unsupported("messages", "`messages` must not be empty")
    out = []
    if req.system is not None:
        system = _text(req.system, "system")
        if system:
            out.append(ChatMessage("system", system))
    for i, msg in enumerate(req.messages):
        if msg.role not in ("user", "assistant"):
            raise Unsupported(f"messages.{i}.role", f"role {msg.role!r} is not supported")
        out.append(ChatMessage(msg.role, _text(msg.content, f"messages.{i}.content")))
    return out


def message_params(req: MessagesRequest, session: str | None = None) -> GenerateParams:
    """The `generate` params of a Messages request; Unsupported names a bad field."""
    if req.max_tokens < 1:
        raise Unsupported("max_tokens", "`max_tokens` is required")
    if req.service_tier not in (None, "auto", "standard_only"):
        raise Unsupported("service_tier", "`service_tier` is not supported")
    fields = given(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)
    fields |= {"max_tokens": req.max_tokens, "stream": bool(req.stream)}
    if req.stop_sequences:
        fields["stop"] = list(req.stop_sequences)
    return GenerateParams(messages=_messages(req), session=session, **fields)


def count_params(req: CountTokensRequest) -> TokenizeParams:
    """The `tokenize` params that count what a Messages request would prefill."""
    return TokenizeParams(messages=_messages(req), add_generation_prompt=True)


def stop_reason(result: GenerateResult, stop_sequence: str | None) -> str:
    if result.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def usage(result: GenerateResult) -> Usage:
    # Anthropic counts cache reads apart: input_tokens is only what was prefilled.
    u = result.usage
    return Usage(u.prompt_tokens - u.cached_tokens, u.completion_tokens, 0, u.cached_tokens)


def message(id: str, model: str, result: GenerateResult, stop_sequence: str | None) -> Message:
    return Message(
        id,
        model,
        [TextBlock(result.text)],
        stop_reason(result, stop_sequence),
        stop_sequence,
        usage(result),
    )


def error(type: str, message: str) -> Error:
    return Error(ErrorBody(type, message))


decode_messages = msgspec.json.Decoder(MessagesRequest).decode
decode_count = msgspec.json.Decoder(CountTokensRequest).decode
