"""An independent NumPy/SciPy implementation of both cross statistics, written from the papers' formulas.

It shares nothing with ``lightning_nt.stats`` but the convention of the split (first ``n // 2`` rows, in the
given order), and computes each quantity by another route: the mean test from the Gram matrix of all pairs
(i in D1, j in D2) instead of a mean vector, the cross-MMD from four kernel matrices as in the paper's eq. 2
and 4, with the median bandwidth from ``scipy.spatial.distance.pdist`` (the documented rule: the median over the
pairs of distinct rows, whose distances are nonzero, or 1 when all rows coincide).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.distance import cdist, pdist
from scipy.stats import norm


def cross_mean(samples: np.ndarray) -> tuple[float, float, float]:
    """``(T, p_value (greater), U)`` with ``U = mean over i in D1, j in D2 of <X_i, X_j>``."""
    n = samples.shape[0]
    n1 = n // 2
    gram = samples[:n1] @ samples[n1:].T
    f = gram.mean(axis=1)
    statistic = math.sqrt(n1) * f.mean() / f.std(ddof=1)
    return statistic, norm.sf(statistic), gram.mean()


def cross_mmd(x: np.ndarray, y: np.ndarray, kernel: str = "gaussian", bandwidth: float | None = None):
    """``(T, p_value, xMMD²)`` of Shekhar, Kim & Ramdas (2022), eq. 2 and 4."""
    n1, m1 = x.shape[0] // 2, y.shape[0] // 2
    x1, x2, y1, y2 = x[:n1], x[n1:], y[:m1], y[m1:]
    scale = median_bandwidth(np.vstack([x2, y2])) if bandwidth is None else bandwidth

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        distances = cdist(a, b)
        return np.exp(-(distances**2) / (2 * scale**2)) if kernel == "gaussian" else np.exp(-distances / scale)

    kxx, kxy, kyx, kyy = k(x1, x2), k(x1, y2), k(y1, x2), k(y1, y2)
    ux, uy = kxx.mean() - kxy.mean(), kyx.mean() - kyy.mean()
    sigma_x2 = ((kxx.mean(axis=1) - kxy.mean(axis=1) - ux) ** 2).mean()
    sigma_y2 = ((kyx.mean(axis=1) - kyy.mean(axis=1) - uy) ** 2).mean()
    statistic = (ux - uy) / math.sqrt(sigma_x2 / n1 + sigma_y2 / m1)
    return statistic, norm.sf(statistic), ux - uy


def median_bandwidth(points: np.ndarray) -> float:
    """Median distance over the pairs of distinct rows (``pdist`` is exact: identical rows give exactly 0)."""
    distances = pdist(points)
    distances = distances[distances > 0]
    return float(np.median(distances)) if distances.size else 1.0
