"""Representation similarity up to a network's symmetries: CKA, orthogonal Procrustes, intertwiner groups."""

from lightning_nt.similarity.callback import ACTIVATION_MODULES, RepresentationSimilarity
from lightning_nt.similarity.core import (
    ACTIVATIONS,
    METRICS,
    Activation,
    PreparedFeatures,
    SimilarityMetric,
    cka_matrix,
    intertwiner_similarity,
    linear_cka,
    orthogonal_procrustes_similarity,
    similarities,
)

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_MODULES",
    "METRICS",
    "Activation",
    "PreparedFeatures",
    "RepresentationSimilarity",
    "SimilarityMetric",
    "cka_matrix",
    "intertwiner_similarity",
    "linear_cka",
    "orthogonal_procrustes_similarity",
    "similarities",
]
