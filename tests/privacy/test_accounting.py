import warnings

from opacus.accountants.utils import get_noise_multiplier

from lightning_nt.privacy.accounting import calibrate_noise, epsilon_of, make_accountant


def test_calibration_and_prv_epsilon_do_not_repeat_opacus_alpha_warning():
    """The bisection's trial noise levels make Opacus warn "largest alpha"; it does not touch the reported epsilon."""
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        expected = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.01, steps=1000)
    assert any("largest alpha" in str(w.message) for w in raw)  # what a user saw on every DP run
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        sigma = calibrate_noise(8.0, 1e-5, sample_rate=0.01, steps=1000, accountant="rdp")
        accountant = make_accountant("prv")
        accountant.step(noise_multiplier=sigma, sample_rate=0.01)
        epsilon_of(accountant, 1e-5)
    assert sigma == expected and not any("alpha" in str(w.message) for w in ours)
