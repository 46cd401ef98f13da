#!/usr/bin/env bash
# experiments/own_dit.yaml on one GPU: a broad DiT-S/2 base trained and exported to a diffusers pipeline folder,
# then the study that fine-tunes it from that folder. Needs priorlab installed (on a lent GPU machine as
# experiments/run_in_pieces.sh installs it: `python3 -m pip install --no-deps --no-build-isolation -e .` after the
# wheels), data/emoji and its evaluator (`tar xzf .gpu/emoji.tgz`). OUT: where a tarball of the study's results,
# report, figures and logs goes (checkpoints and weights left out).
set -euo pipefail
OUT=${1:?usage: experiments/own_dit_gpu.sh OUT_FOLDER [BASE_STEPS [STUDY SETTINGS...]]}
STEPS=${2:-3000}
shift $(( $# < 2 ? $# : 2 ))
BASE=runs/own_dit_base
if [ ! -f "$BASE/exported/model_index.json" ]; then
  priorlab train stage=base study=own_dit_base paths.run_dir="$BASE/run" data=emoji \
    "data.styles=[google,openmoji,fluent]" data.image_size=16 data.batch_size=128 data.val_fraction=0.25 \
    model=dit_s trainer=gpu compile=false channels_last=false lr_schedule=cosine optimizer.lr=3e-4 \
    trainer.max_steps="$STEPS" trainer.val_check_interval=500 callbacks.ema.decay=0.999 logger=csv
  priorlab export model="$BASE/run" out="$BASE/exported"
fi
priorlab study own_dit preset=gpu "$@"
mkdir -p "$OUT"
tar czf "$OUT/own_dit_gpu.tgz" --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.pt' runs/own_dit \
  "$BASE/run/metrics.csv" "$BASE/exported/README.md"
