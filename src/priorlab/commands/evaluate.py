"""`priorlab evaluate` and `priorlab train-evaluator`: the evaluation of saved models, outside training."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from priorlab import atomic, checks, keys
from priorlab.errors import UserError
from priorlab.evaluation.conditional_quality import conditional_quality
from priorlab.evaluation.fitted import fit_priors
from priorlab.evaluation.generation import extra_prior_paths
from priorlab.evaluation.images import save_grid
from priorlab.evaluation.prior_quality import prior_quality
from priorlab.evaluation.settings import EvalSettings
from priorlab.evaluation.setup import (
    ensure_evaluator,
    evaluator_dir,
    make_prior_net,
)
from priorlab.models.io import check_recorded_base, load_denoiser
from priorlab.models.latent import DecodingEvaluator, Latent, check_same_latents
from priorlab.models.text import TextDenoiser
from priorlab.priors import PriorWeights

# what a model folder's config.yaml may name as its data
DATA_TARGETS = ("priorlab.data.MNISTDataModule", "priorlab.data.DigitsDataModule", "priorlab.data.HFDataModule",
                "priorlab.data.Toy2DDataModule", "priorlab.data.EmojiDataModule")  # fmt: skip
HYDRA_KEYS = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")


def _data_config(cfg: DictConfig, model_dir: Path) -> DictConfig:
    """The data config given on the command line, or the one in the model's run folder.

    A model folder may come from anyone, and instantiating its config would import and call whatever it names:
    the recorded data config must name one of priorlab's datamodules and hold plain values below it."""
    if cfg.get("data"):
        return cfg.data
    run_config = model_dir.parent / "config.yaml"
    if not run_config.exists():
        raise UserError(f"no data config: {run_config} is missing; pass data=<name> (e.g. data=mnist)")
    try:
        data = OmegaConf.load(run_config).get("data")
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise UserError(f"{run_config} is not a readable run config ({type(err).__name__}); pass data=<name>") from err
    if not isinstance(data, DictConfig) or data.get("_target_") not in DATA_TARGETS:
        target = data.get("_target_") if isinstance(data, DictConfig) else None
        raise UserError(f"the data config in {run_config} names {target!r}, not one of priorlab's datamodules; "
                        "pass data=<name> to choose the data yourself")  # fmt: skip
    keys = _keys(OmegaConf.to_container(data, resolve=False))
    nested = [k for k in keys if k in HYDRA_KEYS and k != "_target_"]
    if nested or keys.count("_target_") > 1:
        raise UserError(f"the data config in {run_config} holds instantiation keys below its datamodule "
                        f"({', '.join(sorted(set(nested)) or ['_target_'])}); pass data=<name>")  # fmt: skip
    return data


def eval_settings(eval_cfg: DictConfig) -> EvalSettings:
    """EvalSettings from the eval.* config; a UserError for a setting it does not have."""
    values = OmegaConf.to_container(eval_cfg, resolve=True)
    unknown = sorted(set(values) - set(EvalSettings.__dataclass_fields__))
    if unknown:
        raise UserError(f"eval.{unknown[0]} is not an evaluation setting; the settings are "
                        f"{', '.join(EvalSettings.__dataclass_fields__)}")  # fmt: skip
    return EvalSettings(**values)


def prior_channels(value) -> slice | None:
    """prior_channels=[start,stop] as a slice of the model's input channels (None: all)."""
    if value is None:
        return None
    if not checks.is_list(value) or len(value) != 2 or not all(checks.is_whole(v) for v in value) or \
            not 0 <= value[0] < value[1]:  # fmt: skip
        raise UserError(f"prior_channels={value!r} must be [start, stop] with 0 ≤ start < stop (or null: all)")
    return slice(*value)


def _keys(node) -> list[str]:
    """Every mapping key at any depth of a plain container."""
    if isinstance(node, dict):
        return [*node, *(k for v in node.values() for k in _keys(v))]
    if isinstance(node, list):
        return [k for v in node for k in _keys(v)]
    return []


def evaluate(cfg: DictConfig) -> Path:
    """Evaluate a saved model with each prior of eval.priors; write eval/step=N_cond.json, eval/step=N_prior.json
    and sample grids, the records the evaluation callbacks write during training (N: the model's training step),
    so that `priorlab report` of a study picks them up. A record already there for that step (the training's own
    evaluation, or an earlier `evaluate`) is moved to eval/replaced/, not lost.

    prior=auto|mix use the weights files of `prior_weights` where given, and are otherwise fitted on the
    calibration split of the validation data; the weights used are written to prior_weights_<p>.json.

    A text fine-tune (`models.text`) is sampled on its held-out (validation) captions, in their proportions: FD,
    KID, precision and recall in the evaluator's features, and as accuracy the evaluator's caption match (its
    classifier over the data's distinct captions names the caption sampled).
    """
    device = checks.device(cfg.device)
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"out={cfg.out} is a file, not a folder: name a folder for the evaluation's records")
    given = _given_weights(cfg.get("prior_weights"))
    settings = eval_settings(cfg.eval)
    channels = prior_channels(cfg.prior_channels)
    model = load_denoiser(cfg.model_dir, role="model")
    base = load_denoiser(cfg.base, role="base") if cfg.base else None
    note = check_recorded_base(model, base) if base is not None and cfg.get("base_check", True) else None
    if note:
        print(note)
    datamodule, evaluator, latent = _data_and_evaluator(cfg, model, settings.evaluator_steps)
    prior_net = make_prior_net(model, base, channels)
    extra_saved = _extra_priors(cfg, model, base)
    extra = {name: make_prior_net(model, saved, channels) for name, saved in extra_saved.items()}
    for part in (model.denoiser, evaluator.net, base.denoiser if base else None, latent.vae if latent else None,
                 *(saved.denoiser for saved in extra_saved.values())):  # fmt: skip
        if part is not None:
            part.to(device).eval()
    started = time.perf_counter()
    weights, cond, grids, prior_metrics = _measure(model, prior_net, extra, datamodule, evaluator, settings, given,
                                                   _status(cfg.get("progress", True)))  # fmt: skip
    seconds = time.perf_counter() - started
    out = Path(cfg.out) if cfg.out else model.path.parent / "eval"
    info = {"model": str(model.path), "base": str(base.path) if base else None,
            "extra_priors": {name: str(saved.path) for name, saved in extra_saved.items()}, "settings": vars(settings),
            "evaluator_accuracy": evaluator.accuracy, "made_by": "priorlab evaluate"}  # fmt: skip
    step = int(model.meta.get("step", 0))
    written = _write(out, step, {"cond": cond, "prior": prior_metrics}, round(seconds, 3), info, weights)
    for prior, x in grids.items():
        x = latent.decode(x) if latent is not None else x
        save_grid(x, len(x) // settings.grid_per_class, out / f"grid_step={step}_prior={prior}.png")
    _print_table(cond)
    print(f"wrote {written[0]} and {written[1]}")
    return out


def _extra_priors(cfg: DictConfig, model, base) -> dict:
    """The saved models of extra_priors, each (and the base) checked to work in the model's latent space."""
    extra_saved = {name: load_denoiser(path, role=f"prior {name}")
                   for name, path in extra_prior_paths(cfg.get("extra_priors")).items()}  # fmt: skip
    vae_sha = (model.meta.get("vae") or {}).get("sha256")
    for role, saved in [("base", base), *((f"extra_priors.{n}", s) for n, s in extra_saved.items())]:
        if saved is not None:
            check_same_latents(vae_sha, saved, role)
    return extra_saved


@torch.no_grad()
def _measure(model, prior_net, extra: dict, datamodule, evaluator, settings: EvalSettings, given: list[PriorWeights],
             say) -> tuple[dict, dict, dict, dict]:  # fmt: skip
    """The fitted priors' weights (the `given` ones, the others fitted), the conditional quality and its grids, and
    the prior quality, saying what it is doing (`say`)."""
    mixture = getattr(datamodule, "mixture", None)  # the exact reference of toy2d, None elsewhere
    say("fitting the auto/mix priors' weights on the calibration split" if {"auto", "mix"} & set(settings.priors)
        else "starting")  # fmt: skip
    weights = fit_priors(model.denoiser, model.scheduler, prior_net, datamodule.val_set.tensors, settings,
                         {w.mode: w for w in given}, evaluator=evaluator, mixture=mixture,
                         shape=tuple(datamodule.sample_shape))  # fmt: skip
    say(f"conditional quality: {settings.num_samples} samples × prior {', '.join([*settings.priors, *extra])} "
        f"× w {', '.join(map(str, settings.guidance_scales))}, {settings.num_steps} steps each")  # fmt: skip
    heldout = datamodule.val_set.tensors[1] if isinstance(model.denoiser, TextDenoiser) else None  # captions
    cond, grids = conditional_quality(model.denoiser, model.scheduler, prior_net, evaluator, datamodule.sample_shape,
                                      settings, mixture, weights, extra, heldout)  # fmt: skip
    say("prior quality on the held-out data")
    prior_metrics = prior_quality(model.denoiser, model.scheduler, prior_net, datamodule.val_set.tensors, evaluator,
                                  settings, mixture, weights, extra)  # fmt: skip
    return weights, cond, grids, prior_metrics


def _given_weights(paths) -> list[PriorWeights]:
    """prior_weights=PATH or [PATH, ...]: the fitted priors' weights files, read."""
    paths = paths or []
    paths = [paths] if isinstance(paths, str) else paths
    if not checks.is_list(paths) or not all(isinstance(path, str) for path in paths):
        raise UserError(f"prior_weights={paths!r} must be a weights file or a list of them")
    return [PriorWeights.load(path) for path in paths]


def _data_and_evaluator(cfg: DictConfig, model, steps: int) -> tuple:
    """The data to evaluate on, set up, the evaluator of its images, and a latent model's VAE codec (else None).
    A latent model's data is replaced by its latents (`models.latent`, cached under paths.runs/latents) and its
    evaluator decodes the samples before measuring them. Samples of another shape than the model's are a UserError."""
    datamodule = instantiate(_data_config(cfg, model.path))
    datamodule.setup()
    vae = model.meta.get("vae")
    if vae is None:
        _check_shape(datamodule, model)
    evaluator = ensure_evaluator(cfg.evaluator or evaluator_dir(cfg.paths.runs, datamodule), datamodule,
                                 steps=steps, progress=True)  # fmt: skip
    latent = None
    if vae is not None:
        latent = Latent.load(vae, role=f"model={model.path}")
        latent.encode_data(datamodule, Path(cfg.paths.runs) / "latents")
        _check_shape(datamodule, model)
        evaluator = DecodingEvaluator(evaluator, latent)
    return datamodule, evaluator, latent


def _check_shape(datamodule, model) -> None:
    if tuple(datamodule.sample_shape) != model.denoiser.sample_shape:
        raise UserError(f"the data gives samples of shape {datamodule.sample_shape} but the model takes "
                        f"{model.denoiser.sample_shape}; pass the data the model was trained on")  # fmt: skip
    captions = getattr(model.denoiser, "captions", None)
    if captions is not None and getattr(datamodule, "captions", None) != captions:
        raise UserError(f"model={model.path} is text-conditioned on {len(captions)} captions, and the data's captions "
                        "differ; pass the image–caption data it was trained on (data.caption_column=...)")  # fmt: skip


def _write(out: Path, step: int, records: dict[str, dict], seconds: float, info: dict,
           weights: dict[str, PriorWeights]) -> list[Path]:  # fmt: skip
    """The fitted priors' weights (prior_weights_<p>.json) and eval/step=<step>_<kind>.json for each kind of
    `records`, a record already there moved aside; returns the records' paths."""
    out.mkdir(parents=True, exist_ok=True)
    for prior, w in weights.items():
        w.save(out / f"prior_weights_{prior}.json")
    written = []
    for kind, values in records.items():
        path = out / f"step={step}_{kind}.json"
        _keep_replaced(path)
        atomic.write_json(path, {"step": step, "metrics": values, "seconds": seconds, **info})
        written.append(path)
    return written


def _keep_replaced(path: Path) -> None:
    """Move an existing evaluation record out of the way (to replaced/ beside it), saying so."""
    if path.exists():
        kept = path.parent / "replaced" / path.name
        kept.parent.mkdir(exist_ok=True)
        path.replace(kept)
        print(f"an evaluation was already recorded at {path}; it is kept as {kept}")


def _status(show: bool):
    """A function printing `[evaluate 1m05s] text` (the time since this call), or nothing when `show` is false:
    sampling and scoring take minutes with nothing else on screen."""
    from priorlab.study.progress import duration

    start = time.time()
    return lambda text: print(f"[evaluate {duration(time.time() - start)}] {text}", flush=True) if show else None


def _print_table(cond: dict[str, float]) -> None:
    parsed = [keys.parse(k) for k in cond]
    rows = sorted({(k.prior, k.scale) for k in parsed if k.group == "cond" and k.metric == "fd"})
    print(f"{'setting':<22}{'FD':>10}{'KID':>10}{'prec':>8}{'recall':>8}{'acc':>8}")
    for prior, scale in rows:
        v = [cond.get(keys.key("cond", m, prior=prior, scale=scale), float("nan"))
             for m in ("fd", "kid", "precision", "recall", "accuracy")]  # fmt: skip
        name = f"prior={prior}/{keys.scale_name(scale)}"
        print(f"{name:<22}{v[0]:>10.3f}{v[1]:>10.4f}{v[2]:>8.3f}{v[3]:>8.3f}{v[4]:>8.3f}")


main = evaluate  # the command's entry point (`priorlab.cli`)
