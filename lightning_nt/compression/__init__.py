"""Compression-based generalization bounds (work in progress: only the certified Occam bounds so far)."""

from lightning_nt.compression.bounds import kl_bernoulli, kl_inverse, occam_hoeffding_bound, occam_kl_bound

__all__ = ["kl_bernoulli", "kl_inverse", "occam_hoeffding_bound", "occam_kl_bound"]
