"""A class-conditional MLP denoiser for 2-D data, in diffusers' model format (save_pretrained works)."""

from __future__ import annotations

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn


class MLPDenoiser(ModelMixin, ConfigMixin):
    """Residual MLP over (N, dim) inputs; time and class embeddings are added to every block.

    Args:
        dim: data dimension.
        num_class_embeds: rows of the class embedding table (classes plus the null row).
        hidden: width of the hidden layers.
        depth: number of residual blocks.
    """

    @register_to_config
    def __init__(self, dim: int = 2, num_class_embeds: int = 9, hidden: int = 256, depth: int = 4):
        super().__init__()
        self.time_proj = Timesteps(hidden, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(hidden, hidden)
        self.class_embedding = nn.Embedding(num_class_embeds, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, sample: Tensor, timestep: Tensor, class_labels: Tensor, return_dict: bool = False):
        t = timestep.expand(len(sample)) if timestep.ndim == 0 else timestep
        emb = self.time_embedding(self.time_proj(t).to(sample.dtype)) + self.class_embedding(class_labels)  # (N, H)
        h = self.inp(sample)
        for block in self.blocks:
            h = h + block(h + emb)
        out = self.out(h)
        return (out,) if not return_dict else {"sample": out}
