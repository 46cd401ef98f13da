"""The feature network: a small classifier trained on the data set; its penultimate layer serves FD.

Inception-based FID needs torchvision and downloaded weights, neither of which is available everywhere, so
the features come from a domain classifier trained here (`priorlab train-evaluator`). Inception and DINOv2
features are not implemented yet: `eval.features=inception|dinov2` is refused with an error that says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from priorlab import atomic
from priorlab.errors import UserError


class Classifier(nn.Module):
    """A CNN for (C, H, W) images or an MLP for vectors; `features` is the penultimate layer."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.width = width
        self.feature_dim = feature_dim
        if len(sample_shape) == 3:
            c = sample_shape[0]
            self.body = nn.Sequential(
                nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
                nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
                nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, feature_dim), nn.SiLU(),
            )  # fmt: skip
        else:
            self.body = nn.Sequential(
                nn.Linear(sample_shape[0], 4 * width), nn.SiLU(), nn.Linear(4 * width, feature_dim), nn.SiLU()
            )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def describe(self) -> dict:
        return {"sample_shape": list(self.sample_shape), "num_classes": self.num_classes, "width": self.width,
                "feature_dim": self.feature_dim}  # fmt: skip


@dataclass
class Evaluator:
    """A trained classifier with the features of the reference (real) data."""

    net: Classifier
    reference: Tensor  # (N, D) features of the real data
    reference_labels: Tensor  # (N,)
    accuracy: float

    @torch.no_grad()
    def embed(self, x: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
        """Features (N, D) and logits (N, K) of samples x."""
        device = next(self.net.parameters()).device
        feats, logits = [], []
        for chunk in x.split(batch_size):
            f = self.net.features(chunk.to(device).float())
            feats.append(f)
            logits.append(self.net.head(f))
        return torch.cat(feats), torch.cat(logits)


def fit_classifier(
    train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], num_classes: int, steps: int = 1500,
    batch_size: int = 128, lr: float = 2e-3, seed: int = 0, progress: bool = False, shift: int = 1,
) -> tuple[Classifier, float]:  # fmt: skip
    """Train the classifier and return it with its held-out accuracy.

    Augmentation: light Gaussian noise, and for images a random translation by up to `shift` pixels per sample
    (edges replicated). On 16-px MNIST (4,500 training images, 500 held out) the translation raised held-out
    accuracy from 0.978 to 0.988 at 1,500 steps: an evaluator that misreads fewer real digits misreads fewer
    generated ones, so the accuracy of generated samples measures the generator rather than the evaluator.
    """
    from priorlab.progress import progress_bar

    torch.manual_seed(seed)
    x, y = train
    net = Classifier(tuple(x.shape[1:]), num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in progress_bar(range(steps), desc="training evaluator", disable=not progress):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = translate(x[idx], shift, g) if x.dim() == 4 and shift > 0 else x[idx]
        xb = xb + 0.05 * torch.randn(xb.shape, generator=g)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(val[0]).argmax(1) == val[1]).double().mean())
    return net, acc


def translate(x: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Each image of x (N, C, H, W) moved by its own random offset in [-shift, shift]² (edges replicated)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, None, :, None]
    cols = (dx + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def save_evaluator(ev: Evaluator, path: str | Path, info: dict) -> Path:
    """Write weights, reference features and a JSON description; the JSON is written last."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ev.net.state_dict().items()}, path / "classifier.safetensors")
    save_file({"features": ev.reference.contiguous(), "labels": ev.reference_labels.contiguous()},
              path / "reference.safetensors")  # fmt: skip
    atomic.write_json(path / "evaluator.json", {**ev.net.describe(), "accuracy": ev.accuracy, **info}, indent=2)
    return path


def describe_evaluator(path: str | Path) -> dict | None:
    """The JSON description of the evaluator cached at `path`, or None when there is none."""
    desc = Path(path) / "evaluator.json"
    return json.loads(desc.read_text()) if desc.exists() else None


def load_evaluator(path: str | Path) -> Evaluator:
    """Load an evaluator written by `save_evaluator`; a missing one names the command that makes it."""
    path = Path(path)
    if not (path / "evaluator.json").exists():
        raise UserError(f"no evaluator at {path}; run `priorlab train-evaluator data=...` first")
    desc = json.loads((path / "evaluator.json").read_text())
    net = Classifier(tuple(desc["sample_shape"]), desc["num_classes"], desc["width"], desc["feature_dim"])
    net.load_state_dict(load_file(path / "classifier.safetensors"))
    ref = load_file(path / "reference.safetensors")
    return Evaluator(net.eval(), ref["features"], ref["labels"], desc["accuracy"])


def external_features(name: str) -> None:
    """Refuse feature networks other than the domain classifier: Inception and DINOv2 are not implemented yet."""
    if name in ("inception", "dinov2"):
        raise UserError(f"features={name} is not implemented yet, whatever weights are on disk; use features=domain "
                        "(the classifier of `priorlab train-evaluator`)")  # fmt: skip
    if name != "domain":
        raise UserError(f"features={name} is unknown; use features=domain (inception and dinov2 are not implemented "
                        "yet)")  # fmt: skip
