"""HTTP/1.1 (h11) glue: OpenAI and Anthropic endpoints onto the one `generate` path.

A connection is a loop of request cycles, answered in order (pipelined requests wait
their turn). Requests go through `RpcServer.call` like JSON-RPC ones, so admission,
refusal while draining, cancellation and the request log are the same; a watcher reads
the socket while a response runs, so a client that leaves cancels its generation.
"""

from __future__ import annotations

import hmac
import ipaddress
import itertools
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import h11
import msgspec
import structlog
from anyio.abc import ByteStream, SocketListener

from mlxd import rpc
from mlxd.paths import load_token
from mlxd.rpc import anthropic as an
from mlxd.rpc import openai as oa
from mlxd.rpc.errors import UNDECODABLE

from .connection import hung_up, next_connection_id
from .server import RequestContext, RpcServer

if TYPE_CHECKING:
    import enum

    from ..config import Config
    from ..models.model import LoadedModel

__all__ = ["HttpFront", "Served", "load_token", "parse_http_address"]

log = structlog.get_logger("mlxd.http")
MAX_HEADER_BYTES = 16 * 1024
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError)
_request_ids = itertools.count(1)
_encode = msgspec.json.encode
_PREFLIGHT = [  # the answer to a CORS preflight from the --http-cors origin
    ("access-control-allow-methods", "GET, POST, OPTIONS"),
    (
        "access-control-allow-headers",
        "authorization, content-type, x-api-key, anthropic-version, x-mlxd-session",
    ),
    ("access-control-max-age", "600"),
]


def _last_words() -> anyio.CancelScope:
    """A final answer is written even while the daemon cancels its tasks, but not forever."""
    return anyio.CancelScope(shield=True, deadline=anyio.current_time() + 5.0)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Overloaded" if status == 529 else b""


class AddressError(ValueError):
    pass


def parse_http_address(text: str, allow_remote: bool) -> tuple[str, int]:
    """'127.0.0.1:8080' -> (host, port); a non-loopback host needs `allow_remote`."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"--http wants HOST:PORT, e.g. 127.0.0.1:8080 (got {text!r})")
    host = host or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise AddressError(f"--http wants an IP address or localhost (got {host!r})") from None
    if not loopback and not allow_remote:
        raise AddressError(
            f"--http {text}: {host} is not a loopback address; other machines could reach the "
            "model. Add --http-allow-remote to mean it."
        )
    return host, int(port)


class _Refused(Exception):
    """An HTTP error answer: status, JSON body, extra headers; `close` ends the connection."""

    def __init__(
        self, status: int, body: Any, headers: list[tuple[str, str]] | None = None
    ) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or []
        self.close = False


_OPENAI_TYPES = {401: "authentication_error", 429: "rate_limit_error"}
_ANTHROPIC_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _refusal(
    api: str,
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> _Refused:
    if api == "anthropic":
        kind = _ANTHROPIC_TYPES.get(
            status, "invalid_request_error" if status < 500 else "api_error"
        )
        return _Refused(status, an.error(kind, message), headers)
    kind = _OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return _Refused(status, oa.error(message, kind, param, code), headers)


def _from_rpc(api: str, error: rpc.ErrorObject) -> _Refused:
    """A JSON-RPC error from `generate`/`tokenize` as the API's own status and shape."""
    code, data = error.code, error.data if isinstance(error.data, dict) else {}
    if code == rpc.ErrorCode.SERVER_BUSY:
        seconds = max(1, math.ceil(data.get("retry_after_ms", 1000) / 1000))
        status = 529 if api == "anthropic" else 429
        return _refusal(
            api, status, error.message, code="server_busy", headers=[("retry-after", str(seconds))]
        )
    if code in (rpc.ErrorCode.SHUTTING_DOWN, rpc.ErrorCode.REQUEST_CANCELLED):
        cut = code == rpc.ErrorCode.REQUEST_CANCELLED  # HTTP has no cancel: only a drain does it
        message = f"mlxd is draining: {error.message}" if cut else error.message
        return _refusal(api, 503, message, code="shutting_down")
    if code == rpc.ErrorCode.CONTEXT_TOO_LONG:
        return _refusal(api, 400, error.message, code="context_length_exceeded")
    if code in (
        rpc.ErrorCode.INVALID_PARAMS,
        rpc.ErrorCode.INVALID_REQUEST,
        rpc.ErrorCode.PARSE_ERROR,
    ):
        return _refusal(api, 400, error.message, param=_param_of(error.message))
    return _refusal(api, 500, error.message)


_PARAM_PATTERNS = (re.compile(r"unknown field `([^`]+)`"), re.compile(r"at `\$\.?([^`]*)`"))


def _param_of(message: str) -> str | None:
    for pattern in _PARAM_PATTERNS:
        found = pattern.search(message)
        if found:
            return found.group(1)
    return None


def _decode(api: str, decoder: Callable[[bytes], Any], body: bytes) -> Any:
    try:
        return decoder(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "unknown field" in text:
            text = f"unsupported or unknown field: {text}"
        raise _refusal(api, 400, text, param=_param_of(text)) from None
    except (*UNDECODABLE, RecursionError) as exc:
        raise _refusal(api, 400, f"the body is not valid JSON: {exc}") from None


def _translate(api: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except oa.Unsupported as exc:
        raise _refusal(api, 400, str(exc), param=exc.param) from None
    except (ValueError, TypeError) as exc:
        raise _refusal(api, 400, str(exc)) from None


_ROUTES: dict[str, tuple[str, str]] = {  # path -> (method, handler name)
    "/health": ("GET", "_health"),
    "/v1/models": ("GET", "_models"),
    "/v1/chat/completions": ("POST", "_chat"),
    "/v1/completions": ("POST", "_completions"),
    "/v1/messages": ("POST", "_messages"),
    "/v1/messages/count_tokens": ("POST", "_count_tokens"),
}


class Served(Protocol):
    """What the HTTP front reads of the daemon it fronts."""

    @property
    def config(self) -> Config: ...
    @property
    def server(self) -> RpcServer: ...
    @property
    def model(self) -> LoadedModel: ...
    @property
    def state(self) -> enum.Enum: ...


class HttpFront:
    """The daemon's HTTP side: settings, the API token, one `_Conn` per connection."""

    def __init__(self, daemon: Served) -> None:
        self.daemon = daemon
        self.token: str | None = None  # needed on TCP only; loaded when a TCP port is opened
        self.cors: str | None = daemon.config.http_cors
        self.created = int(time.time())

    async def listen(self) -> SocketListener:
        """The TCP listener of `--http` (bound before the daemon says it serves)."""
        assert self.daemon.config.http is not None
        host, port = self.daemon.config.http
        self.token = load_token(self.daemon.config.state_dir)
        try:
            listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
        except OSError as exc:
            raise AddressError(f"cannot listen on {host}:{port}: {exc}") from None
        log.info("http listening", host=host, port=port)
        return listener  # type: ignore[return-value]

    async def serve_unix(self, stream: ByteStream, data: bytes, conn_id: int) -> None:
        await _Conn(self, stream, conn_id, tcp=False).run(data)

    async def serve_tcp(self, stream: ByteStream) -> None:
        self.daemon.server.connections += 1
        try:
            await _Conn(self, stream, next_connection_id(), tcp=True).run(b"")
        except Exception:  # one connection's bug must not stop the daemon serving the others
            log.exception("http connection failed")
        finally:
            self.daemon.server.connections -= 1
            with anyio.CancelScope(shield=True):
                await stream.aclose()


class _Conn:
    def __init__(self, front: HttpFront, stream: ByteStream, conn_id: int, tcp: bool) -> None:
        self.front, self.daemon = front, front.daemon
        self.stream, self.conn_id, self.tcp = stream, conn_id, tcp
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.cap = self.daemon.config.max_frame_bytes
        self.closed = False
        self.api = "openai"
        self.origin: str | None = None

    # -- the connection -------------------------------------------------------------

    async def run(self, data: bytes) -> None:
        if data:  # b"" would tell h11 the client closed
            self.h.receive_data(data)
        while not self.closed:
            request = await self._read_request()
            if request is None:
                break
            await self._answer(*request)
            if self.h.our_state is not h11.DONE or self.h.their_state is not h11.DONE:
                break  # the client or we asked to close (HTTP/1.0, Connection: close)
            self.h.start_next_cycle()

    async def _receive(self, partial: bool) -> bool:
        """Feed the next bytes to h11; False if a partial request idled past the timeout."""
        timeout = self.daemon.config.idle_frame_timeout_s if partial else None
        with anyio.move_on_after(timeout):
            try:
                data = await self.stream.receive(65536)
            except _STREAM_ERRORS:
                data = b""
            self.h.receive_data(data)
            return True
        return False

    async def _read_request(self) -> tuple[h11.Request, bytes] | None:
        """The next whole request (headers and body), or None: the connection ends."""
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = self.h.next_event()
                if event is h11.NEED_DATA:
                    if self.h.they_are_waiting_for_100_continue:  # curl does, for big bodies
                        await self._write(h11.InformationalResponse(status_code=100, headers=[]))
                    partial = request is not None or bool(self.h.trailing_data[0])
                    if not await self._receive(partial):
                        raise _refusal(self.api, 408, "request incomplete: no bytes for too long")
                elif isinstance(event, h11.Request):
                    request = event
                    self._precheck(event)
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > self.cap:
                        raise _refusal(self.api, 413, f"body over {self.cap} bytes")
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    return request, bytes(body)
                else:  # ConnectionClosed: the client is done
                    return None
        except h11.RemoteProtocolError as exc:
            refusal = _refusal(self.api, exc.error_status_hint, f"bad HTTP request: {exc}")
        except _Refused as exc:
            refusal = exc
        refusal.close = True  # the rest of this connection's bytes cannot be trusted
        await self._send_refusal(refusal)
        return None

    def _precheck(self, req: h11.Request) -> None:
        """What can be refused from the headers alone, before reading a body."""
        path = req.target.decode("latin-1").partition("?")[0]
        self.api = "anthropic" if path.startswith("/v1/messages") else "openai"
        size = len(req.target) + sum(len(n) + len(v) + 4 for n, v in req.headers)
        if size > MAX_HEADER_BYTES:  # h11 caps only what arrives in pieces; this caps the rest
            raise _refusal(self.api, 431, f"request headers over {MAX_HEADER_BYTES} bytes")
        headers = {name.decode(): value.decode("latin-1") for name, value in req.headers}
        self.origin = headers.get("origin")
        if req.method == b"OPTIONS" and self.front.cors and self.origin == self.front.cors:
            return  # a CORS preflight carries no token
        if self.tcp and not self._authorized(headers):
            raise _refusal(
                self.api,
                401,
                "missing or wrong API token (Authorization: Bearer, or x-api-key; see `mlxd token`)",
                code="invalid_api_key",
                headers=[("www-authenticate", "Bearer")],
            )
        length = headers.get("content-length", "0")
        if length.isdigit() and int(length) > self.cap:
            raise _refusal(self.api, 413, f"body of {length} bytes is over {self.cap} bytes")
        kind = headers.get("content-type", "application/json").partition(";")[0].strip().lower()
        if req.method == b"POST" and kind != "application/json":
            raise _refusal(self.api, 415, f"content-type must be application/json, not {kind!r}")

    def _authorized(self, headers: dict[str, str]) -> bool:
        token = self.front.token
        if token is None:
            return False
        scheme, _, given = headers.get("authorization", "").partition(" ")
        offered = given.strip() if scheme.lower() == "bearer" else headers.get("x-api-key", "")
        return bool(offered) and hmac.compare_digest(offered.encode(), token.encode())

    # -- one request ----------------------------------------------------------------

    async def _answer(self, req: h11.Request, body: bytes) -> None:
        path = req.target.decode("latin-1").partition("?")[0]
        method = req.method.decode()
        headers = {name.decode(): value.decode("latin-1") for name, value in req.headers}
        try:
            if method == "OPTIONS" and self.front.cors and self.origin == self.front.cors:
                await self._send_response(204, _PREFLIGHT, b"")
                return
            route = _ROUTES.get(path)
            if route is None and path.startswith("/v1/models/"):
                route = ("GET", "_model")
            if route is None:
                raise _refusal(self.api, 404, f"no such endpoint: {method} {path}")
            if route[0] != method:
                raise _refusal(
                    self.api, 405, f"{path} takes {route[0]}", headers=[("allow", route[0])]
                )
            handler = getattr(self, route[1])
            await handler(path, body, headers.get("x-mlxd-session"))
        except _Refused as refusal:
            await self._send_refusal(refusal)

    async def _health(self, path: str, body: bytes, session: str | None) -> None:
        ctx = self._context("status")
        status: rpc.StatusResult = await self.daemon.server.handlers["status"](
            rpc.EmptyParams(), ctx
        )
        life = self.daemon.state.value  # swapping or draining: not ready, whatever the load
        state = status.state if life == "ok" else life
        payload = {
            "status": state,
            "model": status.model.id,
            "active": status.active,
            "queue_depth": status.queue.depth,
        }
        await self._send_json(200 if state == "ok" else 503, payload)

    async def _models(self, path: str, body: bytes, session: str | None) -> None:
        await self._send_json(200, oa.ModelList([self._model_entry()]))

    async def _model(self, path: str, body: bytes, session: str | None) -> None:
        wanted = path.removeprefix("/v1/models/")
        if wanted != self.daemon.model.id:
            raise _refusal(self.api, 404, f"model {wanted!r} is not served here")
        await self._send_json(200, self._model_entry())

    def _model_entry(self) -> oa.Model:
        return oa.Model(self.daemon.model.id, self.front.created)

    async def _count_tokens(self, path: str, body: bytes, session: str | None) -> None:
        req = _decode("anthropic", an.decode_count, body)
        params = _translate("anthropic", an.count_params, req)
        reply = await self._call("tokenize", params, self._context("tokenize"))
        await self._send_json(200, an.CountTokensResult(reply.count))

    async def _chat(self, path: str, body: bytes, session: str | None) -> None:
        req: oa.ChatCompletionRequest = _decode("openai", oa.decode_chat, body)
        params = _translate("openai", oa.chat_params, req, session)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        await self._openai(params, "chat", include_usage)

    async def _completions(self, path: str, body: bytes, session: str | None) -> None:
        req: oa.CompletionRequest = _decode("openai", oa.decode_completion, body)
        params = _translate("openai", oa.completion_params, req, session)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        await self._openai(params, "text", include_usage)

    async def _openai(self, params: rpc.GenerateParams, kind: str, include_usage: bool) -> None:
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        created, model = int(time.time()), self.daemon.model.id
        usage_field: Any = None if include_usage else msgspec.UNSET

        def chunk(text: str | None = None, finish: str | None = None, role: bool = False) -> Any:
            if kind == "chat":
                return oa.chat_chunk(
                    rid,
                    created,
                    model,
                    role="assistant" if role else None,
                    content=text,
                    finish_reason=finish,
                    usage=usage_field,
                )
            return oa.text_chunk(rid, created, model, text or "", finish, usage_field)

        async def opening(ctx: RequestContext) -> None:
            if kind == "chat":
                await self._event(chunk("", role=True))

        async def delta(text: str) -> None:
            if text:
                await self._event(chunk(text))

        result = await self._generate(params, opening, delta)
        if not params.stream:
            make = oa.chat_completion if kind == "chat" else oa.text_completion
            await self._send_json(200, make(rid, created, model, result))
            return
        await self._event(chunk(finish=result.finish_reason))
        if include_usage:
            final = oa.usage(result.usage)
            if kind == "chat":
                await self._event(oa.chat_chunk(rid, created, model, usage=final))
            else:
                await self._event(oa.text_chunk(rid, created, model, usage=final))
        await self._sse(b"data: [DONE]\n\n")
        await self._end()

    async def _messages(self, path: str, body: bytes, session: str | None) -> None:
        req: an.MessagesRequest = _decode("anthropic", an.decode_messages, body)
        params = _translate("anthropic", an.message_params, req, session)
        rid, model = "msg_" + secrets.token_hex(12), self.daemon.model.id

        async def opening(ctx: RequestContext) -> None:
            # generate put the prompt's size in the request's summary before admitting it
            prompt_tokens = int(ctx.summary.get("prompt_tokens", 0))
            start = an.Message(rid, model, [], None, None, an.Usage(prompt_tokens, 0))
            await self._event(an.MessageStart(start))
            await self._event(an.ContentBlockStart(0, an.TextBlock("")))
            await self._event(an.Ping())

        async def delta(text: str) -> None:
            if text:
                await self._event(an.ContentBlockDelta(0, an.TextDelta(text)))

        result = await self._generate(params, opening, delta)
        stop = await self._stop_sequence(result, params.stop)
        if not params.stream:
            await self._send_json(200, an.message(rid, model, result, stop))
            return
        await self._event(an.ContentBlockStop(0))
        body_ = an.MessageDeltaBody(an.stop_reason(result, stop), stop)
        await self._event(an.MessageDelta(body_, an.usage(result)))
        await self._event(an.MessageStop())
        await self._end()

    async def _stop_sequence(self, result: rpc.GenerateResult, stops: list[str]) -> str | None:
        """Which stop string ended the text, if one did: the text stops where it begins."""
        if result.finish_reason != "stop" or not stops or not result.tokens:
            return None
        tokenizer = self.daemon.model.tokenizer
        tokens = list(result.tokens)
        full: str = await anyio.to_thread.run_sync(lambda: tokenizer.decode(tokens))
        return next((s for s in stops if full.startswith(s, len(result.text))), None)

    # -- the generation path --------------------------------------------------------

    def _context(self, method: str, notify: Any = None) -> RequestContext:
        async def ignore(method: str, params: Any) -> None:
            pass

        ctx = RequestContext(f"http-{next(_request_ids)}", method, self.conn_id, notify or ignore)
        ctx.summary["http"] = self.api
        return ctx

    async def _call(self, method: str, params: Any, ctx: RequestContext) -> Any:
        """`method` through RpcServer.call, the JSON-RPC path: its result, or _Refused."""
        request = rpc.Request(ctx.id, method, msgspec.Raw(_encode(params)))
        reply = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, ctx)
            reply = await self.daemon.server.call(request, ctx)
            tg.cancel_scope.cancel()
        if reply is None:  # the client left: nobody to answer
            self.closed = True
            raise _Refused(499, None)
        if isinstance(reply.error, rpc.ErrorObject):
            raise _from_rpc(self.api, reply.error)
        return reply.result

    async def _generate(
        self,
        params: rpc.GenerateParams,
        opening: Callable[[RequestContext], Awaitable[None]],
        delta: Callable[[str], Awaitable[None]],
    ) -> rpc.GenerateResult:
        """Run `generate`; with `stream`, the SSE response starts at the first delta, so an
        error before it (busy, context too long) is still a plain HTTP error."""
        started = False

        async def start() -> None:
            nonlocal started
            if not started:
                started = True
                await self._start_sse()
                await opening(ctx)

        async def notify(method: str, update: rpc.GenerateDelta) -> None:
            await start()
            await delta(update.text)
            if self.closed:
                ctx.scope.cancel()  # the write failed: the client is gone

        ctx = self._context("generate", notify)
        try:
            result: rpc.GenerateResult = await self._call("generate", params, ctx)
        except _Refused as refusal:
            if not started or refusal.body is None:
                raise
            await self._stream_error(refusal)  # the status is sent: end the stream with it
            raise _Refused(499, None) from None
        if params.stream:
            await start()
        return result

    async def _watch(self, ctx: RequestContext) -> None:
        """Read while a response runs: keep pipelined bytes, and cancel if the client leaves."""
        while len(self.h.trailing_data[0]) <= self.cap:
            try:
                data = await self.stream.receive(65536)
            except _STREAM_ERRORS:
                data = b""
            if not data and hung_up(self.stream):
                self.closed = True
                ctx.scope.cancel()
                return
            self.h.receive_data(data)
            if not data:
                break  # half-closed (`printf ... | socat`): it still reads the answer
        await anyio.sleep_forever()  # enough is buffered, or no more will come

    # -- writing --------------------------------------------------------------------

    def _cors(self) -> list[tuple[str, str]]:
        if not self.front.cors or self.origin != self.front.cors:
            return []
        return [("access-control-allow-origin", self.front.cors), ("vary", "origin")]

    async def _write(self, event: Any) -> None:
        if self.closed:
            return
        try:
            data = self.h.send(event)
        except h11.LocalProtocolError:
            self.closed = True
            return
        if data:
            # A client that reads nothing for the idle timeout is gone: its stream cannot
            # hold its request (or the drain) forever.
            with anyio.move_on_after(self.daemon.config.idle_frame_timeout_s) as stalled:
                try:
                    await self.stream.send(data)
                except _STREAM_ERRORS:
                    self.closed = True
            if stalled.cancelled_caught:
                log.info("closing connection: the client stopped reading", conn=self.conn_id)
                self.closed = True

    async def _send_response(
        self, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        headers = [*headers, ("content-length", str(len(body))), *self._cors()]
        await self._write(h11.Response(status_code=status, headers=headers, reason=_reason(status)))
        if body:
            await self._write(h11.Data(data=body))
        await self._end()

    async def _send_json(
        self, status: int, payload: Any, headers: list[tuple[str, str]] | None = None
    ) -> None:
        kind = ("content-type", "application/json")
        await self._send_response(status, [kind, *(headers or [])], _encode(payload))

    async def _send_refusal(self, refusal: _Refused) -> None:
        if refusal.body is None or self.closed:
            return  # the client is gone, or the answer went out as a stream
        if self.h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.closed = True
            return
        headers = list(refusal.headers)
        if refusal.close:
            headers.append(("connection", "close"))
        with _last_words():
            await self._send_json(refusal.status, refusal.body, headers)
        if refusal.close:
            self.closed = True

    async def _start_sse(self) -> None:
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
        await self._write(h11.Response(status_code=200, headers=[*headers, *self._cors()]))

    async def _sse(self, data: bytes) -> None:
        await self._write(h11.Data(data=data))

    async def _event(self, payload: Any) -> None:
        """One server-sent event: OpenAI's `data:` lines, Anthropic's named events."""
        data = _encode(payload)
        if self.api == "anthropic":
            await self._sse(
                b"event: %s\ndata: %s\n\n" % (payload.__struct_config__.tag.encode(), data)
            )
        else:
            await self._sse(b"data: %s\n\n" % data)

    async def _stream_error(self, refusal: _Refused) -> None:
        """A stream cut short (drain deadline, engine error): an error event, then the end."""
        with _last_words():
            await self._event(refusal.body)
            if self.api != "anthropic":
                await self._sse(b"data: [DONE]\n\n")
            await self._end()

    async def _end(self) -> None:
        await self._write(h11.EndOfMessage())
