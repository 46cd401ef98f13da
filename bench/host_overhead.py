"""Host time per training step that priorlab's path adds to a plain loop, and of its EMA update.

1. A tiny MLP on the CPU, whose compute is negligible, through the priorlab path (Lightning, EMA, logging, data
   loader) and through bench/gpu.py's plain loop: the median step times and their difference.
2. The EMA update with its tensor lists kept between steps (now) and rebuilt at every step (before), on the
   UNet-36M of bench/gpu.py. Every parameter and buffer is shrunk to one element, so the fused update computes
   almost nothing and the time measured is the host's: what a GPU run pays before it can queue the next step's
   kernels (the walk over the modules does not depend on the tensors' sizes).

    python bench/host_overhead.py        # prints and writes bench/results/host-overhead-<date>.json
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu  # noqa: E402

from priorlab.training.callbacks import EMA  # noqa: E402


class _Module(torch.nn.Module):
    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.device = torch.device("cpu")


def step_overhead(steps: int = 300) -> dict:
    from priorlab.models import mlp

    torch.set_num_threads(1)
    build = lambda: mlp((2,), 3, hidden=8, depth=1)  # noqa: E731
    cpu = torch.device("cpu")
    out = {}
    for name, fn in (("plain", gpu.plain_loop), ("priorlab", gpu.priorlab_path)):
        r = fn(build, (2,), 3, 4, cpu, False, False, steps, 30)
        out[f"{name}_step_ms"] = r["median_step_s"] * 1000
    out["priorlab_extra_ms"] = out["priorlab_step_ms"] - out["plain_step_ms"]
    return out


def main(repeats: int = 200) -> None:
    build = gpu.models(False)["UNet-36M"][0]
    module = _Module(build())
    for t in [*module.parameters(), *module.buffers()]:
        t.data = t.data.flatten()[:1].clone()
    ema = EMA(decay=0.999)
    ema._average_model = torch.optim.swa_utils.AveragedModel(module, use_buffers=True)
    ema._count = 1
    out = {"date": str(datetime.date.today()), "model": "UNet-36M", "tensors": len(list(module.parameters()))}
    for name, keep in (("lists_kept", True), ("lists_rebuilt_each_step", False)):
        times = []
        for _ in range(repeats):
            if not keep:
                ema._pairs = None
            t0 = time.perf_counter()
            ema.update_average(module)
            times.append(time.perf_counter() - t0)
        out[f"ema_update_ms_{name}"] = statistics.median(times) * 1000
    out["tiny_mlp_cpu"] = step_overhead()
    print(json.dumps(out, indent=2))
    path = Path(__file__).parent / "results" / f"host-overhead-{out['date']}.json"
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
