"""lightning_nt: results from the theory of neural-network training, as PyTorch Lightning plugins."""

from lightning_nt.averaging import IterateAveraging
from lightning_nt.compression import CompressionBoundReporter, SubspaceTraining
from lightning_nt.gradinit import GradInit
from lightning_nt.laziness import LazinessMonitor
from lightning_nt.privacy import DPDDPStrategy, DPStrategy, register_strategies
from lightning_nt.sharpness import SharpnessMonitor
from lightning_nt.similarity import RepresentationSimilarity
from lightning_nt.stats import GradientSignalTest

__version__ = "0.1.0.dev0"

register_strategies()

__all__ = [
    "CompressionBoundReporter",
    "DPDDPStrategy",
    "DPStrategy",
    "GradInit",
    "GradientSignalTest",
    "IterateAveraging",
    "LazinessMonitor",
    "RepresentationSimilarity",
    "SharpnessMonitor",
    "SubspaceTraining",
    "__version__",
]
