"""Requests that do not parse are the caller's mistake: INVALID_ARGUMENT, not UNKNOWN.

grpc.aio answers an exception from a request deserializer (bad wire format, invalid
UTF-8 in a proto3 string field, a truncated message) with UNKNOWN "Unexpected
DecodeError". This interceptor gives every handler a deserializer that never raises:
it returns a `Malformed` marker instead, and the handler refuses the call with
INVALID_ARGUMENT before the servicer sees it. For client-streaming methods the request
iterator raises `MalformedRequestError` (an InvalidArgumentError) where the bad message
sits in the stream, after the code was set to INVALID_ARGUMENT. A handler that reads with
`context.read()` instead (StreamSteps) gets the `Malformed` marker itself and must refuse it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.engine import InvalidArgumentError


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


def _wrap(behavior: Any, streaming_request: bool) -> Any:
    """The behavior, refusing a Malformed request (or request stream entry) first; None if it cannot be wrapped."""
    if inspect.isasyncgenfunction(behavior):

        async def agen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if streaming_request:
                request = _checked_requests(request, context)
            elif isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
            async for response in behavior(request, context):
                yield response

        return agen
    if inspect.iscoroutinefunction(behavior):

        async def coro(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if streaming_request:
                request = _checked_requests(request, context)
            elif isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message())
            return await behavior(request, context)

        return coro
    return None  # a synchronous behavior: left as grpc built it


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kw = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        for behavior, streaming_request, make in (
            (handler.unary_unary, False, grpc.unary_unary_rpc_method_handler),
            (handler.unary_stream, False, grpc.unary_stream_rpc_method_handler),
            (handler.stream_unary, True, grpc.stream_unary_rpc_method_handler),
            (handler.stream_stream, True, grpc.stream_stream_rpc_method_handler),
        ):
            if behavior is not None:
                wrapped = _wrap(behavior, streaming_request)
                return handler if wrapped is None else make(wrapped, **kw)
        return handler
