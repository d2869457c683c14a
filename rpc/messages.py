"""One msgspec Struct per method's params and result (PROTOCOL.md, version 1).

Params forbid unknown fields so a typo (`max_token`) is an error, not a silent default.
Results accept unknown fields so an older client can read a newer server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

__all__ = [
    "PROTOCOL_VERSION",
    "SESSION_ID_PATTERN",
    "CancelParams",
    "CancelledData",
    "Capabilities",
    "ChatMessage",
    "ClientInfo",
    "ContextTooLongData",
    "EmptyParams",
    "EmptyResult",
    "GenerateDelta",
    "GenerateParams",
    "GenerateResult",
    "InitializeParams",
    "InitializeResult",
    "LatencyStatus",
    "MemoryStatus",
    "ModelInfo",
    "ModelsSwapParams",
    "Percentiles",
    "PoolStatus",
    "QueueStatus",
    "ServerBusyData",
    "ServerInfo",
    "SessionForkParams",
    "SessionInfo",
    "SessionParams",
    "SessionSaveParams",
    "SessionSaveResult",
    "SessionTierStatus",
    "SessionsDeleteResult",
    "SessionsListResult",
    "ShutdownParams",
    "StatusResult",
    "Timings",
    "TokenizeParams",
    "TokenizeResult",
    "Totals",
    "Usage",
]

PROTOCOL_VERSION = 1
SESSION_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"

SessionId = Annotated[str, Meta(pattern=SESSION_ID_PATTERN)]
RequestId = int | str
NonNegInt = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(ge=0, le=86_400)]


class Params(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every request's params."""


class Result(Struct):
    """Base of every result and notification payload: every field is always sent (zeros
    and nulls included), except optional extras left UNSET."""


# -- shared -----------------------------------------------------------------------------


class ModelInfo(Result):
    id: str
    path: str
    fingerprint: str
    type: str
    vocab_size: int
    context_length: int
    dtype: str
    # "native": quantized as the file stores it; "float32": dequantized (the CPU default).
    weights: str = "native"


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: str


class EmptyParams(Params):
    pass


class EmptyResult(Result):
    pass


def _one_of_prompt_or_messages(prompt: object, messages: object) -> None:
    # msgspec turns a ValueError raised in __post_init__ into a ValidationError (-32602).
    if (prompt is None) == (messages is None):
        raise ValueError("exactly one of `prompt` or `messages` is required")
    if messages is not None and len(messages) == 0:  # type: ignore[arg-type]
        raise ValueError("`messages` must not be empty")


# -- initialize -------------------------------------------------------------------------


class ClientInfo(Struct):
    name: str
    version: str = ""


class InitializeParams(Params):
    client: ClientInfo | None = None
    protocol: int | None = None


class ServerInfo(Result):
    name: str
    version: str


class Capabilities(Result):
    methods: list[str]
    framing: list[str]
    streaming: bool = True
    sessions: bool = True
    cancellation: bool = True
    max_frame_bytes: int = 0


class InitializeResult(Result):
    server: ServerInfo
    protocol: int
    model: ModelInfo
    capabilities: Capabilities


# -- generate ---------------------------------------------------------------------------


class GenerateParams(Params):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    session: SessionId | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] = 256
    temperature: Annotated[float, Meta(ge=0, le=100)] = 0.0
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    top_k: NonNegInt = 0
    min_p: Annotated[float, Meta(ge=0, le=1)] = 0.0
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=16)
    ] = []
    stream: bool = False
    logprobs: bool = False

    def __post_init__(self) -> None:
        _one_of_prompt_or_messages(self.prompt, self.messages)


class GenerateDelta(Result):
    """Params of the `generate/delta` notification."""

    id: RequestId
    text: str
    tokens: list[int] | UnsetType = UNSET
    logprobs: list[float] | UnsetType = UNSET


class Usage(Result):
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class Timings(Result):
    queued_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    tokens_per_s: float = 0.0


class GenerateResult(Result):
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings
    session: str | None = None
    tokens: list[int] | UnsetType = UNSET
    logprobs: list[float] | UnsetType = UNSET


class CancelParams(Params):
    id: RequestId


# -- tokenize ---------------------------------------------------------------------------


class TokenizeParams(Params):
    text: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("exactly one of `text` or `messages` is required")


class TokenizeResult(Result):
    tokens: list[int]
    count: int


# -- sessions ---------------------------------------------------------------------------


class SessionParams(Params):
    session: SessionId


class SessionForkParams(Params):
    session: SessionId
    new_session: SessionId


class SessionSaveParams(Params):
    session: SessionId | None = None


class SessionInfo(Result):
    session: str
    tokens: int
    bytes: int
    state: Literal["hot", "disk", "busy"]
    last_used: float


class SessionsListResult(Result):
    sessions: list[SessionInfo]


class SessionsDeleteResult(Result):
    deleted: bool


class SessionSaveResult(Result):
    saved: int


# -- models, status, shutdown -----------------------------------------------------------


class ModelsSwapParams(Params):
    model: Annotated[str, Meta(min_length=1, max_length=4096)]
    drain_timeout_s: Seconds | None = None


class ShutdownParams(Params):
    drain_timeout_s: Seconds | None = None


class PoolStatus(Result):
    block_tokens: int
    blocks_total: int
    blocks_used: int
    utilization: float


class QueueStatus(Result):
    depth: int
    limit: int


class SessionTierStatus(Result):
    hot: int = 0
    disk: int = 0
    hot_bytes: int = 0
    disk_bytes: int = 0


class Percentiles(Result):
    p50: float = 0.0
    p95: float = 0.0
    p99: float = 0.0


class LatencyStatus(Result):
    ttft: Percentiles
    itl: Percentiles


class Totals(Result):
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    rejected: int = 0
    errors: int = 0


class MemoryStatus(Result):
    rss_bytes: int = 0
    mlx_active_bytes: int = 0
    mlx_cache_bytes: int = 0


class StatusResult(Result):
    state: Literal["ok", "degraded", "draining"]
    model: ModelInfo
    uptime_s: float
    pool: PoolStatus
    queue: QueueStatus
    active: int
    sessions: SessionTierStatus
    latency_ms: LatencyStatus
    totals: Totals
    memory: MemoryStatus
    connections: int = 0
    # Free-form extras (BLAS in use, backend, recent disk errors); clients must not rely on keys.
    details: dict[str, Any] = {}


# -- error data -------------------------------------------------------------------------


class ServerBusyData(Result):
    retry_after_ms: int
    queue_depth: int


class ContextTooLongData(Result):
    limit: int
    requested: int


class CancelledData(Result):
    text: str
    usage: Usage
