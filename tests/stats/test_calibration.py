"""Calibration and power of both cross tests over many repetitions, the repetitions batched as one tensor op.

How many repetitions: a test of level 0.05 rejects in R repetitions Binomial(R, 0.05) times, and the check is
that the count lies in the central 99% binomial interval. With R = 2000 that interval is 0.038-0.063: a test
whose size is off by 0.015 or more fails, while the normal approximation's own finite-sample error at
n1 = 100 (a few thousandths: for Gaussian data T is exactly Student's t with 99 degrees of freedom, whose
upper 5% tail is 0.0515) sits well inside. The cost is drawing the data, R * n * d numbers (the statistic
itself is one pass): at d = 100,000 one repetition alone is 2e7 numbers, out of a 2-core CPU's budget for many
repetitions. Both tests see the data only through its Gram matrix, though (the mean test's f_i averages inner
products, a kernel of distances is a function of them), and for n i.i.d. N(0, I_d) points that matrix (Wishart)
is drawn exactly by Bartlett's decomposition from n² / 2 numbers: so at d = 100,000 the mean test runs R = 2000 on
Gaussian and multivariate-t3 data (rows scaled by one chi-square each) and the cross-MMD R = 1000 on Gaussian data,
in seconds. The cross-MMD's cost at d = 1000 is its kernel matrices, R * n² * d: R = 500 there. I.i.d.-t3
coordinates have no such shortcut and stay at d <= 1000 on the CPU; on a GPU (``cuda``-marked, run whenever one is
lent: not in CI) the d = 100,000 cases draw their data itself at R = 1000, i.i.d.-t3 coordinates included, for both
tests (the cross-MMD on Gaussian data excepted: exact on the CPU already).

Heavy tails: t with 3 degrees of freedom (finite variance, infinite fourth moment), "t3" with i.i.d.
coordinates, and "t3-elliptic" for the mean test at d >= 1000: multivariate t3 (Z / sqrt(chi2_3 / 3), one
chi-square per row), the same t3 marginals, but the heavy tail survives the sum over coordinates in f_i
(i.i.d. coordinates are averaged into near-Gaussian f_i), so it is the harder null at large d, and as cheap
to draw as Gaussian data (which is what makes d = 100,000 affordable). The cross-MMD is not checked on the
elliptic null: with a Gaussian kernel at d = 1000 its T is visibly skewed there at n = 200 (the rejection
rate stays in its interval over 500 repetitions, but the KS distance to N(0, 1) is 0.076, p = 0.006).
"""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import binom, kstest

from lightning_nt.stats import cross_mean_statistics, cross_mmd_statistics, normal_p_value

N = 200
CHUNK = 20_000_000
MEAN_CASES = [
    (10, "gaussian", 2000),
    (10, "t3", 2000),
    (1000, "gaussian", 2000),
    (1000, "t3", 2000),
    (1000, "t3-elliptic", 2000),
]
MMD_CASES = [(10, "gaussian", 2000), (10, "t3", 2000), (1000, "gaussian", 500), (1000, "t3", 500)]


def _draw(family, reps, n, d, generator):
    samples = torch.randn(reps, n, d, generator=generator, device=generator.device)
    if family == "gaussian":
        return samples
    # t3 = Z / sqrt(chi2_3 / 3), the chi-square from three squared normals: one per coordinate, or one per row
    shape = (3, reps, n, d if family == "t3" else 1)
    chi2 = torch.randn(*shape, generator=generator, device=generator.device).square().sum(0)
    return samples / (chi2 / 3).sqrt()


def _null_statistics(test, family, d, reps, seed=0, device="cpu", chunk=CHUNK):
    generator = torch.Generator(device).manual_seed(seed)
    per_chunk = max(1, chunk // (N * d * (2 if test == "mmd" else 1)))
    statistics = []
    for start in range(0, reps, per_chunk):
        count = min(per_chunk, reps - start)
        x = _draw(family, count, N, d, generator)
        if test == "mean":
            statistics.append(cross_mean_statistics(x, seed=start)[0])
        else:
            statistics.append(cross_mmd_statistics(x, _draw(family, count, N, d, generator), seed=start)[0])
    return torch.cat(statistics).cpu()


def _assert_calibrated(statistics, alpha=0.05):
    reps = len(statistics)
    assert torch.isfinite(statistics).all()
    rejections = int((normal_p_value(statistics) <= alpha).sum())
    low, high = binom.interval(0.99, reps, alpha)
    assert low <= rejections <= high, f"{rejections} rejections in {reps} (99% interval {low:.0f}-{high:.0f})"
    assert kstest(statistics.numpy(), "norm").pvalue > 0.01


@pytest.mark.slow
@pytest.mark.parametrize(("d", "family", "reps"), MEAN_CASES)
def test_cross_mean_test_is_calibrated_whatever_the_dimension(d, family, reps):
    _assert_calibrated(_null_statistics("mean", family, d, reps))


@pytest.mark.slow
@pytest.mark.parametrize(("d", "family", "reps"), MMD_CASES)
def test_cross_mmd_test_is_calibrated_whatever_the_dimension(d, family, reps):
    _assert_calibrated(_null_statistics("mmd", family, d, reps))


def _power(statistics, alpha=0.05):
    return float((normal_p_value(statistics) <= alpha).double().mean())


@pytest.mark.slow
def test_power_of_the_mean_test_rises_to_one_with_the_signal():
    generator = torch.Generator().manual_seed(1)
    d, reps = 1000, 400
    noise = torch.randn(reps, N, d, generator=generator)
    powers = []
    for squared_norm in (0.0, 0.2, 0.5, 1.0, 2.5):  # T ~ sqrt(n1) ||mu||² / sqrt(d / n2) = 3.2 ||mu||²
        mean = torch.full((d,), (squared_norm / d) ** 0.5)
        powers.append(_power(cross_mean_statistics(noise + mean)[0]))
    assert powers[0] <= 0.09
    assert all(later > earlier for earlier, later in itertools.pairwise(powers))
    assert 0.35 < powers[2] < 0.6 and powers[-1] == 1.0  # 1 - Phi(1.645 - 1.58) = 0.47 at ||mu||² = 0.5


@pytest.mark.slow
def test_power_of_the_mmd_test_rises_to_one_with_the_signal():
    generator = torch.Generator().manual_seed(2)
    d, reps = 10, 400
    x, y = torch.randn(reps, N, d, generator=generator), torch.randn(reps, N, d, generator=generator)
    powers = [_power(cross_mmd_statistics(x, y * scale)[0]) for scale in (1.0, 1.1, 1.2, 1.3, 1.6)]
    assert powers[0] <= 0.09
    assert all(later > earlier for earlier, later in itertools.pairwise(powers))
    assert powers[-1] == 1.0


def _points_with_the_gram_of_gaussian_data(d, reps, count, generator):
    """``[reps, count, count]`` points whose Gram matrix has exactly the law of ``count`` i.i.d. ``N(0, I_d)`` points'.

    Bartlett: that Gram matrix is Wishart(d, I), distributed as ``A Aᵀ`` for ``A`` lower triangular with
    ``A_ii² ~ chi2(d - i)`` (``i`` from 0) and standard normals below the diagonal; the rows of ``A`` are points
    of dimension ``count`` with those inner products. Kernels of distances see only the Gram matrix.
    """
    factor = torch.randn(reps, count, count, generator=generator, dtype=torch.float64).tril(-1)
    chi2 = np.random.default_rng(int(torch.randint(2**31, (), generator=generator)))  # torch's takes no generator
    diagonal = torch.from_numpy(chi2.chisquare(np.arange(d, d - count, -1), size=(reps, count)))
    return factor + torch.diag_embed(diagonal.sqrt())


def test_a_kernel_test_sees_only_the_gram_matrix_so_bartlett_points_stand_for_high_dimensional_data():
    data = torch.randn(60, 5000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    points = torch.linalg.cholesky(data @ data.T)  # rows with the Gram matrix of the data, in dimension 60
    exact = "donot_use_mm_for_euclid_dist"
    torch.testing.assert_close(
        torch.cdist(points, points, compute_mode=exact), torch.cdist(data, data, compute_mode=exact)
    )
    for kernel in ("gaussian", "laplace"):
        direct = cross_mmd_statistics(data[:30], data[30:], kernel)[0].item()
        assert cross_mmd_statistics(points[:30], points[30:], kernel)[0].item() == pytest.approx(direct, rel=1e-8)
    gram = _points_with_the_gram_of_gaussian_data(5000, 400, 3, torch.Generator().manual_seed(4))
    gram = gram @ gram.mT
    # E W = d I, Var W_ii = 2d, Var W_ij = d
    assert gram.diagonal(dim1=-2, dim2=-1).mean().item() == pytest.approx(5000, rel=0.01)
    assert gram[:, 1, 0].var().item() == pytest.approx(5000, rel=0.2)
    assert gram[:, 2, 2].var().item() == pytest.approx(10_000, rel=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gaussian", "t3-elliptic"])
def test_cross_mean_test_is_calibrated_at_d_100000_over_exact_gram_matrices(family):
    """The mean test sees the data only through inner products (``f_i`` averages ``<X_i, X_j>``), so points with the
    Gram matrix of Gaussian data stand for it exactly; multivariate t3 rows are Gaussian rows divided by one
    ``sqrt(chi2_3 / 3)`` each, so their Gram matrix is that one scaled on both sides. 2000 repetitions, as at small d
    (100 draws of the data itself could not see a size of 0.09: found by audit)."""
    generator = torch.Generator().manual_seed(6)
    statistics = []
    for start in range(0, 2000, 500):
        points = _points_with_the_gram_of_gaussian_data(100_000, 500, N, generator)
        if family == "t3-elliptic":
            chi2 = torch.randn(3, 500, N, 1, generator=generator, dtype=torch.float64).square().sum(0)
            points = points / (chi2 / 3).sqrt()
        statistics.append(cross_mean_statistics(points, seed=start)[0])
    _assert_calibrated(torch.cat(statistics))


@pytest.mark.slow
def test_cross_mmd_test_is_calibrated_at_d_100000_on_gaussian_data():
    generator = torch.Generator().manual_seed(5)
    statistics = []
    for start in range(0, 1000, 250):
        points = _points_with_the_gram_of_gaussian_data(100_000, 250, 2 * N, generator)
        statistics.append(cross_mmd_statistics(points[:, :N], points[:, N:], seed=start)[0])
    _assert_calibrated(torch.cat(statistics))


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("test", "family"), [("mean", "gaussian"), ("mean", "t3"), ("mean", "t3-elliptic"), ("mmd", "t3")]
)
def test_calibrated_at_d_100000_over_1000_exact_draws_on_a_gpu(test, family):
    """The d = 100,000 cases at the repetitions of the small ones, i.i.d.-t3 coordinates included: exact draws of
    2e10-4e10 numbers, out of a 2-core CPU's budget (the CPU cases above stop at 100 repetitions or at Bartlett's
    Gaussian shortcut), seconds on a GPU."""
    chunk = min(500_000_000, torch.cuda.mem_get_info()[0] // 32)  # a chunk peaks near 20 bytes a number (t3 draws)
    _assert_calibrated(_null_statistics(test, family, 100_000, 1000, device="cuda", chunk=chunk))
