"""`priorlab study NAME`: the base(s), a Hydra multirun of fine-tunes per base, results, report; resumable.

An experiment file (experiments/NAME.yaml) lists, per preset, the overrides shared by every run, those of
the base and of the fine-tunes, and the sweep (cond_dropout × seed × any other key, e.g. trainer.max_steps).
A preset may list several `bases`, each with its own overrides (`common` for the base and its fine-tunes,
`base`, `finetune`): each base is trained once under base/<name>/ and its sweep runs under
finetune/base=<name>/<key>=<value>/.../p=<p>/seed=<s>/. Without `bases` there is one base, under base/. A base
given by `path` (a diffusers or priorlab model trained elsewhere) is fine-tuned as given and never trained.
`base_seeds: [b0, b1, ...]` trains each base once per seed (base/seed=<b>/, base/<name>/seed=<b>/) and starts the
fine-tune of seed s (the i-th of the sweep's seeds) from base seed b_(i mod B), so the seeds over which the report
draws its intervals replicate the base's training too. `validity:` sets the thresholds of the report's validity
checks (`priorlab.analysis.validity`). Running the same command again skips finished runs (done.json) and
resumes unfinished ones from their last checkpoint. With a DDP trainer and the basic launcher the fine-tunes run
one `priorlab train` per sweep point instead of one multirun (Lightning starts DDP processes by re-running the
command line, which must not hold -m). `jobs=N` (or a preset's `jobs:`) trains N runs at once, each its own
process logging to logs/<run>.log: the bases, then the fine-tunes (small models leave a large GPU mostly idle).
`launcher=slurm` submits every run as a SLURM job instead, each base's fine-tunes depending on it (`slurm`).

Modules: `spec` (the experiment file and its presets), `bases` (the bases and extra priors of a preset),
`compose` (their runs' configs), `layout` (the run folders, written and read), `schedule` (running the commands),
`slurm` (launcher=slurm), `settings` (the command line of `priorlab study`), `progress` (k of n fine-tunes, time
left), `run` (the study).
"""
