"""The sampling loop over any diffusers scheduler, with one random generator per sample.

Sample i draws its initial noise (and any per-step noise) from its own generator seeded with seeds[i], so it
is the same whatever the batch size, the number of processes, or the prior (EDM2's per-sample seeding).
The scheduler always receives the guided eps: every branch is converted to eps first.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from collections.abc import Callable

import diffusers
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from priorlab.errors import UserError
from priorlab.guidance import guide, in_interval
from priorlab.models.denoiser import Denoiser
from priorlab.priors import NONE, SELF, DenoiserPrior, Prior, PriorNet
from priorlab.priors.fused import refresh_pairs
from priorlab.progress import progress_bar

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def make_scheduler(name: str, train_scheduler: DDPMScheduler) -> SchedulerMixin:
    """A sampling scheduler by short name (ddim, ddpm, euler, ...) or any diffusers scheduler class name."""
    cls = getattr(diffusers, SCHEDULERS.get(name, name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UserError(f"sampler={name} is not a diffusers scheduler; use one of {', '.join(SCHEDULERS)}")
    return cls.from_config(train_scheduler.config, prediction_type="epsilon")


def initial_noise(seeds: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, list[torch.Generator]]:
    """Per-sample initial noise (N, *shape) and the generators that continue each sample's stream."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


class GraphedStep:
    """A denoising step's whole guided prediction `fn(*inputs)` captured once as a CUDA graph and replayed at every
    step: a small network's compiled step is bound by kernel launches, and prior=base launches two networks' worth
    (issue 17). Every tensor the step reads besides the networks' weights is an input (x, t, labels, and the
    model's ᾱ table, which each sampling call copies to the device anew): inputs are copied into static buffers
    before each replay, so a replay never reads memory a later call has freed. The output buffer is overwritten by
    the next replay, so `__call__` returns a copy.

    Only paths whose work does not depend on GPU values can be captured: prior self, base or none, alone
    (`graphed_guide`) or several in one pass (`priorlab.sample_many`); fitted priors pick rows by their weights,
    which reads the GPU. Graphs are cached per model (`graphed_step`); the graphs of one model share one memory
    pool, which is safe because they are replayed one at a time on one stream and nothing but the output outlives a
    replay. `fn` is not kept (the cache is keyed weakly by the model, which `fn` refers to), nor are the prior
    networks the graph reads: a graph is dropped when one of them dies (`graphed_step`)."""

    def __init__(self, fn, inputs: tuple[Tensor, ...], pool=None):
        self.inputs = tuple(a.clone() for a in inputs)
        self.out, self.replay = GRAPHS.capture(fn, self.inputs, pool)

    def __call__(self, *inputs: Tensor) -> Tensor:
        for static, a in zip(self.inputs, inputs, strict=True):
            static.copy_(a)
        self.replay()
        return self.out.clone()


class CudaGraphs:
    """How `GraphedStep` captures a step and replays it: as a CUDA graph. `GRAPHS` is the one in use; the tests put
    a stand-in there that captures on the CPU (`device_type`, `pool` and `capture` are all it needs), so that the
    caching, keying and static buffers around it run where no GPU is."""

    device_type = "cuda"

    def pool(self):
        """A memory pool for the graphs of one model."""
        return torch.cuda.graph_pool_handle()

    def capture(self, fn, inputs: tuple[Tensor, ...], pool) -> tuple[Tensor, Callable[[], None]]:
        """Capture `fn(*inputs)` once warmed up: its output buffer, and the replay that rewrites it from the
        values `inputs` hold then."""
        device = inputs[0].device
        warm = torch.cuda.Stream(device)  # warm-up off the capture stream, as torch.cuda.graphs asks
        warm.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(warm):
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream(device).wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn(*inputs)
        return out, graph.replay


GRAPHS = CudaGraphs()


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pointers(net) -> tuple:
    """Where a network's weights and buffers live (DiT's position table is a buffer): a graph reads them by
    address, so tensors moved elsewhere (another device or dtype, a swapped-in copy) must not replay an old
    graph."""
    return tuple(p.data_ptr() for p in itertools.chain(net.parameters(), net.buffers())) if net is not None else ()


def prior_key(prior_net: PriorNet | None) -> tuple:
    """What a captured graph depends on of a prior network: which one it is, and where its weights live."""
    return (id(prior_net), _pointers(prior_net.module if prior_net is not None else None))


def weights_key(model: Denoiser, *prior_nets: PriorNet | None) -> tuple:
    """Where the weights and buffers of the model and of each prior network live. A sampling call names it once,
    before its first step: nothing moves them during sampling, and reading every weight's address costs about 1.3 µs
    per weight (0.43 ms for unet_b's 329 on this project's 2-core CPU; 0.60 ms on an H200 host), which a replayed
    graph would pay at every step."""
    return (_pointers(model), *[prior_key(p) for p in prior_nets])


def can_graph(device: torch.device, *prior_nets: PriorNet | None) -> bool:
    """Whether a step that reads these prior networks (None: none) can be captured: on a GPU, each a priorlab
    denoiser with its weights on that device. A diffusers pipeline's prior also reads null-condition tensors that
    no key names (and PixArt's copies host data at every call), and a prior elsewhere runs outside the graph;
    those steps run launched."""
    return device.type == GRAPHS.device_type and all(
        isinstance(p, DenoiserPrior) and all(w.device == device for w in p.module.parameters())
        for p in prior_nets
        if p is not None
    )


def graphed_step(model: Denoiser, weights: tuple, key: tuple, fn, inputs: tuple[Tensor, ...],
                 keep: tuple = ()) -> GraphedStep:  # fmt: skip
    """The cached `GraphedStep` of this model, captured on first use. `weights` is `weights_key` of the model and
    of every prior network `fn` reads, and `keep` those networks (None: none); `key` names the rest of what `fn`
    computes with (priors, scales, precision); the inputs' shapes and dtypes are added here. A graph goes when a
    network in `keep` dies: each evaluation builds its prior networks anew, and their graphs would otherwise pile up
    for as long as the model lives (the key holds the network's identity, so a new one never reuses them)."""
    graphs = _GRAPHS.setdefault(model, {})
    key = (weights, *key, *[(tuple(a.shape), a.dtype) for a in inputs])
    if key not in graphs:
        pool = graphs.setdefault("pool", GRAPHS.pool())
        graphs[key] = GraphedStep(fn, inputs, pool)
        for net in dict.fromkeys(n for n in keep if n is not None):
            weakref.finalize(net, graphs.pop, key, None)
    return graphs[key]


def graphed_guide(model: Denoiser, prior_net: PriorNet | None, prior: Prior, scale: float, autocast: bool,
                  weights: tuple, inputs: tuple[Tensor, ...]) -> GraphedStep:  # fmt: skip
    """The cached graph of one setting's guided prediction (`guide`) of inputs (x, t, labels, ᾱ) for their shapes
    and this precision; `prior_net` is the network the sampling call's prior reads (its graphs go with it), and
    `weights` is `weights_key(model, prior_net)`, named once per sampling call."""

    def fn(x: Tensor, t: Tensor, y: Tensor, abar: Tensor) -> Tensor:
        # no cast cache: under a caller's own autocast, the bf16 copies of the weights would be made outside the
        # graph, kept until that caller's context ends, and then read freed from the graph
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
            return guide(model, x, t, y, abar[t], scale, prior, overlap=False).guided

    return graphed_step(model, weights, ("guide", prior.mode, float(scale), autocast), fn, inputs, keep=(prior_net,))


def trajectory(
    seeds: Tensor, sample_shape: tuple[int, ...], train_scheduler: DDPMScheduler, sampler: str, num_steps: int,
    device: torch.device, interval: tuple[float, float] | None, predict,
) -> Tensor:  # fmt: skip
    """One chunk of samples from noise to data: each sample's initial noise from its seed, then at every step
    `predict(x_in, t, guided)` gives the eps the scheduler steps with (t: the step's timestep on the device; guided:
    whether the step lies in the guidance interval). Shared by `sample` and `priorlab.sample_many`."""
    x, gens = initial_noise(seeds, tuple(sample_shape))
    scheduler = make_scheduler(sampler, train_scheduler)
    scheduler.set_timesteps(num_steps)
    # stochastic schedulers draw their per-step noise from each sample's generator; deterministic ones
    # (UniPC, PNDM) take no generator argument
    step_kwargs = {"generator": gens} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = x.to(device) * scheduler.init_noise_sigma
    # With a deterministic sampler (ddim, the default) and prior self, base or none, nothing in a step waits
    # for the GPU, so the host queues steps ahead (stochastic samplers copy each step's per-sample noise in):
    # the timesteps are copied to the device once, and whether a step lies in the guidance interval is
    # decided here, from σ of its timestep, rather than row by row on the GPU.
    ts = scheduler.timesteps.round().long()
    ts_device = ts.to(device)
    for i, step_t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, step_t)
        guided = interval is None or bool(in_interval(train_scheduler.alphas_cumprod[ts[i]].float(), interval))
        eps = predict(x_in, ts_device[i], guided)
        x = scheduler.step(eps.float(), step_t, x, **step_kwargs).prev_sample
    return x


@torch.no_grad()
def sample(
    model: Denoiser, labels: Tensor, seeds: Tensor, train_scheduler: DDPMScheduler, sample_shape: tuple[int, ...],
    scale: float = 1.0, prior: Prior = SELF, interval: tuple[float, float] | None = None, sampler: str = "ddim",
    num_steps: int = 25, batch_size: int = 256, progress: bool = False, autocast: bool = False, graphs: bool = False,
) -> Tensor:  # fmt: skip
    """Generate one sample per (label, seed) pair with guidance; returns (N, *sample_shape) on the model's device.

    Args:
        model: the conditional denoiser θ.
        labels: class of each sample (N,); the null class gives unconditional samples.
        seeds: seed of each sample (N,).
        train_scheduler: θ's training schedule (its ᾱ and timestep count).
        scale, prior, interval: guidance, see `priorlab.guidance.guide`; a fitted prior's weights must be fitted
            over θ's training timesteps.
        sampler: scheduler name; num_steps: denoising steps.
        autocast: run the networks under bf16 autocast (the guidance combination and the scheduler's update
            stay in fp32).
        graphs: on a GPU, replay each step's guided prediction from a CUDA graph (`GraphedStep`) for prior
            self, base (a priorlab denoiser on the model's GPU: `can_graph`) or none; elsewhere, and for the fitted
            priors, the same computation runs eagerly.
    """
    prior.check_model(train_scheduler.config.num_train_timesteps)
    prior.check_guided(model, [scale])
    device = next(model.parameters()).device
    abar = train_scheduler.alphas_cumprod.to(device)
    reads = prior.reads  # the prior network a graphed step reads
    graphed = graphs and not prior.per_row and can_graph(device, reads)
    weights_at = weights_key(model, reads) if graphed else ()  # once per call, not at every step
    if graphed:
        refresh_pairs(model, reads)  # a replay reads θ and ψ's stacked weights (fused=on|auto) as they are now
    out = []
    chunks = range(0, len(labels), batch_size)
    for start in progress_bar(chunks, desc=f"sampling prior={prior.name} w={scale}", disable=not progress, leave=False):
        y = labels[start : start + batch_size].to(device)

        def predict(x_in: Tensor, t_step: Tensor, guided: bool, y=y) -> Tensor:
            t, w = t_step.expand(len(y)), scale if guided else 1.0
            if graphed:
                p = prior if w != 1 else NONE
                inputs = (x_in, t, y, abar)
                return graphed_guide(model, reads, p, w, autocast, weights_at, inputs)(*inputs)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return guide(model, x_in, t, y, abar[t], w, prior).guided

        out.append(trajectory(seeds[start : start + batch_size], sample_shape, train_scheduler, sampler, num_steps,
                              device, interval, predict))  # fmt: skip
    return torch.cat(out)
