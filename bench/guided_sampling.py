"""Guided sampling speed with and without CUDA graphs, a cheap prior (issue 17), prior=base in one pass (issue 33).

    python bench/guided_sampling.py                 # UNet-36M, DiT-B/2 and UNet-7M-16px, eager and compiled (GPU)
    python bench/guided_sampling.py --smoke         # tiny models on the CPU: checks that the script runs
    python bench/guided_sampling.py --only UNet-7M-16px --batch 750   # the cheap_prior study's pair, as evaluated
    python bench/guided_sampling.py --only DiT-B/2 --batch 256,64 --compile true --modes launched,graphs --steps 10 \
        --runs 2 --rows batched_cfg,prior_base,prior_base_fused,prior_base_fused_auto --no-agreement  # issue 33

For each model, batch size (--batch, a list) and each of eager / torch.compile, the median ms per denoising step
(bf16, DDIM, w = 4) and the peak memory allocated above what was held before the row (its graphs, the fused pass's
stacked weights and activations) of the rows (--rows): batched CFG (prior=self: one network at 2B), prior=base (two
networks at B), prior=base_fused (θ and the base in one pass over stacked weights, the vmap route of
`priorlab.priors.fused`, fused=on), prior=base_fused_auto (fused=auto: the route it measured faster on the first
step), prior=base guided over the middle half of the steps only, the conditional network alone (one at B, no
guidance), prior=distilled (θ with a scale embedding, w an input: one pass of θ at B, issue 33's distilled guidance),
and prior=base with a small base (the cheap prior: a 64-128-128-128 UNet for UNet-36M, DiT-S/2 for
DiT-B/2, and for UNet-7M-16px the 32-64-64 UNet whose quality the cheap_prior study measured; that pair runs without
channels-last, as the study trained and evaluated it), each launched eagerly, replayed from CUDA graphs
(`priorlab.sampling.GraphedStep`), and replayed with the weights' addresses read at every step as before baf14f8
(graphs_key_per_step) (--modes); each row captures its own graphs, within its own memory peak. Ratios divide by
batched CFG of the same launch mode and compilation; `targets` holds issue 17's and 33's (one pass ≤ 1.02× the faster
of launched and graphed batched CFG; distilled ≤ 0.55×; the cheap priors ≤ 0.7×; cheap_prior_lean is the cheap prior
shaped for activation elements, `lean_builders`). A row whose route fails is recorded as {"error": ...}. It also samples
prior=base graphed and launched, in one pass and two, from the same seeds: their largest differences (bf16).
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
from priorlab.models.scale import ScaleEmbedding  # noqa: E402
from priorlab.priors import NONE, SELF, BasePrior, DistilledPrior  # noqa: E402
from priorlab.priors import DenoiserPrior as Prior  # noqa: E402
from priorlab.sampling import make_scheduler, sample  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DISTILLED = DistilledPrior()


def dit_s(patch_size: int):
    """A DiT-S at 32 × 32 × 4 latents and 1,000 classes with patches of `patch_size` px: a cheap prior of DiT-B/2."""
    return dit((4, 32, 32), 1000, num_layers=12, num_attention_heads=6, attention_head_dim=64, patch_size=patch_size)


def small_unet(channels: tuple[int, ...], attention: tuple[bool, ...], groups: int):
    """A UNet with one layer per block at 32 × 32 × 3 and 10 classes: a cheap prior of UNet-36M."""
    return unet((3, 32, 32), 10, block_out_channels=channels, attention=attention, layers_per_block=1,
                norm_num_groups=groups, attention_head_dim=64)  # fmt: skip


def small_builders(smoke: bool) -> dict:
    """The cheap prior of each model: the same data shape and schedule, a smaller network."""
    if smoke:
        return {"dit": lambda: dit((4, 8, 8), 10, num_layers=1, num_attention_heads=1, attention_head_dim=8),
                "unet": lambda: unet((3, 8, 8), 10, block_out_channels=(8, 8), norm_num_groups=4)}  # fmt: skip
    return {
        "DiT-B/2": lambda: dit_s(2),  # DiT-S/2
        "UNet-36M": lambda: small_unet((64, 128, 128, 128), (False, True, False, False), 32),
        STUDY: lambda: unet(
            (1, 16, 16), 10, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, **STUDY_UNET
        ),  # the cheap_prior study's small prior, 1.24M parameters  # fmt: skip
    }


def lean_builders(smoke: bool) -> dict:
    """A cheap prior shaped for its activation elements rather than its multiply-adds (issue 33, item 3): a compiled
    UNet's time follows its activations (BENCHMARKS.md), so the lean prior keeps few channels at full resolution.
    UNet-36M: a 32-64-128-128 UNet with one layer per block and attention at 8 px (0.166 of the full UNet's activation
    elements, 0.062 of its MACs; the 64-128-128-128 cheap prior: 0.322 and 0.169). DiT-B/2: DiT-S/4, a quarter of
    the tokens (0.126 of the activations, 0.063 of the MACs; DiT-S/2: 0.500 and 0.250). Counts: bench/prior_flops.py."""
    small = small_builders(smoke)
    if smoke:
        return small
    return {
        "DiT-B/2": lambda: dit_s(4),  # DiT-S/4
        "UNet-36M": lambda: small_unet((32, 64, 128, 128), (False, False, True, False), 16),
        STUDY: small[STUDY],
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
    every step (now once per sample() call). The same kind of graphs replay; only that host work differs."""
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


ROWS = ("batched_cfg", "prior_base", "prior_base_fused", "prior_base_fused_auto", "prior_base_interval", "cond_only",
        "cheap_prior", "cheap_prior_lean", "distilled")  # fmt: skip
MODES = ("launched", "graphs", "graphs_key_per_step")


def time_config(model, labels, seeds, kwargs, runs: int) -> float:
    with torch.inference_mode():
        sample(model, labels, seeds, **kwargs)  # warm-up: compilation, graph capture, fused=auto's measurement
        times = []
        for _ in range(runs):
            sync()
            t0 = time.perf_counter()
            sample(model, labels, seeds, **kwargs)
            sync()
            times.append((time.perf_counter() - t0) / kwargs["num_steps"] * 1000)
    return statistics.median(times)


def measure_row(model, labels, seeds, kwargs, runs: int, device) -> dict:
    """ms per step and the peak memory above what was allocated before the row (its graphs, the fused pass's stacked
    weights and activations: the graph cache is emptied first); an error (a route the device refuses) is recorded,
    not raised."""
    sampling._GRAPHS.pop(model, None)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device) if cuda else 0
    try:
        row = {"ms_per_step": time_config(model, labels, seeds, kwargs, runs)}
    except Exception as err:  # noqa: BLE001 - one failed route must not end the run
        return {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    if cuda:
        row |= {"peak_mib_above_start": (torch.cuda.max_memory_allocated(device) - held) / 2**20,
                "allocated_mib_at_start": held / 2**20}  # fmt: skip
    return row


def targets(out: dict) -> dict:
    """The issues' targets, where their rows were measured: issue 17's (prior=base ≤ 1.05×, the interval bound, the
    cheap prior ≤ 0.7×, per launch mode) and issue 33's (prior=base in one pass ≤ 1.02× the faster of launched and
    graphed batched CFG)."""
    ms = lambda mode, row: out.get(mode, {}).get(row, {}).get("ms_per_step")  # noqa: E731
    res = {}
    cfgs = [v for v in (ms("launched", "batched_cfg"), ms("graphs", "batched_cfg")) if v]
    for mode in MODES:
        t = {r: ms(mode, r) for r in ROWS}
        if t["batched_cfg"] and t["prior_base"]:
            res[f"{mode}/prior_base_le_1.05"] = t["prior_base"] / t["batched_cfg"] <= 1.05
        if t["batched_cfg"] and t["cond_only"] and t["prior_base_interval"]:
            bound = 0.5 + 0.5 * t["cond_only"] / t["batched_cfg"] + 0.05
            res[f"{mode}/interval_le_bound"] = t["prior_base_interval"] / t["batched_cfg"] <= bound
        for cheap in ("cheap_prior", "cheap_prior_lean"):
            if t["batched_cfg"] and t[cheap]:
                res[f"{mode}/{cheap}_le_0.7"] = t[cheap] / t["batched_cfg"] <= 0.7
        if t["batched_cfg"] and t["distilled"]:
            res[f"{mode}/distilled_le_0.55"] = t["distilled"] / t["batched_cfg"] <= 0.55
        if cfgs and t["prior_base_fused"]:
            res[f"{mode}/fused_over_best_cfg"] = t["prior_base_fused"] / min(cfgs)
            res[f"{mode}/fused_le_1.02_best_cfg"] = t["prior_base_fused"] / min(cfgs) <= 1.02
    return res


def row_configs(rows, base, cheap, lean, sched, steps: int) -> dict:
    """name → sampling keywords of each asked row; every prior network is built anew per row (`Prior` of the
    network), so a row's fused pass builds its own stacked weights inside the row's memory peak."""
    ddim = make_scheduler("ddim", sched)
    ddim.set_timesteps(steps)
    sig = sigma(sched.alphas_cumprod[ddim.timesteps.long()]).sort().values
    interval = (float(sig[steps // 4]), float(sig[steps // 4 + steps // 2 - 1]))
    net = lambda m: Prior(m, sched, sched.alphas_cumprod)  # noqa: E731
    make = {
        "batched_cfg": lambda: dict(prior=SELF),
        "prior_base": lambda: dict(prior=BasePrior(net(base), fused="off")),
        "prior_base_fused": lambda: dict(prior=BasePrior(net(base), fused="on")),  # the vmap route
        "prior_base_fused_auto": lambda: dict(prior=BasePrior(net(base), fused="auto")),  # auto's choice
        "prior_base_interval": lambda: dict(prior=BasePrior(net(base), fused="off"), interval=interval),
        "cond_only": lambda: dict(prior=NONE),
        "cheap_prior": lambda: dict(prior=BasePrior(net(cheap), fused="off")),
        "cheap_prior_lean": lambda: dict(prior=BasePrior(net(lean), fused="off")),
        "distilled": lambda: dict(prior=DISTILLED),  # θ with w as an input (`distilled_copy`): one pass per step
    }
    return {name: make[name] for name in rows}


def bench_model(name, build, smalls, shape, k, batch, args, device, compile_: bool) -> dict:
    torch.manual_seed(0)
    model, base = build().to(device).eval(), build().to(device).eval()
    cheap = smalls[0]().to(device).eval() if "cheap_prior" in args.rows else None
    lean = smalls[1]().to(device).eval() if "cheap_prior_lean" in args.rows else None
    distilled = distilled_copy(build, device, w=4.0) if "distilled" in args.rows else None
    nets = [m for m in (model, base, cheap, lean, distilled) if m is not None]
    if len(shape) == 3 and "UNet" in model.class_name and device.type == "cuda" and name != STUDY:
        for m in nets:
            m.net.to(memory_format=torch.channels_last)
    if compile_:
        for m in nets:
            m.net.compile()
    sched = DDPMScheduler()
    configs = row_configs(args.rows, base, cheap, lean, sched, args.steps)
    labels, seeds = torch.arange(batch) % k, torch.arange(batch)
    sized = (("model", model), ("cheap_prior", cheap), ("cheap_prior_lean", lean))
    out = {"params_m": {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in sized if m is not None}}
    common = dict(train_scheduler=sched, sample_shape=shape, scale=4.0, num_steps=args.steps, batch_size=batch,
                  autocast=device.type == "cuda")  # fmt: skip
    for mode in args.modes:
        table = {}
        for cname, make in configs.items():
            kwargs = dict(**common, graphs=mode != "launched", **make())
            guided = distilled if cname == "distilled" else model
            with key_per_step(mode == "graphs_key_per_step"):
                table[cname] = row = measure_row(guided, labels, seeds, kwargs, args.runs, device)
            shown = f"{row['ms_per_step']:8.2f} ms/step" if "ms_per_step" in row else row["error"][:200]
            memory = f"  peak +{row['peak_mib_above_start']:.0f} MiB" if "peak_mib_above_start" in row else ""
            print(f"  {name} B={batch} compile={compile_} {mode:19s} {cname:22s} {shown}{memory}", flush=True)
        ref = table.get("batched_cfg", {}).get("ms_per_step")
        for row in table.values():  # over batched CFG of the same launch mode and compilation
            row |= {"ratio_to_batched_cfg": row["ms_per_step"] / ref} if ref and "ms_per_step" in row else {}
        out[mode] = table
    out["targets"] = targets(out)
    if args.agreement:
        out["agreement"] = agreement(model, base, sched, labels, seeds, common)
        print(f"  {name} B={batch} compile={compile_} agreement: {out['agreement']}", flush=True)
    return out


def distilled_copy(build, device, w: float):
    """θ as a guidance-distilled fine-tune samples it: the same network with a scale embedding (`models.scale`, w an
    input up to max_scale = w; its weights do not change the cost)."""
    model = build()
    model.add_scale_embedding(ScaleEmbedding(model.label_width, max_scale=w))
    return model.to(device).eval()


def agreement(model, base, sched, labels, seeds, common) -> dict:
    """Largest differences between samples of the same seeds: prior=base graphed vs launched, and in one pass vs
    two (bf16 networks: differences of a few 1e-2 are rounding)."""
    prior = lambda fused: BasePrior(Prior(base, sched, sched.alphas_cumprod), fused=fused)  # noqa: E731
    res = {}
    with torch.inference_mode():
        apart = sample(model, labels, seeds, **common, prior=prior("off"), graphs=False)
        for key, kw in (("graphed_vs_launched", dict(prior=prior("off"), graphs=True)),
                        ("fused_vs_two_passes", dict(prior=prior("on"), graphs=False))):  # fmt: skip
            try:
                diff = (sample(model, labels, seeds, **common, **kw) - apart).abs()
                res[key] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}
            except Exception as err:  # noqa: BLE001
                res[key] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
    res["sample_std"] = float(apart.std())
    return res


def names(value: str, allowed, what: str) -> list[str]:
    bad = [v for v in value.split(",") if v not in allowed]
    if bad:
        raise SystemExit(f"--{what}: {', '.join(bad)} unknown; use some of {', '.join(allowed)}")
    return value.split(",")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", default="256", help="batch sizes, e.g. 256,64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=None, help="model names, e.g. DiT-B/2 or DiT-B/2,UNet-36M (default all)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"rows, some of {','.join(ROWS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"launch modes, some of {','.join(MODES)}")
    parser.add_argument("--compile", default="false,true", help="eager and/or compiled networks")
    parser.add_argument("--no-agreement", dest="agreement", action="store_false", help="skip the sample agreement")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.steps, args.runs = "4", 4, 1
    args.rows, args.modes = names(args.rows, ROWS, "rows"), names(args.modes, MODES, "modes")
    batches = [int(b) for b in args.batch.split(",")]
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"card": card, "date": str(datetime.date.today()), "torch": torch.__version__, "batch": batches,
              "steps": args.steps, "runs": args.runs, "argv": sys.argv[1:], "models": {}}  # fmt: skip
    if device.type == "cuda":
        result["gpu_uuid"] = str(torch.cuda.get_device_properties(device).uuid)
    small, lean = small_builders(args.smoke), lean_builders(args.smoke)
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"{card.replace(' ', '_')}-{result['date']}-guided_sampling.json"
    wanted = args.only.split(",") if args.only else None
    for name, (build, shape, k) in all_models(args.smoke).items():
        if wanted and name not in wanted:
            continue
        for batch in batches:
            part = result["models"].setdefault(name if len(batches) == 1 else f"{name}/B={batch}", {})
            for comp in [c == "true" for c in args.compile.split(",")]:
                if comp and device.type != "cuda":
                    continue
                priors = (small[name], lean[name])
                part["compiled" if comp else "eager"] = bench_model(name, build, priors, shape, k, batch, args, device,
                                                                    comp)  # fmt: skip
                out.write_text(json.dumps(result, indent=1))  # after each part: a cut-off run keeps what it measured
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
