"""Guided sampling speed with and without CUDA graphs, and a cheap prior (issue 17, items 1 and 2).

    python bench/guided_sampling.py                 # UNet-36M, DiT-B/2 and UNet-7M-16px, eager and compiled (GPU)
    python bench/guided_sampling.py --smoke         # tiny models on the CPU: checks that the script runs
    python bench/guided_sampling.py --only UNet-7M-16px --batch 750   # the cheap_prior study's pair, as evaluated

For each model and each of eager / torch.compile, the median ms per denoising step (B = --batch, bf16, DDIM,
w = 4) of: batched CFG (prior=self: one network at 2B), prior=base (two networks at B), prior=base guided over the
middle half of the steps only, the conditional network alone (one at B, no guidance), and prior=base with a small
base (the cheap prior: a 64-128-128-128 UNet for UNet-36M, DiT-S/2 for DiT-B/2, and for UNet-7M-16px the 32-64-64
UNet whose quality the cheap_prior study measured; that pair runs without channels-last, as the study trained and
evaluated it), each launched eagerly, replayed from CUDA graphs (`priorlab.sampling.GraphedStep`), and replayed
from the same graphs with the weights' addresses read at every step as before baf14f8 (graphs_key_per_step). Ratios
divide by batched CFG of the same launch mode and compilation, in the same run. It also samples prior=base graphed
and ungraphed from the same seeds and records the largest difference (bf16 networks: differences of a few 1e-2 are
rounding).
Writes bench/results/<card>-<date>-guided_sampling.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).parent))
from gpu import models, sync  # noqa: E402

from priorlab import sampling  # noqa: E402
from priorlab.guidance import sigma  # noqa: E402
from priorlab.models import dit, unet  # noqa: E402
from priorlab.priors import NONE, SELF, BasePrior  # noqa: E402
from priorlab.priors import DenoiserPrior as Prior  # noqa: E402
from priorlab.sampling import make_scheduler, sample  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def small_builders(smoke: bool) -> dict:
    """The cheap prior of each model: the same data shape and schedule, a smaller network."""
    if smoke:
        return {"dit": lambda: dit((4, 8, 8), 10, num_layers=1, num_attention_heads=1, attention_head_dim=8),
                "unet": lambda: unet((3, 8, 8), 10, block_out_channels=(8, 8), norm_num_groups=4)}  # fmt: skip
    return {
        "DiT-B/2": lambda: dit(
            (4, 32, 32), 1000, num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=2
        ),  # DiT-S/2  # fmt: skip
        "UNet-36M": lambda: unet(
            (3, 32, 32),
            10,
            block_out_channels=(64, 128, 128, 128),
            attention=(False, True, False, False),
            layers_per_block=1,
            norm_num_groups=32,
            attention_head_dim=64,
        ),  # fmt: skip
        STUDY: lambda: unet(
            (1, 16, 16), 10, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, **STUDY_UNET
        ),  # the cheap_prior study's small prior, 1.24M parameters  # fmt: skip
    }


# The cheap_prior study's gpu preset (experiments/cheap_prior.yaml): unet_s with adaptive group norm at 16 px, 7.28M
# parameters, trained and evaluated eagerly without channels-last; its small prior is built above.
STUDY = "UNet-7M-16px"
STUDY_UNET = dict(attention=(False, True, True), attention_head_dim=8, time_scale_shift="scale_shift")


def all_models(smoke: bool) -> dict:
    """name → (builder, sample_shape, num_classes): bench/gpu.py's models and the cheap_prior study's fine-tune."""
    return {**models(smoke), **({} if smoke else study_model())}


def study_model() -> dict:
    """name → (builder, sample_shape, num_classes) of the cheap_prior study's fine-tune."""
    build = lambda: unet((1, 16, 16), 10, block_out_channels=(64, 128, 128), layers_per_block=2,  # noqa: E731
                         norm_num_groups=32, **STUDY_UNET)  # fmt: skip
    return {STUDY: (build, (1, 16, 16), 10)}


@contextlib.contextmanager
def key_per_step(on: bool):
    """The graphed path as it was before baf14f8: the weights' addresses of θ and of the prior network read at
    every step (now once per sample() call). The same graphs replay; only that host work differs."""
    if not on:
        yield
        return
    original = sampling.graphed_step

    def graphed_step(model, weights, key, fn, inputs, keep=()):
        sampling.weights_key(model, *keep)
        return original(model, weights, key, fn, inputs, keep)

    sampling.graphed_step = graphed_step
    try:
        yield
    finally:
        sampling.graphed_step = original


def time_config(model, labels, seeds, kwargs, runs: int) -> float:
    with torch.inference_mode():
        sample(model, labels, seeds, **kwargs)  # warm-up: compilation and graph capture
        times = []
        for _ in range(runs):
            sync()
            t0 = time.perf_counter()
            sample(model, labels, seeds, **kwargs)
            sync()
            times.append((time.perf_counter() - t0) / kwargs["num_steps"] * 1000)
    return statistics.median(times)


def bench_model(name, build, small, shape, k, batch, steps, runs, device, compile_: bool) -> dict:
    torch.manual_seed(0)
    model, base, cheap = build().to(device).eval(), build().to(device).eval(), small().to(device).eval()
    nets = (model, base, cheap)
    if len(shape) == 3 and "UNet" in model.class_name and device.type == "cuda" and name != STUDY:
        for m in nets:
            m.net.to(memory_format=torch.channels_last)
    if compile_:
        for m in nets:
            m.net.compile()
    sched = DDPMScheduler()
    prior, cheap_prior = Prior(base, sched, sched.alphas_cumprod), Prior(cheap, sched, sched.alphas_cumprod)
    ddim = make_scheduler("ddim", sched)
    ddim.set_timesteps(steps)
    sig = sigma(sched.alphas_cumprod[ddim.timesteps.long()]).sort().values
    interval = (float(sig[steps // 4]), float(sig[steps // 4 + steps // 2 - 1]))
    labels, seeds = torch.arange(batch) % k, torch.arange(batch)
    configs = {"batched_cfg": dict(prior=SELF), "prior_base": dict(prior=BasePrior(prior)),
               "prior_base_interval": dict(prior=BasePrior(prior), interval=interval),
               "cond_only": dict(prior=NONE), "cheap_prior": dict(prior=BasePrior(cheap_prior))}  # fmt: skip
    out = {"params_m": {"model": sum(p.numel() for p in model.parameters()) / 1e6,
                        "cheap_prior": sum(p.numel() for p in cheap.parameters()) / 1e6}}  # fmt: skip
    for mode in ("launched", "graphs", "graphs_key_per_step"):
        graphs = mode != "launched"
        table = {}
        for cname, kw in configs.items():
            kwargs = dict(train_scheduler=sched, sample_shape=shape, scale=4.0, num_steps=steps, batch_size=batch,
                          autocast=device.type == "cuda", graphs=graphs, **kw)  # fmt: skip
            with key_per_step(mode == "graphs_key_per_step"):
                table[cname] = {"ms_per_step": time_config(model, labels, seeds, kwargs, runs)}
            print(f"  {name} compile={compile_} {mode:19s} {cname:20s} {table[cname]['ms_per_step']:8.2f} ms/step",
                  flush=True)  # fmt: skip
        ref = table["batched_cfg"]["ms_per_step"]
        for row in table.values():
            row["ratio_to_batched_cfg"] = row["ms_per_step"] / ref
        cond = table["cond_only"]["ratio_to_batched_cfg"]
        table["targets"] = {
            "prior_base_le_1.05": table["prior_base"]["ratio_to_batched_cfg"] <= 1.05,
            "interval_bound": 0.5 + 0.5 * cond + 0.05,
            "interval_le_bound": table["prior_base_interval"]["ratio_to_batched_cfg"] <= 0.5 + 0.5 * cond + 0.05,
            "cheap_prior_le_0.7": table["cheap_prior"]["ratio_to_batched_cfg"] <= 0.7,
        }
        out[mode] = table
    kwargs = dict(train_scheduler=sched, sample_shape=shape, scale=4.0, num_steps=steps, batch_size=batch,
                  autocast=device.type == "cuda", prior=BasePrior(prior))  # fmt: skip
    with torch.inference_mode():
        eager = sample(model, labels, seeds, **kwargs, graphs=False)
        graphed = sample(model, labels, seeds, **kwargs, graphs=True)
    diff = (eager - graphed).abs()
    out["agreement_prior_base"] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                                   "sample_std": float(eager.std())}  # fmt: skip
    print(f"  {name} compile={compile_} graphed vs launched: {out['agreement_prior_base']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=None, help="one model name, e.g. DiT-B/2 or UNet-36M")
    parser.add_argument("--compile", default="false,true", help="eager and/or compiled networks")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.steps, args.runs = 4, 4, 1
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"card": card, "date": str(datetime.date.today()), "torch": torch.__version__, "batch": args.batch,
              "steps": args.steps, "runs": args.runs, "models": {}}  # fmt: skip
    if device.type == "cuda":
        result["gpu_uuid"] = str(torch.cuda.get_device_properties(device).uuid)
    small = small_builders(args.smoke)
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"{card.replace(' ', '_')}-{result['date']}-guided_sampling.json"
    for name, (build, shape, k) in all_models(args.smoke).items():
        if args.only and name != args.only:
            continue
        result["models"][name] = {}
        for comp in [c == "true" for c in args.compile.split(",")]:
            if comp and device.type != "cuda":
                continue
            key = "compiled" if comp else "eager"
            result["models"][name][key] = bench_model(name, build, small[name], shape, k, args.batch, args.steps,
                                                      args.runs, device, comp)  # fmt: skip
            out.write_text(json.dumps(result, indent=1))  # after each part: a cut-off run keeps what it measured
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
