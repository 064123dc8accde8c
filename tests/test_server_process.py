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

from service import GOMP_SPINCOUNT, GRPC_EXPERIMENTS, OMP_PLACES, OMP_PROC_BIND
from service.config import parse_config
from tests.conftest import ROOT, make_checkpoint

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


@pytest.mark.parametrize(
    ("variable", "default", "library", "preset"),
    [
        ("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS, "grpc", None),
        ("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS, "grpc", ""),
        ("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS, "grpc", "-event_engine_client"),
        ("GOMP_SPINCOUNT", GOMP_SPINCOUNT, "torch", None),
        ("GOMP_SPINCOUNT", GOMP_SPINCOUNT, "torch", "300000"),
        ("OMP_PROC_BIND", OMP_PROC_BIND, "torch", None),
        ("OMP_PROC_BIND", OMP_PROC_BIND, "torch", "false"),
        ("OMP_PLACES", OMP_PLACES, "torch", None),
        ("OMP_PLACES", OMP_PLACES, "torch", "threads"),
    ],
)
def test_library_settings_are_chosen_before_the_library_loads(
    variable: str, default: str, library: str, preset: str | None
) -> None:
    """gRPC reads GRPC_EXPERIMENTS once, when first imported, and libgomp its variables once, when
    torch is: importing the service package sets them first (service/__init__.py), and a value the
    operator set wins. The OpenMP binding is not passed on to child processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")}
    if preset is not None:
        env[variable] = preset
    # An import hook notes the variable as the library's first import sees it.
    code = f"""
import os, sys
seen = []
class Note:
    def find_spec(self, name, path=None, target=None):
        if name == {library!r} and not seen:
            seen.append(os.environ.get({variable!r}))
sys.meta_path.insert(0, Note())
import service.server
print(repr((seen, os.environ.get({variable!r}))))
"""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    expected = default if preset is None else preset
    left = expected if variable not in ("OMP_PROC_BIND", "OMP_PLACES") else preset
    assert out == repr(([expected], left))


def test_model_threads_are_bound_one_per_core_and_the_rest_run_anywhere(tmp_path: Path) -> None:
    """The engine thread and its OpenMP worker each run on one core of their own (the worker was woken
    on the engine thread's core while the other idled); every other thread, the event loop's first,
    keeps all the process's CPUs: the state store's writer too, which the engine thread starts after
    its warm-up bound it (the writer inherited the engine's core). Hidden 512, so that the warm-up
    runs in parallel as a served model's does. Run on two CPUs (CI's machine has two)."""
    checkpoint = make_checkpoint(tmp_path / "ckpt", hidden=512)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    assert len(cpus) == 2, "this test needs a machine with two CPUs"
    code = """
import asyncio, dataclasses, os, sys, threading
from service.config import ServerConfig
from service.server import create_server
import torch

def parallel_work():  # (the tiny model's ops are too small to run in parallel)
    torch.randn(512, 512) @ torch.randn(512, 512)
    return threading.get_native_id()

def affinities():
    return {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}

async def main():
    config = dataclasses.replace(ServerConfig(), checkpoint=sys.argv[1], host="127.0.0.1", port=0,
                                 metrics_port=-1, durability="snapshot", state_dir=sys.argv[2], threads=2)
    server, _ = await create_server(config)
    await server.start()
    engine = await server.engine._on_engine(parallel_work)
    store = server.engine.store._thread.submit(threading.get_native_id).result()
    print(repr((engine, threading.get_native_id(), store, affinities())))
    await server.stop(grace=0)

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")}
    out = subprocess.run(["taskset", "-c", ",".join(map(str, cpus)), sys.executable, "-c", code,
                          str(checkpoint), str(tmp_path / "state")], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120).stdout.strip()
    engine, loop, store, affinity = eval(out)  # (a repr of ints, lists and a dict)
    assert affinity[engine] == [cpus[0]]
    assert affinity[loop] == cpus
    assert store != engine and affinity[store] == cpus
    bound = sorted(c for tid, c in affinity.items() if tid != engine and c != cpus)
    assert bound == [[cpus[1]]]  # the one OpenMP worker


def test_only_the_engine_thread_runs_torch_on_several_threads(tiny_checkpoint: Path) -> None:
    """One OpenMP pool per process (service.runner.claim_torch_threads): the thread that builds the
    server loads the checkpoint on one torch thread, the engine thread warms up and steps on --threads."""
    code = """
import asyncio, dataclasses, sys, threading, torch
from service.config import ServerConfig
from service.server import create_server

async def main():
    config = dataclasses.replace(ServerConfig(), checkpoint=sys.argv[1], host="127.0.0.1", port=0,
                                 metrics_port=-1, durability="none", threads=2)
    server, _ = await create_server(config)
    await server.start()
    on_engine = await server.engine._on_engine(lambda: (threading.current_thread().name, torch.get_num_threads()))
    print(repr((torch.get_num_threads(), on_engine, server.engine.steps_run)))
    await server.stop(grace=0)

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint)], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120).stdout.strip()
    assert out == repr((1, ("lstm-engine", 2), 0))


def _stopped_by(proc: subprocess.Popen, *signals: int, apart: float = 0.5) -> float:
    """Send the signals (`apart` seconds apart) and wait for exit status 0: seconds from the first."""
    sent = time.monotonic()
    for i, sig in enumerate(signals):
        if i:
            time.sleep(apart)
        proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    return time.monotonic() - sent


def _generating(channel: grpc.Channel) -> tuple[str, list[pb.GenerateResponse], list]:
    """A new session and a long Generate on it read in a thread: (session id, tokens received,
    [its final status code]), once the first tokens are in."""
    stub = pb_grpc.LstmServiceStub(channel)
    sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
    tokens: list[pb.GenerateResponse] = []
    ended: list = []
    call = stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=100_000, seed=1))

    def read() -> None:
        try:
            tokens.extend(call)
            ended.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            ended.append(e.code())

    threading.Thread(target=read, daemon=True).start()
    while len(tokens) < 5:
        time.sleep(0.01)
    return sid, tokens, ended


def test_shutdown_takes_one_grace_period_in_all(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Work still running when --grace-seconds is up is cut off then, not after a second grace
    period (gRPC's own stop used to get the whole period again)."""
    proc, port = start(tiny_checkpoint, tmp_path, "--grace-seconds", "3", "--max-generate-tokens", "100000")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _, tokens, ended = _generating(channel)
            took = _stopped_by(proc, signal.SIGTERM)
            assert ended and ended[0] != grpc.StatusCode.OK and len(tokens) < 100_000
        assert took < 5.5, f"exit {took:.1f} s after SIGTERM with --grace-seconds 3"  # was 6+
    finally:
        if proc.poll() is None:
            proc.kill()


def test_idle_streams_do_not_hold_shutdown(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """With no work in flight, an open health Watch and a StreamSteps between requests end at
    once instead of keeping the process for the whole grace period."""
    proc, port = start(tiny_checkpoint, tmp_path, "--grace-seconds", "20")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.LstmServiceStub(channel)
            sid = stub.CreateSession(pb.CreateSessionRequest()).session.session_id
            requests = [pb.StepRequest(session_id=sid, tokens=[1])]
            more = threading.Event()

            def inputs():  # one request, then nothing until the test ends
                yield from requests
                more.wait(60)

            stream = stub.StreamSteps(inputs())
            assert next(stream).position == 1
            took = _stopped_by(proc, signal.SIGTERM)
            more.set()
        assert took < 10, f"exit {took:.1f} s after SIGTERM with --grace-seconds 20"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_second_signal_stops_at_once_and_still_stores_the_sessions(tiny_checkpoint: Path, tmp_path: Path) -> None:
    proc, port = start(tiny_checkpoint, tmp_path, "--grace-seconds", "60", "--max-generate-tokens", "100000",
                       "--snapshot-interval-seconds", "3600")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            sid, tokens, ended = _generating(channel)
            took = _stopped_by(proc, signal.SIGTERM, signal.SIGINT)
            received = tokens[-1].position
        out = proc.stdout.read() if proc.stdout else ""
        assert "second signal: stopping now" in out
        assert took < 30, f"exit {took:.1f} s after the first signal with --grace-seconds 60"
    finally:
        if proc.poll() is None:
            proc.kill()
    (tmp_path / "port").unlink()
    proc, port = start(tiny_checkpoint, tmp_path)  # the same state directory
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            # Everything the client received was applied and stored (and what was sampled past it).
            assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position >= received
    finally:
        proc.kill()


def test_a_resident_limit_without_a_store_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """With --durability none there is nowhere to evict to: the bound would be silently ignored."""
    with pytest.raises(SystemExit):
        parse_config(["--durability", "none", "--max-resident-sessions", "2"], environ={})
    assert "--max-resident-sessions needs a state store" in capsys.readouterr().err
    config = parse_config(["--durability", "snapshot", "--max-resident-sessions", "2"], environ={})
    assert config.max_resident_sessions == 2


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("port-in-use", "cannot listen on 127.0.0.1:{port}: the port is in use"),
        ("metrics-port-in-use", "cannot serve /metrics on 127.0.0.1:{port}"),
        ("port-file-dir-missing", "cannot write --port-file"),
        ("checkpoint-is-a-file", "is a file, not a checkpoint directory"),
        ("port-out-of-range", "--port must be between 0 and 65535, got 70000"),
        ("metrics-port-out-of-range", "--metrics-port must be between -1 (off) and 65535, got 99999"),
        ("negative-threads", "--threads must be >= 0"),
        ("negative-grace", "--grace-seconds must be >= 0"),
        ("durability-typo-in-env", "LSTM_SERVE_DURABILITY='jounral' must be one of none, snapshot, journal"),
        ("dtype-typo-in-env", "LSTM_SERVE_DTYPE='fp16' must be one of float32, bfloat16, float16"),
        ("queue-below-the-largest-request", "--max-queued-tokens 1000 is less than the largest request"),
        ("message-limit-below-the-largest-request", "--max-message-bytes 10 cannot carry a request"),
    ],
)
def test_common_startup_mistakes_are_one_line_and_exit_2(
    tiny_checkpoint: Path, tmp_path: Path, case: str, needle: str
) -> None:
    """What an operator gets wrong first: no traceback, one line that says what to change."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    args = ["--checkpoint", str(tiny_checkpoint), "--port", "0", "--metrics-port", "-1", "--durability", "none"]
    env: dict[str, str] = {}
    extra = {
        "port-in-use": ["--port", str(port)],
        "metrics-port-in-use": ["--metrics-port", str(port)],
        "port-file-dir-missing": ["--port-file", str(tmp_path / "no" / "such" / "dir" / "port")],
        "checkpoint-is-a-file": ["--checkpoint", str(ROOT / "README.md")],
        "port-out-of-range": ["--port", "70000"],
        "metrics-port-out-of-range": ["--metrics-port", "99999"],
        "negative-threads": ["--threads", "-1"],
        "negative-grace": ["--grace-seconds", "-1"],
        "queue-below-the-largest-request": ["--max-queued-tokens", "1000"],
        "message-limit-below-the-largest-request": ["--max-message-bytes", "10"],
    }.get(case, [])
    if case == "durability-typo-in-env":
        env["LSTM_SERVE_DURABILITY"] = "jounral"
        args.remove("--durability")
        args.remove("none")
    if case == "dtype-typo-in-env":
        env["LSTM_SERVE_DTYPE"] = "fp16"
    try:
        proc = subprocess.run([*SERVER, *args, *extra], capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, **env})
    finally:
        taken.close()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    assert needle.format(port=port) in output, output[-2000:]
    assert "Traceback" not in output, output[-2000:]


def test_the_startup_line_names_the_durability_and_grpc_writes_no_info_lines(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --log-format json every stderr line is a JSON object: gRPC's own INFO lines (a plaintext
    client at a TLS port logs one per handshake) are off unless GRPC_VERBOSITY says otherwise."""
    import json

    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)  # (this process's import of `service` set it)

    from tests.test_auth_tls import _ca, _leaf

    ca_key, ca_cert = _ca("test CA")
    cert, key = _leaf(ca_key, ca_cert, "lstm-serve", server=True)
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    proc, port = start(tiny_checkpoint, tmp_path, "--log-format", "json", "--tls-cert", str(tmp_path / "cert.pem"),
                       "--tls-key", str(tmp_path / "key.pem"), "--durability", "journal")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.RpcError):
                pb_grpc.LstmServiceStub(plain).GetModelInfo(pb.GetModelInfoRequest(), timeout=3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines = (proc.stdout.read() if proc.stdout else "").splitlines()
        records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
        assert any("durability journal in" in r["msg"] for r in records), lines
    finally:
        if proc.poll() is None:
            proc.kill()


def test_environment_values_are_checked_after_flags_and_spelled_as_logging_does(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ok = parse_config(["--durability", "journal"], environ={"LSTM_SERVE_DURABILITY": "jounral"})
    assert ok.durability == "journal"  # flag > environment: the typo is not used, so not an error
    assert parse_config([], environ={"LSTM_SERVE_LOG_LEVEL": "INFO"}).log_level == "info"
    assert parse_config([], environ={"LSTM_SERVE_DEVICE": "cuda:1"}).device == "cuda:1"
    assert parse_config(["--device", "cuda:0"], environ={}).device == "cuda:0"
    for environ in ({"LSTM_SERVE_DURABILITY": "jounral"}, {"LSTM_SERVE_DEVICE": "gpu"}):
        with pytest.raises(SystemExit):
            parse_config([], environ=environ)
    assert "LSTM_SERVE_DEVICE must be auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


def test_a_stop_never_leaves_a_request_half_applied(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """SIGTERM and at once a second signal while 8 streams pipeline 16-token requests that run in
    4-token chunks: every request that started is finished before the final write (a stop used to
    store positions inside requests, so a retry with expected_position got ABORTED)."""
    proc, port = start(tiny_checkpoint, tmp_path, "--durability", "journal", "--max-chunk-tokens", "4",
                       "--grace-seconds", "30")
    answered: dict[str, int] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            sids = [stub.CreateSession(pb.CreateSessionRequest()).session.session_id for _ in range(8)]

            def pipeline(sid: str) -> None:
                try:
                    for answer in stub.StreamSteps(iter([pb.StepRequest(session_id=sid, tokens=[2] * 16)] * 400)):
                        answered[sid] = answer.position
                except grpc.RpcError:
                    pass

            readers = [threading.Thread(target=pipeline, args=(sid,), daemon=True) for sid in sids]
            for reader in readers:
                reader.start()
            while sum(answered.values()) < 8 * 16 * 5:
                time.sleep(0.005)
            _stopped_by(proc, signal.SIGTERM, signal.SIGINT, apart=0.05)
            for reader in readers:
                reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (tmp_path / "port").unlink()
    proc, port = start(tiny_checkpoint, tmp_path, "--durability", "journal")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            stored = {sid: stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position for sid in sids}
        assert all(stored[sid] >= answered.get(sid, 0) for sid in sids), (stored, answered)  # nothing answered lost
        assert all(position % 16 == 0 for position in stored.values()), stored  # only whole requests
    finally:
        proc.kill()
