"""Scrape /metrics after real traffic: the numbers move exactly as they should."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from tests.conftest import run_server, scrape, value


def test_metrics_follow_real_traffic(tiny_checkpoint: Path) -> None:
    with run_server(tiny_checkpoint) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        assert srv.metrics_port
        before = scrape(srv.metrics_port)
        assert value(before, "lstm_sessions_active") == 0
        assert value(before, "lstm_tokens_total", kind="input") == 0

        ids = [stub.CreateSession(pb.CreateSessionRequest()).session.session_id for _ in range(5)]
        sent = 0
        for i, sid in enumerate(ids):
            text = "Now is the winter of our discontent"[: 5 + i * 3]
            stub.Step(pb.StepRequest(session_id=sid, text=text))
            sent += len(text)
        stream_tokens = [[1, 2, 3], [4], [5, 6]]
        list(stub.StreamSteps(iter(pb.StepRequest(session_id=ids[0], tokens=t) for t in stream_tokens)))
        sent += sum(len(t) for t in stream_tokens)
        prompt = "ROMEO:"
        generated = list(stub.Generate(pb.GenerateRequest(session_id=ids[1], prompt_text=prompt, max_tokens=7)))
        sent += len(prompt)
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=ids[2]))
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=ids[3]))
        with pytest.raises(grpc.RpcError):
            stub.GetSession(pb.GetSessionRequest(session_id=ids[2]))
        with pytest.raises(grpc.RpcError):
            stub.Step(pb.StepRequest(session_id=ids[0], tokens=[999]))

        after = scrape(srv.metrics_port)

    assert value(after, "lstm_tokens_total", kind="input") == sent
    assert value(after, "lstm_tokens_total", kind="generated") == len(generated) == 7
    assert value(after, "lstm_sessions_created_total") == 5
    assert value(after, "lstm_sessions_deleted_total") == 2
    assert value(after, "lstm_sessions_active") == 3
    assert value(after, "lstm_requests_total", method="Step", code="OK") == 5
    assert value(after, "lstm_requests_total", method="Step", code="INVALID_ARGUMENT") == 1
    assert value(after, "lstm_requests_total", method="GetSession", code="NOT_FOUND") == 1
    assert value(after, "lstm_requests_total", method="CreateSession", code="OK") == 5
    assert value(after, "lstm_requests_total", method="StreamSteps", code="OK") == 1
    assert value(after, "lstm_requests_total", method="Generate", code="OK") == 1
    assert value(after, "lstm_request_duration_seconds_count", method="Step") == 6
    assert value(after, "lstm_time_to_first_token_seconds_count") == 1
    assert value(after, "lstm_inter_token_latency_seconds_count") == 6
    # Every engine step is observed once; batches hold at least one session.
    steps = value(after, "lstm_step_duration_seconds_count")
    assert steps >= 5 and value(after, "lstm_batch_sessions_count") == steps
    assert value(after, "lstm_batch_tokens_sum") == sent + 7
    assert value(after, "lstm_state_memory_bytes") > 0
    info = [k for k in after if k[0] == "lstm_model_info"]
    assert len(info) == 1 and dict(info[0][1])["cell_type"] == "lstm"
    # A session id is never a label.
    assert not any(sid in repr(k) for k in after for sid in ids)


def test_calls_answered_without_a_result_are_counted_with_their_real_code(tiny_checkpoint: Path) -> None:
    """A Generate the client cancels or lets expire, a call past --max-concurrent-rpcs and a
    malformed message are counted under the status the client saw (not OK, not missing)."""
    import time

    with run_server(tiny_checkpoint, max_concurrent_rpcs=2) as srv:
        with grpc.insecure_channel(srv.target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            cancelled = stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=4000))
            next(cancelled)
            cancelled.cancel()
            expired = stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=4000), timeout=0.3)
            with pytest.raises(grpc.RpcError) as e:
                list(expired)
            assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED

            # Two streams held open fill the limit; the next call is refused.
            other = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            held = [stub.Generate(pb.GenerateRequest(session_id=s, max_tokens=4000)) for s in (sid, other)]
            for call in held:
                next(call)
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetModelInfo(pb.GetModelInfoRequest())
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "concurrent RPC limit" in (refused.value.details() or "")
            for call in held:
                call.cancel()

            malformed = channel.unary_unary("/lstmserve.v1.LstmService/Step")
            for _ in range(50):  # the limit's slots come back once the cancellations reach the server
                try:
                    malformed(b"\x0a\x02\xff\xfe", timeout=10)  # session_id: invalid UTF-8
                except grpc.RpcError as err:
                    if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        time.sleep(0.1)
                        continue
                    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
                    break
        time.sleep(0.5)  # the cancelled calls' handlers finish on the server
        samples = scrape(srv.metrics_port)
        assert value(samples, "lstm_requests_total", method="Generate", code="CANCELLED") >= 3
        assert value(samples, "lstm_requests_total", method="Generate", code="DEADLINE_EXCEEDED") == 1
        assert value(samples, "lstm_requests_total", method="Generate", code="OK") == 0
        assert value(samples, "lstm_requests_total", method="GetModelInfo", code="RESOURCE_EXHAUSTED") == 1
        assert value(samples, "lstm_requests_total", method="Step", code="INVALID_ARGUMENT") == 1
        # Refused before they ran: counted, but no duration observed.
        assert value(samples, "lstm_request_duration_seconds_count", method="GetModelInfo") == 0
