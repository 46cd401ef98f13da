"""Logger construction: W&B runs offline unless the user is logged in; WANDB_MODE wins when set."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_logged_in() -> bool:
    """True when an API key is in WANDB_API_KEY or in ~/.netrc for the W&B host (no network used)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """ "online", "offline" or "disabled": WANDB_MODE if set, else online only for a logged-in user."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def wandb_logger(save_dir: str, project: str, group: str, name: str, **kwargs) -> WandbLogger:
    """A WandbLogger writing under `save_dir`/wandb in the mode chosen by `wandb_mode()`."""
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    mode = wandb_mode()
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        group=group,
        name=name,
        offline=mode == "offline",
        mode=mode,
        **kwargs,
    )
