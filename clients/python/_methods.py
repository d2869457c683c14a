"""The typed methods both clients offer, each written once: its params, and what it returns.

A method here builds a `Call` (the request and how its result becomes the return value);
`SyncMethods` sends it and returns the value, `AsyncMethods` does the same awaitably. So the
blocking and the async client differ only in their I/O (as httpx's Client and AsyncClient
share what they build). Errors map in one place too: each client's `call` raises a reply's
error through `_common.result_of`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, Unpack, overload

from mlxd.rpc import (
    ClientInfo,
    EmptyParams,
    GenerateParams,
    GenerateResult,
    InitializeParams,
    InitializeResult,
    ModelInfo,
    ModelsSwapParams,
    SessionForkParams,
    SessionInfo,
    SessionParams,
    SessionSaveParams,
    ShutdownParams,
    StatusResult,
    TokenizeResult,
)

from ._common import GENERATE, ChatInput, Sampling, client_info, generate_params, tokenize_params

__all__ = ["AsyncMethods", "Call", "SyncMethods"]

T = TypeVar("T")
S = TypeVar("S")  # the client's stream type
P = ParamSpec("P")


def _same(result: Any) -> Any:
    return result


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request to send, and how its typed result becomes what the method returns."""

    method: str
    params: Any
    read: Callable[[Any], T] = field(default=_same)


class _Method(Generic[P, T]):
    """A method of both clients: a plain one on `SyncMethods`, a coroutine on `AsyncMethods`."""

    def __init__(self, build: Callable[Concatenate[Any, P], Call[T]]) -> None:
        self.build = build
        self.__name__ = build.__name__
        self.__doc__ = build.__doc__
        signature = inspect.signature(build)
        returns = signature.return_annotation  # "Call[X]": the caller sees X
        if isinstance(returns, str) and returns.startswith("Call[") and returns.endswith("]"):
            returns = returns[len("Call[") : -1]
        self.__signature__ = signature.replace(return_annotation=returns)  # for help()
        parameters = list(signature.parameters.values())[1:]  # less self
        self.signature = signature.replace(parameters=parameters, return_annotation=returns)

    @overload
    def __get__(self, client: None, owner: type) -> Self: ...
    @overload
    def __get__(self, client: SyncMethods[Any], owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, client: AsyncMethods[Any], owner: type
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, client: Any, owner: type) -> Any:
        if client is None:
            return self
        bound = client._bind(self.build)
        bound.__name__ = self.__name__
        bound.__qualname__ = f"{type(client).__name__}.{self.__name__}"
        bound.__doc__ = self.__doc__
        bound.__signature__ = self.signature
        return bound

    def __call__(self, client: Any, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Called through the class (`Client.status(client)`), as a plain method may be."""
        return self.__get__(client, type(client))(*args, **kwargs)


class _Methods(Generic[S]):
    """Every typed method, as the request it sends; the clients below add the I/O."""

    @_Method
    def initialize(self, *, client: ClientInfo | None = None) -> Call[InitializeResult]:
        return Call("initialize", InitializeParams(client=client or client_info()))

    @_Method
    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatInput] | None = None,
        session: str | None = None,
        **sampling: Unpack[Sampling],
    ) -> Call[GenerateResult]:
        return Call(GENERATE, generate_params(prompt, messages, session, sampling, stream=False))

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatInput] | None = None,
        session: str | None = None,
        **sampling: Unpack[Sampling],
    ) -> S:
        """Generate with streaming: the deltas as they come; `.result` then holds the final result.

        `with client.stream(...) as deltas: for d in deltas: ...`, or `async with` and
        `async for` on an AsyncClient. Leaving early (break, an exception, cancellation,
        close(), garbage collection) sends `$/cancelRequest` and still consumes the final
        reply, so the client stays usable.
        """
        return self._new_stream(generate_params(prompt, messages, session, sampling, stream=True))

    def _new_stream(self, params: GenerateParams) -> S:
        raise NotImplementedError

    @_Method
    def tokenize(
        self,
        text: str | None = None,
        *,
        messages: Sequence[ChatInput] | None = None,
        add_generation_prompt: bool = True,
    ) -> Call[TokenizeResult]:
        return Call("tokenize", tokenize_params(text, messages, add_generation_prompt))

    @_Method
    def status(self) -> Call[StatusResult]:
        return Call("status", EmptyParams())

    @_Method
    def sessions_list(self) -> Call[list[SessionInfo]]:
        return Call("sessions/list", EmptyParams(), lambda result: result.sessions)

    @_Method
    def sessions_get(self, session: str) -> Call[SessionInfo]:
        return Call("sessions/get", SessionParams(session))

    @_Method
    def sessions_delete(self, session: str) -> Call[bool]:
        return Call("sessions/delete", SessionParams(session), lambda result: result.deleted)

    @_Method
    def sessions_fork(self, session: str, new_session: str) -> Call[SessionInfo]:
        return Call("sessions/fork", SessionForkParams(session, new_session))

    @_Method
    def sessions_save(self, session: str | None = None) -> Call[int]:
        return Call("sessions/save", SessionSaveParams(session), lambda result: result.saved)

    @_Method
    def models_current(self) -> Call[ModelInfo]:
        return Call("models/current", EmptyParams())

    @_Method
    def models_swap(self, model: str, *, drain_timeout_s: float | None = None) -> Call[ModelInfo]:
        return Call("models/swap", ModelsSwapParams(model, drain_timeout_s))

    @_Method
    def shutdown(self, *, drain_timeout_s: float | None = None) -> Call[None]:
        return Call("shutdown", ShutdownParams(drain_timeout_s), lambda result: None)


class SyncMethods(_Methods[S]):
    """The typed methods of a blocking client: each waits for its reply."""

    def call(self, method: str, params: Any = None) -> Any:
        raise NotImplementedError

    def _bind(self, build: Callable[..., Call[T]]) -> Callable[..., T]:
        def method(*args: Any, **kwargs: Any) -> T:
            call = build(self, *args, **kwargs)
            return call.read(self.call(call.method, call.params))

        return method


class AsyncMethods(_Methods[S]):
    """The typed methods of an async client: each is a coroutine."""

    async def call(self, method: str, params: Any = None) -> Any:
        raise NotImplementedError

    def _bind(self, build: Callable[..., Call[T]]) -> Callable[..., Coroutine[Any, Any, T]]:
        async def method(*args: Any, **kwargs: Any) -> T:
            call = build(self, *args, **kwargs)
            return call.read(await self.call(call.method, call.params))

        return method
