"""Smoke tests of lstm-bench: short load cells against a real server on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.cli import main as bench_main
from bench.loadgen import BenchError, LoadSpec, check_loopback, result_fields, run_load
from bench.offline import OfflineSpec, offline_fields, run_offline
from bench.report import (
    batched_checks,
    model_checks,
    plot_latency_cdf,
    plot_throughput,
    render_check,
    render_results,
    render_sweep,
)
from tests.conftest import ROOT, RunningServer, run_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bench_server(tiny_checkpoint: Path) -> Iterator[RunningServer]:
    with run_server(tiny_checkpoint) as running:
        yield running


def check_consistent(r: dict[str, Any], tokens_per_request: int, exact_rates: bool = True) -> None:
    for name in result_fields:
        assert name in r, name
    assert r["requests"] > 0
    assert r["error_count"] == 0 and r["errors"] == {}, r["errors"]
    assert r["tokens"] == r["requests"] * tokens_per_request
    lat = r["latency_ms"]
    assert set(lat) >= {"p50", "p90", "p95", "p99", "max"}
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert r["tokens_per_s"] > 0 and r["requests_per_s"] > 0
    if exact_rates:  # (Generate: tokens counted as they arrive, calls as they end)
        assert r["tokens_per_s"] == pytest.approx(r["requests_per_s"] * tokens_per_request)
    assert len(r["latency_cdf_ms"]) == 101
    # The timeline bins every measured request by its send time, from the end of the warm-up.
    timeline = r["latency_timeline_ms"]
    assert sum(b["requests"] for b in timeline) == r["requests"]
    assert all(b["t_s"] >= 0 and b["p50"] <= b["p99"] <= b["max"] for b in timeline)
    assert max(b["max"] for b in timeline) == pytest.approx(lat["max"])


@pytest.mark.parametrize("transport", ["streams", "batched", "multiplexer"])
@pytest.mark.parametrize("chunk", [1, 4])
async def test_closed_loop(bench_server: RunningServer, chunk: int, transport: str) -> None:
    r = await run_load(LoadSpec(target=bench_server.target, mode="closed", sessions=4, chunk=chunk, duration=1.0,
                                warmup=0.2, transport=transport))
    check_consistent(r, chunk)
    assert r["mode"] == "closed" and r["sessions"] == 4 and r["chunk"] == chunk and r["transport"] == transport
    assert r["ttft_ms"] is None and r["itl_ms"] is None
    assert r["warmup_requests"] > 0  # the warm-up ran and was left out
    assert bench_server.engine.session_count == 0  # sessions are deleted afterwards


async def test_request_bound_ends_the_run(bench_server: RunningServer) -> None:
    r = await run_load(LoadSpec(target=bench_server.target, sessions=4, chunk=2, duration=30.0, warmup=0.0,
                                max_requests=25))
    check_consistent(r, 2)
    assert r["requests"] == 25
    assert r["wall_s"] < 15


async def test_the_batched_transport_runs_the_closed_loop_only(bench_server: RunningServer) -> None:
    with pytest.raises(BenchError, match="closed loop only"):
        await run_load(LoadSpec(target=bench_server.target, mode="open", rate=10.0, transport="batched"))
    with pytest.raises(BenchError, match="transport must be one of"):
        await run_load(LoadSpec(target=bench_server.target, transport="carrier pigeon"))


async def test_open_loop(bench_server: RunningServer) -> None:
    r = await run_load(LoadSpec(target=bench_server.target, mode="open", sessions=4, chunk=1, rate=60.0,
                                duration=1.0, warmup=0.2, tokens="corpus"))
    check_consistent(r, 1)
    assert r["rate_target"] == 60.0
    assert 15 <= r["requests"] <= 150  # Poisson with mean 60 over one second
    assert r["send_lag_ms"] is not None


async def test_generate(bench_server: RunningServer) -> None:
    r = await run_load(LoadSpec(target=bench_server.target, mode="generate", sessions=2, chunk=1, generate_tokens=8,
                                duration=1.0, warmup=0.2))
    check_consistent(r, 8, exact_rates=False)
    assert r["tokens_per_s"] == pytest.approx(r["requests_per_s"] * 8, rel=0.5)
    assert r["ttft_ms"]["count"] == r["requests"]
    assert r["itl_ms"]["count"] == r["requests"] * 7
    assert r["ttft_ms"]["p50"] > 0 and r["itl_ms"]["p50"] > 0


def test_throughput_is_what_completed_in_the_window_it_is_divided_by() -> None:
    """Rates count the answers received inside [end of warm-up, end of the measured time) over that
    span; latencies are those of requests sent in it. (The old count divided the requests sent after
    the warm-up by a span that ran on until the last of them was answered: low by about
    duration / (duration + latency).) Synthetic times: the recorder and the result alone."""
    from lstmserve_client.proto import lstm_service_pb2 as pb

    from bench.loadgen import Recorder, _result

    rec = Recorder(warm_end=10.0, max_requests=0, window_end=12.0)
    rec.ok(9.5, 10.4, 4, measured=False)  # sent in the warm-up, answered in the window: throughput only
    rec.ok(10.1, 10.6, 4, measured=True)
    rec.ok(10.6, 11.9, 4, measured=True)
    rec.ok(11.8, 12.7, 4, measured=True)  # answered after the end: latency only
    r = _result(LoadSpec(target="127.0.0.1:1", chunk=4), rec, pb.GetModelInfoResponse(), 8.0, 13.0, 0.0)
    assert r["window_s"] == 2.0
    assert r["requests_per_s"] == pytest.approx(3 / 2.0)  # 10.4, 10.6 and 11.9
    assert r["tokens_per_s"] == pytest.approx(12 / 2.0)
    assert r["requests"] == 3 and r["latency_ms"]["count"] == 3 and r["warmup_requests"] == 1
    assert r["latency_ms"]["max"] == pytest.approx(1300.0)


@pytest.mark.parametrize("transport", ["streams", "batched", "multiplexer"])
async def test_a_server_that_stops_answering_ends_the_run_on_time_with_errors(tmp_path: Path, transport: str) -> None:
    import os
    import signal
    import time

    from bench.spawn import SpawnedServer
    from tests.conftest import make_checkpoint

    server = SpawnedServer(make_checkpoint(tmp_path / "ckpt"), ["--durability", "none"], metrics=False).start()
    try:
        async def freeze_later() -> None:
            await asyncio.sleep(1.0)  # sessions exist and the load runs
            os.kill(server.pid, signal.SIGSTOP)

        freezer = asyncio.create_task(freeze_later())
        started = time.monotonic()
        r = await run_load(LoadSpec(target=server.target, sessions=4, chunk=1, duration=1.5, warmup=0.2,
                                    drain_timeout=1.0, transport=transport))
        await freezer
        assert time.monotonic() - started < 7  # bounded: deadline + a drain timeout + the deletes' (1 s each)
        assert r["errors"].get("DRAIN_TIMEOUT", 0) >= 1
        assert r["requests"] > 0
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.stop()


def test_offline(tiny_checkpoint: Path) -> None:
    r = run_offline(OfflineSpec(checkpoint=str(tiny_checkpoint), batch=4, chunk=2, sessions=8, duration=5.0,
                                max_steps=20, threads=1))
    for name in offline_fields:
        assert name in r, name
    assert r["steps"] == 20
    assert r["tokens"] == 20 * 4 * 2
    assert r["tokens_per_s"] > 0 and r["step_ms"]["p50"] > 0


async def test_markdown_table(bench_server: RunningServer, tiny_checkpoint: Path) -> None:
    load = await run_load(LoadSpec(target=bench_server.target, sessions=2, chunk=1, duration=0.3, warmup=0.0))
    off = run_offline(OfflineSpec(checkpoint=str(tiny_checkpoint), batch=2, max_steps=3, threads=1))
    md = render_results([load, off])
    lines = md.strip().splitlines()
    assert lines[0].startswith("| mode | sessions | chunk |") and "p99 ms" in lines[0]
    assert lines[1].startswith("|---|")
    assert lines[2].startswith("| closed | 2 | 1 |")
    assert any(line.startswith("| batch | chunk |") for line in lines)


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "127.1.2.3:1", "localhost:50051", "[::1]:50051"])
def test_loopback_targets_are_accepted(target: str) -> None:
    check_loopback(target)


@pytest.mark.parametrize("target", ["10.0.0.1:50051", "8.8.8.8:443", "example.com:50051", "[2001:db8::1]:50051",
                                    "0.0.0.0:50051", "dns:///127.0.0.1:50051", "127.0.0.1"])
async def test_non_loopback_targets_are_refused(target: str) -> None:
    with pytest.raises(BenchError):
        check_loopback(target)
    with pytest.raises(BenchError):
        await run_load(LoadSpec(target=target, duration=0.1))


def test_cli_refuses_non_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["load", "--target", "192.168.1.10:50051", "--duration", "0.1"]) == 2
    assert "loopback" in capsys.readouterr().err


def test_latency_timeline_shows_a_slower_phase() -> None:
    from bench.stats import timeline_ms

    # 3 s of requests every 10 ms from t=100: 10 ms each, but 30 ms between 1.0 and 1.5 s.
    sent = [100.005 + i * 0.01 for i in range(300)]  # (never on a bin edge)
    latencies = [0.030 if 1.0 <= t - 100.0 < 1.5 else 0.010 for t in sent]
    timeline = timeline_ms(sent, latencies, start=100.0, bin_s=0.5)
    assert [b["t_s"] for b in timeline] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [b["requests"] for b in timeline] == [50] * 6
    assert [round(b["p50"]) for b in timeline] == [10, 10, 30, 10, 10, 10]
    assert timeline_ms([], [], start=0.0) == []


def _fake_cell(kind: str, n: int, chunk: int, tps: float, p99: float) -> dict[str, Any]:
    lat = {"p50": p99 / 3, "p90": p99 / 2, "p95": p99 / 1.5, "p99": p99, "max": p99 * 1.2, "mean": p99 / 3,
           "count": 100}
    if kind == "offline":
        return {"kind": "offline", "batch": min(n, 256), "chunk": chunk, "sessions": n, "steps": 100, "tokens": 1,
                "tokens_per_s": tps, "steps_per_s": 1.0, "step_ms": {**lat, "p50": 2.0}, "threads": 2,
                "device": "cpu"}
    return {"kind": "load", "mode": "closed", "sessions": n, "chunk": chunk, "requests": 100, "tokens": 100 * chunk,
            "tokens_per_s": tps, "requests_per_s": tps / chunk, "latency_ms": lat,
            "latency_cdf_ms": [p99 * i / 100 for i in range(101)], "errors": {}, "error_count": 0,
            "server_window": {"steps": 10, "step_ms": {"mean": 2.0, "p50": 2.0, "p90": 3.0, "p99": 4.0},
                              "batch_sessions_mean": float(n)},
            "server_cpu_pct": 95.0, "client_cpu_pct": 40.0}


def test_sweep_document_and_plots(tmp_path: Path) -> None:
    model: dict[str, Any] = {"name": "reference", "checkpoint": "/x", "sha256": "ab" * 32,
                             "model": {"cell_type": "lstm", "num_layers": 2, "hidden_size": 512,
                                       "embedding_size": 128, "vocab_size": 65}}
    for key, scale in (("served", 1.0), ("unbatched", 0.2), ("offline", 2.0)):
        model[key] = [_fake_cell("offline" if key == "offline" else "load", n, c, 100.0 * n * c * scale, 5.0 * n)
                      for c in (1, 16) for n in (1, 8, 64, 256)]
    model["plots"] = {
        "throughput": str(plot_throughput(model, tmp_path / "img" / "bench-reference-throughput.png")),
        "latency-cdf": str(plot_latency_cdf(model, tmp_path / "img" / "bench-reference-latency-cdf.png")),
    }
    assert all(Path(p).stat().st_size > 1000 for p in model["plots"].values())
    skipped = {"name": "default", "skipped": "checkpoints/default: checkpoint directory does not exist"}
    sweep = {
        "machine": {"cpu": "Test CPU", "simd": ["avx2", "avx512_bf16"], "cores": 2, "torch": "x", "grpcio": "y",
                    "python": "3", "date": "today"},
        "config": {"warmup": 1.0, "duration": 2.0, "quick": True},
        "models": [skipped, copy.deepcopy(model)],
        "memory": {"model": "reference", "sessions": 1000, "slot_bytes": 8192, "state_layout": "2 x 2 x 512 x 4 B",
                   "raw_state_bytes": 8192000, "slab_bytes": 9000000, "rss_before_bytes": 1 << 28,
                   "rss_after_bytes": (1 << 28) + 9_000_000, "rss_delta_bytes": 9_000_000, "overhead_pct": 9.9,
                   "overhead_per_session_bytes": 808.0, "create_rate_per_s": 5000.0},
        "elapsed_s": 60.0,
    }
    md = render_sweep(sweep)
    assert "| Test CPU | avx2 avx512_bf16 | 2 |" in md
    assert "_Skipped: checkpoints/default" in md
    assert "| 64 | 1 | 6,400 | 12,800 | 1,280 | 0.50× | 5.00× |" in md
    assert "![Throughput against concurrency](img/bench-reference-throughput.png)" in md
    assert "9.9 %" in md
    checks = model_checks(model)
    names = [c["name"] for c in checks]
    assert any(n.startswith("p99 at 256 sessions") for n in names)
    assert sum(n.startswith("p99 at 64 sessions") for n in names) == 2
    p99_256 = next(c for c in checks if c["name"].startswith("p99 at 256 sessions"))
    assert p99_256["value"] == 1280.0 and p99_256["pass"] is False
    assert "**FAIL** p99 at 256 sessions" in md
    # The throughput targets, from the same cells as the table (served 1x, offline 2x, unbatched 0.2x).
    by_name = {c["name"]: c for c in checks}
    assert by_name["served/offline at 256 sessions, chunk 1"]["value"] == pytest.approx(0.5)
    assert by_name["served/offline at 256 sessions, chunk 1"]["pass"] is True  # target 0.3x
    assert by_name["served/offline at 64 sessions, chunk 16"]["pass"] is False  # target 0.75x
    assert by_name["served/unbatched at 256 sessions, chunk 1"]["value"] == pytest.approx(5.0)
    assert "**FAIL** served/unbatched at 256 sessions, chunk 1: 5.00× (target ≥ 8×)" in md
    assert "**PASS** memory overhead of 1,000 idle sessions over raw state bytes: 9.9 % (limit 25.0 %)" in md
    assert "pair by pair" not in md  # no repeats, no table
    # A miss that two decimals would round up to the target shows a third.
    near = render_check({"name": "r", "value": 0.2967, "limit": 0.3, "unit": "x", "pass": False})
    assert near == "- **FAIL** r: 0.297× (target ≥ 0.3×)"
    assert render_check({"name": "r", "value": 0.3012, "limit": 0.3, "unit": "x", "pass": True}).endswith(
        ": 0.30× (target ≥ 0.3×)")

    # Repeated pairs at a target cell: the check takes the median of all the pairs' ratios.
    model["repeats"] = [
        {"sessions": 64, "chunk": 16, "served_tokens_per_s": 80.0, "offline_tokens_per_s": 100.0, "p99_ms": 90.0,
         "errors": 0},
        {"sessions": 64, "chunk": 16, "served_tokens_per_s": 70.0, "offline_tokens_per_s": 100.0, "p99_ms": 95.0,
         "errors": 0},
    ]
    by_name = {c["name"]: c for c in model_checks(model)}
    c64 = by_name["served/offline at 64 sessions, chunk 16"]  # pairs 0.50x (first pass), 0.80x, 0.70x
    assert c64["value"] == pytest.approx(0.70) and c64["pass"] is False
    assert by_name["served/offline at 256 sessions, chunk 1"]["detail"] == ""  # no repeats there
    sweep["models"] = [model]
    sweep["config"]["target_repeats"] = 1
    md = render_sweep(sweep)
    assert "median of 3 pairs: 0.50×, 0.80×, 0.70×" in md
    assert "| 64 | 16 | 2 | 80.0 | 100.0 | 0.80× | 90.0 |" in md
    assert "run 1 more such pairs after the first pass" in md

    # The 64-session tail: each run's p99 against 3x its own median step; the median run decides.
    # First pass: p99 320 ms against 3 x 2 ms (server and offline step), far over.
    model["repeats"] = [
        {"sessions": 64, "chunk": 1, "served_tokens_per_s": 1.0, "offline_tokens_per_s": 1.0, "p99_ms": p99,
         "server_step_p50_ms": step, "offline_step_p50_ms": 10.0, "errors": 0}
        for p99, step in ((20.0, 10.0), (50.0, 20.0), (40.0, 10.0), (24.0, 10.0))
    ]
    tail = [c for c in model_checks(model) if c["name"].startswith("p99 at 64 sessions")]
    server_tail, offline_tail = tail
    # p99 / limit by run: 320/6 = 53, 20/30 = 0.67, 50/60 = 0.83, 40/30 = 1.33, 24/30 = 0.8: the median is 50 / 60.
    assert (server_tail["value"], server_tail["limit"], server_tail["pass"]) == (50.0, 60.0, True)
    assert server_tail["detail"] == "median of 5 runs by p99 / limit: 320.0 / 6.0, 20.0 / 30.0, 50.0 / 60.0, " \
                                    "40.0 / 30.0, 24.0 / 30.0"
    # Against the offline step (10 ms in the repeats): 53, 0.67, 1.67, 1.33, 0.8: the median run fails.
    assert (offline_tail["value"], offline_tail["limit"], offline_tail["pass"]) == (40.0, 30.0, False)
    md = render_sweep(sweep | {"models": [model]})
    assert "Checks, batched transport" not in md  # no batched pairs, no section
    assert "**PASS** p99 at 64 sessions (token by token) vs 3x median step (server /metrics" in md
    assert "50.0 ms (limit 60.0 ms; median of 5 runs by p99 / limit:" in md
    assert "| 64 | 1 | 5 | 1.0 | 1.0 | 1.00× | 24.0 | 10.0 | 10.0 |" in md

    # The batched transport's pairs get the same checks, against the same unbatched cell.
    model["batched"] = [
        {"sessions": n, "chunk": c, "served_tokens_per_s": served, "offline_tokens_per_s": 100.0, "p99_ms": p99,
         "server_step_p50_ms": 10.0, "offline_step_p50_ms": 10.0, "errors": 0, "transport": "batched"}
        for n, c, served, p99 in ((256, 1, 60.0, 40.0), (64, 16, 90.0, 50.0), (64, 1, 50.0, 25.0),
                                  (256, 1, 20.0, 200.0), (64, 16, 70.0, 60.0), (64, 1, 50.0, 35.0))
    ]
    by_name = {c["name"]: c for c in batched_checks(model)}
    b256 = by_name["StreamStepBatches: served/offline at 256 sessions, chunk 1"]
    assert (b256["value"], b256["pass"]) == (pytest.approx(0.4), True)
    assert b256["detail"] == "median of 2 pairs: 0.60×, 0.20×"
    assert by_name["StreamStepBatches: served/offline at 64 sessions, chunk 16"]["value"] == pytest.approx(0.8)
    # Against the unbatched cell of the first pass (256 x 1: 0.2 x 100 x 256 tokens/s), from the first pair.
    assert by_name["StreamStepBatches: served/unbatched at 256 sessions, chunk 1"]["value"] == pytest.approx(60 / 5120)
    assert by_name["StreamStepBatches: p99 at 256 sessions (token by token, closed loop)"]["value"] == 40.0
    tails = [c for n, c in by_name.items() if n.startswith("StreamStepBatches: p99 at 64 sessions")]
    assert [(t["value"], t["limit"], t["pass"]) for t in tails] == [(25.0, 30.0, True)] * 2  # lower median of 2
    md = render_sweep(sweep | {"models": [model]})
    assert "### Batched transport: the target cells over StreamStepBatches" in md
    assert "| 256 | 1 | 20.0 | 100.0 | 0.20× | 200.0 | 10.0 | 10.0 |" in md
    assert "**PASS** StreamStepBatches: served/offline at 64 sessions, chunk 16: 0.80×" in md


def test_spawned_server_gets_a_private_state_store(tmp_path: Path) -> None:
    from bench.spawn import SpawnedServer

    server = SpawnedServer(tmp_path / "ckpt")
    cmd = server.command()
    state_dir = Path(cmd[cmd.index("--state-dir") + 1])
    assert state_dir.parent == Path(server._tmp.name)  # removed with the server, never ./state
    chosen = SpawnedServer(tmp_path / "ckpt", ["--state-dir", str(tmp_path / "mine")]).command()
    assert chosen.count("--state-dir") == 1 and str(tmp_path / "mine") in chosen


def test_a_real_sweep_writes_the_document_with_each_offline_cell_after_its_served_cell(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import report
    from bench.sweep import SweepConfig, run_sweep

    monkeypatch.setattr(report, "RATIO_TARGETS", ((4, 2, 0.3),))  # target cells this small sweep has
    monkeypatch.setattr(report, "TAIL_CELL", (1, 2))
    cfg = SweepConfig(
        models=[str(tiny_checkpoint)], sessions=[1, 4], chunks=[2], duration=0.6, warmup=0.2, offline_duration=0.5,
        open_fractions=[], generate_sessions=[], memory_sessions=0, unbatched=False, rpc_floor=[[4, 2]],
        target_repeats=1, out=str(tmp_path / "bench.md"), img_dir=str(tmp_path / "img"),
        json_out=str(tmp_path / "bench.json"), cache=str(tmp_path / "cache"), server_args=["--dtype", "bfloat16"],
    )
    sweep = run_sweep(cfg)
    (model,) = sweep["models"]
    # The server's dtype is every side's: served, offline and the engine without gRPC.
    assert {c["server"]["dtype"] for c in model["served"]} == {"bfloat16"}
    assert {c["dtype"] for c in model["offline"] + model["engine"]} == {"bfloat16"}
    assert [(c["sessions"], c["chunk"]) for c in model["served"]] == [(1, 2), (4, 2)]
    assert [(c["sessions"], c["chunk"], c["batch"]) for c in model["offline"]] == [(1, 2, 1), (4, 2, 4)]
    assert all(c["tokens_per_s"] > 0 for c in model["served"] + model["offline"])
    # Interleaved: served N=1, offline N=1, served N=4, offline N=4, and at the RPC-floor cell the engine.
    order = [line.split("] ", 1)[1].split(":")[0] for line in capsys.readouterr().err.splitlines()
             if "/served" in line or "/offline N=" in line or "/engine N=" in line or "/batched" in line]
    assert [o.rsplit("/", 1)[1] for o in order] == [
        "served N=1 chunk=2", "offline N=1 chunk=2 batch=1", "served N=4 chunk=2", "offline N=4 chunk=2 batch=4",
        "engine N=4 chunk=2", "served (pair 2) N=4 chunk=2", "offline N=4 chunk=2 batch=4",
        "served (pair 2) N=1 chunk=2", "offline N=1 chunk=2 batch=1",
        # The target cells over StreamStepBatches: as many pairs as over StreamSteps.
        "batched (pair 1) N=4 chunk=2", "offline N=4 chunk=2 batch=4",
        "batched (pair 1) N=1 chunk=2", "offline N=1 chunk=2 batch=1",
        "batched (pair 2) N=4 chunk=2", "offline N=4 chunk=2 batch=4",
        "batched (pair 2) N=1 chunk=2", "offline N=1 chunk=2 batch=1",
    ]
    assert [(p["sessions"], p["transport"], p["errors"]) for p in model["batched"]] == [
        (4, "batched", 0), (1, "batched", 0), (4, "batched", 0), (1, "batched", 0)]
    assert all(p["served_tokens_per_s"] > 0 and p["offline_tokens_per_s"] > 0 for p in model["batched"])
    pair, tail_pair = model["repeats"]  # the target cells once more, after the first pass
    assert (pair["sessions"], pair["chunk"], pair["errors"]) == (4, 2, 0)
    assert pair["served_tokens_per_s"] > 0 and pair["offline_tokens_per_s"] > 0
    # The tail cell's pair keeps its run's own step times: its check compares each run with them.
    assert (tail_pair["sessions"], tail_pair["chunk"], tail_pair["errors"]) == (1, 2, 0)
    assert tail_pair["server_step_p50_ms"] > 0 and tail_pair["offline_step_p50_ms"] > 0
    (engine,) = model["engine"]
    assert (engine["sessions"], engine["chunk"], engine["mismatches"]) == (4, 2, 0) and engine["tokens_per_s"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "runs right after the served cell" in md
    assert "### The target cells, pair by pair" in md and "median of 2 pairs" in md
    # The tail against the server's and the offline step, over StreamSteps and over StreamStepBatches.
    assert md.count("median of 2 runs by p99 / limit") == 4
    assert "### Checks, batched transport" in md and "StreamStepBatches: served/offline at 4 sessions, chunk 2" in md
    # The RPC floor ran against the echo server, and the ceiling row divides it with the model's own cells.
    (floor,) = sweep["rpc_floor"]
    assert (floor["sessions"], floor["chunk"], floor["error_count"]) == (4, 2, 0) and floor["tokens_per_s"] > 0
    assert "## RPC floor (no model)" in md and f"| {model['name']} | 4 | 2 |" in md
    assert "The engine without gRPC" in md and md.count(f"| {model['name']} | 4 | 2 |") == 2
    assert json.loads((tmp_path / "bench.json").read_text())["models"][0]["offline"][1]["batch"] == 4


def test_accuracy_of_a_reduced_precision_step(tiny_checkpoint: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from bench.accuracy import AccuracySpec, held_out_streams, loss_nats, run_accuracy

    # The held-out text is the corpus's last 10 %, cut into equal consecutive streams.
    streams = held_out_streams("a" * 900 + "0123456789" * 10 + "x", list, 4, 0)  # the last 101 held out, 1 left over
    assert [len(s) for s in streams] == [25, 25, 25, 25] and "".join(sum(streams, [])) == ("0123456789" * 10)
    # The loss scores each position's distribution on the next character.
    logprobs = np.log(np.full((1, 3, 4), 0.25, dtype=np.float32))
    logprobs[0, 0, 2] = np.log(0.5)
    assert loss_nats(logprobs, [[0, 2, 1]]) == pytest.approx(-(np.log(0.5) + np.log(0.25)) / 2)

    spec = AccuracySpec(checkpoint=str(tiny_checkpoint), dtypes=["float32", "bfloat16"], streams=4, chunk=8,
                        max_chars=800)
    result = run_accuracy(spec)
    base, same, bf16 = result["results"]
    assert result["characters"] == 800 and base["dtype"] == "float32"
    assert 0.5 < base["loss_nats"] < np.log(65) + 0.5  # a real loss, near or below uniform for the tiny model
    assert same["max_abs_logprob_diff"] == 0.0 and same["loss_nats"] == base["loss_nats"]  # deterministic
    assert 0.0 < bf16["max_abs_logprob_diff"] < 1.0  # bfloat16 moves log-probs, by little
    assert abs(bf16["loss_nats"] - base["loss_nats"]) < 0.05 and bf16["top1_agreement"] > 0.9

    assert bench_main(["accuracy", "--model", str(tiny_checkpoint), "--streams", "2", "--chunk", "4",
                       "--max-chars", "200", "--json", str(tmp_path / "acc.json")]) == 0
    out = capsys.readouterr().out
    assert "| bfloat16 |" in out and json.loads((tmp_path / "acc.json").read_text())["characters"] == 200
    assert bench_main(["accuracy", "--model", str(tiny_checkpoint), "--dtypes", "int8"]) == 2


def test_pingpong_measures_the_rpc_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The echo server answers the load generator's calls through a real subprocess and real gRPC: every request
    answered with one output per token, and both processes' CPU counted per request."""
    out = tmp_path / "pingpong.json"
    assert bench_main(["pingpong", "--sessions", "4", "--chunk", "3", "--duration", "1", "--warmup", "0.2",
                       "--json", str(out)]) == 0
    [cell] = json.loads(out.read_text())
    assert cell["kind"] == "pingpong" and cell["error_count"] == 0 and cell["requests"] > 10
    assert cell["tokens"] == 3 * cell["requests"]  # one output per input token came back
    assert cell["server_cpu_pct"] > 0 and cell["cpu_ms_per_request"] > 0
    assert "| 4 | 3 |" in capsys.readouterr().out


def test_engine_mode_drives_the_engine_in_process(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`lstm-bench engine` (a process of its own, as a user runs it: it sets the collector as lstm-serve does):
    every session's answers come back in order with one output per token and the right position, and the
    steps batch several sessions."""
    out = tmp_path / "engine.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "engine", "--model", str(tiny_checkpoint), "--sessions", "6",
         "--chunk", "3", "--duration", "1.5", "--warmup", "0.3", "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    [cell] = json.loads(out.read_text())
    assert cell["kind"] == "engine" and cell["mismatches"] == 0 and cell["requests"] > 20
    assert cell["tokens"] == 3 * cell["requests"]
    # Latencies are those of the requests sent in the window, throughput what was answered in it (as the load
    # generator counts): the two differ by at most one request per session at each end.
    assert abs(cell["latency_ms"]["count"] - cell["requests"]) <= 6
    # Sessions shared steps (requests answered in the window over the steps run in it: up to one
    # boundary step's answers more than 6 per step).
    assert 1 < cell["mean_batch"] <= 6 * (1 + 1 / max(cell["steps"], 1)) + 1e-9
    assert cell["cpu_pct"] > 0
    assert "| 6 | 3 |" in proc.stdout


def test_offline_cells_are_measured_as_long_as_served_cells_unless_told_otherwise() -> None:
    from bench.sweep import SweepConfig

    assert SweepConfig(duration=7.0).offline_duration == 7.0
    assert SweepConfig(duration=7.0, offline_duration=3.0).offline_duration == 3.0
    assert SweepConfig.quick_config().offline_duration == 2.0


async def test_sessions_that_cannot_all_be_created_are_a_clear_error_and_leave_none_behind(
    tiny_checkpoint: Path,
) -> None:
    with run_server(tiny_checkpoint, max_sessions=4) as server:
        with pytest.raises(BenchError, match=r"could not create 8 sessions.*RESOURCE_EXHAUSTED"):
            await run_load(LoadSpec(target=server.target, sessions=8, duration=0.5, warmup=0.1))
        r = await run_load(LoadSpec(target=server.target, sessions=4, duration=0.5, warmup=0.1))
        assert r["error_count"] == 0 and r["requests"] > 0  # the 4 created before the refusal were deleted


def test_token_source_returns_as_many_tokens_as_asked_beyond_the_pool() -> None:
    from bench.loadgen import TokenSource

    pool = np.arange(1000)
    src = TokenSource(pool, 700)
    out = src.next(2500)
    assert len(out) == 2500 and out[:3] == [700, 701, 702] and out[300] == 0 and out[2499] == (700 + 2499) % 1000
    assert src.next(1) == [(700 + 2500) % 1000]


def test_a_server_that_answered_nothing_fails_the_targets_instead_of_dropping_them() -> None:
    from bench.report import model_checks, render_check

    dead = {k: 0.0 for k in ("tokens_per_s", "requests_per_s")}
    m: dict[str, Any] = {
        "served": [{**_fake_cell("load", n, c, 1.0, 1.0), **dead, "latency_ms": None} for n, c in ((256, 1), (64, 16),
                                                                                                   (64, 1))],
        "offline": [_fake_cell("offline", n, c, 5000.0, 1.0) for n, c in ((256, 1), (64, 16), (64, 1))],
        "unbatched": [], "repeats": [],
        "open": [{**_fake_cell("load", 256, 1, 0.0, 1.0), "rate_target": 100.0, "latency_ms": None}],
    }
    checks = {c["name"]: c for c in model_checks(m)}
    for name in ("served/offline at 256 sessions, chunk 1", "served/offline at 64 sessions, chunk 16",
                 "p99 at 256 sessions (token by token, closed loop)", "p99 at 256 sessions, open loop at 100 req/s"):
        assert checks[name]["pass"] is False, name
    assert checks["served/offline at 256 sessions, chunk 1"]["value"] == 0.0
    assert "no answers" in render_check(checks["p99 at 256 sessions (token by token, closed loop)"])


def test_a_sweep_refuses_a_bad_option_before_any_cell_and_keeps_the_cells_of_a_failed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import sweep as sweep_mod
    from bench.sweep import SweepConfig, run_sweep

    out = {"out": str(tmp_path / "b.md"), "img_dir": str(tmp_path / "img"), "json_out": str(tmp_path / "b.json")}
    ran: list[str] = []
    monkeypatch.setattr(sweep_mod.Sweep, "run_model", lambda self, name: ran.append(name))
    for bad in ({"generate_tokens": 0}, {"open_fractions": [-0.5]}, {"duration": float("nan")},
                {"memory_sessions": -1}, {"sessions": []}):
        with pytest.raises(BenchError):
            run_sweep(SweepConfig(**{**out, **bad}))
    assert ran == []  # refused before the first model

    def one_cell_then_fail(self: Any, name: str) -> None:
        self.models.append({"name": name, "served": [_fake_cell("load", 1, 1, 100.0, 5.0)]})
        raise BenchError("offline run failed")

    monkeypatch.setattr(sweep_mod.Sweep, "run_model", one_cell_then_fail)
    with pytest.raises(BenchError, match="offline run failed"):
        run_sweep(SweepConfig(**out, models=["reference"], memory_sessions=0))
    partial = json.loads((tmp_path / "b.partial.json").read_text())
    assert partial["incomplete"] and partial["models"][0]["served"][0]["tokens_per_s"] == 100.0


def test_the_offline_cell_runs_requests_in_the_servers_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.sweep import Sweep, SweepConfig

    sweep = Sweep(SweepConfig(server_args=["--max-chunk-tokens", "8"]))
    asked: list[tuple[int, int, int]] = []

    def offline_cell(checkpoint: Path, sessions: int, chunk: int, batch: int) -> dict[str, Any]:
        asked.append((sessions, chunk, batch))
        return {**_fake_cell("offline", sessions, chunk, 1000.0, 1.0), "batch": batch}

    monkeypatch.setattr(sweep, "offline_cell", offline_cell)
    r = sweep.offline_for("reference", Path("/x"), {"max_batch_sessions": 256, "max_batch_tokens": 64}, 64, 16)
    assert asked == [(64, 8, 8)]  # 16-token requests run as 8-token steps, 64 // 8 sessions per step
    assert r["chunk"] == 16 and r["step_chunk"] == 8


@pytest.mark.parametrize("argv", [
    ["memory", "--sessions", "0"], ["offline", "--steps", "-1"], ["offline", "--threads", "-2"],
    ["offline", "--duration", "nan"], ["offline", "--device", "gpu"], ["sweep", "--open-fractions", "-0.5"],
])
def test_nonsense_options_are_refused_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench_main(argv)
    assert e.value.code == 2 and "lstm-bench" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--duration", "nan"], ["--rate", "inf", "--mode", "open"],
                                    ["--drain-timeout", "0"]])
def test_load_refuses_non_finite_times(option: list[str], bench_server: RunningServer,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["load", "--target", bench_server.target, "--warmup", "0.1", *option]) == 2
    assert capsys.readouterr().err.startswith("lstm-bench: error:")


def test_offline_takes_the_servers_device_names() -> None:
    from bench.cli import build_parser

    assert build_parser().parse_args(["offline", "--device", "cuda:1"]).device == "cuda:1"
    assert build_parser().parse_args(["accuracy", "--device", "auto"]).device == "auto"
