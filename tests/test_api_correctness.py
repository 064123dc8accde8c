"""The engine and API, proven against a real server on a real port (raw gRPC stubs).

Every served output is compared with an offline forward of the same checkpoint.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from model.checkpoint import load_checkpoint
from service import wire
from tests.conftest import RunningServer, corpus_text, logprobs_of, offline_logprobs

TOL = 1e-4


@pytest.fixture(scope="module")
def offline(tiny_checkpoint: Path):
    return load_checkpoint(tiny_checkpoint)


async def create(stub: pb_grpc.LstmServiceStub, **kw) -> str:
    return (await stub.CreateSession(pb.CreateSessionRequest(**kw))).session.session_id


def texts(n: int, length: int, seed: int) -> list[str]:
    corpus = corpus_text()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(corpus) - length)
        out.append(corpus[start : start + length])
    return out


def random_chunks(tokens: list[int], rng: random.Random, lo: int = 1, hi: int = 64) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(tokens):
        n = rng.randint(lo, hi)
        chunks.append(tokens[i : i + n])
        i += n
    return chunks


async def test_streaming_equivalence_32_sessions_random_chunks(server: RunningServer, offline) -> None:
    """32 concurrent sessions, random chunk sizes 1..64, interleaved: outputs == offline forward."""
    tok = offline.tokenizer
    inputs = [tok.encode(t) for t in texts(32, 300, seed=1)]
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)

        async def feed(i: int, tokens: list[int]) -> np.ndarray:
            sid = await create(stub)
            rng = random.Random(100 + i)
            chunks = random_chunks(tokens, rng)
            responses = []
            if i % 2:  # half over one bidi stream, half as unary steps
                requests = [pb.StepRequest(session_id=sid, tokens=c, return_logprobs=True, top_k=3) for c in chunks]
                call = stub.StreamSteps(iter(requests))
                async for r in call:
                    responses.append(r)
            else:
                for c in chunks:
                    responses.append(await stub.Step(pb.StepRequest(session_id=sid, tokens=c, return_logprobs=True)))
                    await asyncio.sleep(rng.random() * 0.002)
            assert responses[-1].position == len(tokens)
            assert [o.token for r in responses for o in r.outputs] == tokens
            return logprobs_of(responses)

        served = await asyncio.gather(*(feed(i, t) for i, t in enumerate(inputs)))
    assert server.engine.steps_run > 0
    for tokens, got in zip(inputs, served):
        want = offline_logprobs(offline, tokens)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOL


async def test_top_tokens_are_the_most_likely(server: RunningServer, offline) -> None:
    tokens = offline.tokenizer.encode("To be, or not to be")
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = await create(stub)
        r = await stub.Step(pb.StepRequest(session_id=sid, tokens=tokens, top_k=4))
    want = offline_logprobs(offline, tokens)
    for i, out in enumerate(r.outputs):
        order = np.argsort(-want[i], kind="stable")[:4]
        assert list(out.top_tokens) == order.tolist()
        assert np.allclose(list(out.top_logprobs), want[i][order], atol=TOL)
        assert len(out.logprobs) == 0 and len(out.hidden) == 0  # not asked for


async def test_streamed_top_k_answers_of_several_tokens_match_the_offline_model(
    server: RunningServer, offline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such answers leave StreamSteps encoded ahead (service/wire.py, top_k_answer): the client parses
    them to the offline model's top tokens, with the session's id and position."""
    encoded: list[bytes | None] = []
    encode = wire.top_k_answer
    monkeypatch.setattr(wire, "top_k_answer", lambda result: encoded.append(encode(result)) or encoded[-1])
    tokens = offline.tokenizer.encode("Now is the winter of our discontent made glorious summer")
    chunks = [tokens[i : i + 8] for i in range(0, len(tokens), 8)]
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = await create(stub)
        call = stub.StreamSteps(iter([pb.StepRequest(session_id=sid, tokens=c, top_k=5) for c in chunks]))
        responses = [r async for r in call]
    assert [r.session_id for r in responses] == [sid] * len(chunks)
    assert [r.position for r in responses] == list(itertools.accumulate(len(c) for c in chunks))
    outputs = [o for r in responses for o in r.outputs]
    assert [o.token for o in outputs] == tokens
    assert len(encoded) == len(chunks) and all(encoded)  # every answer went out as encoded bytes
    want = offline_logprobs(offline, tokens)
    for i, out in enumerate(outputs):
        order = np.argsort(-want[i], kind="stable")[:5]
        assert list(out.top_tokens) == order.tolist()
        assert np.allclose(list(out.top_logprobs), want[i][order], atol=TOL)
        assert len(out.logprobs) == 0 and len(out.hidden) == 0


async def test_batch_invariance_alone_vs_among_100_busy_sessions(server: RunningServer, offline) -> None:
    tok = offline.tokenizer
    probe = tok.encode(texts(1, 120, seed=7)[0])
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)

        async def run_probe() -> np.ndarray:
            sid = await create(stub)
            out = []
            for t in probe:  # token by token, so it shares many steps with the others
                out.append(await stub.Step(pb.StepRequest(session_id=sid, tokens=[t], return_logprobs=True)))
            return logprobs_of(out)

        alone = await run_probe()
        stop = asyncio.Event()

        async def busy(i: int) -> int:
            sid = await create(stub)
            rng = random.Random(i)
            n = 0
            while not stop.is_set():
                chunk = [rng.randrange(len(tok)) for _ in range(rng.randint(1, 8))]
                await stub.Step(pb.StepRequest(session_id=sid, tokens=chunk))
                n += 1
            return n

        steps_before = server.engine.steps_run
        workers = [asyncio.create_task(busy(i)) for i in range(100)]
        await asyncio.sleep(0.2)
        loaded = await run_probe()
        stop.set()
        counts = await asyncio.gather(*workers)
    assert sum(counts) >= 100  # the others really were busy
    assert server.engine.steps_run - steps_before < sum(counts) + len(probe)  # and shared steps
    assert np.abs(alone - loaded).max() <= TOL
    assert np.abs(alone - offline_logprobs(offline, probe)).max() <= TOL


async def test_fork_then_feed_equals_original_then_feed(server: RunningServer, offline) -> None:
    tok = offline.tokenizer
    prefix, suffix = tok.encode("First Citizen:\nBefore we proceed"), tok.encode(" any further, hear me speak.")
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = await create(stub)
        await stub.Step(pb.StepRequest(session_id=sid, tokens=prefix))
        fork = (await stub.ForkSession(pb.ForkSessionRequest(session_id=sid))).session
        assert fork.position == len(prefix) and fork.session_id != sid
        a = await stub.Step(pb.StepRequest(session_id=fork.session_id, tokens=suffix, return_logprobs=True))
        b = await stub.Step(pb.StepRequest(session_id=sid, tokens=suffix, return_logprobs=True))
        assert a.position == b.position == len(prefix) + len(suffix)
        assert np.abs(logprobs_of([a]) - logprobs_of([b])).max() <= TOL
        assert np.abs(logprobs_of([a]) - offline_logprobs(offline, prefix + suffix)[len(prefix) :]).max() <= TOL

        reset = (await stub.ResetSession(pb.ResetSessionRequest(session_id=sid))).session
        assert reset.position == 0
        fresh = await create(stub)
        c = await stub.Step(pb.StepRequest(session_id=sid, tokens=suffix, return_logprobs=True))
        d = await stub.Step(pb.StepRequest(session_id=fresh, tokens=suffix, return_logprobs=True))
        assert np.abs(logprobs_of([c]) - logprobs_of([d])).max() <= TOL
        assert np.abs(logprobs_of([c]) - offline_logprobs(offline, suffix)).max() <= TOL


async def test_generate_same_seed_same_text_alone_and_under_load(server: RunningServer, offline) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)

        async def generate(prompt: str, seed: int, **kw) -> tuple[str, list[pb.GenerateResponse]]:
            sid = await create(stub)
            responses = [
                r async for r in stub.Generate(
                    pb.GenerateRequest(session_id=sid, prompt_text=prompt, max_tokens=80, seed=seed, **kw)
                )
            ]
            return "".join(r.text for r in responses), responses

        alone, responses = await generate("ROMEO:", 42, temperature=0.9, top_k=20, top_p=0.95)
        assert len(responses) == 80 and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
        assert [r.position for r in responses] == list(range(7, 87))
        other, _ = await generate("ROMEO:", 43, temperature=0.9, top_k=20, top_p=0.95)
        assert other != alone  # the seed matters

        loaded = await asyncio.gather(
            generate("ROMEO:", 42, temperature=0.9, top_k=20, top_p=0.95),
            *(generate("JULIET:", s, temperature=1.0) for s in range(30)),
        )
        assert loaded[0][0] == alone


async def test_generate_temperature_zero_is_argmax_and_advances_the_session(server: RunningServer, offline) -> None:
    tok = offline.tokenizer
    prompt = tok.encode("KING RICHARD:")
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = await create(stub)
        got = [r async for r in stub.Generate(
            pb.GenerateRequest(session_id=sid, prompt_tokens=prompt, max_tokens=30, temperature=0.0)
        )]
        session = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
    assert session.position == len(prompt) + 30
    # Offline greedy decoding from the same prompt.
    seq = list(prompt)
    for _ in range(30):
        seq.append(int(offline_logprobs(offline, seq)[-1].argmax()))
    assert [r.token for r in got] == seq[len(prompt) :]
    lp = offline_logprobs(offline, seq)
    for i, r in enumerate(got):
        assert abs(r.logprob - lp[len(prompt) - 1 + i][r.token]) <= TOL


async def test_generate_stop_string(server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = await create(stub)
        full = [r async for r in stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=200, seed=5))]
        text = "".join(r.text for r in full)
        stop = text[20:22]  # a string that occurs in this very continuation
        first = text.find(stop) + len(stop)
        await stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
        stopped = [r async for r in stub.Generate(
            pb.GenerateRequest(session_id=sid, max_tokens=200, seed=5, stop=[stop])
        )]
    assert "".join(r.text for r in stopped) == text[:first]
    assert stopped[-1].finish_reason == pb.FINISH_REASON_STOP


async def test_wrong_expected_position_is_aborted_and_changes_nothing(server: RunningServer, offline) -> None:
    tok = offline.tokenizer
    a, b = tok.encode("Hark"), tok.encode(", what light")
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = await create(stub)
        await stub.Step(pb.StepRequest(session_id=sid, tokens=a, expected_position=0))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Step(pb.StepRequest(session_id=sid, tokens=b, expected_position=2))
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert f"current position {len(a)}" in err.value.details()
        assert ("lstm-position", str(len(a))) in tuple(err.value.trailing_metadata())
        r = await stub.Step(pb.StepRequest(session_id=sid, tokens=b, expected_position=len(a), return_logprobs=True))
    assert r.position == len(a) + len(b)
    assert np.abs(logprobs_of([r]) - offline_logprobs(offline, a + b)[len(a) :]).max() <= TOL


async def test_retry_of_last_step_replays_instead_of_applying_twice(server: RunningServer, offline) -> None:
    tok = offline.tokenizer
    a = tok.encode("Once more unto the breach")
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = await create(stub)
        first = await stub.Step(pb.StepRequest(session_id=sid, tokens=a, expected_position=0, return_logprobs=True))
        again = await stub.Step(pb.StepRequest(session_id=sid, tokens=a, expected_position=0, return_logprobs=True))
        session = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
        assert session.position == len(a) == again.position
        assert np.array_equal(logprobs_of([first]), logprobs_of([again]))
        # Different tokens at the old position are a conflict, not a replay.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Step(pb.StepRequest(session_id=sid, tokens=a[:3], expected_position=0))
        assert err.value.code() == grpc.StatusCode.ABORTED


async def test_long_input_is_split_and_interleaved(tiny_checkpoint: Path, offline) -> None:
    """A 3,000-token request runs in chunks while short requests of others keep flowing."""
    from tests.conftest import run_server

    tok = offline.tokenizer
    long_tokens = tok.encode(texts(1, 3000, seed=3)[0])
    with run_server(tiny_checkpoint, max_chunk_tokens=16) as srv:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            big, small = await create(stub), await create(stub)
            long_call = asyncio.ensure_future(
                stub.Step(pb.StepRequest(session_id=big, tokens=long_tokens, return_logprobs=True))
            )
            await asyncio.sleep(0)
            short_done = 0
            while not long_call.done():
                await stub.Step(pb.StepRequest(session_id=small, tokens=[1]))
                short_done += 1
            r = await long_call
    assert short_done >= 3  # short requests were served while the long one ran
    assert r.position == len(long_tokens)
    assert np.abs(logprobs_of([r]) - offline_logprobs(offline, long_tokens)).max() <= TOL


async def test_gru_model_is_served_exactly(tiny_gru_checkpoint: Path) -> None:
    from tests.conftest import run_server

    ckpt = load_checkpoint(tiny_gru_checkpoint)
    tokens = ckpt.tokenizer.encode(texts(1, 200, seed=9)[0])
    with run_server(tiny_gru_checkpoint) as srv:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest())
            assert info.cell_type == pb.CELL_TYPE_GRU
            sid = await create(stub)
            responses = []
            for chunk in random_chunks(tokens, random.Random(0), 1, 20):
                responses.append(await stub.Step(pb.StepRequest(session_id=sid, tokens=chunk, return_logprobs=True)))
    assert np.abs(logprobs_of(responses) - offline_logprobs(ckpt, tokens)).max() <= TOL


async def test_return_hidden_is_the_top_layer_h(server: RunningServer, offline) -> None:
    tokens = offline.tokenizer.encode("Now is the winter")
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sid = await create(stub)
        r = await stub.Step(pb.StepRequest(session_id=sid, tokens=tokens, return_hidden=True, top_k=0))
    with torch.no_grad():
        h, _ = offline.model.forward_hidden(torch.tensor([tokens]))
    got = np.array([list(o.hidden) for o in r.outputs])
    assert got.shape == (len(tokens), offline.config.hidden_size)
    assert np.abs(got - h[0].numpy()).max() <= TOL
    assert all(len(o.top_tokens) == 0 for o in r.outputs)  # top_k=0 means none
