"""Which weights' gradients come back in other strides than the weights (issue 17, item 4), on a GPU.

    python bench/grad_strides.py            # the preset's unet_b at 1×32×32, eager and compiled, channels-last

DDP builds its gradient buckets in each weight's strides and warns ("Grad strides do not match bucket view strides"),
once per process, where a gradient arrives in others. This lists every such weight without DDP, after one bf16 training
step of DiffusionModule's loss with channels-last weights and inputs, eager and under torch.compile, and says of each
whether only the strides of size-1 dimensions differ (`priorlab.training.ddp.same_order`: the same bytes, DDP's copy is
a plain one) or the element order does. Compiled without DDP is not the compiled DDP step (DDP splits the compiled
graph at its buckets), so the compiled case does not predict a compiled DDP run; `trainer=ddp` runs the same check
itself after its first backward pass. Prints one line per case and writes
bench/results/<card>-<date>-grad_strides.json."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).parent))
from gpu import unet_b  # noqa: E402

from priorlab.training.ddp import same_order  # noqa: E402
from priorlab.training.module import DiffusionModule  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def mismatches(compiled: bool) -> list:
    torch.manual_seed(0)
    net = unet_b(channels=1)
    module = DiffusionModule(net, DDPMScheduler(), torch.optim.AdamW, cond_dropout=0.1, channels_last=True,
                             compile=compiled).cuda()  # fmt: skip
    x = torch.randn(16, 1, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        module.loss(x, torch.randint(0, 10, (16,), device="cuda")).mean().backward()
    return [{"weight": name, "shape": list(p.shape), "strides": list(p.stride()), "grad": list(p.grad.stride()),
             "same_order": same_order(p.grad, p)}
            for name, p in net.named_parameters() if p.grad.stride() != p.stride()]  # fmt: skip


def main() -> None:
    card = torch.cuda.get_device_name()
    result = {"card": card, "date": str(datetime.date.today()), "torch": torch.__version__, "cases": {}}
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        result["cases"][name] = bad = mismatches(compiled)
        print(f"{name}: {len(bad)} mismatched {bad}", flush=True)
    out = RESULTS / f"{card.replace(' ', '_')}-{result['date']}-grad_strides.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
