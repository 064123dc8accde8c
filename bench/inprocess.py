"""The engine without gRPC: lstm-serve's engine driven from its own event loop.

    lstm-bench engine --model reference --sessions 256 --chunk 1

N sessions in a closed loop, each a coroutine that awaits `Engine.step` and sends its next
chunk when the answer is back, on the event loop lstm-serve runs (service/eventloop.py) and
with the engine at the server's defaults (EngineLimits(), no state store, metrics on) and the
server's collector settings. The work per token is the served one minus gRPC: the scheduler,
the holds, the engine's Python per row, the runner, and the event loop's round trip to the
engine thread. Set between the offline limit (the model step alone) and the served rate
(through gRPC), it shows where the served throughput goes: to the engine or to the RPC layer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from bench.loadgen import BenchError, TokenSource
from bench.offline import served_precision
from bench.report import fmt, table
from bench.stats import summarize_ms
from model.checkpoint import load_checkpoint
from service import eventloop
from service.engine import Engine, StepOptions
from service.metrics import Metrics
from service.runner import claim_torch_threads

OWNER = "lstm-bench"


@dataclass
class InProcessSpec:
    checkpoint: str  # checkpoint directory
    sessions: int = 256  # concurrent sessions, each in a closed loop
    chunk: int = 1  # tokens per request
    duration: float = 10.0  # measured seconds
    warmup: float = 2.0  # seconds of load before the measured window
    threads: int = 0  # torch CPU threads (0 = torch's default)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto, as the server's --device
    dtype: str = "float32"  # the served dtype, as the server's --dtype
    top_k: int = 5  # top next tokens per input token, as the load generator asks
    seed: int = 0  # of the random input tokens
    label: str = ""


def run_inprocess(spec: InProcessSpec) -> dict[str, Any]:
    if spec.sessions < 1 or spec.chunk < 1 or spec.duration <= 0 or spec.warmup < 0:
        raise BenchError("sessions and chunk must be >= 1, duration > 0 and warmup >= 0")
    return eventloop.run(_run(spec))  # type: ignore[no-any-return]


async def _run(spec: InProcessSpec) -> dict[str, Any]:
    threads = claim_torch_threads(spec.threads)  # as lstm-serve does: only the engine thread runs parallel work
    device, dtype = served_precision(spec.device, spec.dtype)
    checkpoint = load_checkpoint(spec.checkpoint, device=device, dtype=dtype)
    metrics = Metrics(CollectorRegistry(), process_metrics=False)
    engine = Engine(checkpoint, device, dtype, metrics=metrics, threads=threads)
    engine.start(asyncio.get_running_loop())
    try:
        ids = [(await engine.create_session(OWNER)).session_id for _ in range(spec.sessions)]
        pool = np.random.default_rng(spec.seed).integers(0, checkpoint.config.vocab_size, size=1 << 16,
                                                         dtype=np.int64)
        options = StepOptions(top_k=spec.top_k)
        eventloop.settle_gc()  # as lstm-serve does once it serves
        start = time.monotonic()
        warm_end = start + spec.warmup
        end = warm_end + spec.duration
        latencies: list[float] = []
        # As the load generator counts (bench/loadgen.py): throughput is the answers received inside
        # [warm_end, end), over that span; latency that of the requests sent inside it.
        counted = [0, 0]  # requests and tokens answered in the measured window
        mismatches = [0]

        async def session(index: int, sid: str) -> None:
            source = TokenSource(pool, index * 997)
            position = 0
            while True:
                sent = time.monotonic()
                if sent >= end:
                    return
                tokens = source.next(spec.chunk)
                result = await engine.step(OWNER, sid, tokens, options=options)
                done = time.monotonic()
                position += len(tokens)
                if result.position != position or result.top_tokens is None or len(result.top_tokens) != len(tokens):
                    mismatches[0] += 1
                if warm_end <= done < end:
                    counted[0] += 1
                    counted[1] += len(tokens)
                if sent >= warm_end:
                    latencies.append(done - sent)

        marks: list[dict[str, float]] = []  # process CPU seconds, engine steps and metric sums at the window's ends

        async def mark_window() -> None:
            for t in (warm_end, end):
                await asyncio.sleep(max(0.0, t - time.monotonic()))
                marks.append({"cpu": time.process_time(), "steps": engine.steps_run,
                              **{name: metrics.registry.get_sample_value(name) or 0.0 for name in WINDOW_METRICS}})

        marker = asyncio.create_task(mark_window())
        await asyncio.gather(*(session(i, sid) for i, sid in enumerate(ids)))
        await marker
    finally:
        engine.stop()
    requests, tokens = counted
    delta = {name: marks[1][name] - marks[0][name] for name in marks[0]}
    cpu, steps = delta["cpu"], int(delta["steps"])
    return {
        "kind": "engine",
        "label": spec.label,
        "sessions": spec.sessions,
        "chunk": spec.chunk,
        "requests": requests,
        "tokens": tokens,
        "window_s": spec.duration,
        "tokens_per_s": tokens / spec.duration,
        "requests_per_s": requests / spec.duration,
        "latency_ms": summarize_ms(latencies),
        "steps": steps,
        "mean_batch": requests / steps if steps else None,  # one request per session per step
        # The engine's own view: mean step (model call and the Python around it) and mean hold.
        "step_ms_mean": _mean_ms(delta, "lstm_step_duration_seconds"),
        "hold_ms_mean": _mean_ms(delta, "lstm_batch_hold_seconds"),
        "cpu_pct": 100.0 * cpu / spec.duration,
        "mismatches": mismatches[0],
        "threads": engine.threads,
        "device": device.type,
        "dtype": spec.dtype,
        "spec": asdict(spec),
    }


WINDOW_METRICS = ("lstm_step_duration_seconds_sum", "lstm_step_duration_seconds_count",
                  "lstm_batch_hold_seconds_sum", "lstm_batch_hold_seconds_count")


def _mean_ms(delta: dict[str, float], histogram: str) -> float | None:
    count = delta[histogram + "_count"]
    return 1e3 * delta[histogram + "_sum"] / count if count else None


def render_inprocess(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        lat = r.get("latency_ms") or {}
        batch = r.get("mean_batch")
        rows.append([r["sessions"], r["chunk"], f"{r['tokens_per_s']:,.0f}", f"{r['requests_per_s']:,.0f}",
                     f"{lat.get('p50', 0):.1f}", f"{lat.get('p99', 0):.1f}", r["steps"],
                     None if batch is None else f"{batch:.1f}", fmt(r["step_ms_mean"], 2), fmt(r["hold_ms_mean"], 2),
                     f"{r['cpu_pct']:.1f}", r["mismatches"]])
    return table(["N", "chunk", "tokens/s", "requests/s", "p50 ms", "p99 ms", "steps", "mean batch", "step ms",
                  "hold ms", "CPU %", "mismatches"], rows) + "\n"
