"""Similarity of two representations of the same examples, up to a group of maps between them.

Each measure takes feature matrices ``x: [n, p]`` and ``y: [n, q]`` whose rows are the same ``n`` examples
in the same order, centres every feature (column), works in float64 on the inputs' device, and returns a
Python float that is 1 exactly when ``y`` is ``x`` transformed by an element of the measure's group. CKA and
orthogonal Procrustes lie in ``[0, 1]`` (debiased CKA can dip slightly below 0); the intertwiner similarity in
``[-1, 1]`` (for the ReLU, GELU and sigmoid groups, a sum of matched inner products that can all be negative:
-1 for one unit and ``y = -x``):

- :func:`linear_cka` and :func:`orthogonal_procrustes_similarity`: all rotations and reflections times a
  global scale (Kornblith et al. 2019; Williams et al. 2021; Ding et al. 2021).
- :func:`intertwiner_similarity`: the intertwiner group of a nonlinearity, the maps of a layer's units that
  the network itself can undo in the next layer (Godfrey et al. 2022): ReLU (and LeakyReLU) permutations times
  positive per-unit scalings; tanh (and a Hardtanh to ``[-a, a]``) signed permutations; GELU, sigmoid and ReLU6
  permutations; the identity every invertible map.

A feature that is constant over the examples (a dead ReLU unit) carries no information and is set to zero
after centring; a representation with no variance at all has similarity 0 with anything. An input that holds
NaN or inf gives NaN. For a convolutional layer, pass its output flattened per example (``[n, C*H*W]``) for
the rotation-invariant measures; for :func:`intertwiner_similarity` pass ``[n*H*W, C]`` (channels last, every
position an example), since the intertwiner group of a convolution permutes and scales channels, the same map
at every position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_nt.common.validation import check_choice, checked_arguments

__all__ = [
    "ACTIVATIONS",
    "METRICS",
    "Activation",
    "PreparedFeatures",
    "SimilarityMetric",
    "cka_matrix",
    "intertwiner_similarity",
    "linear_cka",
    "orthogonal_procrustes_similarity",
    "similarities",
]

Activation = Literal["relu", "tanh", "gelu", "sigmoid", "identity"]
"""A nonlinearity whose intertwiner group :func:`intertwiner_similarity` aligns over."""

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "gelu", "sigmoid", "identity")

SimilarityMetric = Literal["cka", "cka_debiased", "intertwiner", "orthogonal_procrustes"]
"""A measure :func:`similarities` computes."""

METRICS: tuple[str, ...] = ("cka", "cka_debiased", "intertwiner", "orthogonal_procrustes")

_DEAD = 1e-10  # a feature whose centred norm is below this share of its raw norm is constant up to rounding
_RANK = 1e-12  # directions with less variance than this share of the largest are outside the numerical rank


def linear_cka(x: Tensor, y: Tensor, debiased: bool = False) -> float:
    """Linear centred kernel alignment (Kornblith et al. 2019) between ``x: [n, p]`` and ``y: [n, q]``.

    ``CKA = HSIC(x, y) / sqrt(HSIC(x, x) HSIC(y, y))`` with the linear kernel on centred features, i.e.
    ``||xᵀy||²_F / (||xᵀx||_F ||yᵀy||_F)``. ``debiased=True`` uses the unbiased HSIC estimator (Song et al.
    2012) in every term, which removes CKA's upward bias when features outnumber examples (needs ``n >= 4``).
    Invariant to rotations, reflections and a global scale of either input; symmetric.

    Examples:
        >>> x = torch.randn(100, 10, generator=torch.Generator().manual_seed(0))
        >>> q, _ = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(1)))
        >>> round(linear_cka(x, 3 * x @ q), 6)
        1.0
    """
    metric = "cka_debiased" if debiased else "cka"
    return similarities(x, y, (metric,))[metric]


def orthogonal_procrustes_similarity(x: Tensor, y: Tensor) -> float:
    """``max_Q <x, y Q>`` over orthogonal ``Q``, with ``x`` and ``y`` centred and of unit Frobenius norm.

    That is the nuclear norm of ``xᵀy``, ``1 - d²/2`` for the orthogonal Procrustes distance ``d`` (Ding et
    al. 2021; Williams et al. 2021): 1 exactly when ``y = c x Q`` for an orthogonal ``Q`` and ``c > 0``.
    Symmetric; a zero-padded feature changes nothing, so ``p`` and ``q`` may differ.

    Examples:
        >>> x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        >>> round(orthogonal_procrustes_similarity(x, -2 * x.flip(1)), 6)
        1.0
    """
    return similarities(x, y, ("orthogonal_procrustes",))["orthogonal_procrustes"]


def intertwiner_similarity(x: Tensor, y: Tensor, activation: Activation = "relu") -> float:
    """The best alignment of ``y`` to ``x`` over the intertwiner group of ``activation`` (Godfrey et al. 2022).

    Both centred; then, by group:

    - ``"relu"`` (permutations x positive per-unit scalings): every unit scaled to unit norm, which removes the
      scalings; the value is ``max_P sum_i corr(x_i, y_P(i)) / sqrt(p_x p_y)`` over permutations ``P`` (Hungarian
      assignment, exact), with ``p_x``, ``p_y`` the live (non-constant) units.
    - ``"tanh"`` (signed permutations), ``"gelu"`` and ``"sigmoid"`` (permutations): ``x`` and ``y`` scaled to unit
      Frobenius norm, and ``max_P <x, y P>`` over (signed) permutations, the orthogonal Procrustes similarity
      with ``Q`` restricted to the group.
    - ``"identity"`` (every invertible map): the mean canonical correlation, the sum of the canonical
      correlations over the larger of the two ranks, so that 1 means equal column spaces.

    1 means "equal up to the group". The value lies in ``[-1, 1]``: for ReLU, GELU and sigmoid it is negative
    when the best matched units are anti-correlated (-1 for one unit and ``y = -x``); for tanh (signs are in the
    group) and the identity it is in ``[0, 1]``. It is at most :func:`orthogonal_procrustes_similarity` for the
    permutation groups, and the gap is the part of the similarity that needs maps the network can't make.
    The permutation groups need ``p == q``. Symmetric in ``x`` and ``y``.

    Examples:
        >>> x = torch.rand(200, 6, generator=torch.Generator().manual_seed(0))
        >>> y = x[:, [3, 1, 0, 5, 4, 2]] * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 7.0])
        >>> round(intertwiner_similarity(x, y, "relu"), 6), round(intertwiner_similarity(x, y, "gelu"), 2)
        (1.0, 0.74)
    """
    return similarities(x, y, ("intertwiner",), activation)["intertwiner"]


def similarities(
    x: Tensor | PreparedFeatures,
    y: Tensor | PreparedFeatures,
    metrics: Sequence[SimilarityMetric] = ("cka", "intertwiner", "orthogonal_procrustes"),
    activation: Activation = "relu",
) -> dict[str, float]:
    """Several measures of one pair at the cost of preparing (converting, checking, centring) it once.

    ``metrics`` among ``"cka"`` (:func:`linear_cka`), ``"cka_debiased"``, ``"orthogonal_procrustes"`` and
    ``"intertwiner"`` (:func:`intertwiner_similarity` for ``activation``). Either input may be a
    :class:`PreparedFeatures`, prepared once for many comparisons (a fixed reference); the values are the same.

    Examples:
        >>> x = torch.randn(100, 5, generator=torch.Generator().manual_seed(0))
        >>> {name: round(value, 6) for name, value in similarities(x, 2 * x).items()}
        {'cka': 1.0, 'intertwiner': 1.0, 'orthogonal_procrustes': 1.0}
    """
    for metric in metrics:
        check_choice("metrics", metric, METRICS)
    check_choice("activation", activation, ACTIVATIONS)
    x, y = _prepared_pair(x, y, minimum_examples=4 if "cka_debiased" in metrics else 2)
    if "intertwiner" in metrics and activation != "identity" and x.shape[1] != y.shape[1]:
        raise ValueError(
            f"The {activation!r} intertwiner group permutes units, so `x` and `y` need the same number of "
            f"features; got {x.shape[1]} and {y.shape[1]}. Compare layers of equal width, or use "
            "activation='identity' (mean canonical correlation)."
        )
    if x.centred is None or y.centred is None:
        return dict.fromkeys(metrics, math.nan)
    moments = _Moments.of(x, y, units="intertwiner" in metrics, rows="cka_debiased" in metrics)
    measures = {
        "cka": lambda: _cka(moments, debiased=False),
        "cka_debiased": lambda: _cka(moments, debiased=True),
        "orthogonal_procrustes": lambda: _procrustes(moments),
        "intertwiner": lambda: _intertwiner(moments, activation),
    }
    return {metric: measures[metric]() for metric in metrics}


class PreparedFeatures:
    """Features ``[n, p]`` prepared once for :func:`similarities`: a centred float64 copy and its Gram matrix.

    Comparing many representations with one fixed reference (a network's state at initialisation, another
    seed) converts and centres the reference, and multiplies out its Gram matrix, once instead of at every
    comparison. The values are those of the plain tensor. Constant features are zeroed as :func:`similarities`
    does; features holding NaN or inf have ``centred`` None and compare as NaN. The copy lives on the features'
    device (``similarities`` moves it to the other input's device if they differ).

    Args:
        features: ``[n, p]``, ``n`` examples (rows) of ``p`` features, any floating dtype.

    Examples:
        >>> generator = torch.Generator().manual_seed(0)
        >>> reference = PreparedFeatures(torch.randn(100, 5, generator=generator))
        >>> later = [torch.randn(100, 5, generator=generator) for _ in range(3)]
        >>> [similarities(x, reference) == similarities(x, reference.features) for x in later]
        [True, True, True]
    """

    @checked_arguments()
    def __init__(self, features: Tensor) -> None:
        _check_matrix("features", features)
        self.features = features
        self.shape = features.shape
        self.centred = _prepared(features, features.device)
        self._forms: dict[bool, tuple[Tensor, Tensor]] = {}
        self._rows: Tensor | None = None

    def form(self, units: bool) -> tuple[Tensor, Tensor]:
        """``(matrix, matrixᵀ matrix)``: the centred features, or with ``units=False`` (only the examples'
        Gram matrix matters) ``[n, n]`` coordinates with the same ``x xᵀ`` when features outnumber examples."""
        assert self.centred is not None
        if units not in self._forms:
            matrix = self.centred if units else _compact(self.centred)
            self._forms[units] = (matrix, matrix.T @ matrix)
        return self._forms[units]

    def row_norms(self) -> Tensor:
        """Every example's squared norm (after centring), which the unbiased HSIC estimator needs."""
        assert self.centred is not None
        if self._rows is None:
            self._rows = self.centred.square().sum(dim=1)
        return self._rows

    def to(self, device: torch.device) -> PreparedFeatures:
        """Prepared on ``device`` (itself if already there)."""
        return self if self.features.device == device else PreparedFeatures(self.features.to(device))


def cka_matrix(features: Sequence[Tensor]) -> Tensor:
    """Linear CKA between every two representations ``[n, ...]`` (flattened per example; ``[n]`` is one feature) of
    the same examples.

    Each centred Gram matrix is formed once, so ``k`` representations cost ``k`` Gram matrices rather than
    ``k²`` CKA computations; the result is a float64 ``[k, k]`` matrix on the first one's device. A
    representation with no variance has CKA 0 with everything (its diagonal too), one with NaN or inf NaN.

    Examples:
        >>> x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(cka_matrix([x, 2 * x, x.square()]).diagonal(), torch.ones(3, dtype=torch.float64))
        True
    """
    size, device = features[0].shape[0], features[0].device
    grams = []
    for index, value in enumerate(features):
        if value.ndim < 1 or value.shape[0] != size:
            raise ValueError(f"`features[{index}]` must hold the {size} examples of `features[0]` (rows).")
        centred = _prepared(value.reshape(size, -1), device)
        nan = torch.full((size, size), math.nan, dtype=torch.float64, device=device)
        grams.append(centred @ centred.T if centred is not None else nan)
    stacked = torch.stack([gram.flatten() for gram in grams])
    inner = stacked @ stacked.T
    norms = inner.diagonal().sqrt()
    scale = torch.outer(norms, norms)
    return torch.where(scale == 0, 0.0, inner / scale)


class _Moments(NamedTuple):
    """Everything the measures read from a centred pair: its Gram blocks, row norms and number of examples."""

    xx: Tensor
    yy: Tensor
    xy: Tensor
    rows_x: Tensor | None
    rows_y: Tensor | None
    n: int

    @classmethod
    def of(cls, x: PreparedFeatures, y: PreparedFeatures, units: bool, rows: bool) -> _Moments:
        """``units=False`` allows replacing a wide matrix by ``[n, n]`` coordinates with the same ``x xᵀ``."""
        (matrix_x, xx), (matrix_y, yy) = x.form(units), y.form(units)
        rows_x, rows_y = (x.row_norms(), y.row_norms()) if rows else (None, None)
        return cls(xx, yy, matrix_x.T @ matrix_y, rows_x, rows_y, x.shape[0])


def _cka(moments: _Moments, debiased: bool) -> float:
    xx, yy = _hsic(moments, "xx", debiased), _hsic(moments, "yy", debiased)
    if xx <= 0 or yy <= 0:
        return 0.0
    return _hsic(moments, "xy", debiased) / math.sqrt(xx * yy)


def _hsic(moments: _Moments, block: str, debiased: bool) -> float:
    """``||aᵀb||²_F``, or the unbiased estimator's numerator (Song et al. 2012) in Kornblith et al.'s form."""
    value = float(getattr(moments, block).square().sum())
    if not debiased:
        return value
    rows_a = moments.rows_y if block == "yy" else moments.rows_x
    rows_b = moments.rows_x if block == "xx" else moments.rows_y
    assert rows_a is not None and rows_b is not None
    n = moments.n
    return value - n / (n - 2) * float(rows_a @ rows_b) + float(rows_a.sum() * rows_b.sum()) / ((n - 1) * (n - 2))


def _procrustes(moments: _Moments) -> float:
    scale = float(moments.xx.trace() * moments.yy.trace())
    if scale <= 0:
        return 0.0
    return float(torch.linalg.svdvals(moments.xy).sum()) / math.sqrt(scale)


def _intertwiner(moments: _Moments, activation: str) -> float:
    if activation == "identity":
        return _mean_canonical_correlation(moments)
    if activation == "relu":  # unit norms removed: correlations, over the live units
        norms_x, norms_y = moments.xx.diagonal().sqrt(), moments.yy.diagonal().sqrt()
        live = float((norms_x > 0).sum() * (norms_y > 0).sum())
        scale = torch.outer(_nonzero(norms_x), _nonzero(norms_y)) * math.sqrt(live)
    else:
        live = float(moments.xx.trace() * moments.yy.trace())
        scale = torch.tensor(math.sqrt(live), dtype=moments.xy.dtype, device=moments.xy.device)
    if live <= 0:
        return 0.0
    scores = moments.xy / scale
    return _best_assignment(scores.abs() if activation == "tanh" else scores)


def _nonzero(norms: Tensor) -> Tensor:
    """Dead units' zero norms replaced by 1: their inner products are exactly 0 and stay 0."""
    return torch.where(norms > 0, norms, 1.0)


def _best_assignment(scores: Tensor) -> float:
    from scipy.optimize import linear_sum_assignment

    scores = scores.cpu()
    rows, columns = linear_sum_assignment(scores.numpy(), maximize=True)
    return float(scores[rows, columns].sum())


def _mean_canonical_correlation(moments: _Moments) -> float:
    whiten_x, whiten_y = _whitener(moments.xx), _whitener(moments.yy)
    rank = max(whiten_x.shape[1], whiten_y.shape[1])
    if whiten_x.shape[1] == 0 or whiten_y.shape[1] == 0:
        return 0.0
    correlations = torch.linalg.svdvals(whiten_x.T @ moments.xy @ whiten_y).clamp(max=1.0)
    return float(correlations.sum()) / rank


def _whitener(gram: Tensor) -> Tensor:
    """``W`` with ``Wᵀ gram W = I`` on the directions whose variance exceeds 1e-12 of the largest (the rank)."""
    values, vectors = torch.linalg.eigh(gram)
    if values.numel() == 0 or values[-1] <= 0:
        return vectors[:, :0]
    keep = values > values[-1] * _RANK
    return vectors[:, keep] / values[keep].sqrt()


def _prepared_pair(
    x: Tensor | PreparedFeatures, y: Tensor | PreparedFeatures, minimum_examples: int
) -> tuple[PreparedFeatures, PreparedFeatures]:
    """Both checked and prepared (centred float64, constant features zeroed), ``y`` on ``x``'s device."""
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, PreparedFeatures):
            _check_matrix(name, value)
    if x.shape[0] != y.shape[0] or x.shape[0] < minimum_examples:
        raise ValueError(
            f"`x` and `y` must hold the same examples (rows), at least {minimum_examples}; "
            f"got {x.shape[0]} and {y.shape[0]}."
        )
    x = x if isinstance(x, PreparedFeatures) else PreparedFeatures(x)
    device = x.features.device
    return x, y.to(device) if isinstance(y, PreparedFeatures) else PreparedFeatures(y.to(device))


def _check_matrix(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor) or value.ndim != 2:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a 2-D tensor [examples, features], got {shape}.")


def _prepared(features: Tensor, device: torch.device) -> Tensor | None:
    """Centred float64 copy with constant features zeroed; ``None`` if it holds NaN or inf (or overflows)."""
    features = features.detach().to(device=device, dtype=torch.float64, copy=True)
    mean = features.mean(dim=0)
    centred = features.sub_(mean)
    norms = torch.linalg.vector_norm(centred, dim=0)
    if not bool(torch.isfinite(norms).all()):
        return None
    dead = norms.square() <= _DEAD**2 * (norms.square() + features.shape[0] * mean.square())  # vs the raw norm
    return centred.masked_fill_(dead, 0.0) if bool(dead.any()) else centred


def _compact(features: Tensor) -> Tensor:
    """Coordinates ``[n, n]`` with the same Gram matrix when features outnumber examples (R of a QR of xᵀ)."""
    if features.shape[1] <= features.shape[0]:
        return features
    return torch.linalg.qr(features.T, mode="r").R.T
