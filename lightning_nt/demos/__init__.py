"""Small, download-free tasks for examples, tests and benchmarks."""

from lightning_nt.demos.digits import DigitsCNN, DigitsDataModule, load_digits_tensors

__all__ = ["DigitsCNN", "DigitsDataModule", "load_digits_tensors"]
