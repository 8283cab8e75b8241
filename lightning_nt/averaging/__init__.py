"""Iterate averaging (Gadam / SWA tail averages and EMAs): a plain-PyTorch core and a Lightning callback."""

from lightning_nt.averaging.callback import IterateAveraging
from lightning_nt.averaging.core import (
    IterateAverage,
    decay_per_update,
    load_averaged_weights,
    recompute_batchnorm,
    save_averaged_weights,
)

__all__ = [
    "IterateAverage",
    "IterateAveraging",
    "decay_per_update",
    "load_averaged_weights",
    "recompute_batchnorm",
    "save_averaged_weights",
]
