"""The accuracy cost of a reduced-precision serving path (`lstm-serve --dtype bfloat16|float16`).

The held-out text (the last 10 % of the corpus, as the training job holds it out) is cut into
equal streams, one session each, and fed through the served step (`ModelRunner.execute`, state
carried in the slab from step to step, as the engine runs it) in float32 and in each compared
dtype. Reported per dtype: the loss on that text in nats per character, and how far every
log-probability moved from float32 (max and mean absolute difference, and how often the most
likely next character is still the same).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.loadgen import CORPUS, BenchError
from bench.offline import DTYPES
from model.checkpoint import Checkpoint, load_checkpoint
from model.model import resolve_device
from model.train import TRAIN_FRACTION
from service.runner import ModelRunner, RowInput


@dataclass
class AccuracySpec:
    checkpoint: str  # checkpoint directory
    dtypes: list[str] = field(default_factory=lambda: ["bfloat16"])  # compared with float32
    data: str = str(CORPUS)  # the corpus; its last 10 % is held out
    streams: int = 64  # sessions the held-out text is cut into, stepped together
    chunk: int = 16  # tokens per session per step
    max_chars: int = 0  # held-out characters to use at most (0 = all)
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # torch CPU threads (0 = torch's default)


def held_out_streams(text: str, encode: Any, streams: int, max_chars: int) -> list[list[int]]:
    """The held-out ids cut into `streams` equal consecutive pieces (the remainder is dropped)."""
    held = text[int(len(text) * TRAIN_FRACTION) :]  # one id per character: the training split
    if max_chars:
        held = held[:max_chars]
    ids = encode(held)
    length = len(ids) // streams
    if length < 2:
        raise BenchError(f"{len(ids)} held-out characters are too few for {streams} streams")
    return [ids[i * length : (i + 1) * length] for i in range(streams)]


def served_logprobs(checkpoint: Checkpoint, chunk: int, streams: list[list[int]]) -> tuple[np.ndarray, float]:
    """Log-probabilities [streams, length, vocab] from the served step in the checkpoint's device and dtype,
    and the seconds it took."""
    weight = checkpoint.model.head.weight
    n = len(streams)
    runner = ModelRunner(checkpoint, weight.device, weight.dtype, initial_capacity=n, max_capacity=n)
    slots = [runner.allocate() for _ in streams]
    length = len(streams[0])
    out = np.empty((n, length, checkpoint.config.vocab_size), dtype=np.float32)
    started = time.perf_counter()
    for start in range(0, length, chunk):
        rows = [RowInput(slot=slot, tokens=ids[start : start + chunk], position=start, want_logprobs=True)
                for slot, ids in zip(slots, streams)]
        for i, result in enumerate(runner.execute(rows)):
            assert result.logprobs is not None
            out[i, start : start + len(result.logprobs)] = result.logprobs
    return out, time.perf_counter() - started


def loss_nats(logprobs: np.ndarray, streams: list[list[int]]) -> float:
    """Mean -log p(next character) over every position that has a next character."""
    targets = np.asarray(streams, dtype=np.int64)[:, 1:]
    picked = np.take_along_axis(logprobs[:, :-1], targets[..., None], axis=-1)
    return float(-picked.mean())


def run_accuracy(spec: AccuracySpec) -> dict[str, Any]:
    unknown = [d for d in spec.dtypes if d not in DTYPES]
    if unknown:
        raise BenchError(f"unknown dtype {unknown[0]!r}; one of {', '.join(DTYPES)}")
    if spec.streams < 1 or spec.chunk < 1:
        raise BenchError("streams and chunk must be >= 1")
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    float32 = load_checkpoint(spec.checkpoint, device=device)
    streams = held_out_streams(Path(spec.data).read_text(encoding="utf-8"), float32.tokenizer.encode, spec.streams,
                               spec.max_chars)
    reference, seconds = served_logprobs(float32, spec.chunk, streams)
    rows = [{"dtype": "float32", "loss_nats": loss_nats(reference, streams), "max_abs_logprob_diff": 0.0,
             "mean_abs_logprob_diff": 0.0, "top1_agreement": 1.0, "seconds": seconds}]
    for dtype in spec.dtypes:
        checkpoint = load_checkpoint(spec.checkpoint, device=device, dtype=DTYPES[dtype])
        logprobs, seconds = served_logprobs(checkpoint, spec.chunk, streams)
        diff = np.abs(logprobs - reference)
        rows.append({
            "dtype": dtype,
            "loss_nats": loss_nats(logprobs, streams),
            "max_abs_logprob_diff": float(diff.max()),
            "mean_abs_logprob_diff": float(diff.mean()),
            "top1_agreement": float((logprobs.argmax(-1) == reference.argmax(-1)).mean()),
            "seconds": seconds,
        })
    return {"kind": "accuracy", "characters": len(streams) * len(streams[0]), "stream_length": len(streams[0]),
            "results": rows, "spec": asdict(spec)}


def render_accuracy(result: dict[str, Any]) -> str:
    spec = result["spec"]
    lines = [
        f"Held-out text: {result['characters']:,} characters in {spec['streams']} streams of "
        f"{result['stream_length']:,}, {spec['chunk']} tokens per step; checkpoint `{spec['checkpoint']}`.",
        "",
        "| dtype | loss (nats/char) | loss vs float32 | max abs log-prob diff | mean abs log-prob diff "
        "| same top-1 | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = result["results"][0]["loss_nats"]
    for r in result["results"]:
        lines.append(
            f"| {r['dtype']} | {r['loss_nats']:.4f} | {r['loss_nats'] - base:+.4f} | {r['max_abs_logprob_diff']:.4f} "
            f"| {r['mean_abs_logprob_diff']:.5f} | {100 * r['top1_agreement']:.2f} % | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"
