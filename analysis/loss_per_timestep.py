"""(d) At which noise levels is the fine-tune's unconditional branch worse than the base?

    python analysis/loss_per_timestep.py runs/dropout_vs_prior

writes runs/dropout_vs_prior/figures/d_loss_per_timestep.png
"""

import sys
from pathlib import Path

from priorlab.analysis import figures
from priorlab.analysis.results import load_results

study = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/dropout_vs_prior")
print(figures.loss_per_timestep(load_results(study), study / "figures" / "d_loss_per_timestep.png"))
