"""CPU threads of a run: `cpu_threads=auto|N` (issue 17; bench/cpu_threads.py).

torch's intra-op pool starts one thread per core and spins them for each operation. On a shared machine that
oversubscribes the cores: on 2 cores a unet_tiny training step took 174 ms with 2 threads and 292 ms with 1 when
idle, but 657 ms against 280 ms with one other busy process and 3.7 s against 0.71 s with two
(bench/results/cpu-2026-11-28-threads.json). `auto` therefore takes the cores that are free when the run starts,
os.cpu_count() minus the one-minute load average, at least 1. A user's OMP_NUM_THREADS is kept as it is, and so
is the share `priorlab study jobs=N` gives each job (it sets OMP_NUM_THREADS).
"""

from __future__ import annotations

import os

from priorlab.errors import UserError


def free_cores() -> int:
    """Cores not busy now: the core count minus the one-minute load average (rounded), at least 1."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this platform: assume an idle machine
        load = 0.0
    return max(1, cores - round(load))


def cpu_threads(setting) -> int | None:
    """The intra-op thread count for `cpu_threads=setting` (auto or a whole number ≥ 1), or None where the user's
    OMP_NUM_THREADS decides."""
    if setting is None or setting == "auto":
        return None if "OMP_NUM_THREADS" in os.environ else free_cores()
    if isinstance(setting, bool) or not isinstance(setting, int) or not 1 <= setting <= 4096:
        raise UserError(f"cpu_threads={setting!r} must be auto or a whole number of at least 1 (at most 4096)")
    return setting


def set_cpu_threads(setting) -> int:
    """Apply `cpu_threads` to torch and return the thread count in use."""
    import torch

    n = cpu_threads(setting)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
