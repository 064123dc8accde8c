#!/usr/bin/env bash
# CI check for the API definition:
#   1. `buf lint` (rules and the one documented exception in buf.yaml);
#   2. the committed stubs in clients/python/lstmserve_client/proto/ are exactly what
#      scripts/gen_protos.sh generates from protos/ now (regenerated into a temp dir and
#      compared; a difference is printed and fails the check).
# buf is $BUF, else the repo's .venv/bin/buf (pip install buf-bin==1.75.0), else buf on PATH.
set -euo pipefail
export LC_ALL=C
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
COMMITTED=clients/python/lstmserve_client/proto

if [[ -z "${BUF:-}" ]]; then
  if [[ -x .venv/bin/buf ]]; then BUF=.venv/bin/buf; else BUF=buf; fi
fi
echo "check_protos: buf lint ($("$BUF" --version))"
"$BUF" lint

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
scripts/gen_protos.sh "$TMP/proto"
if ! diff -ru --exclude=__pycache__ "$COMMITTED" "$TMP/proto"; then
  echo "check_protos: committed stubs in $COMMITTED are stale or edited;" \
    "run scripts/gen_protos.sh and commit the result" >&2
  exit 1
fi
echo "check_protos: OK (lint clean, stubs up to date)"
