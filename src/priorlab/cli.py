"""The `priorlab` command: `priorlab COMMAND [hydra overrides]`.

Each command is a Hydra app over configs/<command>.yaml, so overrides, `-m` multiruns and launchers work
as in any Hydra program. User mistakes end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from priorlab.checks import check_paths
from priorlab.diagnose import composition_error, task_error
from priorlab.errors import UserError

CONFIG_DIR = Path(os.environ.get("PRIORLAB_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))
COMMANDS = {
    "train": "priorlab.commands.train:train",
    "train-evaluator": "priorlab.commands.evaluate:train_evaluator",
    "evaluate": "priorlab.commands.evaluate:evaluate",
    "study": "priorlab.studies:run_study",
    "report": "priorlab.analysis.report:report_command",
    "dashboard": "priorlab.dashboard:dashboard",
    "sample": "priorlab.pipelines.sample:sample_command",
    "export": "priorlab.pipelines.export:export_command",
    "data": "priorlab.commands.data:prepare_data",
}
# A first argument without '=' is the value of this key: `priorlab study NAME`, `priorlab report runs/NAME`.
POSITIONAL = {"study": "name", "report": "study_dir", "dashboard": "name", "data": "dataset"}
# `model` is also a config group (the architecture presets of `train`); where a command takes a model folder,
# `model=PATH` is renamed to that command's key for it.
PATH_KEYS = {"evaluate": {"model": "model_dir"}, "sample": {"model": "model_dir"}, "export": {"model": "model_dir"}}
# Settings that hold paths or names of folders: a value that Hydra would read as a number or a boolean is quoted.
PATH_VALUES = {"base", "paths.runs", "paths.run_dir", "data.source", "data.name", "model_dir", "evaluator", "out",
               "study_dir", "image", "calibration", "prior_weights", "name", "study", "stage.run_subdir", "data.root",
               "tarballs"}  # fmt: skip
REQUIRED = {"model_dir": "model=PATH", "study_dir": "priorlab report runs/NAME", "name": "priorlab study NAME"}
NUMBER = r"[+-]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(e[+-]?\d+)?|[+-]?inf|nan|true|false"
USAGE = "usage: priorlab {" + ",".join(COMMANDS) + "} [key=value ...]   (Hydra overrides; --help for each)"


def _run(target: str, cfg: DictConfig, command: str) -> None:
    _started.append(command)
    _restore_hydra_env()
    module, func = target.split(":")
    try:
        check_paths(cfg, PATH_VALUES, REQUIRED)
        getattr(__import__(module, fromlist=[func]), func)(cfg)
    except UserError as err:
        _fail(str(err))
    except Exception as err:  # noqa: BLE001 - a config value a class refused, a full disk, ...: one line
        message = task_error(err, {v: k for k, v in PATH_KEYS.get(command, {}).items()})
        if message is None:
            raise
        _fail(message)


def _fail(message: str) -> None:
    print(f"priorlab: error: {message}", file=sys.stderr)
    sys.exit(2)


# Hydra prints its own composition errors (an unknown key, a missing option) and exits with 1; with
# HYDRA_FULL_ERROR=1 it raises them to `main` instead. The user's own value is put back once the config is composed.
_HYDRA_FULL_ERROR = "HYDRA_FULL_ERROR"
_user_hydra_env: list[str | None] = []
_started: list[str] = []  # the command's function has been called (its config was composed)


def _restore_hydra_env() -> None:
    if _user_hydra_env:
        value = _user_hydra_env.pop()
        if value is None:
            os.environ.pop(_HYDRA_FULL_ERROR, None)
        else:
            os.environ[_HYDRA_FULL_ERROR] = value


# Characters that Hydra's override grammar reads, unquoted, as themselves; a value with any other (a space, '=', a
# quote, a bracket, '$', a backslash, a non-ASCII letter) is quoted.
PLAIN_VALUE = re.compile(r"[A-Za-z0-9_\-+./@:%*?|]+")


def override_value(value) -> str:
    """`value` as the text of a Hydra override that a command reads back as that value.

    Strings are left unquoted where Hydra reads them as they are (so `5`, `1e-3`, `all` keep the type they have on
    a command line) and quoted otherwise, with Hydra's own escapes (paths with spaces, '=' or non-ASCII letters);
    None, booleans, numbers, lists and mappings are written in the override grammar.
    """
    from hydra.core.override_parser.types import Quote, QuotedString

    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    return text if PLAIN_VALUE.fullmatch(text) else QuotedString(text=text, quote=Quote.single).with_quotes()


def override(key: str, value) -> str:
    """`key=value` for a child command's overrides, the value written by `override_value`."""
    return f"{key}={override_value(value)}"


def rewrite_overrides(command: str, args: list[str]) -> list[str]:
    """Rename path keys (PATH_KEYS), let extra_priors.NAME=PATH add a key, and quote values that contain '=' (run
    folders such as p=0.1/seed=0)."""
    out = []
    if args and command in POSITIONAL and "=" not in args[0] and not args[0].startswith("-"):
        args = [override(POSITIONAL[command], args[0]), *args[1:]]
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in PATH_KEYS.get(command, {}):
            key = PATH_KEYS[command][key]
            arg = f"{key}={value}"
        if sep and key.startswith("extra_priors.") and command in ("train", "evaluate"):
            key = f"++{key}"  # a new key of the (empty) extra_priors mapping, or a replaced one
            arg = f"{key}={value}"
        if sep and "=" in value and re.fullmatch(r"[+~]{0,2}[\w.@/-]+", key):
            arg = f"{key}={_quote(value)}"
        elif (sep and (key.lstrip("+~") in PATH_VALUES or key.lstrip("+~").startswith("extra_priors."))
              and re.fullmatch(NUMBER, value, re.IGNORECASE)):  # fmt: skip
            arg = f"{key}='{value}'"  # a folder named 2024 stays the string "2024"
        out.append(arg)
    if command == "study":
        from priorlab.study_settings import route_study_args

        return route_study_args(out)
    return out


def _quote(value: str) -> str:
    """Quote a value containing '=' for Hydra: the whole value, or each element of a [list]."""
    if value[:1] in ("'", '"'):
        return value
    if value.startswith("[") and value.endswith("]"):
        items = [v.strip() for v in value[1:-1].split(",") if v.strip()]
        return "[" + ",".join(v if v[:1] in ("'", '"') or "=" not in v else override_value(v) for v in items) + "]"
    return override_value(value)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in COMMANDS:
        command, args = args[0], args[1:]
    elif "PRIORLAB_COMMAND" in os.environ and os.environ.get("LOCAL_RANK"):
        command = os.environ["PRIORLAB_COMMAND"]  # a DDP worker that Lightning started with our overrides
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(0 if args[:1] in (["-h"], ["--help"]) else 2)
    if not (CONFIG_DIR / f"{command}.yaml").exists():
        print(f"priorlab: error: configs not found at {CONFIG_DIR}; set PRIORLAB_CONFIGS", file=sys.stderr)
        sys.exit(2)
    os.environ["PRIORLAB_COMMAND"] = command
    sys.argv = [sys.argv[0], *rewrite_overrides(command, args)]
    app = hydra.main(config_path=str(CONFIG_DIR), config_name=command, version_base="1.3")(
        lambda cfg: _run(COMMANDS[command], cfg, command)
    )
    _user_hydra_env.append(os.environ.get(_HYDRA_FULL_ERROR))
    os.environ[_HYDRA_FULL_ERROR] = "1"
    try:
        app()
    except Exception as err:  # noqa: BLE001 - raised before the command started: composing its config
        if _started or isinstance(err, InstantiationException):
            raise
        _fail(composition_error(command, CONFIG_DIR, sys.argv[1:], err))
    finally:
        _restore_hydra_env()
