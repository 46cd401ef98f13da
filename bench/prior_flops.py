"""What a cheap prior costs in arithmetic: the parameters, forward multiply-adds and activation elements of each
model of bench/guided_sampling.py and of its cheap prior, counted on the CPU (torch's FLOP counter and forward
hooks, one sample).

    python bench/prior_flops.py            # writes bench/results/prior_flops.json

Set beside guided_sampling.py's times, the ratio tells whether a cheap prior's time is what its arithmetic
predicts: (cheap prior − conditional alone) ÷ (conditional alone) is the small network's time as a share of the
full one's, to compare with its share of the multiply-adds (the matrix work) and of the activation elements (the leaf
modules' outputs, a proxy for the memory-bound work).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from guided_sampling import all_models, lean_builders, small_builders  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def count(net: torch.nn.Module, shape: tuple[int, ...]) -> dict:
    """Parameters (millions), multiply-adds (GMAC) and activation elements (millions) of one forward pass of one
    sample. Activation elements: the outputs of every leaf module (convolutions, linear layers, normalisations,
    activations), each written once and read at least once; a proxy for the memory-bound work, which leaves out
    functional residual additions, interpolation and the attention's inner tensors."""
    x, t, y = torch.randn(1, *shape), torch.tensor([10]), torch.tensor([1])
    elements = []
    leaves = [m for m in net.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, o: elements.append(o.numel() if torch.is_tensor(o) else 0))
             for m in leaves]  # fmt: skip
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(x, t, y)
    for h in hooks:
        h.remove()
    return {"params_m": sum(p.numel() for p in net.parameters()) / 1e6, "gmac": counter.get_total_flops() / 2e9,
            "activations_m": sum(elements) / 1e6}  # fmt: skip


def main(smoke: bool = False) -> dict:
    small, lean = small_builders(smoke), lean_builders(smoke)
    out = {}
    for name, (build, shape, _) in all_models(smoke).items():
        full, cheap, slim = count(build(), shape), count(small[name](), shape), count(lean[name](), shape)
        out[name] = {"model": full, "cheap_prior": cheap, "gmac_ratio": cheap["gmac"] / full["gmac"],
                     "params_ratio": cheap["params_m"] / full["params_m"],
                     "activations_ratio": cheap["activations_m"] / full["activations_m"],
                     "cheap_prior_lean": slim | {f"{k}_ratio": slim[k] / full[k] for k in full}}  # fmt: skip
        print(f"{name}: cheap prior {cheap['params_m']:.2f}M / {full['params_m']:.2f}M parameters, "
              f"{cheap['gmac']:.3f} / {full['gmac']:.3f} GMAC ({out[name]['gmac_ratio']:.3f}), "
              f"{cheap['activations_m']:.2f}M / {full['activations_m']:.2f}M activation elements "
              f"({out[name]['activations_ratio']:.3f}) per sample")  # fmt: skip
    return out


if __name__ == "__main__":
    smoke = "--smoke" in sys.argv
    result = main(smoke)
    if not smoke:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "prior_flops.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {RESULTS / 'prior_flops.json'}")
