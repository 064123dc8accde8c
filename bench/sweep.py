"""The benchmark sweep behind `lstm-bench sweep` / `make bench`.

For each model (the default checkpoint and the reference model): closed-loop cells for
every N in --sessions and chunk in --chunks against (a) lstm-serve, (b) the offline
limit, (c) lstm-serve with --max-batch-sessions 1; open-loop cells at fractions of the
served capacity; Generate cells. Then the idle-session memory check. Writes the JSON
results, the PNG plots and the Markdown document (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import BenchError, LoadSpec, create_sessions, model_info_dict, run_load
from bench.models import cache_dir, resolve_model
from bench.spawn import SpawnedServer, gauge, parse_cpus, pid_cpu_seconds, server_window
from model.checkpoint import read_meta
from service import eventloop
from service.config import parse_config

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class SweepConfig:
    models: list[str] = field(default_factory=lambda: ["default", "reference"])
    sessions: list[int] = field(default_factory=lambda: [1, 8, 64, 256, 1024])
    chunks: list[int] = field(default_factory=lambda: [1, 16])
    duration: float = 10.0  # measured seconds per cell
    warmup: float = 2.0  # warm-up seconds per cell
    max_requests: int = 0  # measured requests per cell at most (0 = duration only)
    # Measured seconds per offline cell (0 = as long as a served cell, `duration`): across the pairs of
    # two sweeps the served readings of a target cell varied 1-7 % and the 5-second offline ones 1-19 %.
    offline_duration: float = 0.0
    open_sessions: int = 256
    open_fractions: list[float] = field(default_factory=lambda: [0.5, 0.8])
    generate_sessions: list[int] = field(default_factory=lambda: [1, 64])
    generate_tokens: int = 64
    memory_sessions: int = 100_000  # 0 = skip the memory check
    memory_model: str = "reference"
    unbatched: bool = True
    # (sessions, chunk) cells run against the echo server of bench/pingpong.py (the RPC floor) and, per
    # model, through the engine in-process (bench/inprocess.py) ([] = skip both)
    rpc_floor: list[list[int]] = field(default_factory=lambda: [[256, 1], [64, 16]])
    # Extra (served, offline) pairs at the target cells (report.repeated_cells: the throughput targets'
    # and the 64-session tail's), run one after the other once the first pass is done: this VM's speed
    # drifts by tens of percent over minutes, and within seconds (a slower phase of a few seconds is a
    # run's p99), so the targets read the median of all the pairs (five by default), not one.
    target_repeats: int = 4
    # The target cells again, each pair (1 + target_repeats of them) with the load generator's sessions
    # sharing one StreamStepBatches stream (loadgen transport "batched": the client's StepMultiplexer's
    # protocol on the generated stubs) instead of a StreamSteps stream each: what a gateway multiplexing
    # its users' sessions gets.
    batched: bool = True
    server_cpus: str | None = None  # taskset -c for the server and the offline runs
    client_cpus: str | None = None  # CPU affinity of this process (the load generator)
    server_args: list[str] = field(default_factory=list)  # extra lstm-serve flags
    out: str = str(ROOT / "docs" / "benchmarks.md")
    img_dir: str = str(ROOT / "docs" / "img")
    json_out: str = str(ROOT / "docs" / "benchmarks.json")
    cache: str = str(cache_dir())
    quick: bool = False

    def __post_init__(self) -> None:
        if self.offline_duration <= 0:
            self.offline_duration = self.duration

    def validate(self) -> None:
        """Refuse a configuration a later cell would fail on, before any cell runs."""
        problems = []
        if not self.models:
            problems.append("no models")
        if not self.sessions or not self.chunks or min(self.sessions + self.chunks) < 1:
            problems.append("sessions and chunks must be integers >= 1")
        if not (math.isfinite(self.duration) and self.duration > 0 and math.isfinite(self.offline_duration)
                and self.offline_duration > 0):
            problems.append("durations must be finite numbers > 0")
        if not (math.isfinite(self.warmup) and self.warmup >= 0):
            problems.append("warmup must be a finite number >= 0")
        if not all(math.isfinite(f) and f > 0 for f in self.open_fractions):
            problems.append("open-loop fractions must be numbers > 0")
        if self.open_sessions < 1 or (self.generate_sessions and min(self.generate_sessions) < 1):
            problems.append("open-loop and generate sessions must be >= 1")
        if self.generate_sessions and self.generate_tokens < 1:
            problems.append("generate needs --generate-tokens >= 1")
        if self.max_requests < 0 or self.memory_sessions < 0 or self.target_repeats < 0:
            problems.append("requests, memory sessions and target repeats must be >= 0")
        if problems:
            raise BenchError("sweep: " + "; ".join(problems))

    @classmethod
    def quick_config(cls, **overrides: Any) -> SweepConfig:
        base: dict[str, Any] = {
            "sessions": [1, 8, 64, 256], "chunks": [1, 16], "duration": 3.0, "warmup": 1.0,
            "offline_duration": 2.0, "open_fractions": [0.5], "generate_sessions": [8], "generate_tokens": 16,
            "memory_sessions": 10_000, "target_repeats": 0, "quick": True,
        }
        base.update(overrides)
        return cls(**base)


def log(msg: str) -> None:
    print(f"[lstm-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _short(r: dict[str, Any]) -> str:
    lat = r.get("latency_ms") or {}
    errs = r.get("error_count", 0)
    return (f"{r['tokens_per_s']:,.0f} tok/s, {r['requests_per_s']:,.0f} req/s, p50 {lat.get('p50', 0):.1f} ms, "
            f"p99 {lat.get('p99', 0):.1f} ms, errors {errs}")


class Sweep:
    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self.original_cpus = sorted(os.sched_getaffinity(0))
        # The server and the offline runs get their own CPUs, or the ones this process had.
        self.server_cpus = cfg.server_cpus or (
            ",".join(map(str, self.original_cpus)) if cfg.client_cpus else None
        )
        self.server_config = parse_config([*cfg.server_args])
        self.notes: list[str] = []
        self.models: list[dict[str, Any]] = []  # one entry per model, as measured so far

    def pin_client(self) -> None:
        if self.cfg.client_cpus:
            os.sched_setaffinity(0, parse_cpus(self.cfg.client_cpus))

    # ---- cells ----------------------------------------------------------------------------

    def load_cell(self, server: SpawnedServer, spec: LoadSpec) -> dict[str, Any]:
        before = server.scrape()
        cpu0, t0 = pid_cpu_seconds(server.pid), time.monotonic()
        result = eventloop.run(run_load(spec))
        cpu1, t1 = pid_cpu_seconds(server.pid), time.monotonic()
        result["server_window"] = server_window(before, server.scrape())
        result["server_cpu_pct"] = 100.0 * (cpu1 - cpu0) / max(t1 - t0, 1e-9)
        return result

    def closed_cell(self, server: SpawnedServer, label: str, sessions: int, chunk: int,
                    transport: str = "streams") -> dict[str, Any]:
        cfg = self.cfg
        spec = LoadSpec(target=server.target, mode="closed", sessions=sessions, chunk=chunk, duration=cfg.duration,
                        warmup=cfg.warmup, max_requests=cfg.max_requests, label=label,
                        drain_timeout=max(30.0, cfg.duration * 3), transport=transport)
        r = self.load_cell(server, spec)
        log(f"{label} N={sessions} chunk={chunk}: {_short(r)}")
        return r

    def closed_cells(self, server: SpawnedServer, label: str) -> list[dict[str, Any]]:
        return [self.closed_cell(server, label, n, chunk) for chunk in self.cfg.chunks for n in self.cfg.sessions]

    def bench_subprocess(self, what: str, args: list[str]) -> list[dict[str, Any]]:
        """`python -m bench WHAT ARGS` in a process of its own, on the server's CPUs with the server's
        torch threads; the results it writes as JSON."""
        sc = self.server_config
        threads = sc.threads or (len(parse_cpus(self.server_cpus)) if self.server_cpus else 0)
        with tempfile.TemporaryDirectory(prefix=f"lstm-bench-{what}-") as tmp:
            out = Path(tmp) / f"{what}.json"
            cmd = [sys.executable, "-m", "bench", what, *args, "--threads", str(threads), "--json", str(out)]
            if self.server_cpus:
                cmd = ["taskset", "-c", self.server_cpus, *cmd]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise BenchError(f"{what} run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            return json.loads(out.read_text())  # type: ignore[no-any-return]

    def offline_cell(self, checkpoint: Path, sessions: int, chunk: int, batch: int) -> dict[str, Any]:
        sc = self.server_config
        (r,) = self.bench_subprocess("offline", [
            "--model", str(checkpoint), "--batch", str(batch), "--chunk", str(chunk), "--sessions", str(sessions),
            "--duration", str(self.cfg.offline_duration), "--device", sc.device, "--dtype", sc.dtype, "--quiet",
        ])
        r["sessions"] = sessions  # the N this offline cell stands for
        return r  # type: ignore[no-any-return]

    def offline_for(self, name: str, checkpoint: Path, info: dict[str, Any] | None, n: int, chunk: int
                    ) -> dict[str, Any]:
        """The offline cell for N sessions in chunks: the batch the server would run them in."""
        info = info or {}
        max_sessions = info.get("max_batch_sessions") or self.server_config.max_batch_sessions
        max_tokens = info.get("max_batch_tokens") or self.server_config.max_batch_tokens
        # A request longer than --max-chunk-tokens runs in steps of that many tokens (the scheduler's split).
        step_chunk = min(chunk, self.server_config.max_chunk_tokens)
        batch = max(1, min(n, max_sessions, max_tokens // step_chunk))
        r = self.offline_cell(checkpoint, n, step_chunk, batch)
        r["chunk"] = chunk  # the request size this offline cell stands for
        r["step_chunk"] = step_chunk
        log(f"{name}/offline N={n} chunk={chunk} batch={batch}"
            + (f" ({step_chunk} tokens per step)" if step_chunk != chunk else "")
            + f": {r['tokens_per_s']:,.0f} tok/s, step p50 {r['step_ms']['p50']:.2f} ms")
        return r

    def engine_cell(self, name: str, checkpoint: Path, sessions: int, chunk: int) -> dict[str, Any]:
        """The same closed loop through the engine in-process (no gRPC), in a process of its own."""
        (r,) = self.bench_subprocess("engine", [
            "--model", str(checkpoint), "--sessions", str(sessions), "--chunk", str(chunk),
            "--duration", str(self.cfg.duration), "--warmup", str(self.cfg.warmup),
            "--device", self.server_config.device, "--dtype", self.server_config.dtype,
        ])
        log(f"{name}/engine N={sessions} chunk={chunk}: {r['tokens_per_s']:,.0f} tok/s, mean batch "
            f"{r['mean_batch'] or 0:.1f}, step {r['step_ms_mean'] or 0:.1f} ms, hold {r['hold_ms_mean'] or 0:.1f} ms")
        return r  # type: ignore[no-any-return]

    def run_model(self, name: str) -> dict[str, Any]:
        cfg = self.cfg
        entry: dict[str, Any] = {"name": name, "served": [], "unbatched": [], "offline": [], "engine": [],
                                 "repeats": [], "batched": [], "open": [], "generate": [], "plots": {}}
        self.models.append(entry)  # filled in as cells finish (a sweep that fails keeps them: run_sweep)
        try:
            checkpoint = resolve_model(name, Path(cfg.cache))
        except BenchError as e:
            entry["skipped"] = str(e)
            log(f"model {name}: skipped ({e})")
            return entry
        meta = read_meta(checkpoint)
        entry.update(checkpoint=str(checkpoint), model=meta["config"], sha256=meta.get("weights_sha256", ""))
        log(f"model {name}: {checkpoint}")

        with SpawnedServer(checkpoint, cfg.server_args, cpus=self.server_cpus) as server:
            if server.metrics_port is None:
                self.notes.append("the server's metrics port was not found in its log: no engine step times")
            for chunk in cfg.chunks:
                for n in cfg.sessions:
                    served = self.closed_cell(server, f"{name}/served", n, chunk)
                    entry["served"].append(served)
                    # The offline limit of the same cell, right after it (the server idles meanwhile):
                    # this VM's speed drifts by tens of percent over minutes, and a ratio should
                    # divide two measurements taken together.
                    entry["offline"].append(self.offline_for(name, checkpoint, served.get("server"), n, chunk))
                    if [n, chunk] in cfg.rpc_floor:  # and, at the target cells, the engine without gRPC
                        entry["engine"].append(self.engine_cell(name, checkpoint, n, chunk))
            targets = [(n, c) for n, c in report.repeated_cells() if n in cfg.sessions and c in cfg.chunks]
            for repeat in range(cfg.target_repeats):
                for n, chunk in targets:
                    served = self.closed_cell(server, f"{name}/served (pair {repeat + 2})", n, chunk)
                    offline = self.offline_for(name, checkpoint, served.get("server"), n, chunk)
                    entry["repeats"].append(report.target_pair(served, offline))
            for repeat in range(1 + cfg.target_repeats if cfg.batched else 0):
                for n, chunk in targets:
                    served = self.closed_cell(server, f"{name}/batched (pair {repeat + 1})", n, chunk, "batched")
                    offline = self.offline_for(name, checkpoint, served.get("server"), n, chunk)
                    entry["batched"].append(report.target_pair(served, offline))
            entry["server_info"] = entry["served"][0]["server"] if entry["served"] else None
            base = next((c for c in entry["served"] if c["sessions"] == cfg.open_sessions and c["chunk"] == 1), None)
            if base is None and entry["served"]:
                base = max((c for c in entry["served"] if c["chunk"] == min(cfg.chunks)),
                           key=lambda c: c["requests_per_s"])
            for frac in cfg.open_fractions if base else []:
                rate = max(1.0, frac * base["requests_per_s"])  # type: ignore[index]
                spec = LoadSpec(target=server.target, mode="open", sessions=base["sessions"],  # type: ignore[index]
                                chunk=base["chunk"], rate=rate, duration=cfg.duration,  # type: ignore[index]
                                warmup=cfg.warmup, max_requests=cfg.max_requests, label=f"{name}/open",
                                drain_timeout=max(30.0, cfg.duration * 3))
                r = self.load_cell(server, spec)
                r["capacity_fraction"] = frac
                log(f"{name}/open N={spec.sessions} {rate:,.0f} req/s ({frac:.0%} of closed loop): {_short(r)}")
                entry["open"].append(r)
            for n in cfg.generate_sessions:
                spec = LoadSpec(target=server.target, mode="generate", sessions=n, chunk=1,
                                generate_tokens=cfg.generate_tokens, duration=cfg.duration, warmup=cfg.warmup,
                                max_requests=cfg.max_requests, label=f"{name}/generate",
                                drain_timeout=max(30.0, cfg.duration * 3))
                r = self.load_cell(server, spec)
                log(f"{name}/generate N={n}: {r['tokens_per_s']:,.0f} tok/s, TTFT p50 "
                    f"{(r['ttft_ms'] or {}).get('p50', 0):.1f} ms, ITL p50 {(r['itl_ms'] or {}).get('p50', 0):.1f} ms")
                entry["generate"].append(r)

        if cfg.unbatched:
            with SpawnedServer(checkpoint, [*cfg.server_args, "--max-batch-sessions", "1"],
                               cpus=self.server_cpus) as server:
                entry["unbatched"] = self.closed_cells(server, f"{name}/unbatched")

        return entry

    def rpc_floor(self) -> list[dict[str, Any]]:
        """The same closed-loop load against an echo server with no model (bench/pingpong.py)."""
        from bench.pingpong import run_pingpong

        if not self.cfg.rpc_floor:
            return []
        cells = run_pingpong([(n, chunk) for n, chunk in self.cfg.rpc_floor], self.cfg.duration, self.cfg.warmup,
                             self.server_cpus)
        for r in cells:
            log(f"rpc floor N={r['sessions']} chunk={r['chunk']}: {_short(r)}, "
                f"{r['cpu_ms_per_request']:.3f} ms CPU per request")
        return cells

    def memory_check(self) -> dict[str, Any]:
        n = self.cfg.memory_sessions
        try:
            checkpoint = resolve_model(self.cfg.memory_model, Path(self.cfg.cache))
        except BenchError as e:
            return {"skipped": str(e)}
        return memory_check(checkpoint, n, self.cfg.server_args, self.server_cpus, self.cfg.memory_model)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.monotonic()
        machine = report.machine_info()
        self.pin_client()
        for name in cfg.models:
            self.run_model(name)
        models = self.models
        floor = self.rpc_floor()
        memory = None
        if cfg.memory_sessions > 0:
            log(f"memory check: {cfg.memory_sessions:,} idle sessions")
            memory = self.memory_check()
            if not memory.get("skipped"):
                log(f"memory: RSS delta {memory['rss_delta_bytes'] / 2**20:,.0f} MiB for "
                    f"{memory['raw_state_bytes'] / 2**20:,.0f} MiB of state ({memory['overhead_pct']:.1f} % overhead)")
        config = asdict(cfg)
        config["json_name"] = os.path.relpath(cfg.json_out, Path(cfg.out).parent)
        config["server_threads"] = self.server_config.threads or (
            len(parse_cpus(self.server_cpus)) if self.server_cpus else machine.get("torch_threads")
        )
        return {"machine": machine, "config": config, "models": models, "rpc_floor": floor, "memory": memory,
                "notes": self.notes,
                "elapsed_s": time.monotonic() - started}


def memory_check(checkpoint: Path, sessions: int, server_args: list[str] | None = None, cpus: str | None = None,
                 model_name: str = "") -> dict[str, Any]:
    """RSS of the server before and after `sessions` idle sessions, against their raw state bytes."""
    args = list(server_args or [])
    if sessions > parse_config(args).max_sessions:
        args += ["--max-sessions", str(sessions)]

    async def create(target: str) -> tuple[dict[str, Any], float]:
        import grpc
        from lstmserve_client.proto import lstm_service_pb2 as pb
        from lstmserve_client.proto import lstm_service_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30, wait_for_ready=True)
            t0 = time.monotonic()
            await create_sessions([stub], sessions, batch=512)
            return model_info_dict(info), time.monotonic() - t0

    with SpawnedServer(checkpoint, args, cpus=cpus) as server:
        time.sleep(0.5)
        rss0 = server.rss_bytes()
        slab0 = gauge(server.scrape(), "lstm_state_memory_bytes")
        info, seconds = eventloop.run(create(server.target))
        time.sleep(1.0)
        rss1 = server.rss_bytes()
        after = server.scrape()
        slab1 = gauge(after, "lstm_state_memory_bytes")
        active = gauge(after, "lstm_sessions_active")
    tensors = 2 if info["cell_type"] == "lstm" else 1
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(info["dtype"], 4)
    slot_bytes = tensors * info["num_layers"] * info["hidden_size"] * dtype_bytes
    raw = sessions * slot_bytes
    delta = rss1 - rss0
    return {
        "model": model_name or str(checkpoint),
        "sessions": sessions,
        "sessions_active": int(active) if active is not None else None,
        "slot_bytes": slot_bytes,
        "state_layout": f"{tensors} tensor(s) × {info['num_layers']} layers × {info['hidden_size']} × "
                        f"{dtype_bytes} B",
        "raw_state_bytes": raw,
        "slab_bytes_before": slab0,
        "slab_bytes": slab1,
        "rss_before_bytes": rss0,
        "rss_after_bytes": rss1,
        "rss_delta_bytes": delta,
        "overhead_pct": 100.0 * (delta - raw) / raw,
        "overhead_per_session_bytes": (delta - raw) / sessions,
        "create_seconds": seconds,
        "create_rate_per_s": sessions / seconds if seconds > 0 else None,
    }


def write_outputs(sweep: dict[str, Any], out: Path | str, img_dir: Path | str, json_out: Path | str | None) -> None:
    """Plots into img_dir, the JSON (if json_out) and the Markdown document `out`."""
    out, img_dir = Path(out), Path(img_dir)
    for m in sweep["models"]:
        if m.get("skipped"):
            continue
        slug = report.slug(m["name"])
        m["plots"] = {
            "throughput": str(report.plot_throughput(m, img_dir / f"bench-{slug}-throughput.png")),
            "latency-cdf": str(report.plot_latency_cdf(m, img_dir / f"bench-{slug}-latency-cdf.png")),
        }
    if json_out:
        report.write_json(Path(json_out), sweep)
    prefix = os.path.relpath(img_dir, out.parent).replace(os.sep, "/") + "/"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.render_sweep(sweep, img_prefix=prefix))
    log(f"wrote {out}{', ' + str(json_out) if json_out else ''} and plots in {img_dir}")


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    cfg.validate()
    runner = Sweep(cfg)
    try:
        sweep = runner.run()
    except BaseException:  # (Ctrl-C included) keep what was measured: minutes of cells
        partial = Path(cfg.json_out).with_suffix(".partial.json")
        report.write_json(partial, {"incomplete": True, "config": asdict(cfg), "models": runner.models,
                                    "notes": runner.notes})
        log(f"the sweep stopped early; the cells it measured are in {partial}")
        raise
    write_outputs(sweep, cfg.out, cfg.img_dir, cfg.json_out)
    return sweep
