"""Every module of priorlab imports on its own: no import circle, no module that works only after another one.

One fresh interpreter imports the third-party libraries once (torch, diffusers, Lightning: seconds each), checks
that no priorlab module is loaded, then forks one child per priorlab module, which imports only that module: each
child starts with no priorlab module at all, as `python -c "import priorlab.X"` would, at a fraction of the time.
The third-party modules are every one that priorlab's modules load (diffusers and transformers import theirs
lazily, on first use): a first child imports all of priorlab and lists them, and the driver imports that list.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
THIRD_PARTY = ("torch", "diffusers", "lightning", "hydra", "omegaconf", "pandas", "scipy", "PIL", "yaml", "tqdm")

DRIVER = """
import importlib, json, os, sys, traceback
for dep in {deps!r}:
    importlib.import_module(dep)
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:  # import all of priorlab, and list the other modules that this loaded
    os.close(read_end)
    before = set(sys.modules)
    for name in {modules!r}:
        importlib.import_module(name)
    loaded = [m for m in sys.modules if m not in before and m.split(".")[0] != "priorlab"]
    with os.fdopen(write_end, "w") as f:
        json.dump(loaded, f)
    os._exit(0)
os.close(write_end)
with os.fdopen(read_end) as f:  # read before waiting: the list may not fit the pipe's buffer
    third_party = json.load(f)
os.waitpid(pid, 0)
for dep in third_party:
    try:
        importlib.import_module(dep)
    except Exception:  # one that only imports in priorlab's order: the child imports it then
        pass
assert not [m for m in sys.modules if m.split(".")[0] == "priorlab"], "the driver imported priorlab"
failed = []
for name in {modules!r}:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED=" + ",".join(failed))
"""


def _modules() -> list[str]:
    names = []
    for path in sorted((SRC / "priorlab").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] != "__main__":  # runs the command line
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks one child per module")
def test_every_module_imports_in_isolation():
    modules = _modules()
    assert {"priorlab.priors", "priorlab.evaluation", "priorlab.keys", "priorlab.evaluation.calibrate"} <= set(modules)
    code = DRIVER.format(deps=THIRD_PARTY, modules=modules)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    failed = out.stdout.strip().rsplit("FAILED=", 1)[-1]
    assert failed == "", f"these modules fail to import on their own: {failed}\n{out.stderr[-3000:]}"


def test_every_benchmark_script_imports():
    """The bench/ scripts run on a GPU machine, not in the suite: a renamed priorlab name would break them unseen
    (it did once: `priorlab.guidance.Prior`). Each is loaded as a module (its `main` not run)."""
    bench = Path(__file__).parents[1] / "bench"
    scripts = sorted(str(p) for p in bench.glob("*.py"))
    assert len(scripts) >= 8
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(bench)!r})\n"
        f"for path in {scripts!r}:\n"
        "    spec = importlib.util.spec_from_file_location('bench_script', path)\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
