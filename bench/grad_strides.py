"""Which weights' gradients come back in other strides than the weights (issue 17, item 4), on a GPU.

    python bench/grad_strides.py            # the preset's unet_b at 1×32×32, eager and compiled

DDP builds its gradient buckets in each weight's strides and warns ("Grad strides do not match bucket view
strides") where a gradient arrives in others. This makes DDP's check without DDP: one bf16 training step of
DiffusionModule's loss with channels-last inputs, the weights converted by plain `.to(memory_format=channels_last)`
("plain") or by `priorlab.lightning_module.to_channels_last` ("priorlab"), eager and under torch.compile, and lists
every weight whose gradient's strides differ from its own. Prints one line per case and writes
bench/results/<card>-<date>-grad_strides.json.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from priorlab.lightning_module import DiffusionModule, to_channels_last
from priorlab.models import unet

RESULTS = Path(__file__).parent / "results"


def mismatches(compiled: bool, conversion: str) -> list:
    torch.manual_seed(0)
    net = unet((1, 32, 32), 10, block_out_channels=(128, 256, 256, 256), attention=(False, True, False, False),
               layers_per_block=2, norm_num_groups=32, attention_head_dim=64)  # fmt: skip
    module = DiffusionModule(net, DDPMScheduler(), torch.optim.AdamW, cond_dropout=0.1).cuda()
    if conversion == "plain":
        net.net.to(memory_format=torch.channels_last)
    else:
        to_channels_last(net.net, eager=not compiled)
    if compiled:
        net.net.compile()
    x = torch.randn(16, 1, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        module.loss(x, torch.randint(0, 10, (16,), device="cuda")).mean().backward()
    return [[name, list(p.shape), list(p.stride()), list(p.grad.stride())]
            for name, p in net.named_parameters() if p.grad.stride() != p.stride()]  # fmt: skip


def main() -> None:
    card = torch.cuda.get_device_name()
    result = {"card": card, "date": str(datetime.date.today()), "torch": torch.__version__, "cases": {}}
    for compiled in (False, True):
        for conversion in ("plain", "priorlab"):
            name = f"{'compiled' if compiled else 'eager'}-{conversion}"
            result["cases"][name] = bad = mismatches(compiled, conversion)
            print(f"{name}: {len(bad)} mismatched {bad}", flush=True)
    out = RESULTS / f"{card.replace(' ', '_')}-{result['date']}-grad_strides.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
