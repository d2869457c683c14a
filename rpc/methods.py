"""The method table: each method's params and result types, and their cached decoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import messages as m
from .errors import UNDECODABLE, ErrorCode, RpcError

__all__ = ["DELTA_NOTIFICATION", "METHODS", "MethodSpec", "decode_params", "decode_result"]

DELTA_NOTIFICATION = "generate/delta"


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type
    result: type | None  # None: a notification, nothing comes back
    params_decoder: msgspec.json.Decoder[Any] = field(init=False, repr=False, compare=False)
    result_decoder: msgspec.json.Decoder[Any] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params_decoder", msgspec.json.Decoder(self.params))
        decoder: msgspec.json.Decoder[Any] | None = (
            msgspec.json.Decoder(self.result) if self.result is not None else None
        )
        object.__setattr__(self, "result_decoder", decoder)


def _table(*specs: MethodSpec) -> dict[str, MethodSpec]:
    return {s.name: s for s in specs}


METHODS: dict[str, MethodSpec] = _table(
    MethodSpec("initialize", m.InitializeParams, m.InitializeResult),
    MethodSpec("generate", m.GenerateParams, m.GenerateResult),
    MethodSpec("$/cancelRequest", m.CancelParams, None),
    MethodSpec("tokenize", m.TokenizeParams, m.TokenizeResult),
    MethodSpec("sessions/list", m.EmptyParams, m.SessionsListResult),
    MethodSpec("sessions/get", m.SessionParams, m.SessionInfo),
    MethodSpec("sessions/delete", m.SessionParams, m.SessionsDeleteResult),
    MethodSpec("sessions/fork", m.SessionForkParams, m.SessionInfo),
    MethodSpec("sessions/save", m.SessionSaveParams, m.SessionSaveResult),
    MethodSpec("models/current", m.EmptyParams, m.ModelInfo),
    MethodSpec("models/swap", m.ModelsSwapParams, m.ModelInfo),
    MethodSpec("status", m.EmptyParams, m.StatusResult),
    MethodSpec("shutdown", m.ShutdownParams, m.EmptyResult),
)

_EMPTY_OBJECT = b"{}"


def decode_params(method: str, params: msgspec.Raw | None) -> Any:
    """The typed params of `method`; -32601 for an unknown method, -32602 for bad params."""
    spec = METHODS.get(method)
    if spec is None:
        raise RpcError(ErrorCode.METHOD_NOT_FOUND, f"method not found: {method!r}")
    raw = bytes(params) if params is not None and len(params) else _EMPTY_OBJECT
    try:
        return spec.params_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise RpcError(ErrorCode.INVALID_PARAMS, f"invalid params for {method}: {exc}") from None
    except UNDECODABLE as exc:  # the envelope left params as Raw: its strings are checked now
        raise RpcError(ErrorCode.PARSE_ERROR, f"parse error in params: {exc}") from None


def decode_result(method: str, result: msgspec.Raw | bytes) -> Any:
    """The typed result of `method` (client side)."""
    spec = METHODS[method]
    if spec.result_decoder is None:
        raise ValueError(f"{method} is a notification; it has no result")
    return spec.result_decoder.decode(bytes(result))
