"""What a run folder recorded, and the check of a command against it before the run is resumed or skipped.

A run folder records the resolved config it was started with (`config.yaml`) and, for a fine-tune, the base its
weights started from (`base.json`: the base's path and the SHA-256 of its weights; a finished run's
`model/priorlab.json` holds the same, and for a base given by its hub name that name, the revision and the commit:
`models.hub`). Started again, a run that holds a checkpoint or `done.json` must be given
the training settings it recorded: every key of the resolved config is compared except those in RESUMABLE (a
deny-list, so a key added later is checked by default), and the base given now must hash to the recorded one.
`resume=force` continues anyway; what differed is appended to `resume_forced.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from priorlab import atomic
from priorlab.errors import UserError
from priorlab.models.hub import available
from priorlab.models.io import META, content_hash, resolve_model_dir

CONFIG = "config.yaml"
BASE_RECORD = "base.json"
FORCED = "resume_forced.json"
RESUME_MODES = ("check", "force")

# Keys (and everything below them) that may differ between the start of a run and its resumption, and why.
RESUMABLE = {
    "dry_run": "prints the config and exits", "resume": "this check's own switch",
    "study": "where the run folder is: the folder is the run", "paths": "where the run folder is",
    "stage.run_subdir": "where the run folder is", "callbacks.checkpoint.dirpath": "where the run folder is",
    "base": "compared by the SHA-256 of the base's weights instead, however its path is spelled",
    "logger": "where metrics go", "callbacks.progress": "display", "callbacks.throughput": "timing",
    "trainer.log_every_n_steps": "logging", "trainer.enable_progress_bar": "display",
    "trainer.enable_model_summary": "display",
    "prompt_cache": "where prompt embeddings are kept; they are keyed by the text encoder's content",
    "eval": "what is measured, not what is trained", "extra_priors": "evaluation",
    "callbacks.prior_quality": "evaluation", "callbacks.conditional_quality": "evaluation",
    "data.name": "names the evaluator cache",
    "trainer.val_check_interval": "when validation and checkpoints happen (batches are drawn by step)",
    "trainer.check_val_every_n_epoch": "when validation happens", "trainer.limit_val_batches": "validation",
    "trainer.num_sanity_val_steps": "validation",
    "trainer.accelerator": "the machine", "trainer.devices": "the machine", "trainer.num_nodes": "the machine",
    "trainer.strategy": "the machine", "compile": "the machine", "channels_last": "the machine",
    "optimizer.fused": "the machine", "cpu_threads": "the machine", "matmul_precision": "the machine",
}  # fmt: skip
# Keys added after runs were recorded, with the value that reproduces what those runs did: a run that did not record
# one was trained with it, so absent there and given at that value is no difference.
ADDED = {"guidance_distill.max_scale": None, "guidance_distill.plain_fraction": 0.5,
         "guidance_distill.teacher_decay": 0.99}  # fmt: skip
ABSENT = "(absent)"
BASE_KEY = "base weights (sha256)"
TEXT_KEY = "base text encoder (sha256)"
VAE_KEY = "base VAE weights (sha256)"  # a latent base's VAE (`models.latent`): its latents are the training data


def resumable(key: str) -> bool:
    """Whether a dotted config key may change across a resume (it is, or lies below, a key of RESUMABLE)."""
    return any(key == k or key.startswith(k + ".") for k in RESUMABLE)


def _flatten(node, prefix: str = "") -> dict:
    """A plain container as {dotted key: leaf value}; lists are leaves."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def config_differences(recorded: dict, given: dict) -> dict[str, tuple]:
    """The training-relevant keys whose values differ: {key: (recorded, given)}, ABSENT where a side lacks it (a key
    of ADDED that the recorded config lacks counts as recorded at its value)."""
    a, b = _flatten(recorded), _flatten(given)
    a.update({key: value for key, value in ADDED.items() if key not in a and b.get(key, ABSENT) == value})
    return {
        key: (a.get(key, ABSENT), b.get(key, ABSENT))
        for key in sorted(set(a) | set(b))
        if not resumable(key) and (key not in a or key not in b or a[key] != b[key])
    }


def recorded_base(run_dir: Path, finished: bool) -> dict | None:
    """The base a fine-tune's weights started from ({"path", "sha256"}), as the run folder records it."""
    paths = [run_dir / "model" / META, run_dir / BASE_RECORD] if finished else [run_dir / BASE_RECORD]
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        record = record.get("base", record) if path.name == META else record
        if isinstance(record, dict) and isinstance(record.get("sha256"), str):
            return record
    return None


def vae_difference(record: dict, base_dir: Path) -> dict[str, tuple]:
    """{VAE_KEY: (recorded, given)} where the base's VAE is not the one the run recorded, else {}."""
    from priorlab.models.latent import vae_record

    recorded = (record.get("vae") or {}).get("sha256") if isinstance(record.get("vae"), dict) else None
    if recorded is None:
        return {}
    now = vae_record(base_dir) or {"path": str(base_dir.parent / "vae"), "sha256": ABSENT}
    return {} if now["sha256"] == recorded else {VAE_KEY: (recorded, now)}


def _show(key: str, recorded, given) -> str:
    if key in (BASE_KEY, VAE_KEY):
        return f"{key}: {recorded[:12]} (recorded) vs {given['sha256'][:12]} (given, {given['path']})"
    shown = [value if value == ABSENT else repr(value) for value in (recorded, given)]
    return f"{key}: {shown[0]} (recorded) vs {shown[1]} (given)"


def _text_encoder_difference(record: dict, base_dir: Path) -> dict[str, tuple]:
    """A text base's encoder (`models.text`), compared by its recorded content hash: it made the prompt table."""
    text = record.get("text_encoder")
    if not isinstance(text, dict) or not isinstance(text.get("sha256"), str):
        return {}
    from priorlab.models.text import encoder_hash

    sha = encoder_hash(base_dir.parent)
    return {} if sha == text["sha256"] else {TEXT_KEY: (text["sha256"][:12], sha[:12])}


def check_resume(cfg: DictConfig, run_dir: Path, finished: bool) -> dict[str, tuple]:
    """Compare the command with what a resumed (or finished) run recorded, before anything is written.

    Returns the differences that `resume=force` lets through ({} when there are none); raises a UserError naming
    every differing key with its recorded and given values otherwise.
    """
    diffs = {}
    config = run_dir / CONFIG
    if config.exists():
        try:
            recorded = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
            raise UserError(f"{config} cannot be read ({type(err).__name__}), so this run cannot be checked; "
                            "restore it, or start the run in a new folder") from err  # fmt: skip
        diffs = config_differences(recorded, OmegaConf.to_container(cfg, resolve=True))
    if cfg.stage.name == "base":
        diffs.pop("cond_dropout", None)  # a base replaces every label by the null class whatever it says
    record = recorded_base(run_dir, finished) if cfg.stage.name == "finetune" and cfg.base else None
    if record is not None and (not finished or available(cfg.base)):
        base_dir = resolve_model_dir(cfg.base, role="base")  # a finished run whose base is gone loads nothing
        sha = content_hash(base_dir)
        if sha != record["sha256"]:
            diffs[BASE_KEY] = (record["sha256"], {"path": str(base_dir), "sha256": sha})
        diffs.update(_text_encoder_difference(record, base_dir))
        diffs.update(vae_difference(record, base_dir))
    if not diffs or cfg.get("resume", "check") == "force":
        return diffs
    shown = "; ".join(_show(key, *values) for key, values in list(diffs.items())[:8])
    more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
    if finished:
        raise UserError(f"{run_dir} is finished and was trained with other settings: {shown}{more}. Give the "
                        "command it was trained with, train these settings in a new folder (another study= or "
                        "paths.runs=), or pass resume=force to keep the finished run as it is")  # fmt: skip
    raise UserError(f"{run_dir} holds a run started with other settings: {shown}{more}. Give the command it was "
                    "started with, train these settings in a new folder (another study= or paths.runs=), or pass "
                    "resume=force to continue this run with them")  # fmt: skip


def record_forced(run_dir: Path, diffs: dict[str, tuple], step: int | None) -> None:
    """Append a forced resumption (its step and what differed) to the run folder's resume_forced.json."""
    path = run_dir / FORCED
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        held = []
    entry = {"step": step, "settings": {k: {"recorded": r, "given": g} for k, (r, g) in diffs.items()}}
    atomic.write_json(path, [*held, entry])
