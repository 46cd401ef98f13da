"""Summarise bench/ddp_scaling.sh: throughput per GPU, scaling ratio, and DDP vs 1-GPU evaluation metrics."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch


def main(runs: str, steps: str) -> None:
    runs = Path(runs)
    ddp = json.loads((runs / "ddp/finetune/p=0.1/seed=0/throughput.json").read_text())
    one = json.loads((runs / "one/finetune/p=0.1/seed=0/throughput.json").read_text())
    in_training = json.loads((runs / f"ddp/finetune/p=0.1/seed=0/eval/step={steps}_cond.json").read_text())["metrics"]
    reeval = json.loads((runs / "ddp/reeval/conditional.json").read_text())["metrics"]
    compared = {k: {"ddp": v, "one_gpu": reeval[k], "rel_diff": abs(v - reeval[k]) / max(abs(v), 1e-12)}
                for k, v in in_training.items() if k in reeval}  # fmt: skip
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "card": card, "gpus": ddp["world_size"], "date": str(datetime.date.today()), "finetune_steps": int(steps),
        "ddp": ddp, "one_gpu": one,
        "scaling_ratio": ddp["images_per_s"] / (ddp["world_size"] * one["images_per_s"]),
        "max_rel_diff_eval": max(c["rel_diff"] for c in compared.values()), "eval": compared,
    }  # fmt: skip
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out = out_dir / f"ddp-{card.replace(' ', '_')}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "eval"}, indent=1))
    print(f"max relative difference of {len(compared)} metrics: {result['max_rel_diff_eval']:.2e}; wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
