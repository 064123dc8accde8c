"""lstm-serve against TorchServe's stateful sequence batching, side by side on one machine.

The issue's reference point: TorchServe 0.12 serving the same LSTM with sequence batching
(one worker, gRPC `StreamPredictions2`, a stream per sequence). This module starts TorchServe
from a virtual environment that has it (`make bench-torchserve` makes one; TorchServe's frontend
needs Java 17), serving `handler.py`, drives it with the same closed loop as `lstm-bench load`
(the load generator's Recorder, the same token source and statistics), and then runs lstm-serve
on the same cells, so that the figures are measured in one run on the same cores.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.loadgen import BenchError, Recorder, TokenSource, token_pool
from bench.spawn import pid_cpu_seconds
from bench.stats import summarize_ms
from model.checkpoint import read_meta

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MODEL_NAME = "lstm"


@dataclass
class TorchServeConfig:
    venv: Path  # a virtual environment with torchserve, torch-model-archiver, torch, safetensors, numpy
    checkpoint: Path  # the lstm-serve checkpoint directory the handler loads
    batch_size: int = 256  # TorchServe's batchSize: sequences per handler call at most
    max_batch_delay_ms: int = 100  # maxBatchDelay: how long the frontend waits to fill a batch
    max_sequences: int = 4096  # maxNumSequence: sequences open at once
    threads: int = 2  # torch threads in the worker (lstm-serve's default on 2 cores)
    start_timeout: float = 180.0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TorchServe:
    """One TorchServe process tree (Java frontend, one Python worker) on free loopback ports."""

    def __init__(self, config: TorchServeConfig) -> None:
        self.config = config
        self._tmp = tempfile.TemporaryDirectory(prefix="lstm-bench-torchserve-")
        self.dir = Path(self._tmp.name)
        self.inference_port, self.management_port, self.metrics_port, self.grpc_port, self.grpc_management_port = (
            _free_ports(5)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _bin(self, name: str) -> str:
        path = self.config.venv / "bin" / name
        if not path.exists():
            raise BenchError(f"{path} not found: make a TorchServe environment first (make bench-torchserve)")
        return str(path)

    def _write_model(self) -> None:
        cfg = self.config
        (self.dir / "model-config.yaml").write_text(
            "minWorkers: 1\nmaxWorkers: 1\n"
            f"batchSize: {cfg.batch_size}\nmaxBatchDelay: {cfg.max_batch_delay_ms}\n"
            f"sequenceBatching: true\nmaxNumSequence: {cfg.max_sequences}\n"
            "sequenceMaxIdleMSec: 60000\nmaxSequenceJobQueueSize: 16\n"
            "handler:\n"
            f"  repo: {json.dumps(str(ROOT))}\n  checkpoint: {json.dumps(str(cfg.checkpoint))}\n"
            f"  threads: {cfg.threads}\n  capacity: {cfg.max_sequences}\n"
        )
        (self.dir / "store").mkdir()
        subprocess.run(
            [self._bin("torch-model-archiver"), "--model-name", MODEL_NAME, "--version", "1.0",
             "--handler", str(HERE / "handler.py"), "--config-file", str(self.dir / "model-config.yaml"),
             "--export-path", str(self.dir / "store"), "--force"],
            check=True, capture_output=True,
        )
        (self.dir / "config.properties").write_text(
            f"inference_address=http://127.0.0.1:{self.inference_port}\n"
            f"management_address=http://127.0.0.1:{self.management_port}\n"
            f"metrics_address=http://127.0.0.1:{self.metrics_port}\n"
            "grpc_inference_address=127.0.0.1\ngrpc_management_address=127.0.0.1\n"
            f"grpc_inference_port={self.grpc_port}\ngrpc_management_port={self.grpc_management_port}\n"
            "disable_token_authorization=true\ndefault_workers_per_model=1\njob_queue_size=4096\n"
            f"model_store={self.dir / 'store'}\nload_models={MODEL_NAME}.mar\n"
        )

    def start(self) -> TorchServe:
        self._write_model()
        # TMPDIR: TorchServe keeps one pid file in the temporary directory and refuses to start
        # while the process it names lives; one directory per instance keeps them apart.
        env = dict(os.environ, LOG_LOCATION=str(self.dir / "logs"), METRICS_LOCATION=str(self.dir / "logs"),
                   TMPDIR=str(self.dir), PATH=f"{self.config.venv / 'bin'}:{os.environ.get('PATH', '')}")
        with open(self.dir / "torchserve.log", "wb") as log:
            self.proc = subprocess.Popen(
                [self._bin("torchserve"), "--start", "--foreground", "--ncs", "--disable-token-auth",
                 "--ts-config", str(self.dir / "config.properties"), "--model-store", str(self.dir / "store")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.dir,
                start_new_session=True,  # its own process group: stop() ends the frontend and its worker
            )
        deadline = time.monotonic() + self.config.start_timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise BenchError(f"TorchServe did not get a READY worker:\n{tail}")
            time.sleep(0.5)
        return self

    def _ready(self) -> bool:
        url = f"http://127.0.0.1:{self.management_port}/models/{MODEL_NAME}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                models = json.loads(r.read())
        except (OSError, ValueError):
            return False
        return any(w.get("status") == "READY" for m in models for w in m.get("workers", []))

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.dir / "torchserve.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _group(self) -> list[int]:
        """The live processes of TorchServe's process group (the launcher, the Java frontend, the worker)."""
        assert self.proc is not None
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":  # (a zombie is gone but for its parent)
                found.append(int(stat.parent.name))
        return found

    def cpu_seconds(self) -> float:
        """CPU time of the frontend and its worker so far."""
        total = 0.0
        for pid in self._group():
            try:
                total += pid_cpu_seconds(pid)
            except OSError:  # (exited since)
                pass
        return total

    def stop(self) -> None:
        if self.proc is None:
            return
        deadline = time.monotonic() + 30
        sig = signal.SIGTERM
        while self._group():  # the launcher, the Java frontend and the Python worker
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(0.2)
            self.proc.poll()  # (reaps the launcher, this process's child)
            if time.monotonic() > deadline:
                sig = signal.SIGKILL
        self.proc.wait(timeout=10)

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()


def _stubs() -> tuple[Any, Any]:
    """inference.proto's messages and stub, generated on first use (grpcio-tools, a dev dependency)."""
    proto = HERE / "inference.proto"
    digest = hashlib.sha256(proto.read_bytes()).hexdigest()[:12]  # (stubs of an older proto are not reused)
    out = Path(tempfile.gettempdir()) / f"lstm-bench-torchserve-stubs-{digest}"
    if not (out / "inference_pb2_grpc.py").exists():
        from grpc_tools import protoc

        out.mkdir(parents=True, exist_ok=True)
        if protoc.main(["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}",
                        str(proto)]) != 0:
            raise BenchError("protoc failed on bench/torchserve/inference.proto")
    sys.path.insert(0, str(out))
    import inference_pb2 as pb  # type: ignore[import-not-found]
    import inference_pb2_grpc as pb_grpc  # type: ignore[import-not-found]

    return pb, pb_grpc


@dataclass
class SequenceLoad:
    target: str  # HOST:PORT of TorchServe's gRPC inference API
    vocab_size: int
    sessions: int = 256
    chunk: int = 1
    duration: float = 10.0
    warmup: float = 3.0
    seed: int = 0
    drain_timeout: float = 30.0
    sequence_prefix: str = field(default_factory=lambda: f"bench-{os.getpid()}-{time.monotonic_ns()}-")


async def _sequence(stub: Any, pb: Any, sid: str, src: TokenSource, load: SequenceLoad, rec: Recorder,
                    deadline: float) -> None:
    call = stub.StreamPredictions2()
    try:
        while True:
            t0 = time.perf_counter()
            measured = rec.send(t0, deadline)
            if measured is None:
                break
            body = json.dumps(src.next(load.chunk)).encode()
            await call.write(pb.PredictionsRequest(model_name=MODEL_NAME, input={"data": body}, sequenceId=sid))
            resp = await call.read()
            if resp is grpc.aio.EOF:
                rec.error("EOF", measured)
                return
            if resp.HasField("status") and resp.status.code != 0:
                rec.error(f"status {resp.status.code}", measured)
                continue
            n = len(json.loads(resp.prediction)["top_tokens"])
            rec.ok(t0, time.perf_counter(), n, measured)
    except grpc.aio.AioRpcError as e:
        rec.error(e.code().name, True)
    finally:
        call.cancel()


async def run_sequence_load(load: SequenceLoad) -> dict[str, Any]:
    """The closed loop of `lstm-bench load` (a stream per session, the next chunk when the answer
    arrives) against TorchServe's StreamPredictions2."""
    pb, pb_grpc = _stubs()
    rng = random.Random(load.seed)
    pool = token_pool("random", [""] * load.vocab_size, load.seed)
    async with grpc.aio.insecure_channel(load.target) as channel:
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        start = time.perf_counter()
        cpu0 = time.process_time()
        warm_end = start + load.warmup
        deadline = warm_end + load.duration
        rec = Recorder(warm_end, 0, deadline)
        sessions = [asyncio.ensure_future(_sequence(stub, pb, f"{load.sequence_prefix}{i}",
                                                    TokenSource(pool, rng.randrange(len(pool))), load, rec, deadline))
                    for i in range(load.sessions)]
        _, unanswered = await asyncio.wait(sessions, timeout=deadline - start + load.drain_timeout)
        for task in unanswered:  # a request still unanswered drain_timeout after the window
            rec.error("DRAIN_TIMEOUT", True)
            task.cancel()
        await asyncio.gather(*sessions, return_exceptions=True)
        end = time.perf_counter()
        cpu = time.process_time() - cpu0
    _, tokens_per_s, requests_per_s = rec.rates()
    return {
        "sessions": load.sessions,
        "chunk": load.chunk,
        "tokens_per_s": tokens_per_s,
        "requests_per_s": requests_per_s,
        "requests": rec.requests,
        "latency_ms": summarize_ms(rec.latencies),
        "errors": dict(sorted(rec.errors.items())),
        "error_count": sum(rec.errors.values()),
        "client_cpu_pct": 100.0 * cpu / max(end - start, 1e-9),
    }


def vocab_size(checkpoint: Path) -> int:
    return len(read_meta(checkpoint)["vocab"])


@dataclass
class ComparisonConfig:
    venv: Path  # the TorchServe environment (make bench-torchserve)
    checkpoint: Path  # the model both servers load
    model_label: str = "reference"
    sessions: list[int] = field(default_factory=lambda: [256])
    chunk: int = 1
    batch_sizes: list[int] = field(default_factory=lambda: [64, 256])  # TorchServe batchSize values
    max_batch_delay_ms: int = 100
    duration: float = 10.0
    warmup: float = 3.0
    rounds: int = 2  # every server and cell once per round, in turn (these VMs drift over minutes)


def _lstm_serve_cell(target: str, pid: int, n: int, cfg: ComparisonConfig, transport: str) -> dict[str, Any]:
    from bench.loadgen import LoadSpec, run_load
    from service import eventloop

    t0, cpu0 = time.perf_counter(), pid_cpu_seconds(pid)
    r = eventloop.run(run_load(LoadSpec(target=target, sessions=n, chunk=cfg.chunk, duration=cfg.duration,
                                        warmup=cfg.warmup, transport=transport)))
    r["server_cpu_pct"] = 100.0 * (pid_cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
    return r


def run_comparison(cfg: ComparisonConfig) -> dict[str, Any]:
    from bench.report import machine_info
    from bench.spawn import SpawnedServer

    machine = machine_info()  # (before the load: its load average says how quiet the machine was)
    size = vocab_size(cfg.checkpoint)
    cells: list[dict[str, Any]] = []

    def log(r: dict[str, Any]) -> None:
        p99 = (r["latency_ms"] or {}).get("p99", 0.0)
        print(f"[lstm-bench torchserve] round {r['round']} {r['server']} N={r['sessions']}: "
              f"{r['tokens_per_s']:,.0f} tokens/s, p99 {p99:.1f} ms, errors {r['error_count']}", file=sys.stderr)

    for round_ in range(1, cfg.rounds + 1):
        for batch in cfg.batch_sizes:
            ts_cfg = TorchServeConfig(venv=cfg.venv, checkpoint=cfg.checkpoint, batch_size=batch,
                                      max_batch_delay_ms=cfg.max_batch_delay_ms)
            for n in cfg.sessions:
                with TorchServe(ts_cfg) as ts:  # (a fresh one per cell: no sequences left open by the last)
                    t0, cpu0 = time.perf_counter(), ts.cpu_seconds()
                    r = asyncio.run(run_sequence_load(SequenceLoad(
                        target=ts.target, vocab_size=size, sessions=n, chunk=cfg.chunk, duration=cfg.duration,
                        warmup=cfg.warmup)))
                    r["server_cpu_pct"] = 100.0 * (ts.cpu_seconds() - cpu0) / (time.perf_counter() - t0)
                    r.update(server=f"TorchServe 0.12, batchSize {batch}", round=round_)
                    cells.append(r)
                    log(r)
        with SpawnedServer(cfg.checkpoint) as server:
            for n in cfg.sessions:
                for transport, label in (("streams", "lstm-serve, StreamSteps"),
                                         ("batched", "lstm-serve, StreamStepBatches")):
                    r = _lstm_serve_cell(server.target, server.pid, n, cfg, transport)
                    r.update(server=label, round=round_)
                    cells.append(r)
                    log(r)
    return {"machine": machine, "config": {**cfg.__dict__, "venv": str(cfg.venv),
                                                   "checkpoint": str(cfg.checkpoint)}, "cells": cells}


def render_comparison(result: dict[str, Any]) -> str:
    from bench.report import fmt, table

    m, cfg = result["machine"], result["config"]
    rows = []
    for c in result["cells"]:
        lat = c["latency_ms"] or {}
        rows.append([c["round"], c["server"], c["sessions"], c["chunk"], c["tokens_per_s"], lat.get("p50"),
                     lat.get("p99"), lat.get("max"), c["server_cpu_pct"], c["client_cpu_pct"], c["error_count"]])
    best_ts: dict[int, dict[str, Any]] = {}  # sessions -> TorchServe's best cell at that concurrency
    for c in result["cells"]:
        if c["server"].startswith("TorchServe") and c["tokens_per_s"] > best_ts.get(c["sessions"], {}).get(
                "tokens_per_s", 0.0):
            best_ts[c["sessions"]] = c
    lines = [
        "# lstm-serve against TorchServe's stateful sequence batching", "",
        f"Generated by `lstm-bench torchserve` (`make bench-torchserve`) on {m['date']}. Machine: {m['cpu']}, "
        f"{m['cores']} cores ({', '.join(m['simd'])}), torch {m['torch']}, grpcio {m['grpcio']}, "
        f"Python {m['python']}; 1-minute load average at the start {fmt(m['loadavg_1m'], 2)}.", "",
        "Both servers serve the same checkpoint "
        f"(`{cfg['model_label']}`) on the same cores as the load generator, one after the other, "
        f"{cfg['rounds']} round(s), {fmt(cfg['duration'])} s measured after {fmt(cfg['warmup'])} s of warm-up "
        "per cell. The load is `lstm-bench load`'s closed loop: each session sends its next chunk of "
        f"{cfg['chunk']} random token(s) when the previous answer arrives, and gets top-5 next tokens with "
        "their log-probabilities per token.", "",
        "- **TorchServe 0.12** with sequence batching (`sequenceBatching: true`, one worker, "
        f"`maxBatchDelay` {cfg['max_batch_delay_ms']} ms, `batchSize` as listed), gRPC `StreamPredictions2` "
        "with a stream and a sequence id per session; the handler (`bench/torchserve/handler.py`) keeps "
        "each sequence's state in slabs as lstm-serve's runner does and runs the same model call, so the "
        "figures compare the serving stacks, not the models.",
        "- **lstm-serve** at its defaults: `StreamSteps` with a stream per session, and the same sessions "
        "sharing one `StreamStepBatches` stream.", "",
        table(["round", "server", "N", "chunk", "tokens/s", "p50 ms", "p99 ms", "max ms", "server CPU %",
               "client CPU %", "errors"], rows), "",
    ]
    if best_ts:
        lines += ["Each lstm-serve cell against TorchServe's best cell at the same concurrency (tokens/s; p99):", ""]
        for c in result["cells"]:
            best = best_ts.get(c["sessions"])
            if c["server"].startswith("TorchServe") or best is None:
                continue
            p99, best_p99 = (c["latency_ms"] or {}).get("p99"), (best["latency_ms"] or {}).get("p99")
            lines.append(f"- round {c['round']}, {c['server']}, N={c['sessions']}: "
                         f"{c['tokens_per_s'] / best['tokens_per_s']:.2f}x the tokens/s of {best['server']} "
                         f"({fmt(best['tokens_per_s'], 0)}); p99 {fmt(p99)} against {fmt(best_p99)} ms")
        lines.append("")
    return "\n".join(lines)
