"""The server under test as a subprocess, and reading its /metrics.

    with SpawnedServer(checkpoint, ["--max-batch-sessions", "1"], cpus="0") as server:
        server.target        # "127.0.0.1:PORT"
        server.rss_bytes()   # resident memory of the server process
        server.scrape()      # {sample name: [(labels, value), ...]} from /metrics

The server is started with `--port 0 --port-file FILE` (it writes the port once it serves),
`--metrics-port 0` on 127.0.0.1 (the metrics port is read from its log) and a state store in
a temporary directory (at its default durability, snapshot, unless the extra flags say otherwise).
With `cpus`, it runs under `taskset -c CPUS` and with --threads = the number of CPUs
(unless the extra flags set --threads).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import BenchError

METRICS_PORT_RE = re.compile(r"metrics on :(\d+)")


def parse_cpus(spec: str) -> list[int]:
    """'0', '0,1', '0-3,6' -> sorted CPU ids."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            out.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise BenchError(f"bad CPU list {spec!r} (expected e.g. 0 or 0,1 or 0-3)") from None
    if not out:
        raise BenchError(f"bad CPU list {spec!r}")
    return sorted(out)


def server_command() -> list[str]:
    script = Path(sys.executable).with_name("lstm-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.server"]


class SpawnedServer:
    def __init__(
        self,
        checkpoint: Path | str,
        extra_args: list[str] | tuple[str, ...] = (),
        cpus: str | None = None,
        metrics: bool = True,
        start_timeout: float = 120.0,
        log_path: Path | None = None,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.extra_args = list(extra_args)
        self.cpus = cpus
        self.metrics = metrics
        self.start_timeout = start_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="lstm-bench-")
        self.log_path = log_path or Path(self._tmp.name) / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        port_file = Path(self._tmp.name) / "port"
        cmd = [*server_command(), "--checkpoint", str(self.checkpoint), "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(port_file), "--metrics-port", "0" if self.metrics else "-1",
               "--log-level", "info"]
        if "--state-dir" not in self.extra_args:
            # A store of its own: never the user's ./state, never sessions left by an earlier run.
            cmd += ["--state-dir", str(Path(self._tmp.name) / "state")]
        if self.cpus is not None and "--threads" not in self.extra_args:
            cmd += ["--threads", str(len(parse_cpus(self.cpus)))]
        cmd += self.extra_args
        if self.cpus is not None:
            cmd = ["taskset", "-c", self.cpus, *cmd]
        return cmd

    def start(self) -> SpawnedServer:
        port_file = Path(self._tmp.name) / "port"
        with open(self.log_path, "wb") as log:
            # taskset execs the server, so the pid is the server's.
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"lstm-serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"lstm-serve did not start within {self.start_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text().strip())
        if self.metrics:
            match = METRICS_PORT_RE.search(self.log_path.read_text(errors="replace"))
            self.metrics_port = int(match.group(1)) if match else None
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> SpawnedServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
        self._tmp.cleanup()

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]] | None:
        url = self.metrics_url()
        return scrape(url) if url else None


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def scrape(url: str, timeout: float = 10.0) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of a Prometheus endpoint: {sample name: [(labels, value), ...]}."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
        text = resp.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return samples


def gauge(samples: dict[str, list[tuple[dict[str, str], float]]] | None, name: str) -> float | None:
    if not samples or name not in samples:
        return None
    return sum(v for _, v in samples[name])


def histogram_delta(
    before: dict[str, Any] | None, after: dict[str, Any] | None, name: str
) -> dict[str, Any] | None:
    """What a histogram observed between two scrapes: count, mean and interpolated quantiles.

    Quantiles are interpolated linearly inside buckets (as Prometheus' histogram_quantile).
    """
    if not before or not after or f"{name}_bucket" not in after:
        return None

    def buckets(samples: dict[str, Any]) -> dict[float, float]:
        return {float(labels["le"]): v for labels, v in samples.get(f"{name}_bucket", [])}

    b0, b1 = buckets(before), buckets(after)
    count = (gauge(after, f"{name}_count") or 0.0) - (gauge(before, f"{name}_count") or 0.0)
    total = (gauge(after, f"{name}_sum") or 0.0) - (gauge(before, f"{name}_sum") or 0.0)
    if count <= 0:
        return {"count": 0}
    edges = sorted(b1)
    cum = [b1[le] - b0.get(le, 0.0) for le in edges]

    def quantile(q: float) -> float:
        rank = q * cum[-1]
        prev_edge, prev_cum = 0.0, 0.0
        for le, c in zip(edges, cum):
            if c >= rank:
                if le == float("inf"):
                    return prev_edge
                if c == prev_cum:
                    return le
                return prev_edge + (le - prev_edge) * (rank - prev_cum) / (c - prev_cum)
            prev_edge, prev_cum = le, c
        return prev_edge

    return {"count": int(count), "mean": total / count, "p50": quantile(0.5), "p90": quantile(0.9),
            "p99": quantile(0.99)}


def server_window(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """The engine's view of one load cell: step time (ms), sessions and tokens per step."""
    step = histogram_delta(before, after, "lstm_step_duration_seconds")
    if step is None:
        return None
    out: dict[str, Any] = {"steps": step.get("count", 0)}
    if step.get("count"):
        out["step_ms"] = {k: step[k] * 1e3 for k in ("mean", "p50", "p90", "p99")}
    for name, key in (("lstm_batch_sessions", "batch_sessions"), ("lstm_batch_tokens", "batch_tokens")):
        h = histogram_delta(before, after, name)
        if h and h.get("count"):
            out[f"{key}_mean"] = h["mean"]
    wait = histogram_delta(before, after, "lstm_queue_wait_seconds")
    if wait and wait.get("count"):
        out["queue_wait_ms"] = {k: wait[k] * 1e3 for k in ("mean", "p50", "p99")}
    return out


def pid_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
