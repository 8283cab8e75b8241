"""The core against published values, independent NumPy/SciPy references and brute force over the groups."""

import functools
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from lightning_nt.common.validation import ArgumentError
from lightning_nt.similarity import (
    ACTIVATIONS,
    PreparedFeatures,
    cka_matrix,
    intertwiner_similarity,
    linear_cka,
    orthogonal_procrustes_similarity,
    similarities,
)


def _intertwiner(x, y, activation):
    return intertwiner_similarity(x, y, activation)


MEASURES = {
    "cka": linear_cka,
    "cka_debiased": lambda x, y: linear_cka(x, y, debiased=True),
    "orthogonal_procrustes": orthogonal_procrustes_similarity,
    **{f"intertwiner_{name}": functools.partial(_intertwiner, activation=name) for name in ACTIVATIONS},
}


def _gram_cka(x, y, debiased=False):
    """Independent reference: HSIC from Gram matrices, biased (tr KHLH) or Song et al.'s U-statistic."""

    def hsic(k, m):
        n = len(k)
        if not debiased:
            h = np.eye(n) - 1 / n
            return np.trace(k @ h @ m @ h)
        k, m = k - np.diag(np.diag(k)), m - np.diag(np.diag(m))
        ones = np.ones(n)
        return (
            np.trace(k @ m)
            + ones @ k @ ones * (ones @ m @ ones) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * ones @ k @ m @ ones
        ) / (n * (n - 3))

    k, m = x @ x.T, y @ y.T
    return hsic(k, m) / math.sqrt(hsic(k, k) * hsic(m, m))


def _random_orthogonal(size, rng):
    q, r = np.linalg.qr(rng.standard_normal((size, size)))
    return q * np.sign(np.diag(r))


def _group_element(name, size, rng):
    permutation = np.eye(size)[rng.permutation(size)]
    if name in ("cka", "cka_debiased", "orthogonal_procrustes"):
        return 2.5 * _random_orthogonal(size, rng)
    if name == "intertwiner_relu":
        return permutation @ np.diag(rng.uniform(0.1, 10.0, size))
    if name == "intertwiner_tanh":
        return permutation @ np.diag(rng.choice([-1.0, 1.0], size))
    if name == "intertwiner_identity":
        return rng.standard_normal((size, size)) + 3 * np.eye(size)
    return permutation  # gelu, sigmoid


def test_kornblith_demo_values():
    """google-research representation_similarity/Demo.ipynb: seed 1337, X drawn first, then the noise."""
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = x + np.random.randn(100, 10)
    assert linear_cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(0.55761, abs=5e-6)
    assert linear_cka(torch.tensor(x), torch.tensor(y), debiased=True) == pytest.approx(0.51346, abs=5e-6)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize(("n", "p", "q"), [(60, 7, 12), (20, 50, 30)])
def test_cka_equals_the_gram_matrix_reference(debiased, n, p, q):
    rng = np.random.default_rng(n + p)
    x = rng.standard_normal((n, p)) + 3.0  # uncentred: the reference sees raw features
    y = x[:, :1] * rng.standard_normal((1, q)) + rng.standard_normal((n, q))
    expected = _gram_cka(x, y, debiased)
    assert linear_cka(torch.tensor(x), torch.tensor(y), debiased) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("n", "p", "q"), [(40, 6, 6), (40, 5, 9), (10, 30, 25)])
def test_orthogonal_procrustes_equals_one_minus_half_the_squared_scipy_distance(n, p, q):
    rng = np.random.default_rng(p)
    x, y = rng.standard_normal((n, p)), rng.standard_normal((n, q))
    a, b = x - x.mean(0), y - y.mean(0)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    width = max(p, q)
    a, b = np.pad(a, ((0, 0), (0, width - p))), np.pad(b, ((0, 0), (0, width - q)))
    rotation, _ = scipy.linalg.orthogonal_procrustes(b, a)
    distance = np.linalg.norm(b @ rotation - a)
    assert orthogonal_procrustes_similarity(torch.tensor(x), torch.tensor(y)) == pytest.approx(1 - distance**2 / 2)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "sigmoid"])
def test_intertwiner_similarity_equals_brute_force_over_the_group(activation):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 5))
    y = x @ rng.standard_normal((5, 5)) + 0.5 * rng.standard_normal((30, 5))
    signs = list(itertools.product([-1, 1], repeat=5)) if activation == "tanh" else [(1,) * 5]
    a, b = x - x.mean(0), y - y.mean(0)
    if activation == "relu":
        scores = np.corrcoef(a.T, b.T)[:5, 5:] / 5
    else:
        scores = (a / np.linalg.norm(a)).T @ (b / np.linalg.norm(b))
    expected = max(
        sum(sign[i] * scores[i, order[i]] for i in range(5))
        for order in itertools.permutations(range(5))
        for sign in signs
    )
    assert intertwiner_similarity(torch.tensor(x), torch.tensor(y), activation) == pytest.approx(expected, rel=1e-10)


def test_identity_group_gives_the_mean_canonical_correlation():
    """Reference: canonical correlations as square roots of the eigenvalues of Sxx^-1 Sxy Syy^-1 Syx."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((80, 4))
    y = x @ rng.standard_normal((4, 4)) + rng.standard_normal((80, 4))
    a, b = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = a.T @ a, b.T @ b, a.T @ b
    squared = np.linalg.eigvals(np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)).real
    expected = np.sqrt(squared).mean()
    assert intertwiner_similarity(torch.tensor(x), torch.tensor(y), "identity") == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", MEASURES)
def test_each_measure_is_one_under_a_random_element_of_its_group_and_symmetric(name):
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((200, 12)), 0.0)
    y = x @ _group_element(name, 12, rng) + rng.standard_normal(12)  # a per-feature offset: centring removes it
    measure = MEASURES[name]
    assert measure(torch.tensor(x), torch.tensor(y)) == pytest.approx(1.0, abs=1e-6)
    z = torch.tensor(rng.standard_normal((200, 12)))
    assert measure(torch.tensor(x), z) == pytest.approx(measure(z, torch.tensor(x)), abs=1e-12)
    assert measure(torch.tensor(x), z) < 0.9


def test_relu_similarity_falls_under_a_rotation_that_cka_and_procrustes_ignore():
    rng = np.random.default_rng(6)
    x = torch.tensor(np.maximum(rng.standard_normal((300, 16)), 0.0))
    rotated = x @ torch.tensor(_random_orthogonal(16, rng))
    assert linear_cka(x, rotated) == pytest.approx(1.0, abs=1e-9)
    assert orthogonal_procrustes_similarity(x, rotated) == pytest.approx(1.0, abs=1e-9)
    assert intertwiner_similarity(x, rotated, "relu") < 0.6
    assert intertwiner_similarity(x, rotated, "identity") == pytest.approx(1.0, abs=1e-9)


def test_relu_similarity_ignores_per_unit_scales_that_the_permutation_groups_see():
    rng = np.random.default_rng(7)
    x = torch.tensor(rng.standard_normal((100, 8)))
    scaled = x * torch.tensor(rng.uniform(0.1, 10.0, 8))
    assert intertwiner_similarity(x, scaled, "relu") == pytest.approx(1.0, abs=1e-9)
    for activation in ("tanh", "gelu", "sigmoid"):
        assert intertwiner_similarity(x, scaled, activation) < 0.95
    assert intertwiner_similarity(x, -x, "tanh") == pytest.approx(1.0)
    assert intertwiner_similarity(x, -x, "relu") < 0.3  # no sign flips in the ReLU group


def test_dead_units_give_no_nan():
    rng = np.random.default_rng(8)
    x = torch.tensor(np.maximum(rng.standard_normal((50, 6)), 0.0))
    x[:, [1, 4]] = 0.0
    x[:, 2] = 0.7  # constant: as dead as zero
    y = x[:, [5, 4, 3, 2, 1, 0]] * 3.0
    for name, measure in MEASURES.items():
        value = measure(x, y)
        assert value == pytest.approx(1.0, abs=1e-6), name
        assert measure(x, torch.zeros_like(x)) == 0.0, name
        assert measure(torch.full_like(x, 2.0), y) == 0.0, name


@pytest.mark.parametrize("name", MEASURES)
def test_non_finite_input_gives_nan(name):
    x = torch.randn(20, 4)
    y = x.clone()
    y[3, 1] = math.inf
    assert math.isnan(MEASURES[name](x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_any_dtype_is_computed_in_float64(dtype):
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = (x.double() @ torch.randn(8, 8, dtype=torch.float64)).to(dtype)
    for measure in MEASURES.values():
        value = measure(x, y)
        assert isinstance(value, float)
        assert value == measure(x.double(), y.double())


def test_bad_inputs_are_refused_with_a_message_naming_them():
    with pytest.raises(ValueError, match="same number of features"):
        intertwiner_similarity(torch.randn(10, 3), torch.randn(10, 4), "relu")
    assert 0 < intertwiner_similarity(torch.randn(30, 3), torch.randn(30, 4), "identity") <= 1
    with pytest.raises(ValueError, match="`activation`"):
        intertwiner_similarity(torch.randn(10, 3), torch.randn(10, 3), "softplus")
    with pytest.raises(ValueError, match="`y` must be a 2-D tensor"):
        linear_cka(torch.randn(10, 3), torch.randn(10, 3, 2))
    with pytest.raises(ValueError, match="same examples"):
        orthogonal_procrustes_similarity(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(torch.randn(3, 3), torch.randn(3, 3), debiased=True)


def test_cka_matrix_equals_pairwise_cka_and_marks_bad_representations():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((40, 6))
    layers = [torch.tensor(x), torch.tensor(np.tanh(x @ rng.standard_normal((6, 60)))), torch.tensor(x[:, :2] ** 2)]
    matrix = cka_matrix([*layers, torch.zeros(40, 3), torch.full((40, 2, 2), math.nan)])
    for i, j in itertools.product(range(3), repeat=2):
        assert matrix[i, j] == pytest.approx(linear_cka(layers[i], layers[j]), rel=1e-10)
    assert torch.equal(matrix[3, :4], torch.zeros(4, dtype=torch.float64))
    assert matrix[4].isnan().all()
    with pytest.raises(ValueError, match=r"`features\[1\]`"):
        cka_matrix([torch.randn(5, 2), torch.randn(6, 2)])


def test_similarities_equal_the_single_measures():
    rng = np.random.default_rng(10)
    x, y = torch.tensor(rng.standard_normal((50, 5))), torch.tensor(rng.standard_normal((50, 5)))
    together = similarities(x, y, ("cka", "cka_debiased", "orthogonal_procrustes", "intertwiner"), "tanh")
    assert together == {
        "cka": linear_cka(x, y),
        "cka_debiased": linear_cka(x, y, debiased=True),
        "orthogonal_procrustes": orthogonal_procrustes_similarity(x, y),
        "intertwiner": intertwiner_similarity(x, y, "tanh"),
    }
    with pytest.raises(ValueError, match="`metrics`"):
        similarities(x, y, ("cca",))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_prepared_features_give_exactly_the_values_of_the_plain_tensors(activation):
    rng = np.random.default_rng(11)
    x = torch.tensor(np.maximum(rng.standard_normal((60, 70 if activation == "identity" else 6)), 0.0))
    x[:, 1] = 0.5  # a dead unit
    y = torch.tensor(np.maximum(rng.standard_normal((60, 6)), 0.0)).float()
    metrics = ("cka", "cka_debiased", "orthogonal_procrustes", "intertwiner")
    expected = similarities(x, y, metrics, activation)
    reference = PreparedFeatures(y)
    for _ in range(2):  # the second time from the cached Gram matrices
        assert similarities(x, reference, metrics, activation) == expected
        assert similarities(PreparedFeatures(x), reference, metrics, activation) == expected
    assert similarities(reference, x, metrics, activation) == similarities(y, x, metrics, activation)


def test_prepared_features_refuse_what_the_tensors_refuse():
    for bad in (np.zeros((10, 3)), [[1.0, 2.0]], "x", 3.0, math.nan, None, True):
        with pytest.raises(ArgumentError, match="`features` must be a Tensor"):
            PreparedFeatures(bad)
    with pytest.raises(ValueError, match="`features` must be a 2-D tensor"):
        PreparedFeatures(torch.zeros(10, 3, 2))
    with pytest.raises(ValueError, match="same examples"):
        similarities(torch.randn(10, 3), PreparedFeatures(torch.randn(11, 3)))
    with pytest.raises(ValueError, match="same number of features"):
        similarities(PreparedFeatures(torch.randn(10, 3)), torch.randn(10, 4))
    not_finite = torch.randn(10, 3)
    not_finite[0, 0] = math.nan
    assert all(math.isnan(value) for value in similarities(torch.randn(10, 3), PreparedFeatures(not_finite)).values())
