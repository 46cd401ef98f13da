"""Summarise bench/ddp_scaling.sh: throughput per GPU, scaling ratio, and DDP vs 1-GPU evaluation metrics."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf


def _read(path: Path) -> dict | None:
    """A JSON file of the runs, or None (with a note) where its stage did not write it."""
    if not path.exists():
        print(f"missing: {path}")
        return None
    return json.loads(path.read_text())


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def _strategy() -> str:
    """The trainer=ddp preset's strategy, as configured in this checkout."""
    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs/trainer/ddp.yaml").trainer.strategy
    return OmegaConf.to_yaml(cfg).strip().replace("\n", "; ")


def _compare(in_training: dict | None, reeval: dict | None) -> dict:
    if in_training is None or reeval is None:
        return {}
    a, b = in_training["metrics"], reeval["metrics"]
    return {k: {"ddp": v, "one_gpu": b[k], "rel_diff": abs(v - b[k]) / max(abs(v), 1e-12)}
            for k, v in a.items() if k in b}  # fmt: skip


def main(runs: str, steps: str) -> None:
    runs = Path(runs)
    run = runs / "ddp/finetune/p=0.1/seed=0"
    ddp, one = _read(run / "throughput.json"), _read(runs / "one/finetune/p=0.1/seed=0/throughput.json")
    cond = _compare(_read(run / f"eval/step={steps}_cond.json"), _read(runs / "ddp/reeval/conditional.json"))
    prior = _compare(_read(run / f"eval/step={steps}_prior.json"), _read(runs / "ddp/reeval/prior.json"))
    compared = {**cond, **prior}
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "card": card, "gpus": ddp["world_size"] if ddp else None, "date": str(datetime.date.today()),
        "finetune_steps": int(steps), "compile": os.environ.get("COMPILE", "true"), "commit": _commit(),
        "ddp_strategy": _strategy(), "ddp": ddp, "one_gpu": one,
        "scaling_ratio": ddp["images_per_s"] / (ddp["world_size"] * one["images_per_s"]) if ddp and one else None,
        "max_rel_diff_eval": max((c["rel_diff"] for c in compared.values()), default=None),
        "eval_metrics_compared": len(compared), "eval": compared,
    }  # fmt: skip
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out = out_dir / f"ddp-{card.replace(' ', '_')}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "eval"}, indent=1))
    print(f"max relative difference of {len(compared)} metrics: {result['max_rel_diff_eval']}; wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
