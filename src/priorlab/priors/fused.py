"""θ and the base ψ in one pass, where they share an architecture (issue 33, item 1).

Guidance with prior=base runs two networks per step, θ on (x_t, c) and ψ on (x_t, ∅), while batched CFG runs one
network at twice the batch. In a fine-tune, θ and ψ have one architecture (config apart from the label-table rows,
`models.io.architecture_mismatch`), so both can run as one network over a stacked "model" dimension:
`torch.func.vmap` of `functional_call` over their stacked weights, which turns each convolution into a grouped
convolution and each linear layer into a batched matrix product (the "vmap" route, the one implemented).

- **Weights.** `FusedPair` holds one stacked copy of both networks' parameters and buffers (2, ...) in their dtype
  and memory layout; it is refreshed in place (same addresses, so a captured CUDA graph reads the new values)
  whenever a weight was written or moved (`refresh`, which reads each weight's version and address on the host; a
  step replayed from a graph does not run it, so `sampling` calls it once per sampling call). The copy costs the
  memory of both networks' weights once more.
- **Label tables.** θ's and ψ's tables may have different row counts (a base of other classes, or an
  unconditional UNet base without a table): both are padded with zero rows to the larger count. ψ reads only its
  own null row, θ only its own rows, so padding changes no output. A UNet without a table adds nothing to its time
  embedding, as a zero row does.
- **Schedules.** ψ is queried at its own timestep of closest ᾱ and its output converted to eps at its own ᾱ, exactly
  as `PriorNet.predict` does; only the network call is shared.
- **GroupNorm.** PyTorch's CPU group norm asks for the memory format of its input, which vmap refuses; there the
  stacked network's GroupNorm layers compute the same normalization from `var_mean` in float32 (as autocast runs
  it). On a GPU they try PyTorch's own kernel first (one kernel rather than several) and keep the `var_mean` form
  if the first pass refuses it (not yet run on a GPU here: `bench/guided_sampling.py` measures it).
- **Where.** The one guided step (`priorlab.guidance._passes`), so `sampling.sample` (launched or graphed),
  `sample_many` and the evaluation, wherever ψ runs over every row θ runs over: prior=base, or blocks of base priors
  of one network. Steps that also need θ's own ∅ rows (prior=self beside base), pick rows by a boolean mask (the
  fitted priors; `guide`'s per-row interval) or read a diffusers prior run the two calls, as does the prior swap
  inside diffusers pipelines (`pipelines.swap`, which does not go through `guide`).
- **Choice.** `fused`: "off" (two calls), "on" (one pass; an architecture mismatch is a UserError), "auto" (one pass
  where the architectures match and, on a GPU, the pass was measured faster for that input shape and precision on
  its first call; on the CPU two calls: there is no kernel launch to save, and grouped convolutions are the slower
  of the two there). Grouped convolutions are slow in some cuDNN versions (pytorch#70954), hence the measurement.
- **Measured.** On an H100 (torch 2.11, bf16, compiled, B = 256 and 64) the vmap pass took 1.7–2.0× the two calls
  for UNet-36M and DiT-B/2, launched or from CUDA graphs, and held 2–7× their peak memory
  (`bench/results/guided_sampling_fused.md`): "off" is the default, and "auto" measured the two calls faster.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from priorlab import diffusion
from priorlab.errors import UserError
from priorlab.models.denoiser import Denoiser, label_tables
from priorlab.models.io import architecture_mismatch
from priorlab.priors.nets import DenoiserPrior, PriorNet, closest_timesteps, convert

FUSED = ("auto", "on", "off")
TIMED_RUNS = 3  # timed calls of each route for fused=auto, after one untimed


def check_fused(value) -> str:
    """A `fused` setting must be one of `FUSED`."""
    if value not in FUSED:
        raise UserError(f"fused={value} is unknown; use one of {', '.join(FUSED)}")
    return value


def fusion_mismatch(model: Denoiser, prior_net: PriorNet) -> list[str]:
    """Why θ and ψ cannot run in one pass (empty where they can): ψ must be a priorlab denoiser of θ's architecture
    that sees all of x_t, with its weights on θ's device in θ's dtype."""
    base = getattr(prior_net, "denoiser", None)
    if not isinstance(prior_net, DenoiserPrior) or not isinstance(base, Denoiser) or not isinstance(model, Denoiser):
        return [f"the prior network is a {type(prior_net).__name__} of a {type(base).__name__}, not of a denoiser"]
    reasons = list(architecture_mismatch(model, base))
    if prior_net.channels is not None:
        reasons.append("the prior sees only some input channels")
    if base.conditional and not model.conditional:
        reasons.append("the base has a label table and the model has none")
    mine, theirs = next(model.parameters()), next(base.parameters())
    if (mine.device, mine.dtype) != (theirs.device, theirs.dtype):
        reasons.append(f"weights on {theirs.device} {theirs.dtype} (base) vs {mine.device} {mine.dtype} (model)")
    return reasons


class _GroupNorm(nn.GroupNorm):
    """GroupNorm from `var_mean` in float32, which vmap can batch on the CPU too, or PyTorch's kernel on a GPU where
    `native` (module doc)."""

    native = False

    def forward(self, x: Tensor) -> Tensor:
        if self.native and x.device.type != "cpu":
            return super().forward(x)
        n, c = x.shape[:2]
        h = x.float().reshape(n, self.num_groups, -1)  # (N, G, C/G · H · W)
        var, mean = torch.var_mean(h, dim=-1, keepdim=True, correction=0)
        h = ((h - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            shape = (1, c, *[1] * (x.ndim - 2))
            h = h * self.weight.float().reshape(shape) + self.bias.float().reshape(shape)
        return h.to(torch.promote_types(x.dtype, self.weight.dtype if self.affine else x.dtype))


def _skeleton(net: nn.Module) -> nn.Module:
    """θ's network rebuilt from its config without weights (on the meta device), its GroupNorm layers vmap-safe:
    the module `functional_call` runs with the stacked weights. Built anew rather than copied, so that a network
    compiled in place (`nn.Module.compile`) does not bring its compiled call, which would run its own weights."""
    with torch.device("meta"):
        skeleton = type(net).from_config(net.config)
    for module in list(skeleton.modules()):
        for name, child in module.named_children():
            if type(child) is nn.GroupNorm:
                setattr(module, name, _GroupNorm(child.num_groups, child.num_channels, child.eps, child.affine))
    return skeleton.eval()


class FusedPair:
    """θ and ψ (a `DenoiserPrior` of θ's architecture: `fusion_mismatch` empty) as one network over a stacked model
    dimension; `__call__` gives eps_θ(x_t, c) and eps_ψ(x_t, ∅) from one pass (module doc).

    Args:
        model: θ; prior_net: ψ.
        compiled: run the stacked pass through `torch.compile` (where θ's network is compiled).
    """

    def __init__(self, model: Denoiser, prior_net: DenoiserPrior, compiled: bool = False):
        self.model, self.prior_net = model, prior_net
        self.skeleton = _skeleton(model.net)
        self.choice: dict[tuple, bool] = {}  # fused=auto: per input shape and precision, whether the pass is faster
        self._tables = {id(t.weight) for t in label_tables(model.net) + label_tables(prior_net.denoiser.net)}
        self._stacked: dict[str, Tensor] = {}
        self._key: list = []
        self._listed: tuple = ((), [], [])
        self._norm: bool | None = None  # PyTorch's group norm under vmap on a GPU; None: not tried yet
        run = vmap(self._one, in_dims=(0, None, 0, 0))  # (2, N, ...): the model dimension first
        self._run = torch.compile(run) if compiled else run

    def _pairs(self) -> list[tuple[str, Tensor, Tensor | None]]:
        """(name, θ's tensor, ψ's tensor or None where ψ has no label table) of every parameter and buffer, listed
        once per device and dtype of the networks (moving a network replaces its buffers, not its parameters)."""
        where = tuple(
            (p.device, p.dtype) for p in (next(self.model.parameters()), next(self.prior_net.module.parameters()))
        )
        if self._listed[0] != where:
            nets = (self.model.net, self.prior_net.denoiser.net)
            mine, theirs = (dict(n.named_parameters()) | dict(n.named_buffers()) for n in nets)
            pairs = [(name, a, theirs.get(name)) for name, a in mine.items()]
            self._listed = (where, pairs, [t for _, a, b in pairs for t in (a, b) if t is not None])
        return self._listed[1]

    def refresh(self) -> None:
        """Copy both networks' weights into the stacked copy where any was written or moved since (each weight's
        version counter and address, read on the host), in place: the stacked tensors keep their addresses."""
        pairs = self._pairs()
        key = [(t._version, t.data_ptr()) for t in self._listed[2]]
        if key == self._key and self._stacked:
            return
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: refreshed outside inference mode too
            for name, a, b in pairs:
                rows = max(len(a), len(b) if b is not None else 0) if id(a) in self._tables else len(a)
                shape = (rows, *a.shape[1:]) if a.ndim else a.shape
                old = self._stacked.get(name)
                if old is None or old.shape[1:] != shape or old.device != a.device or old.dtype != a.dtype:
                    old = self._stacked[name] = _stack_like(a, shape)
                for slot, t in ((0, a), (1, b)):
                    if t is not None:
                        old[slot, : len(t)].copy_(t) if t.ndim else old[slot].copy_(t)  # noqa: B018
        self._key = key

    def _one(self, weights: dict, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """One network's raw output (N, ...) from its weights: run under vmap over the model dimension."""
        kwargs = {"class_labels": labels} if self.model.conditional else {}
        return functional_call(self.skeleton, weights, (x, t), {**kwargs, "return_dict": False})[0]

    def raw(self, x_t: Tensor, t: Tensor, labels: Tensor, t_prior: Tensor) -> Tensor:
        """θ's and ψ's raw outputs (2, N, ...) at (x_t, t, labels) and (x_t, t_prior, ψ's null class)."""
        if not _capturing(x_t.device):
            self.refresh()
        null = torch.full_like(labels, self.prior_net.denoiser.null_class)
        args = (self._stacked, x_t, torch.stack([t, t_prior.to(t.dtype)]), torch.stack([labels, null]))
        if (
            x_t.device.type != "cpu" and self._norm is None
        ):  # first pass on a GPU: PyTorch's group norm if vmap takes it
            self._set_norm(True)
            try:
                out = self._run(*args)
            except RuntimeError:
                self._set_norm(False)
                return self._run(*args)
            return out
        return self._run(*args)

    def _set_norm(self, native: bool) -> None:
        self._norm = native
        for module in self.skeleton.modules():
            if isinstance(module, _GroupNorm):
                module.native = native

    def __call__(self, x_t: Tensor, t: Tensor, labels: Tensor, abar_t: Tensor) -> tuple[Tensor, Tensor]:
        """eps_θ(x_t, c) in x_t's dtype, and eps_ψ(x_t, ∅) at ψ's timestep of closest ᾱ converted to eps at ψ's ᾱ
        (`PriorNet.predict`), in float32 or x_t's dtype where wider; x_t (N, ...), t and labels (N,), θ's ᾱ_t (N,)."""
        abar = self.prior_net._abar(x_t.device)
        t_prior = closest_timesteps(abar, abar_t)
        out = self.raw(x_t, t, labels, t_prior)
        cond = diffusion.to_eps(out[0].to(x_t.dtype), self.model.prediction_type, x_t, abar_t)
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        base = convert(
            out[1].to(dtype), self.prior_net.prediction_type, "epsilon", x_t.to(dtype), abar[t_prior], abar_t
        )
        return cond, base

    def faster(self, key: tuple, fused: Callable[[], object], separate: Callable[[], object]) -> bool:
        """fused=auto: whether the one pass is faster than the two calls for `key` (input shape and precision),
        measured on its first call on a GPU with CUDA events (`TIMED_RUNS` each, after one untimed call that also
        compiles) and kept; False on the CPU, inside a graph capture that meets a new key, or where the pass
        fails (it is then never tried again for that key)."""
        if key in self.choice:
            return self.choice[key]
        if key[0] != "cuda" or _capturing(torch.device("cuda")):
            return False
        try:
            ms_fused = _time(fused)
        except Exception as err:  # a route the device refuses: the two calls stay, with a note
            print(f"priorlab: fused pass unavailable ({type(err).__name__}: {err}); using two passes", flush=True)
            self.choice[key] = False
            return False
        self.choice[key] = ms_fused < _time(separate)
        return self.choice[key]


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream (never on the CPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _stack_like(a: Tensor, shape: tuple) -> Tensor:
    """Zeros (2, *shape) for a weight `a`, each slot in `a`'s memory layout (a channels-last convolution stays
    channels-last) where the shapes agree; contiguous for a padded label table."""
    last = a.ndim == 4 and a.is_contiguous(memory_format=torch.channels_last)
    if tuple(shape) == tuple(a.shape) and (a.is_contiguous() or last):
        return a.new_empty_strided((2, *a.shape), (a.numel(), *a.stride())).zero_()
    return a.new_zeros((2, *shape))


def _time(fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn` on the current CUDA stream after one untimed call."""
    fn()
    times = []
    for _ in range(TIMED_RUNS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def fused_pair(model: Denoiser, prior_net: PriorNet, fused: str) -> FusedPair | None:
    """The `FusedPair` of θ and ψ, built and validated once per model and kept on ψ, or None where fused=off or the
    architectures differ under fused=auto; fused=on with another architecture is a UserError."""
    if fused == "off":
        return None
    cache = prior_net.__dict__.setdefault("_fused_pairs", {})
    if id(model) not in cache:
        mismatch = fusion_mismatch(model, prior_net)
        compiled = getattr(model.net, "_compiled_call_impl", None) is not None
        cache[id(model)] = (model, None if mismatch else FusedPair(model, prior_net, compiled), mismatch)
    _, pair, mismatch = cache[id(model)]
    if pair is None and fused == "on":
        raise UserError(f"fused=on needs a base of the model's architecture, but {'; '.join(mismatch)}; "
                        "use fused=auto or fused=off")  # fmt: skip
    return pair


def refresh_pairs(model: Denoiser, *prior_nets: PriorNet | None) -> None:
    """Refresh the stacked weights of every `FusedPair` of θ and these networks: once per sampling call that replays
    captured graphs, which read the stacked copy and do not refresh it themselves."""
    for net in prior_nets:
        entry = getattr(net, "_fused_pairs", {}).get(id(model)) if net is not None else None
        if entry is not None and entry[1] is not None:
            entry[1].refresh()
