"""Where does the base prior help, where does it hurt, and where is the difference no finding?

Paired over seeds: the swap's benefit per condition and guidance scale, mean and 95% CI, judged by the report's
rule of what counts as a finding (the study's primary_scale from study.json, Holm's correction elsewhere).

    python analysis/where_swap_helps.py runs/dropout_vs_prior [fd|kid|nll|accuracy]
"""

import sys
from pathlib import Path

from priorlab.analysis.findings import statements
from priorlab.analysis.results import load_results
from priorlab.study.layout import study_record

study = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/dropout_vs_prior")
metric = sys.argv[2] if len(sys.argv) > 2 else "fd"
meta = study_record(study / "study.json") if (study / "study.json").exists() else {}
for line in statements(load_results(study), metric, meta.get("primary_scale")):
    print(line)
