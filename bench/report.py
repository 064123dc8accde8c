"""Reports: JSON, Markdown tables, the benchmarks document and PNG plots."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from service.engine import EngineLimits

P99_TARGET_MS = 150.0  # p99 at 256 sessions should stay under this
STEP_MULTIPLE = 3.0  # p99 at 64 token-by-token sessions vs this many median engine steps
TAIL_CELL = (64, 1)  # (sessions, chunk) of that latency target
# (sessions, chunk, served/offline at least this): the throughput targets.
RATIO_TARGETS = ((256, 1, 0.3), (64, 16, 0.75))
UNBATCHED_TARGET = 8.0  # served/unbatched at 256 token-by-token sessions
MEMORY_OVERHEAD_TARGET_PCT = 25.0  # idle sessions: RSS over raw state bytes


# ---- machine ---------------------------------------------------------------------------------


SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def machine_info() -> dict[str, Any]:
    import grpc
    import torch

    cpuinfo: dict[str, str] = {}  # the first CPU's fields
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            cpuinfo.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = cpuinfo.get("model name") or platform.processor() or "unknown"
    flags = set(cpuinfo.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    return {
        "cpu": cpu,
        # Hosts of one name differ in these, and the model step with them (bfloat16 is fast only
        # with AVX-512 BF16 or AMX): which of them this CPU has.
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _mem_gib(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


# ---- formatting --------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def slug(name: str) -> str:
    """A file-name-safe form of a model name ('reference', 'default' or a directory)."""
    base = Path(name.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-") or "model"


def ratio_text(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def pct(d: dict[str, Any] | None, key: str) -> float | None:
    return None if not d else d.get(key)


def table(headers: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers)))
             + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def errors_text(r: dict[str, Any]) -> str:
    errs = r.get("errors") or {}
    return ", ".join(f"{k} {v}" for k, v in errs.items()) if errs else "0"


def render_load_table(results: list[dict[str, Any]]) -> str:
    """One row per load result: throughput, latency percentiles, TTFT/ITL, errors."""
    headers = ["mode", "sessions", "chunk", "rate", "requests", "tokens", "tokens/s", "req/s", "p50 ms", "p90 ms",
               "p95 ms", "p99 ms", "max ms", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "client CPU %", "errors"]
    rows = []
    for r in results:
        lat, ttft, itl = r.get("latency_ms"), r.get("ttft_ms"), r.get("itl_ms")
        rows.append([r["mode"], r["sessions"], r["chunk"], r.get("rate_target"), r["requests"], r["tokens"],
                     r["tokens_per_s"], r["requests_per_s"], pct(lat, "p50"), pct(lat, "p90"), pct(lat, "p95"),
                     pct(lat, "p99"), pct(lat, "max"), pct(ttft, "p50"), pct(ttft, "p99"), pct(itl, "p50"),
                     pct(itl, "p99"), r.get("client_cpu_pct"), errors_text(r)])
    return table(headers, rows)


def render_offline_table(results: list[dict[str, Any]]) -> str:
    headers = ["batch", "chunk", "sessions", "steps", "tokens/s", "step p50 ms", "step p90 ms", "step p99 ms",
               "threads", "device"]
    rows = [[r["batch"], r["chunk"], r["sessions"], r["steps"], r["tokens_per_s"], pct(r["step_ms"], "p50"),
             pct(r["step_ms"], "p90"), pct(r["step_ms"], "p99"), r["threads"], r["device"]] for r in results]
    return table(headers, rows)


def render_results(results: list[dict[str, Any]]) -> str:
    """Markdown for a list of load and/or offline results."""
    parts = []
    load = [r for r in results if r.get("kind") == "load"]
    offline = [r for r in results if r.get("kind") == "offline"]
    if load:
        parts.append(render_load_table(load))
    if offline:
        parts.append(render_offline_table(offline))
    return "\n\n".join(parts) + "\n"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ---- the sweep document ----------------------------------------------------------------------


def _find(cells: list[dict[str, Any]], sessions: int, chunk: int) -> dict[str, Any] | None:
    for c in cells:
        if c.get("sessions") == sessions and c.get("chunk") == chunk:
            return c
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when b is missing or zero (a served rate of 0 is a ratio of 0, not a missing one)."""
    return a / b if a is not None and b else None


def _check(name: str, value: float, limit: float, unit: str, detail: str = "") -> dict[str, Any]:
    """A target: a latency ("ms") or overhead ("%") stays at or under its limit, a ratio ("x") reaches it."""
    ok = value >= limit if unit == "x" else value <= limit
    return {"name": name, "value": value, "limit": limit, "unit": unit, "pass": ok, "detail": detail}


def repeated_cells() -> list[tuple[int, int]]:
    """(sessions, chunk) of the cells a sweep measures again after its first pass (sweep.target_repeats):
    the throughput targets' and the tail target's."""
    return [(n, chunk) for n, chunk, _ in RATIO_TARGETS] + [TAIL_CELL]


def target_pair(served: dict[str, Any], offline: dict[str, Any] | None) -> dict[str, Any]:
    """What the report keeps of a (served, offline) pair at a target cell: the sweep's repeats
    are these, and a cell's first pass reads the same from its served and offline cells."""
    return {
        "sessions": served["sessions"],
        "chunk": served["chunk"],
        "served_tokens_per_s": served["tokens_per_s"],
        "offline_tokens_per_s": (offline or {}).get("tokens_per_s"),
        "p99_ms": (served.get("latency_ms") or {}).get("p99"),
        "server_step_p50_ms": ((served.get("server_window") or {}).get("step_ms") or {}).get("p50"),
        "offline_step_p50_ms": ((offline or {}).get("step_ms") or {}).get("p50"),
        "errors": served.get("error_count", 0),
        "transport": served.get("transport", "streams"),
        "batch_sessions_mean": (served.get("server_window") or {}).get("batch_sessions_mean"),
        "client_cpu_pct": served.get("client_cpu_pct"),
    }


def target_pairs(m: dict[str, Any], sessions: int, chunk: int) -> list[dict[str, Any]]:
    """A cell's (served, offline) pairs (target_pair): its first pass, then each repeated pair
    (sweep.target_repeats; older sweeps' repeats lack the step times)."""
    first_s, first_o = _find(m.get("served", []), sessions, chunk), _find(m.get("offline", []), sessions, chunk)
    first = [target_pair(first_s, first_o)] if first_s else []
    return first + [p for p in m.get("repeats", []) if p["sessions"] == sessions and p["chunk"] == chunk]


def target_ratios(m: dict[str, Any], sessions: int, chunk: int) -> list[float]:
    """served/offline of each of a cell's pairs (target_pairs)."""
    ratios = [_ratio(p["served_tokens_per_s"], p["offline_tokens_per_s"]) for p in target_pairs(m, sessions, chunk)]
    return [r for r in ratios if r is not None]


def model_checks(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The pass/fail statements for one model of a sweep (the issue's targets), with one StreamSteps
    stream per session."""
    checks: list[dict[str, Any]] = []
    served, unbatched = m.get("served", []), m.get("unbatched", [])
    checks += _ratio_checks(lambda n, chunk: target_pairs(m, n, chunk), "")
    c256 = _find(served, 256, 1)
    ratio = _ratio((c256 or {}).get("tokens_per_s"), (_find(unbatched, 256, 1) or {}).get("tokens_per_s"))
    if ratio is not None:
        checks.append(_check("served/unbatched at 256 sessions, chunk 1", ratio, UNBATCHED_TARGET, "x"))
    if c256:
        checks.append(_check("p99 at 256 sessions (token by token, closed loop)", _p99(c256), P99_TARGET_MS, "ms"))
    for o in m.get("open", []):
        if o.get("sessions") == 256:
            checks.append(_check(f"p99 at 256 sessions, open loop at {fmt(o.get('rate_target'), 0)} req/s",
                                 _p99(o), P99_TARGET_MS, "ms"))
    return checks + _tail_checks(target_pairs(m, *TAIL_CELL), "")


BATCHED = "StreamStepBatches: "  # how the checks of the batched transport are named


def batched_checks(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The same targets with the load generator's sessions sharing one StreamStepBatches stream
    (the sweep's "batched" pairs): the first pair stands for the first pass, as in model_checks."""
    pairs = m.get("batched", [])
    if not pairs:
        return []

    def of(n: int, chunk: int) -> list[dict[str, Any]]:
        return [p for p in pairs if p["sessions"] == n and p["chunk"] == chunk]

    checks = _ratio_checks(of, BATCHED)
    first256 = next(iter(of(256, 1)), None)
    if first256:
        unbatched = (_find(m.get("unbatched", []), 256, 1) or {}).get("tokens_per_s")
        ratio = _ratio(first256["served_tokens_per_s"], unbatched)
        if ratio is not None:
            checks.append(_check(f"{BATCHED}served/unbatched at 256 sessions, chunk 1", ratio, UNBATCHED_TARGET, "x"))
        checks.append(_check(f"{BATCHED}p99 at 256 sessions (token by token, closed loop)", _p99_of(first256),
                             P99_TARGET_MS, "ms"))
    return checks + _tail_checks(of(*TAIL_CELL), BATCHED)


def _ratio_checks(pairs_of: Callable[[int, int], list[dict[str, Any]]], prefix: str) -> list[dict[str, Any]]:
    checks = []
    for n, chunk, target in RATIO_TARGETS:
        pairs = pairs_of(n, chunk)
        ratios = [r for r in (_ratio(p["served_tokens_per_s"], p["offline_tokens_per_s"]) for p in pairs)
                  if r is not None]
        name = f"{prefix}served/offline at {n} sessions, chunk {chunk}"
        if not ratios and pairs:  # measured, but no offline reading to divide by
            checks.append(_check(name, 0.0, target, "x", "no offline reading"))
        if ratios:
            detail = (f"median of {len(ratios)} pairs: {', '.join(f'{r:.2f}×' for r in ratios)}"
                      if len(ratios) > 1 else "")
            checks.append(_check(name, statistics.median(ratios), target, "x", detail))
    return checks


def _tail_checks(tail_runs: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    checks = []
    for key, source in (("server_step_p50_ms", "server /metrics lstm_step_duration_seconds (bucket-interpolated)"),
                        ("offline_step_p50_ms", f"offline runner.execute at batch {TAIL_CELL[0]}")):
        # Each run's p99 against its own step times (the VM's speed moves between runs, and within
        # one: a phase of slower cycles is the p99 of its run), and the run whose p99 / limit is the
        # median decides, as the median pair does for the throughput targets.
        runs = [(_p99_of(p), STEP_MULTIPLE * p[key]) for p in tail_runs if p.get(key)]
        if not runs:
            continue
        by_ratio = sorted(runs, key=lambda r: r[0] / r[1])
        p99, limit = by_ratio[(len(by_ratio) - 1) // 2]  # the lower median of an even count
        detail = (f"median of {len(runs)} runs by p99 / limit: "
                  + ", ".join(f"{fmt(v, 1)} / {fmt(lim, 1)}" for v, lim in runs)) if len(runs) > 1 else ""
        checks.append(_check(f"{prefix}p99 at {TAIL_CELL[0]} sessions (token by token) vs {STEP_MULTIPLE:g}x median "
                             f"step ({source}: {fmt(limit / STEP_MULTIPLE, 2)} ms)", p99, limit, "ms", detail))
    return checks


def _p99_of(pair: dict[str, Any]) -> float:
    """A pair's served p99 in ms; infinite when nothing was answered."""
    p99 = pair.get("p99_ms")
    return math.inf if p99 is None else float(p99)


def _p99(cell: dict[str, Any]) -> float:
    """A cell's p99 latency in ms; infinite when nothing was answered (a failed target, not a missing one)."""
    return float((cell.get("latency_ms") or {}).get("p99", math.inf))


def render_check(c: dict[str, Any]) -> str:
    mark = "PASS" if c["pass"] else "FAIL"
    detail = f"; {c['detail']}" if c.get("detail") else ""
    if c["unit"] in ("ms", "%"):
        value = "no answers" if math.isinf(c["value"]) else f"{fmt(c['value'], 1)} {c['unit']}"
        return f"- **{mark}** {c['name']}: {value} (limit {fmt(c['limit'], 1)} {c['unit']}{detail})"
    # Two decimals, or three where two would round a miss up to the target (0.297 is not 0.30).
    digits = 2 if (round(c["value"], 2) >= c["limit"]) == c["pass"] else 3
    return f"- **{mark}** {c['name']}: {c['value']:.{digits}f}× (target ≥ {c['limit']:g}×{detail})"


def _model_title(m: dict[str, Any]) -> str:
    c = m.get("model") or {}
    if not c:
        return m["name"]
    return (f"{m['name']} — {c.get('cell_type', '?').upper()} {c.get('num_layers')}×{c.get('hidden_size')}, "
            f"embedding {c.get('embedding_size')}, vocab {c.get('vocab_size')}")


def render_model_section(m: dict[str, Any], img_prefix: str) -> str:
    out = [f"## Model: {_model_title(m)}", ""]
    if m.get("skipped"):
        out += [f"_Skipped: {m['skipped']}_", ""]
        return "\n".join(out)
    out += [f"Checkpoint `{m.get('checkpoint')}`" + (f" (sha256 {m['sha256'][:12]}…)" if m.get("sha256") else "")
            + ".", ""]
    served, unb, off = m.get("served", []), m.get("unbatched", []), m.get("offline", [])
    sessions = sorted({c["sessions"] for c in served + unb})
    chunks = sorted({c["chunk"] for c in served + unb})

    out += ["### Throughput (closed loop, tokens/s)", "",
            "Served = lstm-serve with continuous batching; offline = `ModelRunner.execute` alone at the same "
            "batch (min(N, max batch)); unbatched = the same server with `--max-batch-sessions 1`.", ""]
    rows = []
    for chunk in chunks:
        for n in sessions:
            s, u, o = _find(served, n, chunk), _find(unb, n, chunk), _find(off, n, chunk)
            sw = (s or {}).get("server_window") or {}
            rows.append([n, chunk, (s or {}).get("tokens_per_s"), (o or {}).get("tokens_per_s"),
                         (u or {}).get("tokens_per_s"),
                         ratio_text(_ratio((s or {}).get("tokens_per_s"), (o or {}).get("tokens_per_s"))),
                         ratio_text(_ratio((s or {}).get("tokens_per_s"), (u or {}).get("tokens_per_s"))),
                         sw.get("batch_sessions_mean"), (o or {}).get("batch"),
                         (s or {}).get("server_cpu_pct"), (s or {}).get("client_cpu_pct")])
    out += [table(["N", "chunk", "served", "offline", "unbatched", "served/offline", "served/unbatched",
                   "mean batch (served)", "offline batch", "server CPU %", "client CPU %"], rows), ""]

    for title, cells in (("Served latency (closed loop, ms per request)", served),
                         ("Unbatched latency (closed loop, ms per request)", unb)):
        rows = []
        for chunk in chunks:
            for n in sessions:
                c = _find(cells, n, chunk)
                if not c:
                    continue
                lat = c.get("latency_ms") or {}
                step = (c.get("server_window") or {}).get("step_ms") or {}
                rows.append([n, chunk, c["requests"], c["requests_per_s"], lat.get("p50"), lat.get("p90"),
                             lat.get("p95"), lat.get("p99"), lat.get("max"), step.get("p50"), errors_text(c)])
        if rows:
            out += [f"### {title}", "",
                    table(["N", "chunk", "requests", "req/s", "p50", "p90", "p95", "p99", "max",
                           "engine step p50", "errors"], rows), ""]

    if off:
        out += ["### Offline limit (no server)", "", render_offline_table(off), ""]

    if m.get("repeats"):
        rows = []
        for n, chunk in repeated_cells():
            pairs = target_pairs(m, n, chunk)
            for i, p in enumerate(pairs if len(pairs) > 1 else [], 1):
                s_tps, o_tps = p["served_tokens_per_s"], p["offline_tokens_per_s"]
                rows.append([n, chunk, i, s_tps, o_tps, ratio_text(_ratio(s_tps, o_tps)), p.get("p99_ms"),
                             p.get("server_step_p50_ms"), p.get("offline_step_p50_ms")])
        out += ["### The target cells, pair by pair", "",
                "Pair 1 is the cell of the tables above; the others ran again after the whole first pass, each "
                "served cell followed by its offline cell. The checks below take the median ratio, and for the "
                f"{TAIL_CELL[0]}-session tail the run whose p99 / ({STEP_MULTIPLE:g} x its median step) is the median.",
                "",
                table(["N", "chunk", "pair", "served tokens/s", "offline tokens/s", "served/offline", "p99 ms",
                       "server step p50 ms", "offline step p50 ms"], rows), ""]

    opens = m.get("open", [])
    if opens:
        rows = []
        for o in opens:
            lat, lag = o.get("latency_ms") or {}, o.get("send_lag_ms") or {}
            rows.append([o["sessions"], o["chunk"], o.get("rate_target"), o["requests_per_s"], o["tokens_per_s"],
                         lat.get("p50"), lat.get("p90"), lat.get("p99"), lat.get("max"), lag.get("p99"),
                         errors_text(o)])
        out += ["### Open loop (Poisson arrivals; latency from the scheduled send time)", "",
                table(["N", "chunk", "target req/s", "req/s", "tokens/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
                       "client send lag p99 ms", "errors"], rows), ""]

    gens = m.get("generate", [])
    if gens:
        rows = []
        for g in gens:
            ttft, itl = g.get("ttft_ms") or {}, g.get("itl_ms") or {}
            rows.append([g["sessions"], g.get("generate_tokens"), g["requests"], g["tokens_per_s"], ttft.get("p50"),
                         ttft.get("p99"), itl.get("p50"), itl.get("p99"), itl.get("max"), errors_text(g)])
        out += ["### Generate (closed loop)", "",
                table(["N", "max_tokens", "requests", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
                       "ITL p99 ms", "ITL max ms", "errors"], rows), ""]

    for kind, caption in (("throughput", "Throughput against concurrency"),
                          ("latency-cdf", "Served latency distribution")):
        img = m.get("plots", {}).get(kind)
        if img:
            out += [f"![{caption}]({img_prefix}{Path(img).name})", ""]

    checks = model_checks(m)
    if checks:
        out += ["### Checks", ""]
        out += [render_check(c) for c in checks]
        out.append("")
    batched = m.get("batched", [])
    if batched:
        rows = [[p["sessions"], p["chunk"], p["served_tokens_per_s"], p["offline_tokens_per_s"],
                 ratio_text(_ratio(p["served_tokens_per_s"], p["offline_tokens_per_s"])), p.get("p99_ms"),
                 p.get("server_step_p50_ms"), p.get("offline_step_p50_ms"), p.get("batch_sessions_mean"),
                 p.get("client_cpu_pct"), p.get("errors")]
                for n, chunk in repeated_cells() for p in batched if (p["sessions"], p["chunk"]) == (n, chunk)]
        out += ["### Batched transport: the target cells over StreamStepBatches", "",
                "The same server and closed loop, but the load generator's sessions share one "
                "`StreamStepBatches` stream (what a gateway serving many users' sessions would do; the load "
                "generator drives it on the generated stubs, as it does `StreamSteps`, so its own cost stays "
                "small): steps asked for while a message is being written go out together, and the answers of "
                "one engine step to the stream go back as one message. Each served cell is followed by its "
                "offline cell, as above. The client library's `StepMultiplexer` does the same with typed "
                "results; `lstm-bench load --transport multiplexer` measures it.", "",
                table(["N", "chunk", "served tokens/s", "offline tokens/s", "served/offline", "p99 ms",
                       "server step p50 ms", "offline step p50 ms", "mean batch (served)", "client CPU %",
                       "errors"], rows), "",
                "### Checks, batched transport", ""]
        out += [render_check(c) for c in batched_checks(m)]
        out.append("")
    return "\n".join(out)


def render_memory(mem: dict[str, Any] | None) -> str:
    out = ["## Memory: idle sessions", ""]
    if not mem:
        return "\n".join(out + ["_Not measured._", ""])
    if mem.get("skipped"):
        return "\n".join(out + [f"_Skipped: {mem['skipped']}_", ""])
    mib = 2**20
    out += [
        f"{mem['sessions']:,} sessions created through the server (CreateSession, model `{mem['model']}`), "
        f"then the server process's RSS compared with the raw bytes of their states "
        f"({mem['slot_bytes']:,} bytes per session: {mem['state_layout']}).", "",
        table(["sessions", "raw state MiB", "slab MiB (engine)", "RSS before MiB", "RSS after MiB", "RSS delta MiB",
               "overhead vs raw", "overhead per session", "create rate /s"],
              [[mem["sessions"], mem["raw_state_bytes"] / mib,
                mem["slab_bytes"] / mib if mem.get("slab_bytes") else None,
                mem["rss_before_bytes"] / mib, mem["rss_after_bytes"] / mib, mem["rss_delta_bytes"] / mib,
                f"{mem['overhead_pct']:.1f} %", f"{mem['overhead_per_session_bytes']:,.0f} B",
                mem.get("create_rate_per_s")]]),
        "",
        "Overhead = (RSS delta − raw state bytes) / raw state bytes: the session records, indexes and any "
        "spare slab capacity.", "",
        render_check(_check(f"memory overhead of {mem['sessions']:,} idle sessions over raw state bytes",
                            mem["overhead_pct"], MEMORY_OVERHEAD_TARGET_PCT, "%")), "",
    ]
    return "\n".join(out)


def render_rpc_floor(floor: list[dict[str, Any]], models: list[dict[str, Any]]) -> str:
    """The echo-server cells, and the ceiling they put on each model's served/offline ratio."""
    from bench.pingpong import render_pingpong

    out = [
        "## RPC floor (no model)", "",
        "`lstm-bench pingpong`: the same closed-loop load against an echo server on lstm-serve's stack (grpc.aio, "
        "the same event loop, `StreamSteps` on `context.read()`/`write()`) that answers each request at once with "
        "a response of the served shape (one output per token, top-5). What Python gRPC alone allows here; CPU per "
        "request counts both processes.", "",
        render_pingpong(floor).rstrip(), "",
        "Ceiling if the RPC work and the model shared the cores perfectly (no idle, no contention): one token costs "
        "the floor's time plus the offline model's, so ceiling = 1 / (1 / floor tokens/s + 1 / offline tokens/s).",
        "",
    ]
    rows = []
    for m in models:
        for cell in floor:
            n, chunk = cell["sessions"], cell["chunk"]
            served, offline = _find(m.get("served", []), n, chunk), _find(m.get("offline", []), n, chunk)
            if not (served and offline and cell["tokens_per_s"] and offline["tokens_per_s"]):
                continue
            ceiling = 1.0 / (1.0 / cell["tokens_per_s"] + 1.0 / offline["tokens_per_s"])
            rows.append([m["name"], n, chunk, cell["tokens_per_s"], offline["tokens_per_s"], ceiling,
                         f"{ceiling / offline['tokens_per_s']:.2f}×", served["tokens_per_s"],
                         f"{served['tokens_per_s'] / offline['tokens_per_s']:.2f}×",
                         f"{100 * served['tokens_per_s'] / ceiling:.0f} %"])
    if rows:
        out += [table(["model", "N", "chunk", "floor tokens/s", "offline tokens/s", "ceiling tokens/s",
                       "ceiling/offline", "served tokens/s", "served/offline", "served/ceiling"], rows), ""]
    rows = []
    for m in models:
        for engine in m.get("engine", []):
            n, chunk = engine["sessions"], engine["chunk"]
            served, offline = _find(m.get("served", []), n, chunk), _find(m.get("offline", []), n, chunk)
            off_tps, served_tps = (offline or {}).get("tokens_per_s"), (served or {}).get("tokens_per_s")
            rows.append([m["name"], n, chunk, off_tps, engine["tokens_per_s"],
                         ratio_text(_ratio(engine["tokens_per_s"], off_tps)), engine.get("mean_batch"),
                         engine.get("step_ms_mean"), engine.get("hold_ms_mean"), served_tps,
                         ratio_text(_ratio(served_tps, engine["tokens_per_s"]))])
    if rows:
        out += [
            "The engine without gRPC (`lstm-bench engine`, a process of its own on the server's CPUs, right after "
            "the offline cell): the same closed loop, each session a coroutine awaiting `Engine.step` on "
            "lstm-serve's event loop, the engine at its defaults. What it loses against offline is the engine's "
            "(holds, Python per row, the hop to the engine thread and back); what served loses against it is "
            "gRPC's.", "",
            table(["model", "N", "chunk", "offline tokens/s", "engine tokens/s", "engine/offline", "mean batch",
                   "step ms", "hold ms", "served tokens/s", "served/engine"], rows), "",
        ]
    return "\n".join(out) + "\n"


def render_sweep(sweep: dict[str, Any], img_prefix: str = "img/") -> str:
    mach, cfg = sweep["machine"], sweep["config"]
    out = [
        "# Benchmarks", "",
        f"Generated by `lstm-bench sweep{' --quick' if cfg.get('quick') else ''}` (`make bench`) on "
        f"{mach['date']}; the sweep took {fmt(sweep.get('elapsed_s', 0.0) / 60, 1)} min. "
        f"Raw results: `{cfg.get('json_name', 'benchmarks.json')}`. Re-run with `make bench`; "
        "`lstm-bench sweep --help` lists the knobs.", "",
        "## Machine", "",
        table(["CPU", "SIMD", "cores", "memory GiB", "torch", "server torch threads", "grpcio", "python",
               "server CPUs", "client CPUs", "load avg at start"],
              [[mach["cpu"], " ".join(mach.get("simd") or []) or "–", mach["cores"], mach.get("memory_gib"),
                mach["torch"],
                cfg.get("server_threads", mach.get("torch_threads")), mach["grpcio"], mach["python"],
                cfg.get("server_cpus") or "any", cfg.get("client_cpus") or "any",
                mach.get("loadavg_1m")]]),
        "",
        *([f"**The machine was busy when the sweep started (1-minute load average {mach['loadavg_1m']:.2f} on "
           f"{mach['cores']} cores): these numbers understate what it can do.**", ""]
          if (mach.get("loadavg_1m") or 0) > 0.5 * (mach.get("cores") or 1) else []),
        "## Method", "",
        f"- Load generator: `bench/loadgen.py`, one asyncio process using the generated gRPC stubs directly. "
        f"Closed loop: N sessions, each with one `StreamSteps` stream, sending its next chunk when the previous "
        f"answer arrives. Every cell runs {fmt(cfg['warmup'], 1)} s of warm-up (excluded) and then "
        f"{fmt(cfg['duration'], 1)} s measured"
        + (f" or {cfg['max_requests']:,} requests, whichever ends first" if cfg.get("max_requests") else "")
        + ". Tokens are random ids; top_k = 5 per token. Throughput counts the answers (tokens) received "
        "within the measured window, divided by its length; latencies are those of the requests sent in it.",
        "- Open loop: Poisson arrivals at a fixed aggregate rate spread over the sessions; latency is measured "
        "from the scheduled send time, so queueing anywhere is counted.",
        "- Offline: `service.runner.ModelRunner.execute` in a process of its own (same CPUs and threads as the "
        "server): gather state rows, one model call, scatter, log-softmax, top-k 5, copy to host; batch = "
        "min(N, max batch sessions, max batch tokens / chunk)"
        + (f", {fmt(cfg['offline_duration'], 1)} s measured" if cfg.get("offline_duration") else "")
        + ". Each offline cell runs right after the served cell of the same N and chunk (the server idles "
        "meanwhile), so a ratio divides two measurements taken together."
        + (f" The target cells (256 x 1, 64 x 16 and the 64 x 1 tail) run {cfg['target_repeats']} more such pairs "
           "after the first pass, and their checks take the median of all the pairs." if cfg.get("target_repeats")
           else ""),
        "- Server: `lstm-serve` spawned per model at its defaults (durability snapshot every 5 s into a state "
        f"store in a temporary directory, `--max-batch-wait-ms {EngineLimits.max_batch_wait_ms:g}`)"
        + (f" plus `{' '.join(cfg['server_args'])}`" if cfg.get("server_args") else "") + ".",
        "- Unbatched: the same server with `--max-batch-sessions 1`.",
        "- Engine step times come from the server's `lstm_step_duration_seconds` histogram (differences of two "
        "scrapes, quantiles interpolated within buckets).",
        "- Client CPU % above ~90 % means the load generator, not the server, may be the limit of that cell.",
        "",
    ]
    for m in sweep.get("models", []):
        out.append(render_model_section(m, img_prefix))
    if sweep.get("rpc_floor"):
        out.append(render_rpc_floor(sweep["rpc_floor"], sweep.get("models", [])))
    out.append(render_memory(sweep.get("memory")))
    notes = sweep.get("notes")
    if notes:
        out += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out).rstrip() + "\n"


# ---- plots -------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(m: dict[str, Any], path: Path) -> Path:
    """Tokens/s against sessions: served, offline, unbatched; one panel per chunk size."""
    plt = _pyplot()
    series = (("served", "served (batched)", "o-"), ("offline", "offline limit", "s--"),
              ("unbatched", "unbatched server", "^:"))
    chunks = sorted({c["chunk"] for key, _, _ in series for c in m.get(key, [])})
    fig, axes = plt.subplots(1, max(1, len(chunks)), figsize=(5.5 * max(1, len(chunks)), 4), squeeze=False)
    for ax, chunk in zip(axes[0], chunks):
        for key, label, style in series:
            cells = sorted((c for c in m.get(key, []) if c["chunk"] == chunk), key=lambda c: c["sessions"])
            if cells:
                ax.plot([c["sessions"] for c in cells], [c["tokens_per_s"] for c in cells], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{slug(m['name'])}: chunk {chunk}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_cdf(m: dict[str, Any], path: Path) -> Path:
    """Served request latency CDF per number of sessions; one panel per chunk size."""
    plt = _pyplot()
    served = [c for c in m.get("served", []) if c.get("latency_cdf_ms")]
    chunks = sorted({c["chunk"] for c in served})
    fig, axes = plt.subplots(1, max(1, len(chunks)), figsize=(5.5 * max(1, len(chunks)), 4), squeeze=False)
    for ax, chunk in zip(axes[0], chunks):
        for c in sorted((c for c in served if c["chunk"] == chunk), key=lambda c: c["sessions"]):
            pts = c["latency_cdf_ms"]
            ax.plot(pts, [i / (len(pts) - 1) for i in range(len(pts))], label=f"N={c['sessions']}")
        ax.axvline(P99_TARGET_MS, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("request latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{slug(m['name'])}: served, chunk {chunk}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results_cdf(results: list[dict[str, Any]], path: Path) -> Path:
    """Latency CDF of ad-hoc load results (lstm-bench load --plot)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        pts = r.get("latency_cdf_ms") or []
        if pts:
            ax.plot(pts, [i / (len(pts) - 1) for i in range(len(pts))],
                    label=f"{r['mode']} N={r['sessions']} chunk={r['chunk']}")
    ax.set_xscale("log")
    ax.set_xlabel("request latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
