"""Prometheus metrics of lstm-serve.

Every metric lives in the `CollectorRegistry` of one `Metrics` instance (never the
process-global default registry), so one process may run several servers, e.g. in
tests. Names carry the `lstm_` prefix and base units (seconds, bytes). No metric has
a session id (or any other unbounded value) as a label.

    metrics = Metrics()
    stop, port = start_metrics_http_server(metrics, "127.0.0.1", 9400)  # port 0: any free port
    metrics.record_request("Step", "OK", 0.0042)
    ...
    stop()
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client import generate_latest as _generate_latest

PREFIX = "lstm_"

# The RPCs of lstmserve.v1.LstmService; their label sets are pre-initialised.
METHODS = (
    "GetModelInfo",
    "CreateSession",
    "GetSession",
    "DeleteSession",
    "ResetSession",
    "ForkSession",
    "Step",
    "StreamSteps",
    "StreamStepBatches",
    "Generate",
)
TOKEN_KINDS = ("input", "generated")

# Latencies: 100 us .. 10 s, roughly 1-2.5-5 per decade.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)
# Engine steps and holds: mostly 2-100 ms, where a 1-2.5-5 ladder cannot tell a 9 ms step from a
# 16 ms one (interpolated quantiles land anywhere between two bounds); here neighbouring bounds
# are at most a third apart from 3 ms to 100 ms.
STEP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008,
    0.010, 0.012, 0.015, 0.020, 0.025, 0.030, 0.040, 0.050, 0.060, 0.080,
    0.100, 0.125, 0.150, 0.200, 0.250, 0.500, 1.0, 2.5, 5.0, 10.0,
)
# Batch sizes: powers of two, 1 .. 4096.
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))


class StepHistogram(Histogram):
    """A Histogram that also takes many observations at once, for values the engine observes
    per row of a step: `observe` locks the sum and a bucket per value (~2.5 us, ~0.6 ms per
    step of 256 sessions on the engine thread); `observe_many` locks each once per call."""

    def observe_many(self, amounts: Sequence[float]) -> None:
        if not amounts:
            return
        self._raise_if_not_observable()
        bounds = self._upper_bounds
        counts = [0] * len(bounds)
        for amount in amounts:
            counts[bisect_left(bounds, amount)] += 1  # the first bound >= amount, as observe() picks
        self._sum.inc(sum(amounts))
        for bucket, n in zip(self._buckets, counts):
            if n:
                bucket.inc(n)


class Metrics:
    """All metrics of one server, in a registry of its own (`self.registry`)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process_metrics: bool = True) -> None:
        # The *_created series (a timestamp per counter/histogram child) double the output and
        # no dashboard uses them. The switch is process-wide; this process is the server.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        # RPCs
        self.requests_total = Counter(
            "lstm_requests", "RPCs finished, by method and gRPC status code.", ["method", "code"], registry=r
        )
        self.request_duration_seconds = Histogram(
            "lstm_request_duration_seconds",
            "Time from the start of an RPC to its end (the whole stream for streaming RPCs).",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_total = Counter(
            "lstm_tokens", "Tokens processed: kind=input fed by clients, kind=generated sampled.", ["kind"], registry=r
        )

        # Engine (batching)
        self.batch_sessions = Histogram(
            "lstm_batch_sessions", "Sessions run together in one engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "lstm_batch_tokens", "Tokens run together in one engine step.", buckets=BATCH_BUCKETS, registry=r
        )
        self.step_duration_seconds = Histogram(
            "lstm_step_duration_seconds",
            "Time of one engine step (one batched forward pass).",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = StepHistogram(
            "lstm_queue_wait_seconds",
            "Time a unit of work waited in the engine queue before its step started.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_hold_seconds = Histogram(
            "lstm_batch_hold_seconds",
            "Time a step was held for the sessions the previous step answered (--max-batch-wait-ms).",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("lstm_queue_depth", "Units of work waiting in the engine queue.", registry=r)

        # Generation latency
        self.time_to_first_token_seconds = Histogram(
            "lstm_time_to_first_token_seconds",
            "Time from the start of a Generate call to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency_seconds = Histogram(
            "lstm_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one Generate call.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # Sessions
        self.sessions_active = Gauge("lstm_sessions_active", "Sessions that currently exist.", registry=r)
        self.sessions_created_total = Counter(
            "lstm_sessions_created", "Sessions created (by CreateSession or ForkSession).", registry=r
        )
        self.sessions_expired_total = Counter(
            "lstm_sessions_expired", "Sessions removed because their idle time-to-live passed.", registry=r
        )
        self.sessions_deleted_total = Counter(
            "lstm_sessions_deleted", "Sessions removed by DeleteSession.", registry=r
        )
        self.sessions_evicted_total = Counter(
            "lstm_sessions_evicted",
            "Sessions moved off the device to the state store to make room (--max-resident-sessions), "
            "least recently used first.",
            registry=r,
        )
        self.sessions_restored_total = Counter(
            "lstm_sessions_restored", "Sessions brought back onto the device from the state store.", registry=r
        )
        self.stream_pending_answer_bytes = Gauge(
            "lstm_stream_pending_answer_bytes",
            "Answers due on StreamSteps and StreamStepBatches calls (requested, not yet sent), in bytes (about).",
            registry=r,
        )
        self.state_memory_bytes = Gauge(
            "lstm_state_memory_bytes",
            "Memory allocated for recurrent states (the state slab's capacity; it grows, never shrinks).",
            registry=r,
        )

        # Model identity: one series of value 1 whose labels describe the served model.
        self.model_info = Gauge(
            "lstm_model_info",
            "The served model; the value is always 1.",
            ["checkpoint_sha256", "cell_type", "num_layers", "hidden_size", "device", "dtype"],
            registry=r,
        )

        for kind in TOKEN_KINDS:
            self.tokens_total.labels(kind=kind)
        for method in METHODS:
            self.requests_total.labels(method=method, code="OK")
            self.request_duration_seconds.labels(method=method)

    def set_model_info(
        self,
        *,
        checkpoint_sha256: str,
        cell_type: str,
        num_layers: int,
        hidden_size: int,
        device: str,
        dtype: str,
    ) -> None:
        """Replace the model_info series (there is only ever one)."""
        self.model_info.clear()
        self.model_info.labels(
            checkpoint_sha256=checkpoint_sha256,
            cell_type=cell_type,
            num_layers=str(num_layers),
            hidden_size=str(hidden_size),
            device=device,
            dtype=dtype,
        ).set(1)

    def record_request(self, method: str, code: Any, seconds: float | None) -> None:
        """Count one finished RPC. `code` is a grpc.StatusCode or its name ("OK", "NOT_FOUND", ...).
        `seconds` None: counted only (a call refused before it ran has no duration worth a bucket)."""
        code_name = getattr(code, "name", None) or str(code)
        self.requests_total.labels(method=method, code=code_name).inc()
        if seconds is not None:
            self.request_duration_seconds.labels(method=method).observe(seconds)

    def metric_names(self) -> set[str]:
        """Every sample name this registry can expose (`lstm_requests_total`, `..._bucket`, ...).

        Derived from the metric types, so it includes series of labelled metrics that have
        no children yet. Used to check that dashboards only query metrics that exist.
        """
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"),
            "info": ("_info",),
        }
        names: set[str] = set()
        for family in self.registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
        return names


def render(metrics: Metrics) -> bytes:
    """The registry in the Prometheus text exposition format (what /metrics serves)."""
    return _generate_latest(metrics.registry)


def start_metrics_http_server(metrics: Metrics, host: str, port: int) -> tuple[Callable[[], None], int]:
    """Serve /metrics over HTTP on a daemon thread.

    Returns a callable that stops the server (idempotent) and the bound port, which is
    the real one when `port` is 0.
    """
    httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    bound_port = int(httpd.server_address[1])
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return stop, bound_port
