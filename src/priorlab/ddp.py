"""Lightning's DDP strategy with the settings priorlab's DDP presets choose (trainer=ddp, trainer=ddp_cpu)."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.strategies import DDPStrategy as LightningDDP
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from priorlab import lightning_private
from priorlab.errors import UserError


def skip_allreduce_hook(state, bucket):
    """A DDP communication hook that communicates nothing: each process keeps its own gradient, so the processes'
    models drift apart. For benchmarks only (`comm_hook=skip`, bench/ddp_variants.sh): DDP's time without the
    all-reduce, which measures what the communication costs."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


COMM_HOOKS = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook,
              "skip": skip_allreduce_hook}  # fmt: skip
COMPILED_DDP = ("ddp_optimizer", "no_optimization")


class DDPStrategy(LightningDDP):
    """Lightning's DDPStrategy, optionally wrapping the module on the current CUDA stream and compressing the
    gradients of the all-reduce.

    Lightning builds DistributedDataParallel inside a new side CUDA stream. DDP keeps references to the
    parameters' gradient accumulators, which then belong to that stream while the backward pass runs on the
    default one; recent PyTorch warns that this "may incur unnecessary synchronization" at every step.

    Args:
        same_stream: build DDP on the current stream (as PyTorch's own examples do) instead of a side stream.
        comm_hook: None, "bf16" or "fp16": all-reduce the gradients in that precision (half the bytes); the
            averaged gradient is then rounded to it, so runs differ slightly from one GPU. "skip": no all-reduce at
            all, for benchmarks only (`skip_allreduce_hook`): the processes train apart.
        compiled_ddp: how torch.compile treats the DDP module (`torch._dynamo.config.optimize_ddp`):
            "ddp_optimizer" (PyTorch's default) splits the compiled graph at the gradient buckets so that the
            all-reduce overlaps the backward pass; "no_optimization" compiles one graph and all-reduces after it.
            On 2 H200s the default scaled at 0.80 with compile against 0.99 eager (BENCHMARKS.md); the other
            mode is offered to measure that.
        **kwargs: Lightning's DDPStrategy arguments (and DistributedDataParallel's, e.g. gradient_as_bucket_view).
    """

    def __init__(
        self, same_stream: bool = True, comm_hook: str | None = None, compiled_ddp: str = "ddp_optimizer", **kwargs
    ):
        if compiled_ddp not in COMPILED_DDP:
            raise UserError(f"trainer.strategy.compiled_ddp={compiled_ddp} is not one of {', '.join(COMPILED_DDP)}")
        self.compiled_ddp = compiled_ddp
        if comm_hook is not None:
            if comm_hook not in COMM_HOOKS:
                names = ", ".join(COMM_HOOKS)
                raise UserError(f"trainer.strategy.comm_hook={comm_hook} is not one of {names} (or null)")
            kwargs["ddp_comm_hook"] = COMM_HOOKS[comm_hook]
            if comm_hook == "skip":
                warnings.warn("trainer.strategy.comm_hook=skip all-reduces nothing: the processes train apart. It is "
                              "for benchmarks only (bench/ddp_variants.sh)", stacklevel=2)  # fmt: skip
        super().__init__(**kwargs)
        self.same_stream = same_stream
        self.comm_hook = comm_hook

    def configure_ddp(self) -> None:
        import torch._dynamo

        # Lightning registers communication hooks on CUDA only (NCCL) and would ignore one silently elsewhere
        if self.comm_hook is not None and self.root_device.type != "cuda":
            raise UserError(
                f"trainer.strategy.comm_hook needs GPUs (NCCL); this run's processes are on {self.root_device.type}. "
                "Set trainer.strategy.comm_hook=null"
            )
        torch._dynamo.config.optimize_ddp = self.compiled_ddp  # read when the module is first compiled, after this
        super().configure_ddp()

    def _setup_model(self, model: Module) -> DistributedDataParallel:  # Lightning's private hook, pinned
        if not self.same_stream:
            return super()._setup_model(model)
        kwargs = lightning_private.ddp_kwargs(self)
        return DistributedDataParallel(module=model, device_ids=self.determine_ddp_device_ids(), **kwargs)
