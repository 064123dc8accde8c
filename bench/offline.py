"""The offline limit: the server's model step with no server around it.

The same checkpoint and batch sizes run through `service.runner.ModelRunner.execute`,
exactly as the engine runs them: state rows gathered from the slabs, one model call
per batch, states scattered back, log-softmax, top-k 5 and one copy to the host. No
gRPC, no asyncio, no scheduler: the tokens/s the served numbers can approach on this
machine.

With more sessions than fit one batch, batches walk round-robin over the session
slots (as the scheduler does), so gather and scatter touch different rows each step.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from bench.loadgen import BenchError
from bench.stats import summarize_ms
from model.checkpoint import load_checkpoint
from model.model import resolve_device
from service.runner import ModelRunner, RowInput

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def served_precision(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a server given --device and --dtype runs the model in."""
    if dtype not in DTYPES:
        raise BenchError(f"dtype must be one of {', '.join(DTYPES)}")
    try:
        return resolve_device(device), DTYPES[dtype]
    except ValueError as e:
        raise BenchError(str(e)) from None


@dataclass
class OfflineSpec:
    checkpoint: str  # checkpoint directory
    batch: int = 1  # sessions per step
    chunk: int = 1  # tokens per session per step
    sessions: int = 0  # state slots to walk over (0 = batch)
    duration: float = 5.0  # measured seconds
    max_steps: int = 0  # measured steps at most (0 = duration only)
    warmup_steps: int = 3  # untimed steps first
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    dtype: str = "float32"
    threads: int = 0  # torch CPU threads (0 = torch's default)
    top_k: int = 5
    seed: int = 0
    label: str = ""


def run_offline(spec: OfflineSpec) -> dict[str, Any]:
    if spec.batch < 1 or spec.chunk < 1 or not (math.isfinite(spec.duration) and spec.duration > 0):
        raise BenchError("batch and chunk must be >= 1 and duration a finite number > 0")
    if spec.max_steps < 0 or spec.threads < 0 or spec.sessions < 0:
        raise BenchError("steps, threads and sessions must be >= 0")
    device, dtype = served_precision(spec.device, spec.dtype)
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    checkpoint = load_checkpoint(spec.checkpoint, device=device, dtype=dtype)
    cfg = checkpoint.config
    sessions = max(spec.sessions, spec.batch)
    runner = ModelRunner(checkpoint, device, dtype, initial_capacity=sessions, max_capacity=sessions)
    slots = [runner.allocate() for _ in range(sessions)]
    positions = [0] * sessions
    pool = np.random.default_rng(spec.seed).integers(0, cfg.vocab_size, size=1 << 16, dtype=np.int64).tolist()
    pool_pos = 0
    cursor = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        nonlocal pool_pos, cursor
        rows = []
        for j in range(spec.batch):
            s = (cursor + j) % sessions
            if pool_pos + spec.chunk > len(pool):
                pool_pos = 0
            rows.append(RowInput(slot=slots[s], tokens=pool[pool_pos : pool_pos + spec.chunk], position=positions[s],
                                 top_k=spec.top_k))
            pool_pos += spec.chunk
            positions[s] += spec.chunk
        cursor = (cursor + spec.batch) % sessions
        outputs = runner.execute(rows)
        assert len(outputs) == len(rows)

    for _ in range(spec.warmup_steps):
        step()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    deadline = start + spec.duration
    while True:
        t0 = time.perf_counter()
        if t0 >= deadline or (spec.max_steps and len(times) >= spec.max_steps):
            break
        step()  # execute() ends with the host copy, which waits for the device
        times.append(time.perf_counter() - t0)
    window = time.perf_counter() - start
    steps = len(times)
    tokens = steps * spec.batch * spec.chunk
    return {
        "kind": "offline",
        "label": spec.label,
        "batch": spec.batch,
        "chunk": spec.chunk,
        "sessions": sessions,
        "steps": steps,
        "tokens": tokens,
        "window_s": window,
        "tokens_per_s": tokens / window if window > 0 else 0.0,
        "steps_per_s": steps / window if window > 0 else 0.0,
        "step_ms": summarize_ms(times),
        "device": device.type,
        "dtype": spec.dtype,
        "threads": torch.get_num_threads(),
        "model": {
            "cell_type": cfg.cell_type,
            "num_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size,
            "embedding_size": cfg.embedding_size,
            "vocab_size": cfg.vocab_size,
        },
        "spec": asdict(spec),
    }


offline_fields = ("kind", "batch", "chunk", "steps", "tokens", "tokens_per_s", "steps_per_s", "step_ms", "threads")
