"""`python -m priorlab`: the same as the `priorlab` command."""

from priorlab.cli import main

main()
