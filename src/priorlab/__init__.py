"""priorlab: the unconditional prior in classifier-free-guided diffusion models."""

__version__ = "0.1.0"
