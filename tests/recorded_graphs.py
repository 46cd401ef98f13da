"""A CPU stand-in for CUDA graphs (`priorlab.sampling.GRAPHS`), so that the graphed sampling paths run in the
default suite: `monkeypatch.setattr(sampling, "GRAPHS", RecordedGraphs())`.

Capture records every operation that `fn(*inputs)` dispatches, with the very tensors it read and wrote; a replay
runs those operations again on the same tensors, each writing its result into the tensor it wrote at capture. So,
like a CUDA graph and unlike a call of `fn`, a replay reads the static input buffers and the weights it captured,
whatever the caller has done since: inputs not copied into the buffers, or a weight swapped for another tensor,
replay stale values. An operation that reads a value on the host (a GPU sync, which a CUDA capture refuses) is
refused here too.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
# operations that read a tensor's values on the host, or shape their output by them: a GPU sync
HOST_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}


class _Record(TorchDispatchMode):
    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        if func in HOST_READS or boolean_index:
            raise RuntimeError(f"{func} reads tensor values on the host: a CUDA graph cannot capture it")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class RecordedGraphs:
    """`device_type`, `pool` and `capture` as `priorlab.sampling.CudaGraphs` has them, on the CPU; counts the
    captures and replays."""

    device_type = "cpu"

    def __init__(self):
        self.captures = 0
        self.replays = 0

    def pool(self):
        return object()

    def capture(self, fn, inputs: tuple[torch.Tensor, ...], pool):
        ops: list = []
        with _Record(ops):
            out = fn(*inputs)
        self.captures += 1

        def replay() -> None:
            self.replays += 1
            with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the recorded operations, as recorded
                for func, args, kwargs, wrote in ops:
                    fresh = func(*args, **kwargs)
                    for old, new in zip(tree_leaves(wrote), tree_leaves(fresh), strict=True):
                        # in place, or a view of captured memory: written already; else into the captured output
                        if isinstance(old, torch.Tensor) and not _same_memory(old, new):
                            old.copy_(new)

        return out, replay


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    same = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    return same and a.storage_offset() == b.storage_offset() and a.stride() == b.stride()
