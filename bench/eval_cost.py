"""The study's conditional evaluation, before and after (issue 17, item 3).

    python bench/eval_cost.py                                   # on the GPU: every variant, one process
    python bench/eval_cost.py --procs 6 --variants off,all_150  # six processes at once on one GPU, as the study ran
    python bench/eval_cost.py --smoke                           # tiny, on the CPU: checks that the script runs

The workload is one fine-tune's end-of-training conditional evaluation in dropout_vs_prior's gpu preset: the
6.8M-parameter UNet (unet_s, adaptive group norm) on MNIST 16 px, 1,500 samples per (prior, w), prior ∈ {self,
base} × w ∈ {1, 1.5, 2, 3, 4, 6}, DDIM 25 steps, bf16 autocast, FD/KID/precision/recall/accuracy with a
domain-classifier-sized feature network, plus a small extra prior (32-64-64 channels, one layer per block) as
prior=small with --small. Weights are random (speed does not depend on them). Variants:

    off           each (prior, w) sampled on its own, batch 750 (the study as it ran: the "before")
    graphs        the same, each step's guided prediction replayed from a CUDA graph (eval.cuda_graphs)
    scales        eval.one_pass=scales: each prior's guidance scales in one pass, batch 750
    all           eval.one_pass=all: every (prior, w) in one pass, batch 750
    all_250       eval.one_pass=all with batch 250 (16 settings' rows: 4,000 rows per pass of θ)
    all_150       eval.one_pass=all with batch 150 (2,400 rows, below the 3,000 that six evaluations of batch
                  1,500 at once had needed when they filled an H200)
    scales_graphs eval.one_pass=scales with eval.cuda_graphs: each step of each pass replayed from one graph
    all_graphs    eval.one_pass=all with eval.cuda_graphs
    fused         eval.fused=on: prior=base with θ and the base in one pass over stacked weights (issue 33)
    scales_fused  eval.one_pass=scales with eval.fused=on

With --procs N, N processes run the same variant at once on the same GPU (the study ran 6 fine-tunes per GPU)
after each has warmed up, each with the cores shared out as `priorlab study jobs=N` does, and each reports its
own wall time. Writes bench/results/<card>-<date>-eval_cost.json
(one entry per procs × variant, added to what the file holds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from priorlab.evaluation.conditional_quality import conditional_quality
from priorlab.evaluation.features import Classifier, Evaluator
from priorlab.evaluation.settings import EvalSettings
from priorlab.models import unet
from priorlab.priors import DenoiserPrior
from priorlab.study.schedule import job_threads

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "off": {},
    "graphs": {"cuda_graphs": True},
    "scales": {"one_pass": "scales"},
    "all": {"one_pass": "all"},
    "all_250": {"one_pass": "all", "batch_size": 250},
    "all_150": {"one_pass": "all", "batch_size": 150},
    "scales_graphs": {"one_pass": "scales", "cuda_graphs": True},
    "all_graphs": {"one_pass": "all", "cuda_graphs": True},
    "fused": {"fused": "on"},  # issue 33: prior=base with θ and the base in one pass (the vmap route)
    "scales_fused": {"one_pass": "scales", "fused": "on"},
}


def setup(smoke: bool, device: torch.device):
    """The fine-tune, its base, the small prior, an evaluator, and the preset's evaluation settings."""
    torch.manual_seed(0)
    if smoke:
        shape, full, small = (1, 8, 8), dict(block_out_channels=(8, 16), norm_num_groups=4), dict(
            block_out_channels=(8, 8), norm_num_groups=4)  # fmt: skip
        settings = EvalSettings(num_samples=20, num_steps=3, guidance_scales=[1.0, 2.0], batch_size=10, kid_subset=10,
                                bootstrap=10, grid_per_class=1)  # fmt: skip
    else:
        shape = (1, 16, 16)
        full = dict(block_out_channels=(64, 128, 128), attention=(False, True, True), layers_per_block=2,
                    norm_num_groups=32, attention_head_dim=8, time_scale_shift="scale_shift")  # fmt: skip
        small = dict(block_out_channels=(32, 64, 64), attention=(False, True, True), layers_per_block=1,
                     norm_num_groups=16, attention_head_dim=8, time_scale_shift="scale_shift")  # fmt: skip
        settings = EvalSettings(num_samples=1500, num_steps=25, guidance_scales=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
                                batch_size=750, kid_subset=1000, grid_per_class=8,
                                autocast=device.type == "cuda")  # fmt: skip
    model, base, cheap = (unet(shape, 10, **full), unet(shape, 10, **full), unet(shape, 10, **small))
    nets = [m.to(device).eval() for m in (model, base, cheap)]
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    prior = DenoiserPrior(nets[1], sched, sched.alphas_cumprod)
    extra = {"small": DenoiserPrior(nets[2], sched, sched.alphas_cumprod)}
    net = Classifier(shape, 10).to(device).eval()
    with torch.no_grad():
        reference = net.features(torch.randn(5000 if not smoke else 50, *shape, device=device)).cpu()
    evaluator = Evaluator(net, reference, torch.arange(len(reference)) % 10, 1.0)
    return nets[0], sched, prior, extra, evaluator, shape, settings


def run_variant(variant: str, smoke: bool, small: bool, barrier: tuple[Path, int, int] | None = None) -> dict:
    """One evaluation of the variant, after a warm-up; with `barrier` (folder, this process, processes) it starts
    once every process has warmed up."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    model, sched, prior, extra, evaluator, shape, settings = setup(smoke, device)
    extra = extra if small else {}
    settings = replace(settings, **VARIANTS[variant])
    warm = replace(settings, num_samples=settings.batch_size, num_steps=2, bootstrap=0)
    with torch.no_grad():  # warm-up at the same batch shapes: allocator, cuDNN choices, graph capture
        conditional_quality(model, sched, prior, evaluator, shape, warm, extra=extra)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks go back; live graphs keep their pools
        torch.cuda.reset_peak_memory_stats()
    if barrier is not None:
        folder, me, count = barrier
        (folder / f"ready_{me}").touch()
        while len(list(folder.glob("ready_*"))) < count:
            time.sleep(0.05)
    started = time.perf_counter()
    with torch.no_grad():
        metrics, _ = conditional_quality(model, sched, prior, evaluator, shape, settings, extra=extra)
    seconds = time.perf_counter() - started
    sampling = {k.split("/", 3)[3]: v for k, v in metrics.items() if "/sample_seconds/" in k}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    # a replayed graph allocates nothing: its memory is its pool's, taken at capture (in the warm-up) and kept, which
    # max_memory_allocated does not see after the reset; the reserved peak counts every pool the process holds
    held = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None
    guided = sum(1 for w in settings.guidance_scales if w != 1)
    samplings = 1 + guided * (len(settings.priors) + len(extra))  # w = 1 is sampled once for every prior
    return {"variant": variant, "seconds": seconds, "samples": settings.num_samples, "samplings": samplings,
            "sample_seconds": sampling, "peak_gib": peak, "reserved_gib": held}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="also sample with the small extra prior")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # variant,index,count,folder
    args = parser.parse_args()
    if args.worker:
        variant, me, count, folder = args.worker.split(",", 3)
        result = run_variant(variant, args.smoke, args.small, (Path(folder), int(me), int(count)))
        (Path(folder) / f"result_{me}.json").write_text(json.dumps(result))
        return
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]}; variants: {', '.join(VARIANTS)}")
    gpu = torch.cuda.is_available() and not args.smoke
    card = torch.cuda.get_device_name() if gpu else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"{card.replace(' ', '_')}-{datetime.date.today()}-eval_cost.json"
    result = json.loads(out.read_text()) if out.exists() else {"card": card, "torch": torch.__version__, "runs": []}
    for variant in args.variants.split(","):
        with tempfile.TemporaryDirectory() as folder:
            flags = [*(["--smoke"] if args.smoke else []), *(["--small"] if args.small else [])]
            env = {**os.environ, **job_threads(args.procs)}  # the cores shared out, as `priorlab study jobs=N` does
            procs = [subprocess.Popen([sys.executable, __file__, "--worker", f"{variant},{i},{args.procs},{folder}",
                                       *flags], env=env) for i in range(args.procs)]  # fmt: skip
            codes = [p.wait() for p in procs]
            if any(codes):
                sys.exit(f"variant {variant}: a worker failed (exit codes {codes})")
            per_proc = [json.loads((Path(folder) / f"result_{i}.json").read_text()) for i in range(args.procs)]
        seconds = [r["seconds"] for r in per_proc]
        samplings = per_proc[0]["samplings"]
        entry = {"variant": variant, "procs": args.procs, "small_prior": args.small, "samplings": samplings,
                 "median_s": statistics.median(seconds), "seconds": seconds,
                 "samples_per_s_per_proc": per_proc[0]["samples"] * samplings / statistics.median(seconds),
                 "sample_seconds": per_proc[0]["sample_seconds"], "peak_gib": [r["peak_gib"] for r in per_proc],
                 "reserved_gib": [r["reserved_gib"] for r in per_proc],
                 "date": str(datetime.date.today())}  # fmt: skip
        result["runs"].append(entry)
        print(f"{variant:8s} procs={args.procs}: median {entry['median_s']:.1f} s per evaluation "
              f"({entry['samples_per_s_per_proc']:.0f} samples/s per process), peak allocated {entry['peak_gib']} GiB, "
              f"reserved {entry['reserved_gib']} GiB",
              flush=True)  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
