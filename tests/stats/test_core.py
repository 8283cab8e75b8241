import math

import numpy as np
import pytest
import torch

from lightning_nt.stats import (
    TestResult,
    cross_mean_statistics,
    cross_mean_test,
    cross_mmd_statistics,
    cross_mmd_test,
    normal_p_value,
    split_indices,
)
from tests.stats import reference


def _data(*shape, seed=0, shift=0.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


@pytest.mark.parametrize(("n", "d", "shift"), [(200, 10, 0.0), (201, 1000, 0.0), (57, 3, 0.3), (4, 1, 1.0)])
def test_cross_mean_test_equals_an_independent_numpy_implementation(n, d, shift):
    samples = _data(n, d, shift=shift)
    result = cross_mean_test(samples, seed=None)
    statistic, p_value, estimate = reference.cross_mean(samples.numpy())
    assert result.statistic == pytest.approx(statistic, rel=1e-10, abs=1e-10)
    assert result.p_value == pytest.approx(p_value, rel=1e-10, abs=1e-12)
    assert result.estimate == pytest.approx(estimate, rel=1e-10, abs=1e-12)
    assert (result.n, result.d) == (n, d)


@pytest.mark.parametrize(
    ("n", "m", "d", "kernel", "bandwidth", "scale"),
    [
        (200, 200, 10, "gaussian", "median", 1.0),
        (101, 60, 1000, "gaussian", "median", 1.2),
        (40, 51, 5, "laplace", "median", 1.0),
        (30, 30, 2, "gaussian", 0.7, 2.0),
        (30, 25, 7, "laplace", 3.0, 1.0),
    ],
)
def test_cross_mmd_test_equals_an_independent_numpy_implementation(n, m, d, kernel, bandwidth, scale):
    x, y = _data(n, d, seed=1), _data(m, d, seed=2) * scale
    result = cross_mmd_test(x, y, kernel=kernel, bandwidth=bandwidth, seed=None)
    statistic, p_value, estimate = reference.cross_mmd(
        x.numpy(), y.numpy(), kernel, None if bandwidth == "median" else bandwidth
    )
    assert result.statistic == pytest.approx(statistic, rel=1e-10, abs=1e-10)
    assert result.p_value == pytest.approx(p_value, rel=1e-10, abs=1e-12)
    assert result.estimate == pytest.approx(estimate, rel=1e-10, abs=1e-14)
    assert (result.n, result.d) == (n + m, d)


def test_a_seed_splits_a_seeded_random_order_of_the_rows():
    samples, y = _data(30, 4, shift=0.2), _data(20, 4, seed=3)
    order = torch.randperm(30, generator=torch.Generator().manual_seed(7))
    assert cross_mean_test(samples, seed=7) == cross_mean_test(samples[order], seed=None)
    order_y = torch.randperm(20, generator=torch.Generator().manual_seed(8))
    assert cross_mmd_test(samples, y, seed=7) == cross_mmd_test(samples[order], y[order_y], seed=None)
    first, second = split_indices(9, seed=3)
    assert len(first) == 4 and sorted([*first.tolist(), *second.tolist()]) == list(range(9))


def test_batched_statistics_equal_one_call_per_repetition():
    samples, other = _data(5, 40, 30), _data(5, 36, 30, seed=4)
    statistics, estimates = cross_mean_statistics(samples, seed=2)
    mmd_statistics, mmd_estimates = cross_mmd_statistics(samples, other, seed=2)
    for index in range(5):
        single = cross_mean_test(samples[index], seed=2)
        assert statistics[index].item() == pytest.approx(single.statistic, rel=1e-12)
        assert estimates[index].item() == pytest.approx(single.estimate, rel=1e-12)
        pair = cross_mmd_test(samples[index], other[index], seed=2)
        assert mmd_statistics[index].item() == pytest.approx(pair.statistic, rel=1e-12)
        assert mmd_estimates[index].item() == pytest.approx(pair.estimate, rel=1e-12)


def test_alternatives_read_the_same_statistic_from_either_tail():
    samples = _data(50, 3, shift=0.25)
    greater = cross_mean_test(samples)
    less = cross_mean_test(samples, alternative="less")
    both = cross_mean_test(samples, alternative="two-sided")
    assert greater.statistic == less.statistic == both.statistic > 0
    assert greater.p_value + less.p_value == pytest.approx(1.0)
    assert both.p_value == pytest.approx(2 * greater.p_value)
    with pytest.raises(ValueError, match="alternative"):
        cross_mean_test(samples, alternative="sideways")
    assert normal_p_value(torch.tensor(-1.0), "two-sided").item() == pytest.approx(0.3173105, rel=1e-6)


def test_a_clear_signal_is_found_and_reported_with_its_size():
    mean = torch.full((500,), 0.1, dtype=torch.float64)  # ||mean||² = 5
    result = cross_mean_test(_data(100, 500) + mean)
    assert result.rejects(0.001) and result.p_value < 1e-10
    assert result.estimate == pytest.approx(5.0, rel=0.3)
    shifted = cross_mmd_test(_data(100, 5), _data(100, 5, seed=1) + 1.0)
    assert shifted.rejects(1e-6) and shifted.estimate > 0


def test_float32_and_half_inputs_are_computed_at_least_in_float32():
    samples = _data(80, 64, shift=0.1)
    exact = cross_mean_test(samples)
    assert cross_mean_test(samples.float()).statistic == pytest.approx(exact.statistic, rel=1e-5)
    assert cross_mean_test(samples.bfloat16()).statistic == pytest.approx(exact.statistic, rel=0.05)
    assert cross_mmd_test(samples.float(), samples.float() + 0.5).statistic == pytest.approx(
        cross_mmd_test(samples, samples + 0.5).statistic, rel=1e-4
    )


def test_result_is_a_plain_record():
    result = TestResult(statistic=1.0, p_value=0.2, n=10, d=3)
    assert math.isnan(result.estimate) and not result.rejects(0.05) and result.rejects(0.2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cross_mean_test(torch.zeros(3, 2)), "at least 4"),
        (lambda: cross_mean_test(torch.zeros(2, 3, 4)), r"\[n, d\]"),
        (lambda: cross_mean_test(torch.zeros(6, 2, dtype=torch.int64)), "floating-point"),
        (lambda: cross_mmd_test(torch.zeros(6, 2), torch.zeros(6, 3)), "agree"),
        (lambda: cross_mmd_test(torch.zeros(6), torch.zeros(6, 3)), r"\[n, d\]"),
        (lambda: cross_mmd_test(torch.randn(6, 2), torch.randn(6, 2), kernel="linear"), "kernel"),
        (lambda: cross_mmd_test(torch.randn(6, 2), torch.randn(6, 2), bandwidth=0.0), "bandwidth"),
        (lambda: cross_mmd_test(torch.randn(6, 2), torch.randn(6, 2), bandwidth="mean"), "bandwidth"),
    ],
)
def test_bad_inputs_are_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_one_dimensional_samples_are_read_as_d_equal_one():
    values = _data(40, shift=0.5)
    assert cross_mean_test(values) == cross_mean_test(values[:, None])
    assert np.isfinite(cross_mean_test(values).p_value)
