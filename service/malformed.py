"""Requests that do not parse are the caller's mistake: INVALID_ARGUMENT, not UNKNOWN.

grpc.aio answers an exception from a request deserializer (bad wire format, invalid
UTF-8 in a proto3 string field, a truncated message) with UNKNOWN "Unexpected
DecodeError". This interceptor gives every handler a deserializer that never raises:
it returns a `Malformed` marker instead, and the handler refuses the call with
INVALID_ARGUMENT before the servicer sees it. For client-streaming methods the request
iterator raises `MalformedRequestError` (an InvalidArgumentError) where the bad message
sits in the stream, after the code was set to INVALID_ARGUMENT. A handler that reads with
`context.read()` instead (StreamSteps) gets the `Malformed` marker itself and must refuse it.

The same wrapper holds the server to --max-concurrent-rpcs (instead of grpc's own limit,
which refuses a call before any interceptor runs, so no metric ever saw the refusal) and
reports the calls it answers itself (refused, malformed) to `record`, as the servicer does.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service import wire
from service.auth import OPEN_METHOD_PREFIXES
from service.engine import InvalidArgumentError

# Calls to the open (unauthenticated) health service have a small limit of their own, so that
# callers without a token cannot use up --max-concurrent-rpcs (e.g. with Watch streams).
MAX_OPEN_CALLS = 64


class MalformedRequestError(InvalidArgumentError):
    pass


class Malformed:
    """What a request deserializer returns for bytes that are not a valid message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error

    def message(self) -> str:
        return f"malformed request message: {self.error}"


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError and whatever else a parser raises on bytes it cannot read
            return Malformed(str(e) or type(e).__name__)

    return deserialize


async def _checked_requests(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)  # the status even if the servicer lets it escape
            raise MalformedRequestError(request.message())
        yield request


Record = Callable[[str, grpc.StatusCode, float], None]  # (method, code, seconds) of a call answered here


class _Limit:
    """RPCs in flight, against the server's limit (all on the event loop thread: no lock)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.running = 0


async def _refuse(limit: _Limit, method: str, record: Record, context: grpc.aio.ServicerContext) -> None:
    record(method, grpc.StatusCode.RESOURCE_EXHAUSTED, 0.0)
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"concurrent RPC limit reached: the server runs at most {limit.most} calls at once; "
        "retry after a short backoff",
        trailing_metadata=(("retry-after-ms", "50"),),
    )


async def _refuse_malformed(request: Malformed, method: str, record: Record, started: float,
                            context: grpc.aio.ServicerContext) -> None:
    record(method, grpc.StatusCode.INVALID_ARGUMENT, time.perf_counter() - started)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())


def _wrap(behavior: Any, streaming_request: bool, method: str, limit: _Limit, record: Record) -> Any:
    """The behavior, refusing past the limit and a Malformed request (or request stream entry)
    first; None if it cannot be wrapped."""
    if inspect.isasyncgenfunction(behavior):

        async def agen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            if limit.running >= limit.most:  # (checked here: no coroutine per call on the common path)
                await _refuse(limit, method, record, context)
            limit.running += 1
            try:
                if streaming_request:
                    request = _checked_requests(request, context)
                elif isinstance(request, Malformed):
                    await _refuse_malformed(request, method, record, started, context)
                async for response in behavior(request, context):
                    yield response
            finally:
                limit.running -= 1

        return agen
    if inspect.iscoroutinefunction(behavior):

        async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            if limit.running >= limit.most:  # (checked here: no coroutine per call on the common path)
                await _refuse(limit, method, record, context)
            limit.running += 1
            try:
                if streaming_request:
                    request = _checked_requests(request, context)
                elif isinstance(request, Malformed):
                    await _refuse_malformed(request, method, record, started, context)
                return await behavior(request, context)
            finally:
                limit.running -= 1

        return coro
    return None  # a synchronous behavior: left as grpc built it


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Malformed requests and the concurrent-RPC limit (see the module's docstring)."""

    def __init__(self, max_concurrent_rpcs: int, record: Record) -> None:
        self.limit = _Limit(max_concurrent_rpcs)
        self.open_limit = _Limit(min(MAX_OPEN_CALLS, max_concurrent_rpcs))
        self.record = record

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        kw = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            # (an answer encoded ahead, wire.top_k_answer, goes out as it is)
            "response_serializer": handler.response_serializer and wire.passing_bytes(handler.response_serializer),
        }
        for behavior, streaming_request, make in (
            (handler.unary_unary, False, grpc.unary_unary_rpc_method_handler),
            (handler.unary_stream, False, grpc.unary_stream_rpc_method_handler),
            (handler.stream_unary, True, grpc.stream_unary_rpc_method_handler),
            (handler.stream_stream, True, grpc.stream_stream_rpc_method_handler),
        ):
            if behavior is not None:
                limit = self.open_limit if details.method.startswith(OPEN_METHOD_PREFIXES) else self.limit
                wrapped = _wrap(behavior, streaming_request, method, limit, self.record)
                return handler if wrapped is None else make(wrapped, **kw)
        return handler
