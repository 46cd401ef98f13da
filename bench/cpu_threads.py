"""CPU training step time against torch's intra-op thread count, on an idle and on a loaded machine (issue 17,
item 5).

    python bench/cpu_threads.py                     # unet_tiny, MNIST-sized 16 px batches of 128
    python bench/cpu_threads.py --steps 5 --smoke   # a quick check that it runs

Each (threads, load) cell runs in a fresh process: `threads` is torch.set_num_threads (the thread count a CPU
preset sets), `load` the number of other processes spinning on the CPU meanwhile (a second job, a test run, a
browser: what a shared 2-core machine has). The figure is the median step time (forward, backward, AdamW) over
--steps steps after 3 of warm-up. Writes bench/results/cpu-<date>-threads.json with the machine's core count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def spin(stop) -> None:
    while not stop.is_set():
        pass


def one_cell(threads: int, steps: int, batch: int, size: int) -> float:
    """Median seconds per training step of unet_tiny with `threads` intra-op threads (run in a child process)."""
    import torch

    from priorlab.models import unet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = unet((1, size, size), 10, block_out_channels=(16, 32), attention=(False, True), layers_per_block=1,
                 norm_num_groups=8, attention_head_dim=8)  # fmt: skip  # configs/model/unet_tiny.yaml
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 1, size, size), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        t = torch.randint(0, 1000, (batch,))
        loss = (model(x, t, y) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--loads", default="0,1,2")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: threads,steps,batch,size
    args = parser.parse_args()
    if args.cell:
        threads, steps, batch, size = map(int, args.cell.split(","))
        print(one_cell(threads, steps, batch, size))
        return
    if args.smoke:
        args.steps, args.batch, args.loads = 2, 8, "0"
    cores = os.cpu_count()
    result = {"date": str(datetime.date.today()), "cores": cores, "batch": args.batch, "size": args.size,
              "steps": args.steps, "cells": []}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    for load in map(int, args.loads.split(",")):
        stop = mp.Event()
        spinners = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(load)]
        for p in spinners:
            p.start()
        try:
            for threads in map(int, args.threads.split(",")):
                cell = f"{threads},{args.steps},{args.batch},{args.size}"
                out = subprocess.run([sys.executable, __file__, "--cell", cell], env=env, capture_output=True,
                                     text=True, check=True)  # fmt: skip
                seconds = float(out.stdout.strip().splitlines()[-1])
                result["cells"].append({"threads": threads, "load": load, "seconds_per_step": seconds})
                print(f"load {load} threads {threads}: {seconds * 1000:8.1f} ms/step", flush=True)
        finally:
            stop.set()
            for p in spinners:
                p.join()
    RESULTS.mkdir(exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"cpu-{result['date']}-threads.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
