"""The lstm-bench command line.

    lstm-bench load     --spawn | --target HOST:PORT   one or more load cells
    lstm-bench offline  --model reference --batch 64   the model step with no server
    lstm-bench sweep    [--quick]                      everything; writes docs/benchmarks.md
    lstm-bench render   docs/benchmarks.json           re-render the document and plots from a sweep's JSON
    lstm-bench memory   --sessions 100000              idle-session RSS vs raw state bytes
    lstm-bench accuracy --dtypes bfloat16              a reduced-precision step's loss and log-prob drift
    lstm-bench pingpong --sessions 256 --chunk 1       the RPC floor: the same load against an echo server
    lstm-bench engine   --sessions 256 --chunk 1       the engine driven in-process: served minus gRPC
    lstm-bench torchserve --venv DIR                   lstm-serve against TorchServe's sequence batching
    lstm-bench reference                               write the reference checkpoint, print its path
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import MODES, TOKEN_SOURCES, TRANSPORTS, BenchError, LoadSpec, check_loopback, run_load
from bench.models import cache_dir, reference_checkpoint, resolve_model
from bench.spawn import SpawnedServer, parse_cpus
from service import eventloop
from service.config import DEVICE_RE

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    """Comma-separated positive numbers (fractions, rates)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers > 0, got {text!r}")
    return values


def _count(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _device(text: str) -> str:
    """A device as lstm-serve's --device takes it (cuda:N included), so the sweep can pass the server's on."""
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference",
                   help="for --spawn / offline: 'reference' (2x512 LSTM, random weights), 'default' "
                        "(checkpoints/default) or a checkpoint directory")
    p.add_argument("--server-args", default="", help="extra lstm-serve flags for --spawn, e.g. '--threads 1'")
    p.add_argument("--server-cpus", default=None, help="run the spawned server under taskset -c CPUS (e.g. 0)")
    p.add_argument("--cache-dir", default=str(cache_dir()), help="where the reference checkpoint is written")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-bench", description="Benchmarks for lstm-serve (loopback only).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("load", help="run load against a server", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="HOST:PORT of a running lstm-serve (loopback only)")
    where.add_argument("--spawn", action="store_true", help="start lstm-serve as a subprocess on a free port")
    _add_server_options(p)
    p.add_argument("--unbatched", action="store_true", help="with --spawn: add --max-batch-sessions 1")
    p.add_argument("--client-cpus", default=None, help="pin this process (the load generator) to CPUS")
    p.add_argument("--mode", choices=MODES, default="closed")
    p.add_argument("--sessions", type=_ints, default=[8], help="concurrent sessions (comma list = several cells)")
    p.add_argument("--chunk", type=_ints, default=[1], help="tokens per request (comma list = several cells)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    p.add_argument("--requests", type=int, default=0, help="measured requests per cell at most (0 = no bound)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load excluded from the statistics")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: aggregate requests/s (Poisson)")
    p.add_argument("--tokens", choices=TOKEN_SOURCES, default="random", help="input token source")
    p.add_argument("--generate-tokens", type=int, default=32, help="generate: max_tokens per Generate")
    p.add_argument("--channels", type=int, default=1, help="gRPC connections to spread the sessions over")
    p.add_argument("--transport", choices=TRANSPORTS, default="streams",
                   help="closed loop: 'streams', one StreamSteps stream per session; 'batched', the sessions "
                        "share one StreamStepBatches stream per connection (driven on the generated stubs); "
                        "'multiplexer', the same through the client library's StepMultiplexer")
    p.add_argument("--drain-timeout", type=float, default=LoadSpec.drain_timeout,
                   help="after the measured time, seconds to wait for answers still due (then they count as "
                        "DRAIN_TIMEOUT errors) and for the sessions' deletion: bounds a run against a server that "
                        "stopped answering")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown table here (it is also printed)")
    p.add_argument("--plot", type=Path, default=None, help="write a latency CDF PNG here")

    p = sub.add_parser("offline", help="the model step alone (no server): the limit a server can approach",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="reference", help="'reference', 'default' or a checkpoint directory")
    p.add_argument("--cache-dir", default=str(cache_dir()))
    p.add_argument("--batch", type=_ints, default=[1, 8, 64, 256], help="sessions per step (comma list)")
    p.add_argument("--chunk", type=_ints, default=[1], help="tokens per session per step (comma list)")
    p.add_argument("--sessions", type=_count, default=0, help="state slots to walk over (0 = batch)")
    p.add_argument("--duration", type=_seconds, default=5.0, help="measured seconds per cell")
    p.add_argument("--steps", type=_count, default=0, help="measured steps per cell at most (0 = no bound)")
    p.add_argument("--threads", type=_count, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quiet", action="store_true", help="do not print the table")

    p = sub.add_parser("sweep", help="the full benchmark; writes docs/benchmarks.md, docs/img/*.png")
    p.add_argument("--quick", action="store_true",
                   help="a small version (~6 min): N 1,8,64,256, 3 s cells, 10,000 sessions in the memory check")
    p.add_argument("--models", default="default,reference",
                   help="comma list: default, reference or checkpoint directories (default: default,reference)")
    p.add_argument("--sessions", type=_ints, default=None, help="N values (default 1,8,64,256,1024)")
    p.add_argument("--chunks", type=_ints, default=None, help="chunk sizes (default 1,16)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per cell (default 10)")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (default 2)")
    p.add_argument("--requests", type=int, default=None, help="measured requests per cell at most")
    p.add_argument("--offline-duration", type=float, default=None,
                   help="measured seconds per offline cell (default: as long as a served cell)")
    p.add_argument("--open-fractions", type=_floats, default=None,
                   help="open-loop rates as fractions of the closed-loop req/s at 256 sessions (default 0.5,0.8)")
    p.add_argument("--generate-sessions", type=_ints, default=None)
    p.add_argument("--generate-tokens", type=int, default=None)
    p.add_argument("--memory-sessions", type=int, default=None, help="idle sessions for the memory check (0 = skip)")
    p.add_argument("--target-repeats", type=int, default=None,
                   help="extra (served, offline) pairs at the target cells (256x1, 64x16, the 64x1 tail); their "
                        "checks take the median of the pairs (default 4, --quick 0)")
    p.add_argument("--no-unbatched", action="store_true", help="skip the --max-batch-sessions 1 server")
    p.add_argument("--no-batched", action="store_true",
                   help="skip the target cells over StreamStepBatches (the load generator's batched transport)")
    p.add_argument("--server-args", default="", help="extra lstm-serve flags for every spawned server ('--threads 1')")
    p.add_argument("--server-cpus", default=None, help="taskset -c CPUS for the server and offline runs (e.g. 0)")
    p.add_argument("--client-cpus", default=None, help="CPUs of the load generator (e.g. 1)")
    p.add_argument("--out", default=None, help="the Markdown document (default docs/benchmarks.md)")
    p.add_argument("--img-dir", default=None, help="where the PNGs go (default docs/img)")
    p.add_argument("--json", default=None, help="the raw results (default docs/benchmarks.json)")
    p.add_argument("--cache-dir", default=None)

    p = sub.add_parser("render", help="re-render the document and plots from a sweep's JSON",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("json", type=Path, help="a sweep's raw results (docs/benchmarks.json)")
    p.add_argument("--out", default=None, help="the Markdown document (default: benchmarks.md beside the JSON)")
    p.add_argument("--img-dir", default=None, help="where the PNGs go (default: img/ beside the JSON)")

    p = sub.add_parser("memory", help="idle-session RSS overhead vs raw state bytes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_server_options(p)
    p.add_argument("--sessions", type=_positive, default=100_000)
    p.add_argument("--json", type=Path, default=None)

    p = sub.add_parser("accuracy", help="loss and log-prob drift of --dtype bfloat16/float16 against float32 on "
                       "the held-out text", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'reference' or a checkpoint directory")
    p.add_argument("--cache-dir", default=str(cache_dir()))
    p.add_argument("--dtypes", default="bfloat16", help="comma list of dtypes compared with float32")
    p.add_argument("--data", default=None,
                   help="the corpus; its last 10 %% is held out (default data/tinyshakespeare.txt)")
    p.add_argument("--streams", type=int, default=64, help="sessions the held-out text is cut into")
    p.add_argument("--chunk", type=int, default=16, help="tokens per session per step")
    p.add_argument("--max-chars", type=int, default=0, help="held-out characters to use at most (0 = all)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=_count, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", type=Path, default=None)

    p = sub.add_parser("pingpong", help="the RPC floor: the same load against an echo server with no model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sessions", type=_ints, default=[64, 256], help="concurrent sessions (comma list)")
    p.add_argument("--chunk", type=_ints, default=[1, 16], help="tokens per request (comma list)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load excluded from the statistics")
    p.add_argument("--server-cpus", default=None, help="run the echo server under taskset -c CPUS (e.g. 0)")
    p.add_argument("--client-cpus", default=None, help="pin this process (the load generator) to CPUS")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")

    p = sub.add_parser("engine", help="the engine without gRPC: closed-loop sessions awaiting Engine.step "
                       "in-process", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="reference", help="'reference', 'default' or a checkpoint directory")
    p.add_argument("--cache-dir", default=str(cache_dir()))
    p.add_argument("--sessions", type=_ints, default=[64, 256], help="concurrent sessions (comma list)")
    p.add_argument("--chunk", type=_ints, default=[1, 16], help="tokens per request (comma list)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measured window")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")

    p = sub.add_parser("torchserve", help="lstm-serve against TorchServe 0.12's stateful sequence batching, "
                       "side by side (needs a TorchServe environment: make bench-torchserve)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--venv", type=Path, required=True,
                   help="a virtual environment with torchserve, torch-model-archiver, torch, safetensors, numpy")
    p.add_argument("--model", default="reference", help="'reference', 'default' or a checkpoint directory")
    p.add_argument("--cache-dir", default=str(cache_dir()))
    p.add_argument("--sessions", type=_ints, default=[256], help="concurrent sessions (comma list)")
    p.add_argument("--chunk", type=_positive, default=1, help="tokens per request")
    p.add_argument("--batch-sizes", type=_ints, default=[64, 256], help="TorchServe batchSize values to run")
    p.add_argument("--max-batch-delay-ms", type=_count, default=100, help="TorchServe's maxBatchDelay")
    p.add_argument("--duration", type=_seconds, default=10.0, help="measured seconds per cell")
    p.add_argument("--warmup", type=_seconds, default=3.0, help="seconds of load excluded from the statistics")
    p.add_argument("--rounds", type=_positive, default=2, help="every server and cell once per round")
    p.add_argument("--out", type=Path, default=DOCS / "benchmarks-torchserve.md")
    p.add_argument("--json", type=Path, default=DOCS / "benchmarks-torchserve.json")

    p = sub.add_parser("reference", help="write the reference checkpoint (if missing) and print its path")
    p.add_argument("--cache-dir", default=str(cache_dir()))
    return parser


def cmd_load(args: argparse.Namespace) -> int:
    if args.target:
        check_loopback(args.target)  # refuse before anything else happens
    if args.client_cpus:
        os.sched_setaffinity(0, parse_cpus(args.client_cpus))
    server: SpawnedServer | None = None
    target = args.target
    if args.spawn:
        extra = shlex.split(args.server_args) + (["--max-batch-sessions", "1"] if args.unbatched else [])
        cpus = args.server_cpus
        if cpus is None and args.client_cpus:
            cpus = ",".join(map(str, range(os.cpu_count() or 1)))  # do not inherit the client's pinning
        server = SpawnedServer(resolve_model(args.model, Path(args.cache_dir)), extra, cpus=cpus).start()
        target = server.target
    results: list[dict[str, Any]] = []
    try:
        for chunk in args.chunk:
            for n in args.sessions:
                spec = LoadSpec(target=target, mode=args.mode, sessions=n, chunk=chunk, duration=args.duration,
                                max_requests=args.requests, warmup=args.warmup, rate=args.rate, tokens=args.tokens,
                                generate_tokens=args.generate_tokens, channels=args.channels, seed=args.seed,
                                drain_timeout=args.drain_timeout, transport=args.transport)
                result = eventloop.run(run_load(spec))
                results.append(result)
                print(f"N={n} chunk={chunk}: {result['tokens_per_s']:,.0f} tok/s, "
                      f"p99 {(result['latency_ms'] or {}).get('p99', 0):.1f} ms, errors {result['error_count']}",
                      file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    return _emit(results, args.json, args.markdown, getattr(args, "plot", None))


def _emit(results: list[dict[str, Any]], json_path: Path | None, md_path: Path | None, plot: Path | None,
          quiet: bool = False) -> int:
    md = report.render_results(results)
    if not quiet:
        print(md)
    if json_path:
        report.write_json(json_path, results)
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(md)
    if plot:
        report.plot_results_cdf(results, plot)
    return 1 if any(r.get("error_count") for r in results) else 0


def cmd_offline(args: argparse.Namespace) -> int:
    from bench.offline import OfflineSpec, run_offline

    checkpoint = resolve_model(args.model, Path(args.cache_dir))
    results = []
    for chunk in args.chunk:
        for batch in args.batch:
            spec = OfflineSpec(checkpoint=str(checkpoint), batch=batch, chunk=chunk, sessions=args.sessions,
                               duration=args.duration, max_steps=args.steps, device=args.device, dtype=args.dtype,
                               threads=args.threads)
            results.append(run_offline(spec))
    return _emit(results, args.json, None, None, quiet=args.quiet)


def cmd_sweep(args: argparse.Namespace) -> int:
    from bench.sweep import SweepConfig, run_sweep

    overrides: dict[str, Any] = {"models": [m for m in args.models.split(",") if m]}
    for name, key in (("sessions", "sessions"), ("chunks", "chunks"), ("duration", "duration"),
                      ("warmup", "warmup"), ("requests", "max_requests"), ("offline_duration", "offline_duration"),
                      ("open_fractions", "open_fractions"), ("generate_sessions", "generate_sessions"),
                      ("generate_tokens", "generate_tokens"), ("memory_sessions", "memory_sessions"),
                      ("target_repeats", "target_repeats"),
                      ("out", "out"), ("img_dir", "img_dir"), ("json", "json_out"), ("cache_dir", "cache")):
        value = getattr(args, name)
        if value is not None:
            overrides[key] = value
    overrides.update(unbatched=not args.no_unbatched, batched=not args.no_batched,
                     server_args=shlex.split(args.server_args), server_cpus=args.server_cpus,
                     client_cpus=args.client_cpus)
    cfg = SweepConfig.quick_config(**overrides) if args.quick else SweepConfig(**overrides)
    run_sweep(cfg)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    import json

    from bench.sweep import write_outputs

    try:
        sweep = json.loads(args.json.read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"{args.json}: cannot read sweep results ({e})") from None
    out = Path(args.out) if args.out else args.json.with_name("benchmarks.md")
    img_dir = Path(args.img_dir) if args.img_dir else args.json.parent / "img"
    write_outputs(sweep, out, img_dir, None)
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from bench.sweep import memory_check

    checkpoint = resolve_model(args.model, Path(args.cache_dir))
    result = memory_check(checkpoint, args.sessions, shlex.split(args.server_args), args.server_cpus, args.model)
    print(report.render_memory(result))
    if args.json:
        report.write_json(args.json, result)
    return 0


def cmd_accuracy(args: argparse.Namespace) -> int:
    from bench.accuracy import AccuracySpec, render_accuracy, run_accuracy

    spec = AccuracySpec(checkpoint=str(resolve_model(args.model, Path(args.cache_dir))),
                        dtypes=[d.strip() for d in args.dtypes.split(",") if d.strip()], streams=args.streams,
                        chunk=args.chunk, max_chars=args.max_chars, device=args.device, threads=args.threads)
    if args.data:
        spec.data = args.data
    result = run_accuracy(spec)
    print(render_accuracy(result), end="")
    if args.json:
        report.write_json(args.json, result)
    return 0


def cmd_pingpong(args: argparse.Namespace) -> int:
    from bench.pingpong import render_pingpong, run_pingpong

    if args.client_cpus:
        os.sched_setaffinity(0, parse_cpus(args.client_cpus))
    server_cpus = args.server_cpus
    if server_cpus is None and args.client_cpus:
        server_cpus = ",".join(map(str, range(os.cpu_count() or 1)))  # do not inherit the client's pinning
    cells = [(n, chunk) for chunk in args.chunk for n in args.sessions]
    results = run_pingpong(cells, args.duration, args.warmup, server_cpus)
    print(render_pingpong(results), end="")
    if args.json:
        report.write_json(args.json, results)
    return 1 if any(r.get("error_count") for r in results) else 0


def cmd_engine(args: argparse.Namespace) -> int:
    from bench.inprocess import InProcessSpec, render_inprocess, run_inprocess

    checkpoint = resolve_model(args.model, Path(args.cache_dir))
    results = [run_inprocess(InProcessSpec(checkpoint=str(checkpoint), sessions=n, chunk=chunk,
                                           duration=args.duration, warmup=args.warmup, threads=args.threads,
                                           device=args.device, dtype=args.dtype))
               for chunk in args.chunk for n in args.sessions]
    print(render_inprocess(results), end="")
    if args.json:
        report.write_json(args.json, results)
    return 1 if any(r["mismatches"] for r in results) else 0


def cmd_torchserve(args: argparse.Namespace) -> int:
    import json

    from bench.torchserve.compare import ComparisonConfig, render_comparison, run_comparison

    cfg = ComparisonConfig(venv=args.venv, checkpoint=resolve_model(args.model, Path(args.cache_dir)),
                           model_label=args.model, sessions=args.sessions, chunk=args.chunk,
                           batch_sizes=args.batch_sizes, max_batch_delay_ms=args.max_batch_delay_ms,
                           duration=args.duration, warmup=args.warmup, rounds=args.rounds)
    result = run_comparison(cfg)
    md = render_comparison(result)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if any(c["error_count"] for c in result["cells"]) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "load":
            return cmd_load(args)
        if args.command == "offline":
            return cmd_offline(args)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "render":
            return cmd_render(args)
        if args.command == "memory":
            return cmd_memory(args)
        if args.command == "accuracy":
            return cmd_accuracy(args)
        if args.command == "pingpong":
            return cmd_pingpong(args)
        if args.command == "engine":
            return cmd_engine(args)
        if args.command == "torchserve":
            return cmd_torchserve(args)
        print(reference_checkpoint(Path(args.cache_dir)))
        return 0
    except BenchError as e:
        print(f"lstm-bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
