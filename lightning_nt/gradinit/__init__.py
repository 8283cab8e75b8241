"""GradInit (Zhu et al. 2021): learned per-tensor initial scales, as a plain-PyTorch search and a Lightning callback."""

from lightning_nt.common.substitution import substituted
from lightning_nt.gradinit.callback import GradInit
from lightning_nt.gradinit.core import GradInitResult, ScaleAdam, apply_scales, gradinit, search_mode

__all__ = ["GradInit", "GradInitResult", "ScaleAdam", "apply_scales", "gradinit", "search_mode", "substituted"]
