"""Training: the Lightning module (`module`: noise-prediction loss with conditioning dropout, EMA), its callbacks
(`callbacks`: saving the denoiser, throughput, checkpoints), resuming a run (`resume`), DDP (`ddp`), Lightning's
private API that priorlab pins in one place (`lightning_private`) and CPU threads (`threads`). The command that
builds and fits them is `priorlab.commands.train`."""
