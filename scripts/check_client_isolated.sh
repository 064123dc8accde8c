#!/usr/bin/env bash
# Prove the Python client stands alone: install ./clients/python (and nothing else) into a
# fresh virtual environment, show that torch and numpy are NOT importable there, then use
# the library and the lstm-client command from it against a real lstm-serve (run from the
# main .venv on a tiny random-weight checkpoint). Exits non-zero on any failure.
#
#   scripts/check_client_isolated.sh            # PYTHON=python3.11 to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MAIN_PY="$ROOT/.venv/bin/python"
PYTHON=${PYTHON:-python3}

say() { printf '== %s\n' "$*"; }
fail() { printf 'check_client_isolated: FAILED: %s\n' "$*" >&2; exit 1; }

[ -x "$MAIN_PY" ] || fail "no main virtual environment at .venv (the server runs from it)"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lstm-client-isolated.XXXXXX")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

# ---------------------------------------------------------------- the isolated venv
say "creating a fresh virtual environment in $TMP/venv ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
say "pip install ./clients/python (alone)"
# pip builds in the source tree; remove afterwards only the build outputs it newly made.
NEW_ARTIFACTS=()
for p in build lstm_serve_client.egg-info; do
  [ -e "$ROOT/clients/python/$p" ] || NEW_ARTIFACTS+=("$ROOT/clients/python/$p")
done
"$VPY" -m pip install --quiet --disable-pip-version-check "$ROOT/clients/python" \
  || fail "pip install ./clients/python"
for p in "${NEW_ARTIFACTS[@]}"; do rm -rf "$p"; done

for mod in torch numpy; do
  if (cd "$TMP" && "$VPY" -c "import $mod") 2>/dev/null; then
    fail "'import $mod' works in the isolated environment; the client must not pull it in"
  fi
  say "import $mod fails in the isolated environment, as it must"
done
"$VPY" -m pip list --format=freeze --disable-pip-version-check > "$TMP/freeze.txt"
if grep -iE '^(torch|numpy)==' "$TMP/freeze.txt"; then fail "torch or numpy got installed"; fi
[ -x "$TMP/venv/bin/lstm-client" ] || fail "the lstm-client console script was not installed"

# ---------------------------------------------------------------- a tiny checkpoint
say "writing a tiny random-weight checkpoint (main .venv)"
CKPT="$TMP/ckpt"
"$MAIN_PY" - "$CKPT" "$ROOT/data/tinyshakespeare.txt" <<'PY'
import sys

import torch

from model.checkpoint import save_checkpoint
from model.model import CharRNN, ModelConfig
from model.tokenizer import CharTokenizer

out, corpus = sys.argv[1], sys.argv[2]
with open(corpus, encoding="utf-8") as f:
    tokenizer = CharTokenizer.from_text(f.read())
torch.manual_seed(0)
model = CharRNN(ModelConfig(vocab_size=len(tokenizer), hidden_size=32, embedding_size=16))
save_checkpoint(out, model, tokenizer, {"best_val_loss": 4.0, "note": "check_client_isolated.sh"})
PY

# ---------------------------------------------------------------- the server (main venv)
if [ -x "$ROOT/.venv/bin/lstm-serve" ]; then
  SERVE=("$ROOT/.venv/bin/lstm-serve")
else
  SERVE=("$MAIN_PY" -m service.server)
fi
PORT_FILE="$TMP/port"
say "starting ${SERVE[*]} on a free port"
PYTHONPATH="$ROOT:$ROOT/clients/python${PYTHONPATH:+:$PYTHONPATH}" "${SERVE[@]}" \
  --checkpoint "$CKPT" --host 127.0.0.1 --port 0 --port-file "$PORT_FILE" --metrics-port 0 \
  --device cpu --threads 1 --grace-seconds 1 >"$TMP/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 600); do
  [ -s "$PORT_FILE" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$TMP/server.log" >&2; fail "the server exited before serving"; }
  sleep 0.1
done
[ -s "$PORT_FILE" ] || { cat "$TMP/server.log" >&2; fail "the server wrote no port file within 60 s"; }
PORT=$(tr -d '[:space:]' < "$PORT_FILE")
TARGET="127.0.0.1:$PORT"
say "server is serving on $TARGET"

# ---------------------------------------------------------------- the client, isolated
cd "$TMP"  # nothing from the repository on sys.path
export LSTM_SERVE_TARGET="$TARGET"

say "lstm-client info"
"$TMP/venv/bin/lstm-client" --target "$TARGET" info | tee "$TMP/info.txt"
grep -q "cell type: *lstm" "$TMP/info.txt" || fail "lstm-client info printed no cell type"

say "lstm-client generate"
"$TMP/venv/bin/lstm-client" --target "$TARGET" generate "ROMEO:" --max-tokens 40 --seed 1 | tee "$TMP/gen.txt"
[ "$(wc -c < "$TMP/gen.txt")" -ge 40 ] || fail "lstm-client generate printed too little"

say "lstm-client score"
head -c 2000 "$ROOT/data/tinyshakespeare.txt" > "$TMP/sample.txt"
"$TMP/venv/bin/lstm-client" score "$TMP/sample.txt" | tee "$TMP/score.txt"
grep -q "bits/char" "$TMP/score.txt" || fail "lstm-client score printed no bits/char"

say "lstm-client exits 1 with one line on a server error"
set +e
"$TMP/venv/bin/lstm-client" --target "$TARGET" generate "x" --top-p 5 >/dev/null 2>"$TMP/err.txt"
rc=$?
set -e
[ "$rc" -eq 1 ] && [ "$(wc -l < "$TMP/err.txt")" -eq 1 ] || fail "expected exit 1 and one error line, got $rc: $(cat "$TMP/err.txt")"
cat "$TMP/err.txt"

say "the library (sync and asyncio)"
"$VPY" - "$TARGET" <<'PY'
import asyncio
import sys

import lstmserve_client as lc

target = sys.argv[1]
assert "site-packages" in lc.__file__, lc.__file__
with lc.Client(target, timeout=10) as client:
    info = client.model_info()
    assert info.cell_type == "lstm" and info.hidden_size == 32, info
    with client.session() as s:
        r = s.step("First Citizen:", return_logprobs=True)
        assert r.position == 14 and len(r.outputs[0].logprobs or []) == len(info.vocab)
        assert len(s.generate_text("\n", max_tokens=20, seed=3)) == 20
        with s.fork() as f:
            assert f.position == s.position
        try:
            s.step("\u00e9")
        except lc.InvalidInput as e:
            print("InvalidInput as expected:", e)
        else:
            raise AssertionError("no InvalidInput")


async def main() -> None:
    async with lc.AsyncClient(target, timeout=10) as client, client.session() as s:
        results = [r async for r in s.stream(["To be, ", "or not"])]
        assert [r.position for r in results] == [7, 13]
        assert len(await s.generate_text(max_tokens=5)) == 5


asyncio.run(main())
assert "torch" not in sys.modules and "numpy" not in sys.modules
print("library OK (torch and numpy never imported)")
PY

say "OK: the client works installed alone, without torch"
