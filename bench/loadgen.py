"""The load generator: N concurrent sessions against lstm-serve over grpc.aio.

It uses the generated stubs directly (not the client library) so that the client's own
overhead stays small. Modes:

closed    each session keeps one StreamSteps stream and sends its next chunk when the
          previous answer arrives (concurrency = N requests in flight). With the batched
          transport the sessions share one StreamStepBatches stream per channel instead
          (what a gateway would do); "multiplexer" does that through the client library.
open      requests arrive as a Poisson process at `rate` per second in aggregate, spread
          round-robin over the N sessions and written to each session's stream at their
          scheduled time whether or not earlier answers have come back; latency is
          measured from the scheduled send time, so queueing (in the server or in this
          client) is counted, never hidden.
generate  each session calls Generate(max_tokens) in a closed loop; reports time to
          first token and inter-token latency.

A run is bounded by duration and, optionally, by a request count (whichever comes
first). Requests sent during the warm-up are excluded from every statistic.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import itertools
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from lstmserve_client import AsyncClient, LstmServeError, StepMultiplexer
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from bench.stats import cdf_points_ms, summarize_ms, timeline_ms
from service import eventloop

CORPUS = Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"
MODES = ("closed", "open", "generate")
# streams: a StreamSteps stream per session; batched: the sessions share one StreamStepBatches stream
# per channel (the generated stubs); multiplexer: the same through the client library's StepMultiplexer.
TRANSPORTS = ("streams", "batched", "multiplexer")
TOKEN_SOURCES = ("random", "corpus")
now = time.perf_counter


class BenchError(Exception):
    """A benchmark that cannot run as asked; the message says why."""


# ---- targets ---------------------------------------------------------------------------


def split_target(target: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port)."""
    if "://" in target or target.count("/"):
        raise BenchError(f"target {target!r}: expected HOST:PORT (no scheme)")
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise BenchError(f"target {target!r}: unbalanced '['")
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep:
            raise BenchError(f"target {target!r}: expected HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise BenchError(f"target {target!r}: port must be a number") from None
    if not 0 < port < 65536:
        raise BenchError(f"target {target!r}: port out of range")
    return host, port


def check_loopback(target: str) -> str:
    """The target as a gRPC address if it is a loopback address; BenchError otherwise.

    Accepted: 127.0.0.0/8, localhost, ::1. Names other than localhost are not resolved
    (a name could point anywhere), so they are refused.
    """
    host, port = split_target(target)
    if host.lower() == "localhost":
        return f"localhost:{port}"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BenchError(
            f"refusing target {target!r}: lstm-bench only loads loopback servers (127.0.0.0/8, localhost, ::1)"
        ) from None
    if not ip.is_loopback:
        raise BenchError(
            f"refusing target {target!r}: {ip} is not a loopback address (127.0.0.0/8, localhost, ::1)"
        )
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# ---- the spec ----------------------------------------------------------------------------


@dataclass
class LoadSpec:
    target: str  # HOST:PORT, loopback only
    mode: str = "closed"  # closed | open | generate
    sessions: int = 8  # concurrent sessions
    chunk: int = 1  # input tokens per request (1 = token by token; generate: prompt length)
    duration: float = 10.0  # measured seconds (after the warm-up)
    max_requests: int = 0  # measured requests to send at most (0 = bounded by duration only)
    warmup: float = 1.0  # seconds of load before measuring starts
    rate: float = 0.0  # open loop: aggregate requests per second
    tokens: str = "random"  # random | corpus
    generate_tokens: int = 32  # generate: max_tokens of each Generate
    top_k: int = 5  # top_k asked for in each StepRequest
    channels: int = 1  # gRPC channels (connections) the sessions are spread over
    transport: str = "streams"  # closed loop: a StreamSteps per session, or StreamStepBatches (TRANSPORTS)
    seed: int = 0
    drain_timeout: float = 30.0  # after the end, wait this long for answers still due
    label: str = ""  # free text carried into the result

    def validate(self) -> None:
        if self.mode not in MODES:
            raise BenchError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.tokens not in TOKEN_SOURCES:
            raise BenchError(f"tokens must be one of {', '.join(TOKEN_SOURCES)}, got {self.tokens!r}")
        if self.sessions < 1 or self.chunk < 1 or self.channels < 1:
            raise BenchError("sessions, chunk and channels must be >= 1")
        if not all(math.isfinite(x) for x in (self.duration, self.warmup, self.rate, self.drain_timeout)):
            raise BenchError("duration, warmup, rate and drain timeout must be finite numbers")
        if self.duration <= 0 or self.warmup < 0 or self.max_requests < 0 or self.drain_timeout <= 0:
            raise BenchError("duration and drain timeout must be > 0, warmup and max_requests >= 0")
        if self.transport not in TRANSPORTS:
            raise BenchError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.transport != "streams" and self.mode != "closed":
            raise BenchError(f"the {self.transport} transport runs the closed loop only (--mode closed)")
        if self.mode == "open" and self.rate <= 0:
            raise BenchError("open loop needs --rate > 0 (aggregate requests per second)")
        if self.mode == "generate" and self.generate_tokens < 1:
            raise BenchError("generate needs --generate-tokens >= 1")


# ---- token sources -------------------------------------------------------------------------


class TokenSource:
    """Input tokens for one session: random ids, or consecutive corpus text from a random offset."""

    def __init__(self, pool: np.ndarray, start: int) -> None:
        self.pool = pool
        self.pos = start % len(pool)

    def next(self, n: int) -> list[int]:
        pool, pos = self.pool, self.pos
        if pos + n <= len(pool):
            out = pool[pos : pos + n]
        else:  # around the end of the pool, as many times as n needs
            out = np.take(pool, np.arange(pos, pos + n), mode="wrap")
        self.pos = (pos + n) % len(pool)
        return out.tolist()  # type: ignore[no-any-return]


def token_pool(kind: str, vocab: list[str], seed: int) -> np.ndarray:
    if kind == "random":
        return np.random.default_rng(seed).integers(0, len(vocab), size=1 << 16, dtype=np.int64)
    index = {ch: i for i, ch in enumerate(vocab)}
    text = CORPUS.read_text(encoding="utf-8")
    ids = [index[ch] for ch in text if ch in index]
    if not ids:
        raise BenchError(f"{CORPUS}: no character of the corpus is in the model's vocabulary")
    return np.asarray(ids, dtype=np.int64)


# ---- recording -----------------------------------------------------------------------------


class Recorder:
    """Latencies of the requests sent after the warm-up; throughput from what completed inside
    the measured window [warm_end, window_end), whoever sent it (a request sent in the warm-up
    and answered in the window is work the server did in the window; one sent near the end and
    answered after it is not), so the count and the time it is divided by cover the same span."""

    def __init__(self, warm_end: float, max_requests: int, window_end: float) -> None:
        self.warm_end = warm_end
        self.max_requests = max_requests
        self.window_end = window_end  # the deadline, or earlier once the request bound is spent
        self.sent = 0  # measured requests sent (for the count bound)
        self.done_at: list[float] = []  # completion times after warm_end (requests)
        self.tokens_at: list[tuple[float, int]] = []  # (arrival time, tokens) after warm_end
        self.latencies: list[float] = []
        self.sent_at: list[float] = []  # send time of each of `latencies` (for the timeline)
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.send_lag: list[float] = []
        self.requests = 0
        self.tokens = 0
        self.warmup_requests = 0
        self.errors: Counter[str] = Counter()
        self.warmup_errors: Counter[str] = Counter()

    def send(self, t_send: float, deadline: float) -> bool | None:
        """Whether a request sent at t_send is measured; None when none is to be sent (the run's
        time or its request bound is spent)."""
        if t_send >= deadline:
            return None
        measured = t_send >= self.warm_end
        if measured and not self.take():
            return None
        return measured

    def take(self) -> bool:
        """Count one measured request against the request bound; False once it is spent."""
        if self.max_requests and self.sent >= self.max_requests:
            self.window_end = min(self.window_end, now())  # from here on fewer sessions send
            return False
        self.sent += 1
        return True

    def arrived(self, t: float, n_tokens: int) -> None:
        """Tokens that reached the client at t (for throughput)."""
        if t >= self.warm_end:
            self.tokens_at.append((t, n_tokens))

    def ok(self, t_send: float, t_done: float, n_tokens: int, measured: bool, tokens_arrived: bool = False) -> None:
        """A request answered at t_done; `tokens_arrived`: its tokens were reported one by one."""
        if t_done >= self.warm_end:
            self.done_at.append(t_done)
            if not tokens_arrived:
                self.tokens_at.append((t_done, n_tokens))
        if not measured:
            self.warmup_requests += 1
            return
        self.latencies.append(t_done - t_send)
        self.sent_at.append(t_send)
        self.requests += 1
        self.tokens += n_tokens

    def error(self, code: str, measured: bool) -> None:
        (self.errors if measured else self.warmup_errors)[code] += 1

    def rates(self) -> tuple[float, float, float]:
        """(measured window in seconds, tokens/s, requests/s): what completed inside the window."""
        window = max(self.window_end - self.warm_end, 0.0)
        if window <= 0:
            return window, 0.0, 0.0
        tokens = sum(n for t, n in self.tokens_at if t < self.window_end)
        done = sum(1 for t in self.done_at if t < self.window_end)
        return window, tokens / window, done / window


def _code(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return str(e.code().name)
    return type(e).__name__


# ---- closed loop ---------------------------------------------------------------------------


async def _closed_session(
    stub: pb_grpc.LstmServiceStub, sid: str, src: TokenSource, spec: LoadSpec, rec: Recorder, deadline: float
) -> None:
    call: Any = None
    try:
        while True:
            t0 = now()
            measured = rec.send(t0, deadline)
            if measured is None:
                break
            if call is None:
                call = stub.StreamSteps()
            try:
                await call.write(pb.StepRequest(session_id=sid, tokens=src.next(spec.chunk), top_k=spec.top_k))
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise BenchError("stream ended without an answer")
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, BenchError) as e:
                rec.error(_code(e) if not isinstance(e, BenchError) else "EOF", measured)
                call.cancel()
                call = None
                await asyncio.sleep(0.01)
                continue
            except asyncio.CancelledError:  # the run's time is up (see run_load): the server never answered
                rec.error("DRAIN_TIMEOUT", measured)
                call.cancel()
                call = None
                raise
            rec.ok(t0, now(), len(resp.outputs), measured)
    finally:
        if call is not None:
            try:
                await call.done_writing()
                await asyncio.wait_for(call.read(), timeout=spec.drain_timeout)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.TimeoutError):
                call.cancel()


class StepFailed(Exception):
    """A step answered with an error (the batched transports): its status code's name."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


StepFn = Callable[[str, list[int]], Awaitable[int]]  # (session id, tokens) -> the answer's outputs


class _RawMultiplexer:
    """One StreamStepBatches call on the generated stubs, as the streams transport uses them: steps
    asked for while a message is being written go out together, answers are matched by id. The
    client library's StepMultiplexer does the same and also turns every answer into its data
    classes (the "multiplexer" transport measures that)."""

    def __init__(self, stub: pb_grpc.LstmServiceStub) -> None:
        self.call: Any = stub.StreamStepBatches()
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[int]] = {}  # step id -> its caller's future
        self.outbox: list[pb.TaggedStep] = []  # steps not yet written
        self.wake = asyncio.Event()
        self.failure: str | None = None  # the stream's status code once it has failed
        self.tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    async def step(self, sid: str, tokens: list[int], top_k: int) -> int:
        if self.failure is not None:
            raise StepFailed(self.failure)
        step_id = next(self.ids)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pending[step_id] = future
        self.outbox.append(pb.TaggedStep(id=step_id, request=pb.StepRequest(session_id=sid, tokens=tokens,
                                                                             top_k=top_k)))
        self.wake.set()
        return await future

    async def _write(self) -> None:
        try:
            while self.failure is None:
                if not self.outbox:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                steps, self.outbox = self.outbox, []
                await self.call.write(pb.StreamStepBatchesRequest(steps=steps))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the reader has the status

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    self._fail("EOF")
                    return
                for result in message.results:
                    future = self.pending.pop(result.id, None)
                    if future is None or future.done():
                        continue
                    if result.HasField("response"):
                        future.set_result(len(result.response.outputs))
                    else:
                        future.set_exception(StepFailed(_CODE_NAMES.get(result.error.code, "UNKNOWN")))
        except grpc.aio.AioRpcError as e:
            self._fail(_code(e))

    def _fail(self, code: str) -> None:
        self.failure = code
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(StepFailed(code))
        self.wake.set()

    async def close(self) -> None:
        self.call.cancel()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


_CODE_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


async def _closed_batched_session(
    step: StepFn, sid: str, src: TokenSource, rec: Recorder, chunk: int, deadline: float
) -> None:
    while True:
        t0 = now()
        measured = rec.send(t0, deadline)
        if measured is None:
            break
        try:
            n_outputs = await step(sid, src.next(chunk))
        except (StepFailed, LstmServeError) as e:
            rec.error(str(e.code), measured)
            await asyncio.sleep(0.01)
            continue
        except asyncio.CancelledError:  # the run's time is up (see run_load): the server never answered
            rec.error("DRAIN_TIMEOUT", measured)
            raise
        rec.ok(t0, now(), n_outputs, measured)


async def _closed_batched(
    address: str, ids: list[str], sources: list[TokenSource], spec: LoadSpec, rec: Recorder, deadline: float
) -> None:
    """The closed loop over one StreamStepBatches stream per channel: on the generated stubs
    (transport "batched") or through the client library's StepMultiplexer ("multiplexer")."""
    steps: list[StepFn] = []
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(spec.channels):
            if spec.transport == "batched":
                channel = grpc.aio.insecure_channel(address, options=channel_options(spec.channels))
                stack.push_async_callback(channel.close)
                raw = _RawMultiplexer(pb_grpc.LstmServiceStub(channel))
                stack.push_async_callback(raw.close)
                steps.append(functools.partial(raw.step, top_k=spec.top_k))
            else:
                client = await stack.enter_async_context(AsyncClient(address, options=channel_options(spec.channels)))
                mux = await stack.enter_async_context(client.multiplexer())

                async def step(sid: str, tokens: list[int], mux: StepMultiplexer = mux) -> int:
                    return len((await mux.step(sid, tokens, top_k=spec.top_k)).outputs)

                steps.append(step)
        await asyncio.gather(*(_closed_batched_session(steps[i % len(steps)], sid, src, rec, spec.chunk, deadline)
                               for i, (sid, src) in enumerate(zip(ids, sources))))


# ---- open loop -----------------------------------------------------------------------------


class _Stream:
    """One StreamSteps call and the scheduled times of its unanswered requests, in order."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.inflight: deque[tuple[float, bool]] = deque()
        self.dead = False
        self.reader: asyncio.Task[None] | None = None


class _OpenSession:
    def __init__(self, stub: pb_grpc.LstmServiceStub, sid: str, src: TokenSource, spec: LoadSpec,
                 rec: Recorder) -> None:
        self.stub, self.sid, self.src, self.spec, self.rec = stub, sid, src, spec, rec
        self.queue: asyncio.Queue[tuple[float, bool] | None] = asyncio.Queue()
        self.streams: list[_Stream] = []

    def _fail(self, st: _Stream, code: str) -> None:
        # Synchronous: either a request was appended before this (and is counted here),
        # or the writer sees `dead` and opens a new stream.
        for _, measured in st.inflight:
            self.rec.error(code, measured)
        st.inflight.clear()
        st.dead = True

    async def _read(self, st: _Stream) -> None:
        rec = self.rec
        try:
            while True:
                resp = await st.call.read()
                if resp is grpc.aio.EOF:
                    break
                t = now()
                t_sched, measured = st.inflight.popleft()
                rec.ok(t_sched, t, len(resp.outputs), measured)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            self._fail(st, _code(e))
            return
        self._fail(st, "UNANSWERED")  # EOF with requests outstanding: should not happen

    async def write_loop(self) -> None:
        st: _Stream | None = None
        while True:
            item = await self.queue.get()
            if item is None:
                break
            if st is None or st.dead:
                st = _Stream(self.stub.StreamSteps())
                st.reader = asyncio.create_task(self._read(st))
                self.streams.append(st)
            t_sched, measured = item
            st.inflight.append(item)
            if measured:
                self.rec.send_lag.append(now() - t_sched)
            try:
                await st.call.write(
                    pb.StepRequest(session_id=self.sid, tokens=self.src.next(self.spec.chunk), top_k=self.spec.top_k)
                )
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # the reader sees the failure and counts every unanswered request
        if st is not None and not st.dead:
            try:
                await st.call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass

    async def finish(self, timeout: float) -> None:
        readers = [st.reader for st in self.streams if st.reader is not None]
        if readers:
            _, pending = await asyncio.wait(readers, timeout=timeout)
            for st in self.streams:
                if st.reader in pending:
                    self._fail(st, "DRAIN_TIMEOUT")
                    st.call.cancel()
                    st.reader.cancel()  # type: ignore[union-attr]


async def _open_loop(sessions: list[_OpenSession], spec: LoadSpec, rec: Recorder, start: float,
                     deadline: float) -> None:
    rng = random.Random(spec.seed)
    writers = [asyncio.create_task(s.write_loop()) for s in sessions]
    t = start
    i = 0
    while True:
        t += rng.expovariate(spec.rate)
        measured = rec.send(t, deadline)
        if measured is None:
            break
        delay = t - now()
        if delay > 0:
            await asyncio.sleep(delay)
        sessions[i % len(sessions)].queue.put_nowait((t, measured))
        i += 1
    for s in sessions:
        s.queue.put_nowait(None)
    await asyncio.gather(*writers)
    finish_by = now() + spec.drain_timeout
    for s in sessions:
        await s.finish(max(0.0, finish_by - now()))


# ---- generate ------------------------------------------------------------------------------


async def _generate_session(
    stub: pb_grpc.LstmServiceStub, sid: str, src: TokenSource, spec: LoadSpec, rec: Recorder, deadline: float,
    seed: int,
) -> None:
    rng = random.Random(seed)
    while True:
        t0 = now()
        measured = rec.send(t0, deadline)
        if measured is None:
            break
        call = stub.Generate(
            pb.GenerateRequest(session_id=sid, prompt_tokens=src.next(spec.chunk), max_tokens=spec.generate_tokens,
                               temperature=1.0, seed=rng.getrandbits(63))
        )
        first: float | None = None
        prev = t0
        gaps: list[float] = []
        n = 0
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    break
                t = now()
                if first is None:
                    first = t
                else:
                    gaps.append(t - prev)
                prev = t
                n += 1
                rec.arrived(t, 1)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            rec.error(_code(e), measured)
            await asyncio.sleep(0.01)
            continue
        except asyncio.CancelledError:  # the run's time is up (see run_load)
            rec.error("DRAIN_TIMEOUT", measured)
            call.cancel()
            raise
        rec.ok(t0, prev, n, measured, tokens_arrived=True)
        if measured and first is not None:
            rec.ttft.append(first - t0)
            rec.itl.extend(gaps)


# ---- sessions and the run ------------------------------------------------------------------


async def _gather_in_batches(coros: list[Any], batch: int = 256) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(coros), batch):
        out.extend(await asyncio.gather(*coros[i : i + batch], return_exceptions=True))
    return out


async def create_sessions(stubs: list[pb_grpc.LstmServiceStub], n: int, batch: int = 256) -> list[str]:
    """n new sessions; if any cannot be created, the ones that were are deleted and BenchError says why."""
    ids: list[str] = []
    while len(ids) < n:
        want = min(batch, n - len(ids))
        replies = await asyncio.gather(
            *(stubs[(len(ids) + i) % len(stubs)].CreateSession(pb.CreateSessionRequest(), timeout=60)
              for i in range(want)),
            return_exceptions=True,
        )
        ids.extend(r.session.session_id for r in replies if not isinstance(r, BaseException))
        failures = [r for r in replies if isinstance(r, BaseException)]
        if failures:
            await delete_sessions(stubs, ids, timeout=10)
            first = failures[0]
            why = f"{first.code().name}: {first.details()}" if isinstance(first, grpc.aio.AioRpcError) else repr(first)
            raise BenchError(f"could not create {n} sessions ({len(failures)} of the last {want} failed; "
                             f"the {len(ids)} created were deleted): {why}")
    return ids


async def delete_sessions(stubs: list[pb_grpc.LstmServiceStub], ids: list[str], timeout: float = 60) -> None:
    await _gather_in_batches(
        [stubs[i % len(stubs)].DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=timeout)
         for i, sid in enumerate(ids)]
    )


def channel_options(channels: int) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if channels > 1:
        options.append(("grpc.use_local_subchannel_pool", 1))  # one connection per channel
    return options


def model_info_dict(info: Any) -> dict[str, Any]:
    return {
        "cell_type": {1: "lstm", 2: "gru"}.get(info.cell_type, "unknown"),
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "embedding_size": info.embedding_size,
        "vocab_size": len(info.vocab),
        "checkpoint_sha256": info.checkpoint_sha256,
        "device": info.device,
        "dtype": info.dtype,
        "max_batch_sessions": info.limits.max_batch_sessions,
        "max_batch_tokens": info.limits.max_batch_tokens,
        "server_version": info.server_version,
    }


async def _until(seconds: float, sessions: Any) -> None:
    try:
        await asyncio.wait_for(sessions, timeout=max(seconds, 0.0))
    except asyncio.TimeoutError:
        pass  # cancelled: each session counted what it was still waiting for


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run one load cell; returns the result as a JSON-ready dict (see `result_fields`)."""
    spec.validate()
    address = check_loopback(spec.target)
    channels = [grpc.aio.insecure_channel(address, options=channel_options(spec.channels))
                for _ in range(spec.channels)]
    try:
        stubs = [pb_grpc.LstmServiceStub(ch) for ch in channels]
        try:
            info = await stubs[0].GetModelInfo(pb.GetModelInfoRequest(), timeout=30, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise BenchError(f"{spec.target}: GetModelInfo failed: {e.code().name} {e.details()}") from None
        vocab = list(info.vocab)
        pool = token_pool(spec.tokens, vocab, spec.seed)
        rng = random.Random(spec.seed)
        ids = await create_sessions(stubs, spec.sessions)
        # The generator shares the CPUs with the server: keep its collector out of the way
        # (young collections every few responses at the default threshold).
        thresholds = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(*eventloop.GC_THRESHOLDS)
        try:
            sources = [TokenSource(pool, rng.randrange(len(pool))) for _ in ids]
            start = now()
            cpu0 = time.process_time()
            warm_end = start + spec.warmup
            deadline = warm_end + spec.duration
            rec = Recorder(warm_end, spec.max_requests, deadline)
            session_stubs = [stubs[i % len(stubs)] for i in range(len(ids))]
            # Bounded in time even if the server stops answering: a drain timeout past the deadline
            # the sessions are cancelled and their unanswered requests count as errors.
            # (The open loop bounds its own reads in _OpenSession.finish.)
            time_up = deadline - now() + spec.drain_timeout
            if spec.mode == "closed" and spec.transport != "streams":
                await _until(time_up, _closed_batched(address, ids, sources, spec, rec, deadline))
            elif spec.mode == "closed":
                await _until(time_up, asyncio.gather(*(_closed_session(st, sid, src, spec, rec, deadline)
                                                       for st, sid, src in zip(session_stubs, ids, sources))))
            elif spec.mode == "open":
                open_sessions = [_OpenSession(st, sid, src, spec, rec)
                                 for st, sid, src in zip(session_stubs, ids, sources)]
                await _open_loop(open_sessions, spec, rec, start, deadline)
            else:
                await _until(time_up, asyncio.gather(
                    *(_generate_session(st, sid, src, spec, rec, deadline, spec.seed * 100_003 + i)
                      for i, (st, sid, src) in enumerate(zip(session_stubs, ids, sources)))
                ))
            end = now()
            cpu = time.process_time() - cpu0
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            await delete_sessions(stubs, ids, timeout=spec.drain_timeout)
    finally:
        for ch in channels:
            await ch.close()
    return _result(spec, rec, info, start, end, cpu)


def _result(spec: LoadSpec, rec: Recorder, info: Any, start: float, end: float, cpu: float) -> dict[str, Any]:
    window, tokens_per_s, requests_per_s = rec.rates()
    spec_d = asdict(spec)
    return {
        "kind": "load",
        "label": spec.label,
        "mode": spec.mode,
        "transport": spec.transport,
        "target": spec.target,
        "sessions": spec.sessions,
        "chunk": spec.chunk,
        "rate_target": spec.rate if spec.mode == "open" else None,
        "generate_tokens": spec.generate_tokens if spec.mode == "generate" else None,
        "tokens_source": spec.tokens,
        "warmup_s": spec.warmup,
        "duration_s": spec.duration,
        "max_requests": spec.max_requests,
        "window_s": window,
        "requests": rec.requests,
        "tokens": rec.tokens,
        "warmup_requests": rec.warmup_requests,
        "tokens_per_s": tokens_per_s,
        "requests_per_s": requests_per_s,
        "latency_ms": summarize_ms(rec.latencies),
        "latency_cdf_ms": cdf_points_ms(rec.latencies),
        "latency_timeline_ms": timeline_ms(rec.sent_at, rec.latencies, rec.warm_end),
        "ttft_ms": summarize_ms(rec.ttft),
        "itl_ms": summarize_ms(rec.itl),
        "send_lag_ms": summarize_ms(rec.send_lag),
        "errors": dict(sorted(rec.errors.items())),
        "error_count": sum(rec.errors.values()),
        "warmup_errors": dict(sorted(rec.warmup_errors.items())),
        "client_cpu_pct": 100.0 * cpu / max(end - start, 1e-9),
        "wall_s": end - start,
        "server": model_info_dict(info),
        "spec": spec_d,
    }


# The fields every load result has (the smoke test checks them).
result_fields = (
    "kind", "mode", "sessions", "chunk", "requests", "tokens", "tokens_per_s", "requests_per_s", "latency_ms",
    "ttft_ms", "itl_ms", "errors", "error_count", "window_s", "client_cpu_pct", "server", "latency_timeline_ms",
)
