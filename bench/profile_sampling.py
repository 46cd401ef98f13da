"""Where the study's evaluation sampling spends its time (issue 17, item 3): one `sample()` of the gpu preset's
conditional evaluation (unet_s at 16 px, 750 samples, DDIM 25 steps, prior=self, w = 2, bf16 autocast), timed
under several settings and profiled once with torch.profiler (top operators by self CPU and by device time).

    python bench/profile_sampling.py [--threads N] [--out FILE]
    python bench/profile_sampling.py --evaluation      # cProfile of one conditional evaluation (w = 1, 2) instead

Prints the timings and the profile tables; writes them as JSON to --out (default
bench/results/<card>-<date>-profile_sampling.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_cost import setup  # noqa: E402

from priorlab.priors import SELF, BasePrior  # noqa: E402
from priorlab.sampling import sample  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def profile_evaluation(model, sched, prior, evaluator, shape, settings) -> None:
    """The Python profile of one conditional evaluation with w ∈ {1, 2} (three samplings), after a warm-up."""
    import cProfile
    import io
    import pstats
    from dataclasses import replace

    from priorlab.evaluation.conditional_quality import conditional_quality

    settings = replace(settings, guidance_scales=[1.0, 2.0])
    with torch.no_grad():
        conditional_quality(model, sched, prior, evaluator, shape, replace(settings, num_steps=2, bootstrap=0))
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.runcall(conditional_quality, model, sched, prior, evaluator, shape, settings)
        print(f"conditional evaluation, w = 1, 2: {time.perf_counter() - t0:.1f} s; {torch.get_num_threads()} threads")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--evaluation", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    model, sched, prior, _, evaluator, shape, settings = setup(args.smoke, device)
    if args.evaluation:
        profile_evaluation(model, sched, prior, evaluator, shape, settings)
        return
    n = settings.batch_size
    labels, seeds = torch.arange(n) % 10, torch.arange(n)
    base_kw = dict(train_scheduler=sched, sample_shape=shape, scale=2.0, num_steps=settings.num_steps, batch_size=n)
    cases = {
        "self_autocast": dict(prior=SELF, autocast=device.type == "cuda"),
        "self_fp32": dict(prior=SELF, autocast=False),
        "base_autocast": dict(prior=BasePrior(prior), autocast=device.type == "cuda"),
        "self_autocast_graphs": dict(prior=SELF, autocast=device.type == "cuda", graphs=True),
    }
    out = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "threads": torch.get_num_threads(),
           "samples": n, "steps": settings.num_steps, "seconds": {}}  # fmt: skip
    with torch.no_grad():
        for name, kw in cases.items():
            sample(model, labels, seeds, **base_kw, **kw)  # warm-up
            out["seconds"][name] = timed(lambda kw=kw: sample(model, labels, seeds, **base_kw, **kw), device)
            print(f"{name:22s} {out['seconds'][name]:.2f} s for {n} samples × {settings.num_steps} steps", flush=True)
        x = torch.randn(n, *shape, device=device)
        t = torch.full((n,), 500, device=device)
        y = labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            model(x, t, y)
            out["seconds"]["one_forward"] = timed(lambda: model(x, t, y), device)
        print(f"one forward at {n} rows: {out['seconds']['one_forward'] * 1000:.1f} ms", flush=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            sample(model, labels, seeds, **base_kw, prior=SELF, autocast=device.type == "cuda")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {"by_self_cpu": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
              "by_device": prof.key_averages().table(sort_by=sort, row_limit=25)}  # fmt: skip
    for name, table in tables.items():
        print(f"\n== {name}\n{table}", flush=True)
    out["tables"] = tables
    RESULTS.mkdir(exist_ok=True)
    path = (
        Path(args.out)
        if args.out
        else RESULTS / f"{out['card'].replace(' ', '_')}-{datetime.date.today()}-profile_sampling.json"
    )
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
