"""Dimension-agnostic tests from cross U-statistics: a one-sample mean test and the cross-MMD two-sample test.

A degenerate U-statistic (``sum_{i != j} <X_i, X_j>`` for the mean, the unbiased MMD² for two samples) has
a null distribution that depends on the dimension and the unknown covariance, so its tests need permutations
or a regime assumption on ``d/n``. Splitting the sample in two and pairing every point of the first half
with the average over the second half makes the statistic a *mean of conditionally i.i.d. terms*: given the
second half, the ``f_i`` below are i.i.d., and the studentised mean is asymptotically ``N(0, 1)`` whatever
``d`` is relative to ``n`` (Kim & Ramdas, "Dimension-agnostic inference using cross U-statistics", Bernoulli
2024; Shekhar, Kim & Ramdas, "A permutation-free kernel two-sample test", NeurIPS 2022).

Every function takes a ``seed`` for the split: the rows are put in a random order drawn from
``torch.Generator().manual_seed(seed)`` (``seed=None`` keeps the given order) and the first ``n // 2`` form
the first half. The statistics are computed on the inputs' device in their precision (at least float32;
float64 inputs give float64 throughout), and the final means and variances in float64. The ``*_statistics``
functions take leading batch dimensions (``[..., n, d]``), so many repetitions are one tensor operation.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_nt.common.validation import ArgumentError

__all__ = [
    "Alternative",
    "TestResult",
    "cross_mean_statistics",
    "cross_mean_test",
    "cross_mmd_statistics",
    "cross_mmd_test",
    "normal_p_value",
    "split_indices",
    "studentized_mean",
]

Alternative = Literal["greater", "less", "two-sided"]
"""The alternative hypothesis of a test: the statistic's mean is greater than, less than, or different from zero."""


@dataclass(frozen=True)
class TestResult:
    """Outcome of a cross U-statistic test.

    Attributes:
        statistic: the studentised statistic ``T``, asymptotically ``N(0, 1)`` under the null.
        p_value: its p-value under ``N(0, 1)`` for the alternative tested.
        n: examples used (both samples together for a two-sample test).
        d: dimension of each example.
        estimate: the unstudentised cross U-statistic: an unbiased estimate of ``||E X||²`` (mean test) or of
            ``MMD²`` (two-sample test).
    """

    __test__ = False  # not a pytest test class

    statistic: float
    p_value: float
    n: int
    d: int
    estimate: float = math.nan

    def rejects(self, alpha: float = 0.05) -> bool:
        """Whether the null is rejected at level ``alpha`` (``p_value <= alpha``)."""
        return self.p_value <= alpha


def normal_p_value(statistic: Tensor, alternative: Alternative = "greater") -> Tensor:
    """P-value of a statistic that is ``N(0, 1)`` under the null.

    Examples:
        >>> normal_p_value(torch.tensor([0.0, 1.6448536269514722]), "greater")
        tensor([0.5000, 0.0500])
        >>> float(normal_p_value(torch.tensor(-1.959963984540054), "two-sided"))
        0.05...
    """
    if alternative == "greater":
        return torch.special.ndtr(-statistic)
    if alternative == "less":
        return torch.special.ndtr(statistic)
    if alternative == "two-sided":
        return 2 * torch.special.ndtr(-statistic.abs())
    raise ValueError(f"`alternative` must be one of ('greater', 'less', 'two-sided'), got {alternative!r}.")


def split_indices(n: int, seed: int | None, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The two halves of ``range(n)``: the first ``n // 2`` of a seeded random order, and the rest.

    Examples:
        >>> first, second = split_indices(5, seed=None)
        >>> first.tolist(), second.tolist()
        ([0, 1], [2, 3, 4])
    """
    if n < 4:
        raise ValueError(f"A cross U-statistic needs at least 4 examples (2 per half), got {n}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ArgumentError(f"`seed` must be an integer or None, got {seed!r}.")
    order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    order = order.to(device)
    return order[: n // 2], order[n // 2 :]


def studentized_mean(scores: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """``(sqrt(n1) * mean / sd, mean)`` of ``scores`` along ``dim``, ``sd`` with Bessel's correction (n1 - 1).

    For Gaussian scores this is exactly Student's t with ``n1 - 1`` degrees of freedom; it tends to ``N(0, 1)``.
    Scores without spread (all equal, ``sd = 0``) have the ratio's limit: ``0`` when they are all zero, ``+inf``
    or ``-inf`` (the sign of their common value) otherwise; never NaN from finite scores.

    Examples:
        >>> statistic, mean = studentized_mean(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))
        >>> round(float(statistic), 6), float(mean)
        (2.77746, 3.0)
    """
    count = scores.shape[dim]
    mean = scores.mean(dim)
    sd = scores.std(dim, correction=1)
    return ratio_or_limit(math.sqrt(count) * mean, sd), mean


def ratio_or_limit(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, with ``0/0 = 0`` and ``c/0 = sign(c) inf`` (a zero spread's limit)."""
    limit = torch.where(numerator == 0, 0.0, numerator.sign() * math.inf)
    return torch.where(denominator == 0, limit, numerator / denominator)


def cross_mean_statistics(samples: Tensor, seed: int | None = 0) -> tuple[Tensor, Tensor]:
    """The one-sample cross statistic of ``samples[..., n, d]`` for every leading index: ``(T, mean f)``.

    With the halves ``D1`` (``n1 = n // 2`` rows) and ``D2`` (the other ``n2``) of :func:`split_indices`,

        f_i = < X_i, (1/n2) sum_{j in D2} X_j >        for i in D1,
        T   = sqrt(n1) * mean(f) / sd(f),      sd(f)² = (1/(n1 - 1)) sum_{i in D1} (f_i - mean(f))².

    ``mean f`` is the cross U-statistic ``(1/(n1 n2)) sum_{i in D1, j in D2} <X_i, X_j>``, unbiased for
    ``||E X||²``. Given ``D2`` the ``f_i`` are i.i.d., so ``T`` is a t-statistic whose null limit is ``N(0, 1)``
    for any ``d``.

    Examples:
        >>> statistic, signal = cross_mean_statistics(torch.randn(3, 50, 1000))
        >>> statistic.shape, signal.dtype
        (torch.Size([3]), torch.float64)
    """
    return studentized_mean(_cross_scores(samples, seed))


def _cross_scores(samples: Tensor, seed: int | None) -> Tensor:
    """The ``f_i`` of :func:`cross_mean_statistics`, in float64."""
    _check_samples("samples", samples)
    samples = samples.to(_working_dtype(samples))
    first, second = split_indices(samples.shape[-2], seed, samples.device)
    center = samples.index_select(-2, second).mean(-2)
    return torch.einsum("...id,...d->...i", samples.index_select(-2, first), center).to(torch.float64)


def cross_mean_test(samples: Tensor, alternative: Alternative = "greater", seed: int | None = 0) -> TestResult:
    """Kim & Ramdas' dimension-agnostic test of ``H0: E[X] = 0`` from ``n`` examples of dimension ``d``.

    ``alternative="greater"`` (the default) is the test of ``H0: E X = 0`` against ``E X != 0``: ``E f_i`` is
    ``||E X||² >= 0``, so only large ``T`` is evidence against the null. See :func:`cross_mean_statistics`
    for the split and the variance estimator.

    Degenerate data, where the ``f_i`` have no spread, are answered with documented values and a warning, never
    NaN. All ``f_i`` zero (all rows zero, or the nonzero rows all in one half of the split, e.g. differences
    confined to a handful of examples): the data hold no evidence the test can use, ``statistic=0``,
    ``p_value=1``. All ``f_i`` equal to ``c != 0``: under ``H0`` the ``f_i`` have mean zero given the second
    half, so a constant nonzero value is evidence against it; ``T`` is the limit ``sign(c) inf`` and the
    p-value that limit's (``0`` for ``"greater"`` when ``c > 0``), not a normal approximation.

    Args:
        samples: ``[n, d]`` (or ``[n]``, read as ``d = 1``), at least 4 rows.
        alternative: ``"greater"``, ``"less"`` or ``"two-sided"``, on the ``N(0, 1)`` scale of ``T``.
        seed: seed of the random split (``None``: the first ``n // 2`` rows against the rest).

    Examples:
        >>> generator = torch.Generator().manual_seed(0)
        >>> cross_mean_test(torch.randn(200, 10_000, generator=generator)).p_value > 0.05
        True
        >>> cross_mean_test(torch.randn(200, 10_000, generator=generator) + 0.05).p_value < 1e-6
        True
    """
    _check_tensor("samples", samples)
    samples = samples.unsqueeze(-1) if samples.ndim == 1 else samples
    if samples.ndim != 2:
        raise ValueError(f"`samples` must have shape [n, d], got {tuple(samples.shape)}.")
    _warn_if_not_finite(samples=samples)
    scores = _cross_scores(samples, seed)
    statistic, estimate = studentized_mean(scores)
    no_spread = bool(scores.std(correction=1) == 0)
    why = "all rows are zero, or the nonzero rows all fell in one half of the split (too few to test)"
    return _result(statistic, estimate, alternative, samples.shape[0], samples.shape[1], no_spread, why)


Kernel = Literal["gaussian", "laplace"]


def cross_mmd_statistics(
    x: Tensor,
    y: Tensor,
    kernel: Kernel = "gaussian",
    bandwidth: float | Literal["median"] = "median",
    seed: int | None = 0,
) -> tuple[Tensor, Tensor]:
    """Shekhar, Kim & Ramdas' studentised cross-MMD of ``x[..., n, d]`` and ``y[..., m, d]``: ``(T, xMMD²)``.

    Split ``x`` into ``X1`` (``n1 = n // 2``) and ``X2``, ``y`` into ``Y1`` (``m1 = m // 2``) and ``Y2``. The
    second halves give the empirical witness function (the difference of mean embeddings)

        g(z) = (1/n2) sum_{j in X2} k(z, X_j) - (1/m2) sum_{l in Y2} k(z, Y_l),

    and the cross-MMD is ``xMMD² = <mu(X1) - mu(Y1), mu(X2) - mu(Y2)>`` in the RKHS, i.e.

        U = U_X - U_Y,    U_X = (1/n1) sum_{i in X1} g(X_i),    U_Y = (1/m1) sum_{i in Y1} g(Y_i),

    an unbiased estimate of ``MMD²`` (eq. 2 of the paper). Given the second halves, the ``g(X_i)`` and ``g(Y_i)``
    are two independent i.i.d. samples, so ``U`` is a difference of two means, studentised as in the paper's
    eq. 4:

        T = U / sqrt(s_X² / n1 + s_Y² / m1),
        s_X² = (1/n1) sum_{i in X1} (g(X_i) - U_X)²,    s_Y² = (1/m1) sum_{i in Y1} (g(Y_i) - U_Y)²,

    which is ``N(0, 1)`` in the limit under ``H0: P_X = P_Y``; large ``T`` rejects. The kernel is
    ``exp(-||a - b||² / (2 s²))`` (gaussian) or ``exp(-||a - b|| / s)`` (laplace); ``bandwidth="median"``
    takes ``s`` as the median distance between distinct points of the *second halves* (``X2`` and ``Y2``
    pooled), so that the kernel, like the witness, is fixed given the second halves and the conditional
    argument above holds exactly. "Distinct" means the median is over the pairs of rows that differ (identical
    rows, as discrete or one-hot data have many, are left out: their distance 0 would otherwise make ``s = 0``
    and the kernel 0/0); ``s = 1`` when all those rows coincide. Witness values without spread give ``T`` the
    limit of :func:`studentized_mean` (``0`` when ``U = 0``, ``sign(U) inf`` otherwise).

    Examples:
        >>> statistic, mmd2 = cross_mmd_statistics(torch.randn(4, 60, 5), torch.randn(4, 50, 5))
        >>> statistic.shape, mmd2.shape
        (torch.Size([4]), torch.Size([4]))
    """
    estimate, error = _cross_mmd(x, y, kernel, bandwidth, seed)
    return ratio_or_limit(estimate, error), estimate


def _cross_mmd(
    x: Tensor, y: Tensor, kernel: Kernel, bandwidth: float | Literal["median"], seed: int | None
) -> tuple[Tensor, Tensor]:
    """``(U, standard error of U)`` of :func:`cross_mmd_statistics`, in float64."""
    _check_samples("x", x)
    _check_samples("y", y)
    if x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(
            f"`x` and `y` must agree in all but the number of rows, got {tuple(x.shape)}, {tuple(y.shape)}."
        )
    dtype = torch.promote_types(_working_dtype(x), _working_dtype(y))
    x, y = x.to(dtype), y.to(dtype)
    x1_index, x2_index = split_indices(x.shape[-2], seed, x.device)
    y1_index, y2_index = split_indices(y.shape[-2], None if seed is None else seed + 1, y.device)
    x1, x2 = x.index_select(-2, x1_index), x.index_select(-2, x2_index)
    y1, y2 = y.index_select(-2, y1_index), y.index_select(-2, y2_index)
    second = torch.cat([x2, y2], dim=-2)
    scale = (
        _median_distance(second)
        if bandwidth == "median"
        else torch.full(x.shape[:-2], float(bandwidth), dtype=torch.float64)
    )
    scale = scale.to(x.device, dtype)

    def witness(points: Tensor) -> Tensor:
        gram = _kernel(torch.cdist(points, second), scale, kernel)
        return gram[..., : x2.shape[-2]].mean(-1) - gram[..., x2.shape[-2] :].mean(-1)

    on_x, on_y = witness(x1).to(torch.float64), witness(y1).to(torch.float64)
    variance = on_x.var(-1, correction=0) / on_x.shape[-1] + on_y.var(-1, correction=0) / on_y.shape[-1]
    return on_x.mean(-1) - on_y.mean(-1), variance.sqrt()


def cross_mmd_test(
    x: Tensor,
    y: Tensor,
    kernel: Kernel = "gaussian",
    bandwidth: float | Literal["median"] = "median",
    seed: int | None = 0,
) -> TestResult:
    """Permutation-free kernel two-sample test of ``H0: P_X = P_Y`` (cross-MMD, Shekhar, Kim & Ramdas 2022).

    One-sided: ``MMD² >= 0``, so only large ``T`` is evidence against the null. See :func:`cross_mmd_statistics`
    for the statistic, its studentisation and the bandwidth rule. Witness values without spread are answered
    as in :func:`cross_mean_test`, with a warning: ``U = 0`` gives ``statistic=0, p_value=1``, ``U != 0`` the
    infinite limit.

    Args:
        x: ``[n, d]`` examples of the first distribution (at least 4).
        y: ``[m, d]`` examples of the second (at least 4).
        kernel: ``"gaussian"`` or ``"laplace"``.
        bandwidth: the kernel's scale, or ``"median"`` for the median heuristic on the second halves.
        seed: seed of the random splits (``None``: first halves against second halves in the given order).

    Examples:
        >>> generator = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(200, 20, generator=generator), torch.randn(150, 20, generator=generator)
        >>> cross_mmd_test(x, y).p_value > 0.05, cross_mmd_test(x, y * 1.5).p_value < 1e-3
        (True, True)
    """
    for name, value in (("x", x), ("y", y)):
        _check_tensor(name, value)
        if value.ndim != 2:
            raise ValueError(f"`{name}` must have shape [n, d], got {tuple(value.shape)}.")
    if bandwidth != "median" and (
        isinstance(bandwidth, bool) or not (isinstance(bandwidth, int | float) and 0 < bandwidth < math.inf)
    ):
        raise ValueError(f"`bandwidth` must be 'median' or a positive finite number, got {bandwidth!r}.")
    if kernel not in ("gaussian", "laplace"):
        raise ValueError(f"`kernel` must be one of ('gaussian', 'laplace'), got {kernel!r}.")
    _warn_if_not_finite(x=x, y=y)
    estimate, error = _cross_mmd(x, y, kernel, bandwidth, seed)
    statistic, no_spread = ratio_or_limit(estimate, error), bool(error == 0)
    why = "the witness function is zero on every first-half point, e.g. one constant row in both samples"
    return _result(statistic, estimate, "greater", x.shape[0] + y.shape[0], x.shape[1], no_spread, why)


def _kernel(distances: Tensor, scale: Tensor, kernel: Kernel) -> Tensor:
    scale = scale[..., None, None]
    if kernel == "gaussian":
        return torch.exp(-(distances**2) / (2 * scale**2))
    return torch.exp(-distances / scale)


def _median_distance(points: Tensor) -> Tensor:
    """Median distance over the pairs of distinct rows of ``points[..., k, d]`` (pairs of identical rows left
    out), for every leading index; ``1`` where all rows coincide."""
    count = points.shape[-2]
    rows, columns = torch.triu_indices(count, count, offset=1, device=points.device)
    labels = _row_labels(points)
    distinct = labels[..., rows] != labels[..., columns]
    # identical rows are found exactly (cdist's matrix-product path gives them small nonzero distances)
    distances = torch.where(distinct, torch.cdist(points, points)[..., rows, columns], -1.0).sort(-1).values
    ties, pairs = (~distinct).sum(-1, keepdim=True), distinct.sum(-1, keepdim=True)
    last = distances.shape[-1] - 1
    lower = distances.gather(-1, (ties + (pairs - 1).clamp_min(0) // 2).clamp_max(last))
    upper = distances.gather(-1, (ties + pairs // 2).clamp_max(last))
    return torch.where(pairs > 0, (lower + upper) / 2, 1.0).squeeze(-1)


def _row_labels(points: Tensor) -> Tensor:
    """``labels[..., i] == labels[..., j]`` exactly when rows ``i`` and ``j`` of ``points[..., k, d]`` are equal."""
    flat = points.reshape(-1, *points.shape[-2:])
    labels = [torch.unique(matrix, dim=0, return_inverse=True)[1] for matrix in flat]
    return torch.stack(labels).reshape(points.shape[:-1])


def _working_dtype(samples: Tensor) -> torch.dtype:
    return torch.promote_types(samples.dtype, torch.float32)


def _check_samples(name: str, samples: Tensor) -> None:
    _check_tensor(name, samples)
    if samples.ndim < 2:
        raise ValueError(f"`{name}` must be a Tensor of shape [..., n, d], got {tuple(samples.shape)}.")
    if not samples.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point Tensor, got {samples.dtype}.")
    if samples.shape[-2] < 4:
        raise ValueError(f"`{name}` needs at least 4 examples (2 per half of the split), got {samples.shape[-2]}.")


def _check_tensor(name: str, value: object) -> None:
    if not isinstance(value, Tensor):
        raise ArgumentError(
            f"`{name}` must be a torch.Tensor, got {type(value).__name__}: pass `torch.as_tensor({name})`."
        )


def _warn_if_not_finite(**tensors: Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            warnings.warn(
                f"`{name}` holds NaN or infinite values: the test's result (NaN, or a point at infinity's limit) says "
                "nothing reliable about the data.",
                stacklevel=3,
            )


def p_value_or_no_evidence(
    statistic: Tensor, estimate: Tensor, no_spread: bool, alternative: Alternative = "greater"
) -> Tensor:
    """:func:`normal_p_value`, except for terms all zero (no spread, estimate 0): no evidence, ``p = 1``."""
    p_value = normal_p_value(statistic, alternative)
    return torch.ones_like(p_value) if no_spread and float(estimate) == 0 else p_value


def _result(
    statistic: Tensor, estimate: Tensor, alternative: Alternative, n: int, d: int, no_spread: bool, why: str
) -> TestResult:
    """The record of a test; terms without spread get the documented values of :func:`cross_mean_test`, warned."""
    p_value = p_value_or_no_evidence(statistic, estimate, no_spread, alternative)
    if no_spread and float(estimate) == 0:
        warnings.warn(
            f"Every term of the cross statistic is zero ({why}): the data hold no evidence the test can use, so "
            "statistic=0 and p_value=1.",
            stacklevel=3,
        )
    elif no_spread:
        warnings.warn(
            f"The terms of the cross statistic have no spread (estimate {float(estimate):.6g}): the statistic is "
            f"its infinite limit and p_value={float(p_value):g} that limit's, not a normal approximation. Constant "
            "or duplicated data?",
            stacklevel=3,
        )
    return TestResult(statistic=float(statistic), p_value=float(p_value), n=n, d=d, estimate=float(estimate))
