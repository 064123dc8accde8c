"""The lstm-serve command as a real process: start, health, SIGTERM drain, refusing bad checkpoints."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from service import GRPC_EXPERIMENTS
from service.config import parse_config
from tests.conftest import ROOT

SERVER = [sys.executable, "-m", "service.server"]


def start(
    checkpoint: Path, tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, int]:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [*SERVER, "--checkpoint", str(checkpoint), "--port", "0", "--port-file", str(port_file),
         "--metrics-port", "0", "--state-dir", str(tmp_path / "state"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("server did not start in 60 s")
        time.sleep(0.05)
    return proc, int(port_file.read_text())


def test_sigterm_finishes_in_flight_work_and_exits_zero(tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc, port = start(tiny_checkpoint, tmp_path, "--grace-seconds", "20", "--log-format", "json")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            # The command runs on uvloop: a pipelined stream is answered in order there too.
            answers = list(stub.StreamSteps(iter([pb.StepRequest(session_id=sid, tokens=[t]) for t in range(1, 9)])))
            assert [a.position for a in answers] == list(range(1, 9))
            tokens: list[pb.GenerateResponse] = []
            call = stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=2000, seed=1))
            reader = threading.Thread(target=lambda: tokens.extend(call), daemon=True)
            reader.start()
            while len(tokens) < 5:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            reader.join(timeout=60)
            assert not reader.is_alive()
            # The in-flight generation ran to its end during the drain.
            assert len(tokens) == 2000 and tokens[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(timeout=30) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert '"msg": "stopped"' in out or "stopped" in out
        assert "event loop uvloop" in out
        assert f"GRPC_EXPERIMENTS={GRPC_EXPERIMENTS}" in out  # the socket layer of service/__init__.py
    finally:
        if proc.poll() is None:
            proc.kill()


def test_new_work_is_refused_while_draining(tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc, port = start(tiny_checkpoint, tmp_path, "--grace-seconds", "5")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            call = stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=4000, seed=1))
            next(call)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            codes = set()
            while time.monotonic() < deadline:
                try:
                    stub.CreateSession(pb.CreateSessionRequest(), timeout=2)
                except grpc.RpcError as e:
                    codes.add(e.code())
                    break
                time.sleep(0.02)
            assert grpc.StatusCode.UNAVAILABLE in codes
            call.cancel()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"x" * 100), "does not match"),
        (lambda d: (d / "model.json").unlink(), "model.json: missing"),
        (lambda d: (d / "model.json").write_text("{not json"), "not valid JSON"),
    ],
)
def test_refuses_to_start_on_a_bad_checkpoint(tiny_checkpoint: Path, tmp_path: Path, damage, needle) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, bad)
    damage(bad)
    proc = subprocess.run(
        [*SERVER, "--checkpoint", str(bad), "--port", "0", "--metrics-port", "-1", "--durability", "none"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr and str(bad) in proc.stderr


def test_every_option_has_an_environment_variable() -> None:
    env = {"LSTM_SERVE_PORT": "6000", "LSTM_SERVE_MAX_SESSIONS": "7", "LSTM_SERVE_DEVICE": "cpu"}
    config = parse_config([], environ=env)
    assert (config.port, config.max_sessions, config.device) == (6000, 7, "cpu")
    # The flag wins over the environment.
    assert parse_config(["--port", "7000"], environ=env).port == 7000
    with pytest.raises(SystemExit):
        parse_config(["--max-sessions", "0"], environ={})


@pytest.mark.parametrize("preset", [None, "", "-event_engine_client"])
def test_grpc_socket_layer_is_chosen_before_grpc_loads(preset: str | None) -> None:
    """gRPC reads GRPC_EXPERIMENTS once, when first imported: importing the service package sets
    it (service/__init__.py) without importing grpc, and a value the operator set wins."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if preset is not None:
        env["GRPC_EXPERIMENTS"] = preset
    code = ("import os, sys, service; loaded = 'grpc' in sys.modules; import service.server; "
            "print(repr((loaded, os.environ['GRPC_EXPERIMENTS'])))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    assert out == repr((False, GRPC_EXPERIMENTS if preset is None else preset))
