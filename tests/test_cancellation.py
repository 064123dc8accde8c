"""Giving up on work, end to end on a real server: a request is applied wholly or not at all,
a failed stream's later requests are dropped by the engine, DeleteSession does not wait for
the session's queued work, and a session operation given up on is not applied later."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from lstmserve_client import Client
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from model.checkpoint import save_checkpoint
from model.model import CharRNN, ModelConfig
from model.tokenizer import CharTokenizer
from tests.conftest import run_server


def stub_for(target: str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 256 << 20)])
    return channel, pb_grpc.LstmServiceStub(channel)


def settled_position(stub: Any, sid: str) -> int:
    """The session's position once the engine has no more work for it."""
    last = -1
    for _ in range(200):
        position = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position
        if position == last:
            return int(position)
        last = position
        time.sleep(0.1)
    raise AssertionError("the session's position kept moving")


def code_of(fn: Any) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_a_step_given_up_on_is_applied_wholly_or_not_at_all_and_its_retry_is_answered(tiny_checkpoint: Path) -> None:
    # 4-token chunks: a 4096-token step takes ~1024 engine steps, so a 30 ms deadline ends the
    # call while the step is queued or part-way through (it used to stop there, half applied).
    with run_server(tiny_checkpoint, max_chunk_tokens=4) as srv:
        channel, stub = stub_for(srv.target)
        with channel:
            tokens = [i % 60 for i in range(4096)]
            outcomes = []
            for _ in range(3):
                sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
                request = pb.StepRequest(session_id=sid, tokens=tokens, expected_position=0, top_k=1)
                outcomes.append(code_of(lambda r=request: stub.Step(r, timeout=0.03)))
                assert settled_position(stub, sid) in (0, 4096)
                retry = stub.Step(request, timeout=60)  # the documented-safe retry
                assert retry.position == 4096 and len(retry.outputs) == 4096
                assert settled_position(stub, sid) == 4096
                reference_sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
                reference = stub.Step(pb.StepRequest(session_id=reference_sid, tokens=tokens, top_k=1), timeout=60)
                assert [o.top_tokens[0] for o in retry.outputs] == [o.top_tokens[0] for o in reference.outputs]
            assert grpc.StatusCode.DEADLINE_EXCEEDED in outcomes  # the case under test did happen


def test_a_failed_stream_never_applies_its_later_requests(tiny_checkpoint: Path) -> None:
    with run_server(tiny_checkpoint) as srv:
        channel, stub = stub_for(srv.target)
        with channel:
            for _ in range(10):
                sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
                bad = pb.StepRequest(session_id=sid, text="abc", expected_position=7)
                later = [pb.StepRequest(session_id=sid, text="de") for _ in range(5)]
                call = stub.StreamSteps(iter([bad, *later]), timeout=30)
                with pytest.raises(grpc.RpcError) as failure:
                    list(call)
                assert failure.value.code() is grpc.StatusCode.ABORTED
                assert settled_position(stub, sid) == 0
            assert srv.engine.scheduler.queued_tokens == 0


def test_delete_does_not_wait_for_a_running_generate_which_ends_not_found(tiny_checkpoint: Path) -> None:
    with run_server(tiny_checkpoint) as srv:
        channel, stub = stub_for(srv.target)
        with channel:
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            call = stub.Generate(pb.GenerateRequest(session_id=sid, prompt_text="a", max_tokens=4096), timeout=60)
            received = 0
            with pytest.raises(grpc.RpcError) as ended:
                for _ in call:
                    received += 1
                    if received == 1:
                        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=30)
            assert ended.value.code() is grpc.StatusCode.NOT_FOUND
            assert received < 4096
            assert code_of(lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid))) is grpc.StatusCode.NOT_FOUND
            assert srv.engine.scheduler.queued_tokens == 0


def test_a_reset_given_up_on_is_not_applied_later(tiny_checkpoint: Path) -> None:
    with run_server(tiny_checkpoint) as srv:
        channel, stub = stub_for(srv.target)
        with channel:
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            call = stub.Generate(pb.GenerateRequest(session_id=sid, prompt_text="a", max_tokens=4096), timeout=60)
            first = next(call)
            assert first.position == 2
            # Queued behind the generation, so its deadline passes before its turn.
            assert code_of(
                lambda: stub.ResetSession(pb.ResetSessionRequest(session_id=sid), timeout=0.05)
            ) is grpc.StatusCode.DEADLINE_EXCEEDED
            call.cancel()
            position = settled_position(stub, sid)
            assert position >= 2  # the generation's tokens are still there: no late reset
            assert srv.engine.scheduler.queued_tokens == 0


def test_negative_expected_position_is_invalid(server: Any) -> None:
    channel, stub = stub_for(server.target)
    with channel:
        sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
        for call in (
            lambda: stub.Step(pb.StepRequest(session_id=sid, text="a", expected_position=-1)),
            lambda: list(stub.StreamSteps(iter([pb.StepRequest(session_id=sid, text="a", expected_position=-1)]))),
            lambda: list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=1, expected_position=-1))),
        ):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "expected_position must be >= 0" in (e.value.details() or "")


def test_a_request_larger_than_the_engine_queue_is_invalid_not_retryable(tiny_checkpoint: Path) -> None:
    with run_server(tiny_checkpoint, max_queued_tokens=100) as srv:
        channel, stub = stub_for(srv.target)
        with channel:
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            for call in (
                lambda: stub.Step(pb.StepRequest(session_id=sid, text="a" * 101)),
                lambda: list(stub.Generate(pb.GenerateRequest(session_id=sid, prompt_text="a", max_tokens=100))),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert "holds at most 100" in (e.value.details() or "")
            assert stub.Step(pb.StepRequest(session_id=sid, text="a" * 100)).position == 100


def test_a_step_whose_response_could_not_be_sent_is_refused_before_it_is_applied(tiny_checkpoint: Path) -> None:
    n = 160_000  # x (65 log-probabilities + 32 hidden floats) ~ 64 MiB
    with run_server(tiny_checkpoint, max_tokens_per_request=n, max_queued_tokens=n,
                    max_message_bytes=8 << 20) as srv:
        channel, stub = stub_for(srv.target)
        with channel:
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            request = pb.StepRequest(session_id=sid, text="a" * n, return_logprobs=True, return_hidden=True)
            with pytest.raises(grpc.RpcError) as e:
                stub.Step(request, timeout=60)
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "MiB" in (e.value.details() or "") and "tokens per request" in (e.value.details() or "")
            assert settled_position(stub, sid) == 0


def small_vocab_checkpoint(directory: Path) -> Path:
    tokenizer = CharTokenizer(list("ACGT"))
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=4, embedding_size=8, hidden_size=16, num_layers=1, cell_type="lstm"))
    save_checkpoint(directory, model, tokenizer, {"note": "random weights for tests"})
    return directory


def test_unset_top_k_is_the_whole_vocabulary_when_it_has_fewer_than_5_tokens(tmp_path: Path) -> None:
    with run_server(small_vocab_checkpoint(tmp_path / "acgt")) as srv:
        channel, stub = stub_for(srv.target)
        with channel:
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            response = stub.Step(pb.StepRequest(session_id=sid, text="ACGT"))
            assert [len(o.top_tokens) for o in response.outputs] == [4, 4, 4, 4]
            with pytest.raises(grpc.RpcError) as e:
                stub.Step(pb.StepRequest(session_id=sid, text="A", top_k=5))
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with Client(srv.target) as client, client.session() as session:  # its default top_k is unset
            assert len(session.step("GATTACA").outputs[-1].top_tokens) == 4


def test_a_delete_racing_a_stream_leaves_other_sessions_alone(tiny_checkpoint: Path) -> None:
    """Deleting one session while its stream runs ends that stream NOT_FOUND; a stream on
    another session in the same batches goes on to the exact positions."""
    with run_server(tiny_checkpoint) as srv:
        channel, stub = stub_for(srv.target)
        with channel:
            doomed = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            other = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            results: dict[str, Any] = {}

            def run(sid: str) -> None:
                requests = (pb.StepRequest(session_id=sid, text="ab") for _ in range(300))
                try:
                    results[sid] = [r.position for r in stub.StreamSteps(requests, timeout=60)]
                except grpc.RpcError as e:
                    results[sid] = e.code()

            threads = [threading.Thread(target=run, args=(sid,)) for sid in (doomed, other)]
            for t in threads:
                t.start()
            time.sleep(0.05)
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=doomed), timeout=30)
            for t in threads:
                t.join(60)
            assert results[other] == [2 * (i + 1) for i in range(300)]
            assert results[doomed] in (grpc.StatusCode.NOT_FOUND, [2 * (i + 1) for i in range(300)])


def test_the_replay_cache_is_held_to_its_byte_budget_oldest_dropped_first(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each session keeps its last step's result for a retry; large ones (log-probabilities)
    count against REPLAY_CACHE_BYTES, and past it the oldest is dropped (its retry then gets
    ABORTED naming the position, as any conflict) instead of memory growing per session."""
    import service.engine

    monkeypatch.setattr(service.engine, "REPLAY_CACHE_BYTES", 1_000_000)
    with run_server(tiny_checkpoint) as srv:
        channel, stub = stub_for(srv.target)
        with channel:
            sids = [stub.CreateSession(pb.CreateSessionRequest()).session.session_id for _ in range(3)]
            steps = [pb.StepRequest(session_id=s, text="a" * 1500, expected_position=0, return_logprobs=True)
                     for s in sids]  # ~390 kB of log-probabilities each
            for step in steps:
                stub.Step(step)
            assert 0 < srv.engine._replay_bytes <= 1_000_000
            assert len(stub.Step(steps[2]).outputs) == 1500  # the newest: replayed
            with pytest.raises(grpc.RpcError) as dropped:
                stub.Step(steps[0])  # the oldest: dropped from the cache, and not applied twice
            assert dropped.value.code() is grpc.StatusCode.ABORTED
            assert settled_position(stub, sids[0]) == 1500
            for sid in sids:
                stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
            assert srv.engine._replay_bytes == 0

