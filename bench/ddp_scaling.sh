#!/usr/bin/env bash
# Issue 8: a fine-tune with the full preset's model and data under DDP on every GPU of the host and on one GPU;
# images/s per GPU, the scaling ratio, and the DDP run's final evaluation against a 1-GPU `priorlab evaluate`
# of the same checkpoint with the same seeds. Writes bench/results/ddp-<card>-<date>.json (or into $OUT).
#   bash bench/ddp_scaling.sh [FT_STEPS]
# Environment:
#   STAGES   which stages to run, in order (default "prep ddp one compare"); a later call on the same machine
#            can run "one compare" after one that ran "prep ddp" (prep is redone when its outputs are missing)
#   COMPILE  the compile setting (default true, as in trainer=ddp; trainer=gpu defaults to reduce-overhead)
#   TRAINER_ONE / TRAINER_DDP / DEVICE / EXTRA   for a dry run on the CPU:
#            TRAINER_ONE=cpu TRAINER_DDP=ddp_cpu DEVICE=cpu EXTRA="model=unet_tiny data.batch_size=16"
# Every stage has a time limit; on reaching it every process of the stage gets SIGABRT, so faulthandler
# prints where each rank was (PYTHONFAULTHANDLER=1), and the later stages still run.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 WANDB_MODE=offline
export PYTHONFAULTHANDLER=1
steps=${1:-150}
runs=${RUNS:-/tmp/priorlab-ddp}
stages=${STAGES:-prep ddp one compare}
stamp() { echo "[$(date +%T)] $*"; }
limit() { local s=$1; shift; timeout -s ABRT -k 10 "$s" "$@"; local rc=$?; stamp "rc=$rc"; return $rc; }
# The full preset's model, data, batch and fast settings (trainer=gpu|ddp: bf16, compile, channels-last, fused
# AdamW); fewer steps and a smaller evaluation so the whole comparison fits the device tool's calls.
read -r -a extra <<< "${EXTRA:-}"
evalset=(eval.num_samples=1000 eval.num_steps=25 eval.batch_size=500 "eval.guidance_scales=[1.0,3.0]" eval.heldout=1000
         eval.kid_subset=500 eval.autocast=true)
for e in "${extra[@]}"; do [[ $e == eval.* ]] && evalset+=("$e"); done   # EXTRA's eval.* keys also reach evaluate
common=(data=mnist data.image_size=32 data.batch_size=256 model=unet_b logger=csv "paths.runs=$runs" "${evalset[@]}"
        "${extra[@]}")
ft=(stage=finetune "base=$runs/base/base" cond_dropout=0.1 "trainer.max_steps=$steps" "trainer.val_check_interval=$steps"
    callbacks.throughput.warmup=50 "compile=${COMPILE:-true}")
evals=(callbacks=eval "callbacks.prior_quality.every_n_steps=$steps" "callbacks.conditional_quality.every_n_steps=$steps")
prep() {
  stamp evaluator; limit 120 priorlab train-evaluator data=mnist data.image_size=32 "paths.runs=$runs" steps=300
  stamp base; limit 150 priorlab train stage=base study=base "trainer=${TRAINER_ONE:-gpu}" compile=false \
    trainer.max_steps=50 trainer.val_check_interval=50 "${common[@]}"
}
for stage in $stages; do
  case $stage in
    prep) rm -rf "$runs"; prep ;;
    one)  # throughput only, no evaluation callbacks
      [ -f "$runs/base/base/done.json" ] || prep
      rm -rf "$runs/one"   # a finished run would be skipped, a cut one resumed
      stamp one-gpu; limit 300 priorlab train study=one "trainer=${TRAINER_ONE:-gpu}" "${ft[@]}" "${common[@]}" ;;
    ddp)
      [ -f "$runs/base/base/done.json" ] || prep
      rm -rf "$runs/ddp"
      stamp ddp; limit 400 priorlab train study=ddp "trainer=${TRAINER_DDP:-ddp}" "${ft[@]}" "${evals[@]}" "${common[@]}"
      stamp re-evaluate; limit 150 priorlab evaluate "model=$runs/ddp/finetune/p=0.1/seed=0" "base=$runs/base/base" \
        "paths.runs=$runs" "${evalset[@]}" "out=$runs/ddp/reeval" "device=${DEVICE:-cuda}" progress=false ;;
    compare) stamp compare; "${PYTHON:-python3}" bench/ddp_compare.py "$runs" "$steps" ;;
    *) echo "unknown stage $stage (use prep, one, ddp, compare)"; exit 2 ;;
  esac
done
stamp done
