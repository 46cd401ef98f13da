"""Logger construction: W&B runs offline unless the user is logged in (WANDB_MODE wins when set), each run tagged
with its condition; a CSV logger whose metrics.csv survives a resume (`priorlab.training.csv_logs.CSVLogger`,
named here as the configs name it).

Lightning is imported only where a logger is built: a study's own process reads `wandb_mode` and `sync_hint` here
without it (8.8 s of imports on 2 cores).
"""

from __future__ import annotations

import contextlib
import importlib.util
import netrc
import os
from pathlib import Path

from priorlab.errors import UserError


def wandb_logged_in() -> bool:
    """True when an API key is in WANDB_API_KEY or in the netrc file for the W&B host, found as wandb finds it:
    $NETRC, else ~/.netrc, else ~/_netrc (`wandb.sdk.lib.wbauth.wbnetrc`; no network used)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    home = Path("~").expanduser()
    files = [os.environ["NETRC"]] if os.environ.get("NETRC") else [home / ".netrc", home / "_netrc"]
    path = next((Path(f) for f in files if Path(f).exists()), None)
    try:
        entry = netrc.netrc(path).authenticators(host) if path is not None else None
    except (OSError, netrc.NetrcParseError):
        return False
    return entry is not None and bool(entry[2])


def wandb_mode() -> str:
    """ "online", "offline" or "disabled": WANDB_MODE if set, else online only for a logged-in user."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def condition_tags(stage: str, run: str, seed: int, cond_dropout: float, train_per_class) -> list[str]:
    """A run's condition as W&B tags (filters in the W&B UI): stage=, base_name= (the study's base the run is or
    started from, where it names one), every key=value level of its run folder (finetune/base=a/max_steps=50/p=0.1
    → base_name=a, max_steps=50, cond_dropout=0.1), then seed=, train_per_class= and a fine-tune's cond_dropout=
    where the folder does not name them. Names as in results.csv's columns."""
    parts = Path(run).parts
    tags = {"stage": stage}
    if len(parts) > 1 and parts[0] == "base" and "=" not in parts[1]:
        tags["base_name"] = parts[1]
    names = {"p": "cond_dropout", "base": "base_name"}
    for level in (part.split("=", 1) for part in parts if "=" in part):
        tags[names.get(level[0], level[0])] = level[1]
    tags.setdefault("seed", seed)
    tags.setdefault("train_per_class", train_per_class)
    if stage != "base":
        tags.setdefault("cond_dropout", cond_dropout)
    return [f"{k}={v}"[:64] for k, v in tags.items()]  # W&B refuses tags of more than 64 characters


def wandb_logger(save_dir: str, project: str, group: str, name: str, condition: dict | None = None,
                 **kwargs):  # fmt: skip
    """A WandbLogger writing under `save_dir`/wandb in the mode chosen by `wandb_mode()`, in W&B group `group` (the
    study), its job type the stage and its tags the run's condition (`condition_tags` of `condition`)."""
    from lightning.pytorch.loggers import WandbLogger

    if importlib.util.find_spec("wandb") is None:
        raise UserError("W&B logging needs the wandb package: pip install wandb, or log to CSV only with logger=csv")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    mode = wandb_mode()
    if condition:
        kwargs.setdefault("tags", condition_tags(**condition))
        kwargs.setdefault("job_type", condition["stage"])
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        group=group,
        name=name,
        offline=mode == "offline",
        mode=mode,
        **kwargs,
    )


def finish_wandb() -> str | None:
    """Close the W&B run, so that the next run of a multirun in this process starts its own; returns the folder of
    the W&B runs where it ran offline (the one `wandb sync` uploads), else None."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return None
    offline = wandb.run.settings._offline
    folder = Path(wandb.run.settings.wandb_dir)
    wandb.finish()
    return str(folder) if offline else None


@contextlib.contextmanager
def shared_wandb_service(used: bool):
    """One W&B service process for every run started inside the block (`wandb.setup()` puts its address in
    os.environ, which the runs inherit), instead of one started and stopped by each run (the tiny study's 5
    runs: 34.1 s against 39.0 s on 2 cores, 26.4 s with CSV only). Does nothing where the runs do not use W&B,
    W&B is disabled, or wandb is not installed."""
    if not used or wandb_mode() == "disabled" or importlib.util.find_spec("wandb") is None:
        yield
        return
    import wandb

    before = os.environ.get("WANDB_SERVICE")
    wandb.setup()
    try:
        yield
    finally:
        wandb.teardown()
        if before is None:  # the address of the service that has just ended, left for no one
            os.environ.pop("WANDB_SERVICE", None)


def sync_hint(folder: str | Path, what: str = "this run") -> str:
    """The one line that says how to upload offline W&B runs (`folder` relative to the working folder if in it)."""
    import shlex

    folder = Path(folder).resolve()
    with contextlib.suppress(ValueError):
        folder = folder.relative_to(Path.cwd())
    return f"W&B ran offline (no API key): to upload {what}, run  wandb login && wandb sync {shlex.quote(str(folder))}"


def __getattr__(name: str):
    if name == "CSVLogger":  # the configs' _target_ (configs/logger/), imported on first use
        from priorlab.training.csv_logs import CSVLogger

        return CSVLogger
    raise AttributeError(f"module 'priorlab.loggers' has no attribute {name!r}")
