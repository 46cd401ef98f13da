"""CPU benchmark: conditional evaluation of the tiny MNIST preset (issue 3's speed target).

1,000 samples at 25 DDIM steps for prior ∈ {self, base} and guidance scale ∈ {1, 2, 4}, with FD, KID,
precision, recall and accuracy; target ≤ 3 minutes on 2 CPU cores. Timing does not depend on the weights,
so the model and base are the unet_tiny preset at initialisation and the evaluator is trained briefly.

    python bench/eval_cpu.py [--repeats 3]      # writes bench/results/cpu-eval-<date>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from priorlab.cli import CONFIG_DIR
from priorlab.evaluation.conditional_quality import conditional_quality
from priorlab.evaluation.features import Evaluator, fit_classifier
from priorlab.evaluation.settings import EvalSettings
from priorlab.priors import DenoiserPrior as Prior


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data=mnist", "model=unet_tiny"])
    dm = instantiate(cfg.data)
    dm.setup()
    torch.manual_seed(0)
    model = instantiate(cfg.model)(sample_shape=dm.sample_shape, num_classes=dm.num_classes).eval()
    base = instantiate(cfg.model)(sample_shape=dm.sample_shape, num_classes=dm.num_classes).eval()
    scheduler = instantiate(cfg.diffusion)
    net, acc = fit_classifier(dm.train_set.tensors, dm.val_set.tensors, dm.num_classes, steps=200)
    x, y = dm.all_data()
    with torch.no_grad():
        evaluator = Evaluator(net, net.features(x), y, acc)
    prior = Prior(base, DDPMScheduler.from_config(scheduler.config), scheduler.alphas_cumprod)
    settings = EvalSettings(num_samples=args.num_samples, num_steps=25, guidance_scales=[1.0, 2.0, 4.0])
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        with torch.inference_mode():
            conditional_quality(model, scheduler, prior, evaluator, dm.sample_shape, settings)
        times.append(time.perf_counter() - start)
    result = {
        "benchmark": "conditional evaluation, unet_tiny on MNIST 16 px, 2 priors x 3 scales",
        "num_samples": args.num_samples, "num_steps": 25, "priors": ["self", "base"], "guidance_scales": [1, 2, 4],
        "seconds": times, "median_seconds": statistics.median(times), "target_seconds": 180,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "params": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
    }  # fmt: skip
    out = Path(__file__).parent / "results" / f"cpu-eval-{datetime.date.today()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
