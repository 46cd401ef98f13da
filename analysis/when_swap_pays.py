"""(f) Does the swap help exactly where the base's unconditional denoising loss is the lower one (the sign rule),
and do prior=auto / prior=mix beat both fixed priors?

    python analysis/when_swap_pays.py runs/when_swap_pays [fd|nll]

prints the counts with 95% Wilson intervals and writes runs/when_swap_pays/figures/f_swap_vs_loss_ratio.png
"""

import sys
from pathlib import Path

from priorlab.analysis import figures, sign_rule
from priorlab.analysis.results import load_results
from priorlab.analysis.validity import study_metric

study = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/when_swap_pays")
frame = load_results(study)
metric = sys.argv[2] if len(sys.argv) > 2 else study_metric(frame)
points = sign_rule.swap_points(frame, metric)
overall, per_scale = sign_rule.sign_rule(points)
print(f"sign rule ({metric}), all scales: held at {overall}")
for w, p in per_scale.items():
    print(f"sign rule ({metric}), w={w}: held at {p}")
for prior in sign_rule.FITTED:
    c = sign_rule.fitted_vs_fixed(points, prior)
    if c is not None:
        print(
            f"prior={prior}: beats both at {c.beats_both}, ties the better at {c.ties_better}, "
            f"{metric}({prior}) - min(self, base) = {c.vs_better}"
        )
print(figures.swap_vs_loss_ratio(points, study / "figures" / "f_swap_vs_loss_ratio.png", metric))
