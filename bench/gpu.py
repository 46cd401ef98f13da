"""GPU benchmark: training throughput and MFU, sampling step time, evaluation throughput, peak memory.

Everything is measured in one run on one card; medians over `--steps` steps after `--warmup` steps.

    python bench/gpu.py                     # writes bench/results/<card>-<date>.json and prints a table
    python bench/gpu.py --smoke             # tiny models on the CPU: checks the script, measures nothing

Training compares priorlab's own path (DiffusionModule through Lightning's Trainer, with the trainer=gpu
preset's settings) against a plain PyTorch loop over the same network, in fp32 and in bf16 + torch.compile.
MFU divides the model FLOPs of one step (counted by torch.utils.flop_counter on the forward and backward
pass) by the step time and by the card's bf16 matrix rate measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch.utils.flop_counter import FlopCounterMode

from priorlab import diffusion
from priorlab.models import dit, unet
from priorlab.priors import NONE, SELF, BasePrior
from priorlab.priors import DenoiserPrior as Prior
from priorlab.sampling import sample

RESULTS = Path(__file__).parent / "results"
CPROFILE = False  # --cprofile: the host's Python, by function, over each training path's free-running block


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_bf16_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """The card's dense bf16 matrix rate: median TFLOP/s of n×n×n products on random data."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def models(smoke: bool) -> dict:
    """name → (builder, sample_shape, num_classes)."""
    if smoke:
        return {
            "dit": (
                lambda: dit((4, 8, 8), 10, num_layers=1, num_attention_heads=2, attention_head_dim=8),
                (4, 8, 8),
                10,
            ),
            "unet": (lambda: unet((3, 8, 8), 10, block_out_channels=(8, 16), norm_num_groups=4), (3, 8, 8), 10),
        }
    return {
        "DiT-B/2": (
            lambda: dit((4, 32, 32), 1000, num_layers=12, num_attention_heads=12, attention_head_dim=64, patch_size=2),
            (4, 32, 32),
            1000,
        ),
        "UNet-36M": (unet_b, (3, 32, 32), 10),
    }


def unet_b(channels: int = 3):
    """The presets' unet_b (configs/model/unet_b.yaml: DDPM's CIFAR-10 UNet) for 32-px images with `channels`
    channels and 10 classes: 35.8M parameters at 3 channels."""
    return unet((channels, 32, 32), 10, block_out_channels=(128, 256, 256, 256), attention=(False, True, False, False),
                layers_per_block=2, norm_num_groups=32, attention_head_dim=64)  # fmt: skip


def step_flops(build, shape, num_classes, batch: int, device) -> float:
    """FLOPs of one training step's forward and backward pass (optimizer excluded)."""
    model = build().to(device)
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t, y).float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def plain_loop(
    build, shape, num_classes, batch, device, bf16: bool, compile: bool | str, steps: int, warmup: int, profile: int = 0
) -> dict:
    """A plain PyTorch training loop over the same network: fused AdamW, data already on the GPU; timed by
    `StepClock` as the priorlab path is."""
    torch.manual_seed(0)
    model = build().to(device)
    if len(shape) == 3 and "unet" in type(model.net).__name__.lower():
        model.net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    net = torch.compile(model, mode="default" if compile is True else compile) if compile else model
    abar = DDPMScheduler().alphas_cumprod.to(device)
    x0 = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    clock = StepClock(warmup, steps, profile)
    for i in range(clock.total):
        clock.before(i)
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = net(diffusion.add_noise(x0, noise, abar[t]), t, y)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clock.after(i)
    return clock.result(batch, device)


class StepClock:
    """The timing of both training paths, by step index i from 0.

    Steps warmup .. warmup+steps are timed one by one, synchronised before and after each ("median_step_s"):
    every host-side cost of a step is exposed, since each starts with an empty GPU queue. The next `steps` run
    free, as in real training, where the host queues kernels ahead of the GPU: a CUDA event is recorded at the
    start of each, with no synchronisation, and the median interval between consecutive events is the step's
    period as the GPU sees it ("free_median_step_s"; the host's own period between the same points is
    "free_host_step_s": when it is as long as the GPU's, the host is the bottleneck). The block is also timed
    as a whole ("free_images_per_s"). The last `profile` steps run under torch.profiler, which stops at the
    end of the last one.
    """

    def __init__(self, warmup: int, steps: int, profile: int):
        self.warmup, self.steps, self.profile = warmup, steps, profile
        self.free_start, self.free_end = warmup + steps, warmup + 2 * steps
        self.total = self.free_end + profile
        self.times: list[float] = []
        self.events: list = []
        self.host: list[float] = []
        self.prof = Profile()
        self.cprofile = None

    def _free(self, i: int) -> bool:
        return self.free_start <= i < self.free_end

    def _mark(self) -> None:
        """An event at a step boundary of the free block (the host's clock on the CPU, which has no events)."""
        self.host.append(time.perf_counter())
        if torch.cuda.is_available():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append(e)

    def before(self, i: int) -> None:
        if i == self.free_end and self.profile:
            self.prof.start()
        if i == self.free_start:
            sync()
            self.t_free = time.perf_counter()
            if CPROFILE:
                import cProfile

                self.cprofile = cProfile.Profile()
                self.cprofile.enable()
        if self._free(i):
            self._mark()
        else:
            sync()
            self.t0 = time.perf_counter()

    def after(self, i: int) -> None:
        if not self._free(i):
            sync()
            if self.warmup <= i < self.free_start:
                self.times.append(time.perf_counter() - self.t0)
        if i == self.free_end - 1:
            self._mark()  # the end of the block's last step
            sync()
            self.free_seconds = time.perf_counter() - self.t_free
            if self.cprofile is not None:
                self.cprofile.disable()
        if self.profile and i == self.total - 1:
            self.prof.stop(self.profile)  # before a Lightning fit ends: its teardown stays out of the tables

    def result(self, batch: int, device) -> dict:
        host = [b - a for a, b in zip(self.host, self.host[1:], strict=False)]
        if self.events:
            periods = [a.elapsed_time(b) / 1000 for a, b in zip(self.events, self.events[1:], strict=False)]
        else:
            periods = host
        free = {"free_images_per_s": self.steps * batch / self.free_seconds,
                "free_median_step_s": statistics.median(periods), "free_host_step_s": statistics.median(host),
                "free_median_images_per_s": batch / statistics.median(periods)}  # fmt: skip
        out = {**_summary(self.times, batch, device), **free, **self.prof.stop(self.profile)}
        if self.cprofile is not None:
            import io
            import pstats

            text = io.StringIO()
            stats = pstats.Stats(self.cprofile, stream=text)
            stats.sort_stats("tottime").print_stats(35)
            stats.sort_stats("cumulative").print_stats(60)
            out["cprofile"] = text.getvalue()
        return out


class Profile:
    """torch.profiler over some steps: tables of the operators and kernels by GPU time and by self CPU time.

    Stopped at the end of the last profiled step, so nothing after it (Lightning's teardown, which copies the
    model and optimizer state to the CPU) enters the tables. (User annotations such as Optimizer.step are GPU
    ranges that overlap the kernels in them, and a range's self CPU time includes waiting for the autograd
    engine's thread: read the kernel rows.)"""

    def __init__(self):
        self.prof = None
        self.result: dict = {}

    def start(self) -> None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts)
        self.prof.__enter__()

    def stop(self, steps: int) -> dict:
        if self.prof is None or self.result:
            return self.result
        sync()
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        tables = [
            events.table(sort_by=key, row_limit=40, max_name_column_width=70) for key in (sort, "self_cpu_time_total")
        ]
        self.result = {"profile": {"steps": steps, "table": "\n".join(tables)}}
        return self.result


def _summary(times: list[float], batch: int, device) -> dict:
    med = statistics.median(times)
    out = {"median_step_s": med, "images_per_s": batch / med, "steps_timed": len(times)}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def priorlab_path(
    build,
    shape,
    num_classes,
    batch,
    device,
    bf16: bool,
    compile: bool | str,
    steps: int,
    warmup: int,
    ema: str = "priorlab",
    profile: int = 0,
) -> dict:
    """DiffusionModule through Lightning's Trainer with the trainer=gpu preset's settings, EMA on.

    ema: "priorlab" (the project's fused, synchronisation-free EMA), "lightning" (Lightning's
    EMAWeightAveraging, which priorlab used before) or "none"; the last two are ablations.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from priorlab.data.base import TensorDataModule
    from priorlab.training.callbacks import EMA
    from priorlab.training.module import DiffusionModule

    class RandomData(TensorDataModule):
        def load(self):
            g = torch.Generator().manual_seed(0)
            n = 8 * batch
            return torch.randn(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g), num_classes

    clock = StepClock(warmup, steps, profile)

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            clock.before(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            clock.after(trainer.global_step - 1)

    torch.manual_seed(0)
    dm = RandomData(batch_size=batch, val_fraction=0.01)
    module = DiffusionModule(build(), DDPMScheduler(), lambda params: torch.optim.AdamW(params, lr=1e-4,
                             fused=device.type == "cuda"), cond_dropout=0.1, compile=compile,
                             channels_last=len(shape) == 3)  # fmt: skip
    ema_callbacks = {"priorlab": [EMA(decay=0.999)], "lightning": [EMAWeightAveraging(decay=0.999)], "none": []}
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if bf16 else "32-true", max_steps=clock.total,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[*ema_callbacks[ema], StepTimer()])  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, dm)
    return clock.result(batch, device)


def sampling_bench(build, shape, num_classes, batch, device, steps: int, compile: bool) -> dict:
    """Time per denoising step at B=batch in bf16: batched CFG (one network at 2B), prior=base (two at B),
    prior=base with an interval, and the conditional network alone (one at B, no guidance), whose time bounds
    the other two from below: prior=base costs at least two of it unless the networks overlap on the GPU."""
    torch.manual_seed(0)
    model, base = build().to(device).eval(), build().to(device).eval()
    if len(shape) == 3 and "UNet" in model.class_name:
        for m in (model, base):
            m.net.to(memory_format=torch.channels_last)
    if compile:
        for m in (model, base):
            m.net.compile()
    sched = DDPMScheduler()
    prior = Prior(base, sched, sched.alphas_cumprod)
    labels = torch.arange(batch) % num_classes
    seeds = torch.arange(batch)
    # σ of the DDIM timesteps: an interval covering the middle half of them
    from priorlab.guidance import sigma
    from priorlab.sampling import make_scheduler

    ddim = make_scheduler("ddim", sched)
    ddim.set_timesteps(steps)
    sig = sigma(sched.alphas_cumprod[ddim.timesteps.long()]).sort().values
    interval = (float(sig[steps // 4]), float(sig[steps // 4 + steps // 2 - 1]))
    configs = {"batched_cfg": dict(prior=SELF), "prior_base": dict(prior=BasePrior(prior)),
               "prior_base_interval": dict(prior=BasePrior(prior), interval=interval),
               "cond_only": dict(prior=NONE)}  # fmt: skip  # one network at B: the bound of the two above
    out = {}
    for name, kw in configs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        kwargs = dict(train_scheduler=sched, sample_shape=shape, scale=4.0, num_steps=steps, batch_size=batch,
                      autocast=device.type == "cuda", **kw)  # fmt: skip
        with torch.inference_mode():
            sample(model, labels, seeds, **kwargs)  # warm-up (and compilation)
            runs = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                sample(model, labels, seeds, **kwargs)
                sync()
                runs.append((time.perf_counter() - t0) / steps * 1000)
            syncs = count_syncs(sample, model, labels, seeds, **kwargs) if device.type == "cuda" else None
        out[name] = {"ms_per_step": statistics.median(runs), "host_syncs_per_run": syncs}
        if device.type == "cuda":
            out[name]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    ref = out["batched_cfg"]["ms_per_step"]
    for name in out:
        out[name]["ratio_to_batched_cfg"] = out[name]["ms_per_step"] / ref
    out["interval_sigma"] = interval
    return out


def count_syncs(fn, *args, **kwargs) -> int:
    """How many operations of fn(*args, **kwargs) wait for the GPU (torch.cuda's synchronisation debug mode)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def eval_bench(build, shape, num_classes, device, n: int, steps: int) -> dict:
    """Images/s through sampling (prior=base, w=2, bf16), evaluator features and FD, for n samples."""
    from priorlab.evaluation import metrics
    from priorlab.evaluation.features import Classifier
    from priorlab.evaluation.generation import generate
    from priorlab.evaluation.settings import EvalSettings

    torch.manual_seed(0)
    model, base = build().to(device).eval(), build().to(device).eval()
    sched = DDPMScheduler()
    prior = Prior(base, sched, sched.alphas_cumprod)
    net = Classifier(shape, num_classes).to(device).eval()
    reference = torch.randn(n, net.feature_dim)
    settings = EvalSettings(num_samples=n, num_steps=steps, batch_size=1000, autocast=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = generate(
            model, sched, torch.arange(n) % num_classes, torch.arange(n), shape, settings, 2.0, BasePrior(prior)
        )
        t_sample = time.perf_counter() - t0
        feats = torch.cat([net.features(c.to(device)) for c in x.split(1000)]).cpu()
        fd = metrics.frechet_distance(feats, reference)
    sync()
    total = time.perf_counter() - t0
    out = {"num_samples": n, "num_steps": steps, "seconds": total, "sampling_seconds": t_sample,
           "images_per_s": n / total, "fd": fd}  # fmt: skip
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=10_000)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=None, help="one model name, e.g. DiT-B/2 or UNet-36M")
    parser.add_argument("--ablate", action="store_true", help="also priorlab bf16+compile with Lightning's EMA / none")
    parser.add_argument("--precisions", default="fp32,bf16,bf16+compile",
                        help="training precisions (also bf16+compile+cudagraphs: mode reduce-overhead)")  # fmt: skip
    parser.add_argument("--train-only", action="store_true", help="skip the sampling and evaluation parts")
    parser.add_argument("--no-train", action="store_true", help="skip the training part")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation part")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="profile this many steps, after the timed ones, of plain and priorlab at bf16+compile (--smoke: all)",
    )
    parser.add_argument("--cprofile", action="store_true", help="profile the host's Python in the free-running block")
    args = parser.parse_args()
    global CPROFILE
    CPROFILE = args.cprofile
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.steps, args.warmup, args.batch, args.sample_steps, args.eval_samples = 3, 1, 4, 2, 8
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"card": card, "date": str(datetime.date.today()), "torch": torch.__version__, "batch": args.batch,
              "steps_timed": args.steps, "warmup": args.warmup, "models": {}}  # fmt: skip
    if device.type == "cuda":
        result["peak_bf16_tflops"] = peak_bf16_tflops(device)
        result["gpu_uuid"] = str(torch.cuda.get_device_properties(device).uuid)
    if args.cprofile:
        result["cprofile"] = "the free-running figures include cProfile's overhead"
    suffix = f"-{args.only.replace('/', '')}" if args.only else ""
    out = Path(args.out) if args.out else RESULTS / f"{card.replace(' ', '_')}-{result['date']}{suffix}.json"
    out.with_suffix(".profile.txt").unlink(missing_ok=True)
    out.with_suffix(".cprofile.txt").unlink(missing_ok=True)
    for name, (build, shape, k) in models(args.smoke).items():
        if args.only and name != args.only:
            continue
        print(f"== {name}", flush=True)
        entry = {"params_m": sum(p.numel() for p in build().parameters()) / 1e6,
                 "train_step_flops": step_flops(build, shape, k, args.batch, device), "train": {}}  # fmt: skip
        result["models"][name] = entry
        precisions = (("fp32", False, False), ("bf16", True, False), ("bf16+compile", True, True),
                      ("bf16+compile+cudagraphs", True, "reduce-overhead"))  # fmt: skip
        for label, bf16, comp in precisions:
            if (args.smoke and comp) or label not in args.precisions.split(",") or args.no_train:
                continue
            for path, fn in (("plain", plain_loop), ("priorlab", priorlab_path)):
                prof = args.profile if comp is True or args.smoke else 0
                r = fn(build, shape, k, args.batch, device, bf16, comp, args.steps, args.warmup, profile=prof)
                add_mfu(r, entry, result, device)
                if "cprofile" in r:
                    with open(out.with_suffix(".cprofile.txt"), "a") as f:
                        f.write(f"== {name} {path} {label}: {args.steps} free-running steps\n{r.pop('cprofile')}\n")
                if "profile" in r:
                    table = r["profile"].pop("table")
                    with open(out.with_suffix(".profile.txt"), "a") as f:
                        f.write(f"== {name} {path} {label}: {prof} steps\n{table}\n")
                entry["train"][f"{path}/{label}"] = r
                write(result, out)
                free, host = r["free_median_images_per_s"], args.batch / r["free_host_step_s"]
                print(f"  train {path:9s} {label:13s} {r['images_per_s']:9.1f} img/s synchronised, {free:9.1f} "
                      f"free running (host's pace {host:.1f})", flush=True)  # fmt: skip
            if args.ablate and comp is True:
                for ema in ("lightning", "none"):
                    r = priorlab_path(build, shape, k, args.batch, device, bf16, comp, args.steps, args.warmup, ema)
                    add_mfu(r, entry, result, device)
                    entry["train"][f"priorlab-ema={ema}/{label}"] = r
                    write(result, out)
                    print(f"  train priorlab ema={ema:9s} {label} {r['images_per_s']:9.1f} img/s", flush=True)
        write(result, out)
        if args.train_only:
            continue
        for comp in (False, True) if not args.smoke else (False,):
            s = sampling_bench(build, shape, k, args.batch, device, args.sample_steps, comp)
            entry[f"sampling{'/compile' if comp else ''}"] = s
            write(result, out)
            print(f"  sampling compile={comp}: " + ", ".join(
                f"{n} {v['ms_per_step']:.1f} ms" for n, v in s.items() if isinstance(v, dict)), flush=True)  # fmt: skip
        if ("UNet" in name or name == "unet") and not args.no_eval:
            entry["eval"] = eval_bench(build, shape, k, device, args.eval_samples, 25 if not args.smoke else 2)
            print(f"  eval {entry['eval']['images_per_s']:.1f} img/s", flush=True)
        write(result, out)
    print(f"wrote {out}")


def add_mfu(r: dict, entry: dict, result: dict, device) -> None:
    """MFU of a training result's synchronised and free-running step times, against the run's measured rate."""
    if device.type == "cuda":
        for key, step in (("mfu", "median_step_s"), ("free_mfu", "free_median_step_s")):
            r[key] = entry["train_step_flops"] / r[step] / (result["peak_bf16_tflops"] * 1e12)


def write(result: dict, out: Path) -> None:
    """Write the figures so far (after each part, so a run cut short keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
