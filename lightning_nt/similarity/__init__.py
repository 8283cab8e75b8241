"""Representation similarity up to a network's symmetries: CKA, orthogonal Procrustes, intertwiner groups."""

from lightning_nt.similarity.core import (
    ACTIVATIONS,
    Activation,
    intertwiner_similarity,
    linear_cka,
    orthogonal_procrustes_similarity,
)

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "intertwiner_similarity",
    "linear_cka",
    "orthogonal_procrustes_similarity",
]
