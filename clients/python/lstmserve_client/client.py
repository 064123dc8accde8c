"""The synchronous client: :class:`Client` and :class:`Session`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from . import _common as c
from .datatypes import GeneratedToken, ModelInfo, RetryPolicy, SessionInfo, StepResult, TlsConfig
from .errors import Cancelled, LstmServeError, PositionConflict, SessionNotFound, from_rpc_error
from .proto import lstm_service_pb2 as pb
from .proto import lstm_service_pb2_grpc as pb_grpc

__all__ = ["Client", "Session"]

_R = TypeVar("_R")

DEFAULT_TIMEOUT = 30.0


class Client:
    """A synchronous connection to one lstm-serve server.

    Args:
        target: ``"host:port"`` of the server.
        timeout: default deadline of every call in seconds (all retries of a call share
            it); None or ``float("inf")`` means no deadline. Every method also takes a
            ``timeout`` that overrides it for that call.
        token: bearer token sent as ``authorization: Bearer <token>`` (as call
            credentials over TLS, as per-call metadata over plaintext).
        tls: a :class:`TlsConfig` (or True for the system's roots) for a TLS channel;
            None for plaintext.
        retries: the :class:`RetryPolicy` of calls that are safe to repeat.
        metadata: extra ``(key, value)`` metadata sent with every call.
        options: extra gRPC channel options.
        interceptors: ``grpc`` client interceptors wrapped around the channel.

    Use it as a context manager, or call :meth:`close`, to close the channel.
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
        if tls_config is None:
            channel = grpc.insecure_channel(target, options=opts)
        else:
            channel = grpc.secure_channel(target, c.channel_credentials(tls_config, token), options=opts)
        self._base_channel = channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._stub = pb_grpc.LstmServiceStub(channel)  # type: ignore[no-untyped-call,unused-ignore]
        self._info: ModelInfo | None = None
        self._info_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def target(self) -> str:
        return self._target

    @property
    def timeout(self) -> float | None:
        """The default deadline of a call, in seconds (None: no deadline)."""
        return self._timeout

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled. Idempotent."""
        if not self._closed:
            self._closed = True
            self._base_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(target={self._target!r})"

    # ------------------------------------------------------------------ API

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model (vocabulary, architecture, checkpoint, limits). Always asks the
        server, and refreshes the vocabulary the client uses to decode tokens."""
        resp = self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout=timeout)
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
    ) -> Session:
        """Create a session on the server (zero state, position 0).

        Args:
            ttl: idle time-to-live in seconds; None means the server's default.
            session_id: the id to propose; None generates a random 128-bit one.
            keep: if False, leaving a ``with`` block on the session deletes it.
        """
        ttl_s = c.check_ttl(ttl)
        sid = c.new_session_id() if session_id is None else c.check_session_id(session_id)
        req = pb.CreateSessionRequest(session_id=sid)
        if ttl_s is not None:
            req.ttl_seconds = ttl_s
        deadline = c.Deadline(self._resolve_timeout(timeout))
        # Safe to repeat because the id is ours: ALREADY_EXISTS on a retry means an
        # earlier attempt created it.
        resp = self._unary(
            self._stub.CreateSession, req, deadline=deadline, accept_on_retry=lambda e: e.code == "ALREADY_EXISTS"
        )
        position = resp.session.position if resp is not None else self._get_session(sid, deadline).position
        return Session(self, sid, int(position), keep=keep)

    def attach(self, session_id: str, *, keep: bool = True, timeout: float | None = None) -> Session:
        """A :class:`Session` for an existing server session (its position is fetched).

        ``keep`` defaults to True here: leaving a ``with`` block does not delete a session
        this client did not create, unless ``keep=False``.
        """
        sid = c.check_session_id(session_id)
        info = self._get_session(sid, c.Deadline(self._resolve_timeout(timeout)))
        return Session(self, sid, info.position, keep=keep)

    # ------------------------------------------------------------------ internals

    def _resolve_timeout(self, timeout: float | None) -> float | None:
        return self._timeout if timeout is None else c.check_timeout(timeout)

    def _vocab(self, timeout: float | None) -> list[str]:
        """The vocabulary, fetched once; the fetch runs under the calling method's timeout."""
        info = self._info
        if info is None:
            with self._info_lock:
                info = self._info or self.model_info(timeout=timeout)
        return info.vocab

    def _get_session(self, session_id: str, deadline: c.Deadline) -> SessionInfo:
        resp = self._unary(self._stub.GetSession, pb.GetSessionRequest(session_id=session_id), deadline=deadline)
        assert resp is not None
        return c.session_info(resp.session)

    def _unary(
        self,
        rpc: Callable[..., _R],
        request: Any,
        *,
        timeout: float | None = None,
        deadline: c.Deadline | None = None,
        retry: bool = True,
        accept_on_retry: Callable[[LstmServeError], bool] | None = None,
    ) -> _R | None:
        """Call a unary RPC with the deadline and retries; None when ``accept_on_retry``
        turned an error of a retry into success."""
        if self._closed:
            raise Cancelled("the client is closed")
        if deadline is None:
            deadline = c.Deadline(self._resolve_timeout(timeout))
        attempt = 0
        while True:
            attempt += 1
            try:
                return rpc(request, timeout=deadline.attempt_timeout(), metadata=self._metadata)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
            except ValueError as e:  # e.g. "Cannot invoke RPC on closed channel!"
                raise Cancelled(str(e)) from None
            if attempt > 1 and accept_on_retry is not None and accept_on_retry(err):
                return None
            delay = c.retry_delay(err, attempt, self._retries, deadline) if retry else None
            if delay is None:
                raise err
            time.sleep(delay)


class Session:
    """A server session: the model's recurrent state for one stream of tokens.

    Obtained from :meth:`Client.session`, :meth:`Client.attach` or :meth:`fork`. The
    client tracks :attr:`position` from every response and sends it as the expected
    position of every step, so a step retried after a lost response is applied once, and
    a session used by someone else meanwhile fails with :class:`PositionConflict`
    (call :meth:`info` to resynchronise). Not thread-safe: use one Session per thread.

    As a context manager, it deletes the server session on exit unless ``keep``.
    """

    def __init__(self, client: Client, session_id: str, position: int, *, keep: bool = False) -> None:
        self._client = client
        self._id = session_id
        self._position = position
        self._keep = keep
        self._deleted = False
        # Set when a stream or generation ended without telling how far the session got
        # (broken off by the caller, a deadline, a lost connection); the position is then
        # read from the server before the session's next step.
        self._stale = False
        # The generator of this session's last stream or generation: closed (its call
        # cancelled) before the next step, stream, generation or reset, since a loop's
        # `break` does not close a generator the caller kept in a variable.
        self._open_call: Generator[Any, None, None] | None = None

    @property
    def session_id(self) -> str:
        return self._id

    @property
    def position(self) -> int:
        """Tokens consumed so far (input and generated), as last reported by the server."""
        return self._position

    @property
    def client(self) -> Client:
        return self._client

    @property
    def kept(self) -> bool:
        """Whether leaving a ``with`` block keeps the server session."""
        return self._keep

    @property
    def deleted(self) -> bool:
        return self._deleted

    def keep(self, keep: bool = True) -> Session:
        """Keep (or, with False, no longer keep) the server session when a ``with`` block ends."""
        self._keep = keep
        return self

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._keep or self._deleted:
            return
        try:
            self.delete()
        except SessionNotFound:
            self._deleted = True  # expired or deleted by someone else: nothing to free
        except LstmServeError:
            if exc_type is None:
                raise
            # Do not mask the exception that ended the block.

    def __repr__(self) -> str:
        return f"Session(session_id={self._id!r}, position={self._position})"

    # ------------------------------------------------------------------ steps

    def step(
        self,
        input: c.StepInput,
        *,
        top_k: int | None = None,
        return_logprobs: bool = False,
        return_hidden: bool = False,
        timeout: float | None = None,
    ) -> StepResult:
        """Feed text (a str) or token ids (a sequence of ints); one output per token.

        Retried on UNAVAILABLE; the expected position makes a retry after a lost
        response return the same outputs without applying the input twice. (After a
        DeadlineExceeded, repeating the same step is equally safe.)
        """
        req, _ = c.step_request(
            self._id,
            input,
            expected_position=self._position,
            top_k=c.check_step_top_k(top_k),
            return_logprobs=return_logprobs,
            return_hidden=return_hidden,
        )
        self._end_open_call()
        resynced = self._sync_if_stale(timeout)
        req.expected_position = self._position
        vocab = self._client._vocab(timeout)
        try:
            resp = self._client._unary(self._client._stub.Step, req, timeout=timeout)
        except PositionConflict as e:
            # Right after a broken stream the server may still have been finishing its
            # work: run at the position it reports instead (once).
            if not resynced or e.current_position is None:
                raise
            self._position = e.current_position
            req.expected_position = self._position
            resp = self._client._unary(self._client._stub.Step, req, timeout=timeout)
        assert resp is not None
        result = c.step_result(resp, vocab)
        self._position = result.position
        return result

    def stream(
        self,
        inputs: Iterable[c.StepInput],
        *,
        top_k: int | None = None,
        return_logprobs: bool = False,
        return_hidden: bool = False,
        timeout: float | None = None,
    ) -> Generator[StepResult, None, None]:
        """Feed many inputs over one ``StreamSteps`` stream; yields one StepResult per
        input, in order, as they arrive. ``inputs`` may be a live (blocking) iterable; it is
        consumed on a gRPC thread while results are read. The timeout covers the whole
        stream (``float("inf")`` for none). Streams are not retried.

        If ``inputs`` raises, or yields an invalid input, the results of the inputs before
        it are yielded and then that exception is raised.
        """
        top_k = c.check_step_top_k(top_k)
        if isinstance(inputs, (str, bytes)):
            raise TypeError("stream() takes an iterable of inputs (e.g. a list of str); for one input use step()")
        if self._client._closed:
            raise Cancelled("the client is closed")
        vocab = self._client._vocab(timeout)
        self._end_open_call()
        results = self._stream(iter(inputs), top_k, return_logprobs, return_hidden, timeout, vocab)
        self._open_call = results
        return results

    def _stream(
        self,
        it: Iterator[c.StepInput],
        top_k: int | None,
        return_logprobs: bool,
        return_hidden: bool,
        timeout: float | None,
        vocab: list[str],
    ) -> Generator[StepResult, None, None]:
        self._sync_if_stale(timeout)
        failure: list[BaseException] = []
        expected = [self._position]
        session_id = self._id

        def requests() -> Iterator[pb.StepRequest]:
            while True:
                try:
                    value = next(it)
                    req, n = c.step_request(
                        session_id,
                        value,
                        expected_position=expected[0],
                        top_k=top_k,
                        return_logprobs=return_logprobs,
                        return_hidden=return_hidden,
                    )
                except StopIteration:
                    return
                except Exception as e:
                    failure.append(e)
                    return
                expected[0] += n
                yield req

        client = self._client
        deadline = c.Deadline(client._resolve_timeout(timeout))
        try:
            call = client._stub.StreamSteps(requests(), timeout=deadline.timeout, metadata=client._metadata)
        except ValueError as e:
            raise Cancelled(str(e)) from None
        done = False
        try:
            for resp in call:
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
        finally:
            call.cancel()
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
    ) -> Generator[GeneratedToken, None, None]:
        """Sample a continuation (after feeding ``prompt``, if given); yields tokens as they
        arrive. Generated tokens advance the session. The last token carries the
        ``finish_reason``. The timeout covers the whole generation. Retried on UNAVAILABLE
        only until the first token arrives. Breaking out of the loop cancels the rest."""
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
        if self._client._closed:
            raise Cancelled("the client is closed")
        timeout_s = self._client._resolve_timeout(timeout)
        self._end_open_call()
        tokens = self._generate(req, timeout_s)
        self._open_call = tokens
        return tokens

    def _generate(self, req: pb.GenerateRequest, timeout: float | None) -> Generator[GeneratedToken, None, None]:
        client = self._client
        deadline = c.Deadline(timeout)  # from the first iteration, as a stream's
        resynced = self._sync_if_stale(deadline.sync_timeout())
        req.expected_position = self._position
        attempt = 0
        while True:
            attempt += 1
            got_any = False
            done = False
            try:
                call = client._stub.Generate(req, timeout=deadline.attempt_timeout(), metadata=client._metadata)
            except ValueError as e:
                raise Cancelled(str(e)) from None
            try:
                for resp in call:
                    got_any = True
                    token = c.generated_token(resp)
                    self._position = token.position
                    yield token
                done = True
                return
            except grpc.RpcError as e:
                err = c.streaming_error(e, deadline)
                done = not c.outcome_unknown(err)
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
            # The retry carries the same expected position: a prompt fed by the lost
            # attempt makes it fail with PositionConflict instead of feeding it twice.
            self._stale = False
            time.sleep(delay)

    def generate_text(
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
        """:meth:`generate`, returning the whole generated text."""
        return "".join(
            t.text
            for t in self.generate(
                prompt,
                max_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                stop=stop,
                timeout=timeout,
            )
        )

    # ------------------------------------------------------------------ management

    def fork(
        self,
        ttl: float | None = None,
        *,
        session_id: str | None = None,
        keep: bool = False,
        timeout: float | None = None,
    ) -> Session:
        """A new session holding a copy of this one's state and position."""
        client = self._client
        ttl_s = c.check_ttl(ttl)
        new_id = c.new_session_id() if session_id is None else c.check_session_id(session_id)
        req = pb.ForkSessionRequest(session_id=self._id, new_session_id=new_id)
        if ttl_s is not None:
            req.ttl_seconds = ttl_s
        deadline = c.Deadline(client._resolve_timeout(timeout))
        resp = client._unary(
            client._stub.ForkSession, req, deadline=deadline, accept_on_retry=lambda e: e.code == "ALREADY_EXISTS"
        )
        position = resp.session.position if resp is not None else client._get_session(new_id, deadline).position
        return Session(client, new_id, int(position), keep=keep)

    def reset(self, *, timeout: float | None = None) -> None:
        """Zero the state; the position becomes 0."""
        self._end_open_call()
        client = self._client
        resp = client._unary(client._stub.ResetSession, pb.ResetSessionRequest(session_id=self._id), timeout=timeout)
        assert resp is not None
        self._position = int(resp.session.position)
        self._stale = False

    def info(self, *, timeout: float | None = None) -> SessionInfo:
        """The session as the server sees it; also resynchronises :attr:`position`."""
        info = self._client._get_session(self._id, c.Deadline(self._client._resolve_timeout(timeout)))
        self._position = info.position
        self._stale = False
        return info

    def _end_open_call(self) -> None:
        calls, self._open_call = self._open_call, None
        if calls is not None:
            try:
                calls.close()  # (a finished one: nothing to do)
            except ValueError:  # running in another thread: a Session is not thread-safe
                pass

    def _sync_if_stale(self, timeout: float | None) -> bool:
        """After a broken stream or generation, read the position from the server until two
        reads agree (the server may still be finishing work of the cancelled call).
        Returns whether it did."""
        if not self._stale:
            return False
        position = self.info(timeout=timeout).position
        for _ in range(c.SETTLE_READS):
            time.sleep(c.SETTLE_INTERVAL)
            now = self.info(timeout=timeout).position
            if now == position:
                break
            position = now
        return True

    def delete(self, *, timeout: float | None = None) -> None:
        """Delete the server session and free its state. Raises SessionNotFound if it is
        already gone (a NOT_FOUND answering a retry counts as success)."""
        client = self._client
        client._unary(
            client._stub.DeleteSession,
            pb.DeleteSessionRequest(session_id=self._id),
            timeout=timeout,
            accept_on_retry=lambda e: e.code == "NOT_FOUND",
        )
        self._deleted = True
