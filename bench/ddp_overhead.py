"""Where DDP's eager per-step overhead goes (issue 17, item 4), in a plain PyTorch loop, without Lightning.

    python bench/ddp_overhead.py                          # one GPU: DDP over a world of one process
    torchrun --nproc-per-node 2 bench/ddp_overhead.py     # two GPUs, one process each
    python bench/ddp_overhead.py --smoke                  # CPU (gloo), a tiny UNet: checks that the script runs

The preset's training step (unet_b, 1×32×32 inputs, batch 256 per process, bf16 autocast, channels-last, fused
AdamW, eps-prediction MSE) timed for each variant, on the same network from the same weights:
- plain: the network itself, no DDP;
- ddp: DistributedDataParallel with its defaults (what trainer=ddp builds);
- ddp_view: gradient_as_bucket_view=True (the gradients live in the buckets: no copy in or out);
- ddp_skip: a communication hook that all-reduces nothing (`priorlab.training.ddp.skip_allreduce_hook`);
- ddp_nosync: the step under `no_sync()`: DDP's forward, no gradient hooks firing into buckets at all.
With one process, DDP's all-reduce is a copy within one GPU, so ddp − plain is DDP's own bookkeeping (its
autograd hooks, the bucket copies, its forward pass), apart from any second GPU or host sharing.

Each variant: `--warmup` steps, then `--repeats` blocks of `--steps` steps timed between device syncs (median
ms per step), then, with `--profile`, a torch.profiler trace of `--profile-steps` steps summarised as the host's
and the GPU's busy time per step and the ten ops with the largest self time on each. Writes
bench/results/<card>-<date>-ddp_overhead-ws<world>.json from rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from gpu import sync, unet_b, write  # noqa: E402

from priorlab.models import unet  # noqa: E402
from priorlab.training.ddp import skip_allreduce_hook  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("plain", "ddp", "ddp_view", "ddp_skip", "ddp_nosync")


def build(smoke: bool):
    if smoke:
        return unet((1, 16, 16), 10, block_out_channels=(16, 32), norm_num_groups=8), (1, 16, 16)
    return unet_b(channels=1), (1, 32, 32)


def wrap(variant: str, net: torch.nn.Module, device: torch.device):
    if variant == "plain":
        return net
    ids = [device.index] if device.type == "cuda" else None
    model = DDP(net, device_ids=ids, gradient_as_bucket_view=variant == "ddp_view")
    if variant == "ddp_skip":
        model.register_comm_hook(None, skip_allreduce_hook)
    return model


def make_step(model, variant: str, opt, x, t, y, autocast: bool):
    def step():
        ctx = model.no_sync() if variant == "ddp_nosync" else torch.enable_grad()
        with ctx:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
                pred = model(x, t, y)
            F.mse_loss(pred.float(), x.float()).backward()  # the target's value does not change the work
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def summarise(prof, steps: int) -> dict:
    """Host and GPU busy time per step and the top self-time ops of each, from a profiler trace."""
    events = prof.key_averages()
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    gpu = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)

    def row(e, attr):
        return {"op": e.key, "ms_per_step": getattr(e, attr, 0) / 1000 / steps, "calls_per_step": e.count / steps}

    return {
        "host_self_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1000 / steps,
        # the kernels' own rows only: an op's row also carries the device time of the kernels it launched
        "gpu_busy_ms_per_step": sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        / 1000
        / steps,
        "top_host": [row(e, "self_cpu_time_total") for e in host[:10]],
        "top_gpu": [row(e, "self_device_time_total") for e in gpu[:10]],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile-steps", type=int, default=5)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        args.batch, args.warmup, args.steps, args.repeats, args.profile_steps = 4, 1, 2, 1, 1
    if "RANK" not in os.environ:  # a world of one process, without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    net, shape = build(args.smoke)
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(args.batch, *shape, device=device, generator=g)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (args.batch,), device=device, generator=g)
    y = torch.randint(0, 10, (args.batch,), device=device, generator=g)
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    result = {"card": card, "date": str(datetime.date.today()), "torch": torch.__version__, "world_size": world,
              "batch_per_process": args.batch, "steps": args.steps, "repeats": args.repeats,
              "variants": {}}  # fmt: skip
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"{card.replace(' ', '_')}-{result['date']}-ddp_overhead-ws{world}.json"
    )
    for variant in variants:
        net, _ = build(args.smoke)  # a fresh network per variant: no earlier DDP's hooks left on its parameters
        net.load_state_dict(initial)
        net = net.to(device, memory_format=torch.channels_last) if cuda else net
        model = wrap(variant, net, device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda)
        step = make_step(model, variant, opt, x, t, y, autocast=cuda)
        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            times.append((time.perf_counter() - t0) / args.steps * 1000)
        row = {"ms_per_step": statistics.median(times), "block_ms_per_step": times}
        row["img_per_s_per_process"] = args.batch / row["ms_per_step"] * 1000
        if args.profile:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                for _ in range(args.profile_steps):
                    step()
                sync()
            row["profile"] = summarise(prof, args.profile_steps)
        result["variants"][variant] = row
        if rank == 0:
            print(f"  ws={world} {variant:10s} {row['ms_per_step']:8.2f} ms/step  "
                  f"{row['img_per_s_per_process']:8.0f} img/s per process", flush=True)  # fmt: skip
            write(with_ratios(result), out)  # after every variant: a run cut short keeps the variants it measured
        del model, opt, step, net
        gc.collect()
    if rank == 0:
        print(f"wrote {out}")
    dist.destroy_process_group()


def with_ratios(result: dict) -> dict:
    """The results, each variant's throughput against the plain loop's where that ran."""
    ref = result["variants"].get("plain", {}).get("ms_per_step")
    if ref:
        for row in result["variants"].values():
            row["throughput_vs_plain"] = ref / row["ms_per_step"]
    return result


if __name__ == "__main__":
    main()
