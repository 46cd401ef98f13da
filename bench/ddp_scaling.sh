#!/usr/bin/env bash
# Issue 8: a fine-tune with the full preset's model and data under DDP on every GPU of the host and on one GPU;
# images/s per GPU, the scaling ratio, and the DDP run's final evaluation against a 1-GPU `priorlab evaluate`
# of the same checkpoint with the same seeds. Writes bench/results/ddp-<card>-<date>.json (or into $OUT).
#   bash bench/ddp_scaling.sh [FT_STEPS]
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 WANDB_MODE=offline
steps=${1:-400}
runs=${RUNS:-/tmp/priorlab-ddp}
rm -rf "$runs"
common=(data=mnist data.image_size=32 data.batch_size=256 model=unet_b logger=csv "paths.runs=$runs"
        eval.num_samples=2000 eval.num_steps=25 eval.batch_size=500 "eval.guidance_scales=[1.0,3.0]"
        eval.heldout=2000 eval.kid_subset=500 eval.autocast=true)
ft=(stage=finetune "base=$runs/base/base" cond_dropout=0.1 "trainer.max_steps=$steps" "trainer.val_check_interval=$steps"
    callbacks=eval "callbacks.prior_quality.every_n_steps=$steps" "callbacks.conditional_quality.every_n_steps=$steps"
    callbacks.throughput.warmup=50)
priorlab train-evaluator data=mnist data.image_size=32 "paths.runs=$runs"
priorlab train stage=base study=base trainer=gpu trainer.max_steps=300 trainer.val_check_interval=300 "${common[@]}"
priorlab train study=ddp trainer=ddp "${ft[@]}" "${common[@]}"
priorlab train study=one trainer=gpu "${ft[@]}" "${common[@]}"
priorlab evaluate "model=$runs/ddp/finetune/p=0.1/seed=0" "base=$runs/base/base" "${common[@]:5}" \
  "out=$runs/ddp/reeval" device=cuda progress=false
python bench/ddp_compare.py "$runs" "$steps"
