#!/bin/sh
# One-shot training for docker-compose (service `train`).
#
# Makes sure $CHECKPOINT_ROOT/current is a servable checkpoint (model.safetensors +
# model.json). If it already is, does nothing, unless FORCE_TRAIN=1. Otherwise trains
# into a new run directory $CHECKPOINT_ROOT/runs/<UTC time>/ and, only when training
# succeeded, points the `current` symlink at its best/ (an atomic rename, so a server
# never sees a half-written checkpoint).
#
# Environment:
#   CHECKPOINT_ROOT         default /var/lib/lstm-serve/checkpoints (the named volume)
#   TRAIN_DATA              default /opt/lstm-serve/data/tinyshakespeare.txt
#   TRAIN_ARGS              extra lstm-train arguments, e.g. "--max-steps 2000 --device cuda"
#   FORCE_TRAIN=1           train even if a checkpoint is already there
#   USE_DEFAULT_CHECKPOINT=1  do not train: copy the checkpoint baked into the image
#                           ($DEFAULT_CHECKPOINT, default /opt/lstm-serve/checkpoints/default)
set -eu

root=${CHECKPOINT_ROOT:-/var/lib/lstm-serve/checkpoints}
data=${TRAIN_DATA:-/opt/lstm-serve/data/tinyshakespeare.txt}
default_ckpt=${DEFAULT_CHECKPOINT:-/opt/lstm-serve/checkpoints/default}
current="$root/current"

log() { echo "train_if_missing: $*" >&2; }

servable() { [ -f "$1/model.safetensors" ] && [ -f "$1/model.json" ]; }

if servable "$current" && [ "${FORCE_TRAIN:-0}" != "1" ]; then
    log "checkpoint present at $current -> $(readlink "$current" || echo "$current"); nothing to do (FORCE_TRAIN=1 retrains)"
    exit 0
fi

mkdir -p "$root/runs"
run="runs/$(date -u +%Y%m%dT%H%M%SZ)-$$"

if [ "${USE_DEFAULT_CHECKPOINT:-0}" = "1" ]; then
    servable "$default_ckpt" || { log "no checkpoint at $default_ckpt"; exit 1; }
    log "copying the image's default checkpoint into $root/$run/best"
    mkdir -p "$root/$run.tmp"
    cp "$default_ckpt/model.safetensors" "$default_ckpt/model.json" "$root/$run.tmp/"
    mkdir -p "$root/$run"
    mv "$root/$run.tmp" "$root/$run/best"
else
    log "training: lstm-train --data $data --out $root/$run ${TRAIN_ARGS:-}"
    # TRAIN_ARGS is split into words on purpose.
    # shellcheck disable=SC2086
    lstm-train --data "$data" --out "$root/$run" ${TRAIN_ARGS:-}
    servable "$root/$run/best" || { log "lstm-train finished without a checkpoint in $root/$run/best"; exit 1; }
fi

ln -s "$run/best" "$root/.current.tmp.$$"
mv -T "$root/.current.tmp.$$" "$current"
log "current -> $run/best"
