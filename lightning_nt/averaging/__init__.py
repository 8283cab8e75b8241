"""Iterate averaging (Gadam / SWA tail averages and EMAs): a plain-PyTorch core and a Lightning callback."""

from lightning_nt.averaging.callback import IterateAveraging
from lightning_nt.averaging.core import (
    RunningWeightAverage,
    decay_per_update,
    load_averaged_weights,
    recompute_batchnorm,
    save_averaged_weights,
)
from lightning_nt.common.validation import renamed_attributes

__all__ = [
    "IterateAveraging",
    "RunningWeightAverage",
    "decay_per_update",
    "load_averaged_weights",
    "recompute_batchnorm",
    "save_averaged_weights",
]

__getattr__ = renamed_attributes(globals(), IterateAverage="RunningWeightAverage")  # the 0.1 name, deprecated
