"""The denoiser wrapper: a diffusers network plus an explicit null class.

Every network priorlab trains is class-conditional. Its label tables have `num_classes + 1` rows and the null
class (the unconditional condition ∅) is the row `null_class`, recorded in the config and in the saved model
rather than hard-coded. A user's own unconditional diffusers UNet, loaded as a base (`models.pretrained`), has no
label table: it is wrapped with `num_classes=0, null_class=0` and answers ∅ whatever the labels. Conditioning
dropout is a training choice (`drop_labels`, used by DiffusionModule); `force_drop` asks the network for its
unconditional branch at evaluation. A network with a learned variance (`out_channels = 2 × in_channels`, DiT's
learn_sigma) is used through its first half, the eps (or v, x0) prediction, as diffusers' DiTPipeline samples it:
guidance combines that half only, the variance half is dropped, and the training loss sees that half only (the
variance outputs get no gradient and keep the base's values).
A guidance-distilled fine-tune also takes the guidance scale w (`scale`), through a scale embedding added to its
label tables' outputs (`models.scale`); a model without one refuses a scale.
A text-conditioned UNet (`models.text.TextDenoiser`) is this wrapper with
caption indices for labels: its null class is the row of the empty prompt in its table of prompt embeddings.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import Tensor, nn

from priorlab.errors import UserError
from priorlab.models.mlp import MLPDenoiser
from priorlab.models.scale import ScaleEmbedding, save_scale_embedding, scale_rows

NETWORK_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, DiTTransformer2DModel, MLPDenoiser, UNet2DConditionModel)}
# The config key of each network class that holds its number of classes; it may differ between a base
# and its fine-tune, every other key must match.
CLASS_COUNT_KEYS = {
    "UNet2DModel": "num_class_embeds",
    "DiTTransformer2DModel": "num_embeds_ada_norm",
    "MLPDenoiser": "num_class_embeds",
    "UNet2DConditionModel": "num_class_embeds",  # text models: conditioned on prompts (`models.text`), not classes
}


def drop_labels(labels: Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by `null_class` independently with probability p (conditioning dropout)."""
    if p <= 0:
        return labels
    if p >= 1:
        return torch.full_like(labels, null_class)
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < p  # (N,)
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def label_tables(net: nn.Module) -> list[nn.Embedding]:
    """The class-embedding tables of a network (one for UNet and MLP, one per block for DiT; none for an
    unconditional UNet)."""
    if isinstance(net, UNet2DModel | MLPDenoiser):
        return [net.class_embedding] if isinstance(net.class_embedding, nn.Embedding) else []
    return [m.embedding_table for m in net.modules() if isinstance(m, LabelEmbedding)]


class Denoiser(nn.Module):
    """A class-conditional network with an explicit null class.

    Args:
        net: a diffusers UNet2DModel, DiTTransformer2DModel or MLPDenoiser whose label tables have
            num_classes + 1 rows, or an unconditional UNet2DModel (no label table, num_classes 0).
        num_classes: number of real classes.
        null_class: index of the null (unconditional) row.
        prediction_type: "epsilon", "v_prediction" or "sample".
    """

    def __init__(self, net: nn.Module, num_classes: int, null_class: int, prediction_type: str = "epsilon"):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.null_class = null_class
        self.prediction_type = prediction_type
        for module in net.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0  # diffusers' DiT drops labels itself in train(); dropout is ours
        tables = label_tables(net)
        self.conditional = bool(tables)  # False: an unconditional network, every label is ∅
        inputs, outputs = getattr(net.config, "in_channels", None), getattr(net.config, "out_channels", None)
        self.learned_sigma = inputs is not None and outputs == 2 * inputs  # (N, 2C, H, W): eps, then variance
        for table in tables:
            if table.num_embeddings != num_classes + 1:
                raise ValueError(f"label table has {table.num_embeddings} rows, expected {num_classes + 1}")
        self.scale_embedding: ScaleEmbedding | None = None  # w as an input (`add_scale_embedding`)

    def add_scale_embedding(self, embedding: ScaleEmbedding) -> None:
        """Take the guidance scale as an input: `embedding`'s e(w) is added to every label table's output
        (`models.scale`); its width must be the tables' (`label_width`)."""
        if self.label_width != embedding.dim:
            raise ValueError(f"a scale embedding of width {embedding.dim} for label tables of width {self.label_width}")
        self.scale_embedding = embedding
        embedding.attach(label_tables(self.net))

    @property
    def label_width(self) -> int | None:
        """The width of the label tables' rows (None: no tables, an unconditional or a text model)."""
        widths = {table.embedding_dim for table in label_tables(self.net)}
        return widths.pop() if len(widths) == 1 else None

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, force_drop: Tensor | bool | None = None,
                scale: Tensor | float | None = None) -> Tensor:  # fmt: skip
        """The network's prediction at (x_t, t) for `labels`; rows where force_drop is True get ∅.

        Args:
            x: noisy samples (N, ...).
            t: integer timesteps (N,).
            labels: class indices (N,), `null_class` allowed.
            force_drop: True for the unconditional branch of every row, or a boolean mask (N,).
            scale: the guidance scale w as an input, one for every row or one per row (N,), for a model with a
                scale embedding (a guidance-distilled fine-tune); None: the plain prediction, as w = 1 gives.
        """
        if scale is not None:
            if self.scale_embedding is None:
                raise UserError("this model was not trained to take the guidance scale as an input (train it with "
                                "guidance_distill.max_scale=W); guide it with prior=self or prior=base")  # fmt: skip
            self.scale_embedding.rows = self.scale_embedding(scale_rows(scale, len(x), x.device))  # (N, D)
        try:
            out = self._net(x, t, labels, force_drop)
        finally:
            if self.scale_embedding is not None:
                self.scale_embedding.rows = None
        return out[:, : x.shape[1]] if self.learned_sigma else out  # the variance half dropped

    def _net(self, x: Tensor, t: Tensor, labels: Tensor, force_drop: Tensor | bool | None) -> Tensor:
        if not self.conditional:
            return self.net(x, t, return_dict=False)[0]
        if force_drop is not None:
            drop = torch.as_tensor(force_drop, device=labels.device).expand(labels.shape)
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.net(x, t, class_labels=labels, return_dict=False)[0]

    def save_extra(self, folder) -> dict:
        """Write what the model needs beside its network into `folder`; returns entries for priorlab.json."""
        return {} if self.scale_embedding is None else save_scale_embedding(self.scale_embedding, folder)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The input shape of one sample, read from the network's config."""
        c = self.net.config
        if isinstance(self.net, MLPDenoiser):
            return (c.dim,)
        size = c.sample_size
        return (c.in_channels, *size) if isinstance(size, list | tuple) else (c.in_channels, size, size)

    @property
    def class_name(self) -> str:
        return type(self.net).__name__
