"""One line for each exception that comes from user input rather than from a bug: Hydra's composition errors (an
unknown key or config, an override it cannot parse), a value that a class built from the config refuses, a disk
that is full or not writable, a setting left without a value. `priorlab.cli` prints the line and exits with 2."""

from __future__ import annotations

import difflib
import errno
import re
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
)

from priorlab.errors import UserError

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EACCES, errno.EROFS, errno.EPERM)
OUT_OF_MEMORY = r"can't allocate memory|out of memory|CUDA out of memory"


def one_line(text: str) -> str:
    """Whitespace, newlines included, collapsed to single spaces."""
    return " ".join(str(text).split())


def composition_error(command: str, config_dir: Path, args: list[str], err: Exception) -> str:
    """The line for a Hydra composition error: the key or config that does not exist, with the closest ones."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(err)
    if isinstance(err, OverrideParseException):
        return (f"cannot read the override {err.override!r} ({one_line(err.message).split(' See https')[0]}); "
                "write key=value, quoting a value with spaces or brackets: key='a b'")  # fmt: skip
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = str(err.missing_cfg_file).rpartition("/")
        close = difflib.get_close_matches(option, err.options, n=1, cutoff=0.5)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return f"{group}={option} is not one of the {group} configs ({', '.join(err.options)}){hint}"
    missing = re.search(r"Could not (?:override|delete from config\.|delete) '([^']+)'", text)
    if missing and ("not exist" in text or "Could not override" in text or "No match" in text):
        key = missing.group(1)
        keys = config_keys(command, config_dir, args)
        if key in keys:  # Hydra takes a setting whose value is null for a missing one and cannot delete it
            return f"~{key}: {key} is null already, and Hydra cannot delete a null setting; leave it out"
        close = closest_keys(key, keys)
        hint = f"; did you mean {' or '.join(close)}?" if close else f"; `priorlab {command} --cfg job` lists them"
        return f"{key} is not a setting of `priorlab {command}`{hint}"
    present = re.search(r"An item is already at '([^']+)'", text)
    if present:
        key = present.group(1)
        return f"+{key}=... adds a setting, but {key} exists already; write {key}=... to change it"
    cause = f" ({one_line(err.__cause__)})" if err.__cause__ is not None else ""
    if "Config group override" in text:  # +model=3: a config group takes the name of one of its configs
        cause += "; a config group (model=, data=, trainer=, ...) takes the name of one of its configs"
    return one_line(text.split("\nConfig search path:")[0]) + cause


def config_keys(command: str, config_dir: Path, args: list[str]) -> list[str]:
    """Every dotted key of the command's config, composed with the config choices among `args` (model=mlp)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    choices = [a for a in args if re.fullmatch(r"[\w-]+=[\w.-]+", a) and (config_dir / a.split("=")[0]).is_dir()]
    for overrides in (choices, []):
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
                cfg = compose(config_name=command, overrides=overrides)
        except Exception:  # noqa: BLE001 - a choice that does not compose either: try the defaults
            continue
        return _dotted(OmegaConf.to_container(cfg, resolve=False))
    return []


def _dotted(node, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    keys = []
    for key, value in node.items():
        name = f"{prefix}{key}"
        keys += [name, *_dotted(value, name + ".")]
    return keys


def closest_keys(key: str, keys: list[str]) -> list[str]:
    """The keys that `key` most likely meant: those with the same last part (max_steps → trainer.max_steps), else
    the closest spellings."""
    leaf = key.rsplit(".", 1)[-1]

    def score(k: str) -> float:
        same_leaf = 0.25 if k.rsplit(".", 1)[-1] == leaf else 0.0
        return difflib.SequenceMatcher(None, key, k).ratio() + same_leaf

    keys = [k for k in keys if not k.rsplit(".", 1)[-1].startswith("_") and k != key]  # _target_: Hydra's own
    ranked = sorted(keys, key=score, reverse=True)
    return [k for k in ranked[:2] if score(k) >= 0.6 and score(k) >= score(ranked[0]) - 0.02]


def task_error(err: BaseException, aliases: dict[str, str] | None = None) -> str | None:
    """The line for an exception raised by a command that comes from user input, or None for a bug.

    Args:
        err: what the command raised.
        aliases: config keys that the command line names otherwise (model_dir is given as model=PATH).
    """
    from hydra.errors import InstantiationException

    if isinstance(err, InstantiationException):
        cause = err.__cause__
        while isinstance(cause, InstantiationException):  # nested instantiation
            cause = cause.__cause__
        if isinstance(cause, UserError):
            return str(cause)
        if isinstance(cause, OSError) and disk_error(cause):
            return disk_error(cause)
        if not isinstance(cause, Exception):
            return None
        target = re.search(r"target '([^']+)'", str(err))
        key = re.search(r"full_key: (\S+)", str(err))
        where = key.group(1) if key else "the config"
        what = target.group(1) if target else "a class"
        return (f"{where}: {what} refused these settings ({type(cause).__name__}: {one_line(cause)}); "
                f"change the {where}.* overrides")  # fmt: skip
    if isinstance(err, OSError):
        return disk_error(err)
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and re.search(OUT_OF_MEMORY, str(err))):
        return (f"out of memory ({one_line(err) or type(err).__name__}); lower a size setting such as "
                "data.batch_size, data.num_samples, model.* or eval.batch_size")  # fmt: skip
    if any(c.__name__ == "MisconfigurationException" for c in type(err).__mro__):  # Lightning's user errors
        return f"{one_line(err)} (Lightning); change the trainer.* overrides"
    if isinstance(err, MissingMandatoryValue):
        key = (aliases or {}).get(err.full_key, err.full_key)
        return f"{key} is required; pass {key}=..."
    if isinstance(err, InterpolationResolutionError):
        reason = one_line(str(err).splitlines()[0])
        if err.full_key:
            return f"{err.full_key}: {reason}"
        return f"{reason} (an override's ${{...}}); an interpolation must name an existing setting, e.g. ${{seed}}"
    if isinstance(err, ConfigKeyError | ConfigAttributeError) and err.full_key:
        return f"the config has no {err.full_key}, which this command needs; do not remove it (~{err.full_key})"
    return None


def disk_error(err: OSError) -> str | None:
    """The line for a write that failed because the disk is full or the folder is not writable, else None."""
    where = f" {err.filename}" if err.filename else ""
    reason = err.strerror or errno.errorcode.get(err.errno or 0, str(err))
    if err.errno in FULL:
        return f"cannot write{where}: {reason}; free some space, or write elsewhere (paths.runs=, out=)"
    if err.errno in NOT_WRITABLE:
        return f"cannot write{where}: {reason}; make it writable, or write elsewhere (paths.runs=, out=)"
    return None
