"""Bad input gets a clear status; limits answer RESOURCE_EXHAUSTED; other sessions stay intact."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from tests.conftest import RunningServer, run_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stub(server: RunningServer):
    channel = grpc.insecure_channel(server.target)
    yield pb_grpc.LstmServiceStub(channel)
    channel.close()


def status_of(fn, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        result = fn(request)
        if not isinstance(result, pb.StepResponse | pb.CreateSessionResponse):
            list(result)  # drain a stream
    return err.value.code(), err.value.details()


def new_session(stub) -> str:
    return stub.CreateSession(pb.CreateSessionRequest()).session.session_id


def test_unknown_session_is_not_found_everywhere(stub) -> None:
    ghost = "A" * 22
    for fn, request in [
        (stub.GetSession, pb.GetSessionRequest(session_id=ghost)),
        (stub.DeleteSession, pb.DeleteSessionRequest(session_id=ghost)),
        (stub.ResetSession, pb.ResetSessionRequest(session_id=ghost)),
        (stub.ForkSession, pb.ForkSessionRequest(session_id=ghost)),
        (stub.Step, pb.StepRequest(session_id=ghost, text="a")),
    ]:
        code, details = status_of(fn, request)
        assert code == grpc.StatusCode.NOT_FOUND, (fn, details)
        assert "not found" in details and ghost not in details  # never echo a full id
    code, _ = status_of(lambda r: stub.Generate(r), pb.GenerateRequest(session_id=ghost, max_tokens=3))
    assert code == grpc.StatusCode.NOT_FOUND


def test_deleted_session_is_gone(stub) -> None:
    sid = new_session(stub)
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    code, _ = status_of(stub.GetSession, pb.GetSessionRequest(session_id=sid))
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_kwargs", "needle"),
    [
        ({"tokens": [0, 65]}, "tokens[1] = 65 is out of range"),
        ({"tokens": [-1]}, "tokens[0] = -1"),
        ({"text": "hello\u00e9"}, "'é' (U+00E9) at position 5"),
        ({}, "input is empty"),
        ({"text": "ab", "tokens": [1]}, "exactly one of tokens and text"),
        ({"text": "a", "top_k": 66}, "top_k must be between 0 and 65"),
        ({"text": "a", "top_k": -1}, "top_k"),
        ({"tokens": [1] * 5000}, "at most 4096 per request"),
        ({"text": "x" * 5000}, "at most 4096 per request"),
    ],
)
def test_step_invalid_arguments_name_the_field_and_value(stub, request_kwargs, needle) -> None:
    sid = new_session(stub)
    code, details = status_of(stub.Step, pb.StepRequest(session_id=sid, **request_kwargs))
    assert code == INVALID, details
    assert needle in details
    # Nothing was applied.
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position == 0


@pytest.mark.parametrize(
    ("request_kwargs", "needle"),
    [
        ({"max_tokens": 0}, "max_tokens must be between 1"),
        ({"max_tokens": 10**6}, "max_tokens must be between 1"),
        ({"max_tokens": 5, "temperature": math.nan}, "temperature"),
        ({"max_tokens": 5, "temperature": math.inf}, "temperature"),
        ({"max_tokens": 5, "temperature": -1}, "temperature"),
        ({"max_tokens": 5, "top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"max_tokens": 5, "top_p": 1.5}, "top_p"),
        ({"max_tokens": 5, "top_k": 1000}, "top_k"),
        ({"max_tokens": 5, "stop": [""]}, "stop"),
        ({"max_tokens": 5, "prompt_text": "a", "prompt_tokens": [1]}, "exactly one of prompt_tokens and prompt_text"),
        ({"max_tokens": 5, "prompt_text": "\u2603"}, "prompt_text"),
    ],
)
def test_generate_invalid_arguments(stub, request_kwargs, needle) -> None:
    sid = new_session(stub)
    code, details = status_of(lambda r: stub.Generate(r), pb.GenerateRequest(session_id=sid, **request_kwargs))
    assert code == INVALID, details
    assert needle in details


def test_session_ids_proposed_and_generated(stub) -> None:
    generated = new_session(stub)
    assert len(generated) >= 22  # 16 random bytes in base64url
    proposed = "client-chosen-id_0123456789abcdef"
    assert stub.CreateSession(pb.CreateSessionRequest(session_id=proposed)).session.session_id == proposed
    code, _ = status_of(stub.CreateSession, pb.CreateSessionRequest(session_id=proposed))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, details = status_of(stub.CreateSession, pb.CreateSessionRequest(session_id="short"))
    assert code == INVALID and "session_id" in details
    code, details = status_of(stub.CreateSession, pb.CreateSessionRequest(session_id="bad/chars" * 4))
    assert code == INVALID
    code, details = status_of(stub.CreateSession, pb.CreateSessionRequest(ttl_seconds=0))
    assert code == INVALID and "ttl_seconds" in details
    session = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=60)).session
    assert session.ttl_seconds == 60
    assert 59 <= session.expire_time.seconds - session.create_time.seconds <= 61


def test_a_failing_request_never_touches_another_session(stub, server: RunningServer) -> None:
    good = new_session(stub)
    first = stub.Step(pb.StepRequest(session_id=good, text="Good morrow", return_logprobs=True))
    victim = new_session(stub)
    status_of(stub.Step, pb.StepRequest(session_id=victim, tokens=[1, 2, 999]))
    status_of(stub.Step, pb.StepRequest(session_id=victim, text="\x00"))
    again = stub.ForkSession(pb.ForkSessionRequest(session_id=good)).session.session_id
    a = stub.Step(pb.StepRequest(session_id=good, text=", cousin", return_logprobs=True))
    b = stub.Step(pb.StepRequest(session_id=again, text=", cousin", return_logprobs=True))
    assert first.position == 11 and a.position == b.position == 19
    assert np.array_equal([o.logprobs for o in a.outputs], [o.logprobs for o in b.outputs])


def test_max_sessions_is_resource_exhausted_with_retry_hint(tiny_checkpoint: Path) -> None:
    with run_server(tiny_checkpoint, max_sessions=3) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        ids = [new_session(stub) for _ in range(3)]
        with pytest.raises(grpc.RpcError) as err:
            new_session(stub)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum of 3 sessions" in err.value.details()
        assert any(k == "retry-after-ms" for k, _ in err.value.trailing_metadata())
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=ids[0]))
        assert new_session(stub)  # room again


def test_sessions_expire_after_their_ttl(tiny_checkpoint: Path) -> None:
    import time

    with run_server(tiny_checkpoint) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        short = stub.CreateSession(pb.CreateSessionRequest(ttl_seconds=1)).session.session_id
        long = new_session(stub)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and srv.engine.session_count > 1:
            time.sleep(0.2)
        code, _ = status_of(stub.GetSession, pb.GetSessionRequest(session_id=short))
        assert code == grpc.StatusCode.NOT_FOUND
        assert stub.GetSession(pb.GetSessionRequest(session_id=long)).session.position == 0


def test_health_and_reflection(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lstmserve.v1.LstmService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in responses[0].list_services_response.service}
        assert {"lstmserve.v1.LstmService", "grpc.health.v1.Health"} <= names


def test_model_info(stub, server: RunningServer) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    ckpt = server.engine.checkpoint
    assert list(info.vocab) == ckpt.tokenizer.vocab and len(info.vocab) == 65
    assert info.cell_type == pb.CELL_TYPE_LSTM
    assert (info.num_layers, info.hidden_size, info.embedding_size) == (2, 32, 16)
    assert info.checkpoint_sha256 == ckpt.sha256 and len(info.checkpoint_sha256) == 64
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.limits.max_tokens_per_request == 4096 and info.limits.max_sessions > 0
