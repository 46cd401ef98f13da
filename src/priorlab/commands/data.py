"""`priorlab data emoji`: prepare a data set that installs from a package registry (`priorlab.data.emoji_prepare`)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from priorlab.checks import flag
from priorlab.errors import UserError


def prepare_data(cfg: DictConfig) -> None:
    from priorlab.data.emoji_prepare import prepare_emoji

    if cfg.dataset != "emoji":
        raise UserError(f"priorlab data {cfg.dataset}: the data sets it prepares are: emoji")
    styles = OmegaConf.to_container(cfg.styles) if OmegaConf.is_list(cfg.styles) else cfg.styles
    out = prepare_emoji(styles, cfg.out, cfg.size, cfg.tarballs, flag(cfg.force, "force"))
    print(f"wrote {out} (data card: {out / 'README.md'})")


main = prepare_data  # the command's entry point (`priorlab.cli`)
