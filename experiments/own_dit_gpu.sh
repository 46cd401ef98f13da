#!/usr/bin/env bash
# experiments/own_dit.yaml on one GPU: a broad DiT-S/2 base trained and exported to a diffusers pipeline folder,
# then the study that fine-tunes it from that folder. Needs priorlab installed (on a lent GPU machine as
# experiments/run_in_pieces.sh installs it: `python3 -m pip install --no-deps --no-build-isolation -e .` after the
# wheels), data/emoji and its evaluator (`tar xzf .gpu/emoji.tgz`). OUT: where a tarball of the study's results,
# report, figures and logs goes (checkpoints and weights left out).
#
# LEAN=1 also trains a lean prior on the base's data (DiT-S/4: 2 × 2 fewer tokens than the base's 4 × 4 px patches
# give DiT-S/2, a quarter of its activation elements; the cheap prior of issue 33), exports it, and evaluates every
# fine-tune with it as prior=lean (`extra_priors`). TRAINER: the trainer config of the two bases (gpu).
set -euo pipefail
OUT=${1:?usage: [LEAN=1] experiments/own_dit_gpu.sh OUT_FOLDER [BASE_STEPS [STUDY SETTINGS...]]}
STEPS=${2:-3000}
shift $(( $# < 2 ? $# : 2 ))
BASE=runs/own_dit_base
LEAN_BASE=runs/own_dit_lean
train_base() {  # folder, then model settings
  local folder=$1
  shift
  if [ ! -f "$folder/exported/model_index.json" ]; then
    priorlab train stage=base study="$(basename "$folder")" paths.run_dir="$folder/run" data=emoji \
      "data.styles=[google,openmoji,fluent]" data.image_size=16 data.batch_size=128 data.val_fraction=0.25 \
      "$@" trainer="${TRAINER:-gpu}" compile=false channels_last=false lr_schedule=cosine optimizer.lr=3e-4 \
      trainer.max_steps="$STEPS" trainer.val_check_interval=500 callbacks.ema.decay=0.999 logger=csv
    priorlab export model="$folder/run" out="$folder/exported"
  fi
}
train_base "$BASE" model=dit_s
EXTRA=()
KEEP=()
if [ "${LEAN:-0}" = 1 ]; then
  train_base "$LEAN_BASE" model=dit_s model.patch_size=4
  EXTRA=("extra_priors.lean=$LEAN_BASE/exported")
  KEEP=("$LEAN_BASE/run/metrics.csv" "$LEAN_BASE/exported/README.md")
fi
priorlab study own_dit preset=gpu "${EXTRA[@]}" "$@"
mkdir -p "$OUT"
KEPT=()
for f in "$BASE/run/metrics.csv" "$BASE/exported/README.md" "${KEEP[@]}"; do [ -f "$f" ] && KEPT+=("$f"); done
tar czf "$OUT/own_dit_gpu.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.pt' runs/own_dit "${KEPT[@]}"
