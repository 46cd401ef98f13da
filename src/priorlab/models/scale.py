"""The guidance scale w as an input of a denoiser: the scale embedding of a guidance-distilled fine-tune.

A fine-tune trained with `guidance_distill` (`priorlab.training.distill`; DogFit, Bahram, Shateri & Granger,
arXiv 2508.05685, AAAI 2026, Sec. "guidance control") takes w as an input, so that one pass gives the
base-prior-guided prediction.
w enters as DogFit's does, beside the class: a small network of w is added to the class embedding, here to the
output of every label table of the diffusers network (`label_tables`: the UNet's and MLP's `class_embedding`, each
DiT block's `LabelEmbedding` table) through a forward hook, so diffusers' classes are not edited and the network's
weights file stays a plain diffusers one:

    e(w) = h(w) − h(1),   h(w) = Linear₂(SiLU(Linear₁(features(w − 1)))),   0 where w = 1 exactly,

features: w − 1 and sin, cos of (w − 1)·f_k at geometric frequencies f_k. Linear₂ starts at zero, so a new
embedding leaves the fine-tune's prediction unchanged for every w; and e(1) = 0 at all times, so w = 1 (and no
scale at all) is the plain network, whatever the embedding learned. A model folder keeps the embedding beside the
network (`SCALE_WEIGHTS`), its settings in priorlab.json under `scale_embedding` (`models.io`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from priorlab.checks import is_whole, number
from priorlab.errors import UserError

SCALE_WEIGHTS = "scale_embedding.safetensors"


def scale_features(s: Tensor, frequencies: int) -> Tensor:
    """Features (N, 1 + 2K) of s = w − 1 (N,): s, then sin(s·f_k) and cos(s·f_k) for K frequencies f_k geometric
    from 1/8 to 8 (periods from 50 down to 0.8 in w)."""
    f = torch.exp(torch.linspace(math.log(1 / 8), math.log(8), frequencies, device=s.device))  # (K,)
    arg = s.float()[:, None] * f[None, :]  # (N, K)
    return torch.cat([s.float()[:, None], arg.sin(), arg.cos()], dim=1)


def scale_rows(scale: Tensor | float, n: int, device: torch.device) -> Tensor:
    """A guidance scale (a number, a 0-d tensor or one per row) as a float32 tensor of n rows on `device`. A number
    is filled in on the device, not copied there: a copy from host memory would wait for the GPU at every step."""
    if not isinstance(scale, Tensor):
        return torch.full((n,), float(scale), device=device)
    w = scale.to(device=device, dtype=torch.float32)
    return w.expand(n) if w.ndim == 0 else w.reshape(n)


class ScaleEmbedding(nn.Module):
    """e(w), added to the label tables' outputs of the network it is attached to (module doc).

    Args:
        dim: the label tables' embedding width.
        max_scale: the largest w it was trained for (w is drawn from [1, max_scale]); recorded, and checked where a
            prior samples with it (`priorlab.priors.DistilledPrior`).
        hidden: width of its hidden layer; frequencies: K, the sinusoids of w − 1 it reads.
    """

    def __init__(self, dim: int, max_scale: float, hidden: int = 256, frequencies: int = 16):
        super().__init__()
        self.dim, self.max_scale, self.hidden, self.frequencies = dim, float(max_scale), hidden, frequencies
        self.inp = nn.Linear(1 + 2 * frequencies, hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.rows: Tensor | None = None  # e(w) of the pass under way, read by the hooks (`Denoiser.forward`)

    def forward(self, w: Tensor) -> Tensor:
        """e(w) (N, dim) of scales w (N,): h(w) − h(1), exactly 0 in rows where w = 1."""
        s = torch.cat([w.float() - 1, w.new_zeros(1, dtype=torch.float32)])  # h(1) computed in the same pass
        h = self.out(torch.nn.functional.silu(self.inp(scale_features(s, self.frequencies))))  # (N + 1, dim)
        return torch.where((w == 1)[:, None], 0.0, h[:-1] - h[-1:])

    def attach(self, tables: list[nn.Embedding]) -> None:
        """Add e(w) of the pass under way to each table's output. The hook is a bound method, so a deep copy of
        the model (EMA's average) hooks its own copy of the embedding."""
        for table in tables:
            table.register_forward_hook(self._add)

    def _add(self, table: nn.Module, args, out: Tensor) -> Tensor:
        return out if self.rows is None else out + self.rows.to(out.dtype)

    def settings(self) -> dict:
        """What priorlab.json records of it (`load_scale_embedding` builds it again from them)."""
        return {"dim": self.dim, "max_scale": self.max_scale, "hidden": self.hidden, "frequencies": self.frequencies}


def save_scale_embedding(embedding: ScaleEmbedding, folder: Path) -> dict:
    """Write the embedding's weights into a model folder; returns its priorlab.json entry."""
    save_file({k: v.detach().cpu().contiguous() for k, v in embedding.state_dict().items()}, folder / SCALE_WEIGHTS)
    return {"scale_embedding": embedding.settings()}


def load_scale_embedding(entry, folder: Path) -> ScaleEmbedding:
    """The embedding of a model folder from its priorlab.json entry and weights; a UserError naming the problem."""
    fix = "restore the model folder or train it again"
    keys = {"dim", "max_scale", "hidden", "frequencies"}
    if not isinstance(entry, dict) or set(entry) != keys:
        raise UserError(f"{folder}: priorlab.json's scale_embedding={entry!r} does not hold exactly "
                        f"{', '.join(sorted(keys))}; {fix}")  # fmt: skip
    if not all(is_whole(entry[k]) and entry[k] >= 1 for k in ("dim", "hidden", "frequencies")):
        raise UserError(f"{folder}: scale_embedding's dim, hidden and frequencies must be whole numbers ≥ 1; {fix}")
    number(entry["max_scale"], f"{folder}: scale_embedding.max_scale", 1.0)
    if not (folder / SCALE_WEIGHTS).exists():
        raise UserError(f"{folder} records a scale embedding but lacks {SCALE_WEIGHTS}; {fix}")
    embedding = ScaleEmbedding(**entry)
    try:
        embedding.load_state_dict(load_file(folder / SCALE_WEIGHTS))
    except Exception as err:  # truncated file, other shapes
        raise UserError(f"{folder / SCALE_WEIGHTS} could not be loaded ({type(err).__name__}: {err}); {fix}") from err
    return embedding


def export_note(denoiser) -> str:
    """The model card's line on a guidance-distilled model's export ("" for any other): the exported network is the
    plain one (w = 1); the scale embedding, hooked onto priorlab's wrapper rather than part of the diffusers network,
    stays in the priorlab folder."""
    embedding = getattr(denoiser, "scale_embedding", None)
    if embedding is None:
        return ""
    return (
        f"\n\nThis model was trained with guidance_distill up to w = {embedding.max_scale:g} (after DogFit): in its "
        "priorlab folder it gives the base-guided prediction in one pass (`prior=distilled`). This export holds "
        "the plain network (w = 1) only, without its scale embedding; guide it with classifier-free guidance or "
        "`prior=base`."
    )
