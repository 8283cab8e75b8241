"""Compression-based generalization bounds: a certified bound on the decoded model, Arora et al.'s noise
stability and capacity measures beside it, and training in a random subspace to make the bound tight."""

from lightning_nt.compression.bounds import kl_bernoulli, kl_inverse, occam_hoeffding_bound, occam_kl_bound
from lightning_nt.compression.callback import CompressionBoundReporter, SubspaceTraining
from lightning_nt.compression.capacity import capacity_measures
from lightning_nt.compression.certificate import Certificate, certify
from lightning_nt.compression.coding import QuantizationConfig, configuration_grid, decode, encode, quantize
from lightning_nt.compression.stability import NoiseStability, noise_stability
from lightning_nt.compression.subspace import RandomSubspace, find_subspace, to_subspace

__all__ = [
    "Certificate",
    "CompressionBoundReporter",
    "NoiseStability",
    "QuantizationConfig",
    "RandomSubspace",
    "SubspaceTraining",
    "capacity_measures",
    "certify",
    "configuration_grid",
    "decode",
    "encode",
    "find_subspace",
    "kl_bernoulli",
    "kl_inverse",
    "noise_stability",
    "occam_hoeffding_bound",
    "occam_kl_bound",
    "quantize",
    "to_subspace",
]
