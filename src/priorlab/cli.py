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

from priorlab.errors import UserError

CONFIG_DIR = Path(os.environ.get("PRIORLAB_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))
COMMANDS = {
    "train": "priorlab.train:train",
    "train-evaluator": "priorlab.evaluate:train_evaluator",
    "evaluate": "priorlab.evaluate:evaluate",
    "study": "priorlab.studies:run_study",
    "report": "priorlab.analysis.report:report_command",
    "dashboard": "priorlab.dashboard:dashboard",
    "sample": "priorlab.pipelines.sample:sample_command",
}
# A first argument without '=' is the value of this key: `priorlab study NAME`, `priorlab report runs/NAME`.
POSITIONAL = {"study": "name", "report": "study_dir", "dashboard": "name"}
# `model` is also a config group (the architecture presets of `train`); where a command takes a model folder,
# `model=PATH` is renamed to that command's key for it.
PATH_KEYS = {"evaluate": {"model": "model_dir"}, "sample": {"model": "model_dir"}}
USAGE = "usage: priorlab {" + ",".join(COMMANDS) + "} [key=value ...]   (Hydra overrides; --help for each)"


def _run(target: str, cfg: DictConfig) -> None:
    module, func = target.split(":")
    try:
        getattr(__import__(module, fromlist=[func]), func)(cfg)
    except UserError as err:
        print(f"priorlab: error: {err}", file=sys.stderr)
        sys.exit(2)
    except InstantiationException as err:  # a UserError raised by a class that a config instantiates
        cause = err.__cause__
        while isinstance(cause, InstantiationException):  # nested instantiation
            cause = cause.__cause__
        if not isinstance(cause, UserError):
            raise
        print(f"priorlab: error: {cause}", file=sys.stderr)
        sys.exit(2)


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
    """Rename path keys (PATH_KEYS) and quote values that contain '=' (run folders such as p=0.1/seed=0)."""
    out = []
    if args and command in POSITIONAL and "=" not in args[0] and not args[0].startswith("-"):
        args = [override(POSITIONAL[command], args[0]), *args[1:]]
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in PATH_KEYS.get(command, {}):
            key = PATH_KEYS[command][key]
            arg = f"{key}={value}"
        if sep and "=" in value and re.fullmatch(r"[+~]{0,2}[\w.@/-]+", key):
            arg = f"{key}={_quote(value)}"
        out.append(arg)
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
        lambda cfg: _run(COMMANDS[command], cfg)
    )
    app()
