#!/usr/bin/env bash
# Regenerate the Python stubs from protos/ into the client package (the server imports
# them from there). Reproducible: pinned grpcio-tools (checked below), imports rewritten to
# relative, fixed locale, and nothing machine- or time-dependent in the output.
#
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: clients/python/lstmserve_client/proto)
# The interpreter is $PYTHON, else the repo's .venv, else python3 on PATH.
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/clients/python/lstmserve_client/proto}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
GRPCIO_TOOLS_VERSION=1.85.1  # keep equal to the pin in pyproject.toml [dev]
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
have=$("$PYTHON" -c 'from importlib.metadata import version; print(version("grpcio-tools"))' 2>/dev/null || true)
if [[ "$have" != "$GRPCIO_TOOLS_VERSION" ]]; then
  echo "gen_protos.sh: need grpcio-tools==$GRPCIO_TOOLS_VERSION in $PYTHON, found '${have:-none}'" >&2
  exit 1
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PYTHON" -m grpc_tools.protoc -Iprotos --python_out="$TMP" --pyi_out="$TMP" --grpc_python_out="$TMP" \
  protos/lstmserve/v1/lstm_service.proto
for f in lstm_service_pb2.py lstm_service_pb2.pyi lstm_service_pb2_grpc.py; do
  sed -e 's/^from lstmserve\.v1 import /from . import /' "$TMP/lstmserve/v1/$f" > "$OUT/$f"
done
cat > "$OUT/__init__.py" <<'PY'
"""Generated gRPC stubs for lstmserve.v1 (scripts/gen_protos.sh). Do not edit."""
PY
