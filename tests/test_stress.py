"""Overload and stress: every limit answers RESOURCE_EXHAUSTED, deadlines and cancellations drop queued work,
and 1,000 concurrent streams plus bursts beyond the limits leave a healthy server whose memory comes back.

The limit tests run an in-process server; the stress test runs the real command as a subprocess so its
resident memory (VmRSS in /proc/PID/status) can be measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from model.checkpoint import load_checkpoint
from tests.conftest import RunningServer, corpus_text, run_server

Code = grpc.StatusCode
ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


# ---- a server process ----------------------------------------------------------------------------


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss(self) -> int:
        """Resident memory of the server process, in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/PID/status")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def spawn_server(checkpoint: Path, tmp_path: Path, *args: str, env: dict[str, str] | None = None
                 ) -> Iterator[ServerProcess]:
    """`python -m service.server --checkpoint X --port 0 --port-file F --metrics-port -1 ARGS`, its output in a
    file (a pipe nobody reads could fill and block it); SIGTERM on exit."""
    name = uuid.uuid4().hex[:8]
    port_file, log_path = tmp_path / f"port-{name}", tmp_path / f"server-{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.server", "--checkpoint", str(checkpoint), "--port", "0",
             "--port-file", str(port_file), "--metrics-port", "-1", "--durability", "none", *args],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})},
        )
    try:
        deadline = time.monotonic() + 90
        while not port_file.exists():
            if proc.poll() is not None:
                raise AssertionError(f"server exited early ({proc.returncode}): {log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("server did not start in 90 s")
            time.sleep(0.05)
        yield ServerProcess(proc, int(port_file.read_text()), log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def trailing(error: grpc.aio.AioRpcError | grpc.RpcError) -> dict[str, str]:
    return {k: v for k, v in (error.trailing_metadata() or ())}


async def code_of(awaitable) -> tuple[Code, grpc.aio.AioRpcError | None]:
    try:
        await awaitable
    except grpc.aio.AioRpcError as e:
        return e.code(), e
    return Code.OK, None


async def position(stub: pb_grpc.LstmServiceStub, sid: str) -> int:
    return (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session.position


async def settled_position(stub: pb_grpc.LstmServiceStub, sid: str, quiet: float = 0.6, limit: float = 20) -> int:
    """The session's position once it stopped moving for `quiet` seconds."""
    deadline = time.monotonic() + limit
    last = await position(stub, sid)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = await position(stub, sid)
        if now == last:
            return now
        last = now
    raise AssertionError(f"session kept moving for {limit} s")


# ---- limits ---------------------------------------------------------------------------------------------


async def test_fork_past_max_sessions_is_resource_exhausted_with_retry_hint(tiny_checkpoint: Path) -> None:
    with run_server(tiny_checkpoint, max_sessions=2) as srv:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            a = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
            await stub.Step(pb.StepRequest(session_id=a, text="Hello"))
            b = (await stub.ForkSession(pb.ForkSessionRequest(session_id=a))).session.session_id
            code, err = await code_of(stub.ForkSession(pb.ForkSessionRequest(session_id=b)))
            assert code == Code.RESOURCE_EXHAUSTED and err is not None
            assert "maximum of 2 sessions" in err.details()
            assert trailing(err)["retry-after-ms"] == "1000"
            assert await position(stub, a) == await position(stub, b) == 5
            assert srv.engine.session_count == 2


async def test_flooding_past_max_queued_tokens_is_resource_exhausted(tiny_checkpoint: Path) -> None:
    """--max-queued-tokens 200, one token per session per engine step: a flood of 60-token steps gets
    RESOURCE_EXHAUSTED (retry-after-ms 50) for what does not fit; what was admitted runs exactly once; refused
    steps change nothing; the admission count drains back to zero."""
    with run_server(tiny_checkpoint, max_queued_tokens=200, max_chunk_tokens=1, max_batch_sessions=1) as srv:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sids = [(await stub.CreateSession(pb.CreateSessionRequest())).session.session_id for _ in range(30)]
            peak, flooding = 0, True

            async def watch_queue() -> None:
                nonlocal peak
                while flooding:
                    peak = max(peak, srv.engine.scheduler.queued_tokens + sum(
                        len(i.tokens) for i in list(srv.engine._inbox) if hasattr(i, "tokens")))
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch_queue())
            results = await asyncio.gather(
                *(code_of(stub.Step(pb.StepRequest(session_id=s, tokens=[i % 60] * 60))) for i, s in enumerate(sids))
            )
            flooding = False
            await watcher
            codes = Counter(code for code, _ in results)
            assert set(codes) == {Code.OK, Code.RESOURCE_EXHAUSTED}, codes
            assert codes[Code.RESOURCE_EXHAUSTED] >= 10, codes
            assert 0 < peak <= 200  # the engine never held more than the limit
            for sid, (code, err) in zip(sids, results):
                assert await position(stub, sid) == (60 if code == Code.OK else 0)
                if err is not None:
                    assert "queue is full" in err.details() and trailing(err)["retry-after-ms"] == "50"
            # A Generate whose prompt and tokens could never fit is refused up front, as invalid:
            # retrying it would never help.
            code, err = await code_of(_drain(stub.Generate(pb.GenerateRequest(session_id=sids[0], max_tokens=201))))
            assert code == Code.INVALID_ARGUMENT and "holds at most 200" in err.details()
            # A pipelined stream past the limit ends with RESOURCE_EXHAUSTED after the steps that fit.
            requests = [pb.StepRequest(session_id=sids[1], tokens=[1] * 80) for _ in range(5)]
            call = stub.StreamSteps(iter(requests))
            responses, code, err = await _collect(call)
            assert code == Code.RESOURCE_EXHAUSTED and 1 <= len(responses) < 5
            assert trailing(err)["retry-after-ms"] == "50"
            assert srv.engine.scheduler.queued_tokens == 0 or await _drained(srv)
            # Room again: a step that fits runs.
            assert (await stub.Step(pb.StepRequest(session_id=sids[2], tokens=[3] * 150))).position == 150 + (
                60 if results[2][0] == Code.OK else 0
            )


def test_admission_counts_work_not_yet_handed_to_the_engine(tiny_checkpoint: Path) -> None:
    """Thirty 60-token steps submitted in one event-loop tick against --max-queued-tokens 200: only three fit.
    (Work waits in the engine's inbox until the engine thread next drains it; the limit must count it.)"""
    from service.engine import ResourceExhaustedError

    with run_server(tiny_checkpoint, max_queued_tokens=200) as srv:
        engine = srv.engine

        async def flood() -> int:
            sids = [(await engine.create_session("")).session_id for _ in range(30)]
            futures = []
            for sid in sids:
                with contextlib.suppress(ResourceExhaustedError):
                    futures.append(engine.submit_step("", sid, [1] * 60)[0])
            await asyncio.gather(*futures)
            return len(futures)

        assert srv.call(flood()) == 200 // 60


def test_deleted_sessions_leave_nothing_behind(tiny_checkpoint: Path) -> None:
    """Creating and deleting sessions at a steady rate must not grow the engine's bookkeeping: 5,000 created
    and deleted leave no entries for them behind (each would otherwise stay until its ttl ran out, 30 minutes
    by default: at 1,000 sessions a second that is ~1.8 million entries, some 200 MiB)."""
    with run_server(tiny_checkpoint) as srv:
        engine = srv.engine

        async def churn() -> None:
            for _ in range(5000):
                sid = (await engine.create_session("")).session_id
                await engine.delete_session("", sid)

        srv.call(churn(), timeout=120)
        assert engine.session_count == 0
        # The expiry heap holds (deadline, session id) per session; entries of deleted sessions must go.
        assert len(engine._expiry) <= 2 * engine.session_count + 1024, len(engine._expiry)


async def _drain(call) -> list:
    return [r async for r in call]


async def _collect(call) -> tuple[list, Code, grpc.aio.AioRpcError | None]:
    out = []
    try:
        async for r in call:
            out.append(r)
    except grpc.aio.AioRpcError as e:
        return out, e.code(), e
    return out, Code.OK, None


async def _drained(srv: RunningServer, limit: float = 10) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if srv.engine.scheduler.queued_tokens == 0 and srv.engine.scheduler.queued_items == 0:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_past_max_concurrent_rpcs_is_resource_exhausted(tiny_checkpoint: Path) -> None:
    with run_server(tiny_checkpoint, max_concurrent_rpcs=4) as srv:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sids = [(await stub.CreateSession(pb.CreateSessionRequest())).session.session_id for _ in range(4)]
            calls = [stub.Generate(pb.GenerateRequest(session_id=s, max_tokens=4000, seed=1)) for s in sids]
            for call in calls:
                await call.read()  # all four are running
            code, err = await code_of(stub.GetModelInfo(pb.GetModelInfoRequest()))
            assert code == Code.RESOURCE_EXHAUSTED, code
            assert "concurrent rpc limit" in err.details().lower()
            # The health service has a limit of its own: a full server still answers its checks.
            code, _ = await code_of(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()))
            assert code == Code.OK
            for call in calls:
                call.cancel()
            deadline = time.monotonic() + 10
            while True:  # the slots come back once the cancellations reach the server
                code, _ = await code_of(stub.GetModelInfo(pb.GetModelInfoRequest()))
                if code == Code.OK or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert code == Code.OK
            assert await _drained(srv)


async def test_message_past_the_default_limit_is_resource_exhausted(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        limit = (await stub.GetModelInfo(pb.GetModelInfoRequest())).limits.max_message_bytes
        assert limit == 4 * MiB
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        base = pb.StepRequest(session_id=sid, text="a" * (limit - 64)).ByteSize()
        at_limit = pb.StepRequest(session_id=sid, text="a" * (limit - 64 + limit - base))
        over = pb.StepRequest(session_id=sid, text="a" * (limit - 64 + limit - base + 1))
        assert (at_limit.ByteSize(), over.ByteSize()) == (limit, limit + 1)
        code, err = await code_of(stub.Step(over))
        assert code == Code.RESOURCE_EXHAUSTED and "larger than max" in err.details()
        code, err = await code_of(stub.Step(at_limit))
        assert code == Code.INVALID_ARGUMENT and "at most 4096" in err.details()  # read, then refused
        assert await position(stub, sid) == 0


# ---- deadlines and cancellation drop queued work ------------------------------------------------------


@pytest.fixture
def slow_server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    """One token per session per engine step: a 4,000-token input takes 4,000 steps."""
    with run_server(tiny_checkpoint, max_chunk_tokens=1) as srv:
        yield srv


async def test_step_past_its_deadline_is_dropped(slow_server: RunningServer) -> None:
    """A step whose deadline passes before it starts (queued behind its session's 4,000-token
    step) is dropped; one that has started runs to its end (a step is never half applied)."""
    async with grpc.aio.insecure_channel(slow_server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        first = stub.Step(pb.StepRequest(session_id=sid, tokens=[5] * 4000, top_k=0))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        code, _ = await code_of(stub.Step(pb.StepRequest(session_id=sid, tokens=[7] * 10), timeout=0.1))
        assert code == Code.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2
        assert (await first).position == 4000
        assert await settled_position(stub, sid) == 4000  # the late step was dropped, not run
        response = await stub.Step(pb.StepRequest(session_id=sid, text="ok", expected_position=4000))
        assert response.position == 4002
        assert await _drained(slow_server)


async def test_cancelled_stream_and_generate_drop_their_queued_work(slow_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(slow_server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        a = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        b = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        stream = stub.StreamSteps(iter([pb.StepRequest(session_id=a, tokens=[9] * 4000, top_k=0)] * 3))
        generate = stub.Generate(pb.GenerateRequest(session_id=b, prompt_tokens=[1, 2, 3], max_tokens=4000, seed=5))
        first = [await generate.read() for _ in range(5)]
        assert [t.position for t in first] == [4, 5, 6, 7, 8]
        c = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        unary = stub.Step(pb.StepRequest(session_id=c, tokens=[4] * 4000, top_k=0))
        await asyncio.sleep(0.2)
        for call in (stream, generate, unary):
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await (call if call is unary else call.read())
        a_at, b_at, c_at = [await settled_position(stub, s) for s in (a, b, c)]
        # Started requests run to their end, the rest are dropped; the generation stops sampling.
        assert a_at == 4000 and 8 <= b_at < 3 + 4000 and c_at in (0, 4000)
        assert await _drained(slow_server)


async def _read_watching_the_queue(engine: Any, call: Any, n: int) -> tuple[list[int], int]:
    """The positions of a stream's n answers, and the most requests the engine held meanwhile."""
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, engine.scheduler.queued_items + len(engine._inbox))
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        positions = [(await call.read()).position for _ in range(n)]
    finally:
        watcher.cancel()
    return positions, most


async def test_a_stream_that_pipelines_is_held_to_its_in_flight_bound(
    slow_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client may send ahead, but one stream never has more than MAX_STREAM_IN_FLIGHT requests in the
    engine: the server stops reading it until an answer goes out; every request is still answered, in order."""
    import service.server

    monkeypatch.setattr(service.server, "MAX_STREAM_IN_FLIGHT", 3)
    engine = slow_server.engine
    async with grpc.aio.insecure_channel(slow_server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        call = stub.StreamSteps(iter([pb.StepRequest(session_id=sid, tokens=[3] * 40, top_k=0)] * 20))
        positions, most = await _read_watching_the_queue(engine, call, 20)
        assert positions == [40 * (i + 1) for i in range(20)]
        assert 2 <= most <= 3, most  # pipelined (more than one queued), but never past the bound
        assert await call.read() is grpc.aio.EOF
        assert await _drained(slow_server)


async def test_a_stream_that_never_reads_large_answers_is_held_to_a_byte_bound(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.server

    per_answer = 200 * (16 + 9 * 5 + 4 * 65 + 6)  # engine.response_bytes of one request below
    monkeypatch.setattr(service.server, "MAX_STREAM_PENDING_BYTES", 3 * per_answer)
    with run_server(tiny_checkpoint, max_chunk_tokens=1) as srv:
        engine = srv.engine
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
            request = pb.StepRequest(session_id=sid, text="b" * 200, return_logprobs=True)
            call = stub.StreamSteps(iter([request] * 12))
            positions, most = await _read_watching_the_queue(engine, call, 12)
            assert positions == [200 * (i + 1) for i in range(12)]
            assert 2 <= most <= 3, most  # pipelined, but never more answers pending than the bound


async def test_answers_due_over_all_streams_are_held_to_a_server_wide_byte_bound(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_PENDING_ANSWER_BYTES over all StreamSteps calls a stream submits only with nothing
    unanswered: pipelining streams stay within it (plus one answer each), a stream that stops
    reading keeps only what it holds, and every request is still answered, in order."""
    import service.server

    per_answer = 200 * (16 + 9 * 5 + 4 * 65 + 6)  # engine.response_bytes of one request below
    cap = 3 * per_answer
    monkeypatch.setattr(service.server, "MAX_PENDING_ANSWER_BYTES", cap)
    with run_server(tiny_checkpoint, max_chunk_tokens=1) as srv:
        registry = srv.server.metrics.registry
        most = 0.0

        async def watch() -> None:
            nonlocal most
            while True:
                most = max(most, registry.get_sample_value("lstm_stream_pending_answer_bytes") or 0.0)
                await asyncio.sleep(0.001)

        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sids = [(await stub.CreateSession(pb.CreateSessionRequest())).session.session_id for _ in range(4)]

            def requests(sid: str, n: int) -> Any:
                return iter([pb.StepRequest(session_id=sid, text="b" * 200, return_logprobs=True)] * n)

            async def positions(call: Any) -> list[int]:
                return [(await call.read()).position for _ in range(8)]

            watcher = asyncio.create_task(watch())
            try:
                # A stream that sends 8 and reads nothing until the others are done.
                hog = stub.StreamSteps(requests(sids[0], 8))
                await asyncio.sleep(0.3)
                pipelining = [stub.StreamSteps(requests(sid, 8)) for sid in sids[1:]]
                answers = await asyncio.gather(*(positions(c) for c in pipelining))
                hog_answers = await positions(hog)
            finally:
                watcher.cancel()
            want = [200 * (i + 1) for i in range(8)]
            assert answers == [want] * 3 and hog_answers == want
            assert most <= cap + 4 * per_answer, (most, cap)  # 4 streams; without the bound 32 were due (2.09 MB)
            assert most >= cap, most  # (the bound was reached: the test exercised it)
        assert registry.get_sample_value("lstm_stream_pending_answer_bytes") == 0


async def test_two_pipelining_streams_share_the_engine_queue(tiny_checkpoint: Path) -> None:
    """One stream holds at most 1/QUEUE_SHARE of --max-queued-tokens: two clients that
    pipeline more than the whole queue (lstm-client score does) both finish; they used to fill the
    queue and fail each other with RESOURCE_EXHAUSTED."""
    from service.engine import QUEUE_SHARE

    queue = 1024
    with run_server(tiny_checkpoint, max_queued_tokens=queue, max_tokens_per_request=64, max_chunk_tokens=1) as srv:
        engine = srv.engine
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sids = [(await stub.CreateSession(pb.CreateSessionRequest())).session.session_id for _ in range(2)]
            # 48 tokens: 128 is not a multiple, so a stream must wait before a request that would pass its share
            calls = [stub.StreamSteps(iter([pb.StepRequest(session_id=sid, tokens=[3] * 48, top_k=0)] * 40))
                     for sid in sids]
            most = 0

            async def watch() -> None:
                nonlocal most
                while True:
                    most = max(most, engine.scheduler.queued_tokens + engine._inbox_tokens)
                    await asyncio.sleep(0.001)

            watcher = asyncio.create_task(watch())
            try:
                answers = await asyncio.gather(*[asyncio.wait_for(_positions(call, 40), 60) for call in calls])
            finally:
                watcher.cancel()
            assert answers == [[48 * (i + 1) for i in range(40)]] * 2
            assert most <= 2 * (queue // QUEUE_SHARE), most


async def test_one_session_cannot_fill_the_engine_queue_for_everyone(tiny_checkpoint: Path) -> None:
    """A session runs one row per step, so its queued work may take at most 1/QUEUE_SHARE of
    --max-queued-tokens (at least one largest request): a client that queued the whole queue on
    one session (64 Generates of 4096 tokens at the defaults) refused everyone else's large requests."""
    with run_server(tiny_checkpoint, max_chunk_tokens=1, max_queued_tokens=16384, max_tokens_per_request=1024,
                    max_generate_tokens=1024) as srv:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            hog, other = [(await stub.CreateSession(pb.CreateSessionRequest())).session.session_id for _ in range(2)]
            calls = [stub.Step(pb.StepRequest(session_id=hog, tokens=[5] * 1024, top_k=0)) for _ in range(16)]
            refused = [asyncio.ensure_future(code_of(call)) for call in calls]
            await asyncio.sleep(0.3)
            code, err = await code_of(stub.Step(pb.StepRequest(session_id=other, tokens=[6] * 1024, top_k=0),
                                                timeout=60))
            assert code == Code.OK, err  # RESOURCE_EXHAUSTED "the engine queue is full" before
            done = [t.result() for t in refused if t.done()]
            assert sum(c == Code.RESOURCE_EXHAUSTED for c, _ in done) == 14  # 2 x 1024 = the session's 2048
            message = next(e for c, e in done if c == Code.RESOURCE_EXHAUSTED).details()  # type: ignore[union-attr]
            assert "one session may queue at most 2048" in message, message
            for call in calls:
                call.cancel()
            await asyncio.gather(*refused, return_exceptions=True)  # (a cancelled call raises CancelledError)
            # Session operations pass the inbox unadmitted (no tokens): the per-session count skips them.
            await stub.ResetSession(pb.ResetSessionRequest(session_id=other), timeout=10)
            await stub.ForkSession(pb.ForkSessionRequest(session_id=other), timeout=10)
            assert (await stub.Step(pb.StepRequest(session_id=other, tokens=[1]), timeout=10)).position == 1


async def test_work_for_a_deleted_session_never_runs_on_a_new_one_with_its_id(slow_server: RunningServer) -> None:
    """Delete and create again with the same id, back to back: the old session's running Generate,
    queued Step and queued Reset end NOT_FOUND; the new session gets none of their tokens."""
    async with grpc.aio.insecure_channel(slow_server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
        generate = stub.Generate(pb.GenerateRequest(session_id=sid, prompt_tokens=[1] * 300, max_tokens=4000, seed=1))
        await generate.read()  # the prompt is in: it has started
        step = stub.Step(pb.StepRequest(session_id=sid, tokens=[1, 2, 3]))
        reset = stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
        await asyncio.sleep(0.05)
        engine = slow_server.engine

        async def delete_then_create() -> Any:  # both in the engine's inbox, in this order, at once
            delete = asyncio.ensure_future(engine.delete_session("", sid))
            create = asyncio.ensure_future(engine.create_session("", session_id=sid))
            await delete
            return await create

        created = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(delete_then_create(), slow_server.loop))
        assert created.position == 0
        assert (await code_of(step))[0] == Code.NOT_FOUND
        assert (await code_of(reset))[0] == Code.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await generate.read() is not grpc.aio.EOF:
                pass
        assert ended.value.code() == Code.NOT_FOUND
        assert (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session.position == 0


async def _positions(call: Any, n: int) -> list[int]:
    return [(await call.read()).position for _ in range(n)]


# ---- 1,000 concurrent streams and bursts past the limits, memory ----------------------------------------

STREAMS = 1000
CHANNELS = 8
MAX_SESSIONS = 1100
MAX_RPCS = 1100
REQUESTS_PER_STREAM = 4
CHECKED = 16  # streams whose log-probabilities are compared with an offline forward
# After two warm-up rounds, two more full rounds (each deleting its sessions) may peak at most this far above
# the warm-up rounds' peak. Measured: RSS climbs for two to three rounds, then stays flat within ~10 MiB
# (5 rounds: peaks 304, 317, 330, 330, 324 MiB); comparing one round with the next failed CI once on
# warm-up alone (+25 MiB from round 1 to round 2). The state of 1,100 sessions of the tiny model is ~0.5 MiB and
# the state slab never shrinks by design (it is counted in the warm-up); what remains is allocator slack
# (glibc keeps freed heap pages in its arenas) and grpc's per-connection buffers, a few MiB. A leak of
# anything per stream or per message (5,000 messages, 1,000 sessions, ~1,500 refused calls per round) grows
# with every round and shows up as more: 12 KiB per stream is 24 MiB over two rounds.
RSS_TOLERANCE = 24 * MiB


@dataclass
class Round:
    codes: Counter
    burst_codes: dict[str, Counter]
    rss_open: int
    rss_loaded: int
    rss_deleted: int
    seconds: float

    @property
    def peak_rss(self) -> int:
        return max(self.rss_open, self.rss_loaded, self.rss_deleted)


async def load_round(srv: ServerProcess, stubs: list[pb_grpc.LstmServiceStub], ckpt, seed: int) -> Round:
    started = time.monotonic()
    rng = random.Random(seed)
    corpus = corpus_text()
    codes: Counter = Counter()
    gate = asyncio.Semaphore(200)

    async def create(i: int) -> str:
        async with gate:
            return (await stubs[i % CHANNELS].CreateSession(pb.CreateSessionRequest())).session.session_id

    sids = await asyncio.gather(*(create(i) for i in range(STREAMS)))
    plans = []
    for _ in range(STREAMS):
        start = rng.randrange(len(corpus) - 200)
        cuts = sorted(rng.sample(range(1, 60), REQUESTS_PER_STREAM - 1))
        text = corpus[start : start + 60]
        plans.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, 60])])
    opened = 0
    all_open, go = asyncio.Event(), asyncio.Event()
    logprobs: dict[int, list[np.ndarray]] = {}

    async def stream(i: int) -> None:
        nonlocal opened
        checked = i < CHECKED
        call = stubs[i % CHANNELS].StreamSteps()
        fed = 0
        try:
            for k, chunk in enumerate(plans[i]):
                await call.write(pb.StepRequest(session_id=sids[i], text=chunk, top_k=3, return_logprobs=checked))
                response = await call.read()
                fed += len(chunk)
                assert response.position == fed and len(response.outputs) == len(chunk)
                assert all(len(o.top_tokens) == 3 for o in response.outputs)
                if checked:
                    logprobs.setdefault(i, []).append(np.array([list(o.logprobs) for o in response.outputs]))
                if k == 0:
                    opened += 1
                    if opened == STREAMS:
                        all_open.set()
                    await go.wait()  # hold every stream open until the bursts are done
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            codes[(await call.code())] += 1
        except grpc.aio.AioRpcError as e:
            codes[e.code()] += 1
            go.set()
            raise

    tasks = [asyncio.create_task(stream(i)) for i in range(STREAMS)]
    try:
        await asyncio.wait_for(all_open.wait(), timeout=90)
        rss_open = srv.rss()
        burst_codes = await bursts(srv, stubs)
    finally:
        go.set()
    await asyncio.gather(*tasks)
    rss_loaded = srv.rss()
    tokenizer = ckpt.tokenizer
    for i, parts in logprobs.items():  # served outputs under load == an offline forward
        tokens = tokenizer.encode("".join(plans[i]))
        with torch.no_grad():
            logits, _ = ckpt.model(torch.tensor([tokens]))
            expected = torch.log_softmax(logits[0].float(), dim=-1).numpy()
        assert np.abs(np.concatenate(parts) - expected).max() <= 1e-4

    async def delete(i: int, sid: str) -> None:
        async with gate:
            await stubs[i % CHANNELS].DeleteSession(pb.DeleteSessionRequest(session_id=sid))

    await asyncio.gather(*(delete(i, s) for i, s in enumerate(sids)))
    await asyncio.sleep(0.5)
    return Round(codes, burst_codes, rss_open, rss_loaded, srv.rss(), time.monotonic() - started)


async def bursts(srv: ServerProcess, stubs: list[pb_grpc.LstmServiceStub]) -> dict[str, Counter]:
    """While the 1,000 streams are open: sessions past --max-sessions, tokens past --max-queued-tokens,
    calls past --max-concurrent-rpcs. Every answer is OK or RESOURCE_EXHAUSTED."""
    out: dict[str, Counter] = {"sessions": Counter(), "queue": Counter(), "rpcs": Counter()}
    created: list[str] = []

    async def create(i: int) -> None:
        try:
            response = await stubs[i % CHANNELS].CreateSession(pb.CreateSessionRequest())
        except grpc.aio.AioRpcError as e:
            out["sessions"][_why(e)] += 1
        else:
            out["sessions"]["OK"] += 1
            created.append(response.session.session_id)

    # In waves of 50, so 1,000 streams + one wave stay under --max-concurrent-rpcs (1,100): the
    # limit these creates run into is the session limit, not the RPC limit (that one is burst below).
    for wave in range(0, 200, 50):
        await asyncio.gather(*(create(i) for i in range(wave, wave + 50)))
    assert created, out

    async def big_step(i: int) -> None:
        request = pb.StepRequest(session_id=created[i % len(created)], tokens=[i % 65] * 2000, top_k=0)
        try:
            await stubs[i % CHANNELS].Step(request)
        except grpc.aio.AioRpcError as e:
            out["queue"][_why(e)] += 1
        else:
            out["queue"]["OK"] += 1

    await asyncio.gather(*(big_step(i) for i in range(3 * len(created))))

    health = [health_pb2_grpc.HealthStub(stub._channel) for stub in stubs]  # type: ignore[attr-defined]
    settled, release = 0, asyncio.Event()
    all_settled = asyncio.Event()

    async def watch(i: int) -> None:
        nonlocal settled
        call = health[i % CHANNELS].Watch(health_pb2.HealthCheckRequest())
        try:
            assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
            out["rpcs"]["OK"] += 1
        except grpc.aio.AioRpcError as e:
            out["rpcs"][_why(e)] += 1
        settled += 1
        if settled == 250:
            all_settled.set()
        await release.wait()  # held open: every watch counts against the limit at the same time
        call.cancel()

    watchers = [asyncio.create_task(watch(i)) for i in range(250)]
    await asyncio.wait_for(all_settled.wait(), timeout=60)
    release.set()
    await asyncio.gather(*watchers)
    for sid in created:
        await stubs[0].DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    return out


def _why(error: grpc.aio.AioRpcError) -> str:
    """A status as a counter key; RESOURCE_EXHAUSTED split by which limit said it."""
    if error.code() != Code.RESOURCE_EXHAUSTED:
        return f"{error.code().name}: {error.details()}"
    details = error.details() or ""
    hint = trailing(error).get("retry-after-ms")
    if "sessions" in details:
        return f"EXHAUSTED sessions (retry-after-ms {hint})"
    if "queue is full" in details:
        return f"EXHAUSTED queue (retry-after-ms {hint})"
    if "concurrent rpc limit" in details.lower():
        return "EXHAUSTED concurrent-rpcs"
    return f"EXHAUSTED other: {details}"


async def test_1000_concurrent_streams_and_bursts_past_the_limits(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Four rounds of: 1,000 StreamSteps streams held open at once over 8 channels, bursts past every limit
    while they are open, the streams finish, all sessions deleted. The first two rounds warm up (slab
    growth, allocator arenas, connection buffers); the last two must not climb past where those peaked."""
    ckpt = load_checkpoint(tiny_checkpoint)
    args = ["--max-sessions", str(MAX_SESSIONS), "--max-concurrent-rpcs", str(MAX_RPCS),
            "--max-queued-tokens", "30000"]
    with spawn_server(tiny_checkpoint, tmp_path, *args) as srv:
        rss_start = srv.rss()
        channels = [grpc.aio.insecure_channel(srv.target) for _ in range(CHANNELS)]
        try:
            stubs = [pb_grpc.LstmServiceStub(c) for c in channels]
            for stub, channel in zip(stubs, channels):
                stub._channel = channel  # type: ignore[attr-defined]
            rounds = [await load_round(srv, stubs, ckpt, seed) for seed in (1, 2, 3, 4)]
            health = health_pb2_grpc.HealthStub(channels[0])
            status = (await health.Check(health_pb2.HealthCheckRequest())).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for c in channels:
                await c.close()
        print(f"\nRSS at start {rss_start / MiB:.1f} MiB")
        for n, r in enumerate(rounds, 1):
            bursts_seen = {k: dict(v) for k, v in r.burst_codes.items()}
            print(f"round {n}: {r.seconds:.1f}s, RSS open {r.rss_open / MiB:.1f} / loaded {r.rss_loaded / MiB:.1f} / "
                  f"deleted {r.rss_deleted / MiB:.1f} MiB; bursts {bursts_seen}")
        for r in rounds:
            assert r.codes == Counter({Code.OK: STREAMS}), r.codes
            for name, codes in r.burst_codes.items():
                assert all(k == "OK" or k.startswith("EXHAUSTED ") for k in codes), (name, codes)
                assert any(k.startswith("EXHAUSTED ") for k in codes), (name, codes)
            assert not any("other" in k for codes in r.burst_codes.values() for k in codes)
            assert r.burst_codes["sessions"]["EXHAUSTED sessions (retry-after-ms 1000)"] > 0
            assert r.burst_codes["rpcs"]["EXHAUSTED concurrent-rpcs"] > 0
        warm_peak = max(r.peak_rss for r in rounds[:2])
        measured_peak = max(r.peak_rss for r in rounds[2:])
        assert measured_peak <= warm_peak + RSS_TOLERANCE, (measured_peak / MiB, warm_peak / MiB)
        assert srv.alive()
    log = srv.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


async def test_a_failed_engine_thread_fails_calls_at_once_and_stops_the_server(tiny_checkpoint: Path) -> None:
    """A bug outside a step (those are caught per step) ended the engine thread and every call after it
    hung for good, the process still up. Now the queued calls end UNAVAILABLE, new ones too, and the
    server is told to stop (lstm-serve then exits 1, to be restarted)."""
    with run_server(tiny_checkpoint) as srv:
        engine = srv.engine
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        engine.on_failure = lambda: loop.call_soon_threadsafe(stopped.set)  # (runs on the server's loop)

        def injected_bug() -> None:
            if engine.scheduler.queued_items:
                raise RuntimeError("injected engine bug")

        engine._regroup = injected_bug
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = (await stub.CreateSession(pb.CreateSessionRequest())).session.session_id
            code, err = await code_of(stub.Step(pb.StepRequest(session_id=sid, tokens=[1, 2]), timeout=10))
            assert code == Code.UNAVAILABLE and "engine failed" in err.details(), err  # type: ignore[union-attr]
            await asyncio.wait_for(stopped.wait(), 10)
            assert isinstance(engine.failure, RuntimeError)
            for call in (stub.Step(pb.StepRequest(session_id=sid, tokens=[1]), timeout=10),
                         stub.CreateSession(pb.CreateSessionRequest(), timeout=10),
                         stub.ResetSession(pb.ResetSessionRequest(session_id=sid), timeout=10)):
                code, err = await code_of(call)
                assert code == Code.UNAVAILABLE, err
