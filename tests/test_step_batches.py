"""StreamStepBatches (many sessions' steps per message) and the client's StepMultiplexer, against
a real lstm-serve on 127.0.0.1 (the tiny random checkpoint of conftest.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from lstmserve_client import (
    AsyncClient,
    Cancelled,
    InvalidInput,
    PositionConflict,
    SessionNotFound,
    StepMultiplexer,
    Unavailable,
)
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from model.checkpoint import load_checkpoint
from tests.conftest import offline_logprobs, run_server, scrape, value

BATCHES = "/lstmserve.v1.LstmService/StreamStepBatches"


@pytest.fixture
async def stub(server: Any) -> AsyncIterator[pb_grpc.LstmServiceStub]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        yield pb_grpc.LstmServiceStub(channel)


async def new_sessions(stub: pb_grpc.LstmServiceStub, n: int) -> list[str]:
    responses = await asyncio.gather(*(stub.CreateSession(pb.CreateSessionRequest()) for _ in range(n)))
    return [r.session.session_id for r in responses]


def tagged(step_id: int, session_id: str, **fields: Any) -> pb.TaggedStep:
    return pb.TaggedStep(id=step_id, request=pb.StepRequest(session_id=session_id, **fields))


async def results_of(call: Any, n: int) -> tuple[dict[int, pb.TaggedStepResult], int]:
    """Read until n results have come: them by id, and how many messages carried them."""
    results: dict[int, pb.TaggedStepResult] = {}
    messages = 0
    while len(results) < n:
        message = await call.read()
        assert message is not grpc.aio.EOF, f"the stream ended after {len(results)} of {n} results"
        messages += 1
        for r in message.results:
            assert r.id not in results, f"step {r.id} answered twice"
            results[r.id] = r
    return results, messages


async def test_steps_of_many_sessions_match_the_offline_forward(server: Any, stub: pb_grpc.LstmServiceStub) -> None:
    """Every session's outputs equal an offline forward over its own input, whichever message and
    engine step carried them, and one session's steps in one message run in order."""
    ckpt = load_checkpoint(server.checkpoint)
    texts = ["ROMEO: ", "JULIET: O", "First Citizen:", "xyz"]
    ids = await new_sessions(stub, len(texts))
    call = stub.StreamStepBatches()
    # Session 0 gets its text in two steps of the same message; the rest in one step each.
    steps = [tagged(1, ids[0], text=texts[0][:3], return_logprobs=True)]
    steps += [tagged(10 + i, sid, text=t, return_logprobs=True) for i, (sid, t) in enumerate(zip(ids, texts))][1:]
    steps.append(tagged(2, ids[0], text=texts[0][3:], return_logprobs=True))
    await call.write(pb.StreamStepBatchesRequest(steps=steps))
    results, _ = await results_of(call, len(steps))
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK

    assert all(r.WhichOneof("result") == "response" for r in results.values())
    first, second = results[1].response, results[2].response
    assert (first.position, second.position) == (3, len(texts[0]))
    got = np.array([list(o.logprobs) for o in (*first.outputs, *second.outputs)], dtype=np.float32)
    np.testing.assert_allclose(got, offline_logprobs(ckpt, ckpt.tokenizer.encode(texts[0])), atol=1e-4)
    for i in range(1, len(texts)):
        response = results[10 + i].response
        assert response.session_id == ids[i] and response.position == len(texts[i])
        got = np.array([list(o.logprobs) for o in response.outputs], dtype=np.float32)
        np.testing.assert_allclose(got, offline_logprobs(ckpt, ckpt.tokenizer.encode(texts[i])), atol=1e-4)


async def test_a_failing_step_gets_its_own_error_and_the_stream_goes_on(stub: pb_grpc.LstmServiceStub) -> None:
    good, other = await new_sessions(stub, 2)
    call = stub.StreamStepBatches()
    await call.write(pb.StreamStepBatchesRequest(steps=[
        tagged(1, good, text="To be"),
        tagged(2, "no-such-session-aaaaaaaaaaaaaaaa", text="a"),
        tagged(3, other, text=""),  # empty input
        tagged(4, other, text="\x00"),  # not in the vocabulary
        tagged(5, other, text="ab", expected_position=7),  # the session is at 0
        tagged(6, other, tokens=[1, 2], text="ab"),  # both kinds of input
        tagged(7, other, tokens=[10_000]),  # not a token id
    ]))
    results, _ = await results_of(call, 7)
    assert results[1].response.position == 5
    errors = {i: results[i].error for i in range(2, 8)}
    assert all(results[i].WhichOneof("result") == "error" for i in range(2, 8))
    assert errors[2].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "not found" in errors[2].message.lower() or "no session" in errors[2].message.lower()
    for i in (3, 4, 6, 7):
        assert errors[i].code == grpc.StatusCode.INVALID_ARGUMENT.value[0], errors[i]
        assert errors[i].message
    assert errors[5].code == grpc.StatusCode.ABORTED.value[0]
    assert errors[5].HasField("position") and errors[5].position == 0
    # The stream goes on, and the failed steps changed nothing.
    await call.write(pb.StreamStepBatchesRequest(steps=[tagged(8, other, text="ab"), tagged(9, good, text="!")]))
    results, _ = await results_of(call, 2)
    assert results[8].response.position == 2
    assert results[9].response.position == 6
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_answers_of_one_engine_step_share_a_message(stub: pb_grpc.LstmServiceStub) -> None:
    """What the RPC exists for: n sessions' steps sent in one message come back in far fewer than n."""
    ids = await new_sessions(stub, 48)
    call = stub.StreamStepBatches()
    for round_ in range(3):
        await call.write(pb.StreamStepBatchesRequest(
            steps=[tagged(round_ * 100 + i, sid, text="a") for i, sid in enumerate(ids)]
        ))
        results, messages = await results_of(call, len(ids))
        assert {r.response.position for r in results.values()} == {round_ + 1}
        assert messages <= len(ids) // 4, f"{len(ids)} answers came in {messages} messages"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_a_duplicate_id_in_flight_ends_the_stream(stub: pb_grpc.LstmServiceStub) -> None:
    (sid,) = await new_sessions(stub, 1)
    call = stub.StreamStepBatches()
    await call.write(pb.StreamStepBatchesRequest(steps=[tagged(5, sid, text="a"), tagged(5, sid, text="b")]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "step id 5" in (info.value.details() or "")


async def test_a_malformed_message_ends_the_stream_with_invalid_argument(server: Any) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        call = channel.stream_stream(BATCHES)(iter([b"\x0a\x05\x08"]))  # a field longer than the message
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_cancelled_stream_leaves_other_sessions_intact(tiny_checkpoint: Path) -> None:
    """Cancelling a stream with steps in flight drops them, releases what they held, and changes
    nothing for sessions on other streams."""
    with run_server(tiny_checkpoint) as srv:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            ids = await new_sessions(stub, 9)
            bystander = ids.pop()
            doomed = stub.StreamStepBatches()
            await doomed.write(pb.StreamStepBatchesRequest(
                steps=[tagged(i, sid, tokens=[1] * 200) for i, sid in enumerate(ids)]
            ))
            doomed.cancel()
            call = stub.StreamStepBatches()
            await call.write(pb.StreamStepBatchesRequest(steps=[tagged(1, bystander, text="abc")]))
            results, _ = await results_of(call, 1)
            assert results[1].response.position == 3
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            assert srv.metrics_port is not None
            for _ in range(200):  # the server learns of the cancellation asynchronously
                if value(scrape(srv.metrics_port), "lstm_stream_pending_answer_bytes") == 0:
                    break
                await asyncio.sleep(0.05)
            assert value(scrape(srv.metrics_port), "lstm_stream_pending_answer_bytes") == 0
            metrics = scrape(srv.metrics_port)
            assert value(metrics, "lstm_requests_total", method="StreamStepBatches", code="OK") == 1
            assert value(metrics, "lstm_requests_total", method="StreamStepBatches", code="CANCELLED") == 1
            # Each cancelled step ran whole or not at all: a step queued behind it sees one or the other
            # (GetSession could read a long step half done: it runs in several engine steps).
            for sid in ids:
                got = await stub.Step(pb.StepRequest(session_id=sid, tokens=[1]))
                assert got.position in (1, 201)


# ---- the client's multiplexer -------------------------------------------------------------------


@pytest.fixture
async def aclient(server: Any) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.target) as client:
        yield client


async def test_multiplexer_steps_equal_session_steps(aclient: AsyncClient) -> None:
    texts = [f"{name}: " for name in ("ROMEO", "JULIET", "MERCUTIO", "TYBALT", "NURSE", "Friar")] * 3
    plain = [await aclient.session() for _ in texts]
    muxed = [await aclient.session() for _ in texts]
    async with aclient.multiplexer() as mux:
        assert isinstance(mux, StepMultiplexer)
        for _ in range(2):  # a second round continues from the state the first left
            got = await asyncio.gather(*(mux.step(s.session_id, t, top_k=3) for s, t in zip(muxed, texts)))
            want = [await s.step(t, top_k=3) for s, t in zip(plain, texts)]
            for a, b in zip(got, want, strict=True):
                assert a.position == b.position
                assert a.text == b.text and len(a.outputs) == len(b.outputs)
                for x, y in zip(a.outputs, b.outputs, strict=True):
                    assert x.top_tokens == y.top_tokens and x.top_texts == y.top_texts
                    assert x.top_logprobs == pytest.approx(y.top_logprobs, abs=1e-4)
        assert mux.pending == 0


async def test_multiplexer_errors_are_the_clients_own_and_per_step(aclient: AsyncClient) -> None:
    s = await aclient.session()
    async with aclient.multiplexer() as mux:
        outcomes = await asyncio.gather(
            mux.step(s.session_id, "ab"),
            mux.step("no-such-session-aaaaaaaaaaaaaaaa", "a"),
            mux.step(s.session_id, "c", expected_position=0),  # runs after "ab": the session is at 2
            mux.step(s.session_id, [10_000]),
            return_exceptions=True,
        )
        assert not isinstance(outcomes[0], BaseException) and outcomes[0].position == 2
        assert isinstance(outcomes[1], SessionNotFound)
        assert isinstance(outcomes[2], PositionConflict) and outcomes[2].current_position == 2
        assert isinstance(outcomes[3], InvalidInput)
        assert (await mux.step(s.session_id, "d", expected_position=2)).position == 3
    with pytest.raises(Cancelled):
        await mux.step(s.session_id, "e")


async def test_multiplexer_fails_pending_steps_when_the_server_goes(tiny_checkpoint: Path) -> None:
    with run_server(tiny_checkpoint) as srv:
        async with AsyncClient(srv.target) as client:
            s = await client.session()
            mux = client.multiplexer()
            await mux.open()
            assert (await mux.step(s.session_id, "a")).position == 1
            srv.call(srv.server.stop(grace=0.5))
            with pytest.raises((Unavailable, Cancelled)):
                await asyncio.wait_for(mux.step(s.session_id, "b" * 100), 10)
            with pytest.raises((Unavailable, Cancelled)):
                await mux.step(s.session_id, "c")
            await asyncio.wait_for(mux.close(), 10)
