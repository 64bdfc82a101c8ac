"""Channel pruning: sparse training (network slimming) and structured pruning of any traceable model."""

from micronet.compression.pruning.sparsity import BatchNormL1

__all__ = ["BatchNormL1"]
