#!/usr/bin/env bash
# Issue 8: a fine-tune with the full preset's model and data under DDP on every GPU of the host and on one GPU;
# images/s per GPU, the scaling ratio, and the DDP run's final evaluation against a 1-GPU `priorlab evaluate`
# of the same checkpoint with the same seeds. Writes bench/results/ddp-<card>-<date>.json (or into $OUT).
#   bash bench/ddp_scaling.sh [FT_STEPS]
set -uo pipefail   # a stage that fails or times out is reported, and the later stages still run
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 WANDB_MODE=offline
steps=${1:-400}
runs=${RUNS:-/tmp/priorlab-ddp}
rm -rf "$runs"
stamp() { echo "[$(date +%T)] $*"; }
# The full preset's model, data, batch and fast settings (trainer=gpu|ddp: bf16, compile, channels-last, fused
# AdamW); fewer steps and a smaller evaluation so the whole comparison fits one call of the device tool.
common=(data=mnist data.image_size=32 data.batch_size=256 model=unet_b logger=csv "paths.runs=$runs"
        eval.num_samples=1000 eval.num_steps=25 eval.batch_size=500 "eval.guidance_scales=[1.0,3.0]"
        eval.heldout=1000 eval.kid_subset=500 eval.autocast=true)
ft=(stage=finetune "base=$runs/base/base" cond_dropout=0.1 "trainer.max_steps=$steps" "trainer.val_check_interval=$steps"
    callbacks.throughput.warmup=50)
evals=(callbacks=eval "callbacks.prior_quality.every_n_steps=$steps" "callbacks.conditional_quality.every_n_steps=$steps")
stamp evaluator; timeout -k 5 60 priorlab train-evaluator data=mnist data.image_size=32 "paths.runs=$runs" steps=300
stamp base; timeout -k 5 60 priorlab train stage=base study=base trainer=gpu compile=false trainer.max_steps=50 \
  trainer.val_check_interval=50 "${common[@]}"
stamp ddp; timeout -k 5 130 priorlab train study=ddp trainer=ddp compile=${COMPILE:-true} "${ft[@]}" "${evals[@]}" "${common[@]}"
stamp one-gpu; timeout -k 5 90 priorlab train study=one trainer=gpu compile=${COMPILE:-true} "${ft[@]}" "${common[@]}"   # throughput only
stamp re-evaluate; timeout -k 5 60 priorlab evaluate "model=$runs/ddp/finetune/p=0.1/seed=0" "base=$runs/base/base" "${common[@]:5}" \
  "out=$runs/ddp/reeval" device=cuda progress=false
stamp compare; python bench/ddp_compare.py "$runs" "$steps"
