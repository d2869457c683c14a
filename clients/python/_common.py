"""What the sync and async clients share: socket path, params building, reply decoding."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias, TypedDict

import msgspec

import mlxd
from mlxd.rpc import (
    DELTA_NOTIFICATION,
    METHODS,
    ChatMessage,
    ClientInfo,
    GenerateDelta,
    GenerateParams,
    Message,
    Notification,
    Response,
    TokenizeParams,
    check_socket_path,
    decode_result,
    default_socket_path,
)

from .errors import error_from_object

__all__ = [
    "CANCEL",
    "GENERATE",
    "RECV_BYTES",
    "ChatInput",
    "Sampling",
    "client_info",
    "connect_retries",
    "delta_of",
    "generate_params",
    "result_of",
    "socket_path",
    "tokenize_params",
]

GENERATE = "generate"
CANCEL = "$/cancelRequest"
RECV_BYTES = 64 * 1024

ChatInput: TypeAlias = ChatMessage | Mapping[str, str]


class Sampling(TypedDict, total=False):
    """The optional `generate` params besides prompt/messages/session (PROTOCOL.md)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: list[str]
    logprobs: bool


_delta_decoder = msgspec.json.Decoder(GenerateDelta)
_any_decoder = msgspec.json.Decoder()


def socket_path(path: str | os.PathLike[str] | None) -> str:
    return check_socket_path(default_socket_path() if path is None else path)


def connect_retries(wait_s: float) -> Iterator[float]:
    """Pauses between connection attempts to a daemon that is starting, until `wait_s` is up.

    Under socket activation the socket exists and connecting just waits in its backlog;
    without it, the path appears (ENOENT before) once the daemon has bound it.
    """
    deadline = time.monotonic() + wait_s
    pause = 0.02
    while (remaining := deadline - time.monotonic()) > 0:
        yield min(pause, remaining)
        pause = min(pause * 2, 0.25)


def client_info() -> ClientInfo:
    return ClientInfo("mlxd.client", getattr(mlxd, "__version__", ""))


def _chat(messages: Sequence[ChatInput] | None) -> list[ChatMessage] | None:
    if messages is None:
        return None
    return [m if isinstance(m, ChatMessage) else msgspec.convert(m, ChatMessage) for m in messages]


def generate_params(
    prompt: str | None,
    messages: Sequence[ChatInput] | None,
    session: str | None,
    sampling: Sampling,
    *,
    stream: bool,
) -> GenerateParams:
    """Raises ValueError unless exactly one of prompt/messages is given; the daemon checks the rest."""
    return GenerateParams(
        prompt=prompt, messages=_chat(messages), session=session, stream=stream, **sampling
    )


def tokenize_params(
    text: str | None, messages: Sequence[ChatInput] | None, add_generation_prompt: bool
) -> TokenizeParams:
    return TokenizeParams(
        text=text, messages=_chat(messages), add_generation_prompt=add_generation_prompt
    )


def result_of(method: str, reply: Response) -> Any:
    """The typed result of a reply, or raise its error as an RpcError subclass.

    A method missing from the table (a newer server's) decodes to plain JSON values.
    """
    if reply.error is not None:
        raise error_from_object(reply.error)
    raw = bytes(reply.result) if reply.result is not None else b"null"
    spec = METHODS.get(method)
    if spec is None or spec.result is None:
        return _any_decoder.decode(raw)
    return decode_result(method, raw)


def delta_of(message: Message) -> GenerateDelta | None:
    """The params of a `generate/delta` notification; None for any other message."""
    if not isinstance(message, Notification) or message.method != DELTA_NOTIFICATION:
        return None
    if message.params is None:
        return None
    try:
        return _delta_decoder.decode(bytes(message.params))
    except msgspec.ValidationError:
        return None
