"""The implementations of the `priorlab` commands that train and evaluate (`priorlab train`, `priorlab evaluate`,
`priorlab train-evaluator`); the library they use lives beside this package."""
