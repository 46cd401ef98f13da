"""(b) Does the best FD over guidance scales depend on the dropout rate, for each prior?

    python analysis/best_fd_vs_dropout.py runs/dropout_vs_prior

writes runs/dropout_vs_prior/figures/b_best_fd_vs_dropout.png
"""

import sys
from pathlib import Path

from priorlab.analysis import figures
from priorlab.analysis.results import load_results

study = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/dropout_vs_prior")
print(figures.best_fd_vs_dropout(load_results(study), study / "figures" / "b_best_fd_vs_dropout.png"))
