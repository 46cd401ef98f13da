"""priorlab as an installed package: the wheel holds the shipped folders (configs/, experiments/) and an install from
it runs from any folder; `priorlab.resources` finds them in the package, else in the repository."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from priorlab import resources
from priorlab.overrides import CONFIG_DIR
from priorlab.study.spec import EXPERIMENTS_DIR

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "src", *resources.SHIPPED]


def test_a_checkout_reads_the_shipped_folders_in_place():
    assert resources.source_root() == ROOT
    assert CONFIG_DIR == ROOT / "configs" and EXPERIMENTS_DIR == ROOT / "experiments"
    assert (CONFIG_DIR / "train.yaml").is_file() and (EXPERIMENTS_DIR / "dropout_vs_prior.yaml").is_file()


def test_package_data_wins_over_the_repository_and_the_environment_over_both(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "priorlab"
    (package / "configs").mkdir(parents=True)
    monkeypatch.setattr(resources.importlib.resources, "files", lambda name: package)
    monkeypatch.delenv("PRIORLAB_CONFIGS", raising=False)
    assert resources.shipped_dir("configs") == package / "configs"
    assert resources.shipped_dir("experiments") == ROOT / "experiments"  # not in this package: the repository's
    monkeypatch.setenv("PRIORLAB_CONFIGS", str(tmp_path / "mine"))
    assert resources.shipped_dir("configs") == tmp_path / "mine"
    with pytest.raises(ValueError, match="ships no folder 'results'"):
        resources.shipped_dir("results")


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the checkout (pip builds in the source folder: the checkout stays untouched)."""
    source, dist = tmp_path / "source", tmp_path / "dist"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(ROOT / name, source / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(dist), str(source)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = dist.glob("priorlab-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp_path: Path) -> Path:
    """A fresh venv holding the wheel alone, which sees this environment's third-party packages through a .pth."""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env, timeout=120)
    python = venv / "bin" / "python"
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                          "--no-index", str(wheel)], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, env=env, check=True).stdout.strip()  # fmt: skip
    # after the install: pip there must not see this environment's own (editable) priorlab
    (Path(site) / "_parent_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_ships_the_folders_and_runs_a_study_from_elsewhere(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in resources.SHIPPED:
        files = {f"priorlab/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / folder).rglob("*") if p.is_file()}
        files = {f for f in files if "__pycache__" not in f}
        assert files and files <= names, sorted(files - names)
    venv = _venv_with(wheel, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PRIORLAB_CONFIGS")}
    env["WANDB_MODE"] = "offline"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)

    probe = "import priorlab.resources as r; print(r.__file__, *map(r.shipped_dir, r.SHIPPED), r.source_root())"
    where = run(str(venv / "bin" / "python"), "-c", probe)
    assert where.returncode == 0, where.stderr[-3000:]
    package = Path(where.stdout.split()[0]).parent
    assert package.is_relative_to(venv) and not package.is_relative_to(ROOT)
    assert where.stdout.split()[1:] == [str(package / "configs"), str(package / "experiments"), "None"]
    usage = run(str(venv / "bin" / "priorlab"), "--help")
    assert usage.returncode == 0 and usage.stderr.startswith("usage: priorlab {train,"), usage.stderr
    dry = run(str(venv / "bin" / "priorlab"), "study", "dropout_vs_prior", "preset=tiny", "dry_run=true")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert dry.stdout.startswith("study dropout_vs_prior, preset tiny:"), dry.stdout[:2000]
    assert f"paths.runs={elsewhere}/runs" in dry.stdout and "priorlab train stage=base study=" in dry.stdout
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # a dry run writes nothing
