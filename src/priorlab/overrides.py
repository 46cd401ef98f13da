"""The text of a command line: where the configs live, how a value is written as a Hydra override, and how a
command's arguments are rewritten before Hydra reads them. Shared by the CLI and by studies, which compose the
commands of their runs (no module here imports either)."""

from __future__ import annotations

import re

from priorlab.resources import shipped_dir

CONFIG_DIR = shipped_dir("configs")

# A first argument without '=' is the value of this key: `priorlab study NAME`, `priorlab report runs/NAME`.
POSITIONAL = {"study": "name", "report": "study_dir", "dashboard": "name", "data": "dataset"}

# `model` is also a config group (the architecture presets of `train`); where a command takes a model folder,
# `model=PATH` is renamed to that command's key for it.
PATH_KEYS = {"evaluate": {"model": "model_dir"}, "sample": {"model": "model_dir"}, "export": {"model": "model_dir"}}

# Settings that hold paths or names of folders: a value that Hydra would read as a number or a boolean is quoted.
PATH_VALUES = {"base", "paths.runs", "paths.run_dir", "data.source", "data.name", "model_dir", "evaluator", "out",
               "study_dir", "image", "calibration", "prior_weights", "name", "study", "stage.run_subdir", "data.root",
               "tarballs", "experiments"}  # fmt: skip

REQUIRED = {"model_dir": "model=PATH", "study_dir": "priorlab report runs/NAME", "name": "priorlab study NAME"}

NUMBER = r"[+-]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(e[+-]?\d+)?|[+-]?inf|nan|true|false"

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
    return out


def _quote(value: str) -> str:
    """Quote a value containing '=' for Hydra: the whole value, or each element of a [list]."""
    if value[:1] in ("'", '"'):
        return value
    if value.startswith("[") and value.endswith("]"):
        items = [v.strip() for v in value[1:-1].split(",") if v.strip()]
        return "[" + ",".join(v if v[:1] in ("'", '"') or "=" not in v else override_value(v) for v in items) + "]"
    return override_value(value)
