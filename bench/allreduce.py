"""All-reduce bandwidth between the GPUs of the host, for a gradient the size of a model's.

    python bench/allreduce.py [--params 35.75] [--out FILE]

Spawns one process per GPU (NCCL, NVLink multicast off) and times all_reduce of `params` million elements in
fp32 and bf16: median milliseconds over 20 calls after 5, and the bus bandwidth NCCL's tests report,
2·(n−1)/n · bytes / time. Explains what DDP's gradient all-reduce costs per step on this host.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, numel: int, port: int, out: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    result = {"gpus": world, "card": torch.cuda.get_device_name(), "numel": numel}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(numel, device="cuda", dtype=dtype)
        times = []
        for i in range(25):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            torch.cuda.synchronize()
            if i >= 5:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        size = numel * x.element_size()
        result[str(dtype).removeprefix("torch.")] = {
            "median_ms": med * 1000, "bytes": size, "bus_gb_per_s": 2 * (world - 1) / world * size / med / 1e9,
        }  # fmt: skip
    if rank == 0:
        print(json.dumps(result, indent=1))
        if out:
            with open(out, "w") as f:
                json.dump(result, f, indent=1)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=35.75, help="millions of elements (UNet-36M: 35.75)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    world = torch.cuda.device_count()
    if world < 2:
        raise SystemExit("bench/allreduce.py needs 2 or more GPUs")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(world, int(args.params * 1e6), port, args.out), nprocs=world)


if __name__ == "__main__":
    main()
