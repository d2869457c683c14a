"""OpenAI's chat and text completions as msgspec Structs, translated to and from `generate`.

Requests forbid unknown fields, so a feature mlxd does not implement (tools, images,
logit_bias, ...) is a 400 that names it rather than a silently different answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from .messages import ChatMessage, GenerateParams, GenerateResult, Usage

__all__ = [
    "ChatChoice",
    "ChatChunk",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChatDelta",
    "CompletionChoice",
    "CompletionRequest",
    "ContentPart",
    "Error",
    "ErrorBody",
    "InputMessage",
    "Model",
    "ModelList",
    "OpenAIUsage",
    "OutputMessage",
    "PromptTokensDetails",
    "StreamOptions",
    "TextCompletion",
    "Unsupported",
    "chat_chunk",
    "chat_completion",
    "chat_params",
    "completion_params",
    "decode_chat",
    "decode_completion",
    "error",
    "given",
    "join_text",
    "text_chunk",
    "text_completion",
    "usage",
]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class Unsupported(ValueError):
    """A request field mlxd does not implement; `param` names it for the 400."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Request(Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


# -- requests ---------------------------------------------------------------------------


class ContentPart(_Request):
    type: str
    text: str | None = None
    image_url: Any = UNSET
    input_audio: Any = UNSET
    file: Any = UNSET


class InputMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | UnsetType = UNSET
    tool_calls: Any = UNSET
    tool_call_id: Any = UNSET
    refusal: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | UnsetType = UNSET


Stop = str | Annotated[list[str], Meta(max_length=16)] | None


class _Sampling(_Request):
    """The fields chat and text completions share."""

    model: str = ""
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Stop = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | UnsetType = UNSET
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[InputMessage] = []
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    reasoning_effort: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] = ""
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


# -- responses --------------------------------------------------------------------------


class PromptTokensDetails(Struct):
    cached_tokens: int = 0


class OpenAIUsage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class OutputMessage(Struct):
    role: str
    content: str
    refusal: None = None


class ChatChoice(Struct):
    index: int
    message: OutputMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ChatDelta(Struct, omit_defaults=True):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: OpenAIUsage | UnsetType | None = UNSET


class CompletionChoice(Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class TextCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: OpenAIUsage | UnsetType | None = UNSET


class Model(Struct):
    id: str
    created: int
    owned_by: str = "mlxd"
    object: str = "model"


class ModelList(Struct):
    data: list[Model]
    object: str = "list"


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class Error(Struct):
    error: ErrorBody


# -- translation ------------------------------------------------------------------------


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None:
        raise Unsupported(f"{where}.content", f"`{where}.content` must be text")
    if isinstance(content, str):
        return content
    return join_text(content, lambda j: f"{where}.content[{j}].type", "content part")


def join_text(parts: Sequence[Any], param: Callable[[int], str], kind: str) -> str:
    """The text of a list of parts or blocks (both APIs' shape); any other type is refused."""
    texts = []
    for j, part in enumerate(parts):
        if part.type != "text" or part.text is None:
            raise Unsupported(param(j), f"{kind} type {part.type!r} is not supported (only text)")
        texts.append(part.text)
    return "\n".join(texts)


def given(**fields: Any) -> dict[str, Any]:
    """The `generate` fields a request set (not None); the others keep mlxd's defaults."""
    return {name: value for name, value in fields.items() if value is not None}


def _off(value: object, neutral: tuple[object, ...], param: str) -> None:
    """A field that is accepted only with a value that changes nothing."""
    if value not in neutral:
        raise Unsupported(param, f"`{param}` is not supported (got {value!r})")


def _sampling(req: _Sampling) -> dict[str, Any]:
    _off(req.n, (None, 1), "n")
    _off(req.presence_penalty, (None, 0, 0.0), "presence_penalty")
    _off(req.frequency_penalty, (None, 0, 0.0), "frequency_penalty")
    if req.logit_bias:
        raise Unsupported("logit_bias", "`logit_bias` is not supported")
    fields = given(
        max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed
    )
    fields["stream"] = bool(req.stream)
    if req.stop is not None:
        fields["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return fields


def chat_params(req: ChatCompletionRequest, session: str | None = None) -> GenerateParams:
    """The `generate` params of a chat completion request; Unsupported names a bad field."""
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise Unsupported(name, f"`{name}` (tool calling) is not supported")
    for name in ("tool_choice", "function_call", "audio", "top_logprobs", "parallel_tool_calls"):
        if getattr(req, name) is not None:
            raise Unsupported(name, f"`{name}` is not supported")
    _off(req.logprobs, (None, False), "logprobs")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise Unsupported("response_format", "only `response_format` {type: text} is supported")
    if req.modalities is not None and req.modalities != ["text"]:
        raise Unsupported("modalities", "only text output is supported")
    if not req.messages:
        raise Unsupported("messages", "`messages` must not be empty")
    messages = []
    for i, msg in enumerate(req.messages):
        where = f"messages[{i}]"
        role = ROLES.get(msg.role)
        if role is None:
            raise Unsupported(f"{where}.role", f"role {msg.role!r} is not supported")
        if msg.tool_calls is not UNSET or msg.tool_call_id is not UNSET:
            raise Unsupported(f"{where}.tool_calls", "tool calls are not supported")
        messages.append(ChatMessage(role, _text(msg.content, where)))
    fields = _sampling(req)
    if req.max_completion_tokens is not None:
        fields["max_tokens"] = req.max_completion_tokens
    return GenerateParams(messages=messages, session=session, **fields)


def completion_params(req: CompletionRequest, session: str | None = None) -> GenerateParams:
    """The `generate` params of a text completion request."""
    _off(req.echo, (None, False), "echo")
    _off(req.best_of, (None, 1), "best_of")
    _off(req.suffix, (None, ""), "suffix")
    if req.logprobs is not None:
        raise Unsupported("logprobs", "`logprobs` is not supported")
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise Unsupported("prompt", "`prompt` must be one string (batches are not supported)")
        prompt = prompt[0]
    if not prompt:
        raise Unsupported("prompt", "`prompt` must not be empty")
    fields = _sampling(req)
    fields.setdefault("max_tokens", 16)  # OpenAI's default for text completions
    return GenerateParams(prompt=prompt, session=session, **fields)


def usage(u: Usage) -> OpenAIUsage:
    return OpenAIUsage(
        u.prompt_tokens,
        u.completion_tokens,
        u.prompt_tokens + u.completion_tokens,
        PromptTokensDetails(u.cached_tokens),
    )


def chat_completion(id: str, created: int, model: str, result: GenerateResult) -> ChatCompletion:
    message = OutputMessage("assistant", result.text)
    choice = ChatChoice(0, message, result.finish_reason)
    return ChatCompletion(id, created, model, [choice], usage(result.usage))


def chat_chunk(
    id: str,
    created: int,
    model: str,
    *,
    role: str | None = None,
    content: str | None = None,
    finish_reason: str | None = None,
    usage: OpenAIUsage | UnsetType | None = UNSET,
) -> ChatChunk:
    """One streamed chunk; with `usage` set and nothing else, the final usage-only chunk."""
    delta = ChatDelta(
        role if role is not None else UNSET, content if content is not None else UNSET
    )
    if usage is not UNSET and usage is not None and content is None and finish_reason is None:
        return ChatChunk(id, created, model, [], usage=usage)
    return ChatChunk(id, created, model, [ChatChunkChoice(0, delta, finish_reason)], usage=usage)


def text_completion(id: str, created: int, model: str, result: GenerateResult) -> TextCompletion:
    choice = CompletionChoice(0, result.text, result.finish_reason)
    return TextCompletion(id, created, model, [choice], usage=usage(result.usage))


def text_chunk(
    id: str,
    created: int,
    model: str,
    text: str = "",
    finish_reason: str | None = None,
    usage: OpenAIUsage | UnsetType | None = UNSET,
) -> TextCompletion:
    if usage is not UNSET and usage is not None and not text and finish_reason is None:
        return TextCompletion(id, created, model, [], usage=usage)
    return TextCompletion(
        id, created, model, [CompletionChoice(0, text, finish_reason)], usage=usage
    )


def error(message: str, type: str, param: str | None = None, code: str | None = None) -> Error:
    return Error(ErrorBody(message, type, param, code))


decode_chat = msgspec.json.Decoder(ChatCompletionRequest).decode
decode_completion = msgspec.json.Decoder(CompletionRequest).decode
