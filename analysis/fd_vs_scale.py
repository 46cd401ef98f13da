"""(a) How does FD depend on the guidance scale, per dropout rate,
with prior=self vs prior=base?

    python analysis/fd_vs_scale.py runs/dropout_vs_prior

writes runs/dropout_vs_prior/figures/a_fd_vs_scale.png
"""

import sys
from pathlib import Path

from priorlab.analysis import figures
from priorlab.analysis.results import load_results

study = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/dropout_vs_prior")
print(figures.fd_vs_scale(load_results(study), study / "figures" / "a_fd_vs_scale.png"))
