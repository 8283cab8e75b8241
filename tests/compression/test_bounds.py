import math

import pytest

from lightning_nt.compression import kl_bernoulli, kl_inverse, occam_hoeffding_bound, occam_kl_bound


@pytest.mark.parametrize(
    ("empirical", "budget", "expected"),
    [(0.0, 0.1, 0.095163), (0.1, 0.05, 0.220079), (0.02, 0.06, 0.109663)],
)
def test_kl_inverse_golden_values(empirical, budget, expected):
    assert kl_inverse(empirical, budget) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("error", "bits", "expected"), [(0.01, 20000, 0.24090), (0.02, 5000, 0.10727)])
def test_occam_kl_golden_values(error, bits, expected):
    assert occam_kl_bound(error, bits, 60000, 0.05) == pytest.approx(expected, abs=1e-5)


def test_kl_inverse_is_the_largest_p_within_the_budget():
    for empirical, budget in ((0.05, 0.01), (0.3, 0.2), (0.9, 0.5)):
        p = kl_inverse(empirical, budget)
        assert kl_bernoulli(empirical, p) == pytest.approx(budget, abs=1e-9) or p == 1.0
        assert kl_bernoulli(empirical, p - 1e-6) <= budget
    assert kl_inverse(0.0, 0.1) == pytest.approx(1 - math.exp(-0.1), abs=1e-15)
    assert kl_inverse(0.2, 50.0) == pytest.approx(1.0)


def test_hoeffding_is_looser_than_kl():
    for error, bits, m in ((0.01, 20000, 60000), (0.02, 5000, 60000), (0.1, 100, 1000)):
        assert occam_hoeffding_bound(error, bits, m) >= occam_kl_bound(error, bits, m)


def test_bad_input():
    with pytest.raises(ValueError, match="delta"):
        occam_kl_bound(0.1, 10, 100, delta=0)
    with pytest.raises(ValueError, match="code_bits"):
        occam_kl_bound(0.1, -1, 100)
    with pytest.raises(ValueError, match="empirical"):
        kl_inverse(1.5, 0.1)
