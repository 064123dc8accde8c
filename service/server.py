"""lstm-serve: the gRPC API layer. It only translates protobuf to engine calls and back.

    server, port = await create_server(config)   # port 0 picks a free port
    await server.start()
    ...
    await server.stop(grace=5)
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

import service
from model.checkpoint import CheckpointError, load_checkpoint
from model.model import resolve_device
from model.tokenizer import UnknownCharacterError
from service import eventloop, wire
from service.auth import AuthConfigError, AuthInterceptor, TokenAuth, load_tokens
from service.config import ServerConfig, parse_config
from service.engine import (
    MAX_RESPONSE_BYTES,
    QUEUE_SHARE,
    AlreadyExistsError,
    Engine,
    EngineError,
    FailedPreconditionError,
    GenerateParams,
    InvalidArgumentError,
    NotFoundError,
    PositionConflictError,
    ResourceExhaustedError,
    SessionInfo,
    StepGroup,
    StepOptions,
    StepResult,
    UnavailableError,
)
from service.logs import configure_logging, short_id
from service.malformed import Malformed, MalformedRequestError, MalformedRequestInterceptor
from service.metrics import METHODS, Metrics, start_metrics_http_server
from service.runner import claim_torch_threads
from service.state_store import SqliteStateStore, StateStoreError

__version__ = "0.1.0"
log = logging.getLogger("lstm_serve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LstmService"].full_name
DEFAULT_STEP_OPTIONS = StepOptions()  # a StepRequest that sets none of its output fields
ANONYMOUS = ""  # the principal of every caller while authentication is off

STATUS_OF: list[tuple[type[EngineError], grpc.StatusCode]] = [
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PositionConflictError, grpc.StatusCode.ABORTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
]

T = TypeVar("T")

# Requests one StreamSteps call may have submitted and not yet answered; at the limit the
# server stops reading the stream until an answer goes out, so HTTP/2 flow control pushes
# back on a client that pipelines without reading, and one stream cannot fill the engine's
# queue (max_queued_tokens) for everyone else.
MAX_STREAM_IN_FLIGHT = 1024
# And about this many bytes of answers: a client that sends large requests (log-probabilities,
# hidden states) and never reads must not make the server hold a thousand answers for it.
MAX_STREAM_PENDING_BYTES = 64 * 1024 * 1024
# And over all streams: answers due (requested and not yet sent). Past it a stream submits only
# when it has nothing unanswered, so clients that read go on one request at a time while streams
# that never read keep only what they hold (each may hold MAX_STREAM_PENDING_BYTES: 100 such
# streams could make the server hold 6.4 GB).
MAX_PENDING_ANSWER_BYTES = 1024 * 1024 * 1024
# And engine.QUEUE_SHARE of the engine's queue (--max-queued-tokens), as one session may: with
# 1024 requests of 256 tokens in flight, one pipelining stream (lstm-client score) held the whole
# default queue, and a second such stream, or anyone else's request, got RESOURCE_EXHAUSTED.
# At shutdown, once the engine has finished its work: time for its last answers to be written
# before the calls still open (idle streams) are cancelled, within --grace-seconds.
FINAL_WRITE_SECONDS = 1.0


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _session_pb(info: SessionInfo) -> pb.Session:
    return pb.Session(
        session_id=info.session_id,
        position=info.position,
        create_time=_timestamp(info.created_at),
        expire_time=_timestamp(info.expires_at),
        ttl_seconds=info.ttl_seconds,
    )


def _step_response(result: StepResult) -> pb.StepResponse | bytes:
    # Built in place (outputs.add) from whole-array tolist() calls: the cheapest way found to
    # fill repeated sub-messages from Python (~30% less than constructing TokenOutputs).
    encoded = wire.top_k_answer(result)  # the common answer of several tokens: its bytes, no message
    if encoded is not None:
        return encoded
    if wire.fits(result):  # a large answer: built as wire bytes, 4-10x faster (service/wire.py)
        return wire.step_response(result)
    response = pb.StepResponse(session_id=result.session_id, position=result.position)
    add = response.outputs.add
    if result.logprobs is None and result.hidden is None and result.top_tokens is not None:
        # What nearly every request asks for (top-k only): no None arguments to pass per token (-10 %).
        assert result.top_logprobs is not None
        for token, tt, tl in zip(result.tokens, result.top_tokens.tolist(), result.top_logprobs.tolist()):
            add(token=token, top_tokens=tt, top_logprobs=tl)
        return response
    return _listed_step_response(response, result)


def _listed_step_response(response: pb.StepResponse, result: StepResult) -> pb.StepResponse:
    """The general case: every field from lists (what wire.step_response is checked against)."""
    add = response.outputs.add
    n = len(result.tokens)
    none = [None] * n
    top_t = result.top_tokens.tolist() if result.top_tokens is not None else none
    top_l = result.top_logprobs.tolist() if result.top_logprobs is not None else none
    logp = result.logprobs.tolist() if result.logprobs is not None else none
    hidden = result.hidden.tolist() if result.hidden is not None else none
    for token, tt, tl, lp, h in zip(result.tokens, top_t, top_l, logp, hidden):
        add(token=token, top_tokens=tt, top_logprobs=tl, logprobs=lp, hidden=h)
    return response


class RpcError(Exception):
    """A status to end an RPC with (caller mistakes found in the API layer)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.trailing = trailing


def to_rpc_error(error: Exception) -> RpcError:
    if isinstance(error, RpcError):
        return error
    if isinstance(error, EngineError):
        trailing: tuple[tuple[str, str], ...] = ()
        if isinstance(error, PositionConflictError):
            trailing = (("lstm-position", str(error.current_position)),)
        elif isinstance(error, ResourceExhaustedError):
            trailing = (("retry-after-ms", str(error.retry_after_ms)),)
        for cls, code in STATUS_OF:
            if isinstance(error, cls):
                return RpcError(code, str(error), trailing)
        return RpcError(grpc.StatusCode.INTERNAL, str(error))
    return RpcError(grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see server logs")


class LstmServicer(pb_grpc.LstmServiceServicer):
    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics, auth: TokenAuth | None) -> None:
        self.engine = engine
        self.auth = auth
        self.config = config
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self._request_ids = itertools.count(1)
        # An unset top_k means 5, or the whole vocabulary if it is smaller.
        vocab = len(engine.tokenizer)
        self.default_options = DEFAULT_STEP_OPTIONS if vocab >= DEFAULT_STEP_OPTIONS.top_k else StepOptions(vocab)
        self.pending_answer_bytes = 0  # about how large the answers due on all streaming step calls are
        metrics.stream_pending_answer_bytes.set_function(lambda: self.pending_answer_bytes)

    # ---- helpers -------------------------------------------------------------------------

    def principal(self, context: grpc.aio.ServicerContext) -> str:
        """Who is calling: the owner of the sessions it creates (the interceptor checked the token)."""
        if self.auth is None:
            return ANONYMOUS
        principal = self.auth.principal(context.invocation_metadata())
        if principal is None:  # unreachable behind the interceptor; refuse rather than share
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        return principal

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext, body: Callable[[], Awaitable[T]], request: Any
    ) -> T:
        """Run a handler that is one coroutine (the unary calls, and StreamSteps, which writes through
        the context): an engine refusal becomes the call's status, and every call is counted."""
        started = time.perf_counter()
        code: grpc.StatusCode | None = grpc.StatusCode.OK
        try:
            return await body()
        except asyncio.CancelledError:
            code = _gone(context)
            raise
        except Exception as e:
            code = None  # counted by _refuse, before the client can see the status
            await self._refuse(method, e, started, context, request)
            raise AssertionError("unreachable") from e  # abort raises
        finally:
            if code is not None:
                self._finished(method, code, started, context, request)

    async def _stream(
        self, method: str, context: grpc.aio.ServicerContext, body: AsyncIterator[T], request: Any = None
    ) -> AsyncIterator[T]:
        started = time.perf_counter()
        code: grpc.StatusCode | None = grpc.StatusCode.OK
        try:
            async for message in body:
                yield message
        except (asyncio.CancelledError, GeneratorExit):  # (grpc closes the generator of a call that went away)
            code = _gone(context)
            raise
        except Exception as e:
            code = None  # counted by _refuse, before the client can see the status
            await self._refuse(method, e, started, context, request)
        finally:
            if code is not None:
                self._finished(method, code, started, context, request)

    async def _refuse(
        self, method: str, error: Exception, started: float, context: grpc.aio.ServicerContext, request: Any
    ) -> None:
        """End a call with the status its error maps to. Counted first: abort sends the status at
        once, and a client that scrapes /metrics right after must find its failed call there."""
        err = to_rpc_error(error)
        if err.code is grpc.StatusCode.INTERNAL:
            log.exception("%s failed", method, exc_info=error)
        self._finished(method, err.code, started, context, request)
        await context.abort(err.code, str(err), trailing_metadata=err.trailing)

    def _finished(
        self, method: str, code: grpc.StatusCode, started: float, context: grpc.aio.ServicerContext, request: Any
    ) -> None:
        seconds = time.perf_counter() - started
        self.metrics.record_request(method, code, seconds)
        if log.isEnabledFor(logging.DEBUG):  # one line per served request, at debug level only
            log.debug(
                "rpc %s %s %.2fms", method, code.name, seconds * 1e3,
                extra={"request_id": f"{next(self._request_ids):x}", "method": method, "code": code.name,
                       "session_id": short_id(getattr(request, "session_id", "") or ""),
                       "peer": context.peer(), "duration_ms": round(seconds * 1e3, 3)},
            )

    def _input_tokens(self, tokens: Any, text: str, tokens_field: str, text_field: str) -> list[int]:
        if len(tokens) and text:
            raise InvalidArgumentError(f"set exactly one of {tokens_field} and {text_field}, not both")
        if text:
            if len(text) > self.engine.limits.max_tokens_per_request:
                raise InvalidArgumentError(
                    f"{text_field} has {len(text)} characters; at most "
                    f"{self.engine.limits.max_tokens_per_request} per request"
                )
            try:
                return self.tokenizer.encode(text)
            except UnknownCharacterError as e:
                raise InvalidArgumentError(f"{text_field}: {e}") from None
        return list(tokens)

    def _step_args(self, request: pb.StepRequest) -> tuple[list[int], int | None, StepOptions]:
        if not request.session_id:
            raise InvalidArgumentError("session_id is required")
        tokens = self._input_tokens(request.tokens, request.text, "tokens", "text")
        if not tokens:
            raise InvalidArgumentError("input is empty: set tokens or text to at least one token")
        expected = request.expected_position if request.HasField("expected_position") else None
        default = self.default_options
        top_k = request.top_k if request.HasField("top_k") else default.top_k
        want_logprobs, want_hidden = request.return_logprobs, request.return_hidden
        if top_k == default.top_k and not want_logprobs and not want_hidden:
            return tokens, expected, default  # (frozen: one instance serves every such request)
        return tokens, expected, StepOptions(top_k, want_logprobs, want_hidden)

    # ---- RPCs ----------------------------------------------------------------------------

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> Any:
        async def body() -> pb.GetModelInfoResponse:
            ckpt = self.engine.checkpoint
            cfg = ckpt.config
            lim = self.engine.limits
            return pb.GetModelInfoResponse(
                vocab=self.tokenizer.vocab,
                cell_type=pb.CELL_TYPE_LSTM if cfg.cell_type == "lstm" else pb.CELL_TYPE_GRU,
                num_layers=cfg.num_layers,
                hidden_size=cfg.hidden_size,
                embedding_size=cfg.embedding_size,
                checkpoint_sha256=ckpt.sha256,
                val_loss=float(ckpt.meta.get("best_val_loss") or 0.0),
                device=self.engine.device.type,
                dtype=str(self.engine.dtype).removeprefix("torch."),
                limits=pb.ServerLimits(
                    max_sessions=lim.max_sessions,
                    max_tokens_per_request=lim.max_tokens_per_request,
                    max_generate_tokens=lim.max_generate_tokens,
                    max_message_bytes=self.config.max_message_bytes,
                    default_ttl_seconds=lim.default_ttl_seconds,
                    max_ttl_seconds=lim.max_ttl_seconds,
                    max_batch_sessions=lim.max_batch_sessions,
                    max_batch_tokens=lim.max_batch_tokens,
                    max_queued_tokens=lim.max_queued_tokens,
                ),
                server_version=__version__,
            )

        return await self._call("GetModelInfo", context, body, request)

    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        async def body() -> pb.CreateSessionResponse:
            ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
            info = await self.engine.create_session(self.principal(context), ttl, request.session_id)
            log.debug("session created", extra={"session_id": short_id(info.session_id)})
            return pb.CreateSessionResponse(session=_session_pb(info))

        return await self._call("CreateSession", context, body, request)

    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        async def body() -> pb.GetSessionResponse:
            info = await self.engine.get_session(self.principal(context), request.session_id)
            return pb.GetSessionResponse(session=_session_pb(info))

        return await self._call("GetSession", context, body, request)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        async def body() -> pb.DeleteSessionResponse:
            await self.engine.delete_session(self.principal(context), request.session_id)
            return pb.DeleteSessionResponse()

        return await self._call("DeleteSession", context, body, request)

    async def ResetSession(self, request: pb.ResetSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        async def body() -> pb.ResetSessionResponse:
            info = await self.engine.reset_session(self.principal(context), request.session_id)
            return pb.ResetSessionResponse(session=_session_pb(info))

        return await self._call("ResetSession", context, body, request)

    async def ForkSession(self, request: pb.ForkSessionRequest, context: grpc.aio.ServicerContext) -> Any:
        async def body() -> pb.ForkSessionResponse:
            ttl = request.ttl_seconds if request.HasField("ttl_seconds") else None
            info = await self.engine.fork_session(
                self.principal(context), request.session_id, ttl, request.new_session_id
            )
            return pb.ForkSessionResponse(session=_session_pb(info))

        return await self._call("ForkSession", context, body, request)

    async def Step(self, request: pb.StepRequest, context: grpc.aio.ServicerContext) -> Any:
        async def body() -> pb.StepResponse | bytes:
            tokens, expected, options = self._step_args(request)
            result = await self.engine.step(self.principal(context), request.session_id, tokens, expected, options)
            return _step_response(result)

        return await self._call("Step", context, body, request)

    async def StreamSteps(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """Requests are submitted as they arrive (so a client may pipeline), answered in order.

        The stream ends at the first failing request with that request's status; requests
        after it that have not started are dropped (the engine drops them itself, so which ones
        ran does not depend on timing; one that has started is finished). Written on context.read()/write() instead of
        generators and a queue: at token-by-token rates each hop per message was a measurable
        share of the one asyncio thread (docs/performance.md).
        """
        await self._call("StreamSteps", context, lambda: _StepStream(self, context).run(), None)

    async def StreamStepBatches(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """Many sessions' steps per message, each with its own result (see _BatchStream).

        A step that fails gets an error result and the stream goes on; only a message that does
        not parse (or a duplicate id) ends the stream, with INVALID_ARGUMENT.
        """
        await self._call("StreamStepBatches", context, lambda: _BatchStream(self, context).run(), None)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in self._stream("Generate", context, self._generate(request, context), request):
            yield response

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if not request.session_id:
            raise InvalidArgumentError("session_id is required")
        prompt = self._input_tokens(request.prompt_tokens, request.prompt_text, "prompt_tokens", "prompt_text")
        params = GenerateParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature if request.HasField("temperature") else 1.0,
            top_k=request.top_k if request.HasField("top_k") else 0,
            top_p=request.top_p if request.HasField("top_p") else 1.0,
            seed=request.seed if request.HasField("seed") else None,
            stop=tuple(request.stop),
        )
        expected = request.expected_position if request.HasField("expected_position") else None
        finish_of = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}
        async for token in self.engine.generate(
            self.principal(context), request.session_id, prompt, params, expected
        ):
            yield pb.GenerateResponse(
                token=token.token,
                text=token.text,
                logprob=token.logprob,
                position=token.position,
                finish_reason=finish_of.get(token.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED),
            )


# The server's copy of a call's deadline starts when the call reaches it, later than the
# client's: a client whose deadline passed cancels the call while the server still sees up to
# its transit and queueing time left (under load, tens of ms). Counted as a deadline within this.
DEADLINE_SKEW_SECONDS = 0.25


def _gone(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call that ended without an answer: its deadline passed, or it was cancelled."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SKEW_SECONDS:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def _read_request(context: grpc.aio.ServicerContext) -> Any:
    """The next message of a client stream, or None at its end; one that did not parse (see
    service.malformed) raises MalformedRequestError."""
    message = await context.read()
    if message is grpc.aio.EOF:
        return None
    if isinstance(message, Malformed):
        raise MalformedRequestError(message.message())
    return message


class _ClientStream:
    """What StreamSteps and StreamStepBatches calls share: a reader task submits requests, and
    run() writes answers, sleeping while there is none to write; the reader waits for room when
    too much is in flight."""

    def __init__(self, servicer: LstmServicer, context: grpc.aio.ServicerContext) -> None:
        self.servicer = servicer
        self.context = context
        self.owner = servicer.principal(context)
        self.reading = True  # the reader task has not ended
        self.error: Exception | None = None  # why the reader ended early (a bad or malformed request)
        self.waiter: asyncio.Future[None] | None = None  # set while run() sleeps with nothing to write
        self.room: asyncio.Future[None] | None = None  # set while the reader waits for answers to go out

    def _wake(self, _: object = None) -> None:
        """Wake run() (also used as an engine future's done-callback)."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _sleep(self) -> None:
        """run(): wait for _wake()."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def _room_for_more(self) -> None:
        """The reader: wait for _make_room() (an answer ready or written out)."""
        self.room = asyncio.get_running_loop().create_future()
        try:
            await self.room
        finally:
            self.room = None

    def _make_room(self) -> None:
        if self.room is not None and not self.room.done():
            self.room.set_result(None)


class _StepStream(_ClientStream):
    """One StreamSteps call: a reader task submits requests as they arrive, run() answers them in order.

    The writer sleeps only when nothing is in flight; it is then woken by the done-callback of
    the next request's engine future (or by the reader ending), so a token-by-token request costs
    one wake-up of the handler, not one for the request and one for its answer.
    """

    def __init__(self, servicer: LstmServicer, context: grpc.aio.ServicerContext) -> None:
        super().__init__(servicer, context)
        # (engine future, scheduler item, its answer's size, its tokens) of each request not yet answered, in order
        self.inflight: deque[tuple[asyncio.Future[StepResult], Any, int, int]] = deque()
        self.pending_bytes = 0  # about how large the answers in `inflight` are
        self.pending_tokens = 0  # input tokens of the requests in `inflight`
        limits = servicer.engine.limits
        self.max_pending_tokens = max(limits.max_queued_tokens // QUEUE_SHARE, limits.max_tokens_per_request)
        self.group = StepGroup()  # once a request fails, the engine drops the later ones

    async def _read(self) -> None:
        servicer = self.servicer
        engine = servicer.engine
        try:
            while True:
                request = await _read_request(self.context)
                if request is None:
                    return
                tokens, expected, options = servicer._step_args(request)
                size = engine.response_bytes(len(tokens), options)
                while self.inflight and (  # (checked before submitting: the share and the total are bounds)
                    self.pending_tokens + len(tokens) > self.max_pending_tokens
                    or servicer.pending_answer_bytes + size > MAX_PENDING_ANSWER_BYTES
                ):
                    await self._room_for_more()
                future, item = engine.submit_step(
                    self.owner, request.session_id, tokens, expected, options, self.group
                )
                self.inflight.append((future, item, size, len(tokens)))
                self.pending_bytes += size
                servicer.pending_answer_bytes += size
                self.pending_tokens += len(tokens)
                if self.waiter is not None and len(self.inflight) == 1:
                    future.add_done_callback(self._wake)  # wake run() when the answer is ready, not before
                if len(self.inflight) >= MAX_STREAM_IN_FLIGHT or self.pending_bytes >= MAX_STREAM_PENDING_BYTES:
                    await self._room_for_more()
        except Exception as e:  # a bad request, or reading the stream failed: end it with that status, in order
            self.error = e
        finally:
            self.reading = False
            if not self.inflight:
                self._wake()

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        try:
            while True:
                if not self.inflight:
                    if not self.reading:
                        break
                    await self._sleep()
                    continue
                result = await self.inflight[0][0]
                _, _, size, n_tokens = self.inflight.popleft()
                self.pending_bytes -= size
                self.servicer.pending_answer_bytes -= size
                self.pending_tokens -= n_tokens
                self._make_room()
                await self.context.write(_step_response(result))
            if self.error is not None:
                raise self.error
        finally:
            reader.cancel()  # (it appends nothing more: cancelled at its next resumption)
            self.servicer.pending_answer_bytes -= self.pending_bytes  # (those answers will not be sent)
            self.pending_bytes = 0
            scheduler = self.servicer.engine.scheduler
            for future, item, _, _ in self.inflight:
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: no "Future exception was never retrieved"
                else:
                    future.cancel()
                scheduler.cancel(item)


def _tagged(tag: int, value: bytes) -> bytes:
    """A length-delimited field: its tag byte, the varint length, the bytes."""
    return bytes((tag,)) + wire.varint(len(value)) + value


_RESULTS = 0x0A  # StreamStepBatchesResponse.results: field 1, length-delimited
_RESULT_ID = 0x08  # TaggedStepResult.id: field 1, varint
_RESULT_RESPONSE = 0x12  # TaggedStepResult.response: field 2, length-delimited
_RESULT_ERROR = 0x1A  # TaggedStepResult.error: field 3, length-delimited


def _step_error(error: Exception) -> pb.StepError:
    err = to_rpc_error(error)
    if err.code is grpc.StatusCode.INTERNAL:
        log.exception("StreamStepBatches: a step failed", exc_info=error)
    message = pb.StepError(code=err.code.value[0], message=str(err))
    if isinstance(error, PositionConflictError):
        message.position = error.current_position
    elif isinstance(error, ResourceExhaustedError):
        message.retry_after_ms = error.retry_after_ms
    return message


class _BatchStream(_ClientStream):
    """One StreamStepBatches call.

    The reader submits every step of a message as it arrives; a step's result is encoded when its
    engine future completes (a done-callback) and queued; the writer sends everything queued as
    one message. The engine completes a step's futures together, so the answers of one engine
    step to one stream go out as one message: the per-message cost of gRPC is paid once per
    step and stream, not once per session (docs/performance.md, "Batched streams").
    """

    def __init__(self, servicer: LstmServicer, context: grpc.aio.ServicerContext) -> None:
        super().__init__(servicer, context)
        # id -> (engine future, scheduler item, its answer's size, its tokens) of each step not yet answered
        self.inflight: dict[int, tuple[asyncio.Future[StepResult], Any, int, int]] = {}
        self.ready: list[bytes] = []  # encoded TaggedStepResults (with their field tag) waiting to be written
        self.ready_bytes = 0  # the answer sizes counted for `ready` (released once written)
        self.pending_bytes = 0  # about how large the answers of `inflight` and `ready` are
        self.pending_tokens = 0  # input tokens of the steps in `inflight`
        # A gateway's stream stands for many sessions: bounded by the engine's whole queue (which
        # refuses past it, per step) rather than one session's share of it.
        self.max_pending_tokens = servicer.engine.limits.max_queued_tokens

    def _queue(self, step_id: int, field: int, body: bytes, size: int) -> None:
        self.ready.append(_tagged(_RESULTS, bytes((_RESULT_ID,)) + wire.varint(step_id) + _tagged(field, body)))
        self.ready_bytes += size
        self._wake()

    def _failed(self, step_id: int, error: Exception) -> None:
        """A step refused before it was submitted."""
        self._queue(step_id, _RESULT_ERROR, _step_error(error).SerializeToString(), 0)

    def _done(self, step_id: int, future: asyncio.Future[StepResult]) -> None:
        entry = self.inflight.pop(step_id, None)
        if entry is None or future.cancelled():  # (the stream is ending)
            return
        _, _, size, n_tokens = entry
        self.pending_tokens -= n_tokens
        error = future.exception()
        if error is not None:
            failure = error if isinstance(error, Exception) else RuntimeError(repr(error))
            self._queue(step_id, _RESULT_ERROR, _step_error(failure).SerializeToString(), size)
        else:
            answer = _step_response(future.result())
            body = answer if type(answer) is bytes else answer.SerializeToString()  # type: ignore[union-attr]
            self._queue(step_id, _RESULT_RESPONSE, body, size)
        self._make_room()

    async def _read(self) -> None:
        servicer = self.servicer
        engine = servicer.engine
        try:
            while True:
                message = await _read_request(self.context)
                if message is None:
                    return
                for tagged in message.steps:
                    step_id, request = tagged.id, tagged.request
                    if step_id in self.inflight:
                        raise InvalidArgumentError(
                            f"step id {step_id} is already in flight on this stream; ids must be unique "
                            "among a stream's unanswered steps"
                        )
                    try:
                        tokens, expected, options = servicer._step_args(request)
                        size = engine.response_bytes(len(tokens), options)
                        while self.inflight and (  # (checked before submitting: the totals are bounds)
                            self.pending_tokens + len(tokens) > self.max_pending_tokens
                            or self.pending_bytes + size > MAX_STREAM_PENDING_BYTES
                            or servicer.pending_answer_bytes + size > MAX_PENDING_ANSWER_BYTES
                        ):
                            await self._room_for_more()
                        future, item = engine.submit_step(
                            self.owner, request.session_id, tokens, expected, options
                        )
                    except EngineError as e:
                        self._failed(step_id, e)
                        continue
                    self.inflight[step_id] = (future, item, size, len(tokens))
                    self.pending_bytes += size
                    servicer.pending_answer_bytes += size
                    self.pending_tokens += len(tokens)
                    future.add_done_callback(functools.partial(self._done, step_id))
        except Exception as e:  # a malformed message, or reading the stream failed: end it with that status
            self.error = e
        finally:
            self.reading = False
            self._wake()

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        servicer = self.servicer
        try:
            while True:
                if not self.ready:
                    if not self.reading and (self.error is not None or not self.inflight):
                        break
                    await self._sleep()
                    continue
                batch, size = b"".join(self.ready), self.ready_bytes
                self.ready.clear()
                self.ready_bytes = 0
                await self.context.write(batch)
                self.pending_bytes -= size
                servicer.pending_answer_bytes -= size
                self._make_room()
            if self.error is not None:
                raise self.error
        finally:
            reader.cancel()  # (it submits nothing more: cancelled at its next resumption)
            servicer.pending_answer_bytes -= self.pending_bytes  # (those answers will not be sent)
            self.pending_bytes = 0
            scheduler = servicer.engine.scheduler
            inflight, self.inflight = self.inflight, {}  # (so _done ignores what completes from here)
            for future, item, _, _ in inflight.values():
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: no "Future exception was never retrieved"
                else:
                    future.cancel()
                scheduler.cancel(item)


class LstmServer:
    """The gRPC server, its engine, the health service and the metrics endpoint."""

    def __init__(self, config: ServerConfig, engine: Engine, metrics: Metrics, grpc_server: grpc.aio.Server) -> None:
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.grpc_server = grpc_server
        self.health = health_aio.HealthServicer()
        self.metrics_port: int | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self._stopped = False

    async def start(self) -> None:
        self.engine.start(asyncio.get_running_loop())
        if self.config.metrics_port >= 0:
            host = self.config.metrics_host or self.config.host
            try:
                self._stop_metrics, self.metrics_port = start_metrics_http_server(
                    self.metrics, host, self.config.metrics_port
                )
            except OSError as e:
                raise StartupError(f"cannot serve /metrics on {host}:{self.config.metrics_port} ({e.strerror or e}); "
                                   "choose another --metrics-port (-1 = off)") from None
        await self.grpc_server.start()
        eventloop.settle_gc()  # what exists now lives as long as the server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> bool:
        """Stop taking new work, finish what is in flight within `grace` seconds (less after
        `engine.hurry()`), shut down. False when the final snapshot could not store every
        session's latest state (snapshot mode: that work is lost; the log says how much)."""
        if self._stopped:
            return True
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.engine.drain(grace)
        # The engine's work is done (or the time is up): what is left are answers on their way
        # out and idle streams (a health Watch, a StreamSteps between requests), which would
        # otherwise hold the process for the whole grace period. One grace period in all.
        left = 0.0 if self.engine.hurried else max(0.0, deadline - time.monotonic())
        await self.grpc_server.stop(grace=min(left, FINAL_WRITE_SECONDS))
        stored = await asyncio.to_thread(self.engine.stop)  # (the final snapshot, off the event loop)
        if self._stop_metrics is not None:
            self._stop_metrics()
        return stored

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _read(path: str, pem: str = "") -> bytes:
    """A file's bytes; with `pem`, refused unless it holds a PEM block of that kind (grpc would
    only fail at bind time, naming the port, or take an empty CA bundle and refuse every client)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise StartupError(f"{path}: cannot read ({e.strerror})") from None
    if pem and not re.search(rb"-----BEGIN [A-Z ]*" + pem.encode() + rb"-----", data):
        raise StartupError(f"{path}: not a PEM file with a {pem} (-----BEGIN ...{pem}-----)")
    return data


class StartupError(Exception):
    """A configuration the server cannot start with; the message says which file and why."""


async def create_server(config: ServerConfig) -> tuple[LstmServer, int]:
    """Load the checkpoint, build the engine and bind the gRPC port (0 = any free port).

    The returned server is not started: `await server.start()`.
    """
    try:
        device = resolve_device(config.device)
    except ValueError as e:
        raise SystemExit(f"lstm-serve: {e}") from None
    threads = claim_torch_threads(config.threads)  # (before this thread's first torch operation)
    dtype = _dtype(config.dtype)
    checkpoint = load_checkpoint(config.checkpoint, device=device, dtype=dtype)
    metrics = Metrics()
    cfg = checkpoint.config
    metrics.set_model_info(
        checkpoint_sha256=checkpoint.sha256,
        cell_type=cfg.cell_type,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        device=device.type,
        dtype=config.dtype,
    )
    store = None
    if config.durability != "none":
        store = SqliteStateStore(config.state_dir, durable=config.durability == "journal")
    engine = Engine(
        checkpoint, device, dtype, config.engine_limits(), metrics, store, config.durability_config(), threads
    )
    tokens = load_tokens(config.auth_tokens, config.auth_tokens_inline)
    auth = TokenAuth(tokens) if tokens else None
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if auth is not None:
        denied = lambda method: metrics.record_request(method, "UNAUTHENTICATED", None)  # noqa: E731
        interceptors.append(AuthInterceptor(auth, denied))

    def answered_early(method: str, code: grpc.StatusCode, seconds: float) -> None:
        if method in METHODS:  # (not the health and reflection services)
            metrics.record_request(method, code, None if code is grpc.StatusCode.RESOURCE_EXHAUSTED else seconds)

    # Innermost: after auth, before the servicer.
    interceptors.append(MalformedRequestInterceptor(config.max_concurrent_rpcs, answered_early))
    grpc_server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    server = LstmServer(config, engine, metrics, grpc_server)
    pb_grpc.add_LstmServiceServicer_to_server(LstmServicer(engine, config, metrics, auth), grpc_server)
    health_pb2_grpc.add_HealthServicer_to_server(server.health, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        grpc_server,
    )
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials(
            [(_read(config.tls_key, "PRIVATE KEY"), _read(config.tls_cert, "CERTIFICATE"))],
            root_certificates=_read(config.tls_client_ca, "CERTIFICATE") if config.tls_client_ca else None,
            require_client_auth=bool(config.tls_client_ca),
        )
        try:
            port = grpc_server.add_secure_port(address, credentials)
        except RuntimeError as e:  # grpc reports a key that does not match its certificate here
            raise StartupError(f"{config.tls_cert} / {config.tls_key}: TLS setup failed ({e}); "
                               "check that the key belongs to the certificate") from None
    else:
        try:
            port = grpc_server.add_insecure_port(address)
        except RuntimeError:  # grpc: "Failed to bind to address ..."
            port = 0
    if port == 0:
        raise StartupError(f"cannot listen on {address}: the port is in use or the host is not an address of "
                           "this machine (choose another --port, or --port 0 for any free one)")
    return server, port


async def serve(config: ServerConfig) -> int:
    try:
        server, port = await create_server(config)
    except (CheckpointError, AuthConfigError, StartupError, StateStoreError) as e:
        log.error("refusing to start: %s", e)
        return 2
    try:
        await server.start()  # (reads the stored sessions)
    except (StateStoreError, StartupError) as e:
        log.error("refusing to start: %s", e)
        return 2  # (the process ends: nothing of the half-started server outlives it)
    info = server.engine.checkpoint
    log.info(
        "serving %s (%s %dx%d, sha256 %s…) on %s:%d (%s, %s), %s, durability %s, device %s %s, event loop %s, "
        "GRPC_EXPERIMENTS=%s, model threads bound: %s",
        info.path, info.config.cell_type, info.config.num_layers, info.config.hidden_size, info.sha256[:12],
        config.host, port,
        ("mutual TLS" if config.tls_client_ca else "TLS") if config.tls_cert else "plaintext",
        "bearer tokens required" if config.auth_tokens or config.auth_tokens_inline.strip() else "no authentication",
        f"metrics on :{server.metrics_port}" if server.metrics_port is not None else "metrics off",
        config.durability if config.durability == "none" else f"{config.durability} in {config.state_dir}",
        server.engine.device.type, config.dtype, eventloop.loop_name(),
        os.environ.get("GRPC_EXPERIMENTS", ""), service.OPENMP_BINDING,
    )
    if config.port_file:
        try:
            eventloop.write_port_file(config.port_file, port)
        except OSError as e:
            log.error("refusing to start: cannot write --port-file %s (%s)", config.port_file, e.strerror or e)
            await server.stop(grace=0)
            return 2
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop_requested.is_set():  # a second signal: stop now (what was applied is still stored)
            if not server.engine.hurried:
                log.warning("second signal: stopping now, without waiting for calls in flight")
            server.engine.hurry()
        stop_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    server.engine.on_failure = stop_requested.set  # a dead engine thread: stop, exit 1, be restarted
    await stop_requested.wait()
    log.info("shutting down: draining for up to %.1fs (a second signal stops at once)", config.grace_seconds)
    stored = await server.stop()
    if server.engine.failure is not None:
        log.error("stopped after the engine failed (above); exit 1 so that the server is restarted")
        return 1
    if not stored:
        log.error("stopped; the latest state of some sessions could not be stored (above)")
        return 1
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    configure_logging(config.log_format, config.log_level)
    try:
        return eventloop.run(serve(config))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
