"""Small, download-free tasks for examples, tests and benchmarks."""

from lightning_nt.demos.digits import DigitsCNN, DigitsDataModule, load_digits_tensors
from lightning_nt.demos.edge_of_stability import FullBatch, FullBatchMLP

__all__ = ["DigitsCNN", "DigitsDataModule", "FullBatch", "FullBatchMLP", "load_digits_tensors"]
