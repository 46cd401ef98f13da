"""Lightning's DDP strategy with the settings priorlab's DDP presets choose (trainer=ddp, trainer=ddp_cpu)."""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.strategies import DDPStrategy as LightningDDP
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel

from priorlab.errors import UserError
from priorlab.training import lightning_private


def skip_allreduce_hook(state, bucket):
    """A DDP communication hook that communicates nothing: each process keeps its own gradient, so the processes'
    models drift apart. For benchmarks only (`comm_hook=skip`, bench/ddp_variants.sh): DDP's time without the
    all-reduce, which measures what the communication costs."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


# DDP's own warning (reducer.cpp) when a gradient's strides differ from its bucket's, which has its weight's strides.
# It compares strides in full, also those of size-1 dimensions, which do not change where any element lies: with
# channels_last=true on one-channel images, the first convolution's weight (128, 1, 3, 3) has channels-last strides
# (9, 1, 3, 1) and eager cuDNN returns its gradient as (9, 9, 3, 1), the same bytes (issue 17, BENCHMARKS.md). The
# strategy silences it and checks the layouts itself after the first backward pass (`layout_mismatches`).
STRIDE_WARNING = "Grad strides do not match bucket view strides"


def same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape lay out their elements in the same order: their strides agree in every
    dimension longer than 1 (the stride of a size-1 dimension is never used to find an element)."""
    return a.shape == b.shape and all(
        n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)
    )


def layout_mismatches(module: Module) -> tuple[list[str], list[str]]:
    """The weights whose gradient has other strides than the weight, split into (same element order: DDP's copy
    into its bucket moves the same bytes, as a plain copy; another order: a strided copy at every step)."""
    same, other = [], []
    for name, param in module.named_parameters():
        grad = param.grad
        if grad is None or grad.is_sparse or grad.stride() == param.stride():
            continue
        (same if same_order(grad, param) else other).append(name)
    return same, other


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
        self.layouts_checked = False
        warnings.filterwarnings("ignore", message=STRIDE_WARNING)  # checked by post_backward instead

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        if self.layouts_checked or self.lightning_module is None:
            return
        self.layouts_checked = True  # once: the layouts of one step are those of every step
        _, other = layout_mismatches(self.lightning_module)
        if other and self.global_rank == 0:
            shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            warnings.warn(
                f"the gradients of {len(other)} weights ({shown}) come back in another memory layout than the "
                "weights, so DDP copies them into its buckets strided at every step. With channels_last=true, "
                "compare the speed with channels_last=false",
                stacklevel=2,
            )

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
