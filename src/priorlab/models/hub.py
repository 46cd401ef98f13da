"""A base or prior given by its Hugging Face hub name, `org/name` or `org/name@revision`, as a folder of the cache.

Wherever a base or prior folder is taken (`io.resolve_model_dir`, hence `train stage=finetune base=`, `evaluate`,
a study's `bases:` and `extra_priors`, and `sample`'s `base=`), a string that names an existing local path is that
path, and a string of the form `org/name[@revision]` that names none is a hub model (`locate`). The revision is a
branch, tag or commit (default: main).

It is fetched with `huggingface_hub.snapshot_download` into the Hugging Face cache (HF_HUB_CACHE): first its configs
(HUB_CONFIGS), which `pretrained.check_layout` reads to refuse a model priorlab cannot use (Stable Diffusion XL, a
pipeline without a network) before any weights are fetched, then the weights a base needs (HUB_FILES: the
safetensors of the network and of each component, its text encoder and VAE; not other precisions (fp16
variants), pickled .bin weights, the safety checker, or the single-file checkpoints some repositories keep beside
their folders), at the commit the first step found. Offline (HF_HUB_OFFLINE=1), or where the hub cannot be
reached, the cache alone is used (`local_files_only`): a model downloaded on a machine with network
(`hf download org/name`) and its cache folder copied here serves as it would online. A name found neither way is
a UserError saying how to get it.

A loaded hub model records its source (`HubModel.record`: the name, the revision asked for, and the commit, which
is the name of its snapshot folder); a fine-tune keeps it beside the base's folder and weights hash
(`commands.train`), and the resume and base checks compare the weights hash as for any folder. Within one process
a name resolved online keeps its commit, so that a run's evaluations use the base it trained from even if the
branch moves meanwhile.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from priorlab.errors import UserError

HUB_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
TRUE = ("1", "ON", "YES", "TRUE")
HUB_CONFIGS = ["*.json", "*.txt", "*.model"]  # configs, model_index.json, tokenizer files (vocab, merges, spiece)
HUB_FILES = [*HUB_CONFIGS, "diffusion_pytorch_model.safetensors", "*/diffusion_pytorch_model.safetensors",
             "*/model.safetensors", "prompts.safetensors", "*/prompts.safetensors"]  # fmt: skip
HUB_SKIPPED = ["safety_checker/*"]  # weights no base or prior uses
_ONLINE: dict[tuple, HubModel] = {}  # (repo, revision, cache) → resolved online in this process (module doc)


@dataclass(frozen=True)
class HubModel:
    """A hub model resolved to its snapshot folder in the local cache."""

    repo_id: str
    revision: str | None  # as asked for (None: the default branch)
    commit: str  # the snapshot folder's name
    folder: Path

    def record(self) -> dict:
        """What a run records of the source, beside the folder and its weights hash."""
        return {"repo_id": self.repo_id, "revision": self.revision or "main", "commit": self.commit}


def source_name(record: dict) -> str:
    """How a model card names a recorded base: org/name@commit for a hub model (`HubModel.record` under "hub"),
    else its folder."""
    hub = record.get("hub")
    return f"{hub.get('repo_id')}@{hub.get('commit')}" if isinstance(hub, dict) else str(record.get("path"))


def parse_hub_name(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of `org/name[@revision]`; None for anything else (a path such as ./x, /x, ~/x, a
    run folder a/b/c, or p=0.1/seed=0)."""
    match = HUB_NAME.fullmatch(str(spec))
    if match is None or str(spec).startswith((".", "/", "~")):
        return None
    return match["repo"], match["revision"]


def hub_model(spec: str | Path, role: str = "base", check: bool = True) -> HubModel | None:
    """The hub model `spec` names, fetched or found in the cache; None where `spec` is a local path or is not of the
    form org/name[@revision]. `check`: refuse a model priorlab cannot use as a base (`pretrained.check_layout`)
    before its weights are fetched; `sample`'s prior, which may be any pipeline, is not checked."""
    from priorlab.models.pretrained import check_layout

    parsed = None if Path(str(spec)).expanduser().exists() else parse_hub_name(str(spec))
    if parsed is None:
        return None
    repo_id, revision = parsed
    key = (repo_id, revision, str(cache_dir()))
    model = _ONLINE.get(key)
    if model is not None and model.folder.is_dir():
        if check:
            check_layout(model.folder, role, str(spec))
        return model
    commit, failure = _ask_hub(str(spec), repo_id, revision, role)
    local = commit is None  # offline, or the hub not reached: the cache alone, the hub not tried again
    folder = _snapshot(str(spec), repo_id, commit or revision, HUB_CONFIGS, role, failure)
    if check:
        check_layout(folder, role, str(spec))
    model = HubModel(repo_id, revision, folder.name, folder)
    _snapshot(str(spec), repo_id, model.commit, HUB_FILES, role, failure)
    if not local:
        _ONLINE[key] = model
    return model


def locate(spec: str | Path, role: str = "base", check: bool = True) -> Path:
    """The local folder of a base or prior: `spec` itself where it is a local path (or names nothing at all: the
    caller's checks name that), else the snapshot folder of the hub model it names (`hub_model`)."""
    model = hub_model(spec, role, check)
    return model.folder if model is not None else Path(str(spec)).expanduser()


def available(spec: str | Path, role: str = "base") -> bool:
    """Whether `spec` is an existing local path or a hub model that can be had (online, or from the cache)."""
    if Path(str(spec)).expanduser().exists():
        return True
    try:
        return hub_model(spec, role) is not None
    except UserError:
        return False


def cache_dir() -> Path:
    """The Hugging Face cache as the environment names it now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ
    home = env.get("HF_HOME")
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or (home and str(Path(home) / "hub"))
    return Path(os.path.expandvars(folder or constants.HF_HUB_CACHE)).expanduser()


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the environment sets it now."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return flag.upper() in TRUE if flag else bool(constants.HF_HUB_OFFLINE)


def _ask_hub(spec: str, repo_id: str, revision: str | None, role: str) -> tuple[str | None, str]:
    """(the commit the hub gives for the revision, or None where the hub is not used or not reached; why not)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if offline():
        return None, "the hub is not used offline (HF_HUB_OFFLINE=1)"
    try:
        return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).repo_info(repo_id, revision=revision).sha, ""
    except RevisionNotFoundError as err:
        raise UserError(f"{role}={spec}: the hub model {repo_id} has no revision {revision!r}; pass a branch, tag or "
                        f"commit it has ({repo_id}@main, {repo_id}@v1.0, ...)") from err  # fmt: skip
    except RepositoryNotFoundError:  # also a private or gated model this machine may not read: perhaps cached
        return None, (f"the hub has no model {repo_id} that this machine may read (a private or gated model needs "
                      "`hf auth login`)")  # fmt: skip
    except Exception as err:  # noqa: BLE001 - any network failure falls back to the cache, as offline
        return None, f"the hub could not be reached ({_first_line(err)})"


def _snapshot(spec: str, repo_id: str, revision: str | None, patterns: list[str], role: str,
              failure: str) -> Path:  # fmt: skip
    """The snapshot folder of (repo, revision) holding the files of `patterns`: downloaded where the hub was reached
    (no `failure`), else, or where the download fails, found in the cache."""
    from huggingface_hub import snapshot_download

    kwargs = {"revision": revision, "cache_dir": cache_dir(), "allow_patterns": patterns,
              "ignore_patterns": HUB_SKIPPED, "endpoint": os.environ.get("HF_ENDPOINT") or None}  # fmt: skip
    if not failure:
        try:
            return Path(snapshot_download(repo_id, **kwargs))
        except Exception as err:  # noqa: BLE001 - a download cut off: the cache may hold it
            failure = f"the download failed ({_first_line(err.__cause__ or err)})"
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except Exception as err:  # noqa: BLE001 - not in the cache, or cached in part: one message for the user
        raise UserError(_not_found(spec, repo_id, revision, role, failure, err)) from err


def _not_found(spec: str, repo_id: str, revision: str | None, role: str, failure: str, err: Exception) -> str:
    from huggingface_hub.errors import IncompleteSnapshotError

    at = f" at revision {revision}" if revision else ""
    get = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    if isinstance(err, IncompleteSnapshotError):
        found = f"the local Hugging Face cache ({cache_dir()}) holds only part of the hub model {repo_id}{at}"
    else:
        found = f"no such folder, and the hub model {repo_id}{at} is not in the local Hugging Face cache"
        found += f" ({cache_dir()})"
    return (f"{role}={spec}: {found}, and {failure}. Download it on a machine with network (`{get}`) and copy its "
            "cache folder here (HF_HUB_CACHE names the cache), or pass the model's folder")  # fmt: skip


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
