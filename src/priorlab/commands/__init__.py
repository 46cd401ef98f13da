"""The `priorlab` commands, one module each with its `main(cfg)` (`priorlab.cli` imports the one it runs):
train, train_evaluator, evaluate, study, report, dashboard, sample, export, data. Each checks its settings and
calls the library beside this package."""
