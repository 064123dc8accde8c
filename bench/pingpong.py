"""The RPC floor: lstm-serve's API with no model behind it.

    lstm-bench pingpong --sessions 256 --chunk 1

An echo server (`python -m bench.pingpong --port-file F`, a process of its own like lstm-serve)
answers the calls the load generator makes (GetModelInfo, CreateSession, DeleteSession,
StreamSteps) on the same stack as lstm-serve (grpc.aio, the event loop of service/eventloop.py,
StreamSteps on context.read()/write(), the same GC settings). Each StepRequest is answered at
once with a StepResponse of the served shape (one output per input token with top-5 tokens and
log-probs), filled in per request as lstm-serve fills it. The load generator runs unchanged
against it, so what it reaches is what Python gRPC alone allows here: the most any
served/offline ratio can get on this machine, and the share of lstm-serve's CPU per token that
is not gRPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from lstmserve_client.proto import lstm_service_pb2 as pb
from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

from bench.loadgen import LoadSpec, run_load
from bench.spawn import SpawnedServer, pid_cpu_seconds
from service import eventloop

VOCAB = [chr(c) for c in range(32, 97)]  # 65 one-character tokens, the reference model's vocabulary size
TOP_K = 5


class EchoServicer(pb_grpc.LstmServiceServicer):
    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(vocab=VOCAB, device="none (echo)", server_version="pingpong")

    async def CreateSession(self, request: Any, context: grpc.aio.ServicerContext) -> pb.CreateSessionResponse:
        return pb.CreateSessionResponse(session=pb.Session(session_id=secrets.token_urlsafe(16)))

    async def DeleteSession(self, request: Any, context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        return pb.DeleteSessionResponse()

    async def StreamSteps(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        top_tokens = list(range(TOP_K))
        top_logprobs = [-0.5 - i for i in range(TOP_K)]
        positions: dict[str, int] = {}
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                return
            position = positions.get(request.session_id, 0) + len(request.tokens)
            positions[request.session_id] = position
            response = pb.StepResponse(session_id=request.session_id, position=position)
            add = response.outputs.add
            for token in request.tokens:
                add(token=token, top_tokens=top_tokens, top_logprobs=top_logprobs)
            await context.write(response)


async def serve(port_file: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    pb_grpc.add_LstmServiceServicer_to_server(EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    eventloop.settle_gc()  # as lstm-serve does
    eventloop.write_port_file(port_file, port)
    await server.wait_for_termination()


class EchoServer(SpawnedServer):
    """The echo server as a subprocess (optionally under taskset), started and stopped as lstm-serve is."""

    def __init__(self, cpus: str | None = None) -> None:
        super().__init__(checkpoint="", cpus=cpus, metrics=False, start_timeout=60.0)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "bench.pingpong", "--port-file", str(Path(self._tmp.name) / "port")]
        return ["taskset", "-c", self.cpus, *cmd] if self.cpus is not None else cmd


def run_pingpong(cells: list[tuple[int, int]], duration: float, warmup: float,
                 server_cpus: str | None = None) -> list[dict[str, Any]]:
    """One closed-loop cell per (sessions, chunk) against one echo server; results as run_load gives them,
    with the echo server's CPU % and both processes' CPU per request added."""
    results = []
    with EchoServer(server_cpus) as server:
        for n, chunk in cells:
            spec = LoadSpec(target=server.target, sessions=n, chunk=chunk, duration=duration, warmup=warmup,
                            label="pingpong")
            cpu0, t0 = pid_cpu_seconds(server.pid), time.monotonic()
            result = eventloop.run(run_load(spec))
            cpu1, t1 = pid_cpu_seconds(server.pid), time.monotonic()
            result["kind"] = "pingpong"
            result["server_cpu_pct"] = 100.0 * (cpu1 - cpu0) / max(t1 - t0, 1e-9)
            per_s = result["requests_per_s"] or 0.0
            cpu_pct = result["server_cpu_pct"] + (result["client_cpu_pct"] or 0.0)
            result["cpu_ms_per_request"] = 10.0 * cpu_pct / per_s if per_s else None
            results.append(result)
    return results


def render_pingpong(results: list[dict[str, Any]]) -> str:
    from bench.report import table  # not at the top: the echo server (this module) stays free of torch

    rows = []
    for r in results:
        lat = r.get("latency_ms") or {}
        per = r.get("cpu_ms_per_request")
        rows.append([r["sessions"], r["chunk"], f"{r['requests_per_s']:,.0f}", f"{r['tokens_per_s']:,.0f}",
                     f"{lat.get('p50', 0):.1f}", f"{lat.get('p99', 0):.1f}", f"{r['server_cpu_pct']:.1f}",
                     f"{r.get('client_cpu_pct') or 0:.1f}", None if per is None else f"{per:.3f}"])
    return table(["N", "chunk", "requests/s", "tokens/s", "p50 ms", "p99 ms", "server CPU %", "client CPU %",
                  "CPU ms per request"], rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pingpong", description="the echo server of lstm-bench pingpong")
    p.add_argument("--port-file", required=True, help="write the bound port here once serving")
    args = p.parse_args(argv)
    try:
        eventloop.run(serve(args.port_file))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # terminate() ends it quietly
    sys.exit(main())
