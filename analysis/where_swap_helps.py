"""Where does the base prior help, where does it hurt, and where is the difference within noise?

Paired over seeds: FD(prior=self) − FD(prior=base) per dropout rate and guidance scale, mean and 95% CI.

    python analysis/where_swap_helps.py runs/dropout_vs_prior [fd|kid|nll|accuracy]
"""

import sys
from pathlib import Path

from priorlab.analysis.report import statements
from priorlab.analysis.results import load_results

study = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/dropout_vs_prior")
metric = sys.argv[2] if len(sys.argv) > 2 else "fd"
for line in statements(load_results(study), metric):
    print(line)
