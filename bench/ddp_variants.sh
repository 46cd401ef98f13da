#!/usr/bin/env bash
# Issue 8: what DDP's settings cost. Training throughput of the full preset's model and data (unet_b, MNIST 32 px,
# batch 256 per GPU, bf16, channels-last, fused AdamW) on one GPU and under DDP with each variant of
# trainer.strategy, plus the host's all-reduce bandwidth. Throughput only (base stage: no base model and no
# evaluation needed). Writes <name>.json per run into $OUT (default bench/results/ddp-variants).
#   bash bench/ddp_variants.sh [STEPS] [VARIANT...]      variants: one ddp_side ddp ddp_bf16 ddp_whole ddp_view
#                                                         one_nocl ddp_nocl ddp_skip ddp_nocl_skip
#                                                         (COMPILE=false: eager; EXTRA="k=v ...": more overrides,
#                                                         split at spaces, so no value may hold one; e.g.
#                                                         EXTRA=trainer.devices=1 for DDP over one GPU)
# Issue 17: ddp_view builds DDP with gradient_as_bucket_view (the gradients are the buckets' views, in the
# parameters' strides); *_nocl turn channels-last off. Each run's log counts DDP's "Grad strides do not match"
# warnings. *_skip register a communication hook that all-reduces nothing (priorlab.training.ddp.skip_allreduce_hook): DDP's
# step without its communication, so the gap between ddp and ddp_skip is what the all-reduce costs where the
# backward pass does not hide it, and the gap between ddp_skip and one is DDP's other overhead (hooks, buckets, the
# two processes' host work) plus the Python hook's own cost (0.6% through the Trainer on one H200, BENCHMARKS.md).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 WANDB_MODE=offline
export PYTHONFAULTHANDLER=1
steps=${1:-300}; shift || true
variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=(one ddp_side ddp ddp_bf16)
out=${OUT:-bench/results/ddp-variants}; mkdir -p "$out"
runs=${RUNS:-/tmp/priorlab-ddp-variants}
stamp() { echo "[$(date +%T)] $*"; }
common=(stage=base data=mnist data.image_size=32 data.batch_size=256 model=unet_b logger=csv "paths.runs=$runs"
        "trainer.max_steps=$steps" "trainer.val_check_interval=$steps" trainer.limit_val_batches=1
        callbacks.throughput.warmup=50 "compile=${COMPILE:-true}")
read -ra extra <<< "${EXTRA:-}"
for v in "${variants[@]}"; do
  case $v in
    one) args=(trainer=gpu) ;;
    ddp_side) args=(trainer=ddp trainer.strategy.same_stream=false) ;;   # Lightning's own wrapping
    ddp) args=(trainer=ddp) ;;
    ddp_bf16) args=(trainer=ddp trainer.strategy.comm_hook=bf16) ;;
    ddp_whole) args=(trainer=ddp trainer.strategy.compiled_ddp=no_optimization) ;;   # one compiled graph
    ddp_view) args=(trainer=ddp +trainer.strategy.gradient_as_bucket_view=true) ;;
    one_nocl) args=(trainer=gpu channels_last=false) ;;
    ddp_nocl) args=(trainer=ddp channels_last=false) ;;
    ddp_skip) args=(trainer=ddp trainer.strategy.comm_hook=skip) ;;
    ddp_nocl_skip) args=(trainer=ddp channels_last=false trainer.strategy.comm_hook=skip) ;;
    *) echo "unknown variant $v"; exit 2 ;;
  esac
  stamp "$v"
  rm -rf "$runs/$v"
  timeout -s ABRT -k 10 "${LIMIT:-300}" priorlab train "study=$v" "${args[@]}" "${common[@]}" ${extra[@]+"${extra[@]}"} 2>&1 | tee "$out/$v.log"
  stamp "rc=${PIPESTATUS[0]}; stride warnings: $(grep -c 'Grad strides do not match' "$out/$v.log")"
  cp "$runs/$v/base/throughput.json" "$out/$v-compile_${COMPILE:-true}.json" && cat "$out/$v-compile_${COMPILE:-true}.json"
done
