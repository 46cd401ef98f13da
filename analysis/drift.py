"""(c) How far does the unconditional branch drift from the base during fine-tuning,
per dropout rate?

    python analysis/drift.py runs/dropout_vs_prior

writes runs/dropout_vs_prior/figures/c_drift.png
"""

import sys
from pathlib import Path

from priorlab.analysis import figures
from priorlab.analysis.results import load_results

study = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/dropout_vs_prior")
print(figures.drift(load_results(study), study / "figures" / "c_drift.png"))
