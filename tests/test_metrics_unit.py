"""Unit tests of service/metrics.py and service/logs.py (no server, no model)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.logs import configure_logging, short_id
from service.metrics import METHODS, Metrics, render, start_metrics_http_server

PROMTOOL_HINT = "promtool not found on PATH; install it with: apt-get update && apt-get install -y prometheus"

SHA = "0123456789abcdef" * 4
SESSION_ID = "s3cr3tSessionIdAAAAAAAAAAAAAAAAAAAAAAAA"

EXPECTED = {  # family name (as the parser reports it) -> type
    "lstm_requests": "counter",
    "lstm_request_duration_seconds": "histogram",
    "lstm_tokens": "counter",
    "lstm_batch_sessions": "histogram",
    "lstm_batch_tokens": "histogram",
    "lstm_step_duration_seconds": "histogram",
    "lstm_queue_wait_seconds": "histogram",
    "lstm_batch_hold_seconds": "histogram",
    "lstm_queue_depth": "gauge",
    "lstm_time_to_first_token_seconds": "histogram",
    "lstm_inter_token_latency_seconds": "histogram",
    "lstm_sessions_active": "gauge",
    "lstm_sessions_created": "counter",
    "lstm_sessions_expired": "counter",
    "lstm_sessions_deleted": "counter",
    "lstm_sessions_evicted": "counter",
    "lstm_sessions_restored": "counter",
    "lstm_stream_pending_answer_bytes": "gauge",
    "lstm_state_memory_bytes": "gauge",
    "lstm_model_info": "gauge",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(PROMTOOL_HINT)
    return path


def busy_metrics() -> Metrics:
    """A Metrics with a value in every metric, as a running server would have."""
    m = Metrics()
    m.set_model_info(checkpoint_sha256=SHA, cell_type="lstm", num_layers=2, hidden_size=512, device="cpu",
                     dtype="float32")
    m.record_request("Step", "OK", 0.003)
    m.record_request("GetSession", "NOT_FOUND", 0.0002)
    m.tokens_total.labels(kind="input").inc(17)
    m.tokens_total.labels(kind="generated").inc(5)
    m.batch_sessions.observe(3)
    m.batch_tokens.observe(40)
    m.step_duration_seconds.observe(0.002)
    m.queue_wait_seconds.observe(0.0005)
    m.queue_depth.set(2)
    m.time_to_first_token_seconds.observe(0.01)
    m.inter_token_latency_seconds.observe(0.004)
    m.sessions_active.set(4)
    m.sessions_created_total.inc(5)
    m.sessions_expired_total.inc()
    m.sessions_deleted_total.inc()
    m.sessions_evicted_total.inc()
    m.sessions_restored_total.inc()
    m.state_memory_bytes.set(4 * 2 * 2 * 512 * 4)
    return m


def families(m: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(render(m).decode())}


def sample(fams: dict, family: str, name: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name}{labels} in {family}")


# --- metrics -------------------------------------------------------------------------------


def test_exposition_has_every_metric_with_its_type() -> None:
    fams = families(busy_metrics())
    for name, kind in EXPECTED.items():
        assert name in fams, f"{name} missing from /metrics"
        assert fams[name].type == kind, f"{name}: type {fams[name].type}, want {kind}"
        assert fams[name].documentation.strip(), f"{name} has no help text"


def test_values_recorded_show_up() -> None:
    fams = families(busy_metrics())
    assert sample(fams, "lstm_tokens", "lstm_tokens_total", kind="input") == 17
    assert sample(fams, "lstm_tokens", "lstm_tokens_total", kind="generated") == 5
    assert sample(fams, "lstm_requests", "lstm_requests_total", method="GetSession", code="NOT_FOUND") == 1
    assert sample(fams, "lstm_request_duration_seconds", "lstm_request_duration_seconds_count", method="Step") == 1
    assert sample(fams, "lstm_batch_tokens", "lstm_batch_tokens_bucket", le="64.0") == 1
    assert sample(fams, "lstm_batch_tokens", "lstm_batch_tokens_bucket", le="32.0") == 0
    assert sample(fams, "lstm_sessions_active", "lstm_sessions_active") == 4


def test_observe_many_matches_observe_one_by_one() -> None:
    # The engine observes a step's queue waits at once; the exposition must be what one
    # observe() per value gives, bucket bounds included (le is inclusive) and past the last bound.
    values = [0.0, 0.0001, 0.00010001, 0.0025, 0.003, 0.05, 9.99, 10.0, 12.5, 0.0004]
    one_by_one, at_once = Metrics(process_metrics=False), Metrics(process_metrics=False)
    for v in values:
        one_by_one.queue_wait_seconds.observe(v)
    at_once.queue_wait_seconds.observe_many(values[:4])
    at_once.queue_wait_seconds.observe_many([])
    at_once.queue_wait_seconds.observe_many(values[4:])
    want = {(s.name, s.labels.get("le")): s.value for s in families(one_by_one)["lstm_queue_wait_seconds"].samples}
    got = {(s.name, s.labels.get("le")): s.value for s in families(at_once)["lstm_queue_wait_seconds"].samples}
    assert got == pytest.approx(want)
    assert got[("lstm_queue_wait_seconds_count", None)] == len(values)
    assert got[("lstm_queue_wait_seconds_bucket", "0.0001")] == 2  # 0.0 and the bound itself
    assert got[("lstm_queue_wait_seconds_bucket", "10.0")] == len(values) - 1  # 12.5 only in +Inf


def test_known_label_sets_are_preinitialised_to_zero() -> None:
    fams = families(Metrics())
    assert sample(fams, "lstm_tokens", "lstm_tokens_total", kind="input") == 0
    assert sample(fams, "lstm_tokens", "lstm_tokens_total", kind="generated") == 0
    for method in METHODS:
        assert sample(fams, "lstm_requests", "lstm_requests_total", method=method, code="OK") == 0


def test_record_request_accepts_grpc_status_codes() -> None:
    import grpc
    m = Metrics()
    m.record_request("Generate", grpc.StatusCode.RESOURCE_EXHAUSTED, 0.5)
    fams = families(m)
    assert sample(fams, "lstm_requests", "lstm_requests_total", method="Generate", code="RESOURCE_EXHAUSTED") == 1


def test_a_call_refused_before_it_ran_is_counted_without_a_duration() -> None:
    m = Metrics()
    m.record_request("Step", "UNAUTHENTICATED", None)
    fams = families(m)
    assert sample(fams, "lstm_requests", "lstm_requests_total", method="Step", code="UNAUTHENTICATED") == 1
    assert sample(fams, "lstm_request_duration_seconds", "lstm_request_duration_seconds_count", method="Step") == 0


def test_names_prefix_units_and_no_session_label() -> None:
    m = busy_metrics()
    fams = families(m)
    ours = [f for f in fams.values() if not f.name.startswith(("process_", "python_"))]
    assert len(ours) == len(EXPECTED)
    for fam in ours:
        assert fam.name.startswith("lstm_"), fam.name
        assert not fam.name.endswith(("_milliseconds", "_ms", "_kb", "_mb")), f"{fam.name}: use base units"
        for s in fam.samples:
            assert not {"session", "session_id", "sid"} & set(s.labels), f"{s.name} has a session label"
            assert SESSION_ID not in s.labels.values()
    assert not any(n.endswith("_created") for n in m.metric_names())


def test_buckets() -> None:
    fams = families(busy_metrics())

    def bounds(family: str) -> list[float]:
        les = [s.labels["le"] for s in fams[family].samples if s.name.endswith("_bucket") and
               s.labels.get("method", "Step") == "Step"]
        return [float(le) for le in les if le != "+Inf"]

    latency = bounds("lstm_request_duration_seconds")
    assert latency[0] == pytest.approx(1e-4) and latency[-1] == pytest.approx(10.0)
    assert latency == sorted(latency) and len(latency) >= 10
    for family in ("lstm_batch_sessions", "lstm_batch_tokens"):
        b = bounds(family)
        assert b[0] == 1 and b[-1] == 4096
        assert all(hi == 2 * lo for lo, hi in zip(b[:-1], b[1:], strict=True)), b


def test_model_info_has_one_series() -> None:
    m = busy_metrics()
    m.set_model_info(checkpoint_sha256="f" * 64, cell_type="gru", num_layers=3, hidden_size=256, device="cuda",
                     dtype="bfloat16")
    series = [s for s in families(m)["lstm_model_info"].samples]
    assert len(series) == 1
    assert series[0].value == 1
    assert series[0].labels == {"checkpoint_sha256": "f" * 64, "cell_type": "gru", "num_layers": "3",
                                "hidden_size": "256", "device": "cuda", "dtype": "bfloat16"}


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()  # a second registry must not clash with the first
    a.sessions_created_total.inc(3)
    assert sample(families(a), "lstm_sessions_created", "lstm_sessions_created_total") == 3
    assert sample(families(b), "lstm_sessions_created", "lstm_sessions_created_total") == 0


def test_metric_names_cover_unobserved_labelled_metrics() -> None:
    names = Metrics().metric_names()
    for n in ("lstm_requests_total", "lstm_request_duration_seconds_bucket", "lstm_tokens_total",
              "lstm_model_info", "lstm_queue_depth", "lstm_batch_sessions_sum", "lstm_sessions_expired_total"):
        assert n in names
    assert "lstm_requests" not in names and "lstm_tokens" not in names


def test_promtool_accepts_the_exposition() -> None:
    text = render(busy_metrics())
    assert b"lstm_tokens_total" in text  # promtool passes empty input, so make sure there is some
    proc = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert proc.returncode == 0, f"promtool check metrics failed:\n{proc.stdout.decode()}{proc.stderr.decode()}"


def test_promtool_rejects_a_bad_exposition() -> None:
    # Control: the check above means something only if promtool lints what it is given.
    bad = b"# TYPE lstm_bad_count counter\nlstm_bad_count 1\n"
    proc = subprocess.run([promtool(), "check", "metrics"], input=bad, capture_output=True, timeout=60)
    assert proc.returncode != 0


def test_http_server_on_port_zero_serves_metrics() -> None:
    m = busy_metrics()
    stop, port = start_metrics_http_server(m, "127.0.0.1", 0)
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = resp.read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        assert sample(fams, "lstm_tokens", "lstm_tokens_total", kind="input") == 17
        m.tokens_total.labels(kind="input").inc(3)  # live, not a snapshot
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert 'lstm_tokens_total{kind="input"} 20.0' in resp.read().decode()
    finally:
        stop()
    stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_two_http_servers_at_once() -> None:
    a, b = Metrics(), Metrics()
    b.sessions_active.set(7)
    stop_a, port_a = start_metrics_http_server(a, "127.0.0.1", 0)
    stop_b, port_b = start_metrics_http_server(b, "127.0.0.1", 0)
    try:
        assert port_a != port_b
        with urllib.request.urlopen(f"http://127.0.0.1:{port_b}/metrics", timeout=10) as resp:
            assert "lstm_sessions_active 7.0" in resp.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port_a}/metrics", timeout=10) as resp:
            assert "lstm_sessions_active 0.0" in resp.read().decode()
    finally:
        stop_a()
        stop_b()


# --- logs ----------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_short_id() -> None:
    assert short_id(SESSION_ID) == SESSION_ID[:8] + "…"
    assert short_id(short_id(SESSION_ID)) == short_id(SESSION_ID)
    assert short_id("abc") == "abc"


def test_json_logs_are_one_object_per_line_with_extras(restore_logging) -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    log = logging.getLogger("lstm_serve.test")
    log.info("created\nsession", extra={"request_id": "req-1", "session_id": short_id(SESSION_ID), "tokens": 3})
    log.debug("not shown at info")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", extra={"request_id": "req-2"})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "INFO" and first["logger"] == "lstm_serve.test"
    assert first["msg"] == "created\nsession"
    assert first["request_id"] == "req-1" and first["tokens"] == 3
    assert first["session_id"] == SESSION_ID[:8] + "…"
    assert first["ts"].endswith("Z") and first["ts"][:2] == "20"
    assert second["level"] == "ERROR" and second["request_id"] == "req-2"
    assert "RuntimeError: boom" in second["exc"]


def test_full_session_id_never_reaches_info_logs(restore_logging) -> None:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    logging.getLogger("lstm_serve.test").warning("oops", extra={"session_id": SESSION_ID})
    record = json.loads(buf.getvalue())
    assert record["session_id"] == short_id(SESSION_ID)
    assert SESSION_ID not in buf.getvalue()


def test_human_logs_and_reconfiguration(restore_logging) -> None:
    first, buf = io.StringIO(), io.StringIO()
    configure_logging("json", "debug", stream=first)
    configure_logging("human", "warning", stream=buf)  # replaces the handler installed above
    log = logging.getLogger("lstm_serve.test")
    log.info("hidden")
    log.warning("drained", extra={"request_id": "r9", "session_id": SESSION_ID})
    out = buf.getvalue()
    assert first.getvalue() == ""
    assert "hidden" not in out
    assert "WARNING lstm_serve.test: drained" in out
    assert "request_id=r9" in out and f"session_id={short_id(SESSION_ID)}" in out
    assert SESSION_ID not in out


def test_configure_logging_rejects_bad_arguments(restore_logging) -> None:
    with pytest.raises(ValueError):
        configure_logging("xml", "info")
    with pytest.raises(ValueError):
        configure_logging("json", "loud")


# ---- the servicer counts a failed call before its status reaches the client --------------------


class _AbortingContext:
    """The part of grpc.aio.ServicerContext a refused call touches. abort() notes what /metrics held
    at the moment the real one would send the status, then raises as the real one does."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics, self.method = metrics, method
        self.counted_at_abort: float | None = None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code, details, trailing_metadata=()):  # type: ignore[no-untyped-def]
        self.counted_at_abort = self.metrics.requests_total.labels(method=self.method, code=code.name)._value.get()
        raise RuntimeError(f"aborted: {code.name}: {details}")


async def test_a_failed_call_is_counted_before_the_client_sees_its_status() -> None:
    # A client that scrapes /metrics as soon as its call fails must find that call counted.
    from types import SimpleNamespace

    from lstmserve_client.proto import lstm_service_pb2 as pb

    from model.tokenizer import CharTokenizer
    from service.config import ServerConfig
    from service.engine import InvalidArgumentError
    from service.server import LstmServicer

    async def step(*args: object) -> None:  # the engine's answer to an out-of-vocabulary token
        raise InvalidArgumentError("token 999 is out of range: the vocabulary has 3 tokens")

    metrics = Metrics()
    engine = SimpleNamespace(tokenizer=CharTokenizer("abc"), step=step)
    servicer = LstmServicer(engine, ServerConfig(), metrics, None)  # type: ignore[arg-type]

    unary = _AbortingContext(metrics, "Step")
    with pytest.raises(RuntimeError, match="aborted: INVALID_ARGUMENT"):
        await servicer.Step(pb.StepRequest(session_id="s", tokens=[999]), unary)  # type: ignore[arg-type]
    assert unary.counted_at_abort == 1

    streamed = _AbortingContext(metrics, "Generate")
    with pytest.raises(RuntimeError, match="aborted: INVALID_ARGUMENT"):
        async for _ in servicer.Generate(pb.GenerateRequest(max_tokens=3), streamed):  # type: ignore[arg-type]
            pass
    assert streamed.counted_at_abort == 1
    # Counted once each, not again when the handler unwinds.
    assert metrics.requests_total.labels(method="Step", code="INVALID_ARGUMENT")._value.get() == 1
    assert metrics.requests_total.labels(method="Generate", code="INVALID_ARGUMENT")._value.get() == 1
