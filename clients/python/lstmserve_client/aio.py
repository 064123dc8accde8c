"""The asyncio client: :class:`AsyncClient` and :class:`AsyncSession` (``grpc.aio``).

Same methods as the synchronous client, as coroutines; ``stream`` and ``generate``
return async iterators.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Sequence,
)
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from . import _common as c
from .client import DEFAULT_TIMEOUT
from .datatypes import GeneratedToken, ModelInfo, RetryPolicy, SessionInfo, StepResult, TlsConfig
from .errors import (
    POSITION_METADATA_KEY,
    RETRY_AFTER_METADATA_KEY,
    Cancelled,
    LstmServeError,
    PositionConflict,
    SessionNotFound,
    error_class,
    from_rpc_error,
)
from .proto import lstm_service_pb2 as pb
from .proto import lstm_service_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncSession", "StepMultiplexer"]

_R = TypeVar("_R")


class AsyncClient:
    """An asyncio connection to one lstm-serve server; the arguments are those of
    :class:`lstmserve_client.Client` (``interceptors`` are ``grpc.aio`` interceptors).

    Create it inside a running event loop. Use ``async with`` or ``await close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: TlsConfig | bool | None = None,
        retries: RetryPolicy | None = None,
        metadata: Sequence[tuple[str, str | bytes]] = (),
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[Any] = (),
    ) -> None:
        if not isinstance(target, str) or not target:
            raise TypeError("target must be a non-empty 'host:port' string")
        self._target = target
        self._timeout = c.check_timeout(timeout)
        self._retries = retries if retries is not None else RetryPolicy()
        tls_config = c.normalize_tls(tls)
        self._metadata = c.call_metadata(token, tls_config, metadata)
        opts = c.channel_options(tls_config, options)
        icpt = list(interceptors) or None
        if tls_config is None:
            self._channel = grpc.aio.insecure_channel(target, options=opts, interceptors=icpt)
        else:
            creds = c.channel_credentials(tls_config, token)
            self._channel = grpc.aio.secure_channel(target, creds, options=opts, interceptors=icpt)
        self._stub = pb_grpc.LstmServiceStub(self._channel)  # type: ignore[no-untyped-call,unused-ignore]
        self._info: ModelInfo | None = None
        self._closed = False

    @property
    def target(self) -> str:
        return self._target

    @property
    def timeout(self) -> float | None:
        return self._timeout

    async def close(self) -> None:
        """Close the channel; in-flight calls are cancelled. Idempotent."""
        if not self._closed:
            self._closed = True
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient(target={self._target!r})"

    # ------------------------------------------------------------------ API

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """As :meth:`lstmserve_client.Client.model_info`."""
        resp = await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout=timeout)
        assert resp is not None
        info = c.model_info(resp)
        self._info = info
        return info

    def session(
        self,
        ttl: float | None = None,
        session_id: str | None = None,
        *,
        keep: bool = False,
        timeout: float | None = None,
    ) -> _SessionOpener:
        """Create a session: ``s = await client.session()`` or
        ``async with client.session() as s:`` (deleted on exit unless ``keep``)."""
        ttl_s = c.check_ttl(ttl)
        sid = c.new_session_id() if session_id is None else c.check_session_id(session_id)
        return _SessionOpener(self._create(sid, ttl_s, keep, timeout))

    def attach(self, session_id: str, *, keep: bool = True, timeout: float | None = None) -> _SessionOpener:
        """An :class:`AsyncSession` for an existing session (``await`` it or ``async with``);
        ``keep`` defaults to True as in :meth:`lstmserve_client.Client.attach`."""
        sid = c.check_session_id(session_id)
        return _SessionOpener(self._attach(sid, keep, timeout))

    def multiplexer(self, *, timeout: float | None = None) -> StepMultiplexer:
        """Steps of many sessions over one ``StreamStepBatches`` stream (a gateway's way to
        serve many sessions): ``async with client.multiplexer() as mux:`` then, from any
        number of tasks, ``await mux.step(session_id, input)``. ``timeout`` bounds the
        whole stream (None: no deadline; the client's default is for single calls)."""
        return StepMultiplexer(self, c.check_timeout(timeout))

    # ------------------------------------------------------------------ internals

    async def _create(self, sid: str, ttl_s: int | None, keep: bool, timeout: float | None) -> AsyncSession:
        req = pb.CreateSessionRequest(session_id=sid)
        if ttl_s is not None:
            req.ttl_seconds = ttl_s
        deadline = c.Deadline(self._resolve_timeout(timeout))
        resp = await self._unary(
            self._stub.CreateSession, req, deadline=deadline, accept_on_retry=lambda e: e.code == "ALREADY_EXISTS"
        )
        if resp is not None:
            position = int(resp.session.position)
        else:
            position = (await self._get_session(sid, deadline)).position
        return AsyncSession(self, sid, position, keep=keep)

    async def _attach(self, sid: str, keep: bool, timeout: float | None) -> AsyncSession:
        info = await self._get_session(sid, c.Deadline(self._resolve_timeout(timeout)))
        return AsyncSession(self, sid, info.position, keep=keep)

    def _resolve_timeout(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else c.check_timeout(timeout)

    async def _vocab(self, timeout: float | None) -> list[str]:
        """The vocabulary, fetched once; the fetch runs under the calling method's timeout."""
        info = self._info
        if info is None:
            info = await self.model_info(timeout=timeout)
        return info.vocab

    async def _get_session(self, session_id: str, deadline: c.Deadline) -> SessionInfo:
        req = pb.GetSessionRequest(session_id=session_id)
        resp = await self._unary(self._stub.GetSession, req, deadline=deadline)
        assert resp is not None
        return c.session_info(resp.session)

    async def _unary(
        self,
        rpc: Callable[..., Awaitable[_R]],
        request: Any,
        *,
        timeout: float | None = None,
        deadline: c.Deadline | None = None,
        retry: bool = True,
        accept_on_retry: Callable[[LstmServeError], bool] | None = None,
    ) -> _R | None:
        if self._closed:
            raise Cancelled("the client is closed")
        if deadline is None:
            deadline = c.Deadline(self._resolve_timeout(timeout))
        attempt = 0
        while True:
            attempt += 1
            try:
                return await rpc(request, timeout=deadline.attempt_timeout(), metadata=self._metadata)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
            except grpc.aio.UsageError as e:  # the channel was closed
                raise Cancelled(str(e)) from None
            except asyncio.CancelledError:
                if _closed_under(self):
                    raise Cancelled("the client was closed during the call") from None
                raise
            if attempt > 1 and accept_on_retry is not None and accept_on_retry(err):
                return None
            delay = c.retry_delay(err, attempt, self._retries, deadline) if retry else None
            if delay is None:
                raise err
            await asyncio.sleep(delay)


class _SessionOpener:
    """Awaitable and async context manager around a session-creating coroutine."""

    def __init__(self, coro: Coroutine[Any, Any, AsyncSession]) -> None:
        self._coro = coro
        self._used = False
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        self._used = True
        return self._coro.__await__()

    async def __aenter__(self) -> AsyncSession:
        self._used = True
        self._session = await self._coro
        return self._session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._session is not None
        await self._session.__aexit__(exc_type, exc, tb)

    def __del__(self) -> None:
        # Never awaited: close the coroutine quietly instead of a "never awaited" warning.
        if not self._used:
            self._coro.close()


class AsyncSession:
    """The asyncio twin of :class:`lstmserve_client.Session`; same semantics."""

    def __init__(self, client: AsyncClient, session_id: str, position: int, *, keep: bool = False) -> None:
        self._client = client
        self._id = session_id
        self._position = position
        self._keep = keep
        self._deleted = False
        self._stale = False  # as in Session: re-read the position before the next step
        self._open_call: AsyncGenerator[Any, None] | None = None  # as in Session: closed before the next

    @property
    def session_id(self) -> str:
        return self._id

    @property
    def position(self) -> int:
        return self._position

    @property
    def client(self) -> AsyncClient:
        return self._client

    @property
    def kept(self) -> bool:
        return self._keep

    @property
    def deleted(self) -> bool:
        return self._deleted

    def keep(self, keep: bool = True) -> AsyncSession:
        self._keep = keep
        return self

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._keep or self._deleted:
            return
        try:
            await self.delete()
        except SessionNotFound:
            self._deleted = True
        except LstmServeError:
            if exc_type is None:
                raise

    def __repr__(self) -> str:
        return f"AsyncSession(session_id={self._id!r}, position={self._position})"

    # ------------------------------------------------------------------ steps

    async def step(
        self,
        input: c.StepInput,
        *,
        top_k: int | None = None,
        return_logprobs: bool = False,
        return_hidden: bool = False,
        timeout: float | None = None,
    ) -> StepResult:
        req, _ = c.step_request(
            self._id,
            input,
            expected_position=self._position,
            top_k=c.check_step_top_k(top_k),
            return_logprobs=return_logprobs,
            return_hidden=return_hidden,
        )
        await self._end_open_call()
        resynced = await self._sync_if_stale(timeout)
        req.expected_position = self._position
        vocab = await self._client._vocab(timeout)
        try:
            resp = await self._client._unary(self._client._stub.Step, req, timeout=timeout)
        except PositionConflict as e:
            # Right after a broken stream the server may still have been finishing its
            # work: run at the position it reports instead (once).
            if not resynced or e.current_position is None:
                raise
            self._position = e.current_position
            req.expected_position = self._position
            resp = await self._client._unary(self._client._stub.Step, req, timeout=timeout)
        assert resp is not None
        result = c.step_result(resp, vocab)
        self._position = result.position
        return result

    def stream(
        self,
        inputs: AsyncIterable[c.StepInput] | Iterable[c.StepInput],
        *,
        top_k: int | None = None,
        return_logprobs: bool = False,
        return_hidden: bool = False,
        timeout: float | None = None,
    ) -> AsyncGenerator[StepResult, None]:
        """Feed an async (or plain) iterable of inputs over one ``StreamSteps`` stream;
        an async iterator of results, one per input, in order."""
        top_k = c.check_step_top_k(top_k)
        if isinstance(inputs, (str, bytes)):
            raise TypeError("stream() takes an iterable of inputs (e.g. a list of str); for one input use step()")
        if not isinstance(inputs, (AsyncIterable, Iterable)):
            raise TypeError("inputs must be an iterable or an async iterable")
        previous = self._open_call
        results = self._stream(inputs, top_k, return_logprobs, return_hidden, timeout, previous)
        self._open_call = results
        return results

    async def _stream(
        self,
        inputs: AsyncIterable[c.StepInput] | Iterable[c.StepInput],
        top_k: int | None,
        return_logprobs: bool,
        return_hidden: bool,
        timeout: float | None,
        previous: AsyncGenerator[Any, None] | None,
    ) -> AsyncGenerator[StepResult, None]:
        client = self._client
        if client._closed:
            raise Cancelled("the client is closed")
        await _close_calls(previous)
        vocab = await client._vocab(timeout)
        await self._sync_if_stale(timeout)
        failure: list[BaseException] = []
        expected = [self._position]
        session_id = self._id

        async def source() -> AsyncIterator[c.StepInput]:
            if isinstance(inputs, AsyncIterable):
                async for v in inputs:
                    yield v
            else:
                for v in inputs:
                    yield v

        consumer: list[asyncio.Task[Any]] = []  # grpc's task that reads requests() (public: current_task)

        async def requests() -> AsyncIterator[pb.StepRequest]:
            task = asyncio.current_task()
            if task is not None:
                consumer.append(task)
            try:
                async for value in source():
                    req, n = c.step_request(
                        session_id,
                        value,
                        expected_position=expected[0],
                        top_k=top_k,
                        return_logprobs=return_logprobs,
                        return_hidden=return_hidden,
                    )
                    expected[0] += n
                    yield req
            except Exception as e:
                failure.append(e)

        deadline = c.Deadline(client._resolve_timeout(timeout))
        call = client._stub.StreamSteps(requests(), timeout=deadline.timeout, metadata=client._metadata)
        done = False
        try:
            async for resp in call:
                result = c.step_result(resp, vocab)
                self._position = result.position
                yield result
            done = True
        except grpc.RpcError as e:
            err = c.streaming_error(e, deadline)
            if failure:
                done = True
                raise failure[0] from None
            done = not c.outcome_unknown(err)
            raise err from None
        except asyncio.CancelledError:
            if _closed_under(client):
                raise Cancelled("the client was closed during the stream") from None
            raise
        finally:
            call.cancel()
            # A call that had already ended cancels nothing: grpc's task would stay parked in a
            # live input iterator (and the iterator's own cleanup never run) until collected.
            for task in consumer:
                if not task.done():
                    task.cancel()
            if not done:
                self._stale = True
        if failure:
            raise failure[0]

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: c.StepInput | None = None,
        *,
        max_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        timeout: float | None = None,
    ) -> AsyncGenerator[GeneratedToken, None]:
        """As :meth:`lstmserve_client.Session.generate`: an async iterator of tokens."""
        req = c.generate_request(
            self._id,
            prompt,
            expected_position=0,  # set when the generation starts
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
        )
        previous = self._open_call
        tokens = self._generate(req, self._client._resolve_timeout(timeout), previous)
        self._open_call = tokens
        return tokens

    async def _generate(
        self, req: pb.GenerateRequest, timeout: float | None, previous: AsyncGenerator[Any, None] | None
    ) -> AsyncGenerator[GeneratedToken, None]:
        client = self._client
        if client._closed:
            raise Cancelled("the client is closed")
        deadline = c.Deadline(timeout)  # from the first iteration, as a stream's
        await _close_calls(previous)
        resynced = await self._sync_if_stale(deadline.sync_timeout())
        req.expected_position = self._position
        attempt = 0
        while True:
            attempt += 1
            got_any = False
            done = False
            call = client._stub.Generate(req, timeout=deadline.attempt_timeout(), metadata=client._metadata)
            try:
                async for resp in call:
                    got_any = True
                    token = c.generated_token(resp)
                    self._position = token.position
                    yield token
                done = True
                return
            except grpc.RpcError as e:
                err = c.streaming_error(e, deadline)
                done = not c.outcome_unknown(err)
            except asyncio.CancelledError:
                if _closed_under(client):
                    raise Cancelled("the client was closed during the generation") from None
                raise
            finally:
                call.cancel()
                if not done:
                    self._stale = True
            if (  # only the first attempt: a later one that conflicts found its prompt fed by a lost one
                resynced and attempt == 1 and not got_any
                and isinstance(err, PositionConflict) and err.current_position is not None
            ):
                resynced = False  # as in step(): run at the position the server reports
                self._position = err.current_position
                req.expected_position = self._position
                self._stale = False
                continue
            delay = None if got_any else c.retry_delay(err, attempt, client._retries, deadline)
            if delay is None:
                raise err
            self._stale = False
            await asyncio.sleep(delay)

    async def generate_text(
        self,
        prompt: c.StepInput | None = None,
        *,
        max_tokens: int = 100,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        timeout: float | None = None,
    ) -> str:
        parts: list[str] = []
        async for t in self.generate(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            timeout=timeout,
        ):
            parts.append(t.text)
        return "".join(parts)

    # ------------------------------------------------------------------ management

    async def fork(
        self,
        ttl: float | None = None,
        *,
        session_id: str | None = None,
        keep: bool = False,
        timeout: float | None = None,
    ) -> AsyncSession:
        client = self._client
        ttl_s = c.check_ttl(ttl)
        new_id = c.new_session_id() if session_id is None else c.check_session_id(session_id)
        req = pb.ForkSessionRequest(session_id=self._id, new_session_id=new_id)
        if ttl_s is not None:
            req.ttl_seconds = ttl_s
        deadline = c.Deadline(client._resolve_timeout(timeout))
        resp = await client._unary(
            client._stub.ForkSession, req, deadline=deadline, accept_on_retry=lambda e: e.code == "ALREADY_EXISTS"
        )
        if resp is not None:
            position = int(resp.session.position)
        else:
            position = (await client._get_session(new_id, deadline)).position
        return AsyncSession(client, new_id, position, keep=keep)

    async def reset(self, *, timeout: float | None = None) -> None:
        await self._end_open_call()
        client = self._client
        req = pb.ResetSessionRequest(session_id=self._id)
        resp = await client._unary(client._stub.ResetSession, req, timeout=timeout)
        assert resp is not None
        self._position = int(resp.session.position)
        self._stale = False

    async def info(self, *, timeout: float | None = None) -> SessionInfo:
        info = await self._client._get_session(self._id, c.Deadline(self._client._resolve_timeout(timeout)))
        self._position = info.position
        self._stale = False
        return info

    async def _end_open_call(self) -> None:
        calls, self._open_call = self._open_call, None
        await _close_calls(calls)

    async def _sync_if_stale(self, timeout: float | None) -> bool:
        if not self._stale:
            return False
        position = (await self.info(timeout=timeout)).position
        for _ in range(c.SETTLE_READS):
            await asyncio.sleep(c.SETTLE_INTERVAL)
            now = (await self.info(timeout=timeout)).position
            if now == position:
                break
            position = now
        return True

    async def delete(self, *, timeout: float | None = None) -> None:
        client = self._client
        await client._unary(
            client._stub.DeleteSession,
            pb.DeleteSessionRequest(session_id=self._id),
            timeout=timeout,
            accept_on_retry=lambda e: e.code == "NOT_FOUND",
        )
        self._deleted = True


_CODE_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


def _step_error(error: pb.StepError) -> LstmServeError:
    """The exception Step would have raised for the same failure."""
    code = _CODE_NAMES.get(error.code, "UNKNOWN")
    metadata = {}
    if error.HasField("position"):
        metadata[POSITION_METADATA_KEY] = str(error.position)
    if error.HasField("retry_after_ms"):
        metadata[RETRY_AFTER_METADATA_KEY] = str(error.retry_after_ms)
    return error_class(code)(error.message or code, code=code, metadata=metadata)


class StepMultiplexer:
    """Steps of many sessions over one ``StreamStepBatches`` stream.

    Steps asked for while a message is being written go out together in the next one, and the
    server answers the steps an engine step finished together, so many sessions stepping at
    once cost a few messages per engine step instead of two per session (docs/client.md). Each
    step succeeds or raises on its own, with the exception :meth:`AsyncSession.step` would
    raise; a failed step does not end the stream. Steps of one session run in the order
    :meth:`step` was called. If the stream itself breaks (the server goes away, the deadline
    passes), every unanswered step raises that error, and so does every later one.

    Unlike :class:`AsyncSession`, the multiplexer tracks no positions: pass
    ``expected_position`` where you want the server to check one.
    """

    def __init__(self, client: AsyncClient, timeout: float | None) -> None:
        self._client = client
        self._timeout = timeout
        self._call: Any = None
        self._vocab: list[str] = []
        self._ids = 0  # the last step id used
        self._pending: dict[int, asyncio.Future[StepResult]] = {}  # id -> its caller's future, unanswered
        self._outbox: list[pb.TaggedStep] = []  # steps not yet written
        self._wake = asyncio.Event()  # set when the outbox has steps or the multiplexer closes
        self._tasks: list[asyncio.Task[None]] = []
        self._failure: LstmServeError | None = None  # why the stream ended, once it has
        self._closing = False

    async def __aenter__(self) -> StepMultiplexer:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close(cancel=exc_type is not None)

    async def open(self) -> None:
        """Open the stream (``async with`` does)."""
        client = self._client
        if client._closed:
            raise Cancelled("the client is closed")
        if self._call is not None:
            raise RuntimeError("the multiplexer is already open")
        self._vocab = await client._vocab(None)
        self._call = client._stub.StreamStepBatches(timeout=self._timeout, metadata=client._metadata)
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    @property
    def pending(self) -> int:
        """Steps asked for and not yet answered."""
        return len(self._pending)

    async def step(
        self,
        session_id: str,
        input: c.StepInput,
        *,
        top_k: int | None = None,
        return_logprobs: bool = False,
        return_hidden: bool = False,
        expected_position: int | None = None,
    ) -> StepResult:
        """Feed ``input`` (text or token ids) to the session; its result, as
        :meth:`AsyncSession.step` returns it."""
        if self._failure is not None:
            raise self._failure
        if self._call is None or self._closing:
            raise Cancelled("the multiplexer is not open")
        req, _ = c.step_request(
            session_id,
            input,
            expected_position=0,
            top_k=c.check_step_top_k(top_k),
            return_logprobs=return_logprobs,
            return_hidden=return_hidden,
        )
        if expected_position is None:
            req.ClearField("expected_position")
        else:
            req.expected_position = expected_position
        self._ids += 1
        step_id = self._ids
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._pending[step_id] = future
        self._outbox.append(pb.TaggedStep(id=step_id, request=req))
        self._wake.set()
        return await future

    async def close(self, *, cancel: bool = False) -> None:
        """End the stream: wait for the unanswered steps' results (or, with ``cancel``,
        cancel them). Idempotent."""
        if self._call is None or self._closing:
            return
        self._closing = True
        self._wake.set()
        if cancel:
            self._call.cancel()
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._call.cancel()
            self._end(Cancelled("the multiplexer was closed"))

    async def _write(self) -> None:
        call = self._call
        try:
            while self._failure is None:
                if not self._outbox:
                    if self._closing:
                        await call.done_writing()
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                steps, self._outbox = self._outbox, []
                await call.write(pb.StreamStepBatchesRequest(steps=steps))
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the stream ended: the reader has (or will have) its status

    async def _read(self) -> None:
        call, vocab, pending = self._call, self._vocab, self._pending
        failure: LstmServeError
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                for result in message.results:
                    future = pending.pop(result.id, None)
                    if future is None or future.done():  # (its caller was cancelled)
                        continue
                    if result.HasField("response"):
                        future.set_result(c.step_result(result.response, vocab))
                    else:
                        future.set_exception(_step_error(result.error))
            failure = Cancelled("the multiplexer was closed")
        except grpc.RpcError as e:
            failure = from_rpc_error(e)
        except asyncio.CancelledError:
            failure = Cancelled("the multiplexer was closed")
        self._end(failure)

    def _end(self, failure: LstmServeError) -> None:
        if self._failure is None:
            self._failure = failure
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self._failure)
        self._wake.set()


def _closed_under(client: AsyncClient) -> bool:
    """Whether a CancelledError out of grpc.aio comes from close() (grpc cancels the calls
    in flight) rather than from a cancellation of the caller's own task, which must go on."""
    if not client._closed:
        return False
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return not (cancelling is not None and cancelling())


async def _close_calls(calls: AsyncGenerator[Any, None] | None) -> None:
    """Close a session's earlier stream or generation (its call cancelled; a finished one: nothing)."""
    if calls is not None:
        try:
            await calls.aclose()
        except RuntimeError:  # being iterated by another task: an AsyncSession is not for sharing
            pass
