"""The TorchServe comparison's own parts (bench/torchserve): the handler TorchServe runs, the
StreamPredictions2 load client, the report. TorchServe itself (Java, its own environment) runs
only on request (`make bench-torchserve`); here its handler runs under a stand-in for its context,
and the client against a small StreamPredictions2 server written for the test."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from bench.loadgen import BenchError
from bench.torchserve.compare import (
    SequenceLoad,
    TorchServe,
    TorchServeConfig,
    _stubs,
    render_comparison,
    run_sequence_load,
    vocab_size,
)
from bench.torchserve.handler import LstmSequenceHandler
from model.checkpoint import load_checkpoint
from tests.conftest import ROOT


class _Context:
    """What the handler reads of TorchServe's context: the model-config YAML and, per batch, the
    sequence id of each request."""

    def __init__(self, checkpoint: Path) -> None:
        self.model_yaml_config = {"handler": {"repo": str(ROOT), "checkpoint": str(checkpoint), "threads": 1,
                                              "capacity": 8, "top_k": 3}}
        self.sequence_ids: list[str] = []

    def get_sequence_id(self, idx: int) -> str:
        return self.sequence_ids[idx]


def _batch(handler: LstmSequenceHandler, ctx: _Context, requests: list[tuple[str, list[int]]]) -> list[Any]:
    ctx.sequence_ids = [sid for sid, _ in requests]
    answers = handler.handle([{"body": json.dumps(tokens).encode()} for _, tokens in requests], ctx)
    return [json.loads(a) for a in answers]


def test_handler_carries_each_sequences_state_across_batches(tiny_checkpoint: Path) -> None:
    ctx = _Context(tiny_checkpoint)
    handler = LstmSequenceHandler()
    handler.initialize(ctx)
    # Two sequences, batched together, with chunks of different lengths in one batch.
    first = _batch(handler, ctx, [("a", [1, 2]), ("b", [3])])
    second = _batch(handler, ctx, [("b", [4, 5]), ("a", [6])])
    model = load_checkpoint(tiny_checkpoint).model
    for history, answers in (([1, 2, 6], [first[0], second[1]]), ([3, 4, 5], [first[1], second[0]])):
        with torch.inference_mode():
            logits, _ = model(torch.tensor([history]))  # the whole sequence in one call, from zeros
        expected = torch.log_softmax(logits[0], dim=-1).topk(3, dim=-1)
        assert [t for a in answers for t in a["top_tokens"]] == expected.indices.tolist()
        got = torch.tensor([lp for a in answers for lp in a["top_logprobs"]])
        assert torch.allclose(got, expected.values, atol=1e-5)


def test_handler_refuses_more_sequences_than_its_capacity(tiny_checkpoint: Path) -> None:
    ctx = _Context(tiny_checkpoint)
    handler = LstmSequenceHandler()
    handler.initialize(ctx)
    _batch(handler, ctx, [(f"s{i}", [1]) for i in range(8)])
    with pytest.raises(RuntimeError, match="capacity"):
        _batch(handler, ctx, [("one-too-many", [1])])


async def _serve_stream_predictions2(fail_token: int, hang_sequence: str = "") -> tuple[grpc.aio.Server, int,
                                                                                        list[Any]]:
    """A StreamPredictions2 server for the test: answers each request with one top-5 per input
    token, or with a failed status when the request holds fail_token; never answers the
    sequence hang_sequence."""
    pb, pb_grpc = _stubs()
    seen: list[Any] = []

    class Servicer(pb_grpc.InferenceAPIsServiceServicer):  # type: ignore[misc,name-defined]
        async def StreamPredictions2(self, request_iterator: Any, context: Any) -> Any:
            async for request in request_iterator:
                seen.append(request)
                if request.sequenceId == hang_sequence:
                    await asyncio.Event().wait()
                tokens = json.loads(request.input["data"])
                if fail_token in tokens:
                    yield pb.PredictionResponse(status=pb.Status(code=13, message="failed"))
                    continue
                body = {"top_tokens": [[0, 1, 2, 3, 4]] * len(tokens), "top_logprobs": [[-1.0] * 5] * len(tokens)}
                yield pb.PredictionResponse(prediction=json.dumps(body).encode())

    server = grpc.aio.server()
    pb_grpc.add_InferenceAPIsServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, seen


def test_sequence_load_drives_stream_predictions2_a_stream_and_a_sequence_id_per_session() -> None:
    async def scenario() -> tuple[dict[str, Any], list[Any]]:
        server, port, seen = await _serve_stream_predictions2(fail_token=7)
        try:
            result = await run_sequence_load(SequenceLoad(target=f"127.0.0.1:{port}", vocab_size=65, sessions=4,
                                                          chunk=3, duration=1.0, warmup=0.3))
        finally:
            await server.stop(None)
        return result, seen

    result, seen = asyncio.run(scenario())
    assert result["tokens_per_s"] > 0 and result["requests"] > 0
    assert {r.model_name for r in seen} == {"lstm"}
    assert len({r.sequenceId for r in seen}) == 4
    assert all(len(json.loads(r.input["data"])) == 3 for r in seen)
    # Requests holding token 7 were answered with a failed status: counted as errors, not tokens.
    failing = sum(1 for r in seen if 7 in json.loads(r.input["data"]))
    assert failing > 0
    assert result["errors"].get("status 13", 0) > 0
    assert result["latency_ms"]["count"] == result["requests"]


def test_sequence_load_counts_each_session_left_without_an_answer() -> None:
    load = SequenceLoad(target="", vocab_size=65, sessions=3, chunk=1, duration=0.5, warmup=0.1, drain_timeout=0.5)

    async def scenario() -> dict[str, Any]:
        server, port, _ = await _serve_stream_predictions2(fail_token=-1, hang_sequence=f"{load.sequence_prefix}1")
        try:
            load.target = f"127.0.0.1:{port}"
            return await run_sequence_load(load)
        finally:
            await server.stop(None)

    result = asyncio.run(scenario())
    assert result["errors"] == {"DRAIN_TIMEOUT": 1}
    assert result["requests"] > 0  # the other two sessions went on


def test_render_comparison_gives_each_lstm_serve_cell_against_torchserves_best() -> None:
    machine = {"date": "d", "cpu": "cpu", "cores": 2, "simd": ["avx2"], "torch": "t", "grpcio": "g",
               "python": "p", "loadavg_1m": 0.1}
    config = {"model_label": "reference", "rounds": 1, "duration": 5.0, "warmup": 2.0, "chunk": 1,
              "max_batch_delay_ms": 100}

    def cell(server: str, tokens: float) -> dict[str, Any]:
        return {"round": 1, "server": server, "sessions": 256, "chunk": 1, "tokens_per_s": tokens,
                "latency_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0}, "server_cpu_pct": 100.0,
                "client_cpu_pct": 10.0, "error_count": 0}

    md = render_comparison({"machine": machine, "config": config, "cells": [
        cell("TorchServe 0.12, batchSize 64", 1000.0), cell("TorchServe 0.12, batchSize 256", 2000.0),
        cell("lstm-serve, StreamSteps", 5000.0)]})
    assert ("lstm-serve, StreamSteps, N=256: 2.50x the tokens/s of TorchServe 0.12, batchSize 256 (2,000); "
            "p99 2.0 against 2.0 ms") in md


def test_torchserve_needs_its_environment(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(BenchError, match="make bench-torchserve"):
        TorchServe(TorchServeConfig(venv=tmp_path, checkpoint=tiny_checkpoint)).start()
    assert vocab_size(tiny_checkpoint) == len(load_checkpoint(tiny_checkpoint).tokenizer.vocab)
