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
    studentized_mean,
)
from lightning_nt.stats.cross import _median_distance
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
        # found by audit: torch's or Python's own errors, naming no argument
        (lambda: cross_mmd_test(torch.randn(6, 2), torch.randn(6, 2), bandwidth=True), "`bandwidth`.*True"),
        (lambda: cross_mean_test(torch.randn(6, 2), seed="a"), "`seed` must be an integer"),
        (lambda: cross_mmd_test(torch.randn(6, 2), torch.randn(6, 2), seed=1.5), "`seed` must be an integer"),
        (lambda: cross_mean_test(torch.randn(6, 2).numpy()), r"`samples` must be a torch.Tensor.*torch.as_tensor"),
        (lambda: cross_mmd_test(torch.randn(6, 2), [[0.0, 1.0]] * 6), r"`y` must be a torch.Tensor"),
        (lambda: cross_mmd_test(torch.randn(6, 2), torch.randn(3, 2)), "`y` needs at least 4 examples"),
    ],
)
def test_bad_inputs_are_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_one_dimensional_samples_are_read_as_d_equal_one():
    values = _data(40, shift=0.5)
    assert cross_mean_test(values) == cross_mean_test(values[:, None])
    assert np.isfinite(cross_mean_test(values).p_value)


def _one_hot(n, probabilities, seed):
    draws = torch.multinomial(torch.tensor(probabilities), n, True, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(draws, len(probabilities)).double()


@pytest.mark.parametrize("kernel", ["gaussian", "laplace"])
def test_the_median_bandwidth_leaves_out_identical_rows_so_tied_data_are_tested(kernel):
    # one-hot rows: most pairwise distances are 0, whose median (0) made the kernel 0/0 and the result NaN
    x, y = _one_hot(200, [0.85, 0.10, 0.05], seed=0), _one_hot(200, [0.5, 0.3, 0.2], seed=1)
    result = cross_mmd_test(x, y, kernel=kernel, seed=None)
    statistic, _, estimate = reference.cross_mmd(x.numpy(), y.numpy(), kernel)
    assert result.statistic == pytest.approx(statistic, rel=1e-10)
    assert result.estimate == pytest.approx(estimate, rel=1e-10)
    assert result.p_value < 1e-6
    same = cross_mmd_test(x, _one_hot(200, [0.85, 0.10, 0.05], seed=2), kernel=kernel)
    assert math.isfinite(same.statistic) and same.p_value > 0.05
    batched, _ = cross_mmd_statistics(torch.stack([x, x]), torch.stack([y, x.flip(0)]), kernel, seed=None)
    assert batched[0].item() == pytest.approx(result.statistic, rel=1e-12) and math.isfinite(batched[1].item())


def test_when_the_second_halves_coincide_the_bandwidth_is_one_and_the_answer_no_evidence():
    x, y = _data(20, 3, seed=1), _data(20, 3, seed=2)
    x[10:], y[10:] = 0.5, 0.5  # X2 and Y2: one point repeated, so the witness function is zero everywhere
    second = torch.cat([x[10:], y[10:]])
    assert reference.median_bandwidth(second.numpy()) == _median_distance(second).item() == 1.0
    with pytest.warns(UserWarning, match="no evidence"):
        result = cross_mmd_test(x, y, seed=None)
    assert (result.statistic, result.p_value, result.estimate) == (0.0, 1.0, 0.0)


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_terms_that_are_all_zero_give_no_evidence_p_one_with_a_warning(alternative):
    one_row_in_the_second_half = torch.zeros(10, 3)
    one_row_in_the_second_half[7] = 1.0
    for samples in (torch.zeros(10, 3), one_row_in_the_second_half):
        with pytest.warns(UserWarning, match="no evidence"):
            result = cross_mean_test(samples, alternative=alternative, seed=None)
        assert (result.statistic, result.p_value, result.estimate) == (0.0, 1.0, 0.0)
    with pytest.warns(UserWarning, match="no evidence"):
        result = cross_mmd_test(torch.ones(10, 3), torch.ones(12, 3))
    assert (result.statistic, result.p_value, result.estimate) == (0.0, 1.0, 0.0)


def test_equal_nonzero_terms_give_the_infinite_limit_with_a_warning():
    with pytest.warns(UserWarning, match="infinite limit"):
        result = cross_mean_test(torch.ones(10, 3))  # every f_i = 3
    assert (result.statistic, result.p_value, result.estimate) == (math.inf, 0.0, 3.0)
    with pytest.warns(UserWarning, match="infinite limit"):
        assert cross_mean_test(torch.ones(10, 3), alternative="less").p_value == 1.0
    with pytest.warns(UserWarning, match="infinite limit"):
        result = cross_mmd_test(torch.ones(10, 3), torch.zeros(10, 3))
    assert result.statistic == math.inf and result.p_value == 0.0 and result.estimate > 0


def test_batched_statistics_without_spread_are_the_limit_not_nan():
    statistics, means = studentized_mean(torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]]))
    assert statistics.tolist() == [0.0, math.inf, -math.inf] and means.tolist() == [0.0, 2.0, -1.0]
    samples = torch.zeros(2, 10, 3)
    samples[1] = 1.0
    assert cross_mean_statistics(samples)[0].tolist() == [0.0, math.inf]


def test_nan_or_infinite_data_are_warned_about():
    samples = _data(20, 3)
    samples[3, 1] = math.nan
    with pytest.warns(UserWarning, match="`samples` holds NaN or infinite"):
        assert math.isnan(cross_mean_test(samples).p_value)
    samples[3, 1] = math.inf  # a point at infinity: its kernel values are 0, the statistic is finite
    with pytest.warns(UserWarning, match="`x` holds NaN or infinite"):
        cross_mmd_test(samples, _data(20, 3, seed=1))
