"""lightning_nt: results from the theory of neural-network training, as PyTorch Lightning plugins."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
