"""The `priorlab` command: `priorlab COMMAND [hydra overrides]`.

Each command is a Hydra app over configs/<command>.yaml, so overrides, `-m` multiruns and launchers work
as in any Hydra program. User mistakes end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from priorlab.checks import check_paths
from priorlab.diagnose import composition_error, task_error
from priorlab.errors import UserError
from priorlab.overrides import CONFIG_DIR, PATH_KEYS, PATH_VALUES, REQUIRED, rewrite_overrides
from priorlab.study.settings import route_study_args

# Each command is the `main(cfg)` of one module of priorlab.commands, imported when the command runs: importing
# them all would put torch and Lightning (5-10 s) before every `--help` and every one-line error.
COMMANDS = {
    "train": "train",
    "train-evaluator": "train_evaluator",
    "evaluate": "evaluate",
    "study": "study",
    "report": "report",
    "dashboard": "dashboard",
    "sample": "sample",
    "export": "export",
    "data": "data",
}
USAGE = "usage: priorlab {" + ",".join(COMMANDS) + "} [key=value ...]   (Hydra overrides; --help for each)"


def _run(command: str, cfg: DictConfig) -> None:
    _started.append(command)
    _restore_hydra_env()
    try:
        check_paths(cfg, PATH_VALUES, REQUIRED)
        importlib.import_module(f"priorlab.commands.{COMMANDS[command]}").main(cfg)
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
    args = rewrite_overrides(command, args)
    sys.argv = [sys.argv[0], *(route_study_args(args) if command == "study" else args)]
    app = hydra.main(config_path=str(CONFIG_DIR), config_name=command, version_base="1.3")(
        lambda cfg: _run(command, cfg)
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
